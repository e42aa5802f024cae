//! The on-disk format of image sets, labelled sets and ground truth, and the only code
//! that reads or writes it. Every other stage goes through these functions.
//!
//! # Format (version 1)
//!
//! Chosen so that a Python user opens any artifact with `safetensors` + `json` alone,
//! and so that equal contents give equal bytes (the cache keys downstream stages on
//! artifact digests): no timestamps, JSON keys sorted, tensors in a fixed order.
//!
//! **Image set** (`image_set`: test A, test B) and **labelled set** (`labelled_set`:
//! training, validation) directory (set format version 2):
//!
//! - `store/`: the image store the rows refer to (`crate::store`: shards of images
//!   stored once by content, its index and `store.json`). Every set made from another
//!   (cleaning, pseudo-labels, merges) carries the same store files, so the cache holds
//!   their bytes once and the new set costs its rows.
//! - `rows.safetensors`
//!   - `image`: `I64 [N]`, each row's image: its index in the store.
//!   - `labels`: `I64 [N]`, class ids, only in a labelled set. (i64 so that
//!     `torch.from_numpy` gives the dtype `cross_entropy` wants.)
//! - `classes.json`:
//!   ```json
//!   { "classes": [{"id": 0, "name": "airplane"}, ...], "format": "fgflow.image_set",
//!     "ids": ["train/00000", ...], "labelled": true, "n": 7826, "version": 2 }
//!   ```
//!   `classes` is the label space (id = index), the same for every set of one data set;
//!   `ids` names each row's image (its path for imported folders; an opaque
//!   `<set>/<index>` for the benchmark, whose provenance would give the answer away).
//!
//! **Ground truth** (`ground_truth`, only evaluation stages may read it) directory:
//!
//! - `truth.safetensors`: `testa_labels`, `testb_labels`: `I64` true class of each test
//!   image; `train_clean_labels`: `I64 [N_train]`, the true class of each training
//!   sample, -1 for open-set images; `train_noise`: `U8 [N_train]`, 0 clean, 1 label
//!   replaced uniformly at random, 2 replaced by the visually near class, 3 open-set
//!   image; `near_class`: `I64 [C]`, the class that near-class noise maps each class to.
//! - `truth.json`: `classes`, `format` (`"fgflow.ground_truth"`), `noise_codes`,
//!   `open_set_classes` (names of the classes the open-set images come from),
//!   `testa_sources`, `testb_sources`, `train_sources`, `val_sources` (where each image
//!   came from, e.g. `quickdraw/cat/17`), `version`.
//!
//! **Oracle set** (`oracle_set`: `quickdraw`'s `oracle` output, the ceiling) directory:
//! a labelled set as above (`store/`, `rows.safetensors` with `image` and `labels`,
//! `classes.json`), holding the training images that are not open-set, in the training
//! set's order and with its ids, and their TRUE labels, plus the oracle mark
//! `oracle.json`. Open it as a labelled set.
//!
//! **Oracle mark** `oracle.json`: in an oracle set and in every artifact derived from
//! one (the model and checkpoints of `train` on its `oracle` input, their predictions,
//! the metrics of those): `{"derived_from": "ground_truth", "format": "fgflow.oracle",
//! "note": "...", "version": 1}`. The recipe's kinds (`clean`, `ensemble`,
//! `pseudo_label`, `redistribute`, `soup`, `train`'s `init`) refuse an input that
//! carries it; `report` marks its row "(oracle)". Its presence is the whole signal.
//!
//! All are aligned by index with the sets the same stage wrote. Sets made by
//! `import_folder` also carry `import_report.json`: the files left out and why.
//!
//! ```python
//! import json, os
//! from safetensors.numpy import load_file
//! r = load_file("train/rows.safetensors")    # r["image"]: (N,) int64 store index, r["labels"]: (N,) int64
//! meta = json.load(open("train/classes.json"))
//! names = [c["name"] for c in meta["classes"]]
//! pixels = [image(i) for i in r["image"]]    # image(): see `crate::store`'s example
//! is_oracle = os.path.exists("oracle/oracle.json")
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::store::{Image, STORE_DIR, Store, Target};

use fgflow_engine::StageError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

pub const ROWS_FILE: &str = "rows.safetensors";
pub const CLASSES_FILE: &str = "classes.json";
pub const TRUTH_TENSORS_FILE: &str = "truth.safetensors";
pub const TRUTH_JSON_FILE: &str = "truth.json";
pub const FORMAT_VERSION: u32 = 1;
/// Sets: 2 = rows over an image store (1 held every set's pixels).
pub const SET_FORMAT_VERSION: u32 = 2;
const IMAGE_SET_FORMAT: &str = "fgflow.image_set";
const TRUTH_FORMAT: &str = "fgflow.ground_truth";

