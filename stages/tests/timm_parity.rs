//! Parity with timm: tiny random timm models (`fixtures/timm`, written by its
//! `regen.py`) loaded through the `pretrained` mechanism must give timm's eval-mode
//! logits within 1e-4 on flex: Swin-V2 (shifted windows and masks exercised; the
//! position bias recomputed for a larger window) and the ViT (class token and mean
//! pooling with `fc_norm`; position embeddings resampled to other image sizes), and
//! MMPretrain's Swin-V2 from its `.pth`; with the `wgpu` feature, on wgpu too.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use fgflow_engine::{Params, Value};
use fgflow_stages::ml::model::Backbone;
use fgflow_stages::ml::pretrained::{load_pretrained_named, LoadReport};
use fgflow_stages::ml::swinv2::{timm_name, SwinV2Config};
use fgflow_stages::ml::vit::{Vit, VitConfig, VitPool};

const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/timm")
}

/// A tensor of a safetensors file as (shape, values).
fn file_tensor(file: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", file.display()));
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn reference(name: &str) -> (Tensor<Flex, 4>, Vec<f32>) {
    let file = fixtures().join("reference.safetensors");
    let (shape, x) = file_tensor(&file, &format!("{name}.input"));
    let (_, logits) = file_tensor(&file, &format!("{name}.logits"));
    (Tensor::from_data(TensorData::new(x, shape), &Default::default()), logits)
}

/// timm's classifier of a fixture: features [N, d] -> logits, as a flat vector.
fn head(file: &Path, prefix: &str, features: Tensor<Flex, 2>) -> Vec<f32> {
    let device = Default::default();
    let (wshape, w) = file_tensor(file, &format!("{prefix}.weight"));
    let (bshape, b) = file_tensor(file, &format!("{prefix}.bias"));
    let w = Tensor::<Flex, 2>::from_data(TensorData::new(w, wshape), &device).transpose();
    let b = Tensor::<Flex, 2>::from_data(TensorData::new(b, [1, bshape[0]]), &device);
    (features.matmul(w) + b).into_data().to_vec::<f32>().unwrap()
}

fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

/// Logits against the reference's within [`TOLERANCE`]; `what` names the case (and how
/// many tensors it loaded) in the printed difference and the failure.
fn assert_logits(what: &str, got: &[f32], want: &[f32]) {
    let diff = max_diff(got, want);
    eprintln!("{what}: max |logit difference| {diff:.3e}");
    assert!(diff < TOLERANCE, "{what}: max logit difference {diff}\ngot  {got:?}\nwant {want:?}");
}

fn fixture_swin(resolution: usize, window: usize, pretrained_window: usize) -> SwinV2Config {
    SwinV2Config {
        resolution,
        patch: 2,
        embed_dim: 16,
        depths: vec![2, 2],
        heads: vec![2, 4],
        window: vec![window; 2],
        pretrained_window: vec![pretrained_window; 2],
        mlp_ratio: 4.0,
    }
}

#[test]
fn swinv2_matches_timm_logits() {
    let file = fixtures().join("swinv2.safetensors");
    for (case, config) in [("swinv2", fixture_swin(32, 4, 0)), ("swinv2_64w8", fixture_swin(64, 8, 4))] {
        config.check(3).unwrap();
        let (net, report) = load_pretrained_named(config.init::<Flex>(&Default::default()), &file, &timm_name).unwrap();
        assert!(report.new.is_empty(), "{}", report.summary());
        assert_eq!(report.unused, vec!["head.fc.bias".to_string(), "head.fc.weight".to_string()], "{}", report.summary());
        let (x, want) = reference(case);
        let got = head(&file, "head.fc", net.forward(x));
        assert_logits(&format!("{case}: {} tensors", report.loaded.len()), &got, &want);
    }
}

/// MMPretrain's own Swin-V2 (`swinv2_mm`: its names, its `nn.Unfold` order of patch
/// merging's columns) from a `torch.save` checkpoint as mmengine writes it, loaded the
/// way `train` loads `pretrained`.
#[test]
fn swinv2_matches_mmpretrain_logits_from_a_pth_checkpoint() {
    let path = fixtures().join("swinv2_mm.pth");
    let (net, report) = match Backbone::Swinv2(fixture_swin(32, 4, 0).init::<Flex>(&Default::default())).load_pretrained(&path).unwrap() {
        (Backbone::Swinv2(net), report) => (net, report),
        _ => unreachable!(),
    };
    assert!(report.new.is_empty(), "{}", report.summary());
    assert_eq!(report.unused, vec!["head.fc.bias".to_string(), "head.fc.weight".to_string()], "{}", report.summary());
    let (x, want) = reference("swinv2_mm");
    let got = head(&fixtures().join("reference.safetensors"), "swinv2_mm.head", net.forward(x));
    assert_logits(&format!("swinv2_mm.pth: {} tensors", report.loaded.len()), &got, &want);
}

/// The same fixtures on wgpu (CI runs this on lavapipe, a software Vulkan driver): timm's
/// Swin-V2 and ViT and MMPretrain's Swin-V2, loaded as `train` loads them, give the
/// reference logits within the same 1e-4.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_matches_timm_and_mmpretrain_logits() {
    use burn::backend::wgpu::{Wgpu, WgpuDevice};
    let wdev = WgpuDevice::default();
    let swin = || Backbone::Swinv2(fixture_swin(32, 4, 0).init::<Wgpu>(&wdev));
    let vit = || Backbone::Vit(fixture_vit(32, VitPool::Cls).init::<Wgpu>(3, 32, 32, &wdev));
    let cases: [(&str, &str, &str, Backbone<Wgpu>); 3] = [
        ("swinv2", "swinv2.safetensors", "swinv2.safetensors:head.fc", swin()),
        ("swinv2_mm", "swinv2_mm.pth", "reference.safetensors:swinv2_mm.head", swin()),
        ("vit_token", "vit_token.safetensors", "vit_token.safetensors:head", vit()),
    ];
    for (case, file, head_at, backbone) in cases {
        let (backbone, _) = backbone.load_pretrained(&fixtures().join(file)).unwrap();
        let (x, want) = reference(case);
        let x = Tensor::<Wgpu, 4>::from_data(x.into_data(), &wdev);
        let features = match &backbone {
            Backbone::Swinv2(m) => m.forward(x),
            Backbone::Vit(m) => m.forward(x),
            _ => unreachable!(),
        };
        let features = Tensor::<Flex, 2>::from_data(features.into_data(), &Default::default());
        let (head_file, prefix) = head_at.split_once(':').unwrap();
        assert_logits(&format!("{case} on wgpu"), &head(&fixtures().join(head_file), prefix, features), &want);
    }
}

