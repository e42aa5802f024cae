//! The local executor: runs the stale stages of a pipeline in dependency order, up to
//! `jobs` at a time, never two non-`Light` stages at once. Reuses any key that has an
//! entry (including entries another process just wrote), stops a wave when a re-run
//! stage reproduces its previous outputs (dependents then find their keys unchanged),
//! keeps going past failures unless `fail_fast`, and records refs at the end.
//! Where a stage's job executes is the `Executor`'s business: in this process
//! (`LocalExecutor`) or as a cluster job over the shared cache (`slurm::SlurmExecutor`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use fgflow_cache::{CacheError, Digest, Entry, Store};
use serde::Serialize;

use crate::fingerprint::Recorded;
use crate::job::{Job, JobError};
use crate::kind::{ProgressSink, Resources};
use crate::pipeline::{Pipeline, Stage};
use crate::plan::{self, Reason, Sources};
use crate::registry::Registry;

/// The most worker threads a run starts, whatever `jobs` says: stages beyond this run
/// one after another. More threads than stages are never started either.
pub const MAX_JOBS: usize = 256;

/// Workers actually started for `jobs` on a pipeline of `stages` stages.
pub fn workers_for(jobs: usize, stages: usize) -> usize {
    jobs.clamp(1, MAX_JOBS).min(stages.max(1))
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub fail_fast: bool,
    pub backend: String,
}

/// What the executor reports while it works. The console printer, the JSON report
/// and the tests are all observers.
#[derive(Debug, Clone)]
pub enum Event {
    Started { stage: String, key: Digest, reasons: Vec<Reason> },
    Reused { stage: String, key: Digest, by_other_process: bool },
    Ran { stage: String, key: Digest, duration: Duration, outputs_unchanged: bool },
    Failed { stage: String, key: Option<Digest>, error: String, log: String },
    Skipped { stage: String, because: String },
}

pub trait Observer: ProgressSink {
    fn event(&self, event: &Event);
    /// A cluster job of `stage` changed state (`SUBMITTED`, `PENDING`, `RUNNING`, then
    /// its final state, with `detail` such as an exit code). By default it becomes the
    /// stage's progress message.
    fn job_state(&self, stage: &str, job: u64, state: &str, detail: &str) {
        self.progress(stage, 0, 1, &job_message(job, state, detail));
    }
}

