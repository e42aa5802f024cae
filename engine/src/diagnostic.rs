//! Errors in a pipeline file, as miette diagnostics that point into the RON source.
//! Every problem of a file is collected and reported at once.
//!
//! Also what makes user-controlled text safe to print: [`printable`] escapes control
//! characters (a stage name with ESC must not drive the terminal), [`clip`] cuts long
//! values (a 50 MB string must not print 50 MB), and rendering hands miette a sanitised
//! copy of the source whose very long lines are shown as a window around the span.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::fmt;

use miette::{Diagnostic, MietteError, MietteSpanContents, NamedSource, SourceCode, SourceSpan, SpanContents};

/// At most this many bytes of a value are quoted in a message.
pub const MAX_VALUE_BYTES: usize = 200;
/// At most this many bytes of a message, a label or a help text are printed.
const MAX_MESSAGE_BYTES: usize = 2000;
/// Source lines longer than this are shown as a window around the span.
const MAX_LINE_BYTES: usize = 400;
/// Bytes shown on each side of a span inside a long line.
const WINDOW_MARGIN: usize = 80;

/// `s`, or its first `max` bytes (at a char boundary) followed by `… (N bytes)`.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let cut = floor_char_boundary(s, max);
    Cow::Owned(format!("{}… ({} bytes)", &s[..cut], s.len()))
}

/// Whether printing `c` raw could move the cursor, recolour or rewrite the terminal, or
/// reorder text: C0/C1 controls (except tab), DEL, and the bidirectional overrides.
pub fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every character of [`needs_escape`] written as a Rust escape (`\n`,
/// `\u{1b}`), so user-controlled text (names, values, paths, messages) prints inert.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`printable`] then [`clip`]: for values quoted in messages.
pub fn shown(s: &str, max: usize) -> String {
    printable(&clip(s, max)).into_owned()
}

fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

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
        self.render(false)
    }

    /// Render for a person: file:line:col, the source line with a caret, and help.
    /// Messages are escaped and clipped, and the source shown is a sanitised copy whose
    /// long lines are cut around the span, so a hostile file cannot flood or drive the
    /// terminal.
    pub fn render(&self, colour: bool) -> String {
        let theme = if colour { miette::GraphicalTheme::unicode() } else { miette::GraphicalTheme::unicode_nocolor() };
        let view = View::new(self);
        let mut out = String::new();
        let handler = miette::GraphicalReportHandler::new_themed(theme).with_width(100);
        let _ = handler.render_report(&mut out, &view);
        out
    }

    /// `file:line:col: message` per problem, for machine consumers (escaped, clipped).
    pub fn lines(&self) -> Vec<String> {
        let src = self.source_code.inner();
        self.errors
            .iter()
            .map(|e| {
                let (line, col) = line_col(src, e.span.offset());
                format!("{}:{line}:{col}: {}", printable(&self.file), shown(&e.message, MAX_MESSAGE_BYTES))
            })
            .collect()
    }
}

/// What miette renders: the errors with escaped, clipped texts and spans clipped to
/// the source, over a sanitised copy of the source.
struct View {
    title: String,
    source: Window,
    errors: Vec<SpecError>,
}

impl View {
    fn new(e: &SpecErrors) -> View {
        let src = e.source_code.inner();
        let errors = e
            .errors
            .iter()
            .map(|x| {
                let start = floor_char_boundary(src, x.span.offset());
                let end = ceil_char_boundary(src, start + x.span.len().min(MAX_VALUE_BYTES));
                SpecError {
                    message: shown(&x.message, MAX_MESSAGE_BYTES),
                    span: (start, end - start).into(),
                    label: shown(&x.label, MAX_VALUE_BYTES),
                    help: x.help.as_deref().map(|h| shown(h, MAX_MESSAGE_BYTES)),
                }
            })
            .collect();
        View { title: printable(&e.to_string()).into_owned(), source: Window::new(printable(&e.file).into_owned(), src), errors }
    }
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.title)
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.title)
    }
}

impl std::error::Error for View {}

impl Diagnostic for View {
    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.source)
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(self.errors.iter().map(|e| e as &dyn Diagnostic)))
    }
}

/// The source as miette sees it: a copy of the same byte length (so spans stay valid)
/// with every character of [`needs_escape`] but newlines overwritten by `?`, read as
/// whole lines when they are short and as a window around the span when they are not.
struct Window {
    name: String,
    text: String,
}

impl Window {
    fn new(name: String, src: &str) -> Window {
        let mut bytes = src.as_bytes().to_vec();
        for (i, c) in src.char_indices() {
            let keep = c == '\n' || (c == '\r' && src[i + 1..].starts_with('\n'));
            if needs_escape(c) && !keep {
                bytes[i..i + c.len_utf8()].fill(b'?');
            }
        }
        // Only whole characters were overwritten, each byte by an ASCII byte.
        let text = String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Window { name, text }
    }

