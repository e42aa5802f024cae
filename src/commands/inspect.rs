//! Inspecting the cache: `ls`, `show`, `export`, `diff`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fgflow_cache::{Digest, Entry};
use fgflow_engine::{Recorded, Status};

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

/// A stage of the given (or last) pipeline, or a key prefix.
fn resolve(app: &App, target: &str, pipeline: Option<PathBuf>) -> Result<Entry, CliError> {
    if let Ok(file) = app.pipeline_or_last(pipeline.clone()) {
        if let Ok((_, planned)) = plan(app, &file, None) {
            if let Some(st) = planned.iter().find(|s| s.name == target) {
                let key = match (st.status.clone(), st.key, &st.previous) {
                    (Status::Fresh, Some(k), _) => k,
                    (_, _, Some((k, _))) => *k,
                    _ => return Err(CliError::Usage(format!("stage `{target}` has no result in the cache yet: run the pipeline first"))),
                };
                return app.store.get_entry(&key)?.ok_or_else(|| CliError::Usage(format!("the entry of `{target}` is gone from the cache")));
            }
        } else if pipeline.is_some() {
            plan(app, &file, None)?;
        }
    }
    let key = app.store.resolve_prefix(target).map_err(|e| CliError::Usage(format!("`{target}` is neither a stage of the pipeline nor a key: {e}")))?;
    app.store.get_entry(&key)?.ok_or_else(|| CliError::Usage(format!("no entry {key}")))
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
            let size: u64 = e.outputs.values().filter_map(|d| app.store.read_tree(d).ok()).map(|t| t.total_size()).sum();
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
        let w = rows.iter().map(|r| r.0.stage.len()).max().unwrap_or(5).max(5);
        let mut s = format!("{:<12}  {:<w$}  {:<14}  {:<20}  {:>10}\n", "key", "stage", "kind", "created", "bytes");
        for (e, size) in &rows {
            s.push_str(&format!("{}  {:<w$}  {:<14}  {:<20}  {:>10}\n", e.key.short(), e.stage, e.kind, date(e.created_unix), size));
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
    let tmp = app.store.tempdir("show-")?;
    let mut summaries = serde_json::Map::new();
    let mut outputs = String::new();
    for (name, d) in &e.outputs {
        let tree = app.store.read_tree(d)?;
        outputs.push_str(&format!("  {name:<12} {}  {} file(s), {} bytes\n", d.short(), tree.files.len(), tree.total_size()));
        if let Some(k) = &kind {
            let dir = tmp.path().join(name);
            app.store.materialize(d, &dir)?;
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
    let e = resolve(app, &a.target, a.pipeline)?;
    let (outputs, summaries) = describe(app, &e)?;
    let log = match e.log {
        Some(d) => String::from_utf8_lossy(&app.store.read_blob(&d)?).into_owned(),
        None => String::new(),
    };
    if a.json {
        let doc = serde_json::json!({ "entry": e, "summaries": summaries, "log": log });
        out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = format!("key       {}\nstage     {}\nkind      {}\ncreated   {} (ran {} ms)\n", e.key, e.stage, e.kind, date(e.created_unix), e.duration_ms);
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
    out(&s)?;
    Ok(ExitCode::SUCCESS)
}

pub fn export(app: &App, a: ExportArgs) -> CliResult {
    let (target, output) = a.what.rsplit_once('.').ok_or_else(|| CliError::Usage(format!("`{}`: expected STAGE.OUTPUT", a.what)))?;
    let e = resolve(app, target, a.pipeline)?;
    let d = e.outputs.get(output).ok_or_else(|| {
        CliError::Usage(format!("`{target}` has no output `{output}`; outputs: {}", e.outputs.keys().cloned().collect::<Vec<_>>().join(", ")))
    })?;
    let tree = app.store.read_tree(d)?;
    let single = tree.files.len() == 1 && !a.dest.is_dir();
    let mut n = 0;
    for f in &tree.files {
        let dest = if single { a.dest.clone() } else { a.dest.join(&f.path) };
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| CliError::Failed(format!("{}: {err}", parent.display())))?;
        }
        copy_writable(&app.store.blob_path(&f.digest), &dest)?;
        n += 1;
    }
    out(&format!("exported {n} file(s) of {}.{output} ({}) to {}\n", e.stage, d.short(), a.dest.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Copy (never link: an exported file is the user's to edit) and make it writable.
fn copy_writable(from: &Path, to: &Path) -> Result<(), CliError> {
    std::fs::copy(from, to).map_err(|e| CliError::Failed(format!("{}: {e}", to.display())))?;
    let mut perm = std::fs::metadata(to).map_err(|e| CliError::Failed(e.to_string()))?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(to, perm).map_err(|e| CliError::Failed(e.to_string()))
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
