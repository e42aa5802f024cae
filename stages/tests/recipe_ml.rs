//! The recipe's model-level stages end to end on tiny data: `soup` (uniform and greedy
//! soups of a train run's checkpoints) and `clean` (out-of-fold label cleaning).
//! Soups use a slice of the committed QuickDraw drawings (real strokes, so epochs give
//! genuinely different checkpoints); cleaning uses synthetic classes a tiny CNN learns
//! in a few epochs, so the noise it should find is the only noise there is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fgflow_engine::{NoProgress, Params, RunContext, StageKind};
use fgflow_stages::artifact::{self, GroundTruth, ImageSet, LabelledSet, Noise};
use fgflow_stages::ml::checkpoint;
use fgflow_stages::ml::predictions::Predictions;
use fgflow_stages::ml::train_loop::{self, Labelled};
use safetensors::{Dtype, SafeTensors};

use crate::support;
use support::quickdraw;

type B = burn::backend::Flex;

fn ctx<'a>(params: Params, inputs: &[(&str, &Path)], out: &Path, scratch: &Path) -> RunContext<'a> {
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs.iter().map(|(k, p)| (k.to_string(), vec![p.to_path_buf()])).collect();
    RunContext::new("test", params, "flex", inputs, BTreeMap::new(), out.to_path_buf(), scratch.to_path_buf(), &NoProgress)
}

fn with_defaults(kind: &dyn StageKind, mut p: Params) -> Params {
    for spec in kind.params() {
        if let (false, Some(d)) = (p.0.contains_key(spec.name), spec.default) {
            p.0.insert(spec.name.to_string(), d);
        }
    }
    p
}

fn kind(name: &str) -> Arc<dyn StageKind> {
    fgflow_stages::registry().get(name).unwrap_or_else(|| panic!("kind `{name}` is not registered")).clone()
}

fn write_set(dir: &Path, set: &LabelledSet) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    artifact::write_labelled_set(dir, set).unwrap();
    dir.to_path_buf()
}

/// f32 tensors of a model file by name (every tensor burn writes is f32).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{name}");
            let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

fn view(s: &LabelledSet) -> Labelled<'_> {
    Labelled { images: &s.images, labels: &s.labels }
}

// ---------------------------------------------------------------------------------
// soup

/// One train run with its last 3 epoch checkpoints; returns (tmp, checkpoints, val dir, val set).
fn train_run() -> (tempfile::TempDir, PathBuf, PathBuf, LabelledSet) {
    let (train, val) = quickdraw(&[4, 20, 40, 60, 80], 40, 60);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let train_dir = write_set(&t.join("train"), &train);
    let val_dir = write_set(&t.join("val"), &val);
    let k = kind("train");
    let params = with_defaults(
        k.as_ref(),
        Params::default()
            .with("cnn_widths", vec![8i64, 16])
            .with("cnn_blocks", 1)
            .with("epochs", 4)
            .with("batch_size", 16)
            .with("lr", 3e-3)
            .with("keep_checkpoints", 3),
    );
    let c = ctx(params, &[("train", &train_dir), ("val", &val_dir)], &t.join("run"), &t.join("s"));
    k.run(&c).unwrap();
    let ckpts = t.join("run/checkpoints");
    (tmp, ckpts, val_dir, val)
}

fn run_soup(t: &Path, name: &str, params: Params, ckpts: &Path, val: Option<&Path>) -> PathBuf {
    let k = kind("soup");
    let params = with_defaults(k.as_ref(), params);
    assert!(k.validate(&params).is_empty(), "{:?}", k.validate(&params));
    let mut inputs = vec![("checkpoints", ckpts)];
    if let Some(v) = val {
        inputs.push(("val", v));
    }
    let out = t.join(name);
    let c = ctx(params, &inputs, &out, &t.join(format!("{name}-s")));
    k.run(&c).unwrap();
    out
}

