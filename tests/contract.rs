//! Contracts: the keys of the shipped pipelines (a change is a reviewed snapshot
//! diff), every shipped pipeline loads, and the crate dependency direction.

use std::path::Path;


/// For every stage of every `pipelines/*.ron`: kind, kind version and the digest of
/// its fingerprint with inputs left out (params, sources, env, backend), plus the full
/// key of stages without inputs. Any change to canonicalisation, defaults, kind versions
/// or the shipped pipelines shows up here as a reviewed diff.
#[test]
fn key_contract_of_shipped_pipelines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let registry = fgflow_stages::registry();
    let mut files: Vec<_> = std::fs::read_dir(root.join("pipelines")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "ron")).collect();
    files.sort();
    assert!(!files.is_empty());
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap();
        let p = match fgflow_engine::Pipeline::load(rel, &registry) {
            Ok(p) => p,
            Err(fgflow_engine::LoadError::Spec(e)) => panic!("{}", e.render_plain()),
            Err(e) => panic!("{e}"),
        };
        let sources = fgflow_engine::resolve_sources(&p, &mut fgflow_cache::StatCache::default()).unwrap();
        let backend = p.backend.clone().unwrap_or_else(|| fgflow_stages::DEFAULT_BACKEND.to_string());
        out.push_str(&format!("{}\n", rel.display()));
        let empty = Default::default();
        for s in &p.stages {
            let (fp, _, complete) = fgflow_engine::plan::fingerprint(s, sources.get(&s.name).unwrap_or(&empty), &Default::default(), &backend);
            let key = if complete { fp.key().to_hex()[..16].to_string() } else { "-".repeat(16) };
            let mut no_inputs = fp.clone();
            no_inputs.inputs.clear();
            out.push_str(&format!("  {:<24} {:<14} v{}  params {}  key {key}\n", s.name, fp.kind, fp.kind_version, &no_inputs.key().to_hex()[..16]));
        }
    }
    insta::assert_snapshot!("shipped_pipeline_keys", out);
}

#[test]
fn dependencies_point_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let cache = read("cache/Cargo.toml");
    let engine = read("engine/Cargo.toml");
    for (name, toml) in [("cache", &cache), ("engine", &engine)] {
        assert!(!toml.contains("burn"), "{name} must not depend on burn");
        assert!(!toml.contains("fgflow-stages"), "{name} must not depend on stages");
    }
    assert!(!cache.contains("fgflow-engine"), "cache must not depend on engine");
    let root_toml = read("Cargo.toml");
    let deps = root_toml.split("[dependencies]").nth(1).unwrap().split("\n[").next().unwrap();
    assert!(!deps.contains("burn"), "the CLI reaches burn only through stages");
}