fn fixture_vit(dim: usize, pool: VitPool) -> VitConfig {
    VitConfig { patch: 8, dim, depth: 2, heads: 2, mlp_ratio: 4.0, pool }
}

/// A timm ViT file loaded the way `train` loads `pretrained` (layout converted,
/// `pos_embed` resampled to the model's grid).
fn load_vit(config: &VitConfig, side: usize, file: &Path) -> (Vit<Flex>, LoadReport) {
    config.check(side, side).unwrap();
    match Backbone::Vit(config.init::<Flex>(3, side, side, &Default::default())).load_pretrained(file).unwrap() {
        (Backbone::Vit(vit), report) => (vit, report),
        _ => unreachable!(),
    }
}

#[test]
fn vit_matches_timm_logits_with_class_token_and_mean_pooling() {
    for (case, config) in [("vit_token", fixture_vit(32, VitPool::Cls)), ("vit_avg", fixture_vit(64, VitPool::Avg))] {
        let file = fixtures().join(format!("{case}.safetensors"));
        let (vit, report) = load_vit(&config, 32, &file);
        // timm's `avg` model has no final `norm` (an identity there): ours stays unused.
        let new: &[&str] = if case == "vit_avg" { &["norm.gamma", "norm.beta"] } else { &[] };
        assert_eq!(report.new, new, "{}", report.summary());
        assert_eq!(report.unused, vec!["head.bias".to_string(), "head.weight".to_string()], "{}", report.summary());
        let (x, want) = reference(case);
        let got = head(&file, "head", vit.forward(x));
        assert_logits(&format!("{case}: {} tensors", report.loaded.len()), &got, &want);
    }
}