#[test]
fn soup_uniform_is_the_mean_greedy_never_loses_and_the_soup_predicts() {
    let started = std::time::Instant::now();
    let (tmp, ckpts, val_dir, val) = train_run();
    let t = tmp.path();
    let index = checkpoint::read_index(&ckpts).unwrap();
    assert_eq!(index.iter().map(|(e, _)| e.epoch).collect::<Vec<_>>(), vec![2, 3, 4]);
    let members: Vec<_> = index.iter().map(|(_, d)| tensors(&d.join(checkpoint::WEIGHTS_FILE))).collect();
    eprintln!("train run: {:.1}s", started.elapsed().as_secs_f64());

    // Uniform soup of all three: every tensor the element-wise mean, summed in f64 in
    // checkpoint order and rounded once, which is what the kind promises; exact equality.
    let out = run_soup(t, "uniform", Params::default(), &ckpts, Some(&val_dir));
    let soup = tensors(&out.join("model/model.safetensors"));
    assert_eq!(soup.keys().collect::<Vec<_>>(), members[0].keys().collect::<Vec<_>>());
    let mut buffers = 0;
    for (name, (shape, values)) in &soup {
        assert_eq!(shape, &members[0][name].0, "{name}");
        let want: Vec<f32> = (0..values.len()).map(|i| (members.iter().map(|m| m[name].1[i] as f64).sum::<f64>() / 3.0) as f32).collect();
        assert_eq!(values, &want, "{name} is not the mean of the checkpoints");
        if name.contains("running") {
            // BatchNorm statistics must be averaged too, and must differ between
            // epochs for this to test anything.
            assert_ne!(members[0][name].1, members[2][name].1, "{name} did not change between epochs");
            buffers += 1;
        }
    }
    assert!(buffers >= 2, "no BatchNorm running statistics found in {:?}", soup.keys().collect::<Vec<_>>());
    assert!(soup.keys().any(|k| k.contains("eql")), "EQL buffers are part of the soup");
    let config = checkpoint::read_config(&out.join("model")).unwrap();
    assert_eq!(config.epoch, 4);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report/soup.json")).unwrap()).unwrap();
    assert_eq!(report["ingredients"], serde_json::json!([2, 3, 4]));
    assert!(kind("soup").describe_output("report", &out.join("report")).unwrap().contains("uniform soup of 3"));

    // A soup of one checkpoint is that checkpoint.
    let one = run_soup(t, "one", Params::default().with("last", 1), &ckpts, None);
    assert_eq!(tensors(&one.join("model/model.safetensors")), members[2]);
    assert_eq!(checkpoint::read_config(&one.join("model")).unwrap(), checkpoint::read_config(&index[2].1).unwrap());

    // Greedy: its validation accuracy is at least the best single checkpoint's, and the
    // report's number is the one the saved soup really gets.
    let greedy = run_soup(t, "greedy", Params::default().with("method", "greedy"), &ckpts, Some(&val_dir));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(greedy.join("report/soup.json")).unwrap()).unwrap();
    let singles: Vec<f64> = report["candidates"].as_array().unwrap().iter().map(|c| c["val_acc"].as_f64().unwrap()).collect();
    let best = singles.iter().copied().fold(0.0, f64::max);
    let soup_acc = report["soup_val_acc"].as_f64().unwrap();
    assert!(soup_acc >= best, "greedy soup {soup_acc} < best single checkpoint {best}");
    assert_eq!(singles[0], best, "greedy starts from the best checkpoint");
    let (model, config) = checkpoint::load_model::<B>(&greedy.join("model"), &Default::default()).unwrap();
    assert_eq!(train_loop::accuracy(&model, &config, view(&val), 64).unwrap(), soup_acc);
    eprintln!("greedy: singles {singles:?} -> soup {soup_acc} with epochs {}", report["ingredients"]);

    // Greedy without `val` is a clear error.
    let k = kind("soup");
    let c = ctx(with_defaults(k.as_ref(), Params::default().with("method", "greedy")), &[("checkpoints", &ckpts)], &t.join("g2"), &t.join("g2s"));
    assert!(k.run(&c).unwrap_err().to_string().contains("connect `val`"));

    // The uniform soup loads in `predict` and predicts.
    let k = kind("predict");
    let c = ctx(with_defaults(k.as_ref(), Params::default()), &[("model", &out.join("model")), ("labelled", &val_dir)], &t.join("pred"), &t.join("ps"));
    k.run(&c).unwrap();
    let pred = Predictions::read(&t.join("pred/predictions")).unwrap();
    assert_eq!(pred.n(), val.images.n());
    let acc = pred.top1().iter().zip(&val.labels).filter(|(p, y)| **p == **y as usize).count() as f64 / pred.n() as f64;
    assert!(acc > 0.4, "uniform soup accuracy {acc} (chance 0.2)");
    eprintln!("soup test: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn soup_refuses_checkpoints_of_different_runs() {
    let (tmp, ckpts, _, _) = train_run();
    let t = tmp.path();
    // Make the oldest checkpoint claim other classes: a mixed artifact.
    let dir = checkpoint::read_index(&ckpts).unwrap()[0].1.clone();
    let mut config = checkpoint::read_config(&dir).unwrap();
    config.classes[0] = "something else".into();
    std::fs::write(dir.join(checkpoint::CONFIG_FILE), serde_json::to_string(&config).unwrap()).unwrap();
    let k = kind("soup");
    let c = ctx(with_defaults(k.as_ref(), Params::default()), &[("checkpoints", &ckpts)], &t.join("o"), &t.join("s2"));
    let err = k.run(&c).unwrap_err().to_string();
    assert!(err.contains("checkpoints") && err.contains("one run"), "{err}");
}

