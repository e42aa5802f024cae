//! The Slurm executor: each stage that must run becomes one `sbatch` job running
//! `fgflow exec-job KEY --cache-dir <cache>` on a node that sees the same cache.
//!
//! It shells out to `sbatch`, `squeue`, `sacct`, `scontrol` and `scancel` (no libslurm
//! binding) with argument vectors built from typed options: no user text is ever
//! pasted into a shell. Completion is decided by the cache entry (written last, by
//! rename, by the job) together with the scheduler's final state: a job the scheduler
//! does not show yet is pending, `UNKNOWN` is never success, and a job that ended
//! without writing its entry is a failure reported with its state and log tail.
//! Polling is one batched query per round for every job of the run, with back-off.
//! Also owns the pipeline file's `executor:` and per-stage `job:` declarations, and the
//! Ctrl-C bridge that cancels submitted jobs (`cancel_jobs_on_interrupt`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use fgflow_cache::{Digest, Entry, Store};
use serde::Deserialize;

use crate::exec::{Executor, Observer};
use crate::job::{Job, JobError};
use crate::kind::Resources;
use crate::pipeline::Stage;
use crate::registry::Registry;

/// `executor:` in a pipeline file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ExecutorDecl {
    Local,
    /// `Slurm(partition: "gpu", account: "lab", qos: "normal", time: "04:00:00",
    /// cpus: 4, mem: "16G", gpus: 1, extra: ["--constraint=a100"])`; every field optional.
    Slurm {
        #[serde(default)]
        partition: Option<String>,
        #[serde(default)]
        account: Option<String>,
        #[serde(default)]
        qos: Option<String>,
        #[serde(default)]
        time: Option<String>,
        #[serde(default)]
        cpus: Option<u32>,
        #[serde(default)]
        mem: Option<String>,
        #[serde(default)]
        gpus: Option<u32>,
        #[serde(default)]
        extra: Vec<String>,
    },
}

impl ExecutorDecl {
    /// The Slurm options the file declares (`None` for `Local`).
    pub fn slurm(&self) -> Option<SlurmOptions> {
        match self {
            ExecutorDecl::Local => None,
            ExecutorDecl::Slurm { partition, account, qos, time, cpus, mem, gpus, extra } => Some(SlurmOptions {
                partition: partition.clone(),
                account: account.clone(),
                qos: qos.clone(),
                defaults: JobResources { cpus: *cpus, mem: mem.clone(), time: time.clone(), gpus: *gpus },
                extra: extra.clone(),
            }),
        }
    }
}

/// What one cluster job asks for: a stage's `job: (cpus: 4, mem: "16G", time:
/// "01:00:00", gpus: 1)`. Unset fields fall back to the executor's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResources {
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub mem: Option<String>,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub gpus: Option<u32>,
}

impl JobResources {
    /// `self`, with unset fields taken from `defaults`.
    pub fn over(&self, defaults: &JobResources) -> JobResources {
        JobResources {
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            gpus: self.gpus.or(defaults.gpus),
        }
    }
}

/// Options of the Slurm executor (pipeline file, then command-line flags over it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Pipeline-wide job resources; a stage's `job:` overrides them field by field.
    pub defaults: JobResources,
    /// Further `sbatch` options, each one argument starting with `--`.
    pub extra: Vec<String>,
}

fn is_time(s: &str) -> bool {
    // Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; also UNLIMITED.
    !s.is_empty() && (s == "UNLIMITED" || s == "INFINITE" || s.chars().all(|c| c.is_ascii_digit() || c == ':' || c == '-')) && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

fn is_mem(s: &str) -> bool {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    !digits.is_empty() && digits.len() + 1 >= s.len() && digits.chars().all(|c| c.is_ascii_digit())
}

fn plain(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.starts_with('-') || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{what} `{}`: expected a plain name (no spaces, control characters or leading `-`)", s.escape_debug()));
    }
    Ok(())
}

impl JobResources {
    pub fn check(&self, whose: &str) -> Result<(), String> {
        if let Some(t) = &self.time
            && !is_time(t)
        {
            return Err(format!("{whose}: time `{}` is not a Slurm time limit (MM, HH:MM:SS or D-HH:MM:SS)", t.escape_debug()));
        }
        if let Some(m) = &self.mem
            && !is_mem(m)
        {
            return Err(format!("{whose}: mem `{}` is not a memory size (a number with an optional K, M, G or T suffix)", m.escape_debug()));
        }
        if self.cpus == Some(0) {
            return Err(format!("{whose}: cpus must be at least 1"));
        }
        Ok(())
    }
}

