//! Correctness tests of the ML core: heads and losses against values computed by hand
//! on tiny tensors, flip TTA, save/load, determinism, and real training on a slice of
//! the committed QuickDraw drawings (data/quickdraw), through the ML API and through
//! the `train` / `predict` / `evaluate` kinds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::{Param, ParamId};
use burn::tensor::{Int, Tensor, TensorData};
use fgflow_engine::{NoProgress, Params, RunContext};
use fgflow_stages::artifact::{self, LabelledSet};
use fgflow_stages::ml::augment::{AugmentConfig, hflip};
use fgflow_stages::ml::checkpoint;
use fgflow_stages::ml::cnn::CnnConfig;
use fgflow_stages::ml::data::Images;
use fgflow_stages::store::Target;
use fgflow_stages::ml::head::{ArcFaceHead, HeadConfig, adaptive_margins, arcface_logits, log_prior};
use fgflow_stages::ml::loss::{EqlIndicator, LossConfig, add_per_class, cross_entropy, eql_adjust, eql_increments, eql_indicator};
use fgflow_stages::ml::metrics::Metrics;
use fgflow_stages::ml::model::{BackboneConfig, MODEL_FORMAT, ModelConfig};
use fgflow_stages::ml::predictions::Predictions;
use fgflow_stages::ml::train_loop::{self, Labelled, Quiet, TrainConfig, post_hoc_adjust, predict_logits};
use fgflow_stages::ml::vit::{VitConfig, VitPool};

use crate::support;
use support::quickdraw;

type B = Flex;
type AD = Autodiff<Flex>;

fn dev() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

fn t2(rows: &[&[f32]]) -> Tensor<B, 2> {
    let c = rows[0].len();
    let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(v, [rows.len(), c]), &dev())
}

fn t1(v: &[f32]) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &dev())
}

fn labels(v: &[i64]) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &dev())
}

fn vec_of<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < tol, "got {got:?}, want {want:?}");
    }
}

// ---------------------------------------------------------------------------------
// Heads

#[test]
fn arcface_target_logit_both_branches() {
    // Sample 0: cos_y = 0.8 > cos(pi - 0.5) = -0.8776 -> s*cos(acos(0.8) + 0.5).
    // Sample 1: cos_y = -0.95 <= -0.8776 -> s*(cos_y - m*sin(pi - m)) with m = 0.5.
    let cos = t2(&[&[0.8, 0.1, -0.2], &[-0.95, 0.3, 0.0]]);
    let out = vec_of(arcface_logits(cos, labels(&[0, 0]), t1(&[0.5, 0.1, 0.1]), 30.0));
    let (m, s) = (0.5f64, 30.0f64);
    let first = s * (0.8f64.acos() + m).cos(); // = 30 * (0.8*cos .5 - 0.6*sin .5) = 12.4323
    let second = s * (-0.95 - m * (std::f64::consts::PI - m).sin()); // = -35.6914
    assert!((first - 12.4323).abs() < 1e-3 && (second + 35.6914).abs() < 1e-3);
    close(&out, &[first, 3.0, -6.0, second, 9.0, 0.0], 1e-3);
}

#[test]
fn arcface_uses_each_samples_own_margin_and_no_margin_at_inference() {
    let cos = t2(&[&[0.5, 0.5], &[0.5, 0.5]]);
    let out = vec_of(arcface_logits(cos, labels(&[0, 1]), t1(&[0.1, 0.3]), 10.0));
    let a = 10.0 * (0.5f64.acos() + 0.1).cos();
    let b = 10.0 * (0.5f64.acos() + 0.3).cos();
    close(&out, &[a, 5.0, 5.0, b], 1e-4);
}