// ---------------------------------------------------------------------------------
// clean

/// `classes` (at most 8) synthetic texture classes of `per_class` 28x28 images: class k
/// is stripes of period 2, 3, 4 or 6 (k / 2), horizontal or vertical (k % 2), at a
/// random phase, over speckle noise. Textures rather than positions, because the CNN
/// pools globally; a tiny CNN learns them in a few epochs, so the only hard samples
/// are the mislabelled ones.
fn synthetic(classes: usize, per_class: usize, seed: u64) -> LabelledSet {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let (mut pixels, mut labels, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..per_class {
        for k in 0..classes {
            let period = [2, 3, 4, 6][k / 2];
            let phase = next() % period;
            for r in 0..28 {
                for c in 0..28 {
                    let coord = if k % 2 == 0 { r } else { c };
                    let on = (coord + phase) % period < period.div_ceil(2);
                    pixels.push(if on { 180 + (next() % 76) as u8 } else { (next() % 70) as u8 });
                }
            }
            labels.push(k as u32);
            ids.push(format!("syn/{k}/{j}"));
        }
    }
    let classes = (0..classes).map(|k| format!("stripes{k}")).collect();
    LabelledSet { images: ImageSet::from_pixels(28, 28, 1, pixels, ids, classes).unwrap(), labels }
}

/// Give every `every`-th sample another class's label (uniform-style noise; `every`
/// coprime to the class count, so the noise spreads over the classes),
/// returning the noisy set and its ground truth.
fn with_noise(clean: &LabelledSet, every: usize) -> (LabelledSet, GroundTruth) {
    let c = clean.n_classes() as u32;
    let mut noisy = clean.clone();
    let mut flags = vec![Noise::Clean; clean.images.n()];
    for i in (0..clean.images.n()).step_by(every) {
        noisy.labels[i] = (clean.labels[i] + 1 + (i as u32 / every as u32) % (c - 1)) % c;
        flags[i] = Noise::Uniform;
    }
    let n = clean.images.n();
    let truth = GroundTruth {
        classes: clean.images.classes.clone(),
        testa_labels: vec![],
        testb_labels: vec![],
        train_clean_labels: clean.labels.iter().map(|&l| Some(l)).collect(),
        train_noise: flags,
        near_class: (0..c).map(|k| (k + 1) % c).collect(),
        open_set_classes: vec![],
        train_sources: (0..n).map(|i| format!("syn/{i}")).collect(),
        val_sources: vec![],
        testa_sources: vec![],
        testb_sources: vec![],
    };
    (noisy, truth)
}

fn clean_params() -> Params {
    with_defaults(
        kind("clean").as_ref(),
        Params::default()
            .with("cnn_widths", vec![8i64, 16])
            .with("cnn_blocks", 1)
            .with("epochs", 15)
            .with("batch_size", 16)
            .with("lr", 1e-2)
            .with("aug_shift", 0)
            .with("aug_erase", 0.0)
            .with("seed", 5),
    )
}

fn run_clean(t: &Path, name: &str, train: &Path, truth: Option<&Path>) -> PathBuf {
    let k = kind("clean");
    let params = clean_params();
    assert!(k.validate(&params).is_empty(), "{:?}", k.validate(&params));
    let mut inputs = vec![("train", train)];
    if let Some(tr) = truth {
        inputs.push(("truth", tr));
    }
    let out = t.join(name);
    let c = ctx(params, &inputs, &out, &t.join(format!("{name}-s")));
    k.run(&c).unwrap();
    eprintln!("{}", c.take_log());
    out
}

#[test]
fn clean_drops_injected_noise_deterministically_and_reports_it_correctly() {
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let clean = synthetic(8, 16, 1);
    let (noisy, truth) = with_noise(&clean, 9);
    let train_dir = write_set(&t.join("train"), &noisy);
    std::fs::create_dir_all(t.join("truth")).unwrap();
    artifact::write_ground_truth(&t.join("truth"), &truth).unwrap();

    let a = run_clean(t, "a", &train_dir, Some(&t.join("truth")));
    eprintln!("clean (3 folds, 128 samples): {:.1}s", started.elapsed().as_secs_f64());
    let b = run_clean(t, "b", &train_dir, Some(&t.join("truth")));
    // Deterministic: the same kept set, byte for byte, and the same report.
    for f in ["train/rows.safetensors", "train/classes.json", "train/store/shard-00000.bin", "report/clean.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f} differs between identical runs");
    }

    // Recount the report from the kept ids and the flags.
    let kept = artifact::read_labelled_set(&a.join("train")).unwrap();
    let kept_ids: BTreeSet<&str> = kept.images.ids.iter().map(String::as_str).collect();
    let dropped: Vec<bool> = noisy.images.ids.iter().map(|id| !kept_ids.contains(id.as_str())).collect();
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("report/clean.json")).unwrap()).unwrap();
    let n_dropped = dropped.iter().filter(|&&d| d).count();
    let caught = dropped.iter().zip(&truth.train_noise).filter(|&(&d, &f)| d && f != Noise::Clean).count();
    let noisy_n = truth.train_noise.iter().filter(|&&f| f != Noise::Clean).count();
    assert_eq!(report["dropped"].as_u64().unwrap() as usize, n_dropped);
    assert_eq!(report["kept"].as_u64().unwrap() as usize, kept.images.n());
    assert_eq!(report["noise"]["dropped_noisy"].as_u64().unwrap() as usize, caught);
    assert_eq!(report["noise"]["noisy"].as_u64().unwrap() as usize, noisy_n);
    let precision = report["noise"]["precision"].as_f64().unwrap();
    let recall = report["noise"]["recall"].as_f64().unwrap();
    assert_eq!(precision, caught as f64 / n_dropped as f64);
    assert_eq!(recall, caught as f64 / noisy_n as f64);
    let uniform = report["noise"]["by_type"].as_array().unwrap().iter().find(|t| t["noise"] == "uniform").unwrap();
    assert_eq!(uniform["recall"].as_f64().unwrap(), recall, "all the injected noise is uniform");
    // The kept samples keep their (given) labels and order.
    let kept_labels: Vec<u32> = (0..noisy.images.n()).filter(|&i| !dropped[i]).map(|i| noisy.labels[i]).collect();
    assert_eq!(kept.labels, kept_labels);
    // And the criterion works on this easy data: most noise found, few good samples lost.
    eprintln!("clean: dropped {n_dropped}, caught {caught}/{noisy_n}, precision {precision:.2} recall {recall:.2}");
    assert!(recall >= 0.75, "recall {recall}");
    assert!(precision >= 0.6, "precision {precision}");
    let shown = kind("clean").describe_output("report", &a.join("report")).unwrap();
    assert!(shown.contains("precision") && shown.contains("uniform"), "{shown}");
    assert_eq!(Predictions::read(&a.join("report/oof")).unwrap().n(), noisy.images.n());

    // The truth must describe this very set.
    let (_, short) = with_noise(&synthetic(8, 8, 1), 9);
    std::fs::create_dir_all(t.join("short")).unwrap();
    artifact::write_ground_truth(&t.join("short"), &short).unwrap();
    let k = kind("clean");
    let c = ctx(clean_params(), &[("train", &train_dir), ("truth", &t.join("short"))], &t.join("c"), &t.join("cs"));
    let err = k.run(&c).unwrap_err().to_string();
    assert!(err.contains("input `truth`"), "{err}");
}

