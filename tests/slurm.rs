//! `--executor slurm` on a real Slurm (no fake `sbatch`): same keys and output digests
//! as a local run, a failing job's exit code and log (in the run's output, its job
//! state lines, and `show`), a job past its time limit, light kinds kept local, and
//! Ctrl-C cancelling the submitted jobs with the cache left consistent. Skipped, with
//! the reason printed, where Slurm is not usable; `FGFLOW_REQUIRE_SLURM=1` (set by
//! `.ci/run`) turns the skip into a failure.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{Dir, with_status};

/// Whether a Slurm cluster answers here; says why not (uncaptured) when it does not.
fn slurm(test: &str) -> bool {
    let works = |prog: &str, args: &[&str]| Command::new(prog).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let why = if !works("sbatch", &["--version"]) {
        "`sbatch` is not on PATH"
    } else if !works("sinfo", &["-h"]) {
        "`sinfo` cannot reach a Slurm controller"
    } else {
        return true;
    };
    if std::env::var("FGFLOW_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
        panic!("{test}: FGFLOW_REQUIRE_SLURM=1 but {why}");
    }
    // Written past the test harness's capture, so a skip is never silent.
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why} (set FGFLOW_REQUIRE_SLURM=1 to fail instead)");
    false
}

/// Jobs ask for little memory: a job without `--mem` gets the whole node.
const EXECUTOR: &str = r#"executor: Slurm(mem: "100M", time: "00:10:00"),"#;

fn pipeline(executor: &str) -> String {
    format!(
        r#"(
    {executor}
    stages: {{
        "gen": (kind: "command", params: {{ "cmd": "seq 1 100 > nums.txt", "outputs": {{ "nums": "nums.txt" }} }}),
        "sum": (kind: "command", inputs: {{ "nums": "gen.nums" }}, params: {{ "cmd": "awk '{{s+=$1}} END {{print s}}' inputs/nums/nums.txt > sum.txt", "outputs": {{ "sum": "sum.txt" }} }}),
        "odd": (kind: "command", inputs: {{ "nums": "gen.nums" }}, params: {{ "cmd": "awk '$1 % 2' inputs/nums/nums.txt > odd.txt", "outputs": {{ "odd": "odd.txt" }} }}),
        "both": (kind: "command", inputs: {{ "sum": "sum.sum", "odd": "odd.odd" }}, params: {{ "cmd": "cat inputs/sum/sum.txt inputs/odd/odd.txt > both.txt", "outputs": {{ "both": "both.txt" }} }}),
        "report": (kind: "command", local: true, inputs: {{ "both": "both.both" }}, params: {{ "cmd": "wc -l < inputs/both/both.txt > n.txt", "outputs": {{ "n": "n.txt" }} }}),
    }},
)"#
    )
}

/// Stage -> (key, outputs) of a `run --json` report, outputs read back with `show`.
fn results(d: &Dir, report: &serde_json::Value) -> BTreeMap<String, (String, serde_json::Value)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let key = s["key"].as_str().unwrap().to_string();
            let shown = d.json(&["show", &key, "--json"]);
            (s["name"].as_str().unwrap().to_string(), (key, shown["entry"]["outputs"].clone()))
        })
        .collect()
}

fn job_ids(d: &Dir) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(d.path().join(".fgflow/logs")) else { return vec![] };
    // `<key>.job`: the job id, then (once it ended) its final state.
    rd.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".job")).filter_map(|e| std::fs::read_to_string(e.path()).ok()?.lines().next()?.trim().parse().ok()).collect()
}

fn job_states(ids: &[u64]) -> BTreeMap<u64, String> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new("squeue").args(["-h", "-t", "all", "-o", "%i|%T", "-j", &list]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_once('|')).filter_map(|(i, s)| Some((i.trim().parse().ok()?, s.trim().to_string()))).collect()
}

