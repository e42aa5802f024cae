//! Inspecting the cache: `ls`, `show` (with a cluster job's state and log tail from
//! `<cache>/logs/`), `export`, `diff`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fgflow_cache::{Digest, Entry};
use fgflow_engine::{Recorded, Status, slurm};

use crate::app::{App, CliError, CliResult, out};
use crate::commands::status::plan;

#[derive(clap::Args)]
pub struct LsArgs {
    /// List this pipeline's stages with their keys instead of every entry.
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// A stage name (of the pipeline) or a key prefix.
    pub target: String,
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// `STAGE.OUTPUT` or `KEYPREFIX.OUTPUT`.
    pub what: String,
    /// Destination: a directory, or a file path when the output is a single file.
    pub dest: PathBuf,
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DiffArgs {
    /// Stage name or key prefix.
    pub a: String,
    /// Stage name or key prefix.
    pub b: String,
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
}

fn date(unix: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm); avoids a date crate for one line.
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

/// What a target names: the entry to show (the stage's current result, else its last
/// one) and, when the stage's current key has no entry but a cluster job was submitted
/// for it (it failed, was cancelled, or still runs), that key.
struct Found {
    entry: Option<Entry>,
    attempt: Option<Digest>,
}

/// Whether a cluster job was ever submitted for `key` (its log or id is in the cache).
fn has_job(app: &App, key: &Digest) -> bool {
    let cache = app.store.root();
    slurm::job_file(cache, key).exists() || slurm::log_file(cache, key).exists()
}

/// A stage of the given (or last) pipeline, or a key prefix (of an entry, else of a
/// job in `<cache>/logs/`).
fn find(app: &App, target: &str, pipeline: Option<PathBuf>) -> Result<Found, CliError> {
    if let Ok(file) = app.pipeline_or_last(pipeline.clone()) {
        if let Ok((_, planned)) = plan(app, &file, None) {
            if let Some(st) = planned.iter().find(|s| s.name == target) {
                let attempt = st.key.filter(|k| st.status != Status::Fresh && has_job(app, k));
                let key = match (st.status.clone(), st.key, st.previous.as_deref()) {
                    (Status::Fresh, Some(k), _) => Some(k),
                    (_, _, Some((k, _))) => Some(*k),
                    _ => None,
                };
                let entry = match key {
                    Some(k) => app.store.get_entry(&k)?,
                    None => None,
                };
                if entry.is_none() && attempt.is_none() {
                    return Err(CliError::Usage(match key {
                        Some(_) => format!("the entry of `{target}` is gone from the cache"),
                        None => format!("stage `{target}` has no result in the cache yet: run the pipeline first"),
                    }));
                }
                return Ok(Found { entry, attempt });
            }
        } else if pipeline.is_some() {
            plan(app, &file, None)?;
        }
    }
    let key = match app.store.resolve_prefix(target) {
        Ok(key) => key,
        Err(e) => match job_by_prefix(app, target) {
            Some(key) => return Ok(Found { entry: None, attempt: Some(key) }),
            None => return Err(CliError::Usage(format!("`{target}` is neither a stage of the pipeline nor a key: {e}"))),
        },
    };
    let entry = app.store.get_entry(&key)?.ok_or_else(|| CliError::Usage(format!("no entry {key}")))?;
    Ok(Found { entry: Some(entry), attempt: None })
}

/// The one key in `<cache>/logs/` whose job files start with `prefix` (a key from a
/// failure message, which has no entry to resolve it by).
fn job_by_prefix(app: &App, prefix: &str) -> Option<Digest> {
    if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let rd = std::fs::read_dir(slurm::logs_dir(app.store.root())).ok()?;
    let keys: Vec<Digest> = rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".job")?.parse().ok()).filter(|k: &Digest| k.to_hex().starts_with(&prefix.to_ascii_lowercase())).collect();
    (keys.len() == 1).then(|| keys[0])
}

