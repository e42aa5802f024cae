//! EfficientNet-Lite0 with the committed ImageNet weights (`data/efficientnet_lite0`):
//! fgflow's forward pass against timm's `tf_efficientnet_lite0` logits written by
//! `regen.py`, the load report, a wrong-shape file failing with the tensor's name, and
//! the `train` kind fine-tuning from `pretrained`.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use fgflow_engine::{Params, Value};
use fgflow_stages::ml::data::batch_tensor;
use fgflow_stages::ml::efficientnet::{EfficientNetConfig, LiteVariant};
use fgflow_stages::ml::pretrained::load_pretrained;

use crate::support;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/efficientnet_lite0")
}

fn weights() -> PathBuf {
    data_dir().join("efficientnet_lite0.safetensors")
}

/// `reference_pixels(k, side)` of regen.py: [side, side, 3] u8, integer arithmetic only.
fn reference_pixels(k: i64, side: i64) -> Vec<u8> {
    let (cx, cy, r) = (side * (2 + k) / 5, side * (3 - k % 2) / 5, side / 4);
    let mut out = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let disc = (x - cx).pow(2) + (y - cy).pow(2) < r * r;
            for c in 0..3 {
                let mut v = (x * (40 + 30 * c + 20 * k) + y * (90 - 25 * c)) / side;
                v += if disc { 60 + 50 * c } else { 0 };
                v += ((x / (3 + c + k)) % 2) * 25;
                out.push((v % 256) as u8);
            }
        }
    }
    out
}

