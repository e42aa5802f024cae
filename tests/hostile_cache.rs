//! A cache damaged or forged by hand (issue 9, classes 5, 6, 8, 9, 12 and the export
//! half of 17), through the binary: nothing read from the cache writes outside its
//! destination or serves another key's result; every damaged record is reported by
//! `verify` in one pass and removed; `run` recomputes what it cannot read, with a
//! warning naming the file; refs and the stat cache are rebuilt; `gc --grace`
//! refuses overflowing values; `export` makes files like `cp` does.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use fgflow_cache::Digest;
use serde_json::Value;

use crate::cli::{Dir, with_status};

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Stage name -> key, from a `run --json` report.
fn keys(report: &Value) -> BTreeMap<String, String> {
    report["stages"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string())).collect()
}

fn sharded(d: &Dir, dir: &str, hex: &str, ext: &str) -> PathBuf {
    d.path().join(".fgflow").join(dir).join(&hex[..2]).join(format!("{}{ext}", &hex[2..]))
}

fn entry_file(d: &Dir, key: &str) -> PathBuf {
    sharded(d, "entries", key, ".json")
}

fn blob_file(d: &Dir, hex: &str) -> PathBuf {
    sharded(d, "blobs", hex, "")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Digest of the first file of the output `out` of the entry `key`.
fn first_file_blob(d: &Dir, key: &str, out: &str) -> String {
    let entry = read_json(&entry_file(d, key));
    let tree = read_json(&blob_file(d, entry["outputs"][out].as_str().unwrap()));
    tree["files"][0]["digest"].as_str().unwrap().to_string()
}

/// Store `bytes` as a blob under their real digest, as anyone who can write the
/// cache could.
fn put_blob(d: &Dir, bytes: &[u8]) -> String {
    let hex = Digest::of_bytes(bytes).to_hex();
    let p = blob_file(d, &hex);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    hex
}


fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

const PAIR: &str = r#"(
    stages: {
        "a": (kind: "command", params: { "cmd": "echo hi > o.txt", "outputs": { "o": "o.txt" } }),
        "b": (kind: "command", inputs: { "x": "a.o" }, params: { "cmd": "cat inputs/x/o.txt inputs/x/o.txt > p.txt", "outputs": { "p": "p.txt" } }),
    },
)"#;

