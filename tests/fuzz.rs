//! Fuzzing the pipeline loader (RON text -> checked pipeline) in process: the shipped
//! pipelines (`pipelines/*.ron`) mutated by a seeded mutator (byte flips, deletions,
//! duplicated lines, inserted brackets, quotes, colons, huge and negative numbers,
//! very long strings, unicode and control characters, deep nesting, swapped names),
//! then loaded with `Pipeline::from_source` and `fgflow_stages::registry()`.
//!
//! Properties: no panic (each load is `catch_unwind`-ed and the input reported), no
//! stack overflow (each load runs on a thread with an 8 MiB stack, about what a main
//! thread gets), every error points into the file (a span inside the source, not the
//! "not found" fallback at 1:1 of length 0), and rendering the errors does not panic.
//! Every 13th case also goes through the binary (`fgflow status FILE` in an empty
//! directory): exit 0 or 2 only, never a crash, and no `.fgflow/` left behind on exit 2.
//!
//! `cargo test` runs a fixed number of cases with a fixed seed. A longer run, for
//! developers (the README mentions it):
//!
//! ```text
//! FGFLOW_FUZZ_CASES=20000 FGFLOW_FUZZ_SEED=7 cargo test --release --test tests fuzz -- --nocapture
//! ```
//!
//! A failure names the seed and case number; `FGFLOW_FUZZ_SEED=S FGFLOW_FUZZ_ONLY=I`
//! re-runs that one case. The input being loaded is also written to
//! `$TMPDIR/fgflow-fuzz-current.ron` before each load, so a crash that takes the whole
//! test binary down (an abort, a stack overflow) still leaves it behind.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fgflow_engine::{LoadError, Pipeline, SpecErrors};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cli::Dir;

