//! `fgflow report` and `run --report`: one self-contained `index.html` (inline SVG and
//! CSS, no script, no request to anywhere) for a pipeline's last run, with the data
//! beside it (`data.json` and a few CSV files). Built from cached artifacts only: it
//! never runs a stage and never reads the pipeline's data folders.
//!
//! - `mod.rs`: what the page is made of (the DAG with statuses, sections by topic, the
//!   files written), and [`Reader`], which reads artifacts out of the cache;
//! - `sections.rs`: one section per stage kind (histograms, curves, metrics, ...);
//! - `svg.rs`: the charts; `png.rs`: thumbnails as `data:` URIs.
//!
//! A stage whose artifact cannot be read (an old format, a damaged cache) gets a note in
//! its section instead of failing the report.

pub mod png;
mod sections;
pub mod svg;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use fgflow_cache::{Digest, Entry, Materialize};
use fgflow_engine::{Outcome, Pipeline, Recorded, Refs, StageResult};
use fgflow_stages::artifact::{GroundTruth, LabelledSet};
use fgflow_stages::ml::predictions::Predictions;

use crate::app::{App, CliError, Scratch};
use svg::esc;

/// More stages than this: the DAG is a table only (a drawing would be unreadable), and
/// every stage section starts collapsed.
const MAX_DRAWN: usize = 150;
/// Up to this many stages every section starts open; above it only the final stages
/// (nothing reads them: evaluations, reports) do.
const OPEN_ALL: usize = 40;

/// Where a section goes on the page.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Topic {
    Data,
    Training,
    Evaluation,
    Reports,
    Other,
}

impl Topic {
    const ALL: [Topic; 5] = [Topic::Data, Topic::Training, Topic::Evaluation, Topic::Reports, Topic::Other];

    fn of(kind: &str) -> Topic {
        match kind {
            "quickdraw" | "import_folder" | "clean" | "pseudo_label" | "redistribute" => Topic::Data,
            "train" | "pretrain" | "soup" => Topic::Training,
            "evaluate" | "ensemble" | "predict" => Topic::Evaluation,
            "report" => Topic::Reports,
            _ => Topic::Other,
        }
    }

    fn id(self) -> &'static str {
        match self {
            Topic::Data => "data",
            Topic::Training => "training",
            Topic::Evaluation => "evaluation",
            Topic::Reports => "reports",
            Topic::Other => "other",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Topic::Data => "Data",
            Topic::Training => "Training",
            Topic::Evaluation => "Evaluation",
            Topic::Reports => "Reports",
            Topic::Other => "Other stages",
        }
    }
}

/// A stage as the report shows it.
pub struct StageView {
    pub index: usize,
    pub name: String,
    pub kind: String,
    /// `ran`, `reused`, `failed`, `skipped` (after `run`), `cached` or `not run` (`report`).
    pub status: &'static str,
    pub key: Option<Digest>,
    pub duration_ms: Option<u64>,
    pub error: Option<String>,
    pub entry: Option<Entry>,
    pub upstream: Vec<String>,
    pub is_final: bool,
}

impl StageView {
    pub fn anchor(&self) -> String {
        anchor(self.index, &self.name)
    }

    /// The tree digest of one of this stage's outputs.
    pub fn output(&self, name: &str) -> Option<Digest> {
        self.entry.as_ref().and_then(|e| e.outputs.get(name).copied())
    }

    /// What the entry's fingerprint recorded (params, input digests, where they came from).
    pub fn recorded(&self) -> Option<Recorded> {
        self.entry.as_ref().and_then(|e| serde_json::from_value(e.fingerprint.clone()).ok())
    }

    /// The tree digests connected to an input port, with the `stage.output` they came from.
    pub fn inputs(&self, port: &str) -> Vec<(Digest, String)> {
        let Some(r) = self.recorded() else { return Vec::new() };
        let from = r.origins.get(port).cloned().unwrap_or_default();
        r.fingerprint
            .inputs
            .get(port)
            .map(|ds| ds.iter().enumerate().map(|(i, d)| (*d, from.get(i).cloned().unwrap_or_default())).collect())
            .unwrap_or_default()
    }

