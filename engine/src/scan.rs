//! A fast reader for the common shape of a pipeline file, in front of ron: a file of
//! 10^5 stages spent a third of `status` in ron's deserializer. It reads the plain
//! forms (strings without escapes, lists, maps, `true`/`false`, the stage fields by
//! name) itself and hands every other value (numbers, `Some(..)`, `job:`, `executor:`,
//! enums) to ron, so what a value means is still ron's. It accepts a subset of what
//! ron accepts and gives up, returning `None`, on anything else (escapes, comments
//! other than `//`, raw strings or identifiers, repeated keys or fields, attributes,
//! unknown fields, any error): the file is then parsed by ron alone, which also
//! reports every error. So a file it accepts reads exactly as ron reads it
//! (`tests::agrees_with_ron`), and a file it rejects costs one aborted scan.

use crate::spec::{Entries, InputDecl, PipelineFile, Raw, StageDecl, StageMap};

/// The file as ron would parse it, or `None` when it is not in the plain subset.
pub fn parse(src: &str) -> Option<PipelineFile> {
    let mut s = Scanner { src: src.as_bytes(), text: src, at: 0, depth: 0 };
    let file = s.file()?;
    s.ws()?;
    (s.at == s.src.len()).then_some(file)
}

/// Above this many entries, a map's repeated keys are found through a set.
const SCAN_KEYS: usize = 16;

/// Lists and maps nested deeper than this in a parameter are left to ron (which has
/// its own limit and reports it), so a hostile file cannot exhaust the stack here.
const MAX_DEPTH: usize = 64;

struct Scanner<'a> {
    src: &'a [u8],
    text: &'a str,
    at: usize,
    /// Lists and maps open around the parameter value being read.
    depth: usize,
}