impl SlurmOptions {
    /// Every problem of the options, so a bad value fails before anything is submitted.
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [("partition", &self.partition), ("account", &self.account), ("qos", &self.qos)] {
            if let Some(v) = v {
                plain(what, v)?;
            }
        }
        self.defaults.check("executor")?;
        for x in &self.extra {
            if !x.starts_with("--") || x.chars().any(|c| c.is_control()) {
                return Err(format!("extra sbatch option `{}`: each must be one `--name=value` argument", x.escape_debug()));
            }
        }
        Ok(())
    }

    /// The `sbatch` arguments for one stage's job (everything after `sbatch`).
    pub fn sbatch_args(&self, stage: &Stage, key: &Digest, run: &JobLaunch) -> Vec<OsString> {
        let res = stage.job.over(&self.defaults);
        let gpus = res.gpus.or((stage.resources == Resources::Gpu).then_some(1));
        let mut a: Vec<OsString> = vec!["--parsable".into(), format!("--job-name=fgflow:{}", job_name(&stage.name)).into()];
        let mut output = OsString::from("--output=");
        output.push(slurm_filename(&run.log_path(key)));
        a.push(output);
        let mut chdir = OsString::from("--chdir=");
        chdir.push(&run.workdir);
        a.push(chdir);
        let mut opt = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}={v}").into());
            }
        };
        opt("partition", &self.partition);
        opt("account", &self.account);
        opt("qos", &self.qos);
        opt("time", &res.time);
        opt("cpus-per-task", &res.cpus.map(|c| c.to_string()));
        opt("mem", &res.mem);
        opt("gpus", &gpus.map(|g| g.to_string()));
        a.extend(self.extra.iter().map(OsString::from));
        // The script only execs its arguments: the command line is an argument vector.
        a.push(run.script.clone().into());
        a.push(run.exe.clone().into());
        a.extend(["exec-job".into(), key.to_hex().into(), "--cache-dir".into(), run.cache.clone().into()]);
        a
    }
}

/// Job names are for people reading `squeue`: keep them to safe characters.
fn job_name(stage: &str) -> String {
    stage.chars().take(100).map(|c| if c.is_ascii_alphanumeric() || "_.@-".contains(c) { c } else { '_' }).collect()
}

/// `--output` takes a filename pattern: a literal `%` must be doubled.
fn slurm_filename(p: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b'%' {
            out.push(b'%');
        }
    }
    OsString::from_vec(out)
}

/// Where and how jobs are launched: absolute paths, fixed for the run.
#[derive(Debug, Clone)]
pub struct JobLaunch {
    /// The `fgflow` binary the nodes run (this one: the cluster shares the filesystem).
    pub exe: PathBuf,
    /// The cache directory, absolute.
    pub cache: PathBuf,
    /// The directory jobs start in (where `Path` parameters resolve from).
    pub workdir: PathBuf,
    /// `<cache>/logs/exec-job.sh`.
    pub script: PathBuf,
}

impl JobLaunch {
    pub fn log_path(&self, key: &Digest) -> PathBuf {
        log_file(&self.cache, key)
    }
}

/// Job logs and job ids live here, per key: `<key>.log` (what the job printed) and
/// `<key>.job` (the Slurm job id of its last submission, then its final state). The
/// names are the cache's (`fgflow_cache::gc::LOGS_DIR`), so that `gc` cleans them.
pub fn logs_dir(cache: &Path) -> PathBuf {
    cache.join(fgflow_cache::gc::LOGS_DIR)
}

/// `<cache>/logs/<key>.log`: everything the key's last job printed.
pub fn log_file(cache: &Path, key: &Digest) -> PathBuf {
    logs_dir(cache).join(format!("{}.log", key.to_hex()))
}

/// `<cache>/logs/<key>.job`: see [`JobRecord`].
pub fn job_file(cache: &Path, key: &Digest) -> PathBuf {
    logs_dir(cache).join(format!("{}.job", key.to_hex()))
}

/// What `<key>.job` records of the key's last job: its id (first line, written at
/// submission) and, once it ended, its final state (`FAILED 3:0`: state, exit code
/// and signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: u64,
    pub state: Option<JobState>,
}

impl JobRecord {
    fn text(&self) -> String {
        match &self.state {
            None => format!("{}\n", self.id),
            Some(st) => format!("{}\n{}{}\n", self.id, st.state, st.exit.map(|(c, s)| format!(" {c}:{s}")).unwrap_or_default()),
        }
    }

    fn parse(text: &str) -> Option<JobRecord> {
        let mut lines = text.lines();
        let id = lines.next()?.trim().parse().ok()?;
        let state = lines.next().and_then(|l| {
            let mut f = l.split_whitespace();
            let state = f.next()?.to_string();
            Some(JobState { state, exit: f.next().and_then(parse_exit) })
        });
        Some(JobRecord { id, state })
    }

    /// The record of `key`'s last job, if a job was submitted for it (never writes).
    pub fn read(cache: &Path, key: &Digest) -> Option<JobRecord> {
        let text = std::fs::read_to_string(job_file(cache, key)).ok()?;
        JobRecord::parse(&text)
    }
}

