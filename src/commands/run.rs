//! `fgflow run` (and the hidden `exec-job`, which executes one key from the cache alone).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use fgflow_cache::Digest;
use fgflow_engine::{Job, NoProgress, Outcome, RunOptions, StageResult};
use serde::Serialize;

use crate::app::{App, CliError, CliResult, out};
use crate::console::{Console, secs};

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline file (pipelines/NAME.ron).
    pub pipeline: PathBuf,
    /// Run up to N independent stages at once (heavy stages never overlap). At least 1;
    /// more than 256 workers are never started (a note says so).
    #[arg(short, long, default_value_t = default_jobs(), value_parser = parse_jobs)]
    pub jobs: usize,
    /// Stop starting stages after the first failure.
    #[arg(long)]
    pub fail_fast: bool,
    /// Compute backend for training stages: flex, ndarray, wgpu, cuda.
    #[arg(long)]
    pub backend: Option<String>,
    /// Print one JSON object (the schema is in the README) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Do not print the summaries of the final stages (those nothing else reads).
    #[arg(short, long)]
    pub quiet: bool,
    /// After the run, write its HTML report (and data) into DIR, as `fgflow report` does.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(fgflow_engine::MAX_JOBS)
}

/// `--jobs 0` is a usage error (exit 2): zero workers would run nothing.
fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a positive whole number: {e}")),
    }
}

#[derive(Serialize)]
struct StageJson<'a> {
    name: &'a str,
    status: Outcome,
    key: Option<String>,
    reasons: Vec<String>,
    changes: &'a [fgflow_engine::Reason],
    duration_ms: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    outputs_unchanged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct Summary {
    ran: usize,
    reused: usize,
    failed: usize,
    skipped: usize,
    duration_ms: u64,
    /// Source files whose digest came from the stat cache / were read and hashed.
    sources_cached: u64,
    sources_hashed: u64,
    bytes_hashed: u64,
}

pub fn run(app: &App, a: Args) -> CliResult {
    let started = Instant::now();
    let p = app.load(&a.pipeline)?;
    let backend = app.backend(a.backend, &p)?;
    let (sources, hashing, stat) = app.sources(&p)?;
    // The pipeline is valid and its sources readable: only now is the cache created
    // or changed.
    let store = app.writable()?;
    app.save_stat(stat)?;
    app.remember(&a.pipeline);
    if a.jobs > fgflow_engine::MAX_JOBS {
        eprintln!("note: --jobs {} capped at {} workers (the most fgflow starts)", a.jobs, fgflow_engine::MAX_JOBS);
    }
    let width = crate::console::column_width(p.stages.iter().map(|s| s.name.as_str()), 1);
    let console = Console::new(!a.json, width);
    let opts = RunOptions { jobs: a.jobs, fail_fast: a.fail_fast, backend };
    let results = fgflow_engine::run(&p, &store, &app.registry, &sources, &opts, &console)?;
    let mut sum = Summary {
        duration_ms: started.elapsed().as_millis() as u64,
        sources_cached: hashing.cached,
        sources_hashed: hashing.hashed,
        bytes_hashed: hashing.bytes_hashed,
        ..Default::default()
    };
    for r in &results {
        match r.status {
            Outcome::Ran => sum.ran += 1,
            Outcome::Reused => sum.reused += 1,
            Outcome::Failed => sum.failed += 1,
            Outcome::Skipped => sum.skipped += 1,
        }
    }
    if a.json {
        let stages: Vec<StageJson> = results.iter().map(stage_json).collect();
        let doc = serde_json::json!({ "pipeline": a.pipeline.to_string_lossy(), "stages": stages, "summary": sum });
        out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()))?;
    } else {
        // The final results: what the stages nothing else reads produced (the
        // evaluations of quick.ron, the ablation table of fgia.ron).
        if !a.quiet {
            for r in results.iter().filter(|r| matches!(r.status, Outcome::Ran | Outcome::Reused) && p.downstream(&r.name).is_empty()) {
                let Some(entry) = r.key.and_then(|k| app.store.get_entry(&k).ok().flatten()) else { continue };
                let (_, summaries) = crate::commands::inspect::describe(app, &entry)?;
                for text in summaries.values().filter_map(|v| v.as_str()) {
                    out(&format!("\n{} ({}):\n", r.name, entry.kind))?;
                    out(&text.lines().map(|l| format!("  {l}\n")).collect::<String>())?;
                }
            }
            out("\n")?;
        }
        out(&format!(
            "{} ran, {} reused, {} failed, {} skipped in {}\n",
            sum.ran,
            sum.reused,
            sum.failed,
            sum.skipped,
            secs(started.elapsed())
        ))?;
    }
    if let Some(dir) = &a.report {
        let page = crate::report::write(app, &p, Some(&results), dir)?;
        if a.json {
            eprintln!("report: {}", page.display());
        } else {
            out(&format!("report: {}\n", page.display()))?;
        }
    }
    Ok(if sum.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn stage_json(r: &StageResult) -> StageJson<'_> {
    StageJson {
        name: &r.name,
        status: r.status,
        key: r.key.map(|k| k.to_hex()),
        reasons: r.reasons.iter().map(|x| x.to_string()).collect(),
        changes: &r.reasons,
        duration_ms: r.duration_ms,
        outputs_unchanged: r.outputs_unchanged,
        error: r.error.as_deref(),
    }
}

#[derive(clap::Args)]
pub struct ExecJobArgs {
    /// The stage key (full hex) whose job record is in the cache.
    pub key: String,
}

pub fn exec_job(app: &App, a: ExecJobArgs) -> CliResult {
    let key: Digest = a.key.parse().map_err(|e: fgflow_cache::digest::BadDigest| CliError::Usage(e.to_string()))?;
    let _lock = app.store.lock_shared()?;
    if app.store.has_entry(&key) {
        out(&format!("{key} already in the cache\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let job = Job::load(&app.store, &key)?.ok_or_else(|| CliError::Usage(format!("no job recorded for key {key}")))?;
    let _key_lock = app.store.lock_key(&key)?;
    if app.store.has_entry(&key) {
        return Ok(ExitCode::SUCCESS);
    }
    match job.execute(&app.store, &app.registry, &NoProgress) {
        Ok(entry) => {
            out(&format!("{} ran in {}ms\n", entry.key, entry.duration_ms))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", e.log);
            Err(CliError::Failed(format!("stage `{}` failed: {}", job.stage, e.message)))
        }
    }
}