/// `slurm job 123 FAILED (exit code 1)`: a job's state as a stage's progress message.
pub fn job_message(job: u64, state: &str, detail: &str) -> String {
    let sep = if detail.is_empty() { "" } else { " " };
    format!("slurm job {job} {state}{sep}{detail}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ran,
    Reused,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageResult {
    pub name: String,
    pub status: Outcome,
    pub key: Option<Digest>,
    pub reasons: Vec<Reason>,
    /// For `ran`: its outputs are byte-identical to the previous run's (early cutoff).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub outputs_unchanged: bool,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

enum State {
    Waiting,
    Running,
    Done(BTreeMap<String, Digest>),
    Failed,
    Skipped,
}

struct Shared {
    states: Vec<State>,
    results: Vec<Option<StageResult>>,
    /// Per stage: upstream stages not done yet.
    missing: Vec<usize>,
    /// Stages whose upstream is all done, by position (= file order among equals).
    ready: std::collections::BTreeSet<usize>,
    running: usize,
    stop: bool,
}

/// Executes one stage's job whose record is already saved in the cache (`Job::save`),
/// and returns its entry once that entry is in the cache. The run loop decides what
/// runs and when; an executor only decides where.
///
/// An executor that runs jobs outside this process must not rely on the run loop's
/// per-key lock (the job takes it itself), must let the job write the entry, and must
/// return `Ok` only when the entry can be read from the cache.
pub trait Executor: Sync {
    /// For messages: `local`, `slurm`.
    fn name(&self) -> &str;
    /// Jobs run in this process: `Heavy`/`Gpu` stages then never overlap, and the run
    /// loop holds the key's lock while the job runs.
    fn in_process(&self) -> bool;
    fn execute(&self, job: &Job, stage: &Stage, store: &Store, registry: &Registry, obs: &dyn Observer) -> Result<Entry, JobError>;
}

/// Runs each job in this process, on the worker thread that took the stage.
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn name(&self) -> &str {
        "local"
    }
    fn in_process(&self) -> bool {
        true
    }
    fn execute(&self, job: &Job, _stage: &Stage, store: &Store, registry: &Registry, obs: &dyn Observer) -> Result<Entry, JobError> {
        job.execute(store, registry, obs)
    }
}

/// Run a pipeline with the local executor. Holds the cache lock shared for the duration.
pub fn run(p: &Pipeline, store: &Store, registry: &Registry, sources: &Sources, opts: &RunOptions, obs: &dyn Observer) -> Result<Vec<StageResult>, CacheError> {
    run_with(p, store, registry, sources, opts, obs, &LocalExecutor)
}

/// Run a pipeline, executing stages through `executor` (stages marked `local` always
/// run in this process). `opts.jobs` caps the jobs in flight.
pub fn run_with(p: &Pipeline, store: &Store, registry: &Registry, sources: &Sources, opts: &RunOptions, obs: &dyn Observer, executor: &dyn Executor) -> Result<Vec<StageResult>, CacheError> {
    let _lock = store.lock_shared()?;
    let mut refs = plan::load_refs(store, &p.file)?;
    let n = p.stages.len();
    let upstream: Vec<Vec<usize>> = p.stages.iter().map(|s| s.upstream().iter().filter_map(|u| p.position(u)).collect()).collect();
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ups) in upstream.iter().enumerate() {
        for &u in ups {
            downstream[u].push(i);
        }
    }
    let missing: Vec<usize> = upstream.iter().map(Vec::len).collect();
    let ready = (0..n).filter(|&i| missing[i] == 0).collect();
    let shared = Mutex::new(Shared { states: (0..n).map(|_| State::Waiting).collect(), results: (0..n).map(|_| None).collect(), missing, ready, running: 0, stop: false });
    let wake = Condvar::new();
    let heavy = Mutex::new(());
    let refs_before = refs.stages.clone();
    let empty = BTreeMap::new();

    let worker = || loop {
        // Take the first ready stage (file order); a stage becomes ready when its last
        // upstream stage is done, so picking is O(log n), not a scan of the pipeline.
        let (i, upstream_outputs) = {
            let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(i) = g.ready.pop_first() {
                    g.states[i] = State::Running;
                    g.running += 1;
                    let outs: HashMap<String, BTreeMap<String, Digest>> = upstream[i]
                        .iter()
                        .filter_map(|&u| if let State::Done(o) = &g.states[u] { Some((p.stages[u].name.clone(), o.clone())) } else { None })
                        .collect();
                    break (i, outs);
                }
                if g.running == 0 {
                    // Nothing ready, nothing running: every stage is settled.
                    wake.notify_all();
                    return;
                }
                g = wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        let stage = &p.stages[i];
        let (fp, origins, _) = plan::fingerprint(stage, sources.get(&stage.name).unwrap_or(&empty), &upstream_outputs, &opts.backend);
        let key = fp.key();
        let stage_sources = plan::stage_sources(stage, sources);
        let executor: &dyn Executor = if stage.local { &LocalExecutor } else { executor };
        let outcome = execute_one(store, registry, p, i, key, fp, &stage_sources, origins, refs_before.get(&stage.name), opts, obs, &heavy, executor);
        let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
        g.running -= 1;
        match outcome {
            Ok((result, outputs)) => {
                g.states[i] = State::Done(outputs);
                g.results[i] = Some(result);
                for &d in &downstream[i] {
                    g.missing[d] -= 1;
                    if g.missing[d] == 0 && matches!(g.states[d], State::Waiting) && !g.stop {
                        g.ready.insert(d);
                    }
                }
            }
            Err(result) => {
                g.states[i] = State::Failed;
                g.results[i] = Some(result);
                // Everything downstream can never run.
                let mut stack: Vec<(usize, usize)> = downstream[i].iter().map(|&d| (d, i)).collect();
                while let Some((d, because)) = stack.pop() {
                    if matches!(g.states[d], State::Waiting) {
                        let why = format!("upstream `{}` did not complete", p.stages[because].name);
                        settle(&mut g, d, &p.stages[d].name, Outcome::Skipped, why, obs);
                        stack.extend(downstream[d].iter().map(|&x| (x, d)));
                    }
                }
                if opts.fail_fast {
                    g.stop = true;
                    let waiting: Vec<usize> = (0..n).filter(|&j| matches!(g.states[j], State::Waiting)).collect();
                    for j in waiting {
                        g.ready.remove(&j);
                        settle(&mut g, j, &p.stages[j].name, Outcome::Skipped, "--fail-fast: an earlier stage failed".into(), obs);
                    }
                }
            }
        }
        wake.notify_all();
    };
    std::thread::scope(|scope| {
        // Threads the system refuses are not an error: the workers that did start
        // take every stage, and with none this thread does the work itself.
        let mut started = 0;
        for _ in 0..workers_for(opts.jobs, n) {
            if std::thread::Builder::new().name("fgflow-worker".into()).spawn_scoped(scope, worker).is_err() {
                break;
            }
            started += 1;
        }
        if started == 0 {
            worker();
        }
    });
    let g = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    let results: Vec<StageResult> = g.results.into_iter().flatten().collect();
    for r in &results {
        if let (Outcome::Ran | Outcome::Reused, Some(k)) = (r.status, r.key) {
            refs.stages.insert(r.name.clone(), k);
        }
    }
    refs.stages.retain(|name, _| p.stage(name).is_some());
    plan::save_refs(store, &p.file, &refs)?;
    Ok(results)
}

fn settle(g: &mut Shared, i: usize, name: &str, status: Outcome, because: String, obs: &dyn Observer) {
    g.states[i] = State::Skipped;
    obs.event(&Event::Skipped { stage: name.to_string(), because: because.clone() });
    g.results[i] = Some(StageResult { name: name.to_string(), status, key: None, reasons: vec![], outputs_unchanged: false, duration_ms: 0, error: Some(because) });
}

#[allow(clippy::too_many_arguments)]
fn execute_one(
    store: &Store,
    registry: &Registry,
    p: &Pipeline,
    i: usize,
    key: Digest,
    fp: crate::fingerprint::Fingerprint,
    stage_sources: &BTreeMap<String, Vec<crate::plan::Source>>,
    origins: BTreeMap<String, Vec<String>>,
    last_key: Option<&Digest>,
    opts: &RunOptions,
    obs: &dyn Observer,
    heavy: &Mutex<()>,
    executor: &dyn Executor,
) -> Result<(StageResult, BTreeMap<String, Digest>), StageResult> {
    let stage = &p.stages[i];
    let name = stage.name.clone();
    let failed = |error: String, log: String| {
        obs.event(&Event::Failed { stage: name.clone(), key: Some(key), error: error.clone(), log });
        StageResult { name: name.clone(), status: Outcome::Failed, key: Some(key), reasons: vec![], outputs_unchanged: false, duration_ms: 0, error: Some(error) }
    };
    let reused = |by_other_process: bool, outputs: BTreeMap<String, Digest>| {
        obs.event(&Event::Reused { stage: name.clone(), key, by_other_process });
        (StageResult { name: name.clone(), status: Outcome::Reused, key: Some(key), reasons: vec![], outputs_unchanged: false, duration_ms: 0, error: None }, outputs)
    };
    match store.get_entry(&key) {
        Ok(Some(e)) => return Ok(reused(false, e.outputs)),
        Ok(None) => {}
        Err(e) => return Err(failed(e.to_string(), String::new())),
    }
    // Another process may be running this key: wait for it, then reuse its result.
    // A job running elsewhere takes the key's lock itself (`exec-job`): holding it here
    // would make it wait for us forever.
    let _key_lock = if executor.in_process() { Some(store.lock_key(&key).map_err(|e| failed(e.to_string(), String::new()))?) } else { None };
    if _key_lock.is_some()
        && let Ok(Some(e)) = store.get_entry(&key)
    {
        return Ok(reused(true, e.outputs));
    }
    let previous = last_key.and_then(|k| store.get_entry(k).ok().flatten()).map(|e| (e.key, e));
    let prev_recorded = previous.as_ref().and_then(|(k, e)| serde_json::from_value::<Recorded>(e.fingerprint.clone()).ok().map(|r| (*k, r)));
    let reasons = plan::stale_reasons(prev_recorded.as_ref(), &fp, &origins, key, last_key);
    let _heavy = (executor.in_process() && stage.resources != Resources::Light).then(|| heavy.lock().unwrap_or_else(|e| e.into_inner()));
    obs.event(&Event::Started { stage: name.clone(), key, reasons: reasons.clone() });
    let job = Job {
        key,
        stage: name.clone(),
        kind: stage.kind.name().to_string(),
        params: stage.params.clone(),
        backend: opts.backend.clone(),
        sources: stage_sources.clone(),
        recorded: Recorded { fingerprint: fp, origins },
    };
    if let Err(e) = job.save(store) {
        return Err(failed(e.to_string(), String::new()));
    }
    let started = Instant::now();
    match executor.execute(&job, stage, store, registry, obs) {
        Ok(entry) => {
            let duration = started.elapsed();
            let outputs_unchanged = previous.as_ref().is_some_and(|(_, e)| e.outputs == entry.outputs);
            obs.event(&Event::Ran { stage: name.clone(), key, duration, outputs_unchanged });
            Ok((StageResult { name, status: Outcome::Ran, key: Some(key), reasons, outputs_unchanged, duration_ms: duration.as_millis() as u64, error: None }, entry.outputs))
        }
        Err(e) => Err(failed(e.message, e.log)),
    }
}