/// `FAILED (exit code 3)`, `CANCELLED (signal 9)`, `COMPLETED`: a state for people.
pub fn state_text(st: &JobState) -> String {
    let detail = state_detail(st);
    if detail.is_empty() { st.state.clone() } else { format!("{} {detail}", st.state) }
}

/// What a state's exit status adds for people: `(exit code 3)`, `(signal 9)`, or "".
fn state_detail(st: &JobState) -> String {
    match st.exit {
        Some((c, 0)) if c != 0 => format!("(exit code {c})"),
        Some((_, s)) if s != 0 => format!("(signal {s})"),
        _ => String::new(),
    }
}

/// Per-key leases of the controllers submitting them: `<cache>/leases/<key>`.
pub fn leases_dir(cache: &Path) -> PathBuf {
    cache.join(fgflow_cache::gc::LEASES_DIR)
}

/// A lease not touched for this long belongs to a controller that is gone. Live
/// controllers touch theirs on every polling round (at most 15 s apart).
pub const LEASE_STALE: Duration = fgflow_cache::gc::LEASE_STALE;
const LEASE_WAIT: Duration = Duration::from_secs(2);

/// Take the key's lease: created with O_EXCL (atomic on NFS v3+ and local
/// filesystems, unlike `flock` across nodes). A stale one is renamed aside and taken
/// over; `Ok(false)` when a live controller holds it.
fn take_lease(path: &Path) -> std::io::Result<bool> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    for _ in 0..2 {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut f) => {
                use std::io::Write;
                let _ = f.write_all(lease_text(None).as_bytes());
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let old = std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > LEASE_STALE));
        if !old && !holder_is_gone(path) {
            return Ok(false);
        }
        // Only one of several controllers taking over wins this rename.
        let aside = path.with_extension(format!("stale-{}", std::process::id()));
        if std::fs::rename(path, &aside).is_err() {
            return Ok(false);
        }
        let _ = std::fs::remove_file(&aside);
    }
    Ok(false)
}

/// What a lease says: who holds it (host and pid), and its job once submitted.
fn lease_text(job: Option<u64>) -> String {
    let job = job.map(|j| format!("job {j}\n")).unwrap_or_default();
    format!("{job}host {}\npid {}\n", hostname(), std::process::id())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A lease taken on this host by a process that no longer exists (killed with -9):
/// no need to wait for it to go stale.
fn holder_is_gone(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_string));
    let (Some(host), Some(pid)) = (field("host "), field("pid ").and_then(|p| p.parse::<libc::pid_t>().ok())) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    host == hostname() && pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn touch(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// The last `max_lines` lines of a job's log (at most 64 KiB read), or "".
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// The final (or current) state of a job as the scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    /// `ExitCode=3:0` -> (3, 0): exit status and the signal that ended it.
    pub exit: Option<(i32, i32)>,
}

/// States after which a job never runs again.
fn is_final(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED" | "FAILED" | "TIMEOUT" | "OUT_OF_MEMORY" | "CANCELLED" | "NODE_FAIL" | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "SPECIAL_EXIT" | "REVOKED"
    )
}

fn parse_exit(s: &str) -> Option<(i32, i32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Parse `ID|STATE|...` lines of `squeue -o '%i|%T|%r'` or `sacct -P -o JobIDRaw,State,ExitCode`.
fn parse_states(text: &str, sacct: bool) -> HashMap<u64, JobState> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut f = line.split('|');
        let (Some(id), Some(state)) = (f.next(), f.next()) else { continue };
        let Ok(id) = id.trim().parse::<u64>() else { continue };
        // sacct says `CANCELLED by 0`.
        let state = state.split_whitespace().next().unwrap_or("UNKNOWN").trim_end_matches('+').to_string();
        let exit = if sacct { f.next().and_then(parse_exit) } else { None };
        out.insert(id, JobState { state, exit });
    }
    out
}

/// What the watcher knows of one job.
struct Watched {
    /// The key's lease file, touched on every round as a heartbeat.
    lease: PathBuf,
    state: Option<JobState>,
    /// Rounds in a row the scheduler did not list it, after it had listed it.
    missing: u32,
}

struct WatchState {
    jobs: HashMap<u64, Watched>,
    polling: bool,
    next_poll: Instant,
    interval: Duration,
    /// Queries in a row that failed (scheduler unreachable).
    errors: u32,
    last_error: String,
}

/// One watcher per run: whichever waiting thread finds a poll due runs one batched
/// query for every job being waited on; the others sleep until it is done.
struct Watcher {
    state: Mutex<WatchState>,
    changed: Condvar,
    first: Duration,
    max: Duration,
    accounting: OnceLock<bool>,
}

/// How a wait ended.
enum Waited {
    Final(JobState),
    /// Listed once, then gone from the scheduler's view for many rounds.
    Vanished,
    /// The scheduler could not be queried for many rounds.
    Unreachable(String),
}