const DEFAULT_CASES: usize = 400;
const DEFAULT_SEED: u64 = 0x5eed_f10e;
/// Every this-many-th case also runs through the binary (about 30 in the default run).
const BINARY_EVERY: usize = 13;
const STACK: usize = 8 << 20;

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped pipelines: the corpus every case starts from.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(root().join("pipelines"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "ron"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the shipped pipelines under pipelines/");
    v
}

/// Tokens spliced into the text: structure, numbers at and past the limits of i64 and
/// f64, names of real kinds, ports and fields (so some mutants get past the parser and
/// reach the checker), unicode and control characters.
const TOKENS: &[&str] = &[
    "[", "]", "(", ")", "{", "}", "\"", ":", ",", "//", "/*", "*/", "'", "r#\"", "\\", "\\u{0}", "\\u{202e}",
    "1e308", "1e309", "-1e308", "-1", "0", "-0", "100000000000000000000", "-9223372036854775808", "9223372036854775807",
    "18446744073709551616", "0.5", "NaN", "inf", "-inf", "0x10", "0b1", "1_000", ".5", "5.", "+3", "1e-400",
    "true", "false", "()", "Some(1)", "None", "[]", "{}", "\"\"", "b\"x\"", "'c'",
    "\"kind\": \"command\",", "kind: \"train\",", "\"cmd\": \"true\"", "\"outputs\": { \"o\": \"o.txt\" }",
    "extends: \"nowhere\",", "template: true,", "foreach: [],", "foreach: [\"a\", \"a\"],", "first: {},",
    "resources: Heavy,", "resources: Tpu,", "backend: \"tpu\",", "\"deps\": [\".\"],", "\"deps\": [\"../x\"],",
    "\"bench.train\"", "\"bench.nope\"", "\".\"", "\"a.b.c\"", "\"{item}\"", "\"{prev_item}\"", "\"{index}\"",
    "\"seed\": 1,", "\"seed\": 1, \"seed\": 2,", "\"classes\": 100000,", "\"epochs\": -1,",
    "é", "日本", "🦀", "\u{200b}", "\u{202e}", "\u{feff}", "\u{fffd}", "\0", "\u{1b}[31m", "\r", "\t", "\n", "\u{7f}",
];

/// Names that replace a quoted string: other stages, kinds, outputs, the empty name,
/// names with dots, newlines and escape codes.
const NAMES: &[&str] = &[
    "", ".", "a.b", "bench", "train_cnn", "command", "train", "trian", "quickdraw", "x\ny", "\u{1b}[2J", "../../etc",
    "/abs", "bench.train", "bench.val", "train_cnn.model", "nowhere.out", "{item}", "🦀", " ", "a\"b",
];

struct Mutator {
    rng: ChaCha8Rng,
}

impl Mutator {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.rng.random_range(0..n) }
    }

    fn pick<'a>(&mut self, from: &'a [&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    /// A position at a char boundary when the text is valid UTF-8 (most mutations keep
    /// it so, so that the checker, not only the decoder, is exercised).
    fn pos(&mut self, b: &[u8]) -> usize {
        let mut p = self.below(b.len() + 1);
        if let Ok(s) = std::str::from_utf8(b) {
            while p < b.len() && !s.is_char_boundary(p) {
                p += 1;
            }
        }
        p
    }

    fn lines(b: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, c) in b.iter().enumerate() {
            if *c == b'\n' {
                out.push((start, i + 1));
                start = i + 1;
            }
        }
        if start < b.len() {
            out.push((start, b.len()));
        }
        out
    }

    /// Spans of the quoted strings (without escapes inside, for simplicity).
    fn strings(b: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut open = None;
        for (i, c) in b.iter().enumerate() {
            match (*c, open) {
                (b'"', None) => open = Some(i),
                (b'"', Some(s)) => {
                    out.push((s, i + 1));
                    open = None;
                }
                (b'\n', Some(_)) => open = None,
                _ => {}
            }
        }
        out
    }

    fn mutate_once(&mut self, b: &mut Vec<u8>) -> String {
        match self.below(14) {
            0 => {
                let p = self.below(b.len());
                let bit = self.below(8);
                if p < b.len() {
                    b[p] ^= 1u8 << bit;
                }
                format!("flip bit {bit} of byte {p}")
            }
            1 => {
                let p = self.pos(b);
                let n = 1 + self.below(40);
                let end = (p + n).min(b.len());
                let mut end = end;
                if let Ok(s) = std::str::from_utf8(b) {
                    while end < b.len() && !s.is_char_boundary(end) {
                        end += 1;
                    }
                }
                b.drain(p..end);
                format!("delete {p}..{end}")
            }
            2 | 3 | 4 => {
                let p = self.pos(b);
                let t = self.pick(TOKENS);
                b.splice(p..p, t.bytes());
                format!("insert {t:?} at {p}")
            }
            5 => {
                // A duplicated line: duplicate keys in params, inputs, stages.
                let lines = Self::lines(b);
                if lines.is_empty() {
                    return "nothing".into();
                }
                let (s, e) = lines[self.below(lines.len())];
                let copy = b[s..e].to_vec();
                b.splice(e..e, copy);
                format!("duplicate line at {s}")
            }
            6 => {
                let lines = Self::lines(b);
                if lines.is_empty() {
                    return "nothing".into();
                }
                let (s, e) = lines[self.below(lines.len())];
                b.drain(s..e);
                format!("delete line at {s}")
            }
            7 => {
                // Replace a number with another one.
                let nums = [
                    "1e308", "-1", "0", "100000000000000000000", "-9223372036854775808", "1e999", "0.0000001", "3", "65536", "-0.5",
                    "4294967296",
                ];
                let digits: Vec<usize> = b.iter().enumerate().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
                if digits.is_empty() {
                    return "nothing".into();
                }
                let mut s = digits[self.below(digits.len())];
                while s > 0 && (b[s - 1].is_ascii_digit() || b[s - 1] == b'.') {
                    s -= 1;
                }
                let mut e = s;
                while e < b.len() && (b[e].is_ascii_digit() || b[e] == b'.' || b[e] == b'e') {
                    e += 1;
                }
                let n = nums[self.below(nums.len())];
                b.splice(s..e, n.bytes());
                format!("number at {s} -> {n}")
            }
            8 => {
                // Replace a quoted string with another name.
                let strs = Self::strings(b);
                if strs.is_empty() {
                    return "nothing".into();
                }
                let (s, e) = strs[self.below(strs.len())];
                let name = self.pick(NAMES);
                let quoted = format!("{name:?}");
                b.splice(s..e, quoted.bytes());
                format!("string at {s} -> {quoted}")
            }
            9 => {
                // A very long string value (wrong type for most params).
                let strs = Self::strings(b);
                if strs.is_empty() {
                    return "nothing".into();
                }
                let (s, e) = strs[self.below(strs.len())];
                let n = [1_000, 100_000, 1_000_000][self.below(3)];
                let long = format!("\"{}\"", "x".repeat(n));
                b.splice(s..e, long.bytes());
                format!("string at {s} -> {n} x's")
            }
            10 => {
                // Deep nesting, closed or not.
                let p = self.pos(b);
                let depth = [64, 200, 1_000, 10_000, 100_000][self.below(5)];
                let (open, close) = [("[", "]"), ("(", ")"), ("{", "}"), ("Some(", ")")][self.below(4)];
                let mut t = open.repeat(depth);
                if self.below(2) == 0 {
                    t.push_str(&close.repeat(depth));
                }
                b.splice(p..p, t.bytes());
                format!("nest {open} x {depth} at {p}")
            }
            11 => {
                // A stretch of random bytes (often invalid UTF-8).
                let p = self.pos(b);
                let n = 1 + self.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| self.below(256) as u8).collect();
                b.splice(p..p, bytes.iter().copied());
                format!("insert {bytes:?} at {p}")
            }
            12 => {
                // Swap two lines: moves keys between sections and stages.
                let lines = Self::lines(b);
                if lines.len() < 2 {
                    return "nothing".into();
                }
                let (i, j) = (self.below(lines.len()), self.below(lines.len()));
                let (a, c) = (lines[i.min(j)], lines[i.max(j)]);
                if a == c {
                    return "nothing".into();
                }
                let mut out = b[..a.0].to_vec();
                out.extend_from_slice(&b[c.0..c.1]);
                out.extend_from_slice(&b[a.1..c.0]);
                out.extend_from_slice(&b[a.0..a.1]);
                out.extend_from_slice(&b[c.1..]);
                *b = out;
                format!("swap lines at {} and {}", a.0, c.0)
            }
            _ => {
                // Truncate.
                let p = self.pos(b);
                b.truncate(p);
                format!("truncate at {p}")
            }
        }
    }
}

