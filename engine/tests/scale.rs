//! Memory of loading and planning a long pipeline, counted by a global allocator of
//! this test binary's own (the other test here allocates a few kilobytes, noise
//! against the tens of megabytes measured). Guards issue 12's "engine at cluster
//! scale": a checked stage costs a few small vectors, not B-tree nodes and a kept copy
//! of its parsed declaration; and the small map that replaced those nodes behaves as
//! a `BTreeMap` wherever keys or callers could tell.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use fgflow_cache::{StatCache, Store};
use fgflow_engine::*;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Shaped like the shipped `command` kind: a string, a map of outputs, a list of
/// paths and a list of names defaulted, any input port.
struct Cmd;
impl StageKind for Cmd {
    fn name(&self) -> &'static str {
        "cmd"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "a command-like step"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("cmd", ParamType::Str, ""),
            ParamSpec::optional("outputs", ParamType::StrMap, Value::Map(Default::default()), ""),
            ParamSpec::optional("deps", ParamType::List(&ParamType::Path), Value::List(vec![]), ""),
            ParamSpec::optional("env", ParamType::List(&ParamType::Str), Value::List(vec![]), ""),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![PortSpec::many("*", ArtifactType::ANY, "").optional()]
    }
    fn outputs(&self, p: &Params) -> Vec<PortSpec> {
        p.str_map("outputs").unwrap_or_default().into_keys().map(|n| PortSpec::one(n, ArtifactType::ANY, "")).collect()
    }
    fn run(&self, _: &RunContext) -> Result<(), StageError> {
        Ok(())
    }
}

/// benches/engine_scale's chain: stage i reads stage i-1's output.
fn chain(n: usize) -> String {
    let mut s = String::from("(\n    stages: {\n");
    s.push_str("        \"s0\": (kind: \"cmd\", params: { \"cmd\": \"cat data/input.txt > out.txt && echo 0 >> out.txt\", \"outputs\": { \"out\": \"out.txt\" } }),\n");
    for i in 1..n {
        s.push_str(&format!(
            "        \"s{i}\": (kind: \"cmd\", inputs: {{ \"prev\": \"s{}.out\" }}, params: {{ \"cmd\": \"cat inputs/prev/out.txt > out.txt && echo {i} >> out.txt\", \"outputs\": {{ \"out\": \"out.txt\" }} }}),\n",
            i - 1
        ));
    }
    s.push_str("    },\n)\n");
    s
}

#[test]
fn loading_and_planning_a_long_chain_costs_little_memory_per_stage() {
    const N: usize = 20_000;
    let mut r = Registry::new();
    r.register(Cmd);
    let src = chain(N);
    let text = src.len();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("cache")).unwrap();

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let p = Pipeline::from_source(Path::new("chain.ron"), src, &r).unwrap_or_else(|e| panic!("{e:?}"));
    let kept = LIVE.load(Ordering::Relaxed) - base - text;
    let load_peak = PEAK.load(Ordering::Relaxed) - base - text;
    let sources = resolve_sources(&p, &mut StatCache::default()).unwrap_or_else(|e| panic!("{e:?}"));
    let planned = plan(&p, &store, &sources, "flex").unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base - text;
    assert_eq!(planned.len(), N);
    assert_eq!(planned.iter().filter(|s| s.status == Status::Pending).count(), N - 1);

    let per = |bytes: usize| bytes / N;
    eprintln!("per stage: kept after load {} B, load peak {} B, peak with the plan {} B", per(kept), per(load_peak), per(peak));
    // Measured 823 / 1029 / 1152 B; before, 1.4 / 2.0 / 2.0 KiB (a map parameter was
    // a B-tree node, parsed values were ron's own with a B-tree per map, declarations
    // kept hash maps, and a planned stage its previous record inline); before issue
    // 12's work, 3.0 / 6.0 / 6.0 KiB (parameter, input and path maps were 11-slot
    // B-tree nodes, and the parsed declarations lived beside the checked stages).
    assert!(per(kept) < 1000, "a loaded stage keeps {} bytes", per(kept));
    assert!(per(load_peak) < 1300, "loading peaks at {} bytes a stage", per(load_peak));
    assert!(per(peak) < 1400, "planning peaks at {} bytes a stage", per(peak));
}

/// A stage's maps are `SortedMap`s where they were `BTreeMap`s: what is hashed into
/// keys (their JSON) and what callers see must not change.
#[test]
fn a_sorted_map_reads_writes_and_collects_as_a_btree_map_does() {
    use std::collections::BTreeMap;
    use fgflow_engine::value::SortedMap;

    let entries = [("outputs", 3), ("cmd", 1), ("deps", 2), ("env", 4), ("b", 0), ("a\u{e9}", 9), ("A", 7)];
    let mut sorted = SortedMap::new();
    let mut tree = BTreeMap::new();
    for (k, v) in entries {
        assert_eq!(sorted.insert(k.to_string(), v), tree.insert(k.to_string(), v));
    }
    assert_eq!(sorted.insert("cmd".into(), 10), tree.insert("cmd".into(), 10));
    assert_eq!(serde_json::to_string(&sorted).unwrap(), serde_json::to_string(&tree).unwrap());
    assert_eq!(format!("{sorted:?}"), format!("{tree:?}"));
    assert!(sorted.iter().eq(tree.iter()));
    for k in ["cmd", "deps", "A", "missing", ""] {
        assert_eq!(sorted.get(k), tree.get(k), "{k}");
        assert_eq!(sorted.contains_key(k), tree.contains_key(k), "{k}");
    }
    // Collecting keeps the last value of a repeated key, as a BTreeMap does.
    let pairs = vec![("x".to_string(), 1), ("a".to_string(), 2), ("x".to_string(), 3)];
    let collected: SortedMap<String, i32> = pairs.clone().into_iter().collect();
    let expected: BTreeMap<String, i32> = pairs.into_iter().collect();
    assert!(collected.iter().eq(expected.iter()));
    // Larger maps are searched by bisection: the same answers.
    let big: SortedMap<String, usize> = (0..100).rev().map(|i| (format!("k{i}"), i)).collect();
    assert_eq!(big.get("k42"), Some(&42));
    assert_eq!(big.get("k100"), None);
    let back: SortedMap<String, usize> = serde_json::from_str(&serde_json::to_string(&big).unwrap()).unwrap();
    assert!(back == big);
    let mut small = collected;
    assert_eq!(small.remove("x"), Some(3));
    assert_eq!(small.len(), 1);

    // Parameters serialise as before: the canonical form keys are computed from.
    let p = Params::default().with("z", 1).with("a", "s").with("m", vec![1.5, 2.0]);
    assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"a":"s","m":[1.5,2.0],"z":1}"#);
}