const MAX_MISSING_ROUNDS: u32 = 10;
const MAX_QUERY_ERRORS: u32 = 30;

impl Watcher {
    fn accounting(&self) -> bool {
        *self.accounting.get_or_init(accounting_available)
    }

    /// One query for all `ids`. `Err` when the scheduler could not be asked.
    fn query(&self, ids: &[u64]) -> Result<HashMap<u64, JobState>, String> {
        query_states(ids, self.accounting())
    }

    fn add(&self, id: u64, lease: PathBuf) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.jobs.insert(id, Watched { lease, state: None, missing: 0 });
        // A new job may end soon: look again quickly.
        g.interval = self.first;
        g.next_poll = g.next_poll.min(Instant::now() + self.first);
        self.changed.notify_all();
    }

    /// Block until job `id` reaches a final state; `on_state` hears each new state.
    fn wait(&self, id: u64, on_state: &dyn Fn(&JobState)) -> Waited {
        let mut seen = String::new();
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(w) = g.jobs.get(&id) {
                if let Some(st) = &w.state {
                    if st.state != seen {
                        seen = st.state.clone();
                        on_state(st);
                    }
                    if is_final(&st.state) {
                        let st = st.clone();
                        g.jobs.remove(&id);
                        return Waited::Final(st);
                    }
                }
                if w.missing >= MAX_MISSING_ROUNDS {
                    g.jobs.remove(&id);
                    return Waited::Vanished;
                }
            }
            if g.errors >= MAX_QUERY_ERRORS {
                g.jobs.remove(&id);
                return Waited::Unreachable(g.last_error.clone());
            }
            let now = Instant::now();
            if !g.polling && now >= g.next_poll {
                g.polling = true;
                let ids: Vec<u64> = g.jobs.keys().copied().collect();
                drop(g);
                let result = self.query(&ids);
                g = self.state.lock().unwrap_or_else(|e| e.into_inner());
                g.polling = false;
                match result {
                    Ok(states) => {
                        g.errors = 0;
                        // The scheduler answered for these jobs: their leases are alive.
                        for w in g.jobs.values() {
                            touch(&w.lease);
                        }
                        for id in ids {
                            let Some(w) = g.jobs.get_mut(&id) else { continue };
                            match states.get(&id) {
                                Some(st) => {
                                    w.state = Some(st.clone());
                                    w.missing = 0;
                                }
                                // Not listed yet: pending. Listed before, then not: count.
                                None if w.state.is_some() => w.missing += 1,
                                None => {}
                            }
                        }
                    }
                    Err(e) => {
                        g.errors += 1;
                        g.last_error = e;
                    }
                }
                g.interval = (g.interval.mul_f64(1.5)).min(self.max);
                g.next_poll = Instant::now() + g.interval;
                self.changed.notify_all();
                continue;
            }
            let until = if g.polling { Duration::from_millis(200) } else { g.next_poll.saturating_duration_since(now) };
            g = self.changed.wait_timeout(g, until.max(Duration::from_millis(10))).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Whether `sacct` answers: with accounting disabled it exits non-zero ("accounting
/// storage is disabled").
fn accounting_available() -> bool {
    Command::new("sacct").args(["-n", "-X", "-P", "-j", "1", "-o", "JobIDRaw"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// One `sacct` (with accounting) or `squeue -t all` query for all `ids`. `Err` when the
/// scheduler could not be asked.
fn query_states(ids: &[u64], sacct: bool) -> Result<HashMap<u64, JobState>, String> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let out = if sacct {
        Command::new("sacct").args(["-n", "-X", "-P", "-o", "JobIDRaw,State,ExitCode", "-j", &list]).stdin(Stdio::null()).output()
    } else {
        Command::new("squeue").args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j", &list]).stdin(Stdio::null()).output()
    };
    let out = out.map_err(|e| format!("could not run {}: {e}", if sacct { "sacct" } else { "squeue" }))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // squeue fails when none of the ids is known yet (or any more): none listed.
    if !out.status.success() && !stderr.contains("Invalid job id") {
        return Err(stderr.trim().to_string());
    }
    let mut states = parse_states(&stdout, sacct);
    // squeue has no exit code: ask scontrol for the few jobs that just failed.
    for (id, st) in states.iter_mut() {
        if st.exit.is_none() && is_final(&st.state) && st.state != "COMPLETED" {
            st.exit = scontrol_exit(*id);
        }
    }
    Ok(states)
}

/// `scontrol show job -o ID` -> its `ExitCode=E:S`.
fn scontrol_exit(id: u64) -> Option<(i32, i32)> {
    let out = Command::new("scontrol").args(["show", "job", "-o", &id.to_string()]).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().find_map(|w| w.strip_prefix("ExitCode=")).and_then(parse_exit)
}

/// Job ids submitted by this process and not yet settled: what Ctrl-C cancels.
static IN_FLIGHT: Mutex<BTreeMap<u64, PathBuf>> = Mutex::new(BTreeMap::new());
/// Set once cancelling began: a job submitted after it is cancelled at once.
static CANCELLING: AtomicBool = AtomicBool::new(false);

/// `scancel` every job this process submitted and still waits on; returns their ids.
pub fn cancel_in_flight() -> Vec<u64> {
    let mut g = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    CANCELLING.store(true, Ordering::SeqCst);
    let jobs = std::mem::take(&mut *g);
    let ids: Vec<u64> = jobs.keys().copied().collect();
    if !ids.is_empty() {
        let _ = Command::new("scancel").args(ids.iter().map(u64::to_string)).stdin(Stdio::null()).status();
    }
    // A cancelled job never writes its entry: its key is free for the next run.
    for lease in jobs.values() {
        let _ = std::fs::remove_file(lease);
    }
    ids
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
type OldActions = Vec<(libc::c_int, libc::sigaction)>;
static OLD_ACTIONS: Mutex<OldActions> = Mutex::new(Vec::new());

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    let b = sig as u8;
    // SAFETY: write is async-signal-safe; the byte is read by the watcher thread.
    unsafe {
        libc::write(fd, (&b as *const u8).cast(), 1);
    }
}

/// On SIGINT, SIGTERM or SIGHUP: `scancel` the jobs this process submitted, then let
/// the signal do what it did before (the handler installed earlier, e.g. the one that
/// kills local commands' process groups, or the default: end the process). A signal
/// handler cannot run `scancel`, so it only writes to a pipe a thread waits on.
pub fn cancel_jobs_on_interrupt() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe fills the two descriptors it is given.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        let reader = fds[0];
        let spawned = std::thread::Builder::new().name("fgflow-scancel".into()).spawn(move || {
            loop {
                let mut b = 0u8;
                // SAFETY: reads one byte into `b`.
                let n = unsafe { libc::read(reader, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    let ids = cancel_in_flight();
                    if !ids.is_empty() {
                        eprintln!("\ninterrupted: cancelled Slurm job(s) {}", ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", "));
                    }
                    let sig = b as libc::c_int;
                    let old = OLD_ACTIONS.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(s, _)| *s == sig).map(|(_, a)| *a);
                    // SAFETY: restores the action saved when ours was installed, then
                    // delivers the signal again to the process.
                    unsafe {
                        if let Some(old) = old {
                            libc::sigaction(sig, &old, std::ptr::null_mut());
                        } else {
                            libc::signal(sig, libc::SIG_DFL);
                        }
                        libc::kill(libc::getpid(), sig);
                    }
                } else if n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
                    return;
                }
            }
        });
        if spawned.is_err() {
            return;
        }
        let mut saved = OLD_ACTIONS.lock().unwrap_or_else(|e| e.into_inner());
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with an empty mask and our handler is valid; the
            // previous action is saved to be restored on delivery.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut new.sa_mask);
                new.sa_flags = libc::SA_RESTART;
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    saved.push((sig, old));
                }
            }
        }
    });
}