/// One case: the mutated bytes and what was done to them.
fn make_case(seed: u64, i: usize, corpus: &[(String, Vec<u8>)]) -> (String, Vec<u8>, Vec<String>) {
    let mut m = Mutator { rng: ChaCha8Rng::seed_from_u64(seed) };
    m.rng.set_stream(i as u64);
    let (name, base) = &corpus[m.below(corpus.len())];
    let mut b = base.clone();
    let n = 1 + m.below(4);
    let ops = (0..n).map(|_| m.mutate_once(&mut b)).collect();
    (name.clone(), b, ops)
}

/// Whether an error has a usable location: a span inside the source that is not the
/// locator's "not found" fallback (offset 0, length 0) of a non-empty file.
fn located(src: &str, errs: &SpecErrors) -> Result<(), String> {
    for e in &errs.errors {
        let (off, len) = (e.span.offset(), e.span.len());
        if off > src.len() {
            return Err(format!("span {off}+{len} is past the end of the source ({} bytes): {}", src.len(), e.message));
        }
        if !src.is_char_boundary(off) {
            return Err(format!("span {off}+{len} starts inside a character: {}", e.message));
        }
        if off == 0 && len == 0 && !src.is_empty() {
            return Err(format!("no location (span 0+0, the locator's fallback): {}", e.message));
        }
    }
    Ok(())
}

/// What happened to one input, in process.
enum Verdict {
    Ok,
    Rejected,
    Bad(String),
}

fn load_in_process(file: &Path, bytes: &[u8]) -> Verdict {
    let registry = fgflow_stages::registry();
    let result = catch_unwind(AssertUnwindSafe(|| match std::str::from_utf8(bytes) {
        Ok(src) => match Pipeline::from_source(file, src.to_string(), &registry) {
            Ok(_) => Verdict::Ok,
            Err(errs) => {
                if errs.errors.is_empty() {
                    return Verdict::Bad("rejected with an empty list of errors".into());
                }
                if let Err(why) = located(src, &errs) {
                    return Verdict::Bad(why);
                }
                // Rendering must not panic either (miette walks the spans).
                let rendered = errs.render_plain();
                let lines = errs.lines();
                if rendered.is_empty() || lines.len() != errs.errors.len() {
                    return Verdict::Bad("empty rendering".into());
                }
                Verdict::Rejected
            }
        },
        // Not UTF-8: only the path entry point sees it, as an I/O error (no span: the
        // text was never decoded). It must be that error, not a panic.
        Err(_) => match Pipeline::load(file, &registry) {
            Err(LoadError::Io { .. }) => Verdict::Rejected,
            Err(LoadError::Spec(e)) => Verdict::Bad(format!("non-UTF-8 file gave spec errors: {:?}", e.lines())),
            Ok(_) => Verdict::Bad("non-UTF-8 file loaded".into()),
        },
    }));
    result.unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Verdict::Bad(format!("panicked: {msg}"))
    })
}

fn snippet(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    if s.len() > 600 { format!("{}… ({} bytes)", &s[..s.floor_char_boundary(600)], bytes.len()) } else { s.into_owned() }
}

