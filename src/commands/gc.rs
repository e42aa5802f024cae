//! `fgflow gc` and `fgflow verify`.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use fgflow_engine::Refs;

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

fn parse_duration(s: &str) -> Result<Duration, CliError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| CliError::Usage(format!("--grace `{s}`: expected a number with s, m, h or d")))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(CliError::Usage(format!("--grace `{s}`: unknown unit `{unit}` (s, m, h, d)"))),
    };
    Ok(Duration::from_secs(n * mult))
}

pub fn gc(app: &App, a: GcArgs) -> CliResult {
    let grace = parse_duration(&a.grace)?;
    let _lock = app.store.lock_exclusive()?;
    let mut keep = HashSet::new();
    let mut pipelines = 0;
    for name in app.store.doc_names("refs")? {
        let Some(refs) = app.store.get_doc::<Refs>("refs", &name)? else { continue };
        if refs.pipeline.is_file() {
            pipelines += 1;
            keep.extend(refs.stages.values().copied());
        } else if !a.dry_run {
            app.store.remove_doc("refs", &name)?;
        }
    }
    let r = fgflow_cache::gc(&app.store, &keep, grace, a.dry_run)?;
    let verb = if a.dry_run { "would remove" } else { "removed" };
    out(&format!(
        "kept {} entries and {} blobs reachable from {pipelines} pipeline(s) or younger than {}; {verb} {} entries, {} blobs ({} bytes), {} temp files\n",
        r.entries_kept, r.blobs_kept, a.grace, r.entries_removed, r.blobs_removed, r.bytes_removed, r.temp_removed
    ))?;
    Ok(ExitCode::SUCCESS)
}

pub fn verify(app: &App) -> CliResult {
    let _lock = app.store.lock_exclusive()?;
    let r = fgflow_cache::verify(&app.store)?;
    let mut s = format!("checked {} blobs: {} corrupt, {} entries dropped\n", r.blobs_checked, r.corrupt_blobs.len(), r.dropped_entries.len());
    for d in &r.corrupt_blobs {
        s.push_str(&format!("  corrupt blob {d} (removed)\n"));
    }
    for k in &r.dropped_entries {
        s.push_str(&format!("  dropped entry {k} (its stage will re-run)\n"));
    }
    out(&s)?;
    Ok(if r.corrupt_blobs.is_empty() && r.dropped_entries.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