#[test]
fn clean_keeps_most_of_a_clean_set() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let clean = synthetic(8, 16, 2);
    let train_dir = write_set(&t.join("train"), &clean);
    let out = run_clean(t, "a", &train_dir, None);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report/clean.json")).unwrap()).unwrap();
    let kept = report["kept"].as_u64().unwrap() as f64;
    assert!(kept >= 0.9 * clean.images.n() as f64, "kept only {kept} of {} clean samples", clean.images.n());
    assert!(report["noise"].is_null());
}

/// `pretrain`: MAE on a labelled slice (labels ignored) plus an unlabelled set; the
/// reconstruction loss falls; the output is a ViT model that `train` starts from
/// (its backbone weights are the pre-trained encoder's, not a fresh init); same seed,
/// same bytes.
#[test]
fn pretrain_mae_loss_falls_and_train_starts_from_its_encoder() {
    use fgflow_engine::Value;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (train, test) = quickdraw(&[0, 1, 2, 3], 40, 60);
    let train_dir = write_set(&t.join("train"), &train);
    let unlabelled = t.join("testa");
    std::fs::create_dir_all(&unlabelled).unwrap();
    artifact::write_image_set(&unlabelled, &test.images).unwrap();
    // A function, not a closure: rustc 1.95.0 miscompiles this test at opt-level 2 and
    // above when `vit` is a closure called twice (a segfault in release; see
    // docs/rustc-1.95-miscompile.md).
    fn vit(p: Params) -> Params {
        p.with("vit_patch", Value::Int(7)).with("vit_dim", Value::Int(32)).with("vit_depth", Value::Int(1)).with("vit_heads", Value::Int(2))
    }
    let params = vit(Params::default())
        .with("epochs", Value::Int(8))
        .with("batch_size", Value::Int(32))
        .with("lr", Value::Float(3e-3))
        .with("decoder_dim", Value::Int(32))
        .with("decoder_heads", Value::Int(2))
        .with("seed", Value::Int(5));
    let inputs = [("labelled", vec![train_dir.clone()]), ("images", vec![unlabelled.clone()])];
    let log = support::run_kind("pretrain", params.clone(), &inputs, &[], &t.join("mae")).unwrap();
    assert!(log.contains("pretrain: 240 images from 2 set(s)"), "{log}");
    let losses: Vec<f64> = serde_json::from_slice::<serde_json::Value>(&std::fs::read(t.join("mae/log/log.json")).unwrap()).unwrap()["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 8);
    assert!(losses[7] < 0.9 * losses[0], "reconstruction loss did not fall: {losses:?}");
    assert!(support::describe("pretrain", "model", &t.join("mae/model")).contains("ViT patch 7 dim 32"));

    // Same seed, same bytes.
    support::run_kind("pretrain", params, &inputs, &[], &t.join("mae2")).unwrap();
    assert_eq!(support::files(&t.join("mae/model")), support::files(&t.join("mae2/model")));

    // `train` from it: after one epoch at a negligible learning rate, the backbone
    // still holds the encoder's weights (a fresh init would differ entirely).
    let ft = support::run_kind(
        "train",
        vit(Params::default()).with("backbone", Value::Str("vit".into())).with("epochs", Value::Int(1)).with("lr", Value::Float(1e-12)).with("min_lr", Value::Float(0.0)).with("warmup_epochs", Value::Float(0.0)),
        &[("train", vec![train_dir]), ("init", vec![t.join("mae/model")])],
        &[],
        &t.join("ft"),
    )
    .unwrap();
    assert!(ft.contains("init: backbone"), "{ft}");
    let pre = tensors(&t.join("mae/model").join(checkpoint::WEIGHTS_FILE));
    let fine = tensors(&t.join("ft/model").join(checkpoint::WEIGHTS_FILE));
    let name = pre.keys().find(|k| k.contains("patch_embed") && k.contains("weight")).expect("a patch embedding").clone();
    let worst = pre[&name].1.iter().zip(&fine[&name].1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{name}: the fine-tuned model did not start from the encoder ({worst})");
}