/// Rows over an image store, with the label space they belong to.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// The images (shared by every set made from this one).
    pub store: Arc<Store>,
    /// Each row's image: its index in `store`.
    pub rows: Vec<u32>,
    /// One per row: a file path, or `<set>/<index>` for the benchmark.
    pub ids: Vec<String>,
    /// Class names of the label space; index = class id.
    pub classes: Vec<String>,
}

/// Equal rows of equal stores with equal names: the same set.
impl PartialEq for ImageSet {
    fn eq(&self, other: &Self) -> bool {
        self.store.identity() == other.store.identity() && self.rows == other.rows && self.ids == other.ids && self.classes == other.classes
    }
}
impl Eq for ImageSet {}

impl ImageSet {
    /// A set over raw pixels held in memory (`n` images of `height x width x channels`,
    /// HWC, one after another): the generated benchmark's, and tests'.
    pub fn from_pixels(height: usize, width: usize, channels: usize, pixels: Vec<u8>, ids: Vec<String>, classes: Vec<String>) -> Result<Self, String> {
        if channels != 1 && channels != 3 {
            return Err(format!("{channels} channels (1 or 3 supported)"));
        }
        let n = if height * width * channels == 0 { 0 } else { pixels.len() / (height * width * channels) };
        if ids.len() != n {
            return Err(format!("{} ids for {n} images", ids.len()));
        }
        let (store, rows) = Store::in_memory(height, width, channels, pixels)?;
        Ok(ImageSet { store: Arc::new(store), rows, ids, classes })
    }

    /// No rows, over the given store.
    pub fn empty_over(store: Arc<Store>, classes: Vec<String>) -> Self {
        ImageSet { store, rows: Vec::new(), ids: Vec::new(), classes }
    }

    pub fn n(&self) -> usize {
        self.rows.len()
    }

    /// Channels every image decodes to.
    pub fn channels(&self) -> usize {
        self.store.encoding().channels()
    }

    /// The size all images have, when the store fixes one (raw pixels).
    pub fn native_size(&self) -> Option<(usize, usize)> {
        self.store.encoding().size()
    }

    /// Image `i` decoded at its own size; an error names its id.
    pub fn image(&self, i: usize) -> Result<Image<'_>, String> {
        let row = *self.rows.get(i).ok_or_else(|| format!("row {i} is out of range ({} rows)", self.rows.len()))?;
        self.store.decode(row as usize).map_err(|e| format!("image `{}`: {e}", self.ids.get(i).map_or("?", |s| s.as_str())))
    }

    /// The rows at `indices`, in that order, over the same store (no image is copied).
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        ImageSet {
            store: self.store.clone(),
            rows: indices.iter().map(|&i| self.rows[i]).collect(),
            ids: indices.iter().map(|&i| self.ids[i].clone()).collect(),
            classes: self.classes.clone(),
        }
    }

    /// This set's rows followed by `other`'s; both must be over one store.
    pub fn concat(&self, other: &ImageSet) -> Result<ImageSet, String> {
        if self.store.identity() != other.store.identity() {
            return Err("the two sets are over different image stores (sets of different data sets cannot be merged)".into());
        }
        if self.classes != other.classes {
            return Err("the two sets have different label spaces".into());
        }
        let mut out = self.clone();
        out.rows.extend_from_slice(&other.rows);
        out.ids.extend(other.ids.iter().cloned());
        Ok(out)
    }

    /// Internal consistency; the writer refuses a set that fails it.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.channels(), 1 | 3) {
            return Err(format!("{} channels (1 or 3 supported)", self.channels()));
        }
        if let Some(&bad) = self.rows.iter().find(|&&r| r as usize >= self.store.len()) {
            return Err(format!("row refers to image {bad}, the store has {}", self.store.len()));
        }
        if self.ids.len() != self.rows.len() {
            return Err(format!("{} ids for {} rows", self.ids.len(), self.rows.len()));
        }
        Ok(())
    }
}

