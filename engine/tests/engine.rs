//! Engine behaviour with small stage kinds of the tests' own: what ran is asserted
//! from the executor's event log (salsa's pattern).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fgflow_cache::{StatCache, Store};
use fgflow_engine::*;

const TEXT: ArtifactType = ArtifactType("text");
const NUMBER: ArtifactType = ArtifactType("number");

/// Writes `value` to out/value.txt.
struct Emit;
impl StageKind for Emit {
    fn name(&self) -> &'static str { "emit" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "emit a value" }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("value", ParamType::Str, "the text"), ParamSpec::optional("ms", ParamType::Int, 0, "sleep")]
    }
    fn inputs(&self) -> Vec<PortSpec> { vec![] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", TEXT, "")] }
    fn resources(&self, p: &Params) -> Resources {
        if p.int("ms").unwrap_or(0) > 0 { Resources::Heavy } else { Resources::Light }
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let ms = ctx.params.int("ms")? as u64;
        if ms > 0 {
            track(|| std::thread::sleep(Duration::from_millis(ms)))?;
        }
        std::fs::write(ctx.output_dir("out")?.join("value.txt"), ctx.params.str("value")?).map_err(|e| StageError::io("write", e))
    }
}

/// Concatenates its inputs and a suffix.
struct Concat;
impl StageKind for Concat {
    fn name(&self) -> &'static str { "concat" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "concatenate" }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional("suffix", ParamType::Str, "", ""), ParamSpec::optional("fail", ParamType::Bool, false, "")]
    }
    fn inputs(&self) -> Vec<PortSpec> { vec![PortSpec::many("parts", TEXT, "")] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", TEXT, "")] }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let mut s = String::new();
        for d in ctx.inputs("parts") {
            s.push_str(&std::fs::read_to_string(d.join("value.txt")).map_err(|e| StageError::io("read", e))?);
        }
        s.push_str(ctx.params.str("suffix")?);
        // Write a partial output first: a failure must not let it reach the cache.
        std::fs::write(ctx.output_dir("out")?.join("value.txt"), &s).map_err(|e| StageError::io("write", e))?;
        ctx.log("concatenated");
        if ctx.params.bool("fail")? {
            return Err(StageError::failed("asked to fail"));
        }
        Ok(())
    }
}

/// Length of the input modulo 2: many inputs give the same output (early cutoff).
struct Parity;
impl StageKind for Parity {
    fn name(&self) -> &'static str { "parity" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "parity of the length" }
    fn params(&self) -> Vec<ParamSpec> { vec![] }
    fn inputs(&self) -> Vec<PortSpec> { vec![PortSpec::one("text", TEXT, "")] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", NUMBER, "")] }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = std::fs::read_to_string(ctx.input("text")?.join("value.txt")).map_err(|e| StageError::io("read", e))?;
        std::fs::write(ctx.output_dir("out")?.join("n.txt"), format!("{}", s.len() % 2)).map_err(|e| StageError::io("write", e))
    }
}

/// Reads a number, writes it as text (consumes NUMBER).
struct Show;
impl StageKind for Show {
    fn name(&self) -> &'static str { "show" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "number to text" }
    fn params(&self) -> Vec<ParamSpec> { vec![] }
    fn inputs(&self) -> Vec<PortSpec> { vec![PortSpec::one("n", NUMBER, "")] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", TEXT, "")] }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = std::fs::read_to_string(ctx.input("n")?.join("n.txt")).map_err(|e| StageError::io("read", e))?;
        std::fs::write(ctx.output_dir("out")?.join("value.txt"), format!("n={s}")).map_err(|e| StageError::io("write", e))
    }
}

/// Hashes a source file given as a `Path` parameter.
struct ReadFile;
impl StageKind for ReadFile {
    fn name(&self) -> &'static str { "read_file" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "copy a file in" }
    fn params(&self) -> Vec<ParamSpec> { vec![ParamSpec::required("path", ParamType::Path, "")] }
    fn inputs(&self) -> Vec<PortSpec> { vec![] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", TEXT, "")] }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        std::fs::copy(ctx.source("path")?, ctx.output_dir("out")?.join("value.txt")).map_err(|e| StageError::io("copy", e))?;
        Ok(())
    }
}

