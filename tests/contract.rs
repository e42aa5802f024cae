//! Contracts: the keys of the shipped pipelines (a change is a reviewed snapshot
//! diff), every shipped pipeline loads, and the crate dependency direction.

use std::path::Path;

use crate::cli::Dir;

/// For every stage of every `pipelines/*.ron`: its kind, kind version and the digest
/// of its canonical parameters, plus the full key of stages without inputs. Any change
/// to canonicalisation, defaults or kind versions shows up here.
#[test]
fn key_contract_of_shipped_pipelines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("pipelines")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "ron")).collect();
    files.sort();
    assert!(!files.is_empty());
    let mut out = String::new();
    for f in files {
        let d = Dir::new();
        let rel = f.strip_prefix(root).unwrap();
        let mut cmd = d.cmd(&["status", "--json", f.to_str().unwrap()]);
        cmd.current_dir(d.path());
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}: {}", rel.display(), String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        out.push_str(&format!("{}\n", rel.display()));
        for s in j["stages"].as_array().unwrap() {
            let key = s["key"].as_str().map(|k| k[..16].to_string()).unwrap_or_else(|| "(after upstream)".into());
            out.push_str(&format!("  {:<24} {:<8} {}\n", s["name"].as_str().unwrap(), s["status"].as_str().unwrap(), key));
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