/// The input a model trained on `sets` takes: `image_size` square when given (> 0),
/// else the size every image of the sets already has (a generated benchmark's); the
/// channels of the sets, which must agree.
pub fn model_input(sets: &[&ImageSet], image_size: usize) -> Result<Target, String> {
    let Some(first) = sets.first() else { return Err("no image set".into()) };
    let channels = first.channels();
    if let Some(other) = sets.iter().find(|s| s.channels() != channels) {
        return Err(format!("the image sets differ in channels: {channels} and {}", other.channels()));
    }
    if image_size > 0 {
        return Ok(Target { height: image_size, width: image_size, channels });
    }
    let size = first.native_size();
    match size {
        Some((height, width)) if sets.iter().all(|s| s.native_size() == size) => Ok(Target { height, width, channels }),
        Some(_) => Err("the image sets differ in size: set `image_size` to bring them to one".into()),
        None => Err("the images have no one size (files as they came): set `image_size`, the resolution to train at".into()),
    }
}

/// Images with one (possibly noisy) class label each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledSet {
    pub images: ImageSet,
    pub labels: Vec<u32>,
}

impl LabelledSet {
    pub fn n_classes(&self) -> usize {
        self.images.classes.len()
    }

    pub fn select(&self, indices: &[usize]) -> LabelledSet {
        LabelledSet { images: self.images.select(indices), labels: indices.iter().map(|&i| self.labels[i]).collect() }
    }

    pub fn check(&self) -> Result<(), String> {
        self.images.check()?;
        if self.labels.len() != self.images.n() {
            return Err(format!("{} labels for {} images", self.labels.len(), self.images.n()));
        }
        check_labels("labels", &self.labels, self.n_classes())
    }
}

/// What happened to a training sample's label. The `u8` codes are the file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Noise {
    Clean = 0,
    /// Replaced by a class drawn uniformly from the other classes.
    Uniform = 1,
    /// Replaced by the fixed visually-near class of the true class.
    NearClass = 2,
    /// An image of no in-vocabulary class, given a random label.
    OpenSet = 3,
}

impl Noise {
    pub const ALL: [Noise; 4] = [Noise::Clean, Noise::Uniform, Noise::NearClass, Noise::OpenSet];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Noise> {
        Noise::ALL.get(code as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Noise::Clean => "clean",
            Noise::Uniform => "uniform",
            Noise::NearClass => "near_class",
            Noise::OpenSet => "open_set",
        }
    }
}

/// The hidden answers of a benchmark. Only evaluation stages may read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundTruth {
    /// The in-vocabulary label space (same as the sets').
    pub classes: Vec<String>,
    pub testa_labels: Vec<u32>,
    pub testb_labels: Vec<u32>,
    /// True class of each training sample; `None` for open-set images.
    pub train_clean_labels: Vec<Option<u32>>,
    pub train_noise: Vec<Noise>,
    /// The class near-class noise maps each class to.
    pub near_class: Vec<u32>,
    /// Classes the open-set images were drawn from (outside the label space).
    pub open_set_classes: Vec<String>,
    /// Provenance of each image of each set, aligned with the sets.
    pub train_sources: Vec<String>,
    pub val_sources: Vec<String>,
    pub testa_sources: Vec<String>,
    pub testb_sources: Vec<String>,
}

impl GroundTruth {
    pub fn check(&self) -> Result<(), String> {
        let c = self.classes.len();
        check_labels("testa_labels", &self.testa_labels, c)?;
        check_labels("testb_labels", &self.testb_labels, c)?;
        check_labels("near_class", &self.near_class, c)?;
        if self.near_class.len() != c {
            return Err(format!("near_class has {} entries for {c} classes", self.near_class.len()));
        }
        let n = self.train_clean_labels.len();
        if self.train_noise.len() != n {
            return Err(format!("{} noise flags for {n} training samples", self.train_noise.len()));
        }
        for (i, (label, noise)) in self.train_clean_labels.iter().zip(&self.train_noise).enumerate() {
            match (label, noise) {
                (None, Noise::OpenSet) => {}
                (Some(l), noise) if *noise != Noise::OpenSet => {
                    if *l as usize >= c {
                        return Err(format!("train_clean_labels[{i}] = {l}, but there are {c} classes"));
                    }
                }
                _ => return Err(format!("training sample {i}: clean label {label:?} contradicts noise {}", noise.name())),
            }
        }
        for (name, sources, want) in [
            ("train_sources", &self.train_sources, n),
            ("testa_sources", &self.testa_sources, self.testa_labels.len()),
            ("testb_sources", &self.testb_sources, self.testb_labels.len()),
        ] {
            if sources.len() != want {
                return Err(format!("{name} has {} entries for {want} images", sources.len()));
            }
        }
        Ok(())
    }
}

