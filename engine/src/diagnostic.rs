//! Errors in a pipeline file, as miette diagnostics that point into the RON source.
//! Every problem of a file is collected and reported at once.

use std::fmt;

use miette::{Diagnostic, NamedSource, SourceSpan};

/// One problem, with the span of the offending text.
#[derive(Debug, Clone, thiserror::Error, Diagnostic)]
#[error("{message}")]
pub struct SpecError {
    pub message: String,
    #[label("{label}")]
    pub span: SourceSpan,
    pub label: String,
    #[help]
    pub help: Option<String>,
}

/// All problems found in one pipeline file.
#[derive(Debug, thiserror::Error, Diagnostic)]
#[error("{file}: {} problem{} in the pipeline", errors.len(), if errors.len() == 1 { "" } else { "s" })]
pub struct SpecErrors {
    pub file: String,
    #[source_code]
    pub source_code: NamedSource<String>,
    #[related]
    pub errors: Vec<SpecError>,
}

impl SpecErrors {
    /// Render without colours (tests, logs, `--json`): file:line:col, caret and help.
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        let handler = miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor()).with_width(100);
        let _ = handler.render_report(&mut out, self);
        out
    }

    /// `file:line:col: message` per problem, for machine consumers.
    pub fn lines(&self) -> Vec<String> {
        let src = self.source_code.inner();
        self.errors
            .iter()
            .map(|e| {
                let (line, col) = line_col(src, e.span.offset());
                format!("{}:{line}:{col}: {}", self.file, e.message)
            })
            .collect()
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// Byte offset of a 1-based line and column (as ron reports them).
pub fn offset_of(src: &str, line: usize, col: usize) -> usize {
    let mut offset = 0;
    for (i, l) in src.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return offset + l.char_indices().nth(col.saturating_sub(1)).map(|(b, _)| b).unwrap_or(l.len());
        }
        offset += l.len();
    }
    src.len()
}

/// Finds spans of stages and fields in the RON text. RON's parser does not keep spans
/// for values, so this scans the source for the quoted names (hand-written; see
/// ARCHITECTURE.md). Falls back to the enclosing stage, then the file start.
pub struct Locator<'a> {
    src: &'a str,
    /// (stage name, byte offset of its quoted key), in file order.
    stages: Vec<(String, usize)>,
    /// Expanded stage name (`round@2`) -> the declaration it came from.
    aliases: std::collections::HashMap<String, String>,
}

impl<'a> Locator<'a> {
    pub fn new(src: &'a str, names: impl IntoIterator<Item = String>) -> Self {
        let mut stages = Vec::new();
        let mut from = 0;
        for name in names {
            if let Some(at) = find_key(src, &name, from, src.len()) {
                stages.push((name, at));
                from = at + 1;
            }
        }
        Locator { src, stages, aliases: Default::default() }
    }

    pub fn with_aliases(mut self, aliases: std::collections::HashMap<String, String>) -> Self {
        self.aliases = aliases;
        self
    }

    fn region(&self, stage: &str) -> Option<(usize, usize)> {
        let stage = self.aliases.get(stage).map(String::as_str).unwrap_or(stage);
        let i = self.stages.iter().position(|(n, _)| n == stage)?;
        let start = self.stages[i].1;
        let end = self.stages.get(i + 1).map(|s| s.1).unwrap_or(self.src.len());
        Some((start, end))
    }

    /// The stage's name.
    pub fn stage(&self, stage: &str) -> SourceSpan {
        let written = self.aliases.get(stage).map(String::as_str).unwrap_or(stage);
        match self.region(stage) {
            Some((start, _)) => (start, written.len() + 2).into(),
            None => (0, 0).into(),
        }
    }

    /// A key inside a section (`params`, `inputs`) of a stage, or the section itself.
    pub fn field(&self, stage: &str, section: &str, key: Option<&str>) -> SourceSpan {
        let Some((start, end)) = self.region(stage) else { return (0, 0).into() };
        let Some(sec) = find_ident(self.src, section, start, end) else { return self.stage(stage) };
        match key {
            Some(k) => match find_key(self.src, k, sec, end) {
                Some(at) => (at, k.len() + 2).into(),
                None => (sec, section.len()).into(),
            },
            None => (sec, section.len()).into(),
        }
    }
}

/// Offset of `"name"` followed by `:` within [from, to).
fn find_key(src: &str, name: &str, from: usize, to: usize) -> Option<usize> {
    let needle = format!("\"{name}\"");
    let hay = &src[from..to];
    let mut pos = 0;
    while let Some(i) = hay[pos..].find(&needle) {
        let at = pos + i;
        if hay[at + needle.len()..].trim_start().starts_with(':') {
            return Some(from + at);
        }
        pos = at + 1;
    }
    // Unquoted keys are legal for struct fields.
    let hay_bytes = hay.as_bytes();
    let mut pos = 0;
    while let Some(i) = hay[pos..].find(name) {
        let at = pos + i;
        let before_ok = at == 0 || !(hay_bytes[at - 1].is_ascii_alphanumeric() || hay_bytes[at - 1] == b'_' || hay_bytes[at - 1] == b'"');
        if before_ok && hay[at + name.len()..].trim_start().starts_with(':') {
            return Some(from + at);
        }
        pos = at + 1;
    }
    None
}

fn find_ident(src: &str, ident: &str, from: usize, to: usize) -> Option<usize> {
    find_key(src, ident, from, to)
}

impl fmt::Display for Locator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} stages located", self.stages.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_round_trips() {
        let src = "ab\ncdé\nf";
        for off in [0, 1, 3, 5, 8] {
            let (l, c) = line_col(src, off);
            assert_eq!(offset_of(src, l, c), off);
        }
    }

    #[test]
    fn locates_stages_and_fields() {
        let src = r#"( stages: { "a": (kind: "x", params: { "seed": 1 }), "b": (kind: "y", params: { "seed": 2 }) } )"#;
        let loc = Locator::new(src, ["a".to_string(), "b".to_string()]);
        let s = loc.field("b", "params", Some("seed"));
        assert_eq!(&src[s.offset()..s.offset() + s.len()], "\"seed\"");
        assert!(s.offset() > loc.stage("b").offset());
    }
}
