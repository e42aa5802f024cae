//! `fgflow compare`: experiments side by side, from the run cache alone (nothing runs).
//!
//! A row is one cached run (entry) of a stage of the given pipeline files. Its
//! parameters are its own and those of every run upstream of it, found by following
//! the input digests of its fingerprint to the entries that produced them (columns
//! `stage.param`; a `Path` source shows as its content digest), so an edit of `lr` in a
//! training stage shows on the runs of the evaluations below it. Only the columns whose
//! value differs between the runs of a stage are shown (like `dvc exp show
//! --only-changed`), followed by the metrics that run produced.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;

use fgflow_cache::{Digest, Entry};
use fgflow_engine::{Recorded, Refs};
use serde_json::{Value, json};

use crate::app::{App, CliError, CliResult, out};
use crate::console::esc;

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline files whose stages to compare (default: the last one run or planned).
    #[arg(value_name = "PIPELINE")]
    pub pipelines: Vec<PathBuf>,
    /// Only this stage (repeatable): every cached run of it, across edits.
    #[arg(short, long, value_name = "NAME")]
    pub stage: Vec<String>,
    /// Every stage, not only those that produce metrics.
    #[arg(long)]
    pub all: bool,
    /// Markdown tables.
    #[arg(long, conflicts_with_all = ["csv", "json"])]
    pub md: bool,
    /// One CSV table (every stage's rows; empty cells where a column does not apply).
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    /// One JSON document.
    #[arg(long)]
    pub json: bool,
}

/// A stage of the given files.
struct Target {
    name: String,
    kind: String,
    /// Files whose last run of this stage is each key.
    current: HashMap<Digest, Vec<String>>,
}

/// One cached run.
struct Run {
    entry: Entry,
    /// `stage.param` (own and upstream) -> value as shown.
    params: BTreeMap<String, String>,
    metrics: Vec<(String, f64)>,
    current: Vec<String>,
}

/// Stage kinds whose runs have metrics of their own; the default selection.
fn has_metrics(kind: &str) -> bool {
    matches!(kind, "evaluate" | "train" | "pretrain" | "report" | "soup" | "clean" | "pseudo_label")
}