#[test]
fn vit_position_embeddings_resample_as_timm_does() {
    let file = fixtures().join("vit_token.safetensors");
    for side in [48, 24] {
        let case = format!("vit_token_{side}");
        let (vit, _) = load_vit(&fixture_vit(32, VitPool::Cls), side, &file);
        let (shape, timm_pos) = file_tensor(&fixtures().join(format!("{case}.safetensors")), "pos_embed");
        assert_eq!(vit.pos_embed.dims().to_vec(), shape);
        let ours = vit.pos_embed.val().into_data().to_vec::<f32>().unwrap();
        let pos_diff = max_diff(&ours, &timm_pos);
        let (x, want) = reference(&case);
        let diff = max_diff(&head(&file, "head", vit.forward(x)), &want);
        eprintln!("{case}: max |pos_embed difference| {pos_diff:.3e}, max |logit difference| {diff:.3e}");
        assert!(pos_diff < 1e-5 && diff < TOLERANCE, "{case}: pos_embed {pos_diff}, logits {diff}");
    }
}

use crate::support;

fn swin_train_params(file: &Path) -> Params {
    Params::default()
        .with("backbone", Value::Str("swinv2".into()))
        .with("swin_patch", Value::Int(2))
        .with("swin_embed_dim", Value::Int(16))
        .with("swin_heads", Value::List(vec![Value::Int(2), Value::Int(4)]))
        .with("swin_window", Value::List(vec![Value::Int(4)]))
        .with("swin_mlp_ratio", Value::Float(4.0))
        .with("pretrained", Value::List(vec![Value::Str(file.display().to_string())]))
        .with("epochs", Value::Int(1))
        .with("batch_size", Value::Int(8))
        .with("keep_checkpoints", Value::Int(0))
}

#[test]
fn train_fine_tunes_swinv2_from_a_timm_checkpoint_with_another_class_count() {
    let t = tempfile::tempdir().unwrap();
    let file = fixtures().join("swinv2.safetensors");
    let out = t.path().join("out");
    let log = support::run_kind("train", swin_train_params(&file), &[("train", vec![support::train_set(t.path())])], &[("pretrained", &file)], &out).unwrap();
    // 5 timm classes, 3 here: the head is new, timm's is reported unused.
    assert!(log.contains("77 tensors loaded; new (initialised here): none; unused from the file: head.fc.bias, head.fc.weight"), "{log}");
    let text = support::describe("train", "model", &out.join("model"));
    assert!(text.contains("Swin-V2 embed 16 depths [2, 2] heads [2, 4] window [4, 4] patch 2 at 32x32"), "{text}");
    let (model, config) = fgflow_stages::ml::checkpoint::load_model::<Flex>(&out.join("model"), &Default::default()).unwrap();
    assert_eq!(config.num_classes(), 3);
    let x = fgflow_stages::ml::data::batch_tensor::<Flex>(&[&[0u8; 784][..], &[255u8; 784][..]], 28, 28, 1, &Default::default());
    let logits = model.forward(x).into_data().to_vec::<f32>().unwrap();
    assert!(logits.iter().all(|v| v.is_finite()) && logits.len() == 6);
}