#[test]
fn slurm_run_gives_the_keys_and_outputs_of_a_local_run() {
    if !slurm("slurm_run_gives_the_keys_and_outputs_of_a_local_run") {
        return;
    }
    let local = Dir::new();
    local.write("pipelines/p.ron", &pipeline(""));
    let l = local.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&l, "ran").len(), 5, "{l}");

    let d = Dir::new();
    d.write("pipelines/p.ron", &pipeline(EXECUTOR));
    let started = Instant::now();
    // stderr is a pipe, not a terminal: no progress bars, one line per job state change.
    let o = d.run(&["run", "pipelines/p.ron", "--json", "--jobs", "2"]);
    let took = started.elapsed();
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(with_status(&s, "ran").len(), 5, "{s}");
    for stage in ["gen", "sum", "odd", "both"] {
        let line = |state: &str| err.lines().any(|l| l.starts_with(&format!("stage {stage}: job ")) && l.ends_with(&format!(" {state}")));
        assert!(line("SUBMITTED") && line("COMPLETED"), "job state lines of {stage}: {err}");
    }
    assert!(!err.contains("stage report: job"), "`report` is local: {err}");
    assert_eq!(results(&local, &l), results(&d, &s), "Slurm and local runs differ");
    // Four stages went through Slurm (their logs are in the cache), `report` ran here.
    assert_eq!(job_ids(&d).len(), 4);
    let states = job_states(&job_ids(&d));
    assert!(states.values().all(|s| s == "COMPLETED"), "{states:?}");
    let log = std::fs::read_dir(d.path().join(".fgflow/logs")).unwrap().flatten().find(|e| e.file_name().to_string_lossy().ends_with(".log")).unwrap();
    assert!(std::fs::read_to_string(log.path()).unwrap().contains("fgflow exec-job: stage"));
    // `show` prints the job that made a result: its id, final state and log tail.
    let shown = d.ok(&["show", "gen"]);
    assert!(shown.contains("COMPLETED") && shown.contains("| fgflow exec-job: stage `gen`"), "{shown}");
    assert!(!d.ok(&["show", "report"]).contains("slurm job"), "`report` ran here");

    // Everything is cached: a second run submits nothing.
    let again = d.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&again, "reused").len(), 5, "{again}");
    assert_eq!(job_ids(&d).len(), 4);
    // A flag overrides the file: `--executor local` runs nothing through Slurm either.
    d.ok(&["run", "pipelines/p.ron", "--executor", "local"]);
    eprintln!("slurm run of 5 stages: {took:?}");
}

#[test]
fn quick_ron_through_slurm_gives_the_keys_and_outputs_of_a_local_run() {
    if !slurm("quick_ron_through_slurm_gives_the_keys_and_outputs_of_a_local_run") {
        return;
    }
    // quick.ron as shipped, but one epoch (a test's budget) and the data by absolute
    // path (sources are keyed by content, so keys do not see the path).
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/quickdraw");
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quick.ron")).unwrap();
    let text = text.replace("\"../data/quickdraw\"", &format!("{:?}", data.to_str().unwrap())).replace("\"epochs\": 6", "\"epochs\": 1");
    assert!(text.contains("\"epochs\": 1") && text.contains(data.to_str().unwrap()), "quick.ron changed shape");
    let local = Dir::new();
    local.write("pipelines/quick.ron", &text);
    let l = local.json(&["run", "pipelines/quick.ron", "--json", "-q"]);
    let d = Dir::new();
    // Evaluation is light: its kind runs here by default (no `local:` written), the
    // rest as jobs.
    let text = text.replacen("(\n  stages: {", "(\n  executor: Slurm(mem: \"2G\", time: \"00:20:00\"),\n  stages: {", 1);
    assert!(text.contains("executor: Slurm") && !text.contains("local:"), "quick.ron changed shape");
    d.write("pipelines/quick.ron", &text);
    let s = d.json(&["run", "pipelines/quick.ron", "--json", "-q"]);
    assert_eq!(with_status(&s, "ran").len(), l["stages"].as_array().unwrap().len(), "{s}");
    // A training log records wall-clock speed (images/s), which no two runs share,
    // local or not: every other output, the model and checkpoints included, is compared.
    let without_speed = |mut r: BTreeMap<String, (String, serde_json::Value)>| {
        r.get_mut("train_cnn").unwrap().1.as_object_mut().unwrap().remove("log").expect("train has a log output");
        r
    };
    assert_eq!(without_speed(results(&local, &l)), without_speed(results(&d, &s)), "Slurm and local runs of quick.ron differ");
    let evals = ["eval_val", "eval_testa"];
    assert_eq!(job_ids(&d).len(), l["stages"].as_array().unwrap().len() - evals.len());
    for e in evals {
        let key = s["stages"].as_array().unwrap().iter().find(|x| x["name"] == e).unwrap()["key"].as_str().unwrap().to_string();
        assert!(!d.path().join(format!(".fgflow/logs/{key}.job")).exists(), "{e} was submitted");
    }
}