/// Through the binary, in an empty directory that has the repository's `data/` beside
/// `pipelines/` so that valid mutants find their sources.
fn through_binary(bytes: &[u8]) -> Result<(), String> {
    let d = Dir::new();
    std::os::unix::fs::symlink(root().join("data"), d.path().join("data")).unwrap();
    let file = d.path().join("pipelines/fuzzed.ron");
    std::fs::write(&file, bytes).unwrap();
    let o = d.run(&["status", "pipelines/fuzzed.ron"]);
    let code = o.status.code();
    let stderr = String::from_utf8_lossy(&o.stderr);
    match code {
        Some(0) => Ok(()),
        Some(2) => {
            if d.path().join(".fgflow").exists() {
                Err(format!("exit 2 left a .fgflow/ behind; stderr: {}", snippet(stderr.as_bytes())))
            } else {
                Ok(())
            }
        }
        other => {
            // A panic's message is near the end, after whatever was printed before it.
            let panic: Vec<&str> = stderr.lines().skip_while(|l| !l.contains("panicked at")).take(2).collect();
            Err(format!(
                "exit {other:?} (signal: {:?}); {}stderr: {}",
                std::os::unix::process::ExitStatusExt::signal(&o.status),
                if panic.is_empty() { String::new() } else { format!("{}; ", panic.join(" ")) },
                snippet(stderr.as_bytes())
            ))
        }
    }
}

#[test]
fn fuzz_the_pipeline_loader() {
    let seed = env_num("FGFLOW_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_num("FGFLOW_FUZZ_CASES").map(|n| n as usize).unwrap_or(DEFAULT_CASES);
    let only = env_num("FGFLOW_FUZZ_ONLY").map(|n| n as usize);
    let corpus = corpus();
    let current = std::env::temp_dir().join("fgflow-fuzz-current.ron");
    // Straight to stderr, past the test harness's capture: a crash of the whole binary
    // must still say where its input is.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz: seed {seed} ({cases} cases); the case being loaded is kept in {}",
        current.display()
    );
    let started = std::time::Instant::now();
    let (mut ok, mut rejected, mut through_bin) = (0, 0, 0);
    let mut failures = Vec::new();
    let work = tempfile::tempdir().unwrap();
    for i in 0..cases {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let (base, bytes, ops) = make_case(seed, i, &corpus);
        let _ = std::fs::write(&current, &bytes);
        let file = work.path().join(format!("case-{i}.ron"));
        std::fs::write(&file, &bytes).unwrap();
        let verdict = {
            let (file, bytes) = (file.clone(), bytes.clone());
            std::thread::Builder::new().stack_size(STACK).spawn(move || load_in_process(&file, &bytes)).unwrap().join()
        };
        let verdict = verdict.unwrap_or_else(|_| Verdict::Bad("the loading thread died".into()));
        let mut problem = match verdict {
            Verdict::Ok => {
                ok += 1;
                None
            }
            Verdict::Rejected => {
                rejected += 1;
                None
            }
            Verdict::Bad(why) => Some(format!("in process: {why}")),
        };
        if (i % BINARY_EVERY == 0 || only.is_some()) && problem.is_none() {
            through_bin += 1;
            problem = through_binary(&bytes).err().map(|why| format!("through the binary: {why}"));
        }
        if let Some(why) = problem {
            // Keep the failing input for the report.
            let keep = std::env::temp_dir().join(format!("fgflow-fuzz-seed{seed}-case{i}.ron"));
            let _ = std::fs::write(&keep, &bytes);
            failures.push(format!(
                "case {i} (FGFLOW_FUZZ_SEED={seed} FGFLOW_FUZZ_ONLY={i}), from {base} after {ops:?}: {why}\n  input kept in {}\n  input: {}",
                keep.display(),
                snippet(&bytes)
            ));
        }
        let _ = std::fs::remove_file(&file);
    }
    let _ = std::fs::remove_file(&current);
    println!(
        "fuzz: seed {seed}: {cases} cases in {:.1}s: {ok} loaded, {rejected} rejected with located errors, {through_bin} also through the binary, {} failures",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} of {cases} fuzz cases failed:\n{}", failures.len(), failures.join("\n\n"));
}