fn check_labels(what: &str, labels: &[u32], n_classes: usize) -> Result<(), String> {
    match labels.iter().position(|&l| l as usize >= n_classes) {
        Some(i) => Err(format!("{what}[{i}] = {}, but there are {n_classes} classes", labels[i])),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------
// JSON side files. Fields are declared in alphabetical order: serde writes them in
// declaration order, which makes the keys sorted.

#[derive(Serialize, Deserialize)]
struct ClassEntry {
    id: usize,
    name: String,
}

#[derive(Serialize, Deserialize)]
struct SetMeta {
    classes: Vec<ClassEntry>,
    format: String,
    ids: Vec<String>,
    labelled: bool,
    n: usize,
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct TruthMeta {
    classes: Vec<ClassEntry>,
    format: String,
    noise_codes: BTreeMap<String, String>,
    open_set_classes: Vec<String>,
    testa_sources: Vec<String>,
    testb_sources: Vec<String>,
    train_sources: Vec<String>,
    val_sources: Vec<String>,
    version: u32,
}

fn class_entries(classes: &[String]) -> Vec<ClassEntry> {
    classes.iter().enumerate().map(|(id, name)| ClassEntry { id, name: name.clone() }).collect()
}

fn class_names(path: &Path, entries: Vec<ClassEntry>) -> Result<Vec<String>, StageError> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| if e.id == i { Ok(e.name) } else { Err(corrupt(path, format!("class entry {i} has id {}; ids must be 0, 1, 2, ... in order", e.id))) })
        .collect()
}

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> StageError {
    StageError::failed(format!("{}: {msg}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StageError> {
    fs::write(path, bytes).map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

fn read_file(path: &Path) -> Result<Vec<u8>, StageError> {
    fs::read(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StageError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| corrupt(path, e))?;
    bytes.push(b'\n');
    write_file(path, &bytes)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StageError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(path, format!("not a valid fgflow file: {e}")))
}

fn i64_bytes<I: IntoIterator<Item = i64>>(values: I) -> Vec<u8> {
    values.into_iter().flat_map(i64::to_le_bytes).collect()
}

/// Serialises named tensors; safetensors orders them by dtype then name, so the bytes
/// do not depend on the order given here. No `__metadata__`: it is a HashMap, whose
/// order would vary between runs.
fn write_tensors(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])>) -> Result<(), StageError> {
    let views = tensors
        .into_iter()
        .map(|(name, dtype, shape, data)| TensorView::new(dtype, shape, data).map(|v| (name.to_string(), v)).map_err(|e| corrupt(path, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| corrupt(path, e))?;
    write_file(path, &bytes)
}

/// A tensor's bytes after checking its dtype and shape.
fn tensor<'a>(st: &'a SafeTensors<'a>, path: &Path, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8], StageError> {
    let t = st.tensor(name).map_err(|_| corrupt(path, format!("no tensor `{name}`")))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(corrupt(path, format!("tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}", t.dtype(), t.shape())));
    }
    Ok(t.data())
}

/// The length of a rank-1 tensor, for the ground truth's variable-length vectors.
fn len_1d(st: &SafeTensors<'_>, path: &Path, name: &str) -> Result<usize, StageError> {
    let t = st.tensor(name).map_err(|_| corrupt(path, format!("no tensor `{name}`")))?;
    match t.shape() {
        [n] => Ok(*n),
        s => Err(corrupt(path, format!("tensor `{name}` has shape {s:?}, expected one dimension"))),
    }
}

fn labels_from_i64(path: &Path, name: &str, bytes: &[u8], n_classes: usize) -> Result<Vec<Option<u32>>, StageError> {
    bytes
        .chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            match i64::from_le_bytes(a) {
                -1 => Ok(None),
                v if v >= 0 && (v as u64) < n_classes as u64 => Ok(Some(v as u32)),
                v => Err(corrupt(path, format!("{name}[{i}] = {v}, but there are {n_classes} classes"))),
            }
        })
        .collect()
}

fn required_labels(path: &Path, name: &str, bytes: &[u8], n_classes: usize) -> Result<Vec<u32>, StageError> {
    labels_from_i64(path, name, bytes, n_classes)?
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.ok_or_else(|| corrupt(path, format!("{name}[{i}] = -1, a label is required"))))
        .collect()
}

// ---------------------------------------------------------------------------------
// Image sets and labelled sets.

