//! The binary in a temp dir: run, edit, explain, inspect, failures, crashes,
//! concurrent processes, exit codes and the JSON schema.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("pipelines")).unwrap();
        Dir { tmp }
    }
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(fgflow_bin());
        c.args(args).current_dir(self.path()).env_remove("FGFLOW_CACHE");
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "fgflow {args:?} failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let o = self.run(args);
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
}

/// The binary under test: the one cargo built, or `FGFLOW_BIN` (`.ci/run` copies the
/// binaries where an unprivileged user can run them and runs the hostile tests again
/// as that user: the build directory under root's home is closed to others).
pub fn fgflow_bin() -> std::ffi::OsString {
    std::env::var_os("FGFLOW_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_fgflow").into())
}

/// Names of stages with the given status in a `run --json` report.
pub fn with_status(report: &serde_json::Value, status: &str) -> Vec<String> {
    let mut v: Vec<String> = report["stages"].as_array().unwrap().iter().filter(|s| s["status"] == status).map(|s| s["name"].as_str().unwrap().to_string()).collect();
    v.sort();
    v
}

fn chain(n: u32, suffix: &str) -> String {
    format!(
        r#"(
    stages: {{
        "gen": (kind: "command", params: {{ "cmd": "seq 1 {n} > nums.txt", "outputs": {{ "nums": "nums.txt" }} }}),
        "sum": (kind: "command", inputs: {{ "nums": "gen.nums" }}, params: {{ "cmd": "awk '{{s+=$1}} END {{print s}}' inputs/nums/nums.txt > sum.txt", "outputs": {{ "sum": "sum.txt" }} }}),
        "parity": (kind: "command", inputs: {{ "sum": "sum.sum" }}, params: {{ "cmd": "echo $(( $(cat inputs/sum/sum.txt) % 2 )) > p.txt", "outputs": {{ "p": "p.txt" }} }}),
        "report": (kind: "command", inputs: {{ "p": "parity.p" }}, params: {{ "cmd": "echo parity=$(cat inputs/p/p.txt){suffix} > r.txt", "outputs": {{ "report": "r.txt" }} }}),
        "other": (kind: "command", params: {{ "cmd": "echo independent > o.txt", "outputs": {{ "o": "o.txt" }} }}),
    }},
)"#
    )
}

#[test]
fn run_edit_revert_and_early_cutoff_through_the_binary() {
    let d = Dir::new();
    d.write("pipelines/c.ron", &chain(5, ""));
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["gen", "other", "parity", "report", "sum"]);
    assert_eq!(r["summary"]["ran"], 5);
    for s in r["stages"].as_array().unwrap() {
        assert!(s["key"].as_str().unwrap().len() == 64 && s["reasons"].is_array(), "schema: {s}");
    }
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    assert_eq!(with_status(&r, "reused").len(), 5);
    // 1..5 sums to 15, 1..7 to 28: parity changes. 1..6 sums to 21: parity is the same.
    d.write("pipelines/c.ron", &chain(6, ""));
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["gen", "parity", "sum"], "early cutoff at `parity`: `report` reused");
    assert_eq!(with_status(&r, "reused"), ["other", "report"]);
    d.write("pipelines/c.ron", &chain(5, ""));
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    assert!(with_status(&r, "ran").is_empty(), "revert restores from the run cache: {r}");
    d.write("pipelines/c.ron", &chain(5, "!"));
    let out = d.ok(&["run", "pipelines/c.ron"]);
    assert!(out.contains("ran      report"), "{out}");
    assert!(out.contains("param `cmd`"), "ran lines say why: {out}");
    assert!(out.contains("1 ran, 4 reused, 0 failed, 0 skipped"), "{out}");
}