/// What `fgflow gc` needs to know of the leases in a cache: whether each one's job may
/// still run (one scheduler query for all of them) and whether its holder is gone.
pub struct LeaseProbe {
    /// The scheduler's view of the jobs the leases name; `None` when it could not be
    /// asked (then every lease naming a job may still be in use).
    states: Option<HashMap<u64, JobState>>,
}

/// The job a lease names, once its holder submitted one.
fn lease_job(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix("job ")).and_then(|j| j.trim().parse().ok())
}

impl LeaseProbe {
    /// Reads every lease under `<cache>/leases/` and asks the scheduler, once, about the
    /// jobs they name (not at all when none names a job). Writes nothing.
    pub fn scan(cache: &Path) -> LeaseProbe {
        let ids: Vec<u64> = std::fs::read_dir(leases_dir(cache)).map(|rd| rd.flatten().filter_map(|e| lease_job(&e.path())).collect()).unwrap_or_default();
        if ids.is_empty() {
            return LeaseProbe { states: Some(HashMap::new()) };
        }
        LeaseProbe { states: query_states(&ids, accounting_available()).ok() }
    }
}

impl fgflow_cache::gc::LeaseCheck for LeaseProbe {
    fn job_may_run(&self, lease: &Path) -> bool {
        let Some(id) = lease_job(lease) else { return false };
        // A job the scheduler no longer lists ended long ago.
        self.states.as_ref().is_none_or(|states| states.get(&id).is_some_and(|st| !is_final(&st.state)))
    }
    fn holder_gone(&self, lease: &Path) -> bool {
        holder_is_gone(lease)
    }
}

/// Runs each job through `sbatch` and waits for its entry.
pub struct SlurmExecutor {
    opts: SlurmOptions,
    launch: JobLaunch,
    watcher: Watcher,
}