fn write_set(dir: &Path, s: &ImageSet, labels: Option<&[u32]>) -> Result<(), StageError> {
    s.check().map_err(|e| StageError::failed(format!("refusing to write an inconsistent image set to {}: {e}", dir.display())))?;
    s.store.write_to(&dir.join(STORE_DIR))?;
    let rows = i64_bytes(s.rows.iter().map(|&v| v as i64));
    let label_bytes = labels.map(|l| i64_bytes(l.iter().map(|&v| v as i64)));
    let mut tensors = vec![("image", Dtype::I64, vec![s.n()], rows.as_slice())];
    if let Some(b) = &label_bytes {
        tensors.push(("labels", Dtype::I64, vec![s.n()], b.as_slice()));
    }
    write_tensors(&dir.join(ROWS_FILE), tensors)?;
    write_json(
        &dir.join(CLASSES_FILE),
        &SetMeta {
            classes: class_entries(&s.classes),
            format: IMAGE_SET_FORMAT.into(),
            ids: s.ids.clone(),
            labelled: labels.is_some(),
            n: s.n(),
            version: SET_FORMAT_VERSION,
        },
    )
}

fn read_set(dir: &Path, want_labels: bool) -> Result<(ImageSet, Option<Vec<u32>>), StageError> {
    let meta_path = dir.join(CLASSES_FILE);
    let meta: SetMeta = read_json(&meta_path)?;
    if meta.format != IMAGE_SET_FORMAT || meta.version != SET_FORMAT_VERSION {
        return Err(corrupt(
            &meta_path,
            format!("format {} version {}, this fgflow reads {IMAGE_SET_FORMAT} version {SET_FORMAT_VERSION}", meta.format, meta.version),
        ));
    }
    if want_labels && !meta.labelled {
        return Err(corrupt(&meta_path, "an unlabelled image set where a labelled set is needed"));
    }
    if meta.ids.len() != meta.n {
        return Err(corrupt(&meta_path, format!("{} ids for {} images", meta.ids.len(), meta.n)));
    }
    let classes = class_names(&meta_path, meta.classes)?;
    let store = Arc::new(Store::open(&dir.join(STORE_DIR))?);
    let path = dir.join(ROWS_FILE);
    let bytes = read_file(&path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&path, format!("not a safetensors file: {e}")))?;
    let rows = tensor(&st, &path, "image", Dtype::I64, &[meta.n])?
        .chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let v = i64::from_le_bytes(b.try_into().unwrap_or([0xff; 8]));
            if v >= 0 && (v as u64) < store.len() as u64 { Ok(v as u32) } else { Err(corrupt(&path, format!("image[{i}] = {v}, but the store has {} images", store.len()))) }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let labels = if want_labels {
        let raw = tensor(&st, &path, "labels", Dtype::I64, &[meta.n])?;
        Some(required_labels(&path, "labels", raw, classes.len())?)
    } else {
        None
    };
    let set = ImageSet { store, rows, ids: meta.ids, classes };
    set.check().map_err(|e| corrupt(&path, e))?;
    Ok((set, labels))
}

/// Writes an unlabelled set (`store/`, `rows.safetensors`, `classes.json`) into `dir`.
pub fn write_image_set(dir: &Path, s: &ImageSet) -> Result<(), StageError> {
    write_set(dir, s, None)
}

/// Reads the images of any set (a labelled set's labels are ignored).
pub fn read_image_set(dir: &Path) -> Result<ImageSet, StageError> {
    Ok(read_set(dir, false)?.0)
}

pub fn write_labelled_set(dir: &Path, s: &LabelledSet) -> Result<(), StageError> {
    s.check().map_err(|e| StageError::failed(format!("refusing to write an inconsistent labelled set to {}: {e}", dir.display())))?;
    write_set(dir, &s.images, Some(&s.labels))
}

pub fn read_labelled_set(dir: &Path) -> Result<LabelledSet, StageError> {
    let (images, labels) = read_set(dir, true)?;
    let labels = labels.ok_or_else(|| corrupt(dir, "no labels"))?;
    Ok(LabelledSet { images, labels })
}

// ---------------------------------------------------------------------------------
// Ground truth.

