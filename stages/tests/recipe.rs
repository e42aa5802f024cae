//! The recipe's post-training kinds run through their `StageKind` interface on tiny
//! hand-computed artifacts: the adaptive ensemble's weights, pseudo-label selection and
//! the merged training set, and label re-distribution (the seed's greedy against the
//! balanced assignment). Each test runs in milliseconds.

use std::fs;
use std::path::{Path, PathBuf};

use fgflow_engine::{Params, StageError};

use crate::support;
use support::{describe, files};

fn run(kind: &str, params: Params, inputs: &[(&str, Vec<PathBuf>)], out: &Path) -> Result<String, StageError> {
    support::run_kind(kind, params, inputs, &[], out)
}
use fgflow_stages::artifact::{self, GroundTruth, ImageSet, LabelledSet, Noise};
use fgflow_stages::ml::metrics::Metrics;
use fgflow_stages::ml::predictions::Predictions;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Predictions with the given probability rows (logits = ln p, so probs = softmax(logits)).
fn predictions(dir: &Path, ids: &[&str], classes: &[&str], rows: &[&[f32]]) -> PathBuf {
    let probs: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let logits = probs.iter().map(|p| p.ln()).collect();
    Predictions { ids: strings(ids), classes: strings(classes), probs, logits }.write(dir).unwrap();
    dir.to_path_buf()
}

fn metrics(dir: &Path, top1: f64) -> PathBuf {
    Metrics { truth: "labels".into(), n: 100, num_classes: 2, top1, top5: 1.0, mean_class_acc: top1, groups: vec![], per_class: vec![], truth_id: None }.write(dir).unwrap();
    dir.to_path_buf()
}

/// A fresh directory (the artifact writers expect it to exist, as an output dir does).
fn dir(path: PathBuf) -> PathBuf {
    fs::create_dir_all(&path).unwrap();
    path
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------
// ensemble

#[test]
fn ensemble_weights_f0_and_f25() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let ids = ["x", "y"];
    let p0 = predictions(&t.join("p0"), &ids, &["a", "b"], &[&[0.8, 0.2], &[0.6, 0.4]]);
    let p1 = predictions(&t.join("p1"), &ids, &["a", "b"], &[&[0.3, 0.7], &[0.2, 0.8]]);
    let (m0, m1) = (metrics(&t.join("m0"), 0.5), metrics(&t.join("m1"), 0.6));

    // f = 0: the plain mean, no metrics needed.
    run("ensemble", Params::default().with("f", 0.0), &[("predictions", vec![p0.clone(), p1.clone()])], &t.join("plain")).unwrap();
    let plain = Predictions::read(&t.join("plain/predictions")).unwrap();
    for (got, want) in plain.probs.iter().zip([0.55, 0.45, 0.4, 0.6]) {
        assert!((got - want).abs() < 1e-6, "{:?}", plain.probs);
    }
    assert_eq!(plain.top1(), vec![0, 1]);
    let w = read_json(&t.join("plain/weights/weights.json"));
    assert_eq!(w["models"][0]["weight"], 1.0);
    assert_eq!(w["models"][1]["weight"], 1.0);

    // f = 25 (default): w = (0.5/0.5)^25 = 1 and (0.6/0.5)^25 = 1.2^25 ~ 95.4.
    let inputs = [("predictions", vec![p0.clone(), p1.clone()]), ("metrics", vec![m0.clone(), m1.clone()])];
    run("ensemble", Params::default(), &inputs, &t.join("adaptive")).unwrap();
    let w = read_json(&t.join("adaptive/weights/weights.json"));
    let w1 = 1.2f64.powi(25);
    assert_eq!(w["models"][0]["weight"], 1.0);
    assert!((w["models"][1]["weight"].as_f64().unwrap() - w1).abs() < 1e-9 * w1);
    assert_eq!(w["models"][1]["accuracy"], 0.6);
    let ens = Predictions::read(&t.join("adaptive/predictions")).unwrap();
    // sum_i w_i p_i / M, renormalised: (0.8 + w1 * 0.3) / (1 + w1) for image x, class a.
    assert!((ens.probs[0] as f64 - (0.8 + w1 * 0.3) / (1.0 + w1)).abs() < 1e-6);
    assert!((ens.probs[0] + ens.probs[1] - 1.0).abs() < 1e-6);
    assert_eq!(ens.top1(), vec![1, 1]);
    assert!((ens.logits[0] - ens.probs[0].ln()).abs() < 1e-5);
    assert_eq!((w["models"][0]["agreement"].as_f64(), w["models"][1]["agreement"].as_f64()), (Some(0.0), Some(1.0)));
    let text = describe("ensemble", "weights", &t.join("adaptive/weights"));
    assert!(text.contains("95.3962") && text.contains("60.00%"), "{text}");

    // Averaging logits: ln p weighted by w / sum w, then softmax.
    run("ensemble", Params::default().with("average", "logits"), &inputs, &t.join("logits")).unwrap();
    let ens = Predictions::read(&t.join("logits/predictions")).unwrap();
    let z = |p: f64, q: f64| (p.ln() + w1 * q.ln()) / (1.0 + w1);
    let (za, zb) = (z(0.8, 0.3), z(0.2, 0.7));
    assert!((ens.probs[0] as f64 - za.exp() / (za.exp() + zb.exp())).abs() < 1e-5);
}

