//! Importing a user's own crawled images in the seed's layout:
//!
//! ```text
//! root/train/<class>/*.jpg|jpeg|png     (or a `train_list`: `relative/path.jpg <class index>` lines)
//! root/testa/**.jpg|png                 (or a `testa_list`: `relative/path.jpg` lines)
//! root/testb/**.jpg|png                 (or a `testb_list`)
//! root/<classes file>                   (optional: one class name per line, line i = id i)
//! ```
//!
//! Every image file goes into one image store (`crate::store`) as it came, its bytes
//! once however many sets name it; the sets are rows over that store. Nothing is
//! decoded or resized here: the model's `image_size` decides the resolution, when the
//! loader reads the images. Each file is checked cheaply instead (its header gives a
//! JPEG or PNG of a non-empty size, and it ends with that format's end marker, which a
//! copy cut short lacks). Problems (unreadable, foreign or truncated files, a list line
//! whose file does not exist, a class index out of range, an empty class folder, a path
//! or symbolic link that leaves the data folder) stop the import with a message naming
//! the file (and list line), or with `on_bad_image: "skip"` are left out and counted in
//! the report. The first problem in file order is the one reported, so the message does
//! not depend on thread timing.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Component, Path};
use std::sync::Arc;

use fgflow_engine::StageError;
use rayon::prelude::*;
use serde::Serialize;

use crate::artifact::{ImageSet, LabelledSet};
use crate::store::{Encoding, Store, StoreBuilder, check_file};
use crate::data::rng::{DetRng, Stream};

pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
pub const REPORT_FILE: &str = "import_report.json";

#[derive(Debug, Clone)]
pub struct ImportConfig {
    /// What the images decode to: 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// Leave bad images out (and count them) instead of failing.
    pub skip_bad: bool,
    /// File names relative to the root; `None` = use the folder layout.
    pub classes_file: Option<String>,
    pub train_list: Option<String>,
    pub testa_list: Option<String>,
    pub testb_list: Option<String>,
    /// Images per class moved from training to validation (a class keeps at least one).
    pub val_per_class: usize,
    pub seed: u64,
}

/// One image left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// What was left out of one set; written next to it as `import_report.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Classes with no usable training image (kept in the label space).
    pub empty_classes: Vec<String>,
    /// Files under the scanned folders without an image extension.
    pub ignored_files: usize,
    pub skipped: Vec<Skipped>,
}

pub struct Imported {
    pub train: LabelledSet,
    pub val: LabelledSet,
    pub testa: ImageSet,
    pub testb: ImageSet,
    pub train_report: Report,
    pub testa_report: Report,
    pub testb_report: Report,
}

/// Where a candidate image came from, for messages.
struct Entry {
    /// Relative to the root, `/`-separated: the image's id.
    rel: String,
    label: Option<u32>,
    /// `train.txt:12` when it came from a list.
    origin: Option<String>,
}

impl Entry {
    fn describe(&self, root: &Path) -> String {
        let file = root.join(&self.rel).display().to_string();
        match &self.origin {
            Some(o) => format!("{o}: {file}"),
            None => file,
        }
    }
}