pub fn write_ground_truth(dir: &Path, t: &GroundTruth) -> Result<(), StageError> {
    t.check().map_err(|e| StageError::failed(format!("refusing to write inconsistent ground truth to {}: {e}", dir.display())))?;
    let testa = i64_bytes(t.testa_labels.iter().map(|&v| v as i64));
    let testb = i64_bytes(t.testb_labels.iter().map(|&v| v as i64));
    let clean = i64_bytes(t.train_clean_labels.iter().map(|l| l.map_or(-1, |v| v as i64)));
    let noise: Vec<u8> = t.train_noise.iter().map(|n| n.code()).collect();
    let near = i64_bytes(t.near_class.iter().map(|&v| v as i64));
    write_tensors(
        &dir.join(TRUTH_TENSORS_FILE),
        vec![
            ("testa_labels", Dtype::I64, vec![t.testa_labels.len()], &testa),
            ("testb_labels", Dtype::I64, vec![t.testb_labels.len()], &testb),
            ("train_clean_labels", Dtype::I64, vec![t.train_clean_labels.len()], &clean),
            ("train_noise", Dtype::U8, vec![noise.len()], &noise),
            ("near_class", Dtype::I64, vec![t.near_class.len()], &near),
        ],
    )?;
    write_json(
        &dir.join(TRUTH_JSON_FILE),
        &TruthMeta {
            classes: class_entries(&t.classes),
            format: TRUTH_FORMAT.into(),
            noise_codes: Noise::ALL.iter().map(|n| (n.code().to_string(), n.name().to_string())).collect(),
            open_set_classes: t.open_set_classes.clone(),
            testa_sources: t.testa_sources.clone(),
            testb_sources: t.testb_sources.clone(),
            train_sources: t.train_sources.clone(),
            val_sources: t.val_sources.clone(),
            version: FORMAT_VERSION,
        },
    )
}

pub fn read_ground_truth(dir: &Path) -> Result<GroundTruth, StageError> {
    let meta_path = dir.join(TRUTH_JSON_FILE);
    let meta: TruthMeta = read_json(&meta_path)?;
    if meta.format != TRUTH_FORMAT || meta.version != FORMAT_VERSION {
        return Err(corrupt(&meta_path, format!("format {} version {}, this fgflow reads {TRUTH_FORMAT} version {FORMAT_VERSION}", meta.format, meta.version)));
    }
    let classes = class_names(&meta_path, meta.classes)?;
    let c = classes.len();
    let path = dir.join(TRUTH_TENSORS_FILE);
    let bytes = read_file(&path)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&path, format!("not a safetensors file: {e}")))?;
    let labels = |name: &str| -> Result<Vec<u32>, StageError> {
        let n = len_1d(&st, &path, name)?;
        required_labels(&path, name, tensor(&st, &path, name, Dtype::I64, &[n])?, c)
    };
    let testa_labels = labels("testa_labels")?;
    let testb_labels = labels("testb_labels")?;
    let near_class = labels("near_class")?;
    let n = len_1d(&st, &path, "train_noise")?;
    let train_noise = tensor(&st, &path, "train_noise", Dtype::U8, &[n])?
        .iter()
        .enumerate()
        .map(|(i, &code)| Noise::from_code(code).ok_or_else(|| corrupt(&path, format!("train_noise[{i}] = {code}, not a noise code"))))
        .collect::<Result<Vec<_>, _>>()?;
    let train_clean_labels = labels_from_i64(&path, "train_clean_labels", tensor(&st, &path, "train_clean_labels", Dtype::I64, &[n])?, c)?;
    let t = GroundTruth {
        classes,
        testa_labels,
        testb_labels,
        train_clean_labels,
        train_noise,
        near_class,
        open_set_classes: meta.open_set_classes,
        train_sources: meta.train_sources,
        val_sources: meta.val_sources,
        testa_sources: meta.testa_sources,
        testb_sources: meta.testb_sources,
    };
    t.check().map_err(|e| corrupt(dir, e))?;
    Ok(t)
}

// ---------------------------------------------------------------------------------
// The oracle set and the oracle mark.

pub const ORACLE_FILE: &str = "oracle.json";
const ORACLE_FORMAT: &str = "fgflow.oracle";

#[derive(Serialize, Deserialize)]
struct OracleMark {
    derived_from: String,
    format: String,
    note: String,
    version: u32,
}

/// Writes the oracle mark into an output directory: what is in it derives from the true
/// labels. Constant bytes, so equal artifacts stay equal.
pub fn mark_oracle(dir: &Path) -> Result<(), StageError> {
    write_json(
        &dir.join(ORACLE_FILE),
        &OracleMark {
            derived_from: "ground_truth".into(),
            format: ORACLE_FORMAT.into(),
            note: "built from the benchmark's true labels: the ceiling the recipe is measured against, never part of it; fgflow's recipe stages refuse artifacts that carry this file".into(),
            version: FORMAT_VERSION,
        },
    )
}

/// Whether an artifact directory carries the oracle mark.
pub fn is_oracle(dir: &Path) -> bool {
    dir.join(ORACLE_FILE).exists()
}

/// Marks `to` as oracle-derived when `from` is (predictions of an oracle model, metrics
/// of those predictions).
pub fn carry_oracle(from: &Path, to: &Path) -> Result<(), StageError> {
    if is_oracle(from) { mark_oracle(to) } else { Ok(()) }
}

