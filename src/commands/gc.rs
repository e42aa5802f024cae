//! `fgflow gc` (entries, blobs, temp files, and cluster jobs' logs and leases) and
//! `fgflow verify`. `verify` gives the cache's checks the engine's
//! knowledge: an entry's key is recomputed from its recorded fingerprint, and job and
//! refs documents must have the engine's shape.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use fgflow_cache::{CacheError, Digest, Entry, VerifyChecks};
use fgflow_engine::{Job, Recorded, Refs, SCHEMA};

use crate::app::{App, CliError, CliResult, out};

#[derive(clap::Args)]
pub struct GcArgs {
    /// Report what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep anything younger than this (e.g. `0`, `30m`, `24h`, `7d`).
    #[arg(long, default_value = "24h")]
    pub grace: String,
}

/// The longest grace accepted: 1000 years. Anything longer is surely a typo, and
/// keeping the limit far below `u64` seconds means no arithmetic on it can overflow.
const MAX_GRACE_SECS: u64 = 1000 * 365 * 86400;

fn parse_duration(s: &str) -> Result<Duration, CliError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let mult: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(CliError::Usage(format!("--grace `{s}`: unknown unit `{unit}` (s, m, h, d)"))),
    };
    let too_large = || CliError::Usage(format!("--grace `{s}`: too large (at most {}d)", MAX_GRACE_SECS / 86400));
    let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| match e.kind() {
        std::num::IntErrorKind::PosOverflow => too_large(),
        _ => CliError::Usage(format!("--grace `{s}`: expected a number with s, m, h or d")),
    })?;
    let secs = n.checked_mul(mult).filter(|&x| x <= MAX_GRACE_SECS).ok_or_else(too_large)?;
    Ok(Duration::from_secs(secs))
}

pub fn gc(app: &App, a: GcArgs) -> CliResult {
    let grace = parse_duration(&a.grace)?;
    let _lock = app.store.lock_exclusive()?;
    let mut keep = HashSet::new();
    let mut pipelines = 0;
    for name in app.store.doc_names("refs")? {
        // Damaged refs would silently stop protecting a pipeline's results: refuse.
        let refs = match app.store.get_doc::<Refs>("refs", &name) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(CacheError::Json { path, source }) => {
                return Err(CliError::Failed(format!(
                    "{}: damaged refs ({source}); gc cannot tell which results its pipeline uses. Run `fgflow verify` (it sets the file aside), then run the pipeline again (it rebuilds its refs) before gc",
                    path.display()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if refs.pipeline.is_file() {
            pipelines += 1;
            keep.extend(refs.stages.values().copied());
        } else if !a.dry_run {
            app.store.remove_doc("refs", &name)?;
        }
    }
    // Cluster jobs' leases: one scheduler query says which jobs may still run.
    let leases = fgflow_engine::slurm::LeaseProbe::scan(app.store.root());
    let r = fgflow_cache::gc::gc_with(&app.store, &keep, grace, a.dry_run, &leases)?;
    let verb = if a.dry_run { "would remove" } else { "removed" };
    let mut s = format!(
        "kept {} entries and {} blobs reachable from {pipelines} pipeline(s) or younger than {}; {verb} {} entries, {} blobs ({} bytes), {} temp files",
        r.entries_kept, r.blobs_kept, a.grace, r.entries_removed, r.blobs_removed, r.bytes_removed, r.temp_removed
    );
    if r.logs_removed + r.leases_removed + r.leases_kept > 0 {
        s.push_str(&format!(", {} job log files, {} leases ({} kept: held, or their job may still run)", r.logs_removed, r.leases_removed, r.leases_kept));
    }
    out(&format!("{s}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// What only the engine knows about entries and documents.
struct EngineChecks;

impl VerifyChecks for EngineChecks {
    fn entry_key(&self, entry: &Entry) -> Option<Result<Digest, String>> {
        match serde_json::from_value::<Recorded>(entry.fingerprint.clone()) {
            Ok(rec) => Some(Ok(rec.fingerprint.key())),
            // An entry of another key schema cannot be re-keyed here (and is never
            // served under this schema's keys): leave it to gc.
            Err(_) if entry.fingerprint.pointer("/fingerprint/schema").and_then(|v| v.as_u64()).is_some_and(|s| s != u64::from(SCHEMA)) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }

    fn document(&self, dir: &str, _name: &str, doc: &serde_json::Value) -> Result<(), String> {
        let shape = match dir {
            "jobs" => serde_json::from_value::<Job>(doc.clone()).map(drop),
            "refs" => serde_json::from_value::<Refs>(doc.clone()).map(drop),
            _ => Ok(()),
        };
        shape.map_err(|e| format!("wrong shape ({e})"))
    }
}

/// Prints `checked B blobs, E entries, D documents: C corrupt, X entries dropped, P
/// problems`, then one line per problem naming its file, what was wrong and what was
/// done (see `fgflow_cache::gc::Problem`). Exit 1 when anything was found.
pub fn verify(app: &App) -> CliResult {
    let _lock = app.store.lock_exclusive()?;
    let r = fgflow_cache::verify_with(&app.store, &EngineChecks)?;
    let mut s = format!(
        "checked {} blobs, {} entries, {} documents: {} corrupt, {} entries dropped, {} problem(s)\n",
        r.blobs_checked,
        r.entries_checked,
        r.documents_checked,
        r.corrupt_blobs.len(),
        r.dropped_entries.len(),
        r.problems.len()
    );
    for p in &r.problems {
        s.push_str(&format!("  {p}\n"));
    }
    out(&s)?;
    Ok(if r.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