/// Tests that measure concurrency through `track` must not overlap each other.
static SERIAL: Mutex<()> = Mutex::new(());
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MAX_RUNNING: AtomicUsize = AtomicUsize::new(0);
fn track<T>(f: impl FnOnce() -> T) -> Result<T, StageError> {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MAX_RUNNING.fetch_max(now, Ordering::SeqCst);
    let r = f();
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    Ok(r)
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Emit).register(Concat).register(Parity).register(Show).register(ReadFile);
    r
}

#[derive(Default)]
struct Log(Mutex<Vec<Event>>);
impl ProgressSink for Log {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
}
impl Observer for Log {
    fn event(&self, e: &Event) {
        self.0.lock().unwrap().push(e.clone());
    }
}
impl Log {
    fn ran(&self) -> Vec<String> {
        let mut v: Vec<String> = self.0.lock().unwrap().iter().filter_map(|e| if let Event::Ran { stage, .. } = e { Some(stage.clone()) } else { None }).collect();
        v.sort();
        v
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    registry: Registry,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(".fgflow")).unwrap();
        Fixture { dir, store, registry: registry() }
    }
    fn file(&self) -> PathBuf {
        self.dir.path().join("p.ron")
    }
    fn write(&self, src: &str) -> PathBuf {
        std::fs::write(self.file(), src).unwrap();
        self.file()
    }
    fn load(&self) -> Pipeline {
        match Pipeline::load(&self.file(), &self.registry) {
            Ok(p) => p,
            Err(LoadError::Spec(e)) => panic!("{}", e.render_plain()),
            Err(e) => panic!("{e}"),
        }
    }
    fn run_with(&self, jobs: usize, fail_fast: bool) -> (Vec<StageResult>, Log) {
        let p = self.load();
        let sources = resolve_sources(&p, &mut StatCache::default()).unwrap();
        let log = Log::default();
        let opts = RunOptions { jobs, fail_fast, backend: "test".into() };
        let r = run(&p, &self.store, &self.registry, &sources, &opts, &log).unwrap();
        (r, log)
    }
    fn ran(&self) -> Vec<String> {
        self.run_with(2, false).1.ran()
    }
    fn plan(&self) -> Vec<Planned> {
        let p = self.load();
        let sources = resolve_sources(&p, &mut StatCache::default()).unwrap();
        plan(&p, &self.store, &sources, "test").unwrap()
    }
    fn output(&self, stage: &str) -> String {
        let p = self.plan();
        let key = p.iter().find(|s| s.name == stage).unwrap().key.unwrap();
        let e = self.store.get_entry(&key).unwrap().unwrap();
        let tree = self.store.read_tree(&e.outputs["out"]).unwrap();
        String::from_utf8(self.store.read_blob(&tree.files[0].digest).unwrap()).unwrap()
    }
}

fn chain(b_value: &str, c_suffix: &str) -> String {
    format!(
        r#"(
    stages: {{
        "a": (kind: "emit", params: {{ "value": "A" }}),
        "b": (kind: "emit", params: {{ "value": "{b_value}" }}),
        "ab": (kind: "concat", inputs: {{ "parts": ["a.out", "b.out"] }}),
        "c": (kind: "concat", inputs: {{ "parts": ["ab.out"] }}, params: {{ "suffix": "{c_suffix}" }}),
    }},
)"#
    )
}

#[test]
fn incremental_runs_rerun_exactly_what_changed() {
    let f = Fixture::new();
    f.write(&chain("B", "!"));
    assert_eq!(f.ran(), ["a", "ab", "b", "c"]);
    assert_eq!(f.output("c"), "AB!");
    assert!(f.ran().is_empty(), "a second run reuses everything");
    f.write(&chain("B", "?"));
    assert_eq!(f.ran(), ["c"], "a parameter edit re-runs only its stage");
    f.write(&chain("X", "?"));
    assert_eq!(f.ran(), ["ab", "b", "c"], "an upstream edit re-runs what depends on it");
    assert_eq!(f.output("c"), "AX?");
}

#[test]
fn reverting_an_edit_reruns_nothing() {
    let f = Fixture::new();
    f.write(&chain("B", "!"));
    f.ran();
    f.write(&chain("Z", "!"));
    assert_eq!(f.ran(), ["ab", "b", "c"]);
    f.write(&chain("B", "!"));
    assert!(f.ran().is_empty(), "every key of the reverted pipeline is still in the cache");
    assert_eq!(f.output("c"), "AB!");
}

