//! The soak suite: the binary under `kill -9` at random moments (command pipelines
//! and a training stage), concurrent runs on one cache with `gc` and `verify` in
//! between, every kind of damaged cache file, and a full disk (a 2 MiB tmpfs). After
//! each, `verify` must find nothing corrupt (or list the damage, then nothing) and a
//! resumed run must give exactly what a clean run gives: the same key for every stage,
//! the same output digests (`ls --json`) and the same exported bytes.
//!
//! Random choices (kill delays, garbage bytes) come from one seeded ChaCha stream per
//! test; the seed is printed and `FGFLOW_SOAK_SEED=N` replays another one. Timing still
//! varies from run to run (a kill lands wherever the process is at that moment), so the
//! assertions never depend on where a kill lands, only on what must hold wherever it
//! does.
//!
//! The disk-full test needs root (to mount a tmpfs); it is skipped with a printed reason
//! otherwise, unless `FGFLOW_REQUIRE_TMPFS=1` (set by `.ci/run`), which makes a failed
//! mount a failure.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::cli::{Dir, with_status};

const DEFAULT_SEED: u64 = 0x50a4_2026;
/// No single process of this suite may take longer (a hang is a failure, not a stuck CI).
const PROCESS_LIMIT: Duration = Duration::from_secs(300);

/// The seeded stream of one test, its seed printed so a failure can be replayed.
fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("FGFLOW_SOAK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    println!("soak {test}: seed {seed} (FGFLOW_SOAK_SEED)");
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(test.bytes().fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b))));
    r
}

/// A process started in the background, its output going to files (no pipe to fill).
struct Spawned {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    what: String,
}