    pub fn input(&self, port: &str) -> Option<Digest> {
        self.inputs(port).first().map(|x| x.0)
    }
}

/// `stage-<n>-<name with anything unusual replaced>`: unique (the index) and safe in an
/// id and a `#` link whatever the stage is called.
pub fn anchor(index: usize, name: &str) -> String {
    let slug: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(60).collect();
    format!("stage-{index}-{slug}")
}

/// What a section builder returns.
#[derive(Default)]
pub struct Section {
    pub html: String,
    /// Extracted numbers, for `data.json`.
    pub data: serde_json::Value,
}

/// Rows of the CSV files written beside the page.
#[derive(Default)]
pub struct Csvs {
    pub epochs: Vec<Vec<String>>,
    pub metrics: Vec<Vec<String>>,
    pub per_class: Vec<Vec<String>>,
    pub tables: Vec<Vec<String>>,
}

/// Reads artifacts out of the cache: small JSON files straight from their blobs, the
/// rest laid out (hard links) in a scratch directory, each tree once.
pub struct Reader<'a> {
    pub app: &'a App,
    tmp: Scratch,
    dirs: RefCell<HashMap<Digest, Result<PathBuf, String>>>,
    sets: RefCell<HashMap<Digest, Result<Rc<LabelledSet>, String>>>,
    truths: RefCell<HashMap<Digest, Result<Rc<GroundTruth>, String>>>,
}