pub fn run(app: &App, a: Args) -> CliResult {
    let files = if a.pipelines.is_empty() { vec![app.pipeline_or_last(None)?] } else { a.pipelines.clone() };
    let mut targets: Vec<Target> = Vec::new();
    for file in &files {
        let p = app.load(file)?;
        let refs: Refs = app.store.get_doc("refs", &fgflow_engine::plan::refs_id(file)).ok().flatten().unwrap_or_default();
        for s in &p.stages {
            let t = match targets.iter_mut().position(|t| t.name == s.name) {
                Some(i) => &mut targets[i],
                None => {
                    targets.push(Target { name: s.name.clone(), kind: s.kind.name().to_string(), current: HashMap::new() });
                    targets.last_mut().expect("just pushed")
                }
            };
            if let Some(k) = refs.stages.get(&s.name) {
                t.current.entry(*k).or_default().push(file.display().to_string());
            }
        }
    }
    if !a.stage.is_empty() {
        let unknown: Vec<&String> = a.stage.iter().filter(|n| !targets.iter().any(|t| &t.name == *n)).collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
            return Err(CliError::Usage(format!(
                "no stage {} in {}; stages: {}",
                unknown.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
                names.join(", ")
            )));
        }
        targets.retain(|t| a.stage.contains(&t.name));
    } else if !a.all {
        targets.retain(|t| has_metrics(&t.kind));
    }
    // Every entry once: by stage name, and by the output digests they produced.
    let mut entries: HashMap<Digest, Entry> = HashMap::new();
    // An absent cache (nothing ever ran here) has no runs.
    let keys = if app.store.root().is_dir() { app.store.entry_keys()? } else { Vec::new() };
    for key in keys {
        // A damaged entry is `verify`'s business: it is left out here.
        if let Ok(Some(e)) = app.store.get_entry(&key) {
            entries.insert(key, e);
        }
    }
    let mut producer: HashMap<Digest, Vec<Digest>> = HashMap::new();
    let mut sorted: Vec<&Entry> = entries.values().collect();
    sorted.sort_by_key(|e| (e.created_unix, e.key));
    for e in &sorted {
        for d in e.outputs.values() {
            // Oldest first: the run chosen for some bytes stays the same whatever runs later.
            producer.entry(*d).or_default().push(e.key);
        }
    }
    let mut groups: Vec<(Target, Vec<Run>)> = Vec::new();
    for t in targets {
        let mut keys: Vec<Digest> = sorted.iter().filter(|e| e.stage == t.name && e.kind == t.kind).map(|e| e.key).collect();
        // A key shared with a stage of another name (the same computation) is this
        // stage's too when the pipeline's last run used it.
        for k in t.current.keys() {
            if entries.contains_key(k) && !keys.contains(k) {
                keys.push(*k);
            }
        }
        let mut runs: Vec<Run> = keys
            .iter()
            .filter_map(|k| entries.get(k))
            .map(|e| {
                let mut params = BTreeMap::new();
                lineage(&entries, &producer, e, &t.name, &mut params, &mut HashSet::new());
                Run { metrics: metrics(app, e), current: t.current.get(&e.key).cloned().unwrap_or_default(), params, entry: e.clone() }
            })
            .collect();
        // Oldest first; within one second, the pipelines' last runs go last.
        runs.sort_by_key(|r| (r.entry.created_unix, !r.current.is_empty(), r.entry.key));
        if !runs.is_empty() {
            groups.push((t, runs));
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let text = if a.json {
        format!("{}\n", serde_json::to_string_pretty(&to_json(&groups)).unwrap_or_default())
    } else if a.csv {
        to_csv(&groups)
    } else if groups.is_empty() {
        "no cached run of these stages: run the pipeline first\n".to_string()
    } else {
        to_tables(&groups, a.md, now)
    };
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The parameters of `e` (as `name.param`) and of every run upstream of it.
fn lineage(
    entries: &HashMap<Digest, Entry>,
    producer: &HashMap<Digest, Vec<Digest>>,
    e: &Entry,
    name: &str,
    params: &mut BTreeMap<String, String>,
    seen: &mut HashSet<(Digest, String)>,
) {
    if !seen.insert((e.key, name.to_string())) {
        return;
    }
    let Ok(rec) = serde_json::from_value::<Recorded>(e.fingerprint.clone()) else {
        params.insert(format!("{name}.(fingerprint)"), "unreadable".into());
        return;
    };
    let fp = &rec.fingerprint;
    for (k, v) in &fp.params {
        params.insert(
            format!("{name}.{k}"),
            match v {
                fgflow_engine::Value::Str(s) => s.clone(),
                v => v.to_string(),
            },
        );
    }
    for (k, ds) in &fp.sources {
        params.insert(format!("{name}.{k}"), format!("content {}", ds.iter().map(|d| d.short()).collect::<Vec<_>>().join(",")));
    }
    for (k, v) in &fp.env {
        params.insert(format!("{name}.env.{k}"), v.clone().unwrap_or_else(|| "(unset)".into()));
    }
    if let Some(b) = &fp.backend {
        params.insert(format!("{name}.backend"), b.clone());
    }
    params.insert(format!("{name}.kind_version"), fp.kind_version.to_string());
    for (port, ds) in &fp.inputs {
        let from = rec.origins.get(port).cloned().unwrap_or_default();
        for (i, d) in ds.iter().enumerate() {
            let up = from.get(i).and_then(|o| o.rsplit_once('.')).map(|(s, _)| s.to_string()).unwrap_or_else(|| format!("{name}.{port}"));
            // Two stages can produce the same bytes (two evaluations that agree): the
            // run of the stage the input came from, else the oldest.
            let runs: Vec<&Entry> = producer.get(d).map(|ks| ks.iter().filter_map(|k| entries.get(k)).collect()).unwrap_or_default();
            match runs.iter().find(|x| x.stage == up).or(runs.first()) {
                Some(upstream) => lineage(entries, producer, upstream, &up, params, seen),
                // Produced by a run no longer in the cache: its bytes still tell runs apart.
                None => {
                    params.insert(format!("{name}.input.{port}"), format!("content {}", d.short()));
                }
            }
        }
    }
}

/// What a run produced, as numbers: read from its output's JSON files.
fn metrics(app: &App, e: &Entry) -> Vec<(String, f64)> {
    let json = |output: &str, file: &str| -> Option<Value> {
        let tree = app.store.read_tree(e.outputs.get(output)?).ok()?;
        let f = tree.files.iter().find(|f| f.path == file)?;
        serde_json::from_slice(&app.store.read_blob(&f.digest).ok()?).ok()
    };
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
    let mut m = Vec::new();
    let mut push = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            m.push((name.to_string(), v));
        }
    };
    match e.kind.as_str() {
        "evaluate" => {
            if let Some(x) = json("metrics", "metrics.json") {
                push("top1", num(&x, "top1"));
                push("top5", num(&x, "top5"));
                push("mean_class_acc", num(&x, "mean_class_acc"));
                for g in x.get("groups").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(name) = g.get("group").and_then(Value::as_str) {
                        push(name, num(g, "acc"));
                    }
                }
            }
        }
        "train" | "pretrain" => {
            if let Some(last) = json("log", "log.json").and_then(|x| x.get("epochs").and_then(Value::as_array).and_then(|a| a.last().cloned())) {
                push("loss", num(&last, "loss"));
                push("train_acc", num(&last, "train_acc"));
                push("val_acc", num(&last, "val_acc"));
            }
        }
        "soup" => {
            if let Some(x) = json("report", "soup.json") {
                push("soup_val_acc", num(&x, "soup_val_acc"));
            }
        }
        "clean" => {
            if let Some(x) = json("report", "clean.json") {
                push("kept", num(&x, "kept"));
                push("dropped", num(&x, "dropped"));
                if let Some(n) = x.get("noise") {
                    push("drop_precision", num(n, "precision"));
                    push("drop_recall", num(n, "recall"));
                }
            }
        }
        "pseudo_label" => {
            if let Some(x) = json("report", "report.json") {
                push("kept", num(&x, "kept"));
                push("precision", x.get("truth").and_then(|t| num(t, "precision")));
            }
        }
        "report" => {
            if let Some(x) = json("report", "table.json") {
                for r in x.get("rows").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(label) = r.get("label").and_then(Value::as_str) {
                        push(&format!("top1 {label}"), num(r, "top1"));
                    }
                }
            }
        }
        _ => {}
    }
    m
}