#[test]
fn subcenter_cosine_is_the_max_over_centres() {
    // 2 classes x 2 centres in 2-d: class 0 = {(1,0), (0,1)}, class 1 = {(-1,0), (0,-1)}.
    let head = ArcFaceHead::<B> { centres: Param::initialized(ParamId::new(), t2(&[&[2.0, 0.0], &[0.0, 1.0], &[-1.0, 0.0], &[0.0, -3.0]])), k: 2, s: 30.0 };
    // Feature (3, 4) normalises to (0.6, 0.8): cosines 0.6, 0.8 | -0.6, -0.8.
    let cos = vec_of(head.cosine(t2(&[&[3.0, 4.0]])));
    close(&cos, &[0.8, -0.6], 1e-5);
    // Inference logits: s * cos, no margin.
    let logits = vec_of(fgflow_stages::ml::head::Head::ArcFace(head).forward(t2(&[&[3.0, 4.0]])));
    close(&logits, &[24.0, -18.0], 1e-4);
}

#[test]
fn adaptive_margins_from_counts() {
    // t = n^-1/4 = 1, 0.5, 0.25 -> normalised 1, 1/3, 0 -> m = 0.45*r + 0.05.
    close(&adaptive_margins(&[1, 16, 256], 0.45, 0.05), &[0.5, 0.2, 0.05], 1e-6);
    // Equal counts: every class gets m_y; an empty class counts as the rarest.
    close(&adaptive_margins(&[7, 7], 0.45, 0.05), &[0.05, 0.05], 1e-7);
    close(&adaptive_margins(&[0, 1, 256], 0.45, 0.05), &[0.5, 0.5, 0.05], 1e-6);
}

#[test]
fn logit_adjustment_post_hoc_and_in_loss() {
    // prior = [0.25, 0.75]: a = [ln .25, ln .75].
    let a = log_prior(&[1, 3], 1.0);
    close(&a, &[0.25f64.ln(), 0.75f64.ln()], 1e-6);
    close(&log_prior(&[1, 3], 2.0), &[2.0 * 0.25f64.ln(), 2.0 * 0.75f64.ln()], 1e-5);
    let mut logits = vec![0.0f32, 0.0, 1.0, 1.0];
    post_hoc_adjust(&mut logits, &a);
    close(&logits, &[-(0.25f64.ln()), -(0.75f64.ln()), 1.0 - 0.25f64.ln(), 1.0 - 0.75f64.ln()], 1e-6);
    // In the loss: logits + a.
    close(&vec_of(add_per_class(t2(&[&[0.0, 0.0]]), t1(&a))), &[0.25f64.ln(), 0.75f64.ln()], 1e-6);
}

// ---------------------------------------------------------------------------------
// Losses

#[test]
fn cross_entropy_with_label_smoothing() {
    // logits (0, ln 3): p = (.25, .75). Label 1, no smoothing: -ln .75.
    let z = || t2(&[&[0.0, 3.0f32.ln()]]);
    close(&vec_of(cross_entropy(z(), labels(&[1]), 0.0)), &[-(0.75f64.ln())], 1e-6);
    // e = 0.1: target (0.05, 0.95).
    let want = -(0.05 * 0.25f64.ln() + 0.95 * 0.75f64.ln());
    close(&vec_of(cross_entropy(z(), labels(&[1]), 0.1)), &[want], 1e-6);
    // Batch mean.
    let two = t2(&[&[0.0, 3.0f32.ln()], &[0.0, 3.0f32.ln()]]);
    close(&vec_of(cross_entropy(two, labels(&[1, 0]), 0.0)), &[(-(0.75f64.ln()) - 0.25f64.ln()) / 2.0], 1e-6);
}

#[test]
fn balanced_softmax_is_ce_on_logits_plus_log_prior() {
    // Equal logits, prior (.25, .75): softmax of the shifted logits is the prior itself.
    let shifted = add_per_class(t2(&[&[0.0, 0.0]]), t1(&log_prior(&[1, 3], 1.0)));
    close(&vec_of(cross_entropy(shifted.clone(), labels(&[0]), 0.0)), &[-(0.25f64.ln())], 1e-6);
    close(&vec_of(cross_entropy(shifted, labels(&[1]), 0.0)), &[-(0.75f64.ln())], 1e-6);
}