#[test]
fn light_kinds_run_in_the_controlling_process_unless_a_stage_says_local_false() {
    if !slurm("light_kinds_run_in_the_controlling_process_unless_a_stage_says_local_false") {
        return;
    }
    // `evaluate` is light: it runs here under `--executor slurm` unless it says
    // `local: false`. Its inputs here are not predictions, so both fail; where each
    // failed tells where it ran.
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        &format!(
            r#"( {EXECUTOR} stages: {{
                "gen": (kind: "command", params: {{ "cmd": "echo x > p.txt", "outputs": {{ "p": "p.txt" }} }}),
                "eval": (kind: "evaluate", inputs: {{ "predictions": "gen.p", "labels": "gen.p" }}),
                "eval_job": (kind: "evaluate", local: false, inputs: {{ "predictions": "gen.p", "labels": "gen.p" }}, params: {{ "split": "testb" }}),
            }})"#
        ),
    );
    let o = d.run(&["run", "pipelines/p.ron", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(with_status(&r, "failed"), ["eval", "eval_job"], "{r}");
    let stage = |name: &str| r["stages"].as_array().unwrap().iter().find(|x| x["name"] == name).unwrap().clone();
    let submitted = |name: &str| d.path().join(format!(".fgflow/logs/{}.job", stage(name)["key"].as_str().unwrap())).exists();
    assert!(submitted("gen") && submitted("eval_job") && !submitted("eval"));
    assert!(!stage("eval")["error"].as_str().unwrap().contains("slurm job"), "{r}");
    assert!(stage("eval_job")["error"].as_str().unwrap().contains("slurm job"), "{r}");
    assert_eq!(job_ids(&d).len(), 2);
}

#[test]
fn slurm_failure_reports_exit_code_state_and_log() {
    if !slurm("slurm_failure_reports_exit_code_state_and_log") {
        return;
    }
    let d = Dir::new();
    d.write(
        "pipelines/p.ron",
        &format!(
            r#"( {EXECUTOR} stages: {{
                "bad": (kind: "command", params: {{ "cmd": "echo last words from the job; exit 3", "outputs": {{ "x": "x.txt" }} }}),
                "next": (kind: "command", inputs: {{ "x": "bad.x" }}, params: {{ "cmd": "cp inputs/x/x.txt y.txt", "outputs": {{ "y": "y.txt" }} }}),
            }})"#
        ),
    );
    let o = d.run(&["run", "pipelines/p.ron"]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("FAILED with exit code 1"), "{text}");
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(text.contains("| last words from the job"), "the log tail: {text}");
    assert!(text.contains("skipped  next"), "{text}");
    let id = job_ids(&d)[0];
    assert!(text.contains(&format!("slurm job {id} FAILED")), "{text}");
    assert!(text.contains(&format!("stage bad: job {id} FAILED (exit code 1)")), "the job state line: {text}");
    // `fgflow show` gives the same after the fact: job id, final state, log tail, path.
    let shown = d.ok(&["show", "bad"]);
    assert!(shown.contains(&format!("slurm job {id}: FAILED (exit code 1)")), "{shown}");
    assert!(shown.contains("| last words from the job") && shown.contains("/logs/"), "{shown}");
    // Nothing was recorded for the failed key; the cache is consistent.
    d.ok(&["verify"]);
}

#[test]
fn slurm_job_past_its_time_limit_reports_timeout() {
    if !slurm("slurm_job_past_its_time_limit_reports_timeout") {
        return;
    }
    let d = Dir::new();
    // One minute is the least `--time` takes; Slurm ends the job about a minute later.
    d.write(
        "pipelines/p.ron",
        &format!(
            r#"( {EXECUTOR} stages: {{
                "slow": (kind: "command", job: (time: "00:01:00"), params: {{ "cmd": "echo started; sleep 600", "outputs": {{ "x": "x.txt" }} }}),
            }})"#
        ),
    );
    let started = Instant::now();
    let o = d.run(&["run", "pipelines/p.ron"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("TIMEOUT: it ran past its time limit (00:01:00)"), "{text}");
    // The tail of the job's log: Slurm's own line about the time limit.
    assert!(text.contains("DUE TO TIME LIMIT"), "{text}");
    eprintln!("timeout reported after {:?}", started.elapsed());
}