#[test]
fn early_cutoff_stops_the_wave_when_outputs_are_identical() {
    let f = Fixture::new();
    let src = |v: &str| {
        format!(
            r#"( stages: {{
            "text": (kind: "emit", params: {{ "value": "{v}" }}),
            "parity": (kind: "parity", inputs: {{ "text": "text.out" }}),
            "show": (kind: "show", inputs: {{ "n": "parity.out" }}),
        }} )"#
        )
    };
    f.write(&src("ab"));
    assert_eq!(f.ran(), ["parity", "show", "text"]);
    f.write(&src("cd"));
    let (results, log) = f.run_with(1, false);
    assert_eq!(log.ran(), ["parity", "text"], "same parity: `show` is reused");
    let parity = results.iter().find(|r| r.name == "parity").unwrap();
    assert!(parity.outputs_unchanged);
    assert_eq!(results.iter().find(|r| r.name == "show").unwrap().status, Outcome::Reused);
}

#[test]
fn plan_reports_fresh_stale_pending_with_field_reasons() {
    let f = Fixture::new();
    f.write(&chain("B", "!"));
    assert!(f.plan().iter().all(|s| s.status == Status::Stale && s.reasons == [Reason::NeverRun] || s.status == Status::Pending));
    f.ran();
    assert!(f.plan().iter().all(|s| s.status == Status::Fresh));
    f.write(&chain("Q", "?"));
    let plan = f.plan();
    let by = |n: &str| plan.iter().find(|s| s.name == n).unwrap();
    assert_eq!(by("a").status, Status::Fresh);
    assert_eq!(by("b").status, Status::Stale);
    assert_eq!(by("b").reasons, [Reason::Param { name: "value".into(), old: Some("B".into()), new: Some("Q".into()) }]);
    assert_eq!(by("ab").status, Status::Pending);
    assert_eq!(by("ab").reasons, [Reason::Upstream { stage: "b".into() }]);
    assert_eq!(by("c").status, Status::Pending);
    assert!(by("c").reasons.contains(&Reason::Param { name: "suffix".into(), old: Some("!".into()), new: Some("?".into()) }));
}

#[test]
fn input_reasons_say_connected_disconnected_or_changed() {
    let d = |b: u8| fgflow_cache::Digest::of_bytes(&[b]);
    let input = |old: Vec<fgflow_cache::Digest>, new: Vec<fgflow_cache::Digest>| Reason::Input { port: "init".into(), from: vec!["mae.model".into()], old, new }.to_string();
    assert_eq!(input(vec![], vec![d(1)]), format!("input `init` from `mae.model` connected ({})", d(1).short()));
    assert_eq!(input(vec![d(1)], vec![]), format!("input `init` disconnected (was {})", d(1).short()));
    assert_eq!(input(vec![d(1)], vec![d(2)]), format!("input `init` from `mae.model` changed ({} -> {})", d(1).short(), d(2).short()));
}

#[test]
fn a_failed_stage_leaves_no_entry_and_does_not_stop_independent_stages() {
    let f = Fixture::new();
    let src = |fail: bool| {
        format!(
            r#"( stages: {{
            "a": (kind: "emit", params: {{ "value": "A" }}),
            "bad": (kind: "concat", inputs: {{ "parts": ["a.out"] }}, params: {{ "fail": {fail} }}),
            "after": (kind: "concat", inputs: {{ "parts": ["bad.out"] }}, params: {{ "suffix": "+" }}),
            "other": (kind: "emit", params: {{ "value": "O" }}),
        }} )"#
        )
    };
    f.write(&src(true));
    let entries_before = f.store.entry_keys().unwrap().len();
    assert_eq!(entries_before, 0);
    let (results, log) = f.run_with(1, false);
    let status = |n: &str| results.iter().find(|r| r.name == n).unwrap().status;
    assert_eq!(status("bad"), Outcome::Failed);
    assert_eq!(status("after"), Outcome::Skipped);
    assert_eq!(status("other"), Outcome::Ran);
    assert_eq!(log.ran(), ["a", "other"]);
    let failed_log = log.0.lock().unwrap().iter().find_map(|e| if let Event::Failed { log, .. } = e { Some(log.clone()) } else { None }).unwrap();
    assert!(failed_log.contains("concatenated"), "the failed stage's log is reported");
    assert_eq!(f.store.entry_keys().unwrap().len(), 2, "only the successful stages have entries");
    let bad = f.plan().into_iter().find(|s| s.name == "bad").unwrap();
    assert_eq!(bad.status, Status::Stale);
    f.write(&src(false));
    let (results, log) = f.run_with(1, false);
    assert_eq!(log.ran(), ["after", "bad"], "{results:?}");
}