impl<'a> Reader<'a> {
    pub fn new(app: &'a App) -> Result<Reader<'a>, CliError> {
        Ok(Reader { app, tmp: app.tempdir("report-")?, dirs: Default::default(), sets: Default::default(), truths: Default::default() })
    }

    /// A JSON file of an artifact (path relative to the artifact's root).
    pub fn json(&self, tree: &Digest, file: &str) -> Result<serde_json::Value, String> {
        let t = self.app.store.read_tree(tree).map_err(|e| e.to_string())?;
        let f = t.files.iter().find(|f| f.path == file).ok_or_else(|| format!("the artifact has no `{file}`"))?;
        let bytes = self.app.store.read_blob(&f.digest).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{file}: {e}"))
    }

    /// The artifact laid out in a directory.
    pub fn dir(&self, tree: &Digest) -> Result<PathBuf, String> {
        if let Some(r) = self.dirs.borrow().get(tree) {
            return r.clone();
        }
        let dest = self.tmp.path().join(tree.to_hex());
        let r = self.app.store.materialize(tree, &dest, Materialize::Link).map(|_| dest).map_err(|e| e.to_string());
        self.dirs.borrow_mut().insert(*tree, r.clone());
        r
    }

    pub fn labelled(&self, tree: &Digest) -> Result<Rc<LabelledSet>, String> {
        if let Some(r) = self.sets.borrow().get(tree) {
            return r.clone();
        }
        let r = self.dir(tree).and_then(|d| fgflow_stages::artifact::read_labelled_set(&d).map(Rc::new).map_err(|e| e.to_string()));
        self.sets.borrow_mut().insert(*tree, r.clone());
        r
    }

    pub fn truth(&self, tree: &Digest) -> Result<Rc<GroundTruth>, String> {
        if let Some(r) = self.truths.borrow().get(tree) {
            return r.clone();
        }
        let r = self.dir(tree).and_then(|d| fgflow_stages::artifact::read_ground_truth(&d).map(Rc::new).map_err(|e| e.to_string()));
        self.truths.borrow_mut().insert(*tree, r.clone());
        r
    }

    pub fn images(&self, tree: &Digest) -> Result<fgflow_stages::artifact::ImageSet, String> {
        self.dir(tree).and_then(|d| fgflow_stages::artifact::read_image_set(&d).map_err(|e| e.to_string()))
    }

    /// Predictions; `sub` is a folder inside the artifact (`oof` of `clean`'s report).
    pub fn predictions(&self, tree: &Digest, sub: &str) -> Result<Predictions, String> {
        self.dir(tree).and_then(|d| Predictions::read(&d.join(sub)).map_err(|e| e.to_string()))
    }
}

/// The stages of `p` as last run: from `results` when the report follows a run, else
/// from the pipeline's refs (the key of each stage's last successful run).
fn stage_views(app: &App, p: &Pipeline, results: Option<&[StageResult]>) -> Result<(Vec<StageView>, Option<String>), CliError> {
    let mut note = None;
    let refs: Refs = match app.store.get_doc::<Refs>("refs", &fgflow_engine::plan::refs_id(&p.file)) {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            note = Some(format!("the record of the last run is unreadable ({e}): no stage shows a result"));
            Refs::default()
        }
    };
    let by_name: HashMap<&str, &StageResult> = results.unwrap_or(&[]).iter().map(|r| (r.name.as_str(), r)).collect();
    let mut views = Vec::new();
    // Who reads whom, once (Pipeline::downstream is linear per call).
    let mut read_by: HashMap<&str, usize> = HashMap::new();
    for s in &p.stages {
        for u in s.upstream() {
            *read_by.entry(u).or_default() += 1;
        }
    }
    for (index, s) in p.stages.iter().enumerate() {
        let (status, key, duration_ms, error) = match (results, by_name.get(s.name.as_str())) {
            (Some(_), Some(r)) => {
                let status = match r.status {
                    Outcome::Ran => "ran",
                    Outcome::Reused => "reused",
                    Outcome::Failed => "failed",
                    Outcome::Skipped => "skipped",
                };
                (status, r.key.filter(|_| matches!(r.status, Outcome::Ran | Outcome::Reused)), Some(r.duration_ms), r.error.clone())
            }
            _ => (if refs.stages.contains_key(&s.name) { "cached" } else { "not run" }, refs.stages.get(&s.name).copied(), None, None),
        };
        let entry = match key {
            Some(k) => app.store.get_entry(&k).ok().flatten(),
            None => None,
        };
        let status = if status == "cached" && entry.is_none() { "not run" } else { status };
        // A reused stage took no time now: show what computing its result took.
        let duration_ms = if status == "reused" { entry.as_ref().map(|e| e.duration_ms) } else { duration_ms.or(entry.as_ref().map(|e| e.duration_ms)) };
        views.push(StageView {
            index,
            name: s.name.clone(),
            kind: s.kind.name().to_string(),
            status,
            key,
            duration_ms,
            error,
            entry,
            upstream: s.upstream().iter().map(|u| u.to_string()).collect(),
            is_final: !read_by.contains_key(s.name.as_str()),
        });
    }
    Ok((views, note))
}