#[test]
fn ensemble_refuses_mismatched_inputs() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let p0 = predictions(&t.join("p0"), &["x", "y"], &["a", "b"], &[&[0.8, 0.2], &[0.6, 0.4]]);
    let other_ids = predictions(&t.join("p1"), &["x", "z"], &["a", "b"], &[&[0.8, 0.2], &[0.6, 0.4]]);
    let other_classes = predictions(&t.join("p2"), &["x", "y"], &["a", "c"], &[&[0.8, 0.2], &[0.6, 0.4]]);
    let m = metrics(&t.join("m0"), 0.5);

    let err = run("ensemble", Params::default().with("f", 0), &[("predictions", vec![p0.clone(), other_ids])], &t.join("o1")).unwrap_err().to_string();
    assert!(err.contains("input `predictions`") && err.contains("predictions[1]") && err.contains("`z`") && err.contains("`y`"), "{err}");
    let err = run("ensemble", Params::default().with("f", 0), &[("predictions", vec![p0.clone(), other_classes])], &t.join("o2")).unwrap_err().to_string();
    assert!(err.contains("class column 1") && err.contains("`c`"), "{err}");
    // f != 0 without metrics, and a metrics list of the wrong length.
    let err = run("ensemble", Params::default(), &[("predictions", vec![p0.clone(), p0.clone()])], &t.join("o3")).unwrap_err().to_string();
    assert!(err.contains("input `metrics`") && err.contains("f = 25"), "{err}");
    let err = run("ensemble", Params::default(), &[("predictions", vec![p0.clone(), p0.clone()]), ("metrics", vec![m])], &t.join("o4")).unwrap_err().to_string();
    assert!(err.contains("1 metrics for 2 predictions"), "{err}");
    let err = run("ensemble", Params::default().with("f", -1.0), &[("predictions", vec![p0])], &t.join("o5")).unwrap_err().to_string();
    assert!(err.contains("parameter `f`"), "{err}");
}

// ---------------------------------------------------------------------------------
// pseudo_label

const CLASSES: [&str; 3] = ["a", "b", "c"];

/// `n` 2x2 gray images whose pixels all equal `first + i`, ids `<prefix><i>`, in a store
/// of their own.
fn image_set(prefix: &str, n: usize, first: u8) -> ImageSet {
    let pixels = (0..n).flat_map(|i| [first + i as u8; 4]).collect();
    ImageSet::from_pixels(2, 2, 1, pixels, (0..n).map(|i| format!("{prefix}{i}")).collect(), strings(&CLASSES)).unwrap()
}

/// A training set (`n_train` images from pixel 0) and test A (`n_test` from pixel 10)
/// over one store, as a data set's splits are.
fn splits(n_train: usize, n_test: usize) -> (ImageSet, ImageSet) {
    let mut all = image_set("train/", n_train, 0);
    let test = image_set("testa/", n_test, 10);
    let pixels: Vec<u8> = (0..n_train).flat_map(|i| [i as u8; 4]).chain((0..n_test).flat_map(|i| [10 + i as u8; 4])).collect();
    let ids = all.ids.iter().chain(&test.ids).cloned().collect();
    all = ImageSet::from_pixels(2, 2, 1, pixels, ids, strings(&CLASSES)).unwrap();
    (all.select(&(0..n_train).collect::<Vec<_>>()), all.select(&(n_train..n_train + n_test).collect::<Vec<_>>()))
}

fn truth(testa: Vec<u32>, n_train: usize) -> GroundTruth {
    GroundTruth {
        classes: strings(&CLASSES),
        testa_sources: testa.iter().map(|_| "s".to_string()).collect(),
        testa_labels: testa,
        testb_labels: vec![],
        testb_sources: vec![],
        train_clean_labels: vec![Some(0); n_train],
        train_noise: vec![Noise::Clean; n_train],
        train_sources: vec!["s".into(); n_train],
        val_sources: vec![],
        near_class: vec![1, 2, 0],
        open_set_classes: vec![],
    }
}