impl SlurmExecutor {
    /// Checks the options; writes nothing (see [`SlurmExecutor::prepare`]).
    /// `poll` is the first and the longest pause between two scheduler queries.
    pub fn new(opts: SlurmOptions, exe: PathBuf, cache: PathBuf, workdir: PathBuf, poll: (Duration, Duration)) -> Result<SlurmExecutor, String> {
        opts.check()?;
        let script = logs_dir(&cache).join("exec-job.sh");
        let now = Instant::now();
        Ok(SlurmExecutor {
            opts,
            launch: JobLaunch { exe, cache, workdir, script },
            watcher: Watcher {
                state: Mutex::new(WatchState { jobs: HashMap::new(), polling: false, next_poll: now, interval: poll.0, errors: 0, last_error: String::new() }),
                changed: Condvar::new(),
                first: poll.0,
                max: poll.1.max(poll.0),
                accounting: OnceLock::new(),
            },
        })
    }

    /// Writes the launcher script into `<cache>/logs/` (the cache must exist).
    pub fn prepare(&self) -> Result<(), String> {
        let logs = logs_dir(&self.launch.cache);
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        // Written to a temp name and renamed: another run may be submitting it now
        // (sbatch copies the script at submission, so nodes never read this file).
        let tmp = logs.join(format!(".exec-job.sh.{}", std::process::id()));
        std::fs::write(&tmp, "#!/bin/sh\n# fgflow: a Slurm job runs the command line given as arguments.\nexec \"$@\"\n").map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.launch.script).map_err(|e| format!("{}: {e}", self.launch.script.display()))
    }

    /// Every stage's own `job:` values, checked (names the first bad stage).
    pub fn check_stages<'a>(stages: impl Iterator<Item = &'a Stage>) -> Result<(), String> {
        for s in stages {
            s.job.check(&format!("stage `{}`", s.name.escape_debug()))?;
        }
        Ok(())
    }

    fn submit(&self, stage: &Stage, key: &Digest, lease: &Path) -> Result<u64, JobError> {
        let args = self.opts.sbatch_args(stage, key, &self.launch);
        let out = Command::new("sbatch").args(&args).stdin(Stdio::null()).output().map_err(|e| JobError { message: format!("could not run sbatch: {e}"), log: String::new() })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(JobError { message: format!("sbatch refused the job: {}", stderr.trim()), log: String::new() });
        }
        // `--parsable` prints `ID` or `ID;cluster`.
        let id = stdout.trim().split(';').next().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| JobError { message: format!("sbatch printed no job id: {}", stdout.trim()), log: stderr.into_owned() })?;
        {
            let mut g = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
            if CANCELLING.load(Ordering::SeqCst) {
                let _ = Command::new("scancel").arg(id.to_string()).stdin(Stdio::null()).status();
            } else {
                g.insert(id, lease.to_path_buf());
            }
        }
        Ok(id)
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &str {
        "slurm"
    }

    fn in_process(&self) -> bool {
        false
    }

    fn execute(&self, job: &Job, stage: &Stage, store: &Store, _registry: &Registry, obs: &dyn Observer) -> Result<Entry, JobError> {
        let key = job.key;
        let log = self.launch.log_path(&key);
        // A previous attempt's log must not be mistaken for this one's.
        let _ = std::fs::remove_file(&log);
        // Another controller on this cache may be running the key: wait for its entry
        // (or for its lease to go stale) instead of submitting the key a second time.
        let lease = leases_dir(&self.launch.cache).join(key.to_hex());
        let mut said = false;
        loop {
            if CANCELLING.load(Ordering::SeqCst) {
                return Err(JobError { message: "interrupted before submission".into(), log: String::new() });
            }
            if let Ok(Some(e)) = store.get_entry(&key) {
                return Ok(e);
            }
            match take_lease(&lease) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(JobError { message: format!("{}: {e}", lease.display()), log: String::new() }),
            }
            if !said {
                obs.progress(&stage.name, 0, 1, "another fgflow run is computing this key: waiting for it");
                said = true;
            }
            std::thread::sleep(LEASE_WAIT);
        }
        let submitted = self.submit(stage, &key, &lease);
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&lease);
                return Err(e);
            }
        };
        let _ = std::fs::write(&lease, lease_text(Some(id)));
        let id_file = job_file(&self.launch.cache, &key);
        let _ = std::fs::write(&id_file, JobRecord { id, state: None }.text());
        obs.job_state(&stage.name, id, "SUBMITTED", "");
        self.watcher.add(id, lease.clone());
        let waited = self.watcher.wait(id, &|st| {
            obs.job_state(&stage.name, id, &st.state, &state_detail(st));
        });
        IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let state = match &waited {
            Waited::Final(st) => Some(st.clone()),
            _ => None,
        };
        // For `fgflow show`: how the key's last job ended.
        if state.is_some() {
            let _ = std::fs::write(&id_file, JobRecord { id, state: state.clone() }.text());
        }
        // The job has ended: whatever it wrote is written.
        let _ = std::fs::remove_file(&lease);
        // The entry decides; on a shared filesystem it may show up a little after the
        // job is reported COMPLETED (attribute caching), so look again for a while.
        let patience = if state.as_ref().is_some_and(|s| s.state == "COMPLETED") { Duration::from_secs(30) } else { Duration::ZERO };
        let deadline = Instant::now() + patience;
        loop {
            match store.get_entry(&key) {
                Ok(Some(e)) => return Ok(e),
                Ok(None) => {}
                Err(e) => return Err(JobError { message: format!("slurm job {id}: {e}"), log: log_tail(&log, 40) }),
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let res = stage.job.over(&self.opts.defaults);
        let mut message = match waited {
            Waited::Final(st) => describe_failure(id, &st, &res),
            Waited::Vanished => format!("slurm job {id} is no longer listed by the scheduler and wrote no entry"),
            Waited::Unreachable(e) => format!("slurm job {id}: the scheduler could not be queried: {e}"),
        };
        let tail = log_tail(&log, 40);
        // exec-job's own last word (the stage's error) says more than the exit code.
        if let Some(why) = tail.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
            message.push_str(&format!(": {why}"));
        }
        message.push_str(&format!(" (log: {})", log.display()));
        Err(JobError { message, log: tail })
    }
}