    fn line_bounds(&self, at: usize) -> (usize, usize) {
        let t = &self.text;
        let start = t[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let end = t[at..].find('\n').map(|i| at + i).unwrap_or(t.len());
        (start, end)
    }
}

impl SourceCode for Window {
    fn read_span<'a>(&'a self, span: &SourceSpan, before: usize, after: usize) -> Result<Box<dyn SpanContents<'a> + 'a>, MietteError> {
        let t = &self.text;
        if span.offset() > t.len() {
            return Err(MietteError::OutOfBounds);
        }
        let start = floor_char_boundary(t, span.offset());
        let end = ceil_char_boundary(t, start + span.len());
        let col = line_col(t, start).1;
        let ls = self.line_bounds(start).0;
        let le = self.line_bounds(end).1;
        let (from, to, column) = if le - ls > MAX_LINE_BYTES {
            // A long line: a window around the span only, no context lines.
            let from = if before == 0 { start } else { floor_char_boundary(t, start.saturating_sub(WINDOW_MARGIN).max(ls)) };
            let to = ceil_char_boundary(t, (end + WINDOW_MARGIN).min(le));
            (from, to, line_col(t, from).1 - 1)
        } else {
            // Whole lines, with up to `before`/`after` short context lines.
            let mut from = if before == 0 { start } else { ls };
            for _ in 0..before {
                if from == 0 {
                    break;
                }
                let (ps, pe) = self.line_bounds(from - 1);
                if pe - ps > MAX_LINE_BYTES {
                    break;
                }
                from = ps;
            }
            let mut to = le;
            for _ in 0..after {
                if to >= t.len() {
                    break;
                }
                let (ns, ne) = self.line_bounds(to + 1);
                if ne - ns > MAX_LINE_BYTES {
                    break;
                }
                to = ne;
            }
            (from, to, if before == 0 { col - 1 } else { 0 })
        };
        let first_line = line_col(t, from).0 - 1;
        let lines = t[from..to].matches('\n').count() + 1;
        Ok(Box::new(MietteSpanContents::new_named(self.name.clone(), &t.as_bytes()[from..to], (from, to - from).into(), first_line, column, lines)))
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
///
/// Locating is lazy: nothing is scanned until a span is asked for, which only happens
/// when there is an error to report, so loading a valid file never reads its text
/// again. The first span asked for lexes the `stages` map once into a name -> offset
/// index; every later stage lookup is a hash lookup, so reporting many errors stays
/// linear in the file's size.
pub struct Locator<'a> {
    src: &'a str,
    /// The declared names, for the fallback search when the file cannot be lexed;
    /// consumed when the index is built.
    names: RefCell<Option<Box<dyn Iterator<Item = String> + 'a>>>,
    index: OnceCell<StageIndex>,
    /// Expanded stage name (`round@2`) -> the declaration it came from.
    aliases: Option<&'a HashMap<String, String>>,
}

/// Where each stage's declaration starts, built by one pass over the text.
#[derive(Debug, Default)]
struct StageIndex {
    /// Byte offset of each stage's quoted key, in file order (duplicates kept).
    offsets: Vec<usize>,
    /// Stage name -> its first position in `offsets`.
    first: HashMap<String, usize>,
}

impl StageIndex {
    fn new(stages: Vec<(String, usize)>) -> StageIndex {
        let mut first = HashMap::with_capacity(stages.len());
        let mut offsets = Vec::with_capacity(stages.len());
        for (i, (name, at)) in stages.into_iter().enumerate() {
            offsets.push(at);
            first.entry(name).or_insert(i);
        }
        StageIndex { offsets, first }
    }
}

thread_local! {
    /// Passes over a whole pipeline text made by locating (index builds, top-level
    /// field searches) on this thread: what the linearity tests count.
    static TEXT_SCANS: Cell<usize> = const { Cell::new(0) };
}

/// Whole-text scans made by [`Locator`]s on this thread so far (for tests that guard
/// that loading a valid pipeline scans nothing and reporting errors scans once).
pub fn text_scans() -> usize {
    TEXT_SCANS.with(Cell::get)
}

fn count_scan() {
    TEXT_SCANS.with(|c| c.set(c.get() + 1));
}

impl<'a> Locator<'a> {
    /// Stage keys are found by lexing the `stages` map of the file (so a name written
    /// with escapes, `"a\\nb"` or `"\\u{1b}"`, is found too); when the file cannot be
    /// lexed that far, by searching for each of `names` in turn. Nothing is read until
    /// the first span is asked for.
    pub fn new(src: &'a str, names: impl IntoIterator<Item = String> + 'a) -> Self {
        Locator { src, names: RefCell::new(Some(Box::new(names.into_iter()))), index: OnceCell::new(), aliases: None }
    }