/// Write the report of `p` into `out` (created if needed); returns the page's path.
pub fn write(app: &App, p: &Pipeline, results: Option<&[StageResult]>, out: &Path) -> Result<PathBuf, CliError> {
    let (views, note) = stage_views(app, p, results)?;
    let reader = Reader::new(app)?;
    let mut csvs = Csvs::default();
    let mut by_topic: BTreeMap<Topic, Vec<(usize, Section)>> = BTreeMap::new();
    let mut data = Vec::new();
    for v in &views {
        let section = if v.entry.is_some() { sections::build(&reader, v, &views, &mut csvs) } else { Section::default() };
        let params = v
            .recorded()
            .map(|r| serde_json::to_value(&r.fingerprint.params).unwrap_or_default())
            .unwrap_or_else(|| p.stages.get(v.index).map(|s| serde_json::to_value(&s.params.0).unwrap_or_default()).unwrap_or_default());
        data.push(serde_json::json!({
            "name": v.name, "kind": v.kind, "status": v.status, "key": v.key.map(|k| k.to_hex()),
            "duration_ms": v.duration_ms, "error": v.error, "upstream": v.upstream,
            "created_unix": v.entry.as_ref().map(|e| e.created_unix), "params": params, "data": section.data,
        }));
        by_topic.entry(Topic::of(&v.kind)).or_default().push((v.index, Section { html: section.html, data: serde_json::Value::Null }));
    }
    let html = page(p, &views, &by_topic, note.as_deref());
    let fail = |path: &Path, e: std::io::Error| CliError::Failed(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(out).map_err(|e| fail(out, e))?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), CliError> {
        let path = out.join(name);
        // Temp file + rename: a browser reloading the page never sees half of it.
        let tmp = out.join(format!(".{name}.tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(&path, e)
        })
    };
    let doc = serde_json::json!({ "pipeline": p.file.to_string_lossy(), "stages": data });
    write("data.json", serde_json::to_string_pretty(&doc).unwrap_or_default().as_bytes())?;
    let stage_rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.kind.clone(),
                v.status.to_string(),
                v.key.map(|k| k.to_hex()).unwrap_or_default(),
                v.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    write("stages.csv", csv(&["stage", "kind", "status", "key", "duration_ms"], &stage_rows).as_bytes())?;
    write("epochs.csv", csv(&["stage", "epoch", "loss", "train_acc", "val_acc", "lr"], &csvs.epochs).as_bytes())?;
    write("metrics.csv", csv(&["stage", "evaluated_on", "n", "top1", "top5", "mean_class_acc", "head", "middle", "tail"], &csvs.metrics).as_bytes())?;
    write("per_class.csv", csv(&["stage", "class", "n", "correct", "acc", "train_count", "group"], &csvs.per_class).as_bytes())?;
    write(
        "tables.csv",
        csv(&["stage", "title", "row", "evaluated_on", "top1", "delta_top1", "top5", "mean_class_acc", "head", "middle", "tail"], &csvs.tables).as_bytes(),
    )?;
    write("index.html", html.as_bytes())?;
    Ok(out.join("index.html"))
}

/// RFC 4180 CSV: fields with a comma, quote or line break are quoted.
pub fn csv(header: &[&str], rows: &[Vec<String>]) -> String {
    let field = |f: &str| if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.to_string() };
    let mut s = header.join(",");
    s.push('\n');
    for r in rows {
        s.push_str(&r.iter().map(|f| field(f)).collect::<Vec<_>>().join(","));
        s.push('\n');
    }
    s
}

pub fn ms(d: u64) -> String {
    if d >= 60_000 {
        format!("{}m{:02}s", d / 60_000, d % 60_000 / 1000)
    } else if d >= 1000 {
        format!("{:.1}s", d as f64 / 1000.0)
    } else {
        format!("{d}ms")
    }
}