/// Refuses every connected input of the stage, except those of the ports in `allowed`,
/// that carries the oracle mark: the recipe must not be fed from the true labels.
pub fn refuse_oracle(ctx: &fgflow_engine::RunContext<'_>, allowed: &[&str]) -> Result<(), StageError> {
    for port in ctx.input_names() {
        if allowed.contains(&port.as_str()) {
            continue;
        }
        if let Some(dir) = ctx.inputs(&port).iter().find(|d| is_oracle(d)) {
            return Err(StageError::Input {
                name: port,
                msg: format!(
                    "{} derives from the benchmark's true labels (it carries {ORACLE_FILE}: an oracle set, or a model trained on one, or its predictions); the oracle is a ceiling to evaluate, never an input of the recipe",
                    dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// Writes the oracle set: a labelled set plus the oracle mark.
pub fn write_oracle_set(dir: &Path, s: &LabelledSet) -> Result<(), StageError> {
    write_labelled_set(dir, s)?;
    mark_oracle(dir)
}

/// Reads an oracle set; a directory without the mark is not one.
pub fn read_oracle_set(dir: &Path) -> Result<LabelledSet, StageError> {
    if !is_oracle(dir) {
        return Err(corrupt(dir, format!("not an oracle set: no {ORACLE_FILE}")));
    }
    let mark: OracleMark = read_json(&dir.join(ORACLE_FILE))?;
    if mark.format != ORACLE_FORMAT || mark.version != FORMAT_VERSION {
        return Err(corrupt(&dir.join(ORACLE_FILE), format!("format {} version {}, this fgflow reads {ORACLE_FORMAT} version {FORMAT_VERSION}", mark.format, mark.version)));
    }
    read_labelled_set(dir)
}

// ---------------------------------------------------------------------------------
// Class statistics shared by `show`, cleaning and evaluation.

/// Images per class. Labels `>= n_classes` are not counted (readers reject them, so
/// this only matters for hand-made label vectors).
pub fn class_counts(labels: &[u32], n_classes: usize) -> Vec<usize> {
    let mut counts = vec![0; n_classes];
    for &l in labels {
        if let Some(c) = counts.get_mut(l as usize) {
            *c += 1;
        }
    }
    counts
}

/// Where a class sits in the long tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    Head,
    Middle,
    Tail,
}

impl Band {
    pub const ALL: [Band; 3] = [Band::Head, Band::Middle, Band::Tail];

    pub fn name(self) -> &'static str {
        match self {
            Band::Head => "head",
            Band::Middle => "middle",
            Band::Tail => "tail",
        }
    }
}

/// Classes ranked by count, most images first (ties: lower class id first, so the
/// ranking is deterministic).
pub fn rank_by_count(counts: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    order
}

/// The band of each class (indexed by class id): thirds of the ranking by count, head
/// = the third with the most images. With C classes the class at rank r is in band
/// `floor(3r / C)`, so 300 classes give exactly 100 per band and any remainder goes to
/// the lower bands.
pub fn head_middle_tail(counts: &[usize]) -> Vec<Band> {
    let c = counts.len();
    let mut bands = vec![Band::Head; c];
    for (rank, class) in rank_by_count(counts).into_iter().enumerate() {
        bands[class] = Band::ALL[(3 * rank / c).min(2)];
    }
    bands
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize, channels: usize) -> ImageSet {
        let pixels = (0..n * 6 * channels).map(|i| (i % 251) as u8).collect();
        ImageSet::from_pixels(2, 3, channels, pixels, (0..n).map(|i| format!("img/{i}.png")).collect(), vec!["a".into(), "b".into(), "c".into()]).unwrap()
    }

    #[test]
    fn labelled_set_round_trips_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let s = LabelledSet { images: set(5, 3), labels: vec![0, 2, 1, 1, 0] };
        write_labelled_set(dir.path(), &s).unwrap();
        let first = fs::read(dir.path().join(ROWS_FILE)).unwrap();
        assert_eq!(read_labelled_set(dir.path()).unwrap(), s);
        assert_eq!(read_image_set(dir.path()).unwrap(), s.images);
        let again = tempfile::tempdir().unwrap();
        write_labelled_set(again.path(), &read_labelled_set(dir.path()).unwrap()).unwrap();
        assert_eq!(fs::read(again.path().join(ROWS_FILE)).unwrap(), first);
        for f in ["store/store.json", "store/index.safetensors", "store/shard-00000.bin", CLASSES_FILE] {
            assert_eq!(fs::read(again.path().join(f)).unwrap(), fs::read(dir.path().join(f)).unwrap(), "{f}: a set read and written again is the same bytes");
        }
        // A subset shares the store, byte for byte, and its rows are all that differ.
        let sub = tempfile::tempdir().unwrap();
        write_labelled_set(sub.path(), &s.select(&[4, 1])).unwrap();
        assert_eq!(fs::read(sub.path().join("store/shard-00000.bin")).unwrap(), fs::read(dir.path().join("store/shard-00000.bin")).unwrap());
        let back = read_labelled_set(sub.path()).unwrap();
        assert_eq!(back.images.image(0).unwrap(), s.images.image(4).unwrap());
        let json = fs::read_to_string(dir.path().join(CLASSES_FILE)).unwrap();
        let keys: Vec<&str> = json.lines().filter(|l| l.starts_with("  \"")).map(|l| l.trim()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "top-level JSON keys must be sorted");
    }

    #[test]
    fn unlabelled_set_is_not_a_labelled_set() {
        let dir = tempfile::tempdir().unwrap();
        write_image_set(dir.path(), &set(0, 1)).unwrap();
        assert_eq!(read_image_set(dir.path()).unwrap().n(), 0);
        let err = read_labelled_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unlabelled"), "{err}");
    }

    #[test]
    fn rows_outside_the_store_and_a_damaged_store_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_image_set(dir.path(), &set(3, 1)).unwrap();
        let mut bad = set(3, 1);
        bad.rows[1] = 7;
        assert!(write_image_set(tempfile::tempdir().unwrap().path(), &bad).unwrap_err().to_string().contains("image 7"));
        fs::write(dir.path().join("store/shard-00000.bin"), [0u8; 5]).unwrap();
        let err = read_image_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("store") && err.contains("cut short"), "{err}");
    }

    #[test]
    fn out_of_range_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = LabelledSet { images: set(2, 1), labels: vec![0, 3] };
        let err = write_labelled_set(dir.path(), &s).unwrap_err().to_string();
        assert!(err.contains("labels[1] = 3"), "{err}");
    }

    #[test]
    fn oracle_set_is_a_marked_labelled_set_and_only_a_marked_one_reads_as_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let s = LabelledSet { images: set(3, 1), labels: vec![2, 0, 1] };
        write_labelled_set(dir.path(), &s).unwrap();
        assert!(!is_oracle(dir.path()));
        let err = read_oracle_set(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not an oracle set"), "{err}");
        write_oracle_set(dir.path(), &s).unwrap();
        assert!(is_oracle(dir.path()));
        assert_eq!(read_oracle_set(dir.path()).unwrap(), s);
        let mark = fs::read(dir.path().join(ORACLE_FILE)).unwrap();
        let other = tempfile::tempdir().unwrap();
        carry_oracle(dir.path(), other.path()).unwrap();
        assert_eq!(fs::read(other.path().join(ORACLE_FILE)).unwrap(), mark, "the mark is constant bytes");
        let plain = tempfile::tempdir().unwrap();
        carry_oracle(plain.path(), other.path()).unwrap();
        carry_oracle(plain.path(), plain.path()).unwrap();
        assert!(!is_oracle(plain.path()));
    }

    #[test]
    fn ground_truth_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let t = GroundTruth {
            classes: vec!["a".into(), "b".into()],
            testa_labels: vec![1, 0],
            testb_labels: vec![0],
            train_clean_labels: vec![Some(0), None, Some(1)],
            train_noise: vec![Noise::Clean, Noise::OpenSet, Noise::NearClass],
            near_class: vec![1, 0],
            open_set_classes: vec!["z".into()],
            train_sources: vec!["x/0".into(), "x/1".into(), "x/2".into()],
            val_sources: vec![],
            testa_sources: vec!["y/0".into(), "y/1".into()],
            testb_sources: vec!["w/0".into()],
        };
        write_ground_truth(dir.path(), &t).unwrap();
        assert_eq!(read_ground_truth(dir.path()).unwrap(), t);
    }

    #[test]
    fn bands_are_thirds_by_rank() {
        let counts: Vec<usize> = vec![5, 9, 1, 9, 3, 7];
        assert_eq!(rank_by_count(&counts), vec![1, 3, 5, 0, 4, 2]);
        use Band::*;
        assert_eq!(head_middle_tail(&counts), vec![Middle, Head, Tail, Head, Tail, Middle]);
        assert_eq!(class_counts(&[0, 2, 2, 7], 3), vec![1, 0, 2]);
        assert!(head_middle_tail(&[]).is_empty());
    }
}