#[test]
fn eql_adjustment_after_updates() {
    let (tau, eps) = (1.0, 1e-4);
    // Start: g = 0 everywhere -> nothing is adjusted.
    let (pos, neg) = (t1(&[0.0, 0.0, 0.0]), t1(&[0.0, 0.0, 0.0]));
    let g = eql_indicator(pos.clone(), neg.clone(), EqlIndicator::Pos, eps);
    let z1 = eql_adjust(t2(&[&[0.0, 0.0, 0.0]]), labels(&[0]), g, tau, eps);
    close(&vec_of(z1.clone()), &[0.0, 0.0, 0.0], 1e-7);
    // Update with that sample (label 0, p = 1/3 each): |p - onehot| = (2/3, 1/3, 1/3).
    let (dp, dn) = eql_increments(z1, labels(&[0]));
    let (pos, neg) = (pos + dp, neg + dn);
    close(&vec_of(pos.clone()), &[2.0 / 3.0, 0.0, 0.0], 1e-6);
    close(&vec_of(neg.clone()), &[0.0, 1.0 / 3.0, 1.0 / 3.0], 1e-6);
    // A sample of class 1: non-target j gets tau*log(max(g_j,eps)/max(g_1,eps)).
    let g = eql_indicator(pos.clone(), neg.clone(), EqlIndicator::Pos, eps);
    let z2 = eql_adjust(t2(&[&[0.0, 0.0, 0.0]]), labels(&[1]), g, tau, eps);
    close(&vec_of(z2), &[((2.0 / 3.0) / 1e-4f64).ln(), 0.0, 0.0], 1e-4);
    // A sample of class 0: the rare classes' logits go down by log(g_0/eps).
    let g = eql_indicator(pos.clone(), neg.clone(), EqlIndicator::Pos, eps);
    let z3 = eql_adjust(t2(&[&[1.0, 1.0, 1.0]]), labels(&[0]), g, 0.5, eps);
    let d = 0.5 * (1e-4f64 / (2.0 / 3.0)).ln();
    close(&vec_of(z3), &[1.0, 1.0 + d, 1.0 + d], 1e-4);
    // Ratio indicator: pos / max(neg, eps).
    let g = eql_indicator(pos, neg, EqlIndicator::Ratio, eps);
    close(&vec_of(g), &[(2.0 / 3.0) / 1e-4, 0.0, 0.0], 1e-1);
}

// ---------------------------------------------------------------------------------
// Models, TTA, save/load

fn cnn_config(classes: usize, widths: Vec<usize>, blocks: usize) -> ModelConfig {
    ModelConfig {
        format: MODEL_FORMAT,
        backbone: BackboneConfig::Cnn(CnnConfig { widths, blocks }),
        head: HeadConfig::Linear,
        logit_adjust: None,
        loss: LossConfig::Ce,
        classes: (0..classes).map(|i| format!("c{i}")).collect(),
        height: 28,
        width: 28,
        channels: 1,
        class_counts: vec![1; classes],
        epoch: 0,
    }
}

fn random_pixels(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n * 28 * 28)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

#[test]
fn flip_tta_is_the_mean_of_image_and_mirror_logits() {
    let config = cnn_config(5, vec![8, 16], 1);
    let model = config.init::<B>(3, &dev());
    let pixels = random_pixels(3, 1);
    let images = Images::new(3, 28, 28, 1, &pixels).unwrap();
    let plain = predict_logits(&model, T28, &images, 2, false).unwrap();
    let mirrored_pixels: Vec<u8> = (0..3).flat_map(|i| hflip(images.image(i), 28, 28, 1)).collect();
    let mirrored = predict_logits(&model, T28, &Images::new(3, 28, 28, 1, &mirrored_pixels).unwrap(), 2, false).unwrap();
    let tta = predict_logits(&model, T28, &images, 2, true).unwrap();
    assert_ne!(plain, mirrored, "random images are not symmetric");
    let want: Vec<f64> = plain.iter().zip(&mirrored).map(|(a, b)| (*a as f64 + *b as f64) / 2.0).collect();
    close(&tta, &want, 1e-4);
    // Probabilities are the softmax of the averaged logits.
    let p = Predictions::from_logits(vec!["a".into(), "b".into(), "c".into()], config.classes.clone(), tta.clone());
    let row: Vec<f64> = tta[..5].iter().map(|&v| (v as f64).exp()).collect();
    let sum: f64 = row.iter().sum();
    close(&p.probs[..5], &row.iter().map(|v| v / sum).collect::<Vec<_>>(), 1e-5);
}