#[test]
fn fail_fast_skips_the_rest() {
    let f = Fixture::new();
    f.write(r#"( stages: {
        "a": (kind: "emit", params: { "value": "A" }),
        "bad": (kind: "concat", inputs: { "parts": ["a.out"] }, params: { "fail": true }),
        "z": (kind: "emit", params: { "value": "Z" }),
    } )"#);
    let (results, _) = f.run_with(1, true);
    let status = |n: &str| results.iter().find(|r| r.name == n).unwrap().status;
    assert_eq!(status("bad"), Outcome::Failed);
    assert_eq!(status("z"), Outcome::Skipped);
}

#[test]
fn independent_stages_run_in_parallel_but_heavy_ones_never_overlap() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Heavy: `ms > 0` makes `emit` declare Resources::Heavy.
    let f = Fixture::new();
    f.write(r#"( stages: {
        "h1": (kind: "emit", params: { "value": "1", "ms": 150 }),
        "h2": (kind: "emit", params: { "value": "2", "ms": 150 }),
        "h3": (kind: "emit", params: { "value": "3", "ms": 150 }),
    } )"#);
    MAX_RUNNING.store(0, Ordering::SeqCst);
    f.run_with(3, false);
    assert_eq!(MAX_RUNNING.load(Ordering::SeqCst), 1, "heavy stages are serialised");
    let f = Fixture::new();
    f.write(r#"( stages: {
        "l1": (kind: "emit", params: { "value": "1", "ms": 150 }, resources: Light),
        "l2": (kind: "emit", params: { "value": "2", "ms": 150 }, resources: Light),
    } )"#);
    MAX_RUNNING.store(0, Ordering::SeqCst);
    f.run_with(2, false);
    assert_eq!(MAX_RUNNING.load(Ordering::SeqCst), 2, "light stages overlap under --jobs 2");
}

#[test]
fn two_runs_on_one_cache_run_each_key_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::new();
    f.write(r#"( stages: {
        "s1": (kind: "emit", params: { "value": "1", "ms": 100 }, resources: Light),
        "s2": (kind: "emit", params: { "value": "2", "ms": 100 }, resources: Light),
        "c": (kind: "concat", inputs: { "parts": ["s1.out", "s2.out"] }),
    } )"#);
    let (a, b) = std::thread::scope(|s| {
        let x = s.spawn(|| f.run_with(2, false).1.ran());
        let y = s.spawn(|| f.run_with(2, false).1.ran());
        (x.join().unwrap(), y.join().unwrap())
    });
    let mut all: Vec<String> = a.into_iter().chain(b).collect();
    all.sort();
    assert_eq!(all, ["c", "s1", "s2"], "each stage ran once across both runs");
}