/// The parameter columns whose values differ between the runs (absent counts as a value).
fn changed(runs: &[Run]) -> Vec<String> {
    let all: BTreeSet<&String> = runs.iter().flat_map(|r| r.params.keys()).collect();
    all.into_iter().filter(|k| runs.iter().map(|r| r.params.get(*k)).collect::<HashSet<_>>().len() > 1).cloned().collect()
}

fn metric_names(runs: &[Run]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for (n, _) in &r.metrics {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
}

fn metric(r: &Run, name: &str) -> Option<f64> {
    r.metrics.iter().find(|m| m.0 == name).map(|m| m.1)
}

fn fmt_metric(name: &str, v: f64) -> String {
    // Accuracies and rates are fractions: shown as percentages; counts and losses as is.
    if name.contains("acc") || name.starts_with("top") || matches!(name, "head" | "middle" | "tail" | "precision" | "drop_precision" | "drop_recall") {
        format!("{:.2}%", v * 100.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn age(now: u64, t: u64) -> String {
    let d = now.saturating_sub(t);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Within a stage's table, its own parameters lose the `stage.` prefix.
fn column(stage: &str, col: &str) -> String {
    col.strip_prefix(stage).and_then(|c| c.strip_prefix('.')).map(str::to_string).unwrap_or_else(|| col.to_string())
}

fn to_tables(groups: &[(Target, Vec<Run>)], md: bool, now: u64) -> String {
    let mut s = String::new();
    for (t, runs) in groups {
        let cols = changed(runs);
        let mets = metric_names(runs);
        let mut header = vec!["key".to_string(), "created".to_string(), "last run of".to_string()];
        header.extend(cols.iter().map(|c| column(&t.name, c)));
        header.extend(mets.iter().cloned());
        let rows: Vec<Vec<String>> = runs
            .iter()
            .map(|r| {
                let mut row = vec![r.entry.key.short(), age(now, r.entry.created_unix), if r.current.is_empty() { "-".into() } else { r.current.join(", ") }];
                row.extend(cols.iter().map(|c| r.params.get(c).cloned().unwrap_or_else(|| "-".into())));
                row.extend(mets.iter().map(|m| metric(r, m).map(|v| fmt_metric(m, v)).unwrap_or_else(|| "-".into())));
                row.into_iter().map(|c| esc(&c).into_owned()).collect()
            })
            .collect();
        let what = match (runs.len(), cols.len()) {
            (1, _) => "1 run".to_string(),
            (n, 0) => format!("{n} runs, no parameter differs"),
            (n, c) => format!("{n} runs, {c} parameter(s) differ"),
        };
        if md {
            s.push_str(&format!("### {} ({}): {what}\n\n", esc(&t.name), t.kind));
            let cell = |c: &str| c.replace('|', "\\|");
            s.push_str(&format!("| {} |\n", header.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | ")));
            s.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            for r in &rows {
                s.push_str(&format!("| {} |\n", r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")));
            }
            s.push('\n');
        } else {
            s.push_str(&format!("{} ({}): {what}\n", esc(&t.name), t.kind));
            let widths: Vec<usize> = (0..header.len())
                .map(|i| rows.iter().map(|r| r[i].chars().count()).chain(std::iter::once(header[i].chars().count())).max().unwrap_or(0))
                .collect();
            let line = |cells: &[String]| {
                let l: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                format!("  {}\n", l.join("  ").trim_end())
            };
            s.push_str(&line(&header));
            for r in &rows {
                s.push_str(&line(r));
            }
            s.push('\n');
        }
    }
    s
}

fn to_csv(groups: &[(Target, Vec<Run>)]) -> String {
    let mut cols: Vec<String> = Vec::new();
    let mut mets: Vec<String> = Vec::new();
    for (_, runs) in groups {
        for c in changed(runs) {
            if !cols.contains(&c) {
                cols.push(c);
            }
        }
        for m in metric_names(runs) {
            if !mets.contains(&m) {
                mets.push(m);
            }
        }
    }
    let mut header: Vec<&str> = vec!["stage", "kind", "key", "created_unix", "last_run_of"];
    header.extend(cols.iter().map(String::as_str));
    header.extend(mets.iter().map(String::as_str));
    let mut rows = Vec::new();
    for (t, runs) in groups {
        let own = changed(runs);
        for r in runs {
            let mut row = vec![t.name.clone(), t.kind.clone(), r.entry.key.to_hex(), r.entry.created_unix.to_string(), r.current.join(";")];
            row.extend(cols.iter().map(|c| if own.contains(c) { r.params.get(c).cloned().unwrap_or_default() } else { String::new() }));
            row.extend(mets.iter().map(|m| metric(r, m).map(|v| v.to_string()).unwrap_or_default()));
            rows.push(row);
        }
    }
    crate::report::csv(&header, &rows)
}

fn to_json(groups: &[(Target, Vec<Run>)]) -> Value {
    let stages: Vec<Value> = groups
        .iter()
        .map(|(t, runs)| {
            let cols = changed(runs);
            json!({
                "stage": t.name,
                "kind": t.kind,
                "changed": cols,
                "runs": runs.iter().map(|r| json!({
                    "key": r.entry.key.to_hex(),
                    "created_unix": r.entry.created_unix,
                    "last_run_of": r.current,
                    "params": cols.iter().map(|c| (c.clone(), r.params.get(c).map(|v| json!(v)).unwrap_or(Value::Null))).collect::<serde_json::Map<_, _>>(),
                    "metrics": r.metrics.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "stages": stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_metric_formats() {
        assert_eq!(age(100, 40), "60s ago".replace("60s", "1m"));
        assert_eq!(age(10_000, 10_000), "0s ago");
        assert_eq!(fmt_metric("top1", 0.25), "25.00%");
        assert_eq!(fmt_metric("kept", 12.0), "12");
        assert_eq!(fmt_metric("loss", 1.5), "1.5000");
        assert_eq!(column("train", "train.lr"), "lr");
        assert_eq!(column("ev", "train.lr"), "train.lr");
    }
}