/// A stage of the given (or last) pipeline, or a key prefix: its entry.
fn resolve(app: &App, target: &str, pipeline: Option<PathBuf>) -> Result<Entry, CliError> {
    let found = find(app, target, pipeline)?;
    found.entry.ok_or_else(|| CliError::Usage(format!("`{target}` has no result in the cache: its last job did not write one (`fgflow show {target}` prints the job's log)")))
}

/// `show`'s first lines for a key whose last job wrote no entry.
fn attempt_header(stage: &str, key: &Digest) -> String {
    format!("stage     {}\nkey       {key}  (no result: its last job did not write one)\n", crate::console::esc(stage))
}

/// The lines of a job's log `show` prints.
const JOB_LOG_LINES: usize = 40;

/// The cluster job of `key` as `<cache>/logs/` records it: text for `show` and JSON.
/// `has_result`: the key has an entry (then a failed job is an earlier attempt).
fn job_section(app: &App, key: &Digest, has_result: bool) -> Option<(String, serde_json::Value)> {
    if !has_job(app, key) {
        return None;
    }
    let cache = app.store.root();
    let record = slurm::JobRecord::read(cache, key);
    let log = slurm::log_file(cache, key);
    let tail = slurm::log_tail(&log, JOB_LOG_LINES);
    // Absolute, to paste into `tail -f` from anywhere.
    let log = std::path::absolute(&log).unwrap_or(log);
    let mut s = match &record {
        Some(r) => match &r.state {
            Some(st) if has_result && st.state != "COMPLETED" => format!("job       slurm job {}: {} (an earlier attempt: the result was made by another run)\n", r.id, slurm::state_text(st)),
            Some(st) => format!("job       slurm job {}: {}\n", r.id, slurm::state_text(st)),
            None => format!("job       slurm job {} (no final state recorded: it still runs, or its run was interrupted)\n", r.id),
        },
        None => "job       (no job id recorded)\n".to_string(),
    };
    if log.exists() {
        let n = tail.lines().count();
        s.push_str(&format!("job log   {} (last {n} line(s))\n", crate::console::esc(&log.display().to_string())));
        for l in tail.lines() {
            s.push_str(&format!("  | {}\n", crate::console::shown(l, 4000)));
        }
    } else {
        s.push_str(&format!("job log   {} (none yet)\n", crate::console::esc(&log.display().to_string())));
    }
    let state = record.as_ref().and_then(|r| r.state.as_ref());
    let json = serde_json::json!({
        "key": key.to_hex(),
        "id": record.as_ref().map(|r| r.id),
        "state": state.map(|st| st.state.clone()),
        "exit_code": state.and_then(|st| st.exit).map(|(c, _)| c),
        "signal": state.and_then(|st| st.exit).map(|(_, sig)| sig),
        "log_path": log.to_string_lossy(),
        "log_tail": tail,
    });
    Some((s, json))
}

