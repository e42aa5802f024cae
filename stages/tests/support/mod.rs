//! What the stages crate's integration tests share: running a kind through its
//! `StageKind` interface the way the engine would, and slices of the real drawings.
#![allow(dead_code)] // each test binary uses a part

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use fgflow_engine::{NoProgress, Params, RunContext, StageError};
use fgflow_stages::artifact::{ImageSet, LabelledSet};

/// Runs a registered kind with its declared defaults overridden by `params` (what the
/// engine's validation hands it), the given input directories and `Path` sources;
/// outputs land under `out/<name>`. Returns the stage log.
pub fn run_kind(kind: &str, params: Params, inputs: &[(&str, Vec<PathBuf>)], sources: &[(&str, &Path)], out: &Path) -> Result<String, StageError> {
    let registry = fgflow_stages::registry();
    let kind = registry.get(kind).expect("kind registered");
    let mut full = Params::default();
    for spec in kind.params() {
        if let Some(v) = spec.default {
            full = full.with(spec.name, v);
        }
    }
    for (k, v) in params.0 {
        full = full.with(&k, v);
    }
    if let Some((field, msg)) = kind.validate(&full).into_iter().next() {
        return Err(StageError::Param { name: field, msg });
    }
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let sources = sources.iter().map(|(k, p)| (k.to_string(), vec![(k.to_string(), p.to_path_buf())])).collect();
    let scratch = out.join(".scratch");
    fs::create_dir_all(&scratch).unwrap();
    let ctx = RunContext::new("test", full, "flex", inputs, sources, out.to_path_buf(), scratch.clone(), &NoProgress);
    let result = kind.run(&ctx);
    fs::remove_dir_all(&scratch).unwrap();
    result.map(|_| ctx.take_log())
}

/// The kind's `fgflow show` text for one output directory.
pub fn describe(kind: &str, output: &str, dir: &Path) -> String {
    fgflow_stages::registry().get(kind).unwrap().describe_output(output, dir).expect("a description")
}

pub fn quickdraw_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/quickdraw")
}

/// `per_class` drawings of each of `classes` (rows of data/quickdraw/quickdraw.png),
/// the first `train_per_class` into the first set, the rest into the second.
pub fn quickdraw(classes: &[usize], train_per_class: usize, per_class: usize) -> (LabelledSet, LabelledSet) {
    let dir = quickdraw_dir();
    let names: Vec<String> = fs::read_to_string(dir.join("classes.txt")).unwrap().lines().map(String::from).collect();
    let img = image::open(dir.join("quickdraw.png")).unwrap().into_luma8();
    let mut sets = [(Vec::new(), Vec::new(), Vec::new()), (Vec::new(), Vec::new(), Vec::new())];
    for (label, &k) in classes.iter().enumerate() {
        for j in 0..per_class {
            let which = usize::from(j >= train_per_class);
            for y in 0..28u32 {
                for x in 0..28u32 {
                    sets[which].0.push(img.get_pixel(j as u32 * 28 + x, k as u32 * 28 + y).0[0]);
                }
            }
            sets[which].1.push(label as u32);
            sets[which].2.push(format!("{}/{j}", names[k]));
        }
    }
    let class_names: Vec<String> = classes.iter().map(|&k| names[k].clone()).collect();
    let [a, b] = sets;
    let make = |(pixels, labels, ids): (Vec<u8>, Vec<u32>, Vec<String>)| LabelledSet {
        images: ImageSet::from_pixels(28, 28, 1, pixels, ids, class_names.clone()).unwrap(),
        labels,
    };
    (make(a), make(b))
}

/// Every file under `dir`, relative path -> bytes.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.unwrap();
        if e.file_type().is_file() {
            out.insert(e.path().strip_prefix(dir).unwrap().display().to_string(), fs::read(e.path()).unwrap());
        }
    }
    out
}

/// A labelled set of 3 classes x 8 drawings written as an artifact under `t/train`.
pub fn train_set(t: &Path) -> PathBuf {
    let (train, _) = quickdraw(&[0, 1, 2], 8, 8);
    let dir = t.join("train");
    std::fs::create_dir_all(&dir).unwrap();
    fgflow_stages::artifact::write_labelled_set(&dir, &train).unwrap();
    dir
}