#[test]
fn a_forged_manifest_never_writes_outside_and_verify_removes_it() {
    let d = Dir::new();
    d.write("pipelines/p.ron", PAIR);
    let k = keys(&d.json(&["run", "pipelines/p.ron", "--json"]));
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // `../` enough times to reach `/` from any directory, then down to `outside/x`.
    let evil = format!("{}{}/x", "../".repeat(64), outside.display().to_string().trim_start_matches('/'));
    let file = first_file_blob(&d, &k["a"], "o");
    let forge = || {
        let manifest = serde_json::json!({ "files": [{ "path": evil, "digest": file, "size": 3 }] });
        let forged = put_blob(&d, &serde_json::to_vec(&manifest).unwrap());
        let mut entry = read_json(&entry_file(&d, &k["a"]));
        entry["outputs"]["o"] = Value::String(forged.clone());
        std::fs::write(entry_file(&d, &k["a"]), serde_json::to_vec(&entry).unwrap()).unwrap();
        forged
    };

    // run: `a`'s entry is unusable, so `a` re-runs (with a warning naming it); nothing is laid out from the forgery.
    forge();
    let o = d.run(&["run", "pipelines/p.ron", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(with_status(&r, "ran"), ["a"], "{r}");
    assert!(err.contains(&entry_file(&d, &k["a"]).strip_prefix(d.path()).unwrap().display().to_string()) && err.contains("`..`"), "{err}");
    assert!(files_under(&outside).is_empty());

    // export, and a job whose recorded input is the forged tree: exit non-zero, nothing outside.
    let forged = forge();
    let o = d.run(&["export", &format!("{}.o", &k["a"][..12]), "out"]);
    let (_, err) = text(&o);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("`..`"), "{err}");
    let job_file = d.path().join(".fgflow/jobs").join(format!("{}.json", k["b"]));
    let mut job = read_json(&job_file);
    job["recorded"]["fingerprint"]["inputs"]["x"] = serde_json::json!([forged]);
    std::fs::write(&job_file, serde_json::to_vec(&job).unwrap()).unwrap();
    std::fs::remove_file(entry_file(&d, &k["b"])).unwrap();
    let o = d.run(&["exec-job", &k["b"]]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("`..` component") && err.contains(&forged[2..]), "the error names the manifest and the path: {err}");
    assert!(files_under(&outside).is_empty());
    assert!(files_under(&d.path().join("out")).is_empty());

    // verify removes the forged manifest and the entry that named it; a second pass is clean.
    let o = d.run(&["verify"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("tree manifest {}", blob_file(&d, &forged).strip_prefix(d.path()).unwrap().display())) && out.contains("removed"), "{out}");
    assert!(!blob_file(&d, &forged).exists());
    assert_eq!(d.run(&["verify"]).status.code(), Some(0));
    let r = d.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["a", "b"]);
    d.ok(&["export", "b.p", "got.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("got.txt")).unwrap(), "hi\nhi\n");
    assert!(files_under(&outside).is_empty());
}

const TWO: &str = r#"(
    stages: {
        "a": (kind: "command", params: { "cmd": "echo A > o.txt", "outputs": { "o": "o.txt" } }),
        "b": (kind: "command", params: { "cmd": "echo B > o.txt", "outputs": { "o": "o.txt" } }),
    },
)"#;

#[test]
fn an_entry_copied_over_another_key_is_never_served() {
    let d = Dir::new();
    d.write("pipelines/t.ron", TWO);
    let k = keys(&d.json(&["run", "pipelines/t.ron", "--json"]));
    let (ea, eb) = (entry_file(&d, &k["a"]), entry_file(&d, &k["b"]));

    // run: `b` re-runs instead of serving `a`'s output, with a warning.
    std::fs::copy(&ea, &eb).unwrap();
    let o = d.run(&["run", "pipelines/t.ron", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(with_status(&serde_json::from_str(&out).unwrap(), "ran"), ["b"]);
    assert!(err.contains("another key"), "{err}");
    d.ok(&["export", "b.o", "b.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("b.txt")).unwrap(), "B\n");

    // verify: the copy is found and removed; so is one whose `key` field was edited to
    // match (its recorded fingerprint hashes to `a`'s key).
    std::fs::copy(&ea, &eb).unwrap();
    let o = d.run(&["verify"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(&eb.strip_prefix(d.path()).unwrap().display().to_string()) && out.contains("copied over it"), "{out}");
    assert_eq!(d.run(&["verify"]).status.code(), Some(0));
    d.ok(&["run", "pipelines/t.ron"]);
    let mut forged = read_json(&ea);
    forged["key"] = Value::String(k["b"].clone());
    std::fs::write(&eb, serde_json::to_vec(&forged).unwrap()).unwrap();
    let o = d.run(&["verify"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("fingerprint hashes to {}", k["a"])), "{out}");
    let r = d.json(&["run", "pipelines/t.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["b"]);
    d.ok(&["export", "b.o", "b.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("b.txt")).unwrap(), "B\n");
}

const FIVE: &str = r#"(
    stages: {
        "s1": (kind: "command", params: { "cmd": "echo 1 > o.txt", "outputs": { "o": "o.txt" } }),
        "s2": (kind: "command", params: { "cmd": "echo 2 > o.txt", "outputs": { "o": "o.txt" } }),
        "s3": (kind: "command", params: { "cmd": "echo 3 > o.txt", "outputs": { "o": "o.txt" } }),
        "s4": (kind: "command", params: { "cmd": "echo 4 > o.txt", "outputs": { "o": "o.txt" } }),
        "s5": (kind: "command", params: { "cmd": "echo 5 > o.txt", "outputs": { "o": "o.txt" } }),
        "sum": (kind: "command", inputs: { "x": ["s1.o", "s2.o", "s3.o", "s4.o", "s5.o"] }, params: { "cmd": "t=0; for f in inputs/x/*/o.txt; do t=$((t + $(cat $f))); done; echo $t > s.txt", "outputs": { "s": "s.txt" } }),
    },
)"#;

/// Truncated, empty, garbage and wrong-shape entries for s1..s4; s5's file blob made
/// a directory. Returns the paths (relative to the test dir) that must be named.
fn damage_five(d: &Dir, k: &BTreeMap<String, String>) -> Vec<String> {
    let e1 = entry_file(d, &k["s1"]);
    let full = std::fs::read(&e1).unwrap();
    std::fs::write(&e1, &full[..full.len() / 2]).unwrap();
    std::fs::write(entry_file(d, &k["s2"]), b"").unwrap();
    std::fs::write(entry_file(d, &k["s3"]), [0xde, 0xad, 0xbe, 0xef, 0x00, 0x7b]).unwrap();
    std::fs::write(entry_file(d, &k["s4"]), br#"{"outputs": 42}"#).unwrap();
    let blob = blob_file(d, &first_file_blob(d, &k["s5"], "o"));
    std::fs::remove_file(&blob).unwrap();
    std::fs::create_dir_all(blob.join("inner")).unwrap();
    let rel = |p: PathBuf| p.strip_prefix(d.path()).unwrap().display().to_string();
    vec![rel(entry_file(d, &k["s1"])), rel(entry_file(d, &k["s2"])), rel(entry_file(d, &k["s3"])), rel(entry_file(d, &k["s4"])), rel(blob)]
}

#[test]
fn damaged_entries_and_blobs_are_all_reported_removed_and_recomputed() {
    let d = Dir::new();
    d.write("pipelines/f.ron", FIVE);
    let k = keys(&d.json(&["run", "pipelines/f.ron", "--json"]));

    // run: every damaged stage re-runs with a warning naming its file; exit 0, right output.
    let named = damage_five(&d, &k);
    let st = d.run(&["status", "pipelines/f.ron"]);
    assert!(st.status.success(), "{:?}", text(&st));
    let o = d.run(&["run", "pipelines/f.ron", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(with_status(&r, "ran"), ["s1", "s2", "s3", "s4", "s5"], "{r}");
    assert_eq!(with_status(&r, "reused"), ["sum"], "same outputs: `sum` is reused");
    for p in &named {
        assert!(err.contains(p.as_str()), "warning names {p}:\n{err}");
    }
    d.ok(&["export", "sum.s", "s.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("s.txt")).unwrap().trim(), "15");
    assert_eq!(d.run(&["verify"]).status.code(), Some(0), "the re-run repaired everything");

    // verify: all of them in one pass, exit 1; then clean, and the next run recomputes.
    let named = damage_five(&d, &k);
    let o = d.run(&["verify"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    for p in &named {
        assert!(out.contains(p.as_str()), "verify names {p}:\n{out}");
    }
    assert!(out.contains("1 corrupt, 5 entries dropped"), "{out}");
    for why in ["truncated", "empty file", "not JSON", "wrong shape", "is a directory"] {
        assert!(out.contains(why), "{why}:\n{out}");
    }
    let o = d.run(&["verify"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let r = d.json(&["run", "pipelines/f.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["s1", "s2", "s3", "s4", "s5"]);
    d.ok(&["export", "s5.o", "five.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("five.txt")).unwrap(), "5\n");
}

#[test]
fn damaged_refs_stat_cache_and_jobs_are_set_aside_and_rebuilt() {
    let d = Dir::new();
    d.write("data.txt", "payload");
    d.write("p.ron", r#"(
    stages: {
        "a": (kind: "command", params: { "cmd": "cat data.txt > o.txt", "deps": ["data.txt"], "outputs": { "o": "o.txt" } }),
    },
)"#);
    let k = keys(&d.json(&["run", "p.ron", "--json"]));
    let refs_dir = d.path().join(".fgflow/refs");
    let refs = files_under(&refs_dir).pop().unwrap();
    let stat = d.path().join(".fgflow/stat-cache.json");

    std::fs::write(&refs, "\u{0}garbage").unwrap();
    std::fs::write(&stat, "{\"truncated").unwrap();
    let o = d.run(&["status", "p.ron"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("fresh"), "{out}");
    let refs_rel = refs.strip_prefix(d.path()).unwrap().display().to_string();
    assert!(err.contains(&refs_rel) && err.contains("damaged"), "{err}");
    assert!(err.contains("stat-cache.json"), "{err}");
    assert!(files_under(&refs_dir).len() == 1, "a reading verb changes nothing");
    let o = d.run(&["run", "p.ron", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert_eq!(with_status(&serde_json::from_str(&out).unwrap(), "reused"), ["a"]);
    assert!(err.contains(&refs_rel) && err.contains("set aside as"), "{err}");
    assert!(files_under(&refs_dir).iter().any(|p| p.to_string_lossy().contains(".json.bad-")), "set aside beside it");
    assert_eq!(read_json(&refs)["stages"]["a"], k["a"].as_str(), "refs rebuilt");
    read_json(&stat);

    // verify reads refs, jobs and the stat cache too.
    std::fs::write(&refs, "[]").unwrap();
    std::fs::write(&stat, "").unwrap();
    let job = d.path().join(".fgflow/jobs").join(format!("{}.json", k["a"]));
    std::fs::write(&job, "{").unwrap();
    let o = d.run(&["verify"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    for what in ["refs ", "job ", "stat cache "] {
        assert!(out.contains(what), "{what}:\n{out}");
    }
    assert!(!job.exists() && !stat.exists() && !refs.exists());
    assert_eq!(d.run(&["verify"]).status.code(), Some(0));
    assert_eq!(with_status(&d.json(&["run", "p.ron", "--json"]), "reused"), ["a"]);
    assert!(refs.exists());
    // gc removes set-aside documents with the temp files.
    d.ok(&["gc", "--grace", "0"]);
    assert!(!files_under(&refs_dir).iter().any(|p| p.to_string_lossy().contains(".bad-")));
}

#[test]
fn gc_grace_that_overflows_is_an_error_not_a_wrap() {
    let d = Dir::new();
    d.write("pipelines/t.ron", TWO);
    d.ok(&["run", "pipelines/t.ron"]);
    for grace in ["213503982334602d", "99999999999999999999999s", "18446744073709551615m", "1000000d"] {
        let o = d.run(&["gc", "--grace", grace]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{grace}: {err}");
        assert!(err.contains("too large"), "{grace}: {err}");
    }
    let out = d.ok(&["gc", "--grace", "365000d"]);
    assert!(out.contains("removed 0 entries"), "{out}");
}

/// `fgflow ARGS` under the given umask.
fn with_umask(d: &Dir, umask: &str, args: &[&str]) -> Output {
    let mut c = std::process::Command::new("sh");
    c.arg("-c").arg(format!("umask {umask}; exec \"$0\" \"$@\"")).arg(crate::cli::fgflow_bin()).args(args).current_dir(d.path()).env_remove("FGFLOW_CACHE");
    c.output().unwrap()
}

#[test]
fn export_makes_files_like_cp_and_stays_inside_its_destination() {
    let d = Dir::new();
    d.write("pipelines/e.ron", r#"(
    stages: {
        "t": (kind: "command", params: { "cmd": "mkdir -p d/sub && echo f > d/sub/f && echo g > d/g", "outputs": { "d": "d" } }),
        "one": (kind: "command", params: { "cmd": "echo one > o.txt", "outputs": { "o": "o.txt" } }),
    },
)"#);
    d.ok(&["run", "pipelines/e.ron"]);
    for (umask, file, dir) in [("022", 0o644, 0o755), ("077", 0o600, 0o700), ("002", 0o664, 0o775)] {
        let dest = format!("out{umask}");
        let o = with_umask(&d, umask, &["export", "t.d", &dest]);
        assert!(o.status.success(), "{:?}", text(&o));
        let root = d.path().join(&dest);
        assert_eq!(mode(&root.join("g")), file, "umask {umask}");
        assert_eq!(mode(&root.join("sub/f")), file, "umask {umask}");
        assert_eq!(mode(&root.join("sub")), dir, "umask {umask}");
        let single = format!("one{umask}.txt");
        assert!(with_umask(&d, umask, &["export", "one.o", &single]).status.success());
        assert_eq!(mode(&d.path().join(&single)), file, "umask {umask}");
        assert_eq!(std::fs::read_to_string(d.path().join(&single)).unwrap(), "one\n");
    }
    // Exporting again replaces the files.
    std::fs::write(d.path().join("out022/g"), "edited").unwrap();
    d.ok(&["export", "t.d", "out022"]);
    assert_eq!(std::fs::read_to_string(d.path().join("out022/g")).unwrap(), "g\n");

    // A symbolic link already at the destination is never written through.
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "keep").unwrap();
    std::fs::create_dir(d.path().join("trap")).unwrap();
    std::os::unix::fs::symlink(&outside, d.path().join("trap/sub")).unwrap();
    let o = d.run(&["export", "t.d", "trap"]);
    let (_, err) = text(&o);
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(files_under(&outside), [outside.join("victim")]);
    std::fs::create_dir(d.path().join("trap2")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), d.path().join("trap2/g")).unwrap();
    d.ok(&["export", "t.d", "trap2"]);
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(d.path().join("trap2/g")).unwrap().file_type().is_file());
    assert_eq!(std::fs::read_to_string(d.path().join("trap2/g")).unwrap(), "g\n");
}
