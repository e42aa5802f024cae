//! `fgflow run` (and the hidden `exec-job`, which executes one key from the cache alone).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fgflow_cache::Digest;
use fgflow_engine::slurm::SlurmExecutor;
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
    /// Where stages run: `local` (this process) or `slurm` (one sbatch job per stage,
    /// over this cache, which the nodes must share). Default: the file's `executor:`,
    /// else local. With slurm, --jobs caps the jobs in flight.
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
    /// Slurm partition (`sbatch --partition`); overrides the file's.
    #[arg(long, help_heading = "Slurm")]
    pub partition: Option<String>,
    /// Slurm account (`sbatch --account`); overrides the file's.
    #[arg(long, help_heading = "Slurm")]
    pub account: Option<String>,
    /// Slurm quality of service (`sbatch --qos`); overrides the file's.
    #[arg(long, help_heading = "Slurm")]
    pub qos: Option<String>,
    /// Default time limit of a job (`sbatch --time`, e.g. 04:00:00); a stage's `job:` wins.
    #[arg(long, help_heading = "Slurm")]
    pub time: Option<String>,
    /// A further sbatch option, one `--name=value` argument (repeatable); added to the file's.
    #[arg(long = "sbatch-arg", value_name = "--NAME=VALUE", allow_hyphen_values = true, help_heading = "Slurm")]
    pub sbatch_arg: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
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
    let backend = app.backend(a.backend.clone(), &p)?;
    let (sources, hashing, stat) = app.sources(&p)?;
    // The pipeline is valid and its sources readable: only now is the cache created
    // or changed.
    let slurm = slurm_executor(app, &a, &p)?;
    let store = app.writable()?;
    if let Some(s) = &slurm {
        s.prepare().map_err(CliError::Failed)?;
    }
    app.save_stat(stat)?;
    app.remember(&a.pipeline);
    if a.jobs > fgflow_engine::MAX_JOBS {
        eprintln!("note: --jobs {} capped at {} workers (the most fgflow starts)", a.jobs, fgflow_engine::MAX_JOBS);
    }
    let width = crate::console::column_width(p.stages.iter().map(|s| s.name.as_str()), 1);
    let console = Console::new(!a.json, width);
    let opts = RunOptions { jobs: a.jobs, fail_fast: a.fail_fast, backend };
    let results = match slurm {
        Some(slurm) => {
            // Ctrl-C (SIGTERM, SIGHUP) cancels the submitted jobs before the process ends.
            fgflow_engine::slurm::cancel_jobs_on_interrupt();
            fgflow_engine::run_with(&p, &store, &app.registry, &sources, &opts, &console, &slurm)?
        }
        None => fgflow_engine::run(&p, &store, &app.registry, &sources, &opts, &console)?,
    };
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

/// The Slurm executor the file and the flags ask for, checked; `None` for local.
fn slurm_executor(app: &App, a: &Args, p: &fgflow_engine::Pipeline) -> Result<Option<SlurmExecutor>, CliError> {
    let from_file = p.executor.as_ref().and_then(|e| e.slurm());
    let flags_given = a.partition.is_some() || a.account.is_some() || a.qos.is_some() || a.time.is_some() || !a.sbatch_arg.is_empty();
    let slurm = match a.executor {
        Some(ExecutorKind::Slurm) => true,
        Some(ExecutorKind::Local) => false,
        None => from_file.is_some(),
    };
    if !slurm {
        if flags_given {
            return Err(CliError::Usage("--partition, --account, --qos, --time and --sbatch-arg need --executor slurm (or `executor: Slurm(...)` in the file)".into()));
        }
        return Ok(None);
    }
    let mut opts = from_file.unwrap_or_default();
    let or = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
    opts.partition = or(&a.partition, opts.partition.take());
    opts.account = or(&a.account, opts.account.take());
    opts.qos = or(&a.qos, opts.qos.take());
    opts.defaults.time = or(&a.time, opts.defaults.time.take());
    opts.extra.extend(a.sbatch_arg.iter().cloned());
    let bad = |e: String| CliError::Usage(format!("{}: {e}", a.pipeline.display()));
    // Every option is checked before `sbatch` is looked for, so a bad flag is reported
    // the same on a laptop as on a login node.
    opts.check().map_err(bad)?;
    SlurmExecutor::check_stages(p.stages.iter().filter(|s| !s.local)).map_err(bad)?;
    if std::process::Command::new("sbatch").arg("--version").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_err() {
        return Err(CliError::Usage("--executor slurm: `sbatch` was not found on PATH (run fgflow on a Slurm login node)".into()));
    }
    let exe = std::env::current_exe().map_err(|e| CliError::Failed(format!("cannot find the fgflow binary to submit: {e}")))?;
    let cwd = std::env::current_dir().map_err(|e| CliError::Failed(format!("current directory: {e}")))?;
    let cache = std::path::absolute(app.store.root()).map_err(|e| CliError::Failed(format!("{}: {e}", app.store.root().display())))?;
    let poll = (Duration::from_secs(1), Duration::from_secs(15));
    SlurmExecutor::new(opts, exe, cache, cwd, poll).map(Some).map_err(bad)
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
    eprintln!("fgflow exec-job: stage `{}` ({}), key {key}", crate::console::esc(&job.stage), job.kind);
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