/// Inputs the fuzzer found (kept in `tests/fixtures/fuzz/`, and long ones generated
/// here), each with the verbs that crashed on it: loaded in process with the same
/// properties, then every verb through the binary must exit 0, 1 or 2 (never a panic or
/// a signal), and a first verb that exits 2 must leave no `.fgflow/` behind.
fn found_inputs() -> Vec<(String, Vec<u8>, Vec<Vec<&'static str>>)> {
    let mut v = Vec::new();
    let dir = root().join("tests/fixtures/fuzz");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "ron")).collect();
    files.sort();
    for f in files {
        v.push((f.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&f).unwrap(), vec![vec!["status", "pipelines/fuzzed.ron"]]));
    }
    // Seed 7, case 1196: a stage name of a million characters. Names wider than 65535
    // columns made the padded tables of `status`, `run` (even with --json: the console
    // observer) and `ls` panic ("Formatting argument out of range").
    let long_name = format!("( stages: {{ \"{}\": (kind: \"command\", params: {{ \"cmd\": \"true\" }}) }} )\n", "x".repeat(70_000));
    v.push((
        "stage-name-70000-chars".into(),
        long_name.into_bytes(),
        vec![vec!["status", "pipelines/fuzzed.ron"], vec!["run", "pipelines/fuzzed.ron", "--json"], vec!["run", "pipelines/fuzzed.ron"], vec!["ls"]],
    ));
    // Seed 1592652046, case 26: an error past column 65535 made miette's renderer panic.
    let long_line = format!("( stages: {{ \"a\": (kind: \"command\", params: {{ \"cmd\": \"{}\", \"outputs\": 3 }}) }} )\n", "x".repeat(70_000));
    v.push(("error-at-column-70000".into(), long_line.into_bytes(), vec![vec!["status", "pipelines/fuzzed.ron"]]));
    v
}

#[test]
fn fuzz_found_inputs_stay_fixed() {
    let mut failures = Vec::new();
    for (name, bytes, verbs) in found_inputs() {
        let file = PathBuf::from(format!("pipelines/{name}"));
        let b = bytes.clone();
        match std::thread::Builder::new().stack_size(STACK).spawn(move || load_in_process(&file, &b)).unwrap().join() {
            Ok(Verdict::Bad(why)) => failures.push(format!("{name}: in process: {why}")),
            Err(_) => failures.push(format!("{name}: in process: the loading thread died")),
            Ok(_) => {}
        }
        let d = Dir::new();
        std::fs::write(d.path().join("pipelines/fuzzed.ron"), &bytes).unwrap();
        for (i, verb) in verbs.iter().enumerate() {
            let o = d.run(verb);
            let stderr = String::from_utf8_lossy(&o.stderr);
            match o.status.code() {
                Some(2) if i == 0 && d.path().join(".fgflow").exists() => failures.push(format!("{name}: `fgflow {}` exits 2 but left a .fgflow/ behind", verb.join(" "))),
                Some(0..=2) => {}
                code => {
                    let panic: Vec<&str> = stderr.lines().skip_while(|l| !l.contains("panicked at")).take(2).collect();
                    failures.push(format!("{name}: `fgflow {}` exits {code:?} (signal {:?}): {}", verb.join(" "), std::os::unix::process::ExitStatusExt::signal(&o.status), panic.join(" ")));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Deep nesting on its own, at depths a mutation rarely reaches: each must be rejected
/// with a location, on a thread of ordinary stack size, without overflowing it.
#[test]
fn fuzz_deep_nesting_is_rejected_without_overflow() {
    let base = String::from_utf8(corpus().into_iter().find(|(n, _)| n == "quick.ron").map(|(_, b)| b).unwrap()).unwrap();
    let at = base.find("\"epochs\": ").expect("quick.ron sets epochs") + "\"epochs\": ".len();
    let mut failures = Vec::new();
    for depth in [1_000, 10_000, 200_000] {
        for (open, close) in [("[", "]"), ("(", ")"), ("{", "}"), ("Some(", ")")] {
            for closed in [true, false] {
                let mut src = base.clone();
                let nest = format!("{}1{}", open.repeat(depth), if closed { close.repeat(depth) } else { String::new() });
                src.insert_str(at, &nest);
                // The original value stays after the nesting: invalid either way, and
                // it must be rejected with a location.
                let file = PathBuf::from(format!("deep-{depth}.ron"));
                let bytes = src.into_bytes();
                let v = std::thread::Builder::new().stack_size(STACK).spawn(move || load_in_process(&file, &bytes)).unwrap().join();
                match v {
                    Ok(Verdict::Rejected) => {}
                    Ok(Verdict::Ok) => failures.push(format!("{open} x {depth} (closed: {closed}): loaded")),
                    Ok(Verdict::Bad(why)) => failures.push(format!("{open} x {depth} (closed: {closed}): {why}")),
                    Err(_) => failures.push(format!("{open} x {depth} (closed: {closed}): thread died")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