#[test]
fn interrupting_a_slurm_run_cancels_its_jobs_and_a_rerun_reuses_what_finished() {
    if !slurm("interrupting_a_slurm_run_cancels_its_jobs_and_a_rerun_reuses_what_finished") {
        return;
    }
    let d = Dir::new();
    let file = |slow: &str| {
        format!(
            r#"( {EXECUTOR} stages: {{
                "quick": (kind: "command", params: {{ "cmd": "echo done > q.txt", "outputs": {{ "q": "q.txt" }} }}),
                "slow": (kind: "command", params: {{ "cmd": "{slow}; echo slow > s.txt", "outputs": {{ "s": "s.txt" }} }}),
            }})"#
        )
    };
    d.write("pipelines/p.ron", &file("sleep 600"));
    let mut child = d.cmd(&["run", "pipelines/p.ron", "--jobs", "2"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until `quick` has its entry and the other job runs.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "the jobs did not start");
        let entries = walk_count(&d.path().join(".fgflow/entries"));
        let ids = job_ids(&d);
        let states = if ids.len() == 2 { job_states(&ids) } else { BTreeMap::new() };
        if entries == 1 && states.values().any(|s| s == "RUNNING") && states.values().any(|s| s == "COMPLETED") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let ids = job_ids(&d);
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert!(!out.0.success(), "an interrupted run does not exit 0");
    assert!(out.1.contains("cancelled Slurm job"), "{}", out.1);
    // The running job is cancelled, not left to run for ten minutes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = job_states(&ids);
        if states.values().filter(|s| *s == "CANCELLED").count() == 1 && states.values().filter(|s| *s == "COMPLETED").count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs not cancelled: {states:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    d.ok(&["verify"]);
    // A re-run reuses what finished and runs the rest.
    d.write("pipelines/p.ron", &file("true"));
    let r = d.json(&["run", "pipelines/p.ron", "--json"]);
    assert_eq!(with_status(&r, "reused"), vec!["quick"], "{r}");
    assert_eq!(with_status(&r, "ran"), vec!["slow"], "{r}");
}

#[test]
fn two_controllers_on_one_cache_run_each_key_once() {
    if !slurm("two_controllers_on_one_cache_run_each_key_once") {
        return;
    }
    let d = Dir::new();
    // Each stage counts its executions in a file outside the cache.
    let count = |name: &str| d.path().join(format!("ran-{name}")).to_str().unwrap().to_string();
    let stage = |name: &str, input: &str| {
        format!(
            r#""{name}": (kind: "command", {input} params: {{ "cmd": "echo x >> {}; sleep 2; echo {name} > out.txt", "outputs": {{ "out": "out.txt" }} }}),"#,
            count(name)
        )
    };
    let file = format!(
        "( {EXECUTOR} stages: {{ {} {} {} }})",
        stage("a", ""),
        stage("b", ""),
        stage("c", r#"inputs: { "a": "a.out", "b": "b.out" },"#)
    );
    d.write("pipelines/p.ron", &file);
    let spawn = || d.cmd(&["run", "pipelines/p.ron", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (one, two) = (spawn(), spawn());
    for c in [one, two] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    }
    for name in ["a", "b", "c"] {
        let runs = std::fs::read_to_string(count(name)).unwrap();
        assert_eq!(runs.lines().count(), 1, "stage {name} ran {} times", runs.lines().count());
    }
    // Each key was submitted once (the jobs of this test are those started in its
    // directory): the second controller waited on the first one's lease. On one node,
    // exec-job's key lock alone would have kept a second job from running it again.
    let out = Command::new("squeue").args(["-h", "-t", "all", "-o", "%i|%Z"]).output().unwrap();
    let here = std::fs::canonicalize(d.path()).unwrap();
    let jobs = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.split_once('|').is_some_and(|(_, dir)| std::path::Path::new(dir.trim()) == here || std::path::Path::new(dir.trim()) == d.path())).count();
    assert_eq!(jobs, 3, "{}", String::from_utf8_lossy(&out.stdout));
    // Every lease was given back.
    assert_eq!(walk_count(&d.path().join(".fgflow/leases")), 0);
    d.ok(&["verify"]);
}

#[test]
fn slurm_options_are_checked_before_anything_is_touched() {
    // Needs no Slurm: every check comes before `sbatch` is looked for.
    let d = Dir::new();
    d.write("pipelines/p.ron", &pipeline(EXECUTOR));
    for (args, says) in [
        (&["--time", "$(reboot)"][..], "is not a Slurm time limit"),
        (&["--partition", "a b"][..], "expected a plain name"),
        (&["--sbatch-arg", "evil.sh"][..], "each must be one `--name=value` argument"),
        (&["--executor", "local", "--qos", "high"][..], "need --executor slurm"),
    ] {
        let o = d.run(&[&["run", "pipelines/p.ron"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(says), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    d.write("pipelines/q.ron", &pipeline(r#"executor: Slurm(mem: "lots"),"#));
    let o = d.run(&["run", "pipelines/q.ron"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("mem `lots` is not a memory size"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!d.path().join(".fgflow").exists(), "a rejected run created the cache");
}

fn walk_count(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten().map(|e| if e.path().is_dir() { walk_count(&e.path()) } else { 1 }).sum()
}

fn wait_with_timeout(child: &mut std::process::Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fgflow did not exit within {limit:?} of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