#[test]
fn vit_forward_shapes_and_size() {
    let mut config = cnn_config(10, vec![8], 1);
    config.backbone = BackboneConfig::Vit(VitConfig { patch: 4, dim: 128, depth: 4, heads: 4, mlp_ratio: 2.0, pool: VitPool::Mean });
    config.check().unwrap();
    let model = config.init::<B>(0, &dev());
    let params = burn::module::Module::num_params(&model);
    assert!((400_000..1_000_000).contains(&params), "{params} parameters");
    let pixels = random_pixels(2, 2);
    let logits = predict_logits(&model, T28, &Images::new(2, 28, 28, 1, &pixels).unwrap(), 2, true).unwrap();
    assert_eq!(logits.len(), 20);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn default_cnn_is_a_few_hundred_thousand_parameters() {
    let model = cnn_config(345, vec![32, 64, 128], 2).init::<B>(0, &dev());
    let params = burn::module::Module::num_params(&model);
    assert!((200_000..1_000_000).contains(&params), "{params} parameters");
}

// ---------------------------------------------------------------------------------
// Real data: QuickDraw drawings committed in data/quickdraw (345 classes x 100, 28x28).

const TEN: [usize; 10] = [4, 20, 40, 60, 80, 100, 150, 200, 250, 300];

fn view(s: &LabelledSet) -> Labelled<'_> {
    Labelled { images: &s.images, labels: &s.labels }
}

const T28: Target = Target { height: 28, width: 28, channels: 1 };

fn quick_train_config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr: 3e-3,
        min_lr: 1e-5,
        weight_decay: 0.05,
        layer_decay: 1.0,
        freeze_epochs: 0,
        warmup_epochs: 0.5,
        seed,
        label_smoothing: 0.0,
        margin_x: 0.45,
        margin_y: 0.05,
        augment: AugmentConfig { shift: 2, flip: 0.5, erase: 0.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 },
        max_steps: None,
    }
}

#[test]
fn cnn_learns_quickdraw_well_above_chance_and_round_trips() {
    let (train, test) = quickdraw(&TEN, 80, 100);
    let mut config = cnn_config(10, vec![16, 32, 64], 1);
    config.classes = train.images.classes.clone();
    config.class_counts = vec![80; 10];
    let started = std::time::Instant::now();
    let model = config.init::<AD>(0, &dev());
    let trained = train_loop::train::<AD>(&dev(), model, &config, &quick_train_config(4, 0), view(&train), None, &mut Quiet).unwrap();
    let acc = train_loop::accuracy(&trained, &config, view(&test), 64).unwrap();
    eprintln!("quickdraw 10 classes: test accuracy {acc:.3} after {:.1}s", started.elapsed().as_secs_f64());
    assert!(acc > 0.4, "test accuracy {acc} (chance 0.1)");

    // Save, load, and get the very same logits (BatchNorm running statistics included).
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save_model(&trained, &config, dir.path()).unwrap();
    let (loaded, loaded_config) = checkpoint::load_model::<B>(dir.path(), &dev()).unwrap();
    assert_eq!(loaded_config, config);
    let images = view(&test).images;
    assert_eq!(predict_logits(&trained, T28, images, 50, true).unwrap(), predict_logits(&loaded, T28, images, 50, true).unwrap());
}