pub fn ls(app: &App, a: LsArgs) -> CliResult {
    if let Some(file) = a.pipeline {
        let (_, planned) = plan(app, &file, None)?;
        out(&crate::commands::status::render(&planned))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for key in app.store.entry_keys()? {
        if let Some(e) = app.store.get_entry(&key)? {
            let size = e.outputs.values().filter_map(|d| app.store.read_tree(d).ok()).fold(0u64, |a, t| a.saturating_add(t.total_size()));
            rows.push((e, size));
        }
    }
    rows.sort_by(|x, y| (y.0.created_unix, &x.0.stage).cmp(&(x.0.created_unix, &y.0.stage)));
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, size)| serde_json::json!({"key": e.key, "stage": e.stage, "kind": e.kind, "created_unix": e.created_unix, "duration_ms": e.duration_ms, "bytes": size, "outputs": e.outputs}))
            .collect();
        out(&format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()))?;
    } else {
        let w = crate::console::column_width(rows.iter().map(|r| r.0.stage.as_str()), 5);
        let mut s = format!("{:<12}  {:<w$}  {:<14}  {:<20}  {:>10}\n", "key", "stage", "kind", "created", "bytes");
        for (e, size) in &rows {
            s.push_str(&format!("{}  {:<w$}  {:<14}  {:<20}  {:>10}\n", e.key.short(), crate::console::esc(&e.stage), crate::console::esc(&e.kind), date(e.created_unix), size));
        }
        s.push_str(&format!("{} entries\n", rows.len()));
        out(&s)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Each output of an entry with its size and the kind's summary of it: the listing
/// text and the summaries by output name.
pub fn describe(app: &App, e: &Entry) -> Result<(String, serde_json::Map<String, serde_json::Value>), CliError> {
    let kind = app.registry.get(&e.kind).cloned();
    let tmp = app.tempdir("show-")?;
    let mut summaries = serde_json::Map::new();
    let mut outputs = String::new();
    for (name, d) in &e.outputs {
        let tree = app.store.read_tree(d)?;
        outputs.push_str(&format!("  {name:<12} {}  {} file(s), {} bytes\n", d.short(), tree.files.len(), tree.total_size()));
        if let Some(k) = &kind {
            let dir = tmp.path().join(name);
            app.store.materialize(d, &dir, fgflow_cache::Materialize::Link)?;
            if let Some(text) = k.describe_output(name, &dir) {
                for l in text.lines() {
                    outputs.push_str(&format!("      {l}\n"));
                }
                summaries.insert(name.clone(), serde_json::Value::String(text));
            }
        }
    }
    Ok((outputs, summaries))
}

pub fn show(app: &App, a: ShowArgs) -> CliResult {
    let found = find(app, &a.target, a.pipeline)?;
    // The stage's current key, whose job did not write an entry: what the user asks
    // `show` about after a failed cluster run.
    let attempt = found.attempt.map(|k| (k, job_section(app, &k, false)));
    let stage_of = |k: &Digest| fgflow_engine::Job::load(&app.store, k).ok().flatten().map(|j| j.stage).unwrap_or_else(|| a.target.clone());
    let Some(e) = found.entry else {
        let Some((k, job)) = attempt else { return Err(CliError::Usage(format!("`{}` has no result in the cache", a.target))) };
        let (text, json) = job.unwrap_or_default();
        if a.json {
            let doc = serde_json::json!({ "entry": null, "summaries": {}, "log": "", "job": null, "attempt": json });
            out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()))?;
        } else {
            out(&format!("{}{text}", attempt_header(&stage_of(&k), &k)))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let (outputs, summaries) = describe(app, &e)?;
    let log = match e.log {
        Some(d) => String::from_utf8_lossy(&app.store.read_blob(&d)?).into_owned(),
        None => String::new(),
    };
    let job = job_section(app, &e.key, true);
    if a.json {
        let doc = serde_json::json!({
            "entry": e,
            "summaries": summaries,
            "log": log,
            "job": job.as_ref().map(|j| &j.1),
            "attempt": attempt.as_ref().and_then(|(_, j)| j.as_ref().map(|j| &j.1)),
        });
        out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::new();
    if let Some((k, j)) = &attempt {
        s.push_str(&attempt_header(&e.stage, k));
        s.push_str(&j.as_ref().map(|j| j.0.clone()).unwrap_or_default());
        s.push_str("\nlast result (an earlier key):\n");
    }
    s.push_str(&format!("key       {}\nstage     {}\nkind      {}\ncreated   {} (ran {} ms)\n", e.key, e.stage, e.kind, date(e.created_unix), e.duration_ms));
    if let Ok(rec) = serde_json::from_value::<Recorded>(e.fingerprint.clone()) {
        let fp = &rec.fingerprint;
        if let Some(b) = &fp.backend {
            s.push_str(&format!("backend   {b}\n"));
        }
        if !fp.params.is_empty() {
            s.push_str("params\n");
            for (k, v) in &fp.params {
                s.push_str(&format!("  {k} = {v}\n"));
            }
        }
        for (k, ds) in &fp.sources {
            s.push_str(&format!("source    {k} = {}\n", ds.iter().map(|d| d.short()).collect::<Vec<_>>().join(", ")));
        }
        if !fp.inputs.is_empty() {
            s.push_str("inputs\n");
            for (port, ds) in &fp.inputs {
                let from = rec.origins.get(port).cloned().unwrap_or_default();
                for (i, d) in ds.iter().enumerate() {
                    s.push_str(&format!("  {port:<12} {}  from {}\n", d.short(), from.get(i).map(String::as_str).unwrap_or("?")));
                }
            }
        }
    }
    s.push_str("outputs\n");
    s.push_str(&outputs);
    if !log.is_empty() {
        let lines: Vec<&str> = log.lines().collect();
        s.push_str(&format!("log (last {} of {} lines)\n", lines.len().min(15), lines.len()));
        for l in &lines[lines.len().saturating_sub(15)..] {
            s.push_str(&format!("  | {l}\n"));
        }
    }
    if let Some((text, _)) = &job {
        s.push_str(&text);
    }
    out(&s)?;
    Ok(ExitCode::SUCCESS)
}

/// Copies an output out of the cache. Files are new files, made like `cp` makes one
/// (mode 0666 less the umask, so 0644 under umask 022; directories 0777 less the
/// umask), never hard links to blobs. Each file is written to a fresh temp file beside
/// its destination (`create_new`, so nothing already there is opened or followed),
/// then renamed over it: a symbolic link at the destination is replaced, not written
/// through. Below the destination directory, a symbolic link in the way is an error,
/// so nothing is written outside it; the tree's paths were checked when it was read.
pub fn export(app: &App, a: ExportArgs) -> CliResult {
    let (target, output) = a.what.rsplit_once('.').ok_or_else(|| CliError::Usage(format!("`{}`: expected STAGE.OUTPUT", a.what)))?;
    let e = resolve(app, target, a.pipeline)?;
    let d = e.outputs.get(output).ok_or_else(|| {
        CliError::Usage(format!("`{target}` has no output `{output}`; outputs: {}", e.outputs.keys().cloned().collect::<Vec<_>>().join(", ")))
    })?;
    let tree = app.store.read_tree(d).map_err(|err| CliError::Failed(format!("cannot export `{}`: {err} (run `fgflow verify`)", a.what)))?;
    let single = tree.files.len() == 1 && !a.dest.is_dir();
    let mut n = 0;
    for f in &tree.files {
        let dest = if single {
            if let Some(parent) = a.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|err| CliError::Failed(format!("{}: {err}", parent.display())))?;
            }
            a.dest.clone()
        } else {
            dest_inside(&a.dest, &f.path)?
        };
        write_new_file(&app.store.blob_path(&f.digest), &dest)?;
        n += 1;
    }
    out(&format!("exported {n} file(s) of {}.{output} ({}) to {}\n", e.stage, d.short(), a.dest.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `root/rel`, creating the directories between them; refuses to pass through a
/// symbolic link or a non-directory below `root` (`root` itself is the user's choice).
fn dest_inside(root: &Path, rel: &str) -> Result<PathBuf, CliError> {
    let fail = |p: &Path, why: String| CliError::Failed(format!("{}: {why}", p.display()));
    fgflow_cache::tree::check_path(rel).map_err(|err| fail(root, format!("refusing to export: {err}")))?;
    std::fs::create_dir_all(root).map_err(|err| fail(root, err.to_string()))?;
    let parts: Vec<&str> = rel.split('/').collect();
    let mut p = root.to_path_buf();
    for part in &parts[..parts.len() - 1] {
        p.push(part);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => return Err(fail(&p, "is a symbolic link: refusing to write through it".into())),
            Ok(_) => return Err(fail(&p, "is in the way: not a directory".into())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(&p) {
                Ok(()) => {}
                // Created meanwhile by someone else: fine only if it is a real directory.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_dir()) => {}
                Err(err) => return Err(fail(&p, err.to_string())),
            },
            Err(err) => return Err(fail(&p, err.to_string())),
        }
    }
    p.push(parts[parts.len() - 1]);
    Ok(p)
}

/// Copy the blob `from` to a new file at `to` (see `export`): never a link, never
/// through what is already at `to`.
fn write_new_file(from: &Path, to: &Path) -> Result<(), CliError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let fail = |p: &Path, err: std::io::Error| CliError::Failed(format!("{}: {err}", p.display()));
    if !std::fs::symlink_metadata(from).is_ok_and(|m| m.file_type().is_file()) {
        return Err(CliError::Failed(format!("{}: missing or not a file (run `fgflow verify`)", from.display())));
    }
    if std::fs::symlink_metadata(to).is_ok_and(|m| m.file_type().is_dir()) {
        return Err(CliError::Failed(format!("{}: is a directory", to.display())));
    }
    let dir = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(".{name}.fgflow-export-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(fail(&tmp, err)),
        }
    };
    let written = std::fs::File::open(from).map_err(|err| fail(from, err)).and_then(|mut src| std::io::copy(&mut src, &mut file).map_err(|err| fail(to, err)));
    drop(file);
    if let Err(err) = written.and_then(|_| std::fs::rename(&tmp, to).map_err(|err| fail(to, err))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    Ok(())
}

pub fn diff(app: &App, a: DiffArgs) -> CliResult {
    let x = resolve(app, &a.a, a.pipeline.clone())?;
    let y = resolve(app, &a.b, a.pipeline)?;
    let mut s = format!("a: {} ({}, {})\nb: {} ({}, {})\n", x.key.short(), x.stage, x.kind, y.key.short(), y.stage, y.kind);
    match (serde_json::from_value::<Recorded>(x.fingerprint.clone()), serde_json::from_value::<Recorded>(y.fingerprint.clone())) {
        (Ok(rx), Ok(ry)) => {
            let reasons = fgflow_engine::plan::diff(&rx, &ry.fingerprint, &ry.origins, true);
            if reasons.is_empty() {
                s.push_str("fingerprints: identical\n");
            } else {
                s.push_str("fingerprints (a -> b):\n");
                for r in reasons {
                    s.push_str(&format!("  - {r}\n"));
                }
            }
        }
        _ => s.push_str("fingerprints: unreadable (entry from another schema)\n"),
    }
    let names: std::collections::BTreeSet<&String> = x.outputs.keys().chain(y.outputs.keys()).collect();
    s.push_str("outputs:\n");
    for n in names {
        let (da, db) = (x.outputs.get(n), y.outputs.get(n));
        let short = |d: Option<&Digest>| d.map(|d| d.short()).unwrap_or_else(|| "(none)".into());
        let mark = if da == db { "same" } else { "differs" };
        s.push_str(&format!("  {n:<12} {} {} {mark}\n", short(da), short(db)));
        if let (Some(da), Some(db), "differs") = (da, db, mark) {
            let (ta, tb) = (app.store.read_tree(da)?, app.store.read_tree(db)?);
            for f in &ta.files {
                match tb.files.iter().find(|g| g.path == f.path) {
                    Some(g) if g.digest == f.digest => {}
                    Some(g) => s.push_str(&format!("      ~ {} ({} -> {} bytes)\n", f.path, f.size, g.size)),
                    None => s.push_str(&format!("      - {}\n", f.path)),
                }
            }
            for g in tb.files.iter().filter(|g| !ta.files.iter().any(|f| f.path == g.path)) {
                s.push_str(&format!("      + {}\n", g.path));
            }
        }
    }
    out(&s)?;
    Ok(ExitCode::SUCCESS)
}