static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn spawn(d: &Dir, args: &[&str]) -> Spawned {
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let logs = d.path().join("proc-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (out, err) = (logs.join(format!("{n}.out")), logs.join(format!("{n}.err")));
    let child = d.cmd(args).stdin(Stdio::null()).stdout(File::create(&out).unwrap()).stderr(File::create(&err).unwrap()).spawn().unwrap();
    Spawned { child, out, err, what: format!("fgflow {}", args.join(" ")) }
}

struct Finished {
    code: Option<i32>,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn text(&self) -> String {
        format!("exit {:?} ({})\n--- stdout\n{}\n--- stderr\n{}", self.code, self.status, tail(&self.stdout), tail(&self.stderr))
    }
}

fn tail(s: &str) -> &str {
    let cut = s.len().saturating_sub(4000);
    &s[s.ceil_char_boundary(cut)..]
}

impl Spawned {
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    fn finish(mut self) -> Finished {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > PROCESS_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("`{}` still running after {PROCESS_LIMIT:?}: a hang", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Finished {
            code: status.code(),
            status,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }
}

fn run_fg(d: &Dir, args: &[&str]) -> Finished {
    spawn(d, args).finish()
}

/// What a complete run produced: the key of each stage, the outputs (name -> tree
/// digest) recorded for each of those keys, and the bytes of the final output.
#[derive(Debug, PartialEq)]
struct Results {
    keys: BTreeMap<String, String>,
    outputs: BTreeMap<String, Value>,
    exported: Vec<u8>,
}

/// Outputs that record wall-clock measurements (the `train` kind's log holds images
/// per second), so that two clean runs differ there too: not compared.
const VOLATILE: &[(&str, &str)] = &[("train", "log")];

fn keys_of(report: &Value) -> Result<BTreeMap<String, String>, String> {
    let stages = report["stages"].as_array().ok_or_else(|| format!("no `stages` in the report: {report}"))?;
    stages
        .iter()
        .map(|s| match (s["name"].as_str(), s["key"].as_str()) {
            (Some(n), Some(k)) => Ok((n.to_string(), k.to_string())),
            _ => Err(format!("a stage without name or key: {s}")),
        })
        .collect()
}

/// `run --json` must exit 0; then the recorded outputs of every key and the exported
/// final output are read back.
fn run_to_completion(d: &Dir, pipeline: &str, final_output: &str) -> Result<Results, String> {
    let f = run_fg(d, &["run", pipeline, "--json", "-j", "2"]);
    if f.code != Some(0) {
        return Err(format!("run did not complete: {}", f.text()));
    }
    let report: Value = serde_json::from_str(&f.stdout).map_err(|e| format!("run --json: {e}: {}", f.text()))?;
    results_of(d, pipeline, &report, final_output)
}

fn results_of(d: &Dir, pipeline: &str, report: &Value, final_output: &str) -> Result<Results, String> {
    let keys = keys_of(report)?;
    let ls = run_fg(d, &["ls", "--json"]);
    if ls.code != Some(0) {
        return Err(format!("ls --json failed: {}", ls.text()));
    }
    let entries: Value = serde_json::from_str(&ls.stdout).map_err(|e| format!("ls --json: {e}: {}", ls.text()))?;
    let by_key: BTreeMap<String, &Value> =
        entries.as_array().ok_or("ls --json is not a list")?.iter().filter_map(|e| Some((e["key"].as_str()?.to_string(), e))).collect();
    let mut outputs = BTreeMap::new();
    for (stage, key) in &keys {
        let e = by_key.get(key).ok_or_else(|| format!("`ls` has no entry for {stage}'s key {key}"))?;
        let mut o = e["outputs"].clone();
        for (kind, output) in VOLATILE {
            if e["kind"] == *kind {
                o.as_object_mut().map(|m| m.remove(*output));
            }
        }
        outputs.insert(stage.clone(), o);
    }
    let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dest = d.path().join(format!("exported/{n}"));
    let ex = run_fg(d, &["export", final_output, dest.to_str().unwrap(), "-p", pipeline]);
    if ex.code != Some(0) {
        return Err(format!("export {final_output} failed: {}", ex.text()));
    }
    let exported = if dest.is_dir() {
        let mut all = Vec::new();
        let mut files: Vec<PathBuf> = walk(&dest);
        files.sort();
        for f in files {
            all.extend(std::fs::read(&f).unwrap());
        }
        all
    } else {
        std::fs::read(&dest).map_err(|e| format!("{}: {e}", dest.display()))?
    };
    Ok(Results { keys, outputs, exported })
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn same_results(got: &Results, want: &Results) -> Result<(), String> {
    if got.keys != want.keys {
        return Err(format!("keys differ from a clean run's:\n got  {:?}\n want {:?}", got.keys, want.keys));
    }
    if got.outputs != want.outputs {
        return Err(format!("outputs differ from a clean run's:\n got  {:?}\n want {:?}", got.outputs, want.outputs));
    }
    if got.exported != want.exported {
        return Err(format!(
            "exported bytes differ from a clean run's:\n got  {:?}\n want {:?}",
            String::from_utf8_lossy(&got.exported),
            String::from_utf8_lossy(&want.exported)
        ));
    }
    Ok(())
}

/// `verify` on an undamaged cache: exit 0, nothing reported.
fn verify_clean(d: &Dir) -> Result<(), String> {
    let v = run_fg(d, &["verify"]);
    if v.code == Some(0) { Ok(()) } else { Err(format!("verify is not clean: {}", v.text())) }
}

/// A fan-out/fan-in DAG of `command` stages: `src` (with a hashed dep) -> `w1..w5`
/// (directory outputs of different sizes) -> `join` (a list input) -> `fin`. `pace`
/// scales the sleeps (0: none); with `log`, each stage first appends a line to
/// `log/<stage>`, outside the cache (an absolute path in the command: the `command`
/// kind passes no other environment), so executions can be counted.
fn dag(salt: &str, pace: f64, log: Option<&Path>) -> String {
    let sleep = |secs: f64| if pace > 0.0 { format!("sleep {:.3}; ", secs * pace) } else { String::new() };
    let log = |stage: &str| log.map(|l| format!("echo x >> {}/{stage}; ", l.display())).unwrap_or_default();
    let mut s = String::from("(\n  stages: {\n");
    s += &format!(
        "    \"src\": (kind: \"command\", params: {{ \"cmd\": \"{}{}seq 1 300 > nums.txt; cat in.txt >> nums.txt; echo {salt} >> nums.txt\", \"deps\": [\"in.txt\"], \"outputs\": {{ \"nums\": \"nums.txt\" }} }}),\n",
        log("src"),
        sleep(0.15)
    );
    let width = 5;
    for k in 1..=width {
        s += &format!(
            "    \"w{k}\": (kind: \"command\", inputs: {{ \"n\": \"src.nums\" }}, params: {{ \"cmd\": \"{}{}mkdir -p d/sub; awk '{{s+=$1*{k}}} END {{print s}}' inputs/n/nums.txt > d/sum.txt; seq 1 {} > d/sub/big.txt\", \"outputs\": {{ \"d\": \"d\" }} }}),\n",
            log(&format!("w{k}")),
            sleep(0.05 * k as f64),
            3000 * k
        );
    }
    let parts: Vec<String> = (1..=width).map(|k| format!("\"w{k}.d\"")).collect();
    s += &format!(
        "    \"join\": (kind: \"command\", inputs: {{ \"parts\": [{}] }}, params: {{ \"cmd\": \"{}{}cat inputs/parts/*/sum.txt > all.txt; cat inputs/parts/*/sub/big.txt | wc -l >> all.txt\", \"outputs\": {{ \"all\": \"all.txt\" }} }}),\n",
        parts.join(", "),
        log("join"),
        sleep(0.15)
    );
    s += &format!(
        "    \"fin\": (kind: \"command\", inputs: {{ \"all\": \"join.all\" }}, params: {{ \"cmd\": \"{}{}sort -n inputs/all/all.txt > f.txt; echo salt {salt} >> f.txt\", \"outputs\": {{ \"f\": \"f.txt\" }} }}),\n",
        log("fin"),
        sleep(0.1)
    );
    s += "  },\n)\n";
    s
}

const DAG_STAGES: [&str; 8] = ["fin", "join", "src", "w1", "w2", "w3", "w4", "w5"];

fn write_dag(d: &Dir, salt: &str, pace: f64, log: Option<&Path>) -> &'static str {
    d.write("pipelines/in.txt", "a dep, hashed into src's key\n");
    d.write("pipelines/p.ron", &dag(salt, pace, log));
    "pipelines/p.ron"
}

/// Stages of `pipeline` that have no entry yet in `d`'s cache.
fn not_fresh(d: &Dir, pipeline: &str) -> Result<Vec<String>, String> {
    let f = run_fg(d, &["status", pipeline, "--json"]);
    if f.code != Some(0) {
        return Err(format!("status failed: {}", f.text()));
    }
    let v: Value = serde_json::from_str(&f.stdout).map_err(|e| format!("status --json: {e}: {}", f.text()))?;
    Ok(v["stages"].as_array().unwrap().iter().filter(|s| s["status"] != "fresh").map(|s| s["name"].as_str().unwrap().to_string()).collect())
}

/// Kill `run` with SIGKILL at random moments until `kills` of them landed while it was
/// running (or `max_attempts` were made), checking `verify` after each, then resume
/// and compare with `want`. The delay is drawn over what a clean run of the stages
/// still to do took (`durations`: stage -> seconds, `overhead`: the rest of a run).
#[allow(clippy::too_many_arguments)]
fn kill_and_resume(
    d: &Dir,
    pipeline: &str,
    final_output: &str,
    want: &Results,
    durations: &BTreeMap<String, f64>,
    overhead: f64,
    rng: &mut ChaCha8Rng,
    kills: usize,
    max_attempts: usize,
    log: &mut Vec<String>,
) -> Result<usize, String> {
    let total: f64 = durations.values().sum();
    let mut landed = 0;
    // The wall time of a whole run that ended before its kill: the clean run's durations
    // overestimate a run when the machine got less busy since (a CI run lost every kill
    // that way), so later windows are capped by what a run was seen to take.
    let mut seen_whole: Option<f64> = None;
    for attempt in 0..max_attempts {
        if landed >= kills {
            break;
        }
        let mut todo = not_fresh(d, pipeline)?;
        if todo.is_empty() {
            // A run finished before its kill: start again from an empty cache, so that
            // the next kills land inside a run.
            std::fs::remove_dir_all(d.path().join(".fgflow")).map_err(|e| format!("cannot empty the cache: {e}"))?;
            todo = not_fresh(d, pipeline)?;
        }
        let remaining: f64 = todo.iter().filter_map(|s| durations.get(s)).sum();
        let estimate = overhead + remaining.min(total);
        let window = seen_whole.map_or(estimate, |seen| estimate.min(seen));
        let delay = rng.random_range(0.05..0.9) * window;
        let started = Instant::now();
        let mut p = spawn(d, &["run", pipeline, "-j", "2"]);
        std::thread::sleep(Duration::from_secs_f64(delay));
        let was_running = p.running();
        if was_running {
            p.child.kill().unwrap();
            landed += 1;
        }
        let f = p.finish();
        if !was_running && todo.len() == durations.len() {
            let took = started.elapsed().as_secs_f64();
            seen_whole = Some(seen_whole.map_or(took, |seen| seen.min(took)));
        }
        log.push(format!("attempt {attempt}: kill after {delay:.3}s of ~{window:.2}s with {todo:?} to do: {}", if was_running { "killed" } else { "had finished" }));
        if !was_running && f.code != Some(0) {
            return Err(format!("a run that was not killed failed: {}", f.text()));
        }
        verify_clean(d).map_err(|e| format!("after attempt {attempt} (kill after {delay:.3}s, {todo:?} to do): {e}"))?;
    }
    let got = run_to_completion(d, pipeline, final_output).map_err(|e| format!("resuming after {landed} kills: {e}"))?;
    same_results(&got, want).map_err(|e| format!("resumed after {landed} kills: {e}"))?;
    verify_clean(d).map_err(|e| format!("after the resumed run: {e}"))?;
    // What the killed runs left behind (temp files, unreferenced blobs) is gc's; it must
    // keep everything the last run reached.
    let gc = run_fg(d, &["gc", "--grace", "0"]);
    if gc.code != Some(0) {
        return Err(format!("gc after {landed} kills: {}", gc.text()));
    }
    let again = run_fg(d, &["run", pipeline, "--json", "-j", "2"]);
    let reran = serde_json::from_str::<Value>(&again.stdout).map(|r| with_status(&r, "ran")).map_err(|e| format!("{e}: {}", again.text()))?;
    if again.code != Some(0) || !reran.is_empty() {
        return Err(format!("a run after gc re-ran {reran:?}: gc removed what the last run reached: {}", again.text()));
    }
    verify_clean(d).map_err(|e| format!("after gc: {e}"))?;
    Ok(landed)
}

/// Stage -> seconds, from the entries of a clean run.
fn durations(d: &Dir, keys: &BTreeMap<String, String>) -> BTreeMap<String, f64> {
    let entries: Value = serde_json::from_str(&run_fg(d, &["ls", "--json"]).stdout).unwrap();
    let ms: BTreeMap<&str, f64> = entries.as_array().unwrap().iter().map(|e| (e["key"].as_str().unwrap(), e["duration_ms"].as_f64().unwrap_or(0.0))).collect();
    keys.iter().map(|(s, k)| (s.clone(), ms.get(k.as_str()).copied().unwrap_or(0.0) / 1000.0)).collect()
}

#[test]
fn soak_kill_9_during_command_pipelines_then_verify_and_resume() {
    let mut rng = rng("kill_command");
    let started = Instant::now();
    let d = Dir::new();
    let (mut landed, mut rounds) = (0, 0);
    let mut log = Vec::new();
    // New salt each round: every stage has work to do again. Rounds go on until 25
    // kills landed while a run was going (a kill after the run finished does not count).
    while landed < 25 && rounds < 12 {
        let salt = format!("round{rounds}");
        let clean = Dir::new();
        let p = write_dag(&clean, &salt, 1.0, None);
        let t = Instant::now();
        let want = run_to_completion(&clean, p, "fin.f").unwrap();
        let wall = t.elapsed().as_secs_f64();
        let durs = durations(&clean, &want.keys);
        // With two workers the stages overlap: scale the sum to the measured wall time.
        let sum: f64 = durs.values().sum();
        let durs: BTreeMap<String, f64> = durs.into_iter().map(|(s, x)| (s, x * (wall / sum.max(1e-3)).min(1.0))).collect();
        write_dag(&d, &salt, 1.0, None);
        log.push(format!("round {rounds}: a clean run takes {wall:.2}s"));
        let n = kill_and_resume(&d, p, "fin.f", &want, &durs, 0.05, &mut rng, 5, 8, &mut log).unwrap_or_else(|e| panic!("round {rounds}: {e}\n{}", log.join("\n")));
        landed += n;
        rounds += 1;
    }
    println!("{}", log.join("\n"));
    println!("soak kill_command: {landed} kills landed during runs in {rounds} rounds, {:.1}s", started.elapsed().as_secs_f64());
    assert!(landed >= 20, "only {landed} kills landed while a run was going: the soak did not soak\n{}", log.join("\n"));
}

/// A tiny benchmark and a tiny CNN (16 epochs of 10 classes, about a second of
/// training with the CPU kernels; 4 epochs took that long before them, and 0.3 s left
/// too short a window for the kills to land), killed during training.
fn training_pipeline() -> String {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    format!(
        r#"(
  stages: {{
    "bench": (kind: "quickdraw", params: {{ "root": "{}", "seed": 3, "classes": 10, "train_max": 80, "val_per_class": 5, "testa_per_class": 5, "testb_per_class": 5 }}),
    "train": (kind: "train", inputs: {{ "train": "bench.train", "val": "bench.val" }}, params: {{
      "cnn_widths": [8, 16], "cnn_blocks": 1, "epochs": 16, "batch_size": 32, "lr": 0.003, "seed": 1, "keep_checkpoints": 1,
    }}),
    "predict": (kind: "predict", inputs: {{ "model": "train.model", "labelled": "bench.val" }}),
  }},
)
"#,
        data.display()
    )
}

#[test]
fn soak_kill_9_during_training_then_verify_and_resume() {
    let mut rng = rng("kill_training");
    let started = Instant::now();
    let clean = Dir::new();
    let p = "pipelines/t.ron";
    clean.write(p, &training_pipeline());
    let t = Instant::now();
    let want = run_to_completion(&clean, p, "predict.predictions").unwrap();
    let wall = t.elapsed().as_secs_f64();
    let durs = durations(&clean, &want.keys);
    let overhead = (wall - durs.values().sum::<f64>()).max(0.05);
    let d = Dir::new();
    d.write(p, &training_pipeline());
    let mut log = vec![format!("a clean run takes {wall:.2}s: {durs:?}")];
    let landed = kill_and_resume(&d, p, "predict.predictions", &want, &durs, overhead, &mut rng, 5, 12, &mut log).unwrap_or_else(|e| panic!("{e}\n{}", log.join("\n")));
    println!("{}", log.join("\n"));
    println!("soak kill_training: {landed} kills landed in {:.1}s", started.elapsed().as_secs_f64());
    assert!(landed >= 4, "only {landed} kills landed while a run was going\n{}", log.join("\n"));
}

/// N runs of one pipeline started together on one cache: every stage executes exactly
/// once (counted by the stages themselves), every run exits 0 with the same keys.
fn concurrent_runs(n: usize) -> Result<(), String> {
    let d = Dir::new();
    let logdir = d.path().join("stage-log");
    std::fs::create_dir_all(&logdir).unwrap();
    let p = write_dag(&d, &format!("concurrent{n}"), 0.5, Some(&logdir));
    let procs: Vec<Spawned> = (0..n).map(|_| spawn(&d, &["run", p, "--json", "-j", "2"])).collect();
    let done: Vec<Finished> = procs.into_iter().map(Spawned::finish).collect();
    let mut reports = Vec::new();
    for (i, f) in done.iter().enumerate() {
        if f.code != Some(0) {
            return Err(format!("run {i} of {n}: {}", f.text()));
        }
        reports.push(serde_json::from_str::<Value>(&f.stdout).map_err(|e| format!("run {i}: {e}: {}", f.text()))?);
    }
    let keys: Vec<_> = reports.iter().map(keys_of).collect::<Result<_, _>>()?;
    if keys.iter().any(|k| k != &keys[0]) {
        return Err(format!("{n} concurrent runs got different keys: {keys:?}"));
    }
    let mut ran: Vec<String> = reports.iter().flat_map(|r| with_status(r, "ran")).collect();
    ran.sort();
    let executed: BTreeMap<String, usize> =
        DAG_STAGES.iter().map(|s| (s.to_string(), std::fs::read_to_string(logdir.join(s)).map(|t| t.lines().count()).unwrap_or(0))).collect();
    if executed.values().any(|&c| c != 1) || ran != DAG_STAGES {
        return Err(format!("{n} concurrent runs: executions per stage {executed:?}; reported as ran: {ran:?}"));
    }
    verify_clean(&d)
}

#[test]
fn soak_concurrent_runs_execute_each_stage_once() {
    let _ = rng("concurrent");
    let started = Instant::now();
    let mut failures = Vec::new();
    for n in [2, 4] {
        if let Err(e) = concurrent_runs(n) {
            failures.push(e);
        }
    }
    println!("soak concurrent: {:.1}s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn soak_gc_and_verify_while_runs_are_in_progress() {
    let mut rng = rng("gc_verify_during_runs");
    let started = Instant::now();
    let d = Dir::new();
    let logdir = d.path().join("stage-log");
    // A first pipeline version, so that gc has something unreachable to remove.
    let p = write_dag(&d, "before", 0.0, None);
    run_to_completion(&d, p, "fin.f").unwrap();
    std::fs::create_dir_all(&logdir).unwrap();
    write_dag(&d, "during", 0.5, Some(&logdir));
    // The clean reference logs elsewhere, so its keys differ: compare the exported bytes
    // and the executions per stage, and the keys across the soak's own runs.
    let clean = Dir::new();
    let clean_log = clean.path().join("stage-log");
    std::fs::create_dir_all(&clean_log).unwrap();
    write_dag(&clean, "during", 0.5, Some(&clean_log));
    let mut runs = Vec::new();
    let mut maintenance = Vec::new();
    for i in 0..3 {
        runs.push(spawn(&d, &["run", p, "--json", "-j", "2"]));
        std::thread::sleep(Duration::from_millis(rng.random_range(50..250)));
        maintenance.push(spawn(&d, if i % 2 == 0 { &["gc", "--grace", "0"] } else { &["verify"] }));
        std::thread::sleep(Duration::from_millis(rng.random_range(50..250)));
    }
    let mut extra = 0;
    while runs.iter_mut().any(Spawned::running) && extra < 6 {
        let m = spawn(&d, if extra % 2 == 0 { &["verify"] } else { &["gc", "--grace", "0"] });
        maintenance.push(m);
        extra += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
    }
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for (i, r) in runs.into_iter().enumerate() {
        let f = r.finish();
        if f.code == Some(0) {
            match serde_json::from_str::<Value>(&f.stdout) {
                Ok(v) => reports.push(v),
                Err(e) => failures.push(format!("run {i}: {e}: {}", f.text())),
            }
        } else {
            failures.push(format!("run {i} with gc/verify around it: {}", f.text()));
        }
    }
    for m in maintenance {
        let what = m.what.clone();
        let f = m.finish();
        if f.code != Some(0) {
            failures.push(format!("`{what}` during runs: {}", f.text()));
        }
    }
    let keys: Vec<_> = reports.iter().filter_map(|r| keys_of(r).ok()).collect();
    if keys.iter().any(|k| k != &keys[0]) {
        failures.push(format!("runs got different keys: {keys:?}"));
    }
    let executed: BTreeMap<String, usize> =
        DAG_STAGES.iter().map(|s| (s.to_string(), std::fs::read_to_string(logdir.join(s)).map(|t| t.lines().count()).unwrap_or(0))).collect();
    if executed.values().any(|&c| c != 1) {
        failures.push(format!("executions per stage: {executed:?}"));
    }
    if let Err(e) = verify_clean(&d) {
        failures.push(format!("afterwards: {e}"));
    }
    match run_to_completion(&d, p, "fin.f") {
        Ok(got) => {
            if !with_status_all_reused(&d, p) {
                failures.push("a later run re-ran stages: gc removed entries of the pipeline's last run".into());
            }
            let want = run_to_completion(&clean, p, "fin.f").unwrap();
            if got.exported != want.exported {
                failures.push(format!("final output differs from a clean run: {:?} vs {:?}", String::from_utf8_lossy(&got.exported), String::from_utf8_lossy(&want.exported)));
            }
        }
        Err(e) => failures.push(format!("a later run: {e}")),
    }
    println!("soak gc_verify_during_runs: {:.1}s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn with_status_all_reused(d: &Dir, p: &str) -> bool {
    let f = run_fg(d, &["run", p, "--json"]);
    serde_json::from_str::<Value>(&f.stdout).map(|r| with_status(&r, "ran").is_empty()).unwrap_or(false)
}

// ---------------------------------------------------------------------------------
// Damaged cache files.

fn hex_path(root: &Path, dir: &str, hex: &str, ext: &str) -> PathBuf {
    root.join(dir).join(&hex[..2]).join(format!("{}{ext}", &hex[2..]))
}

fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(p) {
        let mut perm = m.permissions();
        perm.set_mode(perm.mode() | 0o200);
        let _ = std::fs::set_permissions(p, perm);
    }
}

fn overwrite(p: &Path, bytes: &[u8]) {
    make_writable(p);
    std::fs::write(p, bytes).unwrap_or_else(|e| panic!("damaging {}: {e}", p.display()));
}

fn garbage(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n).map(|_| rng.random_range(0..=255u8)).collect();
    // Make sure it is not valid UTF-8 (and so not valid JSON either).
    v[0] = 0xff;
    v
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Damage {
    EntryTruncated,
    EntryEmpty,
    EntryGarbage,
    EntryWrongShapeList,
    EntryWrongShapeFields,
    EntryNamesMissingTree,
    EntryCopiedOverAnother,
    BlobGarbage,
    BlobSameSizeGarbage,
    BlobMissing,
    BlobBecameDirectory,
    TreeManifestGarbage,
    ForgedTreeEscapes,
    RefsGarbage,
    StatCacheGarbage,
    JobDocGarbage,
}

const ALL_DAMAGE: [Damage; 16] = [
    Damage::EntryTruncated,
    Damage::EntryEmpty,
    Damage::EntryGarbage,
    Damage::EntryWrongShapeList,
    Damage::EntryWrongShapeFields,
    Damage::EntryNamesMissingTree,
    Damage::EntryCopiedOverAnother,
    Damage::BlobGarbage,
    Damage::BlobSameSizeGarbage,
    Damage::BlobMissing,
    Damage::BlobBecameDirectory,
    Damage::TreeManifestGarbage,
    Damage::ForgedTreeEscapes,
    Damage::RefsGarbage,
    Damage::StatCacheGarbage,
    Damage::JobDocGarbage,
];

impl Damage {
    /// A `run` straight after the damage (no `verify` first) must still complete with
    /// the right results: an unreadable record is treated as missing. The others (a
    /// blob whose bytes changed) are `verify`'s to find: there `run` must only never
    /// give a wrong result with exit 0.
    fn run_must_recover(self) -> bool {
        !matches!(self, Damage::BlobGarbage | Damage::BlobSameSizeGarbage | Damage::BlobMissing | Damage::BlobBecameDirectory | Damage::TreeManifestGarbage)
    }
}

/// Where the damage was done, and what `verify` should mention: any of `mention`, each
/// a `|`-separated list of the ways a digest may be printed.
struct Done {
    what: String,
    mention: Vec<String>,
    /// Files a forged manifest points at, outside the cache: must never appear.
    escapes: Vec<PathBuf>,
}

fn entry_json(d: &Dir, key: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(hex_path(&d.path().join(".fgflow"), "entries", key, ".json")).unwrap()).unwrap()
}

fn tree_of(d: &Dir, tree_hex: &str) -> Value {
    serde_json::from_slice(&std::fs::read(hex_path(&d.path().join(".fgflow"), "blobs", tree_hex, "")).unwrap()).unwrap()
}

fn damage(d: &Dir, kind: Damage, keys: &BTreeMap<String, String>, rng: &mut ChaCha8Rng) -> Done {
    let cache = d.path().join(".fgflow");
    let key = &keys["join"];
    let entry = hex_path(&cache, "entries", key, ".json");
    // A digest as verify may print it: whole, short, or as its sharded path.
    let short = |h: &str| format!("{}|{}/{}", &h[..12], &h[..2], &h[2..12]);
    let e = entry_json(d, key);
    let tree_hex = e["outputs"]["all"].as_str().unwrap().to_string();
    let file_hex = tree_of(d, &tree_hex)["files"][0]["digest"].as_str().unwrap().to_string();
    let blob = hex_path(&cache, "blobs", &file_hex, "");
    let done = |what: &str, mention: Vec<String>| Done { what: what.to_string(), mention, escapes: Vec::new() };
    match kind {
        Damage::EntryTruncated => {
            let bytes = std::fs::read(&entry).unwrap();
            overwrite(&entry, &bytes[..bytes.len() / 2]);
            done("join's entry truncated to half", vec![short(key)])
        }
        Damage::EntryEmpty => {
            overwrite(&entry, b"");
            done("join's entry emptied", vec![short(key)])
        }
        Damage::EntryGarbage => {
            overwrite(&entry, &garbage(rng, 300));
            done("join's entry replaced by garbage", vec![short(key)])
        }
        Damage::EntryWrongShapeList => {
            overwrite(&entry, b"[1, 2, 3]\n");
            done("join's entry replaced by a JSON list", vec![short(key)])
        }
        Damage::EntryWrongShapeFields => {
            overwrite(&entry, format!("{{\"key\": \"{key}\", \"stage\": 7, \"outputs\": \"nope\"}}\n").as_bytes());
            done("join's entry with fields of the wrong types", vec![short(key)])
        }
        Damage::EntryNamesMissingTree => {
            let mut e = e.clone();
            e["outputs"]["all"] = Value::String("ab".repeat(32));
            overwrite(&entry, serde_json::to_string_pretty(&e).unwrap().as_bytes());
            done("join's entry names a tree that is not in the cache", vec![short(key)])
        }
        Damage::EntryCopiedOverAnother => {
            let other = hex_path(&cache, "entries", &keys["w1"], ".json");
            let w2 = hex_path(&cache, "entries", &keys["w2"], ".json");
            overwrite(&w2, &std::fs::read(other).unwrap());
            done("w1's entry copied over w2's", vec![short(&keys["w2"])])
        }
        Damage::BlobGarbage => {
            overwrite(&blob, &garbage(rng, 100));
            done("the blob of join's all.txt replaced by garbage", vec![short(&file_hex), short(key)])
        }
        Damage::BlobSameSizeGarbage => {
            let n = std::fs::metadata(&blob).unwrap().len() as usize;
            overwrite(&blob, &garbage(rng, n.max(1)));
            done("the blob of join's all.txt replaced by garbage of the same size", vec![short(&file_hex), short(key)])
        }
        Damage::BlobMissing => {
            std::fs::remove_file(&blob).unwrap();
            done("the blob of join's all.txt deleted", vec![short(&file_hex), short(key)])
        }
        Damage::BlobBecameDirectory => {
            std::fs::remove_file(&blob).unwrap();
            std::fs::create_dir(&blob).unwrap();
            std::fs::write(blob.join("inside"), b"x").unwrap();
            done("the blob path of join's all.txt replaced by a directory", vec![short(&file_hex), short(key)])
        }
        Damage::TreeManifestGarbage => {
            let tree = hex_path(&cache, "blobs", &tree_hex, "");
            overwrite(&tree, b"{\"files\": 12}");
            done("join's tree manifest replaced by JSON of the wrong shape", vec![short(&tree_hex), short(key)])
        }
        Damage::ForgedTreeEscapes => {
            // A well-formed manifest, stored under its true digest (so the blob itself is
            // "valid"), whose paths leave the directory they are laid out in; src's entry
            // is pointed at it, as anyone who can write a shared cache could do.
            let src_key = &keys["src"];
            let src_entry_path = hex_path(&cache, "entries", src_key, ".json");
            let mut src_entry = entry_json(d, src_key);
            let nums_tree = tree_of(d, src_entry["outputs"]["nums"].as_str().unwrap());
            let real = nums_tree["files"][0].clone();
            let escape = d.path().join("escape");
            let rel = escape.strip_prefix("/").unwrap().display().to_string();
            let mut files = vec![
                serde_json::json!({"path": format!("{}{rel}/dotdot.txt", "../".repeat(40)), "digest": real["digest"], "size": real["size"]}),
                serde_json::json!({"path": escape.join("absolute.txt").display().to_string(), "digest": real["digest"], "size": real["size"]}),
                real.clone(),
            ];
            files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            let manifest = serde_json::to_vec(&serde_json::json!({ "files": files })).unwrap();
            let forged = fgflow_cache::Digest::of_bytes(&manifest).to_hex();
            let forged_path = hex_path(&cache, "blobs", &forged, "");
            std::fs::create_dir_all(forged_path.parent().unwrap()).unwrap();
            std::fs::write(&forged_path, &manifest).unwrap();
            src_entry["outputs"]["nums"] = Value::String(forged.clone());
            overwrite(&src_entry_path, serde_json::to_string_pretty(&src_entry).unwrap().as_bytes());
            Done {
                what: "src's entry points at a forged manifest with `../../..` and absolute paths".into(),
                mention: vec![short(&forged), short(src_key)],
                escapes: vec![escape.join("dotdot.txt"), escape.join("absolute.txt")],
            }
        }
        Damage::RefsGarbage => {
            let refs = walk(&cache.join("refs"));
            assert!(!refs.is_empty(), "a run leaves refs");
            for r in &refs {
                overwrite(r, &garbage(rng, 200));
            }
            done("every refs file replaced by garbage", refs.iter().map(|r| r.file_stem().unwrap().to_string_lossy().chars().take(12).collect()).chain(["refs".to_string()]).collect())
        }
        Damage::StatCacheGarbage => {
            let p = cache.join("stat-cache.json");
            assert!(p.is_file(), "src's dep goes through the stat cache");
            overwrite(&p, &garbage(rng, 200));
            done("stat-cache.json replaced by garbage", vec!["stat-cache".into(), "stat cache".into()])
        }
        Damage::JobDocGarbage => {
            let jobs: Vec<PathBuf> = walk(&cache.join("jobs")).into_iter().filter(|p| p.to_string_lossy().contains(&key[2..])).collect();
            assert_eq!(jobs.len(), 1, "one job document for join's key: {:?}", walk(&cache.join("jobs")));
            overwrite(&jobs[0], &garbage(rng, 200));
            done("join's job document replaced by garbage", vec![short(key), "jobs".into()])
        }
    }
}

fn escaped(done: &Done) -> Vec<String> {
    done.escapes.iter().filter(|p| p.exists()).map(|p| format!("{} was written outside the cache", p.display())).collect()
}

/// Damage, then `verify` (exit 1, names the damage), `verify` again (exit 0), `run`
/// (the clean run's results).
fn damage_then_verify(kind: Damage, rng: &mut ChaCha8Rng) -> Vec<String> {
    let d = Dir::new();
    let p = write_dag(&d, "damage", 0.0, None);
    let want = run_to_completion(&d, p, "fin.f").unwrap();
    let done = damage(&d, kind, &want.keys, rng);
    let mut fails = Vec::new();
    let v = run_fg(&d, &["verify"]);
    let all = format!("{}{}", v.stdout, v.stderr).to_lowercase();
    if v.code != Some(1) {
        fails.push(format!("verify after damage should exit 1: {}", v.text()));
    } else if !done.mention.iter().flat_map(|m| m.split('|')).any(|m| all.contains(&m.to_lowercase())) {
        fails.push(format!("verify exits 1 but does not name the damage (any of {:?}): {}", done.mention, v.text()));
    }
    let v2 = run_fg(&d, &["verify"]);
    if v2.code != Some(0) {
        fails.push(format!("a second verify should exit 0: {}", v2.text()));
    }
    match run_to_completion(&d, p, "fin.f") {
        Ok(got) => {
            if let Err(e) = same_results(&got, &want) {
                fails.push(format!("run after verify exits 0 with a WRONG result: {e}"));
            }
        }
        Err(e) => fails.push(format!("run after verify: {e}")),
    }
    fails.extend(escaped(&done));
    fails.into_iter().map(|f| format!("[{kind:?}, then verify] {}: {f}", done.what)).collect()
}

/// Damage, then `run` straight away (and `export`): never a wrong result with exit 0,
/// never a crash, nothing written outside the cache; unreadable records re-run.
fn damage_then_run(kind: Damage, rng: &mut ChaCha8Rng) -> Vec<String> {
    let d = Dir::new();
    let p = write_dag(&d, "damage", 0.0, None);
    let want = run_to_completion(&d, p, "fin.f").unwrap();
    let done = damage(&d, kind, &want.keys, rng);
    let mut fails = Vec::new();
    let f = run_fg(&d, &["run", p, "--json", "-j", "2"]);
    match f.code {
        Some(0) => match serde_json::from_str::<Value>(&f.stdout).map_err(|e| e.to_string()).and_then(|r| results_of(&d, p, &r, "fin.f")) {
            Ok(got) => {
                if let Err(e) = same_results(&got, &want) {
                    fails.push(format!("run exits 0 with a WRONG result: {e}"));
                }
            }
            Err(e) => fails.push(format!("run exits 0 but its results cannot be read back: {e}")),
        },
        Some(1) if !kind.run_must_recover() => {}
        _ => fails.push(format!(
            "run should {}: {}",
            if kind.run_must_recover() { "treat the unreadable record as missing and complete" } else { "exit 0 or 1" },
            f.text()
        )),
    }
    if kind == Damage::ForgedTreeEscapes {
        let out = d.path().join("exported-forged");
        let ex = run_fg(&d, &["export", "src.nums", out.to_str().unwrap(), "-p", p]);
        if !matches!(ex.code, Some(0..=2)) {
            fails.push(format!("export of the forged tree crashed: {}", ex.text()));
        }
    }
    fails.extend(escaped(&done));
    fails.into_iter().map(|f| format!("[{kind:?}, then run] {}: {f}", done.what)).collect()
}

#[test]
fn soak_every_kind_of_damaged_cache_file() {
    let mut rng = rng("damage");
    let started = Instant::now();
    let mut failures = Vec::new();
    for kind in ALL_DAMAGE {
        failures.extend(damage_then_verify(kind, &mut rng));
        failures.extend(damage_then_run(kind, &mut rng));
    }
    println!("soak damage: {} kinds, {:.1}s", ALL_DAMAGE.len(), started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} failures over {} kinds of damage:\n{}", failures.len(), ALL_DAMAGE.len(), failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------
// A full disk.

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::process::Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        if uid != "0" {
            return Err(format!("not root (uid {uid:?}): cannot mount a tmpfs"));
        }
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let o = std::process::Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(self.path()).output().unwrap();
        assert!(o.status.success(), "remount: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Bytes free, from `stat -f`.
    fn free(&self) -> u64 {
        let o = std::process::Command::new("stat").args(["-f", "-c", "%a %S"]).arg(self.path()).output().unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.path()).status();
    }
}

fn fill_pipeline(bytes: u64) -> String {
    format!(
        r#"(
  stages: {{
    "fill": (kind: "command", params: {{ "cmd": "head -c {bytes} /dev/zero > big.bin; echo wrote {bytes}", "outputs": {{ "big": "big.bin" }} }}),
    "count": (kind: "command", inputs: {{ "big": "fill.big" }}, params: {{ "cmd": "wc -c < inputs/big/big.bin > n.txt", "outputs": {{ "n": "n.txt" }} }}),
  }},
)
"#
    )
}

/// One attempt on a nearly full disk: exit 0 (it fitted: right results) or exit 1 with
/// a message about space; `verify` clean either way; after growing the disk, a run
/// completes with the clean run's results.
fn full_disk_attempt(fs: &Tmpfs, bytes: u64, must_fail: bool) -> Vec<String> {
    let mut fails = Vec::new();
    let clean = Dir::new();
    let p = "pipelines/fill.ron";
    clean.write(p, &fill_pipeline(bytes));
    let want = run_to_completion(&clean, p, "count.n").unwrap();
    let d = Dir::new();
    d.write(p, &fill_pipeline(bytes));
    let cache = fs.path().join("cache");
    let cache_s = cache.to_str().unwrap().to_string();
    let with_cache = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).chain(["--cache-dir".to_string(), cache_s.clone()]).collect() };
    let run = |args: &[&str]| {
        let a = with_cache(args);
        run_fg(&d, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let f = run(&["run", p, "-j", "1"]);
    let msg = format!("{}{}", f.stdout, f.stderr).to_lowercase();
    let said = msg.lines().find(|l| l.contains("space")).unwrap_or("").trim().chars().take(160).collect::<String>();
    println!("soak disk_full: {bytes} bytes on {} free: exit {:?} {said}", fs.free(), f.code);
    match f.code {
        Some(0) if !must_fail => {}
        Some(1) if msg.contains("no space") => {}
        _ => fails.push(format!("{bytes} bytes on a {} byte disk: should exit 1 with a message about space: {}", fs.free(), f.text())),
    }
    let v = run(&["verify"]);
    if v.code != Some(0) {
        fails.push(format!("{bytes} bytes: verify after the full disk: {}", v.text()));
    }
    fs.resize("64m");
    let f = run(&["run", p, "--json", "-j", "1"]);
    if f.code != Some(0) {
        fails.push(format!("{bytes} bytes: the run with space again: {}", f.text()));
    } else {
        let keys = serde_json::from_str::<Value>(&f.stdout).map_err(|e| e.to_string()).and_then(|r| keys_of(&r));
        if keys.as_ref() != Ok(&want.keys) {
            fails.push(format!("{bytes} bytes: keys after the full disk {keys:?}, clean run {:?}", want.keys));
        }
        let n = cache.with_file_name("n.txt");
        let ex = run(&["export", "count.n", n.to_str().unwrap(), "-p", p]);
        if ex.code != Some(0) || std::fs::read(&n).ok() != Some(want.exported.clone()) {
            fails.push(format!("{bytes} bytes: exported count differs: {} vs {:?}", ex.text(), String::from_utf8_lossy(&want.exported)));
        }
        let _ = std::fs::remove_file(&n);
    }
    let v = run(&["verify"]);
    if v.code != Some(0) {
        fails.push(format!("{bytes} bytes: verify at the end: {}", v.text()));
    }
    std::fs::remove_dir_all(&cache).unwrap();
    fs.resize("2m");
    fails
}

#[test]
fn soak_disk_full_fails_cleanly_and_recovers() {
    let _ = rng("disk_full");
    let fs = match Tmpfs::mount("2m") {
        Ok(fs) => fs,
        Err(why) => {
            let required = std::env::var("FGFLOW_REQUIRE_TMPFS").is_ok_and(|v| v == "1");
            assert!(!required, "FGFLOW_REQUIRE_TMPFS=1 but no tmpfs: {why}");
            println!("soak disk_full: SKIPPED: {why} (set FGFLOW_REQUIRE_TMPFS=1 to make this a failure)");
            return;
        }
    };
    let started = Instant::now();
    let free = fs.free();
    let mut failures = Vec::new();
    // Far too big: the command itself hits ENOSPC.
    failures.extend(full_disk_attempt(&fs, 3 << 20, true));
    // Just under, at and just over the space left once the cache's own files are there:
    // the command succeeds and fgflow's own writes (log, manifest, entry, refs, an input
    // copy) are what runs out of space.
    for slack in [64 << 10, 16 << 10, 8 << 10, 4 << 10, 0] {
        failures.extend(full_disk_attempt(&fs, free.saturating_sub(slack + (8 << 10)), false));
    }
    println!("soak disk_full: {:.1}s on a {free} byte tmpfs", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