#[test]
fn arcface_eql_vit_train_and_stay_finite() {
    // The other heads, losses and the ViT, briefly: they must train without NaNs and
    // beat chance; EQL statistics must be saved with the model.
    let (train, test) = quickdraw(&TEN[..5], 40, 50);
    let mut config = cnn_config(5, vec![16, 32], 1);
    config.classes = train.images.classes.clone();
    let vit = BackboneConfig::Vit(VitConfig { patch: 7, dim: 32, depth: 1, heads: 2, mlp_ratio: 2.0, pool: VitPool::Mean });
    // (head, loss, backbone, class counts, epochs). ArcFace margins read the (made-up,
    // long-tailed) counts; balanced softmax gets the true ones, or its prior would bias
    // a balanced test set. The ViT needs more epochs than the CNN on 200 images.
    for (head, loss, backbone, counts, epochs) in [
        (HeadConfig::ArcFace { k: 3, s: 30.0 }, LossConfig::Eql { tau: 1.0, eps: 1e-4, indicator: EqlIndicator::Pos }, config.backbone.clone(), vec![40, 30, 20, 10, 5], 3),
        (HeadConfig::Linear, LossConfig::BalancedSoftmax, vit, vec![40; 5], 8),
    ] {
        let mut c = config.clone();
        c.head = head;
        c.loss = loss.clone();
        c.backbone = backbone;
        c.class_counts = counts;
        let model = c.init::<AD>(1, &dev());
        let trained = train_loop::train::<AD>(&dev(), model, &c, &quick_train_config(epochs, 1), view(&train), None, &mut Quiet).unwrap();
        let acc = train_loop::accuracy(&trained, &c, view(&test), 64).unwrap();
        assert!(acc > 0.3, "{:?}/{:?}: accuracy {acc} (chance 0.2)", c.head, c.loss);
        if matches!(loss, LossConfig::Eql { .. }) {
            let pos = vec_of(trained.eql_pos.val());
            assert!(pos.iter().all(|v| *v > 0.0), "EQL pos statistics were updated: {pos:?}");
            let dir = tempfile::tempdir().unwrap();
            checkpoint::save_model(&trained, &c, dir.path()).unwrap();
            let (loaded, _) = checkpoint::load_model::<B>(dir.path(), &dev()).unwrap();
            assert_eq!(vec_of(loaded.eql_pos.val()), pos);
        }
    }
}

#[test]
fn same_seed_same_backend_gives_identical_weights() {
    let (train, _) = quickdraw(&TEN[..4], 50, 50);
    let mut config = cnn_config(4, vec![8, 16], 1);
    config.classes = train.images.classes.clone();
    config.class_counts = vec![50; 4];
    let run = |seed: u64| -> Vec<u8> {
        let model = config.init::<AD>(seed, &dev());
        let trained = train_loop::train::<AD>(&dev(), model, &config, &quick_train_config(2, seed), view(&train), None, &mut Quiet).unwrap();
        let dir = tempfile::tempdir().unwrap();
        checkpoint::save_model(&trained, &config, dir.path()).unwrap();
        std::fs::read(dir.path().join(checkpoint::WEIGHTS_FILE)).unwrap()
    };
    // Compare digests, not bytes: a failure should not print megabytes.
    let digest = |b: Vec<u8>| fnv1a(&b);
    let a = digest(run(7));
    assert_eq!(a, digest(run(7)), "flex: same seed, different weight files");
    assert_ne!(a, digest(run(8)));
}

/// A cheap order-sensitive digest (FNV-1a 64) for comparing files in assertions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

// ---------------------------------------------------------------------------------
// The kinds, end to end.

fn ctx<'a>(params: Params, inputs: &[(&str, &Path)], out: &Path, scratch: &Path) -> RunContext<'a> {
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs.iter().map(|(k, p)| (k.to_string(), vec![p.to_path_buf()])).collect();
    RunContext::new("test", params, "flex", inputs, BTreeMap::new(), out.to_path_buf(), scratch.to_path_buf(), &NoProgress)
}

fn with_defaults(kind: &dyn fgflow_engine::StageKind, mut p: Params) -> Params {
    for spec in kind.params() {
        if let (false, Some(d)) = (p.0.contains_key(spec.name), spec.default) {
            p.0.insert(spec.name.to_string(), d);
        }
    }
    p
}