/// A tensor of the committed file as (shape, values).
fn file_tensor(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(weights()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[test]
fn forward_matches_timm_reference_logits() {
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(data_dir().join("reference_logits.json")).unwrap()).unwrap();
    let device = Default::default();
    let (wshape, w) = file_tensor("classifier.weight");
    let (_, b) = file_tensor("classifier.bias");
    assert_eq!(wshape, vec![1000, 1280]);
    // [1000, 1280] -> [1280, 1000] for features @ W^T.
    let w = Tensor::<Flex, 2>::from_data(TensorData::new(w, wshape), &device).transpose();
    let b = Tensor::<Flex, 1>::from_data(TensorData::new(b, [1000]), &device);
    let mut worst = 0f32;
    for case in reference["cases"].as_array().unwrap() {
        let (k, side) = (case["index"].as_i64().unwrap(), case["side"].as_i64().unwrap());
        let want: Vec<f32> = case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let config = EfficientNetConfig { variant: LiteVariant::Lite0, resolution: side as usize };
        let (net, report) = load_pretrained(config.init::<Flex>(&device), &weights()).unwrap();
        assert_eq!(report.loaded.len(), 245, "{}", report.summary());
        assert!(report.new.is_empty(), "{}", report.summary());
        assert_eq!(report.unused, vec!["classifier.bias".to_string(), "classifier.weight".to_string()]);
        let pixels = reference_pixels(k, side);
        let x = batch_tensor::<Flex>(&[&pixels], side as usize, side as usize, 3, &device);
        let logits = net.forward(x).matmul(w.clone()) + b.clone().reshape([1, 1000]);
        let got = logits.into_data().to_vec::<f32>().unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let argmax = |v: &[f32]| v.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0;
        assert_eq!(argmax(&got), argmax(&want), "case {k}: top class");
        eprintln!("case {k} ({side}x{side}): max |logit difference| {diff:.3e}");
        worst = worst.max(diff);
    }
    assert!(worst < 1e-4, "max logit difference {worst}");
}

fn pretrained_params(resolution: i64, file: &Path) -> Params {
    Params::default()
        .with("backbone", Value::Str("efficientnet_lite".into()))
        .with("effnet_resolution", Value::Int(resolution))
        .with("pretrained", Value::List(vec![Value::Str(file.display().to_string())]))
        .with("epochs", Value::Int(1))
        .with("batch_size", Value::Int(8))
        .with("keep_checkpoints", Value::Int(0))
}

#[test]
fn wrong_shape_checkpoint_fails_with_the_tensors_name_and_both_shapes() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("wrong.safetensors");
    let stem: Vec<u8> = vec![0f32; 16 * 27].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 3, 3, 3], &stem).unwrap();
    std::fs::write(&file, safetensors::serialize([("stem.weight", view)], None).unwrap()).unwrap();
    let train = support::train_set(t.path());
    let out = t.path().join("out");
    let err = support::run_kind("train", pretrained_params(32, &file), &[("train", vec![train])], &[("pretrained", &file)], &out).unwrap_err().to_string();
    assert!(err.contains("stem.weight") && err.contains("[16, 3, 3, 3]") && err.contains("[32, 3, 3, 3]"), "{err}");
    assert!(!out.join("model").join("model.safetensors").exists(), "a failed load must not write a model");

    // A file with nothing the backbone uses is the wrong file, not a partial start.
    let other = t.path().join("other.safetensors");
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 3, 3, 3], &stem).unwrap();
    std::fs::write(&other, safetensors::serialize([("conv1.weight", view)], None).unwrap()).unwrap();
    let err = support::run_kind("train", pretrained_params(32, &other), &[("train", vec![t.path().join("train")])], &[("pretrained", &other)], &t.path().join("out2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("none of its tensors") && err.contains("conv1.weight"), "{err}");
}

#[test]
fn train_fine_tunes_from_the_committed_weights() {
    let t = tempfile::tempdir().unwrap();
    let train = support::train_set(t.path());
    let out = t.path().join("out");
    let log = support::run_kind("train", pretrained_params(32, &weights()), &[("train", vec![train])], &[("pretrained", &weights())], &out).unwrap();
    assert!(log.contains("245 tensors loaded; new (initialised here): none; unused from the file: classifier.bias, classifier.weight"), "{log}");
    let text = support::describe("train", "model", &out.join("model"));
    assert!(text.contains("EfficientNet-Lite0 at 32x32"), "{text}");
    // The saved model reloads as what it is.
    let (model, config) = fgflow_stages::ml::checkpoint::load_model::<Flex>(&out.join("model"), &Default::default()).unwrap();
    assert_eq!(config.num_classes(), 3);
    let x = batch_tensor::<Flex>(&[&[0u8; 784][..], &[255u8; 784][..]], 28, 28, 1, &Default::default());
    let logits = model.forward(x).into_data().to_vec::<f32>().unwrap();
    assert!(logits.iter().all(|v| v.is_finite()) && logits.len() == 6);
}

/// Not a check: training speed of Lite0 by resolution on this machine (`--ignored
/// --nocapture`), to choose `effnet_resolution`.
#[test]
#[ignore]
fn measure_training_speed_by_resolution() {
    let t = tempfile::tempdir().unwrap();
    let (train, _) = support::quickdraw(&(0..8).collect::<Vec<_>>(), 24, 24);
    let dir = t.path().join("train");
    std::fs::create_dir_all(&dir).unwrap();
    fgflow_stages::artifact::write_labelled_set(&dir, &train).unwrap();
    for res in [32, 48, 64, 96] {
        let params = pretrained_params(res, &weights()).with("batch_size", Value::Int(32));
        let log = support::run_kind("train", params, &[("train", vec![dir.clone()])], &[("pretrained", &weights())], &t.path().join(format!("out{res}"))).unwrap();
        eprintln!("resolution {res}: {}", log.lines().find(|l| l.starts_with("epoch")).unwrap_or("?"));
    }
}

/// Not a check: where a Lite0 training step spends its time on flex (`--ignored
/// --nocapture`): depthwise against pointwise convolutions, forward and backward.
#[test]
#[ignore]
fn measure_convolution_costs() {
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    type AD = Autodiff<Flex>;
    let d = Default::default();
    let time = |label: &str, c: usize, o: usize, k: usize, groups: usize, side: usize| {
        let x = Tensor::<AD, 4>::random([32, c, side, side], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let w = Tensor::<AD, 4>::random([o, c / groups, k, k], Distribution::Normal(0.0, 1.0), &d).require_grad();
        let opts = ConvOptions::new([1, 1], [k / 2, k / 2], [1, 1], groups);
        let start = std::time::Instant::now();
        let y = conv2d(x.clone(), w.clone(), None, opts.clone());
        let _ = y.clone().sum().into_scalar();
        let fwd = start.elapsed();
        let start = std::time::Instant::now();
        let g = y.sum().backward();
        let _ = w.grad(&g).unwrap().sum().into_scalar();
        eprintln!("{label}: forward {:?}, backward {:?}", fwd, start.elapsed());
        // The input gradient alone (a frozen weight).
        let wc = Tensor::<AD, 4>::from_data(w.clone().inner().into_data(), &d);
        let y = conv2d(x.clone(), wc, None, opts.clone());
        let start = std::time::Instant::now();
        let g = y.sum().backward();
        let _ = x.grad(&g).unwrap().sum().into_scalar();
        eprintln!("{label}: input gradient only {:?}", start.elapsed());
        if groups > 1 {
            // ml::conv's depthwise op, TF "SAME" padding of a stride-1 layer.
            let wd = Tensor::<AD, 4>::from_data(w.clone().inner().into_data(), &d).require_grad();
            let p = k / 2;
            let start = std::time::Instant::now();
            let y = fgflow_stages::ml::conv::depthwise(x.clone(), wd.clone(), 1, [p, p, p, p]);
            let _ = y.clone().sum().into_scalar();
            let fwd = start.elapsed();
            let start = std::time::Instant::now();
            let g = y.sum().backward();
            let _ = wd.grad(&g).unwrap().sum().into_scalar();
            let _ = x.grad(&g).unwrap().sum().into_scalar();
            eprintln!("{label} (ml::conv::depthwise): forward {:?}, backward (both gradients) {:?}", fwd, start.elapsed());
        }
        if k == 1 {
            let start = std::time::Instant::now();
            let y = fgflow_stages::ml::efficientnet::pointwise(x.clone(), w.clone());
            let _ = y.clone().sum().into_scalar();
            let fwd = start.elapsed();
            let start = std::time::Instant::now();
            let g = y.sum().backward();
            let _ = w.grad(&g).unwrap().sum().into_scalar();
            eprintln!("{label} (ml::efficientnet): forward {:?}, backward {:?}", fwd, start.elapsed());
        }
    };
    for _ in 0..2 {
        time("depthwise 3x3, 96 ch, 32x32", 96, 96, 3, 96, 32);
        time("pointwise 16->96, 32x32", 16, 96, 1, 1, 32);
        time("pointwise 96->24, 32x32", 96, 24, 1, 1, 32);
    }
}