impl<'a> Scanner<'a> {
    /// Skips whitespace and `//` comments; `None` on a block comment or a character
    /// that ron would read as whitespace but this scanner does not know.
    fn ws(&mut self) -> Option<()> {
        loop {
            match self.src.get(self.at) {
                Some(b' ' | b'\t' | b'\n' | b'\r' | 0x0B | 0x0C) => self.at += 1,
                Some(b'/') => {
                    if self.src.get(self.at + 1) != Some(&b'/') {
                        return None;
                    }
                    match self.src[self.at..].iter().position(|&b| b == b'\n') {
                        Some(n) => self.at += n + 1,
                        None => self.at = self.src.len(),
                    }
                }
                Some(b) if *b >= 0x80 => return None,
                _ => return Some(()),
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws()?;
        self.src.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// After an element: a comma (the next element or a trailing comma) or the close.
    /// True when the collection continues.
    fn more(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                Some(self.peek()? != close)
            }
            c if c == close => Some(false),
            _ => None,
        }
    }

    /// `open item, item, ... close` (a trailing comma allowed), each item read by
    /// `item`.
    fn items(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(open)?;
        if self.peek()? != close {
            loop {
                item(self)?;
                if !self.more(close)? {
                    break;
                }
            }
        }
        self.eat(close)
    }

    /// A string without escapes (ron gives the same characters for it).
    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let start = self.at;
        let len = self.src[start..].iter().position(|&b| b == b'"' || b == b'\\')?;
        if self.src[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        Some(self.text[start..start + len].to_owned())
    }

    /// An identifier made of ASCII letters, digits and `_`.
    fn ident(&mut self) -> Option<&'a str> {
        self.ws()?;
        let start = self.at;
        let len = self.src[start..].iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'_')).unwrap_or(self.src.len() - start);
        if len == 0 || self.src[start].is_ascii_digit() {
            return None;
        }
        self.at += len;
        Some(&self.text[start..start + len])
    }

    /// The text of the value starting here, up to the `,` or closing bracket that
    /// ends it: for ron to read. `None` on anything this scan cannot delimit safely.
    fn value_text(&mut self) -> Option<&'a str> {
        self.ws()?;
        let start = self.at;
        let mut depth = 0usize;
        while let Some(&b) = self.src.get(self.at) {
            match b {
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' if depth == 0 => break,
                b')' | b']' | b'}' => depth -= 1,
                b',' if depth == 0 => break,
                b'"' => {
                    let len = self.src[self.at + 1..].iter().position(|&b| b == b'"' || b == b'\\')?;
                    if self.src[self.at + 1 + len] != b'"' {
                        return None;
                    }
                    self.at += len + 1;
                }
                b'\'' | b'/' | b'#' => return None,
                b if b >= 0x80 => return None,
                _ => {}
            }
            self.at += 1;
        }
        (depth == 0 && self.at > start).then(|| &self.text[start..self.at])
    }

    /// A value read by ron from its own text.
    fn by_ron<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        let text = self.value_text()?;
        ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME).from_str(text).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        match self.ident()? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    fn file(&mut self) -> Option<PipelineFile> {
        let (mut backend, mut executor, mut stages) = (None, None, None);
        self.items(b'(', b')', |s| {
            let field = s.ident()?;
            s.eat(b':')?;
            match field {
                "backend" if backend.is_none() => backend = Some(s.by_ron::<Option<String>>()?),
                "executor" if executor.is_none() => executor = Some(s.by_ron::<Option<crate::slurm::ExecutorDecl>>()?),
                "stages" if stages.is_none() => stages = Some(s.stages()?),
                _ => return None,
            }
            Some(())
        })?;
        Some(PipelineFile { backend: backend.flatten(), executor: executor.flatten(), stages: stages? })
    }

    fn stages(&mut self) -> Option<StageMap> {
        let mut out = Vec::new();
        self.items(b'{', b'}', |s| {
            let name = s.string()?;
            s.eat(b':')?;
            out.push((name, s.stage()?));
            Some(())
        })?;
        // A vector grown by doubling holds up to twice its stages' room.
        out.shrink_to_fit();
        Some(StageMap(out))
    }

    fn stage(&mut self) -> Option<StageDecl> {
        let mut d = StageDecl::default();
        // Fields seen, in declaration order: a repeated one is ron's error.
        let mut seen = [false; 10];
        self.items(b'(', b')', |s| {
            let field = s.ident()?;
            s.eat(b':')?;
            let i = ["kind", "extends", "template", "foreach", "first", "params", "inputs", "resources", "job", "local"].iter().position(|f| *f == field)?;
            if std::mem::replace(&mut seen[i], true) {
                return None;
            }
            match i {
                0 => d.kind = Some(s.string()?),
                1 => d.extends = Some(s.string()?),
                2 => d.template = s.bool()?,
                3 => d.foreach = Some(s.strings()?),
                4 => d.first = s.entries(Self::input)?,
                5 => d.params = s.entries(Self::raw)?,
                6 => d.inputs = s.entries(Self::input)?,
                7 => {
                    d.resources = Some(match s.ident()? {
                        "Light" => crate::kind::Resources::Light,
                        "Heavy" => crate::kind::Resources::Heavy,
                        "Gpu" => crate::kind::Resources::Gpu,
                        _ => return None,
                    })
                }
                8 => d.job = s.by_ron::<Option<Box<crate::slurm::JobResources>>>()?,
                _ => d.local = Some(s.bool()?),
            }
            Some(())
        })?;
        Some(d)
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        self.items(b'[', b']', |s| s.string().map(|x| out.push(x)))?;
        Some(out)
    }

    fn input(&mut self) -> Option<InputDecl> {
        match self.peek()? {
            b'"' => self.string().map(InputDecl::One),
            b'[' => self.strings().map(InputDecl::Many),
            _ => None,
        }
    }

    /// A string-keyed map, each key once.
    fn entries<V>(&mut self, mut value: impl FnMut(&mut Self) -> Option<V>) -> Option<Entries<V>> {
        let mut out: Vec<(String, V)> = Vec::new();
        let mut many: Option<std::collections::HashSet<String>> = None;
        self.items(b'{', b'}', |s| {
            let k = s.string()?;
            let repeated = match &mut many {
                Some(set) => !set.insert(k.clone()),
                None => out.iter().any(|(x, _)| *x == k),
            };
            if repeated {
                return None;
            }
            s.eat(b':')?;
            out.push((k, value(s)?));
            if many.is_none() && out.len() > SCAN_KEYS {
                many = Some(out.iter().map(|(k, _)| k.clone()).collect());
            }
            Some(())
        })?;
        // Every declaration is held until it is checked: not the growth's spare room.
        out.shrink_to_fit();
        Some(Entries(out))
    }

    /// A parameter value: strings, lists, string-keyed maps and booleans here, every
    /// other form (numbers above all) as ron reads it.
    fn raw(&mut self) -> Option<Raw> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        self.depth += 1;
        let v = self.raw_inner();
        self.depth -= 1;
        v
    }

    fn raw_inner(&mut self) -> Option<Raw> {
        match self.peek()? {
            b'"' => self.string().map(Raw::Str),
            b'[' => {
                let mut out = Vec::new();
                self.items(b'[', b']', |s| s.raw().map(|x| out.push(x)))?;
                Some(Raw::Seq(out))
            }
            b'{' => {
                let map = self.entries(Self::raw)?;
                Some(Raw::Map(map.0.into_iter().map(|(k, v)| (Raw::Str(k), v)).collect()))
            }
            b't' | b'f' => {
                let save = self.at;
                match self.bool() {
                    Some(b) => Some(Raw::Bool(b)),
                    None => {
                        self.at = save;
                        self.by_ron::<Raw>()
                    }
                }
            }
            _ => self.by_ron::<Raw>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ron_parse(src: &str) -> Option<PipelineFile> {
        ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME).from_str::<PipelineFile>(src).ok()
    }

    /// Every file the scan accepts reads as ron reads it; the shipped pipelines are
    /// accepted or left to ron, never misread.
    #[test]
    fn agrees_with_ron() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
        let mut files: Vec<String> = std::fs::read_dir(&dir).map(|d| d.flatten().filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()).unwrap_or_default();
        files.extend(
            [
                r#"( stages: { "a": (kind: "command", params: { "cmd": "true", "outputs": { "o": "o.txt" }, "n": 3, "x": -1.5e3, "big": 18446744073709551615, "o": Some("x"), "u": (), "deps": ["a", "b",], }, inputs: { "p": "b.o", "q": ["b.o", "c.o"] }, resources: Heavy, local: true, job: (cpus: 2, mem: "1G"), ), "b": (kind: "k", template: false, foreach: ["x", "y"], first: { "p": "z.o" }, extends: "a") } )"#,
                "// a comment\n(backend: \"flex\", executor: Slurm(partition: \"gpu\", extra: [\"--x\"]), stages: {\n \"s\": (kind: \"c\", params: { \"t\": true, \"f\": false, \"m\": {}, \"l\": [], \"nested\": { \"k\": [1, 2.0, \"s\"] } }), // end\n},)",
                r#"(stages: {})"#,
                r#"(stages: { "a": (kind: "x", params: { "n": 1..3 }) })"#,
                r#"(stages: { "a": (kind: "x", params: { "n": 1 }), })"#,
                r#"(executor: Local, stages: { "a": (kind: "x", resources: Gpu) })"#,
            ]
            .map(String::from),
        );
        let mut accepted = 0;
        for src in &files {
            if let Some(fast) = parse(src) {
                accepted += 1;
                let slow = ron_parse(src).unwrap_or_else(|| panic!("the scan accepted what ron rejects:\n{src}"));
                assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{src}");
            }
        }
        assert!(accepted >= 6, "only {accepted} of {} accepted", files.len());
    }

    /// Anything outside the plain subset, valid or not, is left to ron.
    #[test]
    fn leaves_the_rest_to_ron() {
        for src in [
            r#"(stages: { "a": (kind: "x\ty") })"#,
            r#"(stages: { "a": (kind: "x", kind: "y") })"#,
            r#"(stages: { "a": (kind: "x", params: { "p": 1, "p": 2 }) })"#,
            r#"(stages: { "a": (kind: "x", params: { "p": { "k": 1, "k": 2 } }) })"#,
            r#"(stages: { "a": (kind: "x", colour: "red") })"#,
            r#"#![enable(implicit_some)] (stages: {})"#,
            r#"(stages: { /* c */ "a": (kind: "x") })"#,
            r#"(stages: { "a": (kind: r"x") })"#,
            r#"(stages: { "a": (kind: "x") }) trailing"#,
            r#"(stages: { "a": (kind: "x", params: { "c": 'c' }) })"#,
            r#"PipelineFile(stages: {})"#,
            r#"(stages: { "a": (kind: "x", resources: Huge) })"#,
            r#"(stages: { "a": (kind: "x", params: { "n": 1 2 }) })"#,
            "(stages: {\u{2028}})",
            format!(r#"(stages: {{ "a": (kind: "x", params: {{ "deep": {}{} }}) }})"#, "[".repeat(100_000), "]".repeat(100_000)).as_str(),
        ] {
            assert!(parse(src).is_none(), "{src}");
        }
    }
}