/// The fixture with `edit` applied to its tensor list, written to `dir/name`.
fn edited_fixture(dir: &Path, name: &str, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let bytes = std::fs::read(fixtures().join("swinv2.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap()))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

#[test]
fn bad_swinv2_checkpoints_fail_with_the_tensors_name_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let train = support::train_set(t.path());
    let run = |file: &Path, params: Params, out: &str| {
        let out = t.path().join(out);
        let err = support::run_kind("train", params, &[("train", vec![train.clone()])], &[("pretrained", file)], &out).unwrap_err();
        assert!(!out.join("model").join("model.safetensors").exists(), "a failed load must not write a model");
        err.to_string()
    };
    // Wrong sizes: the first stage 32 wide where the file's is 16.
    let file = fixtures().join("swinv2.safetensors");
    let err = run(&file, swin_train_params(&file).with("swin_embed_dim", Value::Int(32)), "wide");
    assert!(err.contains("patch_embed.proj.weight") && err.contains("[16, 3, 2, 2]") && err.contains("[32, 3, 2, 2]"), "{err}");

    // A tensor missing from the file.
    let missing = edited_fixture(t.path(), "missing.safetensors", |v| v.retain(|(n, _, _)| n != "layers.1.downsample.norm.weight"));
    let err = run(&missing, swin_train_params(&missing), "missing");
    assert!(err.contains("missing from the file") && err.contains("`layers.1.downsample.norm.weight`"), "{err}");

    // Not a weights file; one that looks like a zip (torch.save) but is not; one cut short.
    let junk = t.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is text, not weights").unwrap();
    let err = run(&junk, swin_train_params(&junk), "junk");
    assert!(err.contains("junk.safetensors") && err.contains("not a safetensors file"), "{err}");
    let zip = t.path().join("zip.pth");
    std::fs::write(&zip, b"PK\x03\x04 this is a zip, not a checkpoint").unwrap();
    let err = run(&zip, swin_train_params(&zip), "zip");
    assert!(err.contains("zip.pth") && err.contains("not a readable PyTorch checkpoint"), "{err}");
    // The legacy torch.save format is refused whole (its reader would pad a cut-short
    // tensor with zeros).
    let legacy = fixtures().join("swinv2_mm_legacy.pth");
    let err = run(&legacy, swin_train_params(&legacy), "legacy");
    assert!(err.contains("swinv2_mm_legacy.pth") && err.contains("legacy format") && err.contains("torch.save(torch.load(f), f)"), "{err}");
    // A damaged byte inside a zip checkpoint's tensor data fails its CRC-32.
    let mut bytes = std::fs::read(fixtures().join("swinv2_mm.pth")).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    let flipped = t.path().join("flipped.pth");
    std::fs::write(&flipped, bytes).unwrap();
    let err = run(&flipped, swin_train_params(&flipped), "flipped");
    assert!(err.contains("flipped.pth") && err.contains("not a readable PyTorch checkpoint"), "{err}");
    for source in ["swinv2.safetensors", "swinv2_mm.pth"] {
        let bytes = std::fs::read(fixtures().join(source)).unwrap();
        let cut = t.path().join(format!("cut-{source}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = run(&cut, swin_train_params(&cut), &format!("out-cut-{source}"));
        assert!(err.contains(&format!("cut-{source}")) && (err.contains("not a safetensors file") || err.contains("not a readable PyTorch checkpoint")), "{source}: {err}");
    }
}

#[test]
fn swinv2_presets_are_valid_and_sized_as_timm() {
    for name in ["tiny", "base", "large"] {
        SwinV2Config::preset(name).unwrap().check(3).unwrap();
    }
    // timm's swinv2_base_window12to24_192to384 has 1024 features, large 1536.
    assert_eq!(SwinV2Config::preset("base").unwrap().feature_dim(), 1024);
    assert_eq!(SwinV2Config::preset("large").unwrap().feature_dim(), 1536);
}

#[test]
fn train_fine_tunes_a_vit_from_a_timm_checkpoint_on_gray_images_at_another_grid() {
    let t = tempfile::tempdir().unwrap();
    let file = fixtures().join("vit_token.safetensors");
    // 28x28 gray drawings, patch 8: a 3x3 grid where the checkpoint has 4x4, and one
    // input channel where it has three.
    let params = Params::default()
        .with("backbone", Value::Str("vit".into()))
        .with("vit_patch", Value::Int(8))
        .with("vit_dim", Value::Int(32))
        .with("vit_depth", Value::Int(2))
        .with("vit_heads", Value::Int(2))
        .with("vit_mlp_ratio", Value::Float(4.0))
        .with("vit_pool", Value::Str("cls".into()))
        .with("pretrained", Value::List(vec![Value::Str(file.display().to_string())]))
        .with("epochs", Value::Int(1))
        .with("batch_size", Value::Int(8))
        .with("keep_checkpoints", Value::Int(0));
    let out = t.path().join("out");
    let log = support::run_kind("train", params, &[("train", vec![support::train_set(t.path())])], &[("pretrained", &file)], &out).unwrap();
    assert!(log.contains("38 tensors loaded; new (initialised here): none; unused from the file: head.bias, head.weight"), "{log}");
}