#[test]
fn train_predict_evaluate_kinds() {
    let reg = fgflow_stages::registry();
    let (train, test) = quickdraw(&TEN[..5], 60, 80);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for (name, set) in [("train", &train), ("test", &test)] {
        std::fs::create_dir_all(t.join(name)).unwrap();
        artifact::write_labelled_set(&t.join(name), set).unwrap();
    }

    let kind = reg.get("train").unwrap();
    let params = with_defaults(
        kind.as_ref(),
        Params::default()
            .with("cnn_widths", vec![16i64, 32])
            .with("cnn_blocks", 1)
            .with("epochs", 3)
            .with("batch_size", 32)
            .with("lr", 3e-3)
            .with("keep_checkpoints", 2)
            .with("head", "logit_adjusted"),
    );
    assert!(kind.validate(&params).is_empty(), "{:?}", kind.validate(&params));
    let c = ctx(params, &[("train", &t.join("train")), ("val", &t.join("test"))], &t.join("out-train"), &t.join("s1"));
    kind.run(&c).unwrap();
    let log = c.take_log();
    assert!(log.contains("epoch   3"), "{log}");
    let model_dir = t.join("out-train/model");
    assert!(model_dir.join("model.safetensors").is_file() && model_dir.join("model.json").is_file());
    let index = checkpoint::read_index(&t.join("out-train/checkpoints")).unwrap();
    assert_eq!(index.iter().map(|(e, _)| e.epoch).collect::<Vec<_>>(), vec![2, 3]);
    assert!(index.iter().all(|(_, d)| d.join("model.safetensors").is_file()));
    assert!(!t.join("out-train/checkpoints/epoch-0001").exists());
    let log_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t.join("out-train/log/log.json")).unwrap()).unwrap();
    assert_eq!(log_json["epochs"].as_array().unwrap().len(), 3);
    assert!(log_json["epochs"][2]["val_acc"].as_f64().is_some());

    let kind = reg.get("predict").unwrap();
    let c = ctx(with_defaults(kind.as_ref(), Params::default()), &[("model", &model_dir), ("labelled", &t.join("test"))], &t.join("out-pred"), &t.join("s2"));
    kind.run(&c).unwrap();
    let pred = Predictions::read(&t.join("out-pred/predictions")).unwrap();
    assert_eq!((pred.n(), pred.num_classes()), (test.images.n(), 5));
    assert_eq!(pred.ids, test.images.ids);
    for i in 0..pred.n() {
        let s: f32 = pred.probs_row(i).iter().sum();
        assert!((s - 1.0).abs() < 1e-4);
    }

    // Neither or both image inputs: a clear error.
    let c = ctx(with_defaults(kind.as_ref(), Params::default()), &[("model", &model_dir)], &t.join("out-pred2"), &t.join("s3"));
    assert!(kind.run(&c).unwrap_err().to_string().contains("exactly one"));

    let kind = reg.get("evaluate").unwrap();
    let c = ctx(
        with_defaults(kind.as_ref(), Params::default()),
        &[("predictions", &t.join("out-pred/predictions")), ("labels", &t.join("test")), ("train", &t.join("train"))],
        &t.join("out-eval"),
        &t.join("s4"),
    );
    kind.run(&c).unwrap();
    let m = Metrics::read(&t.join("out-eval/metrics")).unwrap();
    assert!(m.top1 > 0.4, "top-1 {}", m.top1);
    assert!(m.top5 >= m.top1);
    assert_eq!(m.per_class.len(), 5);
    assert_eq!(m.groups.len(), 3);
    let shown = kind.describe_output("metrics", &t.join("out-eval/metrics")).unwrap();
    assert!(shown.contains("top-1") && shown.contains("head"), "{shown}");

    // Asking for a backend that is not compiled in fails clearly, before any work.
    let kind = reg.get("predict").unwrap();
    let inputs: BTreeMap<String, Vec<PathBuf>> =
        [("model".to_string(), vec![model_dir.clone()]), ("labelled".to_string(), vec![t.join("test")])].into_iter().collect();
    let c = RunContext::new("p", with_defaults(kind.as_ref(), Params::default()), "wgpu", inputs, BTreeMap::new(), t.join("o5"), t.join("s5"), &NoProgress);
    let err = kind.run(&c);
    if !cfg!(feature = "wgpu") {
        assert!(err.unwrap_err().to_string().contains("built without the `wgpu` feature"));
    }
}