#[test]
fn pseudo_label_threshold_selection_and_merged_set() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let (train_images, test) = splits(2, 4);
    let train = LabelledSet { images: train_images, labels: vec![0, 2] };
    artifact::write_labelled_set(&dir(t.join("train")), &train).unwrap();
    artifact::write_image_set(&dir(t.join("testa")), &test).unwrap();
    artifact::write_ground_truth(&dir(t.join("truth")), &truth(vec![1, 0, 2, 2], 2)).unwrap();
    let rows: [&[f32]; 4] = [
        &[0.2, 0.7, 0.1],   // kept as b (right)
        &[0.45, 0.35, 0.2], // 0.45 does not exceed 0.45: left out
        &[0.5, 0.1, 0.4],   // kept as a (wrong: truth c)
        &[0.1, 0.3, 0.6],   // kept as c (right)
    ];
    let ids: Vec<&str> = test.ids.iter().map(String::as_str).collect();
    let p = predictions(&t.join("pred"), &ids, &CLASSES, &rows);
    let inputs = [("predictions", vec![p.clone()]), ("images", vec![t.join("testa")]), ("train", vec![t.join("train")]), ("truth", vec![t.join("truth")])];
    run("pseudo_label", Params::default(), &inputs, &t.join("out")).unwrap();

    let merged = artifact::read_labelled_set(&t.join("out/train")).unwrap();
    assert_eq!(merged.images.ids, vec!["train/0", "train/1", "pseudo:testa/0", "pseudo:testa/2", "pseudo:testa/3"]);
    assert_eq!(merged.labels, vec![0, 2, 1, 0, 2]);
    assert_eq!(merged.images.image(3).unwrap().pixels.as_ref(), &[12u8; 4][..], "pixels follow their image");
    // The merged set is rows over the same store: its shard is the training set's, byte for byte.
    assert_eq!(fs::read(t.join("out/train/store/shard-00000.bin")).unwrap(), fs::read(t.join("train/store/shard-00000.bin")).unwrap());
    let r = read_json(&t.join("out/report/report.json"));
    assert_eq!((r["kept"].as_u64(), r["total"].as_u64(), r["train"].as_u64()), (Some(3), Some(4), Some(5)));
    let per_class: Vec<u64> = r["per_class"].as_array().unwrap().iter().map(|c| c["kept"].as_u64().unwrap()).collect();
    assert_eq!(per_class, vec![1, 1, 1]);
    assert_eq!(r["truth"]["correct"], 2);
    assert!((r["truth"]["precision"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(r["truth"]["dropped_accuracy"], 1.0);
    assert!(describe("pseudo_label", "report", &t.join("out/report")).contains("kept 3 of 4"));

    // The next round on the same set replaces these pseudo-labels instead of adding a second copy.
    let p2 = predictions(&t.join("pred2"), &ids, &CLASSES, &[&[0.9, 0.05, 0.05], &[0.1, 0.1, 0.8], &[0.3, 0.3, 0.4], &[0.3, 0.3, 0.4]]);
    let inputs = [("predictions", vec![p2]), ("images", vec![t.join("testa")]), ("train", vec![t.join("out/train")])];
    run("pseudo_label", Params::default().with("threshold", 0.5), &inputs, &t.join("out2")).unwrap();
    let merged = artifact::read_labelled_set(&t.join("out2/train")).unwrap();
    assert_eq!(merged.images.ids, vec!["train/0", "train/1", "pseudo:testa/0", "pseudo:testa/1"]);
    assert_eq!(merged.labels, vec![0, 2, 0, 2]);
    assert_eq!(read_json(&t.join("out2/report/report.json"))["replaced_previous"], 3);
}

#[test]
fn pseudo_label_refuses_mismatched_inputs() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let (train, testa) = splits(2, 2);
    artifact::write_labelled_set(&dir(t.join("train")), &LabelledSet { images: train, labels: vec![0, 1] }).unwrap();
    artifact::write_image_set(&dir(t.join("testa")), &testa).unwrap();
    // The same ids, from another data set (another store).
    artifact::write_image_set(&dir(t.join("big")), &image_set("testa/", 2, 10)).unwrap();
    let wrong_ids = predictions(&t.join("p1"), &["testa/0", "testb/1"], &CLASSES, &[&[0.8, 0.1, 0.1], &[0.8, 0.1, 0.1]]);
    let good = predictions(&t.join("p2"), &["testa/0", "testa/1"], &CLASSES, &[&[0.8, 0.1, 0.1], &[0.8, 0.1, 0.1]]);

    let go = |p: &PathBuf, images: &str, out: &str| {
        let inputs = [("predictions", vec![p.clone()]), ("images", vec![t.join(images)]), ("train", vec![t.join("train")])];
        run("pseudo_label", Params::default(), &inputs, &t.join(out)).unwrap_err().to_string()
    };
    let err = go(&wrong_ids, "testa", "o1");
    assert!(err.contains("input `images`") && err.contains("`testb/1`") && err.contains("`testa/1`"), "{err}");
    let err = go(&good, "big", "o2");
    assert!(err.contains("different image stores"), "{err}");
}

// ---------------------------------------------------------------------------------
// redistribute

/// Counts [2, 1, 3] for K = 2. Class 1's best candidate (x0, 0.35) is one of class 0's
/// two images: the seed takes it, leaving class 0 under-filled; the cheapest fill that
/// hurts no class takes x3 from class 2 (ln 0.7/0.2 = 1.25 < ln 0.6/0.35 + ln 0.7/0.1 = 2.49).
const STEAL: [&[f32]; 6] = [&[0.6, 0.35, 0.05], &[0.7, 0.05, 0.25], &[0.1, 0.1, 0.8], &[0.1, 0.2, 0.7], &[0.05, 0.15, 0.8], &[0.1, 0.6, 0.3]];
const STEAL_IDS: [&str; 6] = ["x0", "x1", "x2", "x3", "x4", "x5"];


#[test]
fn redistribute_seed_steals_and_balanced_does_not() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let p = predictions(&t.join("pred"), &STEAL_IDS, &CLASSES, &STEAL);
    let input = [("predictions", vec![p.clone()])];

    run("redistribute", Params::default().with("k", 2).with("method", "seed"), &input, &t.join("seed")).unwrap();
    let seed = Predictions::read(&t.join("seed/predictions")).unwrap();
    assert_eq!(seed.top1(), vec![1, 0, 2, 2, 2, 1]);
    let r = read_json(&t.join("seed/report/report.json"));
    assert_eq!((r["moved"].as_u64(), r["under_filled_before"].as_u64(), r["under_filled_after"].as_u64()), (Some(1), Some(1), Some(1)));
    // The moved row keeps its values, its old top and new class swapped.
    assert_eq!(&seed.probs[0..3], &[0.35, 0.6, 0.05]);

    run("redistribute", Params::default().with("k", 2).with("method", "balanced"), &input, &t.join("balanced")).unwrap();
    let bal = Predictions::read(&t.join("balanced/predictions")).unwrap();
    assert_eq!(bal.top1(), vec![0, 0, 2, 1, 2, 1]);
    let r = read_json(&t.join("balanced/report/report.json"));
    assert_eq!((r["moved"].as_u64(), r["under_filled_after"].as_u64()), (Some(1), Some(0)));
    let after: Vec<u64> = r["per_class"].as_array().unwrap().iter().map(|c| c["after"].as_u64().unwrap()).collect();
    assert_eq!(after, vec![2, 2, 2]);
    assert!((r["log_prob_given_up"].as_f64().unwrap() - (0.7f64 / 0.2).ln()).abs() < 1e-5);
    assert!(describe("redistribute", "report", &t.join("balanced/report")).contains("0 after"));

    // Deterministic: a second run writes the same bytes.
    for method in ["seed", "balanced"] {
        run("redistribute", Params::default().with("k", 2).with("method", method), &input, &t.join("again").join(method)).unwrap();
        assert_eq!(files(&t.join(method)), files(&t.join("again").join(method)), "{method}");
    }
}