#[test]
fn sources_are_keyed_by_content_not_path_or_mtime() {
    let f = Fixture::new();
    std::fs::write(f.dir.path().join("in.txt"), "hello").unwrap();
    f.write(r#"( stages: { "r": (kind: "read_file", params: { "path": "in.txt" }) } )"#);
    assert_eq!(f.ran(), ["r"]);
    // Same content under another name: same key.
    std::fs::write(f.dir.path().join("copy.txt"), "hello").unwrap();
    f.write(r#"( stages: { "r": (kind: "read_file", params: { "path": "copy.txt" }) } )"#);
    assert!(f.ran().is_empty());
    std::fs::write(f.dir.path().join("copy.txt"), "world").unwrap();
    let plan = f.plan();
    assert!(matches!(plan[0].reasons[0], Reason::Source { .. }));
    assert_eq!(f.ran(), ["r"]);
}

#[test]
fn a_job_runs_from_its_key_alone() {
    let f = Fixture::new();
    f.write(&chain("B", "!"));
    f.ran();
    let plan = f.plan();
    let key = plan.iter().find(|s| s.name == "c").unwrap().key.unwrap();
    let job = Job::load(&f.store, &key).unwrap().unwrap();
    // Drop the entry; the job record alone re-creates it, byte for byte.
    let before = f.store.get_entry(&key).unwrap().unwrap();
    f.store.remove_entry(&key).unwrap();
    let again = job.execute(&f.store, &f.registry, &NoProgress).unwrap();
    assert_eq!(again.outputs, before.outputs);
}

fn errors_of(src: &str) -> Vec<String> {
    let f = Fixture::new();
    f.write(src);
    match Pipeline::load(&f.file(), &f.registry) {
        Ok(_) => panic!("expected errors"),
        Err(LoadError::Spec(e)) => {
            let rendered = e.render_plain();
            assert!(rendered.contains("p.ron"), "names the file: {rendered}");
            e.lines()
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn bad_input_malformed_ron_points_at_line_and_column() {
    let e = errors_of("( stages: {\n  \"a\": (kind: \"emit\" params: {}),\n} )");
    assert_eq!(e.len(), 1);
    assert!(e[0].contains("p.ron:2:"), "{e:?}");
    assert!(e[0].contains("invalid RON"), "{e:?}");
}

#[test]
fn bad_input_every_class_reported_at_once() {
    let src = r#"( stages: {
        "a": (kind: "emit", params: { "value": 3 }),
        "b": (kind: "nope"),
        "c": (kind: "emit", params: { "value": "x", "colour": "red" }),
        "d": (kind: "emit"),
        "e": (kind: "concat", inputs: { "parts": ["ghost.out", "a.missing"] }),
        "f": (kind: "show", inputs: { "n": "a.out" }),
        "g": (kind: "parity", inputs: { "text": ["a.out"] }),
    } )"#;
    let e = errors_of(src);
    let all = e.join("\n");
    for needle in [
        "parameter `value`: expected string, found `3`",
        "unknown kind `nope`",
        "unknown parameter `colour`",
        "missing required parameter `value`",
        "missing stage `ghost`",
        "stage `a` has no output `missing`",
        "expects `number` but `a.out` is `text`",
        "takes one artifact, not a list",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(e.len(), 8, "{all}");
    // Each error points at its own line.
    assert!(e.iter().any(|l| l.contains("p.ron:3:")), "{all}");
}

#[test]
fn bad_input_cycle_is_printed() {
    let e = errors_of(r#"( stages: {
        "x": (kind: "concat", inputs: { "parts": ["z.out"] }),
        "y": (kind: "concat", inputs: { "parts": ["x.out"] }),
        "z": (kind: "concat", inputs: { "parts": ["y.out"] }),
    } )"#);
    assert_eq!(e.len(), 1);
    assert!(e[0].contains("cycle: x -> y -> z -> x"), "{e:?}");
}

#[test]
fn keys_do_not_depend_on_map_order_in_the_file() {
    let f = Fixture::new();
    f.write(r#"( stages: { "c": (kind: "concat", params: { "suffix": "s", "fail": false }, inputs: { "parts": ["e.out"] }), "e": (kind: "emit", params: { "value": "v", "ms": 0 }) } )"#);
    let k1: BTreeMap<String, _> = f.plan().into_iter().map(|s| (s.name, s.key)).collect();
    f.write(r#"( stages: { "e": (kind: "emit", params: { "ms": 0, "value": "v" }), "c": (kind: "concat", inputs: { "parts": ["e.out"] }, params: { "fail": false, "suffix": "s" }) } )"#);
    let k2: BTreeMap<String, _> = f.plan().into_iter().map(|s| (s.name, s.key)).collect();
    assert_eq!(k1, k2);
}


#[test]
fn foreach_and_extends_expand_into_stably_named_stages() {
    let f = Fixture::new();
    let src = |items: &str| {
        format!(
            r#"( stages: {{
        "seed": (kind: "emit", params: {{ "value": "s" }}),
        "base": (template: true, kind: "concat", params: {{ "suffix": "-" }}),
        "round": (extends: "base", foreach: [{items}], inputs: {{ "parts": ["round@{{prev_item}}.out"] }}, first: {{ "parts": ["seed.out"] }}, params: {{ "suffix": "{{item}}" }}),
        "last": (extends: "base", inputs: {{ "parts": ["round@r2.out"] }}),
    }} )"#
        )
    };
    f.write(&src(r#""r1", "r2""#));
    let p = f.load();
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["seed", "round@r1", "round@r2", "last"]);
    assert_eq!(f.ran(), ["last", "round@r1", "round@r2", "seed"]);
    assert_eq!(f.output("last"), "sr1r2-");
    // Adding a round keeps the names, so the cache, of the existing ones.
    f.write(&src(r#""r1", "r2", "r3""#));
    assert_eq!(f.ran(), ["round@r3"]);
    let e = errors_of(r#"( stages: {
        "a": (extends: "b", params: { "value": "x" }),
        "b": (extends: "a"),
        "r": (kind: "concat", foreach: ["x"], inputs: { "parts": ["r@{prev_item}.out"] }),
    } )"#);
    let all = e.join("\n");
    assert!(all.contains("`extends` forms a cycle: a -> b -> a"), "{all}");
    assert!(all.contains("give it in `first`"), "{all}");
}

// ---- issue 9: hostile pipelines (items 7, 11, 13, 15, 18) --------------------------

/// Parameters whose written and default forms used to differ: a `List(Path)` default
/// (classified as a source only when written) and an integer default of a float.
struct Defaults;
impl StageKind for Defaults {
    fn name(&self) -> &'static str { "defaults" }
    fn version(&self) -> u32 { 1 }
    fn summary(&self) -> &'static str { "defaults" }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("deps", ParamType::List(&ParamType::Path), Value::List(vec![]), ""),
            ParamSpec::optional("ratio", ParamType::Float, 1, ""),
            ParamSpec::optional("ratios", ParamType::List(&ParamType::Float), vec![1, 2], ""),
            ParamSpec::optional("label", ParamType::Str, "x", ""),
            ParamSpec::optional("env", ParamType::StrMap, Value::Map(Default::default()), ""),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> { vec![] }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> { vec![PortSpec::one("out", TEXT, "")] }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        std::fs::write(ctx.output_dir("out")?.join("value.txt"), "d").map_err(|e| StageError::io("write", e))
    }
}

fn hostile_registry() -> Registry {
    let mut r = registry();
    r.register(Defaults).set_backends(&["flex", "cuda"]);
    r
}

fn key_of_stage(src: &str, stage: &str) -> fgflow_cache::Digest {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.ron");
    let p = Pipeline::from_source(&file, src.to_string(), &hostile_registry()).unwrap_or_else(|e| panic!("{}", e.render_plain()));
    let sources = resolve_sources(&p, &mut StatCache::default()).unwrap();
    plan::fingerprint(p.stage(stage).unwrap(), &sources[stage], &Default::default(), "test").0.key()
}

#[test]
fn a_default_written_explicitly_gives_the_same_key() {
    let omitted = key_of_stage(r#"( stages: { "d": (kind: "defaults") } )"#, "d");
    for written in [r#""deps": []"#, r#""ratio": 1"#, r#""ratio": 1.0"#, r#""ratios": [1, 2.0]"#, r#""label": "x""#, r#""env": {}"#] {
        let src = format!(r#"( stages: {{ "d": (kind: "defaults", params: {{ {written} }}) }} )"#);
        assert_eq!(key_of_stage(&src, "d"), omitted, "writing {written} changed the key");
    }
    let all = r#"( stages: { "d": (kind: "defaults", params: { "deps": [], "ratio": 1, "ratios": [1, 2], "label": "x", "env": {} }) } )"#;
    assert_eq!(key_of_stage(all, "d"), omitted);
    let other = r#"( stages: { "d": (kind: "defaults", params: { "ratio": 2 }) } )"#;
    assert_ne!(key_of_stage(other, "d"), omitted, "a different value still changes the key");
}

/// Lines of the errors of `src` under the hostile registry.
fn hostile_errors(src: &str) -> Vec<String> {
    match Pipeline::from_source(std::path::Path::new("p.ron"), src.to_string(), &hostile_registry()) {
        Ok(_) => panic!("expected errors in {src}"),
        Err(e) => e.lines(),
    }
}

fn assert_located(lines: &[String], needle: &str, line: usize) {
    assert!(lines.iter().any(|l| l.starts_with(&format!("p.ron:{line}:")) && l.contains(needle)), "no {needle:?} on line {line} in {lines:#?}");
}

#[test]
fn zero_stages_repeated_keys_and_unknown_backends_are_located_load_errors() {
    let e = hostile_errors("( stages: {\n  \"s\": (kind: \"emit\", foreach: [], params: { \"value\": \"x\" }),\n} )");
    assert_located(&e, "`foreach` has no items", 2);
    let e = hostile_errors("( stages: {\n  \"t\": (template: true, kind: \"emit\"),\n} )");
    assert_located(&e, "declares no stage", 1);
    let e = hostile_errors("( stages: {\n  \"a\": (kind: \"emit\", params: { \"value\": \"x\",\n    \"value\": \"y\" }),\n} )");
    assert_located(&e, "duplicate key \"value\"", 3);
    let e = hostile_errors("( stages: {\n  \"a\": (kind: \"emit\", params: { \"value\": \"x\" }),\n  \"b\": (kind: \"concat\", inputs: { \"parts\": [\"a.out\"], \"parts\": [] }),\n} )");
    assert_located(&e, "duplicate key \"parts\"", 3);
    let e = hostile_errors("( stages: {\n  \"d\": (kind: \"defaults\", params: { \"env\": { \"A\": \"1\", \"A\": \"2\" } }),\n} )");
    assert_located(&e, "duplicate key \"A\"", 2);
    let e = hostile_errors("(\n  backend: \"tpu\",\n  stages: { \"a\": (kind: \"emit\", params: { \"value\": \"x\" }) },\n)");
    assert_located(&e, "unknown backend \"tpu\": expected one of \"flex\", \"cuda\"", 2);
    // Every backend the registry lists is accepted, compiled in or not.
    let p = Pipeline::from_source(std::path::Path::new("p.ron"), "( backend: \"cuda\", stages: { \"a\": (kind: \"emit\", params: { \"value\": \"x\" }) } )".into(), &hostile_registry());
    assert!(p.is_ok());
}

#[test]
fn control_characters_in_stage_names_are_located_load_errors() {
    for (name, written) in [("newline", "a\\nb"), ("escape", "a\\u{1b}[31m"), ("raw escape", "a\u{1b}[2J"), ("bell", "a\\x07"), ("bidi", "a\u{202e}b")] {
        let src = format!("( stages: {{\n  \"ok\": (kind: \"emit\", params: {{ \"value\": \"x\" }}),\n  \"{written}\": (kind: \"emit\", params: {{ \"value\": \"x\" }}),\n}} )");
        let e = hostile_errors(&src);
        assert_located(&e, "no control characters", 3);
        assert!(e.iter().all(|l| !l.contains('\u{1b}') && !l.contains('\u{7}') && !l.contains('\u{202e}')), "{name}: raw control character in {e:?}");
        let rendered = match Pipeline::from_source(std::path::Path::new("p.ron"), src.clone(), &hostile_registry()) {
            Err(e) => e.render_plain(),
            Ok(_) => unreachable!(),
        };
        assert!(!rendered.contains('\u{1b}') && !rendered.contains('\u{202e}'), "{name}: {rendered}");
    }
    // A foreach item becomes part of a name: the same rule.
    let e = hostile_errors("( stages: {\n  \"r\": (kind: \"emit\", foreach: [\"a\\u{1b}\"], params: { \"value\": \"x\" }),\n} )");
    assert_located(&e, "control characters", 2);
}

#[test]
fn huge_values_are_clipped_in_messages_and_snippets() {
    let big = "v".repeat(1 << 20);
    let src = format!("( stages: {{\n  \"a\": (kind: \"emit\", params: {{ \"value\": \"x\", \"ms\": \"{big}\" }}),\n  \"{big}\": (kind: \"emit\"),\n}} )");
    let e = match Pipeline::from_source(std::path::Path::new("p.ron"), src, &hostile_registry()) {
        Err(e) => e,
        Ok(_) => panic!("expected errors"),
    };
    let rendered = e.render_plain();
    assert!(rendered.len() < 12_000, "{} bytes rendered", rendered.len());
    assert!(rendered.contains(&format!("({} bytes)", big.len())), "{rendered}");
    assert!(e.lines().iter().map(String::len).sum::<usize>() < 8_000);
    assert_located(&e.lines(), "parameter `ms`: expected integer", 2);
}

#[test]
fn any_number_of_jobs_runs_without_aborting() {
    let f = Fixture::new();
    f.write(&chain("B", "!"));
    let (results, _) = f.run_with(usize::MAX, false);
    assert!(results.iter().all(|r| r.status == Outcome::Ran), "{results:?}");
    assert_eq!(workers_for(usize::MAX, 4), 4);
    assert_eq!(workers_for(100_000, 10_000), MAX_JOBS);
    assert_eq!(workers_for(0, 3), 1);
}