/// The failure message for a job that ended in `st` without writing its entry.
pub fn describe_failure(id: u64, st: &JobState, res: &JobResources) -> String {
    let code = match st.exit {
        Some((c, 0)) => format!(" with exit code {c}"),
        Some((_, s)) if s != 0 => format!(" (killed by signal {s})"),
        _ => String::new(),
    };
    match st.state.as_str() {
        "FAILED" => format!("slurm job {id} FAILED{code}"),
        "TIMEOUT" => format!("slurm job {id} TIMEOUT: it ran past its time limit{}", res.time.as_deref().map(|t| format!(" ({t})")).unwrap_or_default()),
        "OUT_OF_MEMORY" => format!("slurm job {id} OUT_OF_MEMORY: it used more than its memory limit{}", res.mem.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()),
        "CANCELLED" => format!("slurm job {id} CANCELLED (scancel, or an administrator)"),
        "NODE_FAIL" => format!("slurm job {id} NODE_FAIL: the node running it failed"),
        "COMPLETED" => format!("slurm job {id} COMPLETED but wrote no entry into the cache: does the node see the same cache directory?"),
        other => format!("slurm job {id} ended {other}{code} without writing its entry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_from_squeue_and_sacct() {
        let q = parse_states("12|FAILED|NonZeroExitCode\n13|PENDING|None\nnoise\n", false);
        assert_eq!(q[&12].state, "FAILED");
        assert_eq!(q[&13].state, "PENDING");
        let s = parse_states("12|CANCELLED by 0|0:15\n13|COMPLETED|0:0\n", true);
        assert_eq!(s[&12], JobState { state: "CANCELLED".into(), exit: Some((0, 15)) });
        assert_eq!(s[&13].exit, Some((0, 0)));
        assert!(!is_final("UNKNOWN") && !is_final("PENDING") && is_final("TIMEOUT"));
    }

    #[test]
    fn options_are_checked() {
        let ok = SlurmOptions { partition: Some("gpu".into()), defaults: JobResources { time: Some("1-02:00:00".into()), mem: Some("16G".into()), ..Default::default() }, extra: vec!["--constraint=a100".into()], ..Default::default() };
        assert!(ok.check().is_ok());
        assert!(SlurmOptions { partition: Some("a b".into()), ..Default::default() }.check().is_err());
        assert!(SlurmOptions { extra: vec!["script.sh".into()], ..Default::default() }.check().is_err());
        assert!(JobResources { time: Some("$(rm -rf /)".into()), ..Default::default() }.check("x").is_err());
        assert!(JobResources { mem: Some("lots".into()), ..Default::default() }.check("x").is_err());
        assert!(JobResources { mem: Some("500M".into()), time: Some("00:01:00".into()), ..Default::default() }.check("x").is_ok());
    }

    #[test]
    fn failures_say_what_happened() {
        let r = JobResources { time: Some("00:01:00".into()), ..Default::default() };
        assert_eq!(describe_failure(7, &JobState { state: "FAILED".into(), exit: Some((3, 0)) }, &r), "slurm job 7 FAILED with exit code 3");
        assert!(describe_failure(7, &JobState { state: "TIMEOUT".into(), exit: None }, &r).contains("TIMEOUT: it ran past its time limit (00:01:00)"));
        assert!(describe_failure(7, &JobState { state: "UNKNOWN".into(), exit: None }, &r).contains("UNKNOWN"));
    }

    #[test]
    fn the_file_declares_the_executor_and_job_resources() {
        let f = crate::spec::parse(r#"(executor: Slurm(partition: "gpu", time: "04:00:00", mem: "8G", extra: ["--constraint=a100"]),
            stages: { "a": (kind: "x", job: (cpus: 2, gpus: 1), local: true) })"#)
        .unwrap();
        let o = f.executor.unwrap().slurm().unwrap();
        assert_eq!(o.partition.as_deref(), Some("gpu"));
        assert_eq!(o.defaults.time.as_deref(), Some("04:00:00"));
        assert_eq!(o.extra, vec!["--constraint=a100".to_string()]);
        let a = &f.stages.0[0].1;
        assert_eq!(a.job.clone().unwrap().over(&o.defaults), JobResources { cpus: Some(2), mem: Some("8G".into()), time: Some("04:00:00".into()), gpus: Some(1) });
        assert_eq!(a.local, Some(true));
        assert!(crate::spec::parse(r#"(executor: Slurm(partiton: "gpu"), stages: {})"#).is_err());
        assert_eq!(crate::spec::parse(r#"(executor: Local, stages: {})"#).unwrap().executor, Some(ExecutorDecl::Local));
    }

    #[test]
    fn a_lease_is_held_once_and_taken_over_from_a_dead_holder() {
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("leases").join("k");
        assert!(take_lease(&lease).unwrap());
        assert!(!take_lease(&lease).unwrap(), "a live holder keeps it");
        // A holder on this host that has exited (killed with -9): taken over at once.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&lease, format!("job 1\nhost {}\npid {dead}\n", hostname())).unwrap();
        assert!(take_lease(&lease).unwrap());
        assert!(std::fs::read_to_string(&lease).unwrap().contains(&format!("pid {}", std::process::id())));
        // One untouched for longer than LEASE_STALE: its controller is gone too.
        std::fs::write(&lease, "host elsewhere\npid 1\n").unwrap();
        assert!(!take_lease(&lease).unwrap());
        let f = std::fs::OpenOptions::new().write(true).open(&lease).unwrap();
        f.set_modified(SystemTime::now() - LEASE_STALE - Duration::from_secs(1)).unwrap();
        assert!(take_lease(&lease).unwrap());
    }

    #[test]
    fn the_job_file_records_id_then_final_state() {
        let submitted = JobRecord { id: 42, state: None };
        assert_eq!(submitted.text(), "42\n");
        assert_eq!(JobRecord::parse(&submitted.text()), Some(submitted));
        let ended = JobRecord { id: 42, state: Some(JobState { state: "FAILED".into(), exit: Some((3, 0)) }) };
        assert_eq!(ended.text(), "42\nFAILED 3:0\n");
        assert_eq!(JobRecord::parse(&ended.text()), Some(ended.clone()));
        assert_eq!(state_text(ended.state.as_ref().unwrap()), "FAILED (exit code 3)");
        assert_eq!(state_text(&JobState { state: "CANCELLED".into(), exit: Some((0, 15)) }), "CANCELLED (signal 15)");
        assert_eq!(state_text(&JobState { state: "COMPLETED".into(), exit: Some((0, 0)) }), "COMPLETED");
        assert_eq!(JobRecord::parse("garbage\n"), None);
        assert_eq!(JobRecord::parse("7\n\n"), Some(JobRecord { id: 7, state: None }));
    }

    #[test]
    fn gc_keeps_leases_of_live_holders_and_running_jobs() {
        use fgflow_cache::gc::LeaseCheck;
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("k");
        std::fs::write(&lease, lease_text(None)).unwrap();
        let unknown = LeaseProbe { states: None };
        assert!(!unknown.holder_gone(&lease), "this process holds it");
        assert!(!unknown.job_may_run(&lease), "no job submitted yet");
        std::fs::write(&lease, lease_text(Some(9))).unwrap();
        assert!(unknown.job_may_run(&lease), "a scheduler that cannot be asked may be running it");
        let running = LeaseProbe { states: Some([(9, JobState { state: "RUNNING".into(), exit: None })].into()) };
        assert!(running.job_may_run(&lease));
        let ended = LeaseProbe { states: Some([(9, JobState { state: "COMPLETED".into(), exit: None })].into()) };
        assert!(!ended.job_may_run(&lease));
        assert!(!LeaseProbe { states: Some(HashMap::new()) }.job_may_run(&lease), "no longer listed: ended long ago");
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&lease, format!("job 9\nhost {}\npid {dead}\n", hostname())).unwrap();
        assert!(ended.holder_gone(&lease));
    }

    #[test]
    fn percent_is_escaped_in_log_names() {
        assert_eq!(slurm_filename(Path::new("/a%b/c")), OsString::from("/a%%b/c"));
        assert_eq!(job_name("train@a b"), "train@a_b");
    }
}