#[test]
fn redistribute_balanced_leaves_balanced_predictions_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    // 9 images, argmax counts 4, 3, 2: every class holds automatic K = floor(9 / 3) - 1 = 2.
    let rows: [&[f32]; 9] = [
        &[0.5, 0.3, 0.2],
        &[0.4, 0.35, 0.25],
        &[0.9, 0.05, 0.05],
        &[0.3, 0.6, 0.1],
        &[0.1, 0.5, 0.4],
        &[0.2, 0.7, 0.1],
        &[0.3, 0.3, 0.4],
        &[0.1, 0.1, 0.8],
        &[0.45, 0.1, 0.45], // tied top: argmax a, so a has 4 and c 2
    ];
    let ids = ["i0", "i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"];
    let p = predictions(&t.join("pred"), &ids, &CLASSES, &rows);
    run("redistribute", Params::default().with("method", "balanced"), &[("predictions", vec![p.clone()])], &t.join("out")).unwrap();
    assert_eq!(files(&p), files(&t.join("out/predictions")));
    let r = read_json(&t.join("out/report/report.json"));
    assert_eq!((r["k"].as_u64(), r["k_auto"].as_bool(), r["moved"].as_u64()), (Some(2), Some(true), Some(0)));

    // K too large for the set: a clear error rather than a silent partial fill.
    let err = run("redistribute", Params::default().with("method", "balanced").with("k", 4), &[("predictions", vec![p])], &t.join("o2")).unwrap_err().to_string();
    assert!(err.contains("parameter `k`") && err.contains("k * C"), "{err}");
}