/// A problem that `skip` mode may step over.
struct Bad {
    file: String,
    reason: String,
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn rel_string(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Paths in lists must stay inside the root: the engine hashes only the root, so a
/// file outside it could change without the stage noticing.
fn inside_root(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn read_text(path: &Path) -> Result<String, StageError> {
    fs::read_to_string(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))
}

/// Image files under `dir`, sorted by path, recursively; plus how many other files.
fn scan(root: &Path, dir: &Path) -> Result<(Vec<String>, usize), StageError> {
    let mut images = Vec::new();
    let mut ignored = 0;
    for e in walkdir::WalkDir::new(dir).min_depth(1).follow_links(true).sort_by_file_name() {
        let e = e.map_err(|e| StageError::failed(format!("{}: {e}", e.path().unwrap_or(dir).display())))?;
        if !e.file_type().is_file() {
            continue;
        }
        if is_image(e.path()) {
            images.push(rel_string(root, e.path()));
        } else {
            ignored += 1;
        }
    }
    Ok((images, ignored))
}

fn subdirs(dir: &Path) -> Result<Vec<String>, StageError> {
    let rd = fs::read_dir(dir).map_err(|e| StageError::io(format!("listing {}", dir.display()), e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| StageError::io(format!("listing {}", dir.display()), e))?;
        if e.path().is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The label space: the classes file if given, else the sorted `train/` sub-folders.
fn class_names(root: &Path, cfg: &ImportConfig) -> Result<Vec<String>, StageError> {
    let classes = match &cfg.classes_file {
        Some(f) => {
            let path = root.join(f);
            let text = read_text(&path)?;
            let mut names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
            while names.last().is_some_and(|l| l.is_empty()) {
                names.pop();
            }
            if let Some(i) = names.iter().position(|l| l.is_empty()) {
                return Err(StageError::failed(format!("{}:{}: empty class name", path.display(), i + 1)));
            }
            names
        }
        None => {
            let train = root.join("train");
            if !train.is_dir() {
                return Err(StageError::failed(format!("{}: no train/ folder; give a `classes` file or create train/<class>/ folders", root.display())));
            }
            subdirs(&train)?
        }
    };
    if classes.is_empty() {
        return Err(StageError::failed(format!("{}: no classes found", root.display())));
    }
    Ok(classes)
}

/// Parses an annotation list. `labelled`: lines are `path <class index>`; otherwise
/// lines are a path, optionally followed by an index that is ignored (test lists in
/// the seed's format). Blank lines and `#` comments are skipped.
fn read_list(root: &Path, name: &str, labelled: bool, n_classes: usize) -> Result<(Vec<Entry>, Vec<Bad>), StageError> {
    let path = root.join(name);
    let text = read_text(&path)?;
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let origin = format!("{}:{}", path.display(), i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Split at the last whitespace so paths with spaces survive.
        let (rel, index) = match line.rsplit_once(char::is_whitespace) {
            Some((p, idx)) if idx.parse::<i64>().is_ok() || labelled => (p.trim_end(), Some(idx)),
            _ => (line, None),
        };
        let mut fail = |reason: String| bad.push(Bad { file: origin.clone(), reason });
        if !inside_root(rel) {
            fail(format!("path `{rel}` is not relative to the data folder (absolute, or with `..`)"));
            continue;
        }
        let label = if labelled {
            let Some(index) = index else {
                fail(format!("expected `relative/path <class index>`, found `{line}`"));
                continue;
            };
            match index.parse::<u64>() {
                Ok(v) if v < n_classes as u64 => Some(v as u32),
                Ok(v) => {
                    fail(format!("class index {v} out of range ({n_classes} classes, ids 0..={})", n_classes - 1));
                    continue;
                }
                Err(_) => {
                    fail(format!("class index `{index}` is not a non-negative integer"));
                    continue;
                }
            }
        } else {
            None
        };
        entries.push(Entry { rel: rel.to_string(), label, origin: Some(origin) });
    }
    Ok((entries, bad))
}

/// One file's bytes, after checking that it stays inside the root (a symbolic link may
/// point anywhere; the engine hashes only what is inside) and is a whole JPEG or PNG.
fn read_checked(root: &Path, canonical_root: &Path, rel: &str) -> Result<Vec<u8>, String> {
    let path = root.join(rel);
    let real = fs::canonicalize(&path).map_err(|e| format!("cannot read: {e}"))?;
    if !real.starts_with(canonical_root) {
        return Err(format!("a symbolic link that leaves the data folder (to {})", real.display()));
    }
    let bytes = fs::read(&real).map_err(|e| format!("cannot read: {e}"))?;
    check_file(&bytes).map_err(|e| format!("not a readable image: {e}"))?;
    Ok(bytes)
}

/// Entries read and checked in parallel, a chunk at a time (memory stays a chunk of
/// files), then, in entry order, stored, or failed at the first bad one, or recorded
/// as skipped. Returns the kept entries and their images' indices in the store.
#[allow(clippy::too_many_arguments)]
fn store_all(
    root: &Path,
    cfg: &ImportConfig,
    store: &mut StoreBuilder,
    entries: Vec<Entry>,
    mut bad: Vec<Bad>,
    report: &mut Report,
    progress: &(dyn Fn(u64, u64, &str) + Sync),
    what: &str,
) -> Result<(Vec<Entry>, Vec<u32>), StageError> {
    if let Some(b) = bad.first().filter(|_| !cfg.skip_bad) {
        return Err(StageError::failed(format!("{}: {}", b.file, b.reason)));
    }
    let canonical_root = fs::canonicalize(root).map_err(|e| StageError::io(format!("reading {}", root.display()), e))?;
    let total = entries.len() as u64;
    let mut kept = Vec::with_capacity(entries.len());
    let mut rows = Vec::with_capacity(entries.len());
    let mut done = 0u64;
    let mut entries = entries.into_iter().peekable();
    while entries.peek().is_some() {
        let chunk: Vec<Entry> = entries.by_ref().take(256).collect();
        let read: Vec<Result<Vec<u8>, String>> = chunk.par_iter().map(|e| read_checked(root, &canonical_root, &e.rel)).collect();
        for (e, r) in chunk.into_iter().zip(read) {
            match r {
                Ok(bytes) => {
                    rows.push(store.push(&bytes)?);
                    kept.push(e);
                }
                Err(reason) if cfg.skip_bad => bad.push(Bad { file: e.describe(root), reason }),
                Err(reason) => return Err(StageError::failed(format!("{}: {reason}", e.describe(root)))),
            }
        }
        done += 256.min(total - done);
        progress(done, total, what);
    }
    report.skipped.extend(bad.into_iter().map(|b| Skipped { file: b.file, reason: b.reason }));
    Ok((kept, rows))
}

fn image_set(store: &Arc<Store>, classes: &[String], entries: &[Entry], rows: Vec<u32>) -> ImageSet {
    ImageSet { store: store.clone(), rows, ids: entries.iter().map(|e| e.rel.clone()).collect(), classes: classes.to_vec() }
}

/// Training entries from the folder layout: `train/<class>/...`.
fn train_from_folders(root: &Path, classes: &[String], cfg: &ImportConfig, report: &mut Report) -> Result<(Vec<Entry>, Vec<Bad>), StageError> {
    let train = root.join("train");
    let folders = subdirs(&train)?;
    let index: BTreeMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    if let Some(f) = folders.iter().find(|f| !index.contains_key(f.as_str())) {
        let list = cfg.classes_file.as_deref().unwrap_or("the classes file");
        return Err(StageError::failed(format!("{}: class folder `{f}` is not in {list}", train.join(f).display())));
    }
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (id, name) in classes.iter().enumerate() {
        let dir = train.join(name);
        let (files, ignored) = if dir.is_dir() { scan(root, &dir)? } else { (Vec::new(), 0) };
        report.ignored_files += ignored;
        if files.is_empty() {
            let reason = if dir.is_dir() {
                format!("empty class folder (no {} files)", IMAGE_EXTENSIONS.join("/"))
            } else {
                "class has no folder under train/".to_string()
            };
            bad.push(Bad { file: dir.display().to_string(), reason });
        }
        entries.extend(files.into_iter().map(|rel| Entry { rel, label: Some(id as u32), origin: None }));
    }
    Ok((entries, bad))
}

/// Test entries: from a list if given, else every image under `root/<folder>/`.
fn test_entries(root: &Path, folder: &str, list: Option<&str>, report: &mut Report, log: &dyn Fn(String)) -> Result<(Vec<Entry>, Vec<Bad>), StageError> {
    if let Some(list) = list {
        return read_list(root, list, false, 0);
    }
    let dir = root.join(folder);
    if !dir.is_dir() {
        log(format!("{}: no such folder; `{folder}` is empty", dir.display()));
        return Ok((Vec::new(), Vec::new()));
    }
    let (files, ignored) = scan(root, &dir)?;
    report.ignored_files += ignored;
    Ok((files.into_iter().map(|rel| Entry { rel, label: None, origin: None }).collect(), Vec::new()))
}

/// Moves up to `val_per_class` images of each class (by given label, chosen at random
/// with the seed) to validation; a class always keeps one training image. Both sets
/// keep file order.
fn carve_val(set: &LabelledSet, cfg: &ImportConfig) -> (LabelledSet, LabelledSet) {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); set.n_classes()];
    for (i, &l) in set.labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let mut rng = DetRng::new(cfg.seed, Stream::ValSplit);
    let mut to_val = vec![false; set.labels.len()];
    for members in &mut by_class {
        let take = cfg.val_per_class.min(members.len().saturating_sub(1));
        rng.shuffle(members);
        for &i in &members[..take] {
            to_val[i] = true;
        }
    }
    let (val, train): (Vec<usize>, Vec<usize>) = (0..set.labels.len()).partition(|&i| to_val[i]);
    (set.select(&train), set.select(&val))
}

/// Imports `root`, its image store built in `store_dir`. `progress(done, total,
/// message)` and `log` go to the stage.
pub fn import(root: &Path, cfg: &ImportConfig, store_dir: &Path, progress: &(dyn Fn(u64, u64, &str) + Sync), log: &dyn Fn(String)) -> Result<Imported, StageError> {
    let classes = class_names(root, cfg)?;
    let mut builder = StoreBuilder::create(store_dir, Encoding::File { channels: cfg.channels })?;
    let mut train_report = Report::default();
    let (entries, bad) = match &cfg.train_list {
        Some(list) => read_list(root, list, true, classes.len())?,
        None => train_from_folders(root, &classes, cfg, &mut train_report)?,
    };
    let (kept, train_rows) = store_all(root, cfg, &mut builder, entries, bad, &mut train_report, progress, "train")?;
    // Training entries are built with a label (folder or list), so the 0 is never used.
    let labels: Vec<u32> = kept.iter().map(|e| e.label.unwrap_or(0)).collect();
    let counts = crate::artifact::class_counts(&labels, classes.len());
    train_report.empty_classes = classes.iter().zip(&counts).filter(|&(_, &n)| n == 0).map(|(c, _)| c.clone()).collect();
    if kept.is_empty() {
        return Err(StageError::failed(format!("{}: no training images left to import", root.display())));
    }
    let mut tests = Vec::new();
    let mut reports = Vec::new();
    for (folder, list) in [("testa", cfg.testa_list.as_deref()), ("testb", cfg.testb_list.as_deref())] {
        let mut report = Report::default();
        let (entries, bad) = test_entries(root, folder, list, &mut report, log)?;
        let (kept, rows) = store_all(root, cfg, &mut builder, entries, bad, &mut report, progress, folder)?;
        tests.push((kept, rows));
        reports.push(report);
    }
    let store = Arc::new(builder.finish()?);
    let all = LabelledSet { images: image_set(&store, &classes, &kept, train_rows), labels };
    let mut tests: Vec<ImageSet> = tests.into_iter().map(|(kept, rows)| image_set(&store, &classes, &kept, rows)).collect();
    let (train, val) = carve_val(&all, cfg);
    for (name, r) in [("train", &train_report), ("testa", &reports[0]), ("testb", &reports[1])] {
        if !r.skipped.is_empty() {
            log(format!("{name}: skipped {} bad entries (see {REPORT_FILE})", r.skipped.len()));
        }
        if r.ignored_files > 0 {
            log(format!("{name}: ignored {} files without a .jpg/.jpeg/.png extension", r.ignored_files));
        }
    }
    if !train_report.empty_classes.is_empty() {
        log(format!("{} classes have no training image: {}", train_report.empty_classes.len(), train_report.empty_classes.join(", ")));
    }
    let testb = tests.pop().unwrap_or_else(|| ImageSet::empty_over(store.clone(), classes.clone()));
    let testa = tests.pop().unwrap_or_else(|| ImageSet::empty_over(store.clone(), classes.clone()));
    let testb_report = reports.pop().unwrap_or_default();
    let testa_report = reports.pop().unwrap_or_default();
    Ok(Imported { train, val, testa, testb, train_report, testa_report, testb_report })
}

/// Writes a report as sorted, pretty JSON.
pub fn write_report(dir: &Path, r: &Report) -> Result<(), StageError> {
    let path = dir.join(REPORT_FILE);
    let mut bytes = serde_json::to_vec_pretty(r).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    bytes.push(b'\n');
    fs::write(&path, bytes).map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// Reads the skip count and empty classes back, for `fgflow show`.
pub fn report_summary(dir: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(REPORT_FILE)).ok()?).ok()?;
    let skipped = v.get("skipped")?.as_array()?.len();
    let ignored = v.get("ignored_files")?.as_u64()?;
    let empty = v.get("empty_classes")?.as_array()?.len();
    let mut s = format!("import: {skipped} bad entries skipped, {ignored} non-image files ignored");
    if empty > 0 {
        s.push_str(&format!(", {empty} classes without images"));
    }
    Some(s)
}
