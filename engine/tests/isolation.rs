//! What a stage body can do to the cache through its inputs and outputs: a kind that
//! writes to its (hard-linked) input fails and the damaged blob leaves the cache; a
//! kind whose output is a link to a file outside its directory fails without taking
//! that file. (The `command` kind's copies are tested end to end in the root tests.)

use std::collections::BTreeMap;

use fgflow_cache::{Digest, StatCache, Store};
use fgflow_engine::*;

const BYTES: ArtifactType = ArtifactType("bytes");

/// Writes `value` to out/v.txt; with `link`, writes a symbolic link to that path instead.
struct Emit;
impl StageKind for Emit {
    fn name(&self) -> &'static str {
        "emit"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "emit a value"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("value", ParamType::Str, ""), ParamSpec::optional("link", ParamType::Str, "", "")]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![]
    }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("out", BYTES, "")]
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let out = ctx.output_dir("out")?;
        let link = ctx.params.str("link")?;
        if link.is_empty() {
            std::fs::write(out.join("v.txt"), ctx.params.str("value")?).map_err(|e| StageError::io("write", e))
        } else {
            std::os::unix::fs::symlink(link, out.join("v.txt")).map_err(|e| StageError::io("link", e))
        }
    }
}

/// Appends to its input file in place (as a buggy kind would), then copies it.
struct Vandal;
impl StageKind for Vandal {
    fn name(&self) -> &'static str {
        "vandal"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "write to the input"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![PortSpec::one("x", BYTES, "")]
    }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("out", BYTES, "")]
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let input = ctx.input("x")?.join("v.txt");
        // What an owner (or root, who ignores the mode) can do.
        std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).map_err(|e| StageError::io("chmod", e))?;
        let mut f = std::fs::OpenOptions::new().append(true).open(&input).map_err(|e| StageError::io("open", e))?;
        f.write_all(b"X").map_err(|e| StageError::io("append", e))?;
        std::fs::copy(&input, ctx.output_dir("out")?.join("v.txt")).map_err(|e| StageError::io("copy", e))?;
        Ok(())
    }
}

struct Quiet;
impl ProgressSink for Quiet {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
}
impl Observer for Quiet {
    fn event(&self, _: &Event) {}
}

fn run_pipeline(dir: &std::path::Path, store: &Store, src: &str) -> BTreeMap<String, StageResult> {
    let mut registry = Registry::new();
    registry.register(Emit).register(Vandal);
    let file = dir.join("p.ron");
    std::fs::write(&file, src).unwrap();
    let p = match Pipeline::load(&file, &registry) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let sources = resolve_sources(&p, &mut StatCache::default()).unwrap();
    let opts = RunOptions { jobs: 1, fail_fast: false, backend: "test".into() };
    run(&p, store, &registry, &sources, &opts, &Quiet).unwrap().into_iter().map(|r| (r.name.clone(), r)).collect()
}

#[test]
fn a_kind_that_writes_to_its_input_fails_and_the_damaged_blob_leaves_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(".fgflow")).unwrap();
    let src = r#"( stages: {
        "a": (kind: "emit", params: { "value": "original" }),
        "b": (kind: "vandal", inputs: { "x": "a.out" }),
    } )"#;
    let r = run_pipeline(dir.path(), &store, src);
    assert_eq!(r["a"].status, Outcome::Ran);
    assert_eq!(r["b"].status, Outcome::Failed);
    let err = r["b"].error.clone().unwrap();
    assert!(err.contains("wrote to its input file `x/v.txt`"), "{err}");
    // The damaged bytes are not served: the blob is gone, so nothing can read
    // "originalX" under the digest of "original".
    assert!(!store.has_blob(&Digest::of_bytes(b"original")), "the damaged blob must be removed");
    assert!(!store.has_blob(&Digest::of_bytes(b"originalX")), "and the damage is not stored as an output");
    assert!(store.get_entry(&r["b"].key.unwrap()).unwrap().is_none(), "no entry for the failed stage");
}

#[test]
fn an_output_linking_outside_the_stage_fails_and_leaves_the_target_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(".fgflow")).unwrap();
    let secret = dir.path().join("notes.txt");
    std::fs::write(&secret, "mine").unwrap();
    let src = format!(r#"( stages: {{ "a": (kind: "emit", params: {{ "value": "", "link": "{}" }}) }} )"#, secret.display());
    let r = run_pipeline(dir.path(), &store, &src);
    assert_eq!(r["a"].status, Outcome::Failed);
    let err = r["a"].error.clone().unwrap();
    assert!(err.contains("symbolic link") && err.contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "mine");
    assert_ne!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o200, 0, "still the user's, writable");
}