const CSS: &str = r#"
:root{--fg:#1d2330;--muted:#667085;--line:#e3e6eb;--bg:#fff;--card:#f7f8fa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0 auto;max-width:1400px;padding:0 24px 48px}
header{padding:18px 0 8px;border-bottom:1px solid var(--line)}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;padding-top:8px;border-top:2px solid var(--line)}
h3{font-size:14px;margin:14px 0 6px}
nav a{margin-right:14px}.files{margin:4px 0}a{color:#2e5bb8;text-decoration:none}a:hover{text-decoration:underline}
.muted{color:var(--muted)}.mono,code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.counts span{margin-right:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right}th{background:var(--card);font-weight:600}
.badge{display:inline-block;border-radius:9px;padding:0 8px;font-size:12px;color:#fff;min-width:58px;text-align:center}
.st-ran{background:#3ca951}.st-reused,.st-cached{background:#4269d0}.st-failed{background:#d62728}.st-skipped,.st-not-run{background:#9498a0}
details.stage{border:1px solid var(--line);border-radius:6px;margin:10px 0;background:var(--bg)}
details.stage>summary{cursor:pointer;padding:8px 12px;background:var(--card);border-radius:6px;list-style-position:inside}
details.stage>summary b{font-size:15px;margin:0 6px}
details.stage>.body{padding:4px 14px 12px}
.charts{display:flex;flex-wrap:wrap;gap:10px 18px;align-items:flex-start}
svg.chart{max-width:100%;height:auto;background:#fff}
svg .ct{font:600 13px system-ui,sans-serif;fill:#1d2330}svg .tk{font:11px system-ui,sans-serif;fill:#444}svg .al{font:12px system-ui,sans-serif;fill:#333}
svg .grid{stroke:#eceef2;stroke-width:1}svg .ax{stroke:#888;stroke-width:1}
.big{display:flex;gap:28px;margin:8px 0}.big div{font-size:12px;color:var(--muted)}.big b{display:block;font-size:24px;color:var(--fg)}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{margin:0;width:92px;font-size:11px;line-height:1.25}
.thumbs img{width:84px;height:84px;image-rendering:pixelated;border:1px solid var(--line);background:#fff}
.ok{color:#2b8a3e}.bad{color:#c92a2a}
pre{background:var(--card);padding:8px 10px;overflow:auto;font-size:12px;max-height:420px}
.dag{overflow:auto;border:1px solid var(--line);border-radius:6px;padding:6px;margin-bottom:10px}
.dag svg text{font:11px system-ui,sans-serif}
.note{background:#fff4e5;border-left:3px solid #efb118;padding:6px 10px;margin:8px 0}
"#;

fn page(p: &Pipeline, views: &[StageView], by_topic: &BTreeMap<Topic, Vec<(usize, Section)>>, note: Option<&str>) -> String {
    let file = p.file.display().to_string();
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>fgflow report: {}</title><style>{CSS}</style></head><body>\n",
        esc(&file)
    );
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in views {
        *counts.entry(v.status).or_default() += 1;
    }
    let _ = write!(h, "<header><h1>fgflow report <span class=\"mono\">{}</span></h1><div class=\"counts\">", esc(&file));
    let _ = write!(h, "<span>{} stages</span>", views.len());
    for (st, n) in &counts {
        let _ = write!(h, "<span><span class=\"badge st-{}\">{}</span> {n}</span>", st.replace(' ', "-"), esc(st));
    }
    let total: u64 = views.iter().filter(|v| v.status == "ran").filter_map(|v| v.duration_ms).sum();
    if total > 0 {
        let _ = write!(h, "<span class=\"muted\">stage time of this run {}</span>", ms(total));
    }
    h.push_str("</div><nav><a href=\"#dag\">Pipeline</a>");
    for t in Topic::ALL {
        if by_topic.get(&t).is_some_and(|s| !s.is_empty()) {
            let _ = write!(h, "<a href=\"#{}\">{}</a>", t.id(), t.title());
        }
    }
    h.push_str(
        "</nav><p class=\"muted files\">Data beside this page: <a href=\"data.json\">data.json</a>, <a href=\"stages.csv\">stages.csv</a>, <a href=\"epochs.csv\">epochs.csv</a>, <a href=\"metrics.csv\">metrics.csv</a>, <a href=\"per_class.csv\">per_class.csv</a>, <a href=\"tables.csv\">tables.csv</a></p></header>\n",
    );
    if let Some(n) = note {
        let _ = write!(h, "<p class=\"note\">{}</p>", esc(n));
    }
    h.push_str("<section id=\"dag\"><h2>Pipeline</h2>");
    if views.len() <= MAX_DRAWN {
        h.push_str("<div class=\"dag\">");
        h.push_str(&dag_svg(views));
        h.push_str("</div>");
    } else {
        let _ = write!(h, "<p class=\"muted\">{} stages: the graph is listed, not drawn.</p>", views.len());
    }
    h.push_str(&stage_table(views));
    h.push_str("</section>\n");
    let open_all = views.len() <= OPEN_ALL;
    let finals = views.iter().filter(|v| v.is_final).count();
    for t in Topic::ALL {
        let secs = by_topic.get(&t).map(Vec::as_slice).unwrap_or(&[]);
        if secs.is_empty() {
            continue;
        }
        let _ = write!(h, "<section id=\"{}\"><h2>{}</h2>", t.id(), t.title());
        for (i, s) in secs {
            let v = &views[*i];
            let open = v.entry.is_some() && (open_all || (v.is_final && finals <= 20 && views.len() <= MAX_DRAWN * 4));
            let _ = write!(
                h,
                "<details class=\"stage\" id=\"{}\"{}><summary><span class=\"badge st-{}\">{}</span><b>{}</b><span class=\"muted\">{}",
                v.anchor(),
                if open { " open" } else { "" },
                v.status.replace(' ', "-"),
                v.status,
                esc(&v.name),
                esc(&v.kind)
            );
            if let Some(k) = v.key {
                let _ = write!(h, " · <span class=\"mono\">{}</span>", k.short());
            }
            if let Some(d) = v.duration_ms {
                let _ = write!(h, " · {}", ms(d));
            }
            h.push_str("</span></summary><div class=\"body\">");
            if let Some(e) = &v.error {
                let _ = write!(h, "<pre class=\"bad\">{}</pre>", esc(e));
            }
            if v.entry.is_none() {
                h.push_str("<p class=\"muted\">No result in the cache: this stage has not run successfully yet.</p>");
            }
            h.push_str(&s.html);
            h.push_str(&params_block(v));
            h.push_str("</div></details>\n");
        }
        h.push_str("</section>\n");
    }
    h.push_str("<footer class=\"muted\"><p>Written by fgflow from cached results only; no stage was run to make this page.</p></footer></body></html>\n");
    h
}

fn params_block(v: &StageView) -> String {
    let Some(r) = v.recorded() else { return String::new() };
    let mut s = String::from("<details><summary class=\"muted\">parameters and inputs</summary><table>");
    for (k, val) in &r.fingerprint.params {
        let _ = write!(s, "<tr><td>{}</td><td class=\"mono\">{}</td></tr>", esc(k), esc(&val.to_string()));
    }
    for (port, from) in &r.origins {
        let _ = write!(s, "<tr><td>input {}</td><td class=\"mono\">{}</td></tr>", esc(port), esc(&from.join(", ")));
    }
    if let Some(b) = &r.fingerprint.backend {
        let _ = write!(s, "<tr><td>backend</td><td class=\"mono\">{}</td></tr>", esc(b));
    }
    s.push_str("</table></details>");
    s
}

fn stage_table(views: &[StageView]) -> String {
    let mut s = String::from("<table><tr><th>stage</th><th>kind</th><th>status</th><th class=\"n\">duration</th><th>key</th><th>reads</th></tr>");
    for v in views {
        let _ = write!(
            s,
            "<tr><td><a href=\"#{}\">{}</a></td><td>{}</td><td><span class=\"badge st-{}\">{}</span></td><td class=\"n\">{}</td><td class=\"mono\">{}</td><td class=\"muted\">{}</td></tr>",
            v.anchor(),
            esc(&v.name),
            esc(&v.kind),
            v.status.replace(' ', "-"),
            v.status,
            v.duration_ms.map(ms).unwrap_or_default(),
            v.key.map(|k| k.short()).unwrap_or_else(|| "-".into()),
            esc(&v.upstream.join(", "))
        );
    }
    s.push_str("</table>");
    s
}

/// The DAG drawn top-down in layers (a stage's layer = 1 + its deepest input's), each
/// layer ordered by the mean position of its inputs, boxes coloured by status and
/// linked to their sections.
fn dag_svg(views: &[StageView]) -> String {
    let index: HashMap<&str, usize> = views.iter().map(|v| (v.name.as_str(), v.index)).collect();
    // Views are in topological order, so one pass gives every layer.
    let mut layer = vec![0usize; views.len()];
    for v in views {
        layer[v.index] = v.upstream.iter().filter_map(|u| index.get(u.as_str())).map(|&u| layer[u] + 1).max().unwrap_or(0);
    }
    let depth = layer.iter().copied().max().map_or(0, |m| m + 1);
    // A wide layer (twenty evaluations of one round) is wrapped into rows of at most
    // `PER_ROW` boxes, so the page never needs a 3000-pixel scroll; each layer is
    // ordered by where its inputs were drawn (their mean x), which keeps edges short.
    const PER_ROW: usize = 7;
    let (bw, bh, gx, gy) = (150.0, 34.0, 14.0, 30.0);
    let width = PER_ROW.min(views.len().max(1)) as f64 * (bw + gx) + gx;
    let mut at = vec![(0f64, 0f64); views.len()];
    let mut row = 0usize;
    for l in 0..depth {
        let mut members: Vec<(f64, usize)> = views
            .iter()
            .filter(|v| layer[v.index] == l)
            .map(|v| {
                let ups: Vec<f64> = v.upstream.iter().filter_map(|u| index.get(u.as_str())).map(|&u| at[u].0).collect();
                let bary = if ups.is_empty() { v.index as f64 * 1e-6 } else { ups.iter().sum::<f64>() / ups.len() as f64 };
                (bary, v.index)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for chunk in members.chunks(PER_ROW) {
            let n = chunk.len() as f64;
            let offset = (width - n * (bw + gx) + gx) / 2.0;
            for (k, (_, i)) in chunk.iter().enumerate() {
                at[*i] = (offset + k as f64 * (bw + gx), gy / 2.0 + row as f64 * (bh + gy));
            }
            row += 1;
        }
    }
    let height = row as f64 * (bh + gy) + gy;
    let xy = |i: usize| at[i];
    let mut s = format!(
        r#"<svg viewBox="0 0 {width:.0} {height:.0}" width="{width:.0}" height="{height:.0}" role="img" aria-label="stage graph"><title>stage graph</title>"#
    );
    s.push_str(r##"<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#a0a6b0"/></marker></defs>"##);
    for v in views {
        let (x2, y2) = xy(v.index);
        for u in v.upstream.iter().filter_map(|u| index.get(u.as_str())) {
            let (x1, y1) = xy(*u);
            let (ax, ay, bx, by) = (x1 + bw / 2.0, y1 + bh, x2 + bw / 2.0, y2);
            let my = (ay + by) / 2.0;
            let _ = write!(
                s,
                r##"<path d="M{ax:.1},{ay:.1} C{ax:.1},{my:.1} {bx:.1},{my:.1} {bx:.1},{by:.1}" fill="none" stroke="#b8bdc6" stroke-width="1.2" marker-end="url(#arrow)"/>"##
            );
        }
    }
    for v in views {
        let (x, y) = xy(v.index);
        let fill = match v.status {
            "ran" => "#3ca951",
            "reused" | "cached" => "#4269d0",
            "failed" => "#d62728",
            _ => "#9498a0",
        };
        let name: String = if v.name.chars().count() > 22 { v.name.chars().take(21).chain(std::iter::once('…')).collect() } else { v.name.clone() };
        let sub = format!("{}{}", v.kind, v.duration_ms.map(|d| format!(" · {}", ms(d))).unwrap_or_default());
        let _ = write!(
            s,
            r##"<a href="#{}"><title>{} ({}): {}{}</title><rect x="{x:.1}" y="{y:.1}" width="{bw}" height="{bh}" rx="5" fill="{fill}"/><text x="{:.1}" y="{:.1}" fill="#fff" text-anchor="middle" font-weight="600">{}</text><text x="{:.1}" y="{:.1}" fill="#eef" text-anchor="middle" font-size="10">{}</text></a>"##,
            v.anchor(),
            esc(&v.name),
            esc(&v.kind),
            v.status,
            v.key.map(|k| format!(", key {}", k.short())).unwrap_or_default(),
            x + bw / 2.0,
            y + 14.0,
            esc(&name),
            x + bw / 2.0,
            y + 27.0,
            esc(&sub)
        );
    }
    s.push_str("</svg>");
    s
}