    fn index(&self) -> &StageIndex {
        self.index.get_or_init(|| {
            count_scan();
            let names = self.names.borrow_mut().take();
            let lexed = stage_keys(self.src);
            if !lexed.is_empty() {
                return StageIndex::new(lexed);
            }
            let mut stages = Vec::new();
            let mut from = 0;
            for name in names.into_iter().flatten() {
                if let Some(at) = find_key(self.src, &name, from, self.src.len()) {
                    stages.push((name, at));
                    from = at + 1;
                }
            }
            StageIndex::new(stages)
        })
    }

    /// The top-level field `name` of the file (`backend`, `stages`), or the file start.
    pub fn top_level(&self, name: &str) -> SourceSpan {
        count_scan();
        match top_level_field(self.src, name) {
            Some(at) => (at, name.len()).into(),
            None => (0, 0).into(),
        }
    }

    pub fn with_aliases(mut self, aliases: &'a HashMap<String, String>) -> Self {
        self.aliases = Some(aliases);
        self
    }

    fn region(&self, stage: &str) -> Option<(usize, usize)> {
        let stage = self.aliases.and_then(|a| a.get(stage)).map(String::as_str).unwrap_or(stage);
        let index = self.index();
        let i = *index.first.get(stage)?;
        let start = index.offsets[i];
        let end = index.offsets.get(i + 1).copied().unwrap_or(self.src.len());
        Some((start, end))
    }

    /// The stage's name (its quoted key as written).
    pub fn stage(&self, stage: &str) -> SourceSpan {
        match self.region(stage) {
            Some((start, _)) => (start, token_len(self.src, start)).into(),
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
    // An empty name would match everywhere (and step past the end below).
    if name.is_empty() {
        return None;
    }
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

/// A token of RON text, as far as locating keys needs: strings (any form), identifiers,
/// brackets, `:` and `,`; comments and whitespace are skipped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Str,
    Ident,
    Open,
    Close,
    Colon,
    Comma,
    Other,
}

/// Lexes RON text into (token, start, end, depth): `depth` is the bracket nesting at the
/// token (an opening bracket counts outside, a closing one too). Stops quietly at text
/// it cannot lex (an unterminated string): callers then fall back to searching.
struct Lexer<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl Iterator for Lexer<'_> {
    type Item = (Tok, usize, usize, usize);
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.b;
        loop {
            while self.i < b.len() && b[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
            if b[self.i..].starts_with(b"//") {
                self.i += b[self.i..].iter().position(|&c| c == b'\n').unwrap_or(b.len() - self.i);
                continue;
            }
            if b[self.i..].starts_with(b"/*") {
                // Block comments nest in RON.
                let mut level = 0usize;
                while self.i < b.len() {
                    if b[self.i..].starts_with(b"/*") {
                        level += 1;
                        self.i += 2;
                    } else if b[self.i..].starts_with(b"*/") {
                        level -= 1;
                        self.i += 2;
                        if level == 0 {
                            break;
                        }
                    } else {
                        self.i += 1;
                    }
                }
                if level > 0 {
                    return None;
                }
                continue;
            }
            break;
        }
        let start = self.i;
        let c = *b.get(start)?;
        let tok = match c {
            b'"' => {
                self.i = quoted_end(b, start + 1, b'"')?;
                Tok::Str
            }
            b'\'' => {
                self.i = quoted_end(b, start + 1, b'\'')?;
                Tok::Other
            }
            b'(' | b'[' | b'{' => {
                self.i += 1;
                self.depth += 1;
                return Some((Tok::Open, start, self.i, self.depth - 1));
            }
            b')' | b']' | b'}' => {
                self.i += 1;
                self.depth = self.depth.saturating_sub(1);
                Tok::Close
            }
            b':' => {
                self.i += 1;
                Tok::Colon
            }
            b',' => {
                self.i += 1;
                Tok::Comma
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let word = &b[start..j];
                if (word == b"r" || word == b"br") && matches!(b.get(j), Some(b'#' | b'"')) {
                    // Raw string: r#"..."#, closed by a quote and as many hashes.
                    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
                    let open = j + hashes;
                    if b.get(open) != Some(&b'"') {
                        return None;
                    }
                    let mut close = Vec::with_capacity(hashes + 1);
                    close.push(b'"');
                    close.extend(std::iter::repeat_n(b'#', hashes));
                    let at = b[open + 1..].windows(close.len()).position(|w| w == close.as_slice())?;
                    self.i = open + 1 + at + close.len();
                    Tok::Str
                } else if word == b"b" && b.get(j) == Some(&b'"') {
                    self.i = quoted_end(b, j + 1, b'"')?;
                    Tok::Str
                } else {
                    self.i = j;
                    Tok::Ident
                }
            }
            _ => {
                // Numbers, signs, dots: one UTF-8 character at a time.
                self.i += 1;
                while self.i < b.len() && (b[self.i] & 0xC0) == 0x80 {
                    self.i += 1;
                }
                Tok::Other
            }
        };
        Some((tok, start, self.i, self.depth))
    }
}

/// End (exclusive) of a quoted literal whose body starts at `i`.
fn quoted_end(b: &[u8], mut i: usize, quote: u8) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn lex(src: &str) -> Lexer<'_> {
    Lexer { b: src.as_bytes(), i: 0, depth: 0 }
}

/// Length of the token at `at` (a quoted key: its quotes included).
pub(crate) fn token_len(src: &str, at: usize) -> usize {
    let mut l = Lexer { b: src.as_bytes(), i: at, depth: 0 };
    l.next().map(|(_, s, e, _)| e - s).unwrap_or(0)
}

/// Offset of the field `name: ...` of the file's outer struct.
fn top_level_field(src: &str, name: &str) -> Option<usize> {
    let mut prev: Option<(Tok, usize, usize, usize)> = None;
    for t in lex(src) {
        if let (Some((Tok::Ident | Tok::Str, s, e, 1)), (Tok::Colon, ..)) = (prev, t) {
            let key = &src[s..e];
            if key == name || key.strip_prefix('"').and_then(|k| k.strip_suffix('"')) == Some(name) {
                return Some(s);
            }
        }
        prev = Some(t);
    }
    None
}

/// Every key of the file's `stages` map, decoded, with the offset of its quoted text,
/// in file order (duplicates kept). Empty when the file cannot be lexed that far.
fn stage_keys(src: &str) -> Vec<(String, usize)> {
    let Some(at) = top_level_field(src, "stages") else { return Vec::new() };
    let mut toks = Lexer { b: src.as_bytes(), i: at, depth: 1 };
    // `stages`, `:`, then the map's `{`.
    if !matches!((toks.next(), toks.next(), toks.next()), (Some((Tok::Ident | Tok::Str, ..)), Some((Tok::Colon, ..)), Some((Tok::Open, ..)))) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut expect_key = true;
    for (tok, s, e, depth) in toks {
        if depth < 2 {
            break;
        }
        if depth > 2 {
            continue;
        }
        match tok {
            Tok::Str if expect_key => {
                if let Ok(name) = ron::from_str::<String>(&src[s..e]) {
                    out.push((name, s));
                }
                expect_key = false;
            }
            Tok::Comma => expect_key = true,
            Tok::Open => expect_key = false,
            _ => {}
        }
    }
    out
}

impl fmt::Display for Locator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index.get() {
            Some(index) => write!(f, "{} stages located", index.offsets.len()),
            None => f.write_str("nothing located yet"),
        }
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