/// With the `wgpu` feature (CI installs lavapipe, a software Vulkan driver, so this runs
/// on a CPU-only machine): the same seeded CNN and ViT give the same logits on wgpu as
/// on flex, and the CNN trains on wgpu well above chance, to about flex's level (the
/// kernels sum in other orders, so the runs drift apart: not bit-identical).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_flex_and_trains() {
    use burn::backend::Wgpu;
    type W = Autodiff<Wgpu>;
    let wdev = burn::backend::wgpu::WgpuDevice::default();
    let (train, test) = quickdraw(&TEN[..5], 40, 60);
    let mut config = cnn_config(5, vec![8, 16], 1);
    config.classes = train.images.classes.clone();
    config.class_counts = vec![40; 5];
    let mut vit = config.clone();
    vit.backbone = BackboneConfig::Vit(VitConfig { patch: 7, dim: 32, depth: 1, heads: 2, mlp_ratio: 2.0, pool: VitPool::Mean });
    let images = view(&test).images;
    assert_eq!(images.len(), 100);
    for c in [&config, &vit] {
        let on_flex = predict_logits(&c.init::<B>(3, &dev()), T28, images, 32, true).unwrap();
        let on_wgpu = predict_logits(&c.init::<Wgpu>(3, &wdev), T28, images, 32, true).unwrap();
        let worst = on_flex.iter().zip(&on_wgpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "{:?}: flex and wgpu logits differ by {worst}", c.backbone);
    }
    let model = config.init::<W>(0, &wdev);
    let trained = train_loop::train::<W>(&wdev, model, &config, &quick_train_config(6, 0), view(&train), None, &mut Quiet).unwrap();
    let acc = train_loop::accuracy(&trained, &config, view(&test), 64).unwrap();
    let on_flex = train_loop::train::<AD>(&dev(), config.init::<AD>(0, &dev()), &config, &quick_train_config(6, 0), view(&train), None, &mut Quiet).unwrap();
    let flex_acc = train_loop::accuracy(&on_flex, &config, view(&test), 64).unwrap();
    eprintln!("6 epochs, 5 classes: accuracy {acc:.3} on wgpu, {flex_acc:.3} on flex");
    assert!(acc > 0.35 && (acc - flex_acc).abs() <= 0.15, "wgpu-trained CNN: accuracy {acc}, on flex {flex_acc} (chance 0.2)");
}

#[test]
fn layer_wise_lr_decay_scales_vit_layers_and_is_off_at_one() {
    use fgflow_stages::ml::model::Backbone;
    use fgflow_stages::ml::optim::GroupedAdamW;
    let mut c = cnn_config(3, vec![8], 1);
    c.backbone = BackboneConfig::Vit(VitConfig { patch: 7, dim: 16, depth: 2, heads: 2, mlp_ratio: 2.0, pool: VitPool::Mean });
    let model = c.init::<AD>(0, &dev());
    let Backbone::Vit(vit) = &model.backbone else { unreachable!() };
    let scales = GroupedAdamW::<AD, _>::new(&model, 0.05, 0.5).lr_scales();
    // L = 2 blocks: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, after the blocks 1.
    assert_eq!(scales[&vit.patch_embed.weight.id], 0.125);
    assert_eq!(scales[&vit.pos_embed.id], 0.125);
    assert_eq!(scales[&vit.blocks[0].fc1.weight.id], 0.25);
    assert_eq!(scales[&vit.blocks[0].norm1.gamma.id], 0.25);
    assert_eq!(scales[&vit.blocks[1].attn.query.weight.id], 0.5);
    assert_eq!(scales[&vit.norm.gamma.id], 1.0);
    assert!(GroupedAdamW::<AD, _>::new(&model, 0.05, 1.0).lr_scales().values().all(|&s| s == 1.0));
    // The CNN decays per conv block (one block here: 0.5, its head 1).
    let cnn = cnn_config(3, vec![8], 1).init::<AD>(0, &dev());
    let Backbone::Cnn(net) = &cnn.backbone else { unreachable!() };
    let scales = GroupedAdamW::<AD, _>::new(&cnn, 0.05, 0.5).lr_scales();
    assert_eq!(scales[&net.stages[0].blocks[0].conv.weight.id], 0.5);
    // Conv weight, BatchNorm gamma, beta (and its running statistics, which take no step).
    assert_eq!(scales.values().filter(|&&s| s == 0.5).count(), 5);
    assert_eq!(scales.values().filter(|&&s| s == 1.0).count(), scales.len() - 5);
}