#[test]
fn status_and_explain_say_why_field_by_field() {
    let d = Dir::new();
    d.write("pipelines/c.ron", &chain(5, ""));
    d.ok(&["run", "pipelines/c.ron"]);
    d.write("pipelines/c.ron", &chain(7, ""));
    let status = d.ok(&["status", "pipelines/c.ron"]);
    insta::assert_snapshot!("status_after_edit", status);
    let explain = d.ok(&["explain", "sum"]);
    insta::assert_snapshot!("explain_pending", explain);
    let explain = d.ok(&["explain", "gen", "-p", "pipelines/c.ron"]);
    insta::assert_snapshot!("explain_stale", explain);
    let j = d.json(&["status", "pipelines/c.ron", "--json"]);
    let statuses: Vec<&str> = j["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["stale", "pending", "pending", "pending", "fresh"]);
    // After the run, explain reports the changed input and its producer.
    d.ok(&["run", "pipelines/c.ron"]);
    let diff = d.ok(&["diff", "sum", &d.json(&["ls", "--json"]).as_array().unwrap().iter().find(|e| e["stage"] == "sum").unwrap()["key"].as_str().unwrap()[..12]]);
    assert!(diff.contains("input `nums` from `gen.nums` changed") || diff.contains("identical"), "{diff}");
}

#[test]
fn inspect_show_export_ls_graph_gc_verify() {
    let d = Dir::new();
    d.write("pipelines/c.ron", &chain(5, ""));
    d.ok(&["run", "pipelines/c.ron"]);
    let show = d.ok(&["show", "sum"]);
    assert!(show.contains("stage     sum") && show.contains("from gen.nums") && show.contains("sum.txt") == false || show.contains("outputs"), "{show}");
    let j = d.json(&["show", "sum", "--json"]);
    assert_eq!(j["entry"]["stage"], "sum");
    let key = j["entry"]["key"].as_str().unwrap().to_string();
    let by_key = d.json(&["show", &key[..10], "--json"]);
    assert_eq!(by_key["entry"]["key"], key.as_str());
    d.ok(&["export", "sum.sum", "out/sum.txt"]);
    assert_eq!(std::fs::read_to_string(d.path().join("out/sum.txt")).unwrap().trim(), "15");
    assert!(!std::fs::metadata(d.path().join("out/sum.txt")).unwrap().permissions().readonly());
    let ls = d.ok(&["ls"]);
    assert!(ls.contains("5 entries"), "{ls}");
    let g = d.ok(&["graph", "--dot"]);
    assert!(g.contains("digraph") && g.contains("->"), "{g}");
    let dry = d.ok(&["gc", "--dry-run", "--grace", "0"]);
    assert!(dry.contains("would remove 0 entries"), "{dry}");
    // Drop a stage from the pipeline: gc (no grace) removes its entry, keeps the rest.
    d.write("pipelines/c.ron", &chain(5, "").replace(r#""other": (kind: "command", params: { "cmd": "echo independent > o.txt", "outputs": { "o": "o.txt" } }),"#, ""));
    d.ok(&["run", "pipelines/c.ron"]);
    let gc = d.ok(&["gc", "--grace", "0"]);
    assert!(gc.contains("removed 1 entries"), "{gc}");
    assert!(d.ok(&["ls"]).contains("4 entries"));
    assert!(d.ok(&["verify"]).contains("0 corrupt"));
    // Corrupt a blob: verify finds it, drops the entry, and the next run repairs it.
    let blob = walk_files(&d.path().join(".fgflow/blobs")).into_iter().find(|p| std::fs::read_to_string(p).map(|s| s.trim() == "15").unwrap_or(false)).unwrap();
    let mut perm = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&blob, perm).unwrap();
    std::fs::write(&blob, "16\n").unwrap();
    let v = d.run(&["verify"]);
    assert_eq!(v.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&v.stdout).contains("1 corrupt"));
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["sum"]);
}

pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn bad_pipelines_exit_2_with_file_line_and_all_errors() {
    let d = Dir::new();
    d.write("pipelines/bad.ron", r#"(
    stages: {
        "a": (kind: "command", params: { "cmd": 3 }),
        "b": (kind: "trian"),
        "c": (kind: "command", inputs: { "x": "nowhere.out" }, params: { "cmd": "true" }),
    },
)"#);
    let o = d.run(&["run", "pipelines/bad.ron"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("pipelines/bad.ron:3:"), "{err}");
    assert!(err.contains("3 problems"), "{err}");
    assert!(err.contains("unknown kind `trian`") && err.contains("known kinds:"), "{err}");
    assert!(err.contains("missing stage `nowhere`"), "{err}");
    d.write("pipelines/syntax.ron", "( stages: { \"a\": (kind: \"command\" } )");
    let o = d.run(&["status", "pipelines/syntax.ron"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("syntax.ron:1:"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.run(&["run", "pipelines/missing.ron"]).status.code(), Some(2));
    assert_eq!(d.run(&["explain", "zzz", "-p", "pipelines/syntax.ron"]).status.code(), Some(2));
}

#[test]
fn a_failing_stage_exits_1_reports_its_log_and_leaves_the_cache_as_it_was() {
    let d = Dir::new();
    d.write("pipelines/f.ron", r#"(
    stages: {
        "bad": (kind: "command", params: { "cmd": "echo some progress; echo half > out.txt; echo boom >&2; exit 3", "outputs": { "out": "out.txt" } }),
        "after": (kind: "command", inputs: { "x": "bad.out" }, params: { "cmd": "cat inputs/x/out.txt > y", "outputs": { "y": "y" } }),
        "fine": (kind: "command", params: { "cmd": "echo ok > ok.txt", "outputs": { "ok": "ok.txt" } }),
    },
)"#);
    let o = d.run(&["run", "pipelines/f.ron", "-j", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAILED   bad") && out.contains("boom") && out.contains("some progress"), "{out}");
    assert!(out.contains("skipped  after"), "{out}");
    assert!(out.contains("ran      fine"), "{out}");
    assert!(d.ok(&["ls"]).contains("1 entries"));
    let r = d.json(&["run", "pipelines/f.ron", "--json", "--fail-fast", "-j", "1"]);
    assert_eq!(with_status(&r, "failed"), ["bad"]);
}

#[test]
fn a_killed_run_leaves_a_consistent_cache() {
    let d = Dir::new();
    d.write("pipelines/k.ron", r#"(
    stages: {
        "slow": (kind: "command", params: { "cmd": "echo partial > out.txt; sleep 30; echo done >> out.txt", "outputs": { "out": "out.txt" } }),
    },
)"#);
    let mut child = d.cmd(&["run", "pipelines/k.ron"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Wait until the stage is running (its scratch dir exists), then kill -9.
    let start = Instant::now();
    let tmp = d.path().join(".fgflow/tmp");
    while !(tmp.is_dir() && std::fs::read_dir(&tmp).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("run-"))) {
        assert!(start.elapsed() < Duration::from_secs(20), "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(d.ok(&["verify"]).contains("0 corrupt, 0 entries dropped"));
    assert!(d.ok(&["ls"]).contains("0 entries"));
    let st = d.json(&["status", "pipelines/k.ron", "--json"]);
    assert_eq!(st["stages"][0]["status"], "stale");
    // The killed process's lock died with it: a new run proceeds at once.
    d.write("pipelines/k.ron", &std::fs::read_to_string(d.path().join("pipelines/k.ron")).unwrap().replace("sleep 30", "sleep 0"));
    let r = d.json(&["run", "pipelines/k.ron", "--json"]);
    assert_eq!(with_status(&r, "ran"), ["slow"]);
    let gc = d.ok(&["gc", "--grace", "0"]);
    assert!(gc.contains("temp files"), "{gc}");
}

#[test]
fn two_processes_on_one_cache_run_each_stage_once() {
    let d = Dir::new();
    d.write("pipelines/p.ron", r#"(
    stages: {
        "a": (kind: "command", params: { "cmd": "sleep 1; echo a > a", "outputs": { "a": "a" } }),
        "b": (kind: "command", inputs: { "a": "a.a" }, params: { "cmd": "sleep 1; cat inputs/a/a > b", "outputs": { "b": "b" } }),
    },
)"#);
    let spawn = || d.cmd(&["run", "pipelines/p.ron", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (x, y) = (spawn(), spawn());
    let (x, y) = (x.wait_with_output().unwrap(), y.wait_with_output().unwrap());
    assert!(x.status.success() && y.status.success());
    let rx: serde_json::Value = serde_json::from_slice(&x.stdout).unwrap();
    let ry: serde_json::Value = serde_json::from_slice(&y.stdout).unwrap();
    let mut ran: Vec<String> = with_status(&rx, "ran").into_iter().chain(with_status(&ry, "ran")).collect();
    ran.sort();
    assert_eq!(ran, ["a", "b"], "each stage ran once across both processes:\n{rx}\n{ry}");
    assert_eq!(with_status(&rx, "reused").len() + with_status(&ry, "reused").len(), 2);
    assert!(d.ok(&["verify"]).contains("0 corrupt"));
}

#[test]
fn a_stage_runs_in_another_process_from_its_key_alone() {
    let d = Dir::new();
    d.write("pipelines/c.ron", &chain(5, ""));
    let r = d.json(&["run", "pipelines/c.ron", "--json"]);
    let key = r["stages"].as_array().unwrap().iter().find(|s| s["name"] == "sum").unwrap()["key"].as_str().unwrap().to_string();
    let entry = d.path().join(".fgflow/entries").join(&key[..2]).join(format!("{}.json", &key[2..]));
    let before: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&entry).unwrap()).unwrap();
    std::fs::remove_file(&entry).unwrap();
    let out = d.ok(&["exec-job", &key]);
    assert!(out.contains("ran"), "{out}");
    let after: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&entry).unwrap()).unwrap();
    assert_eq!(before["outputs"], after["outputs"]);
}

#[test]
fn touched_but_unchanged_sources_are_rehashed_once_and_rerun_nothing() {
    let d = Dir::new();
    d.write("data/big.bin", &"x".repeat(1 << 20));
    d.write("pipelines/s.ron", r#"(
    stages: {
        "head": (kind: "command", params: { "cmd": "head -c 10 data/big.bin > h", "deps": ["../data/big.bin"], "outputs": { "h": "h" } }),
    },
)"#);
    // `deps` must stay inside the pipeline's directory.
    assert_eq!(d.run(&["run", "pipelines/s.ron"]).status.code(), Some(2));
    d.write("s.ron", r#"(
    stages: {
        "head": (kind: "command", params: { "cmd": "head -c 10 data/big.bin > h", "deps": ["data/big.bin"], "outputs": { "h": "h" } }),
    },
)"#);
    assert_eq!(with_status(&d.json(&["run", "s.ron", "--json"]), "ran"), ["head"]);
    let f = std::fs::File::options().write(true).open(d.path().join("data/big.bin")).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
    assert!(with_status(&d.json(&["run", "s.ron", "--json"]), "ran").is_empty());
    d.write("data/big.bin", &"y".repeat(1 << 20));
    assert_eq!(with_status(&d.json(&["run", "s.ron", "--json"]), "ran"), ["head"]);
}

/// The whole recipe, cold (about 8 minutes on 2 cores in release): `cargo test --release -- --ignored`.
#[test]
#[ignore = "heavy: trains a dozen models"]
fn the_whole_recipe_runs_end_to_end() {
    let d = Dir::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = root.join("pipelines/fgia.ron");
    let r = d.json(&["run", file.to_str().unwrap(), "--json"]);
    assert_eq!(r["summary"]["failed"], 0, "{r}");
    let again = d.json(&["run", file.to_str().unwrap(), "--json"]);
    assert_eq!(again["summary"]["ran"], 0, "a no-op re-run runs nothing");
    let show = d.ok(&["show", "ablation"]);
    assert!(show.contains("plain CE on noisy labels"), "{show}");
}

/// The key `status --json` gives a stage.
fn status_key(d: &Dir, pipeline: &str, stage: &str) -> String {
    let st = d.json(&["status", pipeline, "--json"]);
    st["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).unwrap()["key"].as_str().unwrap().to_string()
}

/// A cluster job's files as the Slurm executor leaves them per key (`tests/slurm.rs`
/// makes real ones): `<cache>/logs/<key>.log` and `.job` (id, then final state).
fn fake_job(d: &Dir, key: &str, id: u64, state: &str, log: &str) {
    let logs = d.path().join(".fgflow/logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join(format!("{key}.job")), format!("{id}\n{state}\n")).unwrap();
    std::fs::write(logs.join(format!("{key}.log")), log).unwrap();
}

#[test]
fn show_prints_the_job_log_of_a_stage_whose_cluster_job_failed() {
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        r#"( stages: {
        "ok": (kind: "command", params: { "cmd": "echo fine > o.txt", "outputs": { "o": "o.txt" } }),
        "bad": (kind: "command", params: { "cmd": "exit 3", "outputs": { "x": "x.txt" } }),
    })"#,
    );
    assert_eq!(d.run(&["run", "pipelines/p.ron"]).status.code(), Some(1));
    // Run locally, `bad` left no job: show says it has no result, as before.
    assert_eq!(d.run(&["show", "bad"]).status.code(), Some(2));
    let (bad, ok) = (status_key(&d, "pipelines/p.ron", "bad"), status_key(&d, "pipelines/p.ron", "ok"));
    let log: String = (1..=60).map(|i| format!("log line {i}\n")).collect();
    fake_job(&d, &bad, 77, "FAILED 3:0", &log);
    fake_job(&d, &ok, 76, "COMPLETED 0:0", "fgflow exec-job: stage `ok`\n");
    let s = d.ok(&["show", "bad"]);
    assert!(s.contains(&format!("key       {bad}  (no result: its last job did not write one)")), "{s}");
    assert!(s.contains("job       slurm job 77: FAILED (exit code 3)"), "{s}");
    assert!(s.contains(&format!("/.fgflow/logs/{bad}.log (last 40 line(s))")), "{s}");
    assert!(s.contains("  | log line 21\n") && s.contains("  | log line 60\n") && !s.contains("log line 20\n"), "the last 40 lines: {s}");
    let j = d.json(&["show", "bad", "--json"]);
    assert!(j["entry"].is_null(), "{j}");
    assert_eq!((j["attempt"]["id"].as_u64(), j["attempt"]["state"].as_str(), j["attempt"]["exit_code"].as_i64()), (Some(77), Some("FAILED"), Some(3)), "{j}");
    // The key from a failure message (no entry to resolve it by) finds the job too.
    assert!(d.ok(&["show", &bad[..12]]).contains("slurm job 77: FAILED"));
    // A job that has not ended (or whose run was interrupted) has no final state yet.
    fake_job(&d, &bad, 78, "", "started\n");
    assert!(d.ok(&["show", "bad"]).contains("slurm job 78 (no final state recorded"));
    // A stage with a result shows the job that made it under its outputs.
    let s = d.ok(&["show", "ok"]);
    assert!(s.contains("outputs") && s.contains("job       slurm job 76: COMPLETED") && s.contains("  | fgflow exec-job: stage `ok`"), "{s}");
    assert_eq!(d.json(&["show", "ok", "--json"])["job"]["id"], 76);
    // `export` of a stage without a result points at `show`.
    let o = d.run(&["export", "bad.x", "out"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("fgflow show bad"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn gc_cleans_job_logs_of_unkept_keys_and_leases_nobody_holds() {
    let d = Dir::new();
    d.write("pipelines/c.ron", &chain(3, ""));
    d.ok(&["run", "pipelines/c.ron"]);
    let kept = status_key(&d, "pipelines/c.ron", "sum");
    let gone = "ab".repeat(32);
    fake_job(&d, &kept, 1, "COMPLETED 0:0", "kept\n");
    fake_job(&d, &gone, 2, "FAILED 1:0", "gone\n");
    // A lease whose holder on this host has exited, and one a live process holds.
    let leases = d.path().join(".fgflow/leases");
    std::fs::create_dir_all(&leases).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let (dead_key, live_key) = ("cd".repeat(32), "ef".repeat(32));
    std::fs::write(leases.join(&dead_key), format!("host {host}\npid {dead}\n")).unwrap();
    std::fs::write(leases.join(&live_key), format!("host {host}\npid {}\n", std::process::id())).unwrap();
    let dry = d.ok(&["gc", "--grace", "0", "--dry-run"]);
    assert!(dry.contains("2 job log files, 1 leases (1 kept"), "{dry}");
    assert!(leases.join(&dead_key).exists(), "a dry run removes nothing");
    let out = d.ok(&["gc", "--grace", "0"]);
    assert!(out.contains("removed 0 entries") && out.contains("2 job log files, 1 leases (1 kept"), "{out}");
    let logs = d.path().join(".fgflow/logs");
    assert!(logs.join(format!("{kept}.log")).exists() && logs.join(format!("{kept}.job")).exists(), "the log of a kept result stays");
    assert!(!logs.join(format!("{gone}.log")).exists() && !logs.join(format!("{gone}.job")).exists());
    assert!(!leases.join(&dead_key).exists() && leases.join(&live_key).exists());
    // With a grace, nothing young goes.
    fake_job(&d, &gone, 2, "FAILED 1:0", "gone\n");
    d.ok(&["gc"]);
    assert!(logs.join(format!("{gone}.log")).exists());
}