    #[test]
    fn the_index_is_built_once_on_first_use_and_maps_names_to_their_first_declaration() {
        let src = r#"( stages: { "a": (kind: "x"), "b": (kind: "y", params: { "seed": 2 }), "a": (kind: "z"), "r": (kind: "w", params: { "k": 1 }) } )"#;
        let aliases = HashMap::from([("r@1".to_string(), "r".to_string())]);
        let before = text_scans();
        let loc = Locator::new(src, ["a", "b", "a", "r"].map(String::from)).with_aliases(&aliases);
        assert_eq!(text_scans(), before, "nothing is scanned until a span is asked for");
        let a = loc.stage("a");
        assert_eq!(a.offset(), src.find("\"a\"").unwrap(), "a repeated name is located at its first declaration");
        assert_eq!(a.len(), 3);
        let k = loc.field("r@1", "params", Some("k"));
        assert_eq!(&src[k.offset()..k.offset() + k.len()], "\"k\"");
        // The region of `b` ends where the next declaration starts: its `seed` is found,
        // the `kind` of the second `a` is not taken for b's.
        let seed = loc.field("b", "params", Some("seed"));
        assert_eq!(&src[seed.offset()..seed.offset() + seed.len()], "\"seed\"");
        assert_eq!(loc.field("nope", "params", None).offset(), 0);
        assert_eq!(text_scans(), before + 1, "one pass over the text, whatever the number of lookups");
        assert_eq!(loc.to_string(), "4 stages located");
    }

    #[test]
    fn an_unlexable_file_falls_back_to_searching_each_name() {
        // An unterminated raw string before `stages`: the lexer stops there.
        let src = "( backend: r#\"x, stages: { \"a\": (kind: \"x\"), \"b\": (kind: \"y\") } )";
        let loc = Locator::new(src, ["a", "b"].map(String::from));
        assert_eq!(loc.stage("b").offset(), src.find("\"b\"").unwrap());
    }
}
