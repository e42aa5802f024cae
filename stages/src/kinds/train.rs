//! The `train` kind: trains a CNN or ViT classifier on a labelled set with the recipe's
//! heads (linear, logit-adjusted, sub-centre ArcFace with adaptive margins), losses
//! (CE with label smoothing, softmax EQL, balanced softmax), AdamW without decay on
//! norms/biases/position embeddings, warm-up + cosine, and CPU-side augmentation.
//! Outputs the final model, the last N epoch checkpoints (for soups) and a log.
//! `backbone: "efficientnet_lite"` with `pretrained` fine-tunes ImageNet weights (the
//! committed `data/efficientnet_lite0`); `pretrained` loads any backbone's weights by
//! tensor name and is hashed by content like every `Path` parameter.
//! The `oracle` input (exclusive with `train`) takes the benchmark's oracle set, the
//! true labels, for the ceiling row; the model, checkpoints and log of such a run carry
//! the oracle mark (`artifact::ORACLE_FILE`), which the recipe's kinds refuse.
//! The model code lives in `crate::ml`; this module maps parameters and artifacts to it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::ml::kernels::TrainBackend;
use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, Resources, RunContext, StageError, StageKind, Value};

use crate::artifact::{self, LabelledSet};
use crate::ml::augment::AugmentConfig;
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::checkpoint::{self, CheckpointEntry};
use crate::ml::cnn::CnnConfig;
use crate::ml::efficientnet::{EfficientNetConfig, LiteVariant};
use crate::ml::head::HeadConfig;
use crate::ml::loss::{EqlIndicator, LossConfig};
use crate::ml::model::{AdjustMode, BackboneConfig, Classifier, LogitAdjust, MODEL_FORMAT, ModelConfig};
use crate::ml::predictions::write_json;
use crate::ml::train_loop::{self, EpochLog, Labelled, TrainConfig, TrainObserver};
use crate::ml::swinv2::SwinV2Config;
use crate::ml::vit::{VitConfig, VitPool};
use crate::types;

pub struct Train;

/// Everything the parameters say, parsed once (used by `validate` and `run`).
struct Settings {
    image_size: usize,
    backbone: BackboneConfig,
    head: HeadConfig,
    logit_adjust: Option<LogitAdjust>,
    loss: LossConfig,
    train: TrainConfig,
    keep_checkpoints: usize,
}

/// The `pretrained` parameter: a list of at most one path (an empty list, the default,
/// is "none"; the engine has no optional single `Path`).
fn check_pretrained(p: &Params) -> Result<(), StageError> {
    let n = p.list("pretrained")?.len();
    if n > 1 { Err(param_err("pretrained", format!("at most one file, found {n}"))) } else { Ok(()) }
}

/// The `image_size` parameter (0 = the images' own size), range-checked.
pub(crate) fn image_size(p: &Params) -> Result<usize, StageError> {
    let v = p.usize("image_size")?;
    if v > 4096 { Err(param_err("image_size", format!("must be at most 4096, found {v}"))) } else { Ok(v) }
}

pub(crate) fn param_err(name: &str, msg: impl Into<String>) -> StageError {
    StageError::Param { name: name.into(), msg: msg.into() }
}

/// A parameter that must be a probability in [0, 1].
pub(crate) fn probability(p: &Params, name: &str) -> Result<f64, StageError> {
    let v = p.float(name)?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(param_err(name, format!("must be a probability in [0, 1], found {v}"))) }
}

/// The checks every optimisation schedule shares (`train`, `pretrain`).
pub(crate) fn check_schedule(epochs: usize, lr: f64, min_lr: f64, warmup_epochs: f64, weight_decay: f64) -> Result<(), StageError> {
    if epochs == 0 {
        return Err(param_err("epochs", "must be at least 1"));
    }
    if !positive(lr) || !non_negative(min_lr) {
        return Err(param_err("lr", "lr must be positive and min_lr non-negative"));
    }
    if !non_negative(warmup_epochs) || !non_negative(weight_decay) {
        return Err(param_err("warmup_epochs", "warmup_epochs and weight_decay must be non-negative"));
    }
    Ok(())
}

// Written as positive checks so NaN fails them.
fn positive(x: f64) -> bool {
    x > 0.0
}

fn non_negative(x: f64) -> bool {
    x >= 0.0
}

/// The ViT's sizes from the `vit_*` parameters (shared with `pretrain`).
pub(crate) fn vit_config(p: &Params) -> Result<VitConfig, StageError> {
    let v = VitConfig {
        patch: p.usize("vit_patch")?,
        dim: p.usize("vit_dim")?,
        depth: p.usize("vit_depth")?,
        heads: p.usize("vit_heads")?,
        mlp_ratio: p.float("vit_mlp_ratio")?,
        pool: match p.str("vit_pool")? {
            "cls" => VitPool::Cls,
            "avg" => VitPool::Avg,
            _ => VitPool::Mean,
        },
    };
    for (name, value) in [("vit_patch", v.patch), ("vit_dim", v.dim), ("vit_depth", v.depth), ("vit_heads", v.heads)] {
        if value == 0 {
            return Err(param_err(name, "must be at least 1"));
        }
    }
    if !v.dim.is_multiple_of(v.heads) {
        return Err(param_err("vit_heads", format!("vit_dim {} is not divisible by vit_heads {}", v.dim, v.heads)));
    }
    if !positive(v.mlp_ratio) {
        return Err(param_err("vit_mlp_ratio", "must be positive"));
    }
    Ok(v)
}

/// Swin-V2's sizes: the `swin_preset`, each `swin_*` size that is set (0 or [])
/// replacing the preset's.
fn swin_config(p: &Params) -> Result<SwinV2Config, StageError> {
    let preset = p.str("swin_preset")?;
    let mut c = SwinV2Config::preset(preset).ok_or_else(|| param_err("swin_preset", format!("unknown preset `{preset}`")))?;
    let sizes = |name: &str| -> Result<Vec<usize>, StageError> {
        let v = p.ints(name)?;
        if v.iter().any(|&x| x <= 0) {
            return Err(param_err(name, "sizes must be positive"));
        }
        Ok(v.into_iter().map(|x| x as usize).collect())
    };
    for (name, field) in [("swin_resolution", &mut c.resolution), ("swin_patch", &mut c.patch), ("swin_embed_dim", &mut c.embed_dim)] {
        let v = p.usize(name)?;
        if v > 0 {
            *field = v;
        }
    }
    for (name, field) in [("swin_depths", &mut c.depths), ("swin_heads", &mut c.heads)] {
        let v = sizes(name)?;
        if !v.is_empty() {
            *field = v;
        }
    }
    let stages = c.depths.len();
    // One window for every stage, or one per stage.
    for (name, field) in [("swin_window", &mut c.window), ("swin_pretrained_window", &mut c.pretrained_window)] {
        let v = p.ints(name)?;
        if v.iter().any(|&x| x < 0) {
            return Err(param_err(name, "window sizes cannot be negative"));
        }
        match v.len() {
            0 => {}
            1 => *field = vec![v[0] as usize; stages],
            _ => *field = v.into_iter().map(|x| x as usize).collect(),
        }
    }
    if c.pretrained_window.len() != stages && p.ints("swin_pretrained_window")?.is_empty() {
        c.pretrained_window = vec![0; stages];
    }
    if c.window.len() != stages && p.ints("swin_window")?.is_empty() {
        c.window = vec![c.window.first().copied().unwrap_or(7); stages];
    }
    let ratio = p.float("swin_mlp_ratio")?;
    if ratio != 0.0 {
        c.mlp_ratio = ratio;
    }
    c.check(3).map_err(|e| param_err("swin_preset", e))?;
    Ok(c)
}

/// The `vit_*` parameter specs (shared with `pretrain`).
pub(crate) fn vit_params() -> Vec<ParamSpec> {
    use ParamType::*;
    vec![
        ParamSpec::optional("vit_patch", Int, 4, "ViT: patch size in pixels"),
        ParamSpec::optional("vit_dim", Int, 128, "ViT: token dimension"),
        ParamSpec::optional("vit_depth", Int, 4, "ViT: transformer blocks"),
        ParamSpec::optional("vit_heads", Int, 4, "ViT: attention heads (must divide vit_dim)"),
        ParamSpec::optional("vit_mlp_ratio", Float, 2.0, "ViT: MLP hidden size / vit_dim"),
        ParamSpec::optional("vit_pool", Enum(&["mean", "cls", "avg"]), "mean", "ViT: feature = mean of the patch tokens after the final norm, the class token, or timm's `avg` (mean straight from the blocks, then `fc_norm`)"),
    ]
}

fn settings(p: &Params) -> Result<Settings, StageError> {
    let backbone = match p.str("backbone")? {
        "cnn" => {
            let widths = p.ints("cnn_widths")?;
            if widths.is_empty() || widths.iter().any(|&w| w <= 0) {
                return Err(param_err("cnn_widths", "must be a non-empty list of positive integers"));
            }
            let blocks = p.usize("cnn_blocks")?;
            if blocks == 0 {
                return Err(param_err("cnn_blocks", "must be at least 1"));
            }
            BackboneConfig::Cnn(CnnConfig { widths: widths.iter().map(|&w| w as usize).collect(), blocks })
        }
        "vit" => BackboneConfig::Vit(vit_config(p)?),
        "swinv2" => BackboneConfig::Swinv2(swin_config(p)?),
        "efficientnet_lite" => {
            let variant = p.str("effnet_variant")?;
            let variant = LiteVariant::parse(variant).ok_or_else(|| param_err("effnet_variant", format!("unknown variant `{variant}`")))?;
            let resolution = p.usize("effnet_resolution")?;
            if resolution < 32 {
                return Err(param_err("effnet_resolution", format!("must be at least 32 (five stride-2 layers), found {resolution}")));
            }
            BackboneConfig::EfficientnetLite(EfficientNetConfig { variant, resolution })
        }
        other => return Err(param_err("backbone", format!("unknown backbone `{other}`"))),
    };
    let tau = p.float("logit_adjust_tau")?;
    let (head, logit_adjust) = match p.str("head")? {
        "linear" => (HeadConfig::Linear, None),
        "logit_adjusted" => {
            let mode = match p.str("logit_adjust_mode")? {
                "post_hoc" => AdjustMode::PostHoc,
                "loss" => AdjustMode::Loss,
                other => return Err(param_err("logit_adjust_mode", format!("unknown mode `{other}`"))),
            };
            (HeadConfig::Linear, Some(LogitAdjust { tau, mode }))
        }
        "arcface" => {
            let k = p.usize("arcface_k")?;
            if k == 0 {
                return Err(param_err("arcface_k", "must be at least 1"));
            }
            (HeadConfig::ArcFace { k, s: p.float("arcface_s")? }, None)
        }
        other => return Err(param_err("head", format!("unknown head `{other}`"))),
    };
    let loss = match p.str("loss")? {
        "ce" => LossConfig::Ce,
        "balanced_softmax" => LossConfig::BalancedSoftmax,
        "eql" => {
            let indicator = match p.str("eql_indicator")? {
                "pos" => EqlIndicator::Pos,
                "neg" => EqlIndicator::Neg,
                "ratio" => EqlIndicator::Ratio,
                other => return Err(param_err("eql_indicator", format!("unknown indicator `{other}`"))),
            };
            let eps = p.float("eql_eps")?;
            if !positive(eps) {
                return Err(param_err("eql_eps", "must be positive"));
            }
            LossConfig::Eql { tau: p.float("eql_tau")?, eps, indicator }
        }
        other => return Err(param_err("loss", format!("unknown loss `{other}`"))),
    };
    let train = TrainConfig {
        epochs: p.usize("epochs")?,
        batch_size: p.usize("batch_size")?,
        lr: p.float("lr")?,
        min_lr: p.float("min_lr")?,
        weight_decay: p.float("weight_decay")?,
        layer_decay: p.float("layer_decay")?,
        freeze_epochs: p.usize("freeze_epochs")?,
        warmup_epochs: p.float("warmup_epochs")?,
        seed: p.int("seed")? as u64,
        label_smoothing: p.float("label_smoothing")?,
        margin_x: p.float("arcface_m_x")?,
        margin_y: p.float("arcface_m_y")?,
        augment: AugmentConfig {
            shift: p.usize("aug_shift")?,
            flip: probability(p, "aug_flip")?,
            erase: probability(p, "aug_erase")?,
            randaugment_n: p.usize("aug_randaugment_n")?,
            randaugment_m: p.usize("aug_randaugment_m")?,
            crop_scale: probability(p, "aug_crop_scale")?,
        },
        max_steps: match p.usize("max_steps")? {
            0 => None,
            n => Some(n),
        },
    };
    check_schedule(train.epochs, train.lr, train.min_lr, train.warmup_epochs, train.weight_decay)?;
    if train.augment.randaugment_m > crate::ml::randaugment::MAX_MAGNITUDE {
        return Err(param_err("aug_randaugment_m", format!("must be at most {}, found {}", crate::ml::randaugment::MAX_MAGNITUDE, train.augment.randaugment_m)));
    }
    if !(train.layer_decay > 0.0 && train.layer_decay <= 1.0) {
        return Err(param_err("layer_decay", format!("must be in (0, 1], found {}", train.layer_decay)));
    }
    if train.batch_size < 2 {
        return Err(param_err("batch_size", "must be at least 2 (BatchNorm needs two samples)"));
    }
    if !(0.0..1.0).contains(&train.label_smoothing) {
        return Err(param_err("label_smoothing", "must be in [0, 1)"));
    }
    check_pretrained(p)?;
    Ok(Settings { image_size: image_size(p)?, backbone, head, logit_adjust, loss, train, keep_checkpoints: p.usize("keep_checkpoints")? })
}

impl StageKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: empty classes no longer get a ln(1e-12) logit adjustment.
        // 3: `vit_pool` (mean of the patch tokens by default; was the class token); the
        //    conv weight gradient, BatchNorm/LayerNorm and attention of `ml::conv`/`norm`/`vit`.
        // 4: `layer_decay` on CNN and EfficientNet blocks too; `freeze_epochs`; EfficientNet's
        //    depthwise convolution of `ml::conv`.
        // 5: the loader: each epoch's order from (seed, epoch), each image's augmentation
        //    from (seed, epoch, index) (was one stream through the epoch); `max_steps`;
        //    sets over image stores, `image_size`, `aug_crop_scale`.
        // 6: the CPU kernels (`ml::kernels`: convolution, BatchNorm + ReLU, LayerNorm,
        //    attention, GELU with its exact derivative, linear layers) and flex's
        //    multi-threaded SIMD ops: other rounding, and GELU's gradient changed.
        // 7: GELU's erf and the attention softmax's exp vectorised (`ml::fastmath`), the
        //    ViT's token assembly and mean pooling as ops (`ml::tokens`), linear layers in
        //    tasks sized from the shape: the ViT's, Swin-V2's and the MAE's numbers change
        //    (CNN and EfficientNet models come out bit-identical).
        // 8: Swin-V2's window attention as one op (`ml::cosine_attention`, its qkv
        //    projection through `ml::linear`): other rounding for Swin-V2 only.
        8
    }
    fn summary(&self) -> &'static str {
        "train a CNN, ViT or EfficientNet-Lite classifier (linear / logit-adjusted / sub-centre ArcFace head; CE / EQL / balanced softmax)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        use ParamType::*;
        const BACKBONES: &[&str] = &["cnn", "vit", "efficientnet_lite", "swinv2"];
        const HEADS: &[&str] = &["linear", "logit_adjusted", "arcface"];
        const LOSSES: &[&str] = &["ce", "eql", "balanced_softmax"];
        let mut specs = vec![
            ParamSpec::optional("backbone", Enum(BACKBONES), "cnn", "model family (ignored when `init` is connected: the backbone comes from that model)"),
            ParamSpec::optional("cnn_widths", List(&Int), vec![32i64, 64, 128], "CNN: channels of each stage (2x2 max-pool between stages)"),
            ParamSpec::optional("cnn_blocks", Int, 2, "CNN: 3x3 conv + BatchNorm + ReLU blocks per stage"),
            ParamSpec::optional("head", Enum(HEADS), "linear", "classification head"),
            ParamSpec::optional("arcface_k", Int, 3, "ArcFace: sub-centres per class"),
            ParamSpec::optional("arcface_s", Float, 30.0, "ArcFace: logit scale s"),
            ParamSpec::optional("arcface_m_x", Float, 0.45, "ArcFace adaptive margin: range m_x (rarest class gets m_x + m_y)"),
            ParamSpec::optional("arcface_m_y", Float, 0.05, "ArcFace adaptive margin: floor m_y (most frequent class)"),
            ParamSpec::optional("logit_adjust_tau", Float, 1.0, "logit_adjusted head: tau of a_c = tau*log(prior_c)"),
            ParamSpec::optional("logit_adjust_mode", Enum(&["post_hoc", "loss"]), "post_hoc", "logit_adjusted head: subtract a at prediction, or train on logits + a"),
            ParamSpec::optional("loss", Enum(LOSSES), "ce", "training loss"),
            ParamSpec::optional("label_smoothing", Float, 0.0, "label smoothing of the cross-entropy"),
            ParamSpec::optional("eql_tau", Float, 1.0, "EQL: tau"),
            ParamSpec::optional("eql_eps", Float, 1e-4, "EQL: eps floor of the statistics"),
            ParamSpec::optional("eql_indicator", Enum(&["pos", "neg", "ratio"]), "pos", "EQL: which running statistic g is (pos, neg or pos/neg)"),
            ParamSpec::optional("epochs", Int, 10, "epochs"),
            ParamSpec::optional("batch_size", Int, 64, "images per optimiser step"),
            ParamSpec::optional("lr", Float, 1e-3, "peak learning rate (AdamW)"),
            ParamSpec::optional("min_lr", Float, 1e-5, "learning rate at the end of the cosine"),
            ParamSpec::optional("weight_decay", Float, 0.05, "AdamW weight decay (not on norms, biases, position embeddings)"),
            ParamSpec::optional("layer_decay", Float, 1.0, "layer-wise lr decay per block: block i of L gets lr*d^(L+1-i), the stem/embeddings d^(L+1), head and after the blocks lr (CNN: each conv block; 1 = off)"),
            ParamSpec::optional("freeze_epochs", Int, 0, "freeze the backbone's stem for this many epochs (EfficientNet: stem + first stage; CNN: first stage; ViT: embeddings); its BatchNorm statistics still update"),
            ParamSpec::optional("warmup_epochs", Float, 1.0, "linear warm-up length in epochs (fractions allowed)"),
            ParamSpec::optional("max_steps", Int, 0, "stop after this many optimiser steps, the schedule laid over them (0 = every epoch; for a few steps over a set too large for an epoch)"),
            ParamSpec::optional("seed", Int, 0, "weights, shuffling and augmentation"),
            ParamSpec::optional("image_size", Int, 0, "images are brought to image_size x image_size (0 = the size they have, which a generated benchmark's have; required for imported files); fine-tuning from `init` keeps its model's size"),
            ParamSpec::optional("aug_crop_scale", Float, 0.0, "RandomResizedCrop: smallest area fraction of the crop (0 = off: a centre crop when sizes differ; torchvision's default is 0.08)"),
            ParamSpec::optional("aug_shift", Int, 2, "random shift: pad by this many pixels and crop back (0 = off)"),
            ParamSpec::optional("aug_flip", Float, 0.5, "horizontal flip probability"),
            ParamSpec::optional("aug_erase", Float, 0.25, "random erasing probability"),
            ParamSpec::optional("aug_randaugment_n", Int, 0, "RandAugment: operations per image (0 = off; the seed used 2)"),
            ParamSpec::optional("aug_randaugment_m", Int, 9, "RandAugment: magnitude, 0..=30 (the seed used 9)"),
            ParamSpec::optional("keep_checkpoints", Int, 5, "how many last-epoch checkpoints to keep (for soups)"),
            ParamSpec::optional("effnet_variant", Enum(&["lite0", "lite1", "lite2"]), "lite0", "EfficientNet-Lite: widths and depths of Lite0, Lite1 or Lite2"),
            ParamSpec::optional("effnet_resolution", Int, 64, "EfficientNet-Lite: images are resized (bilinear) to this square size; grayscale is replicated to 3 channels"),
            ParamSpec::optional("swin_preset", Enum(&["tiny", "base", "large"]), "tiny", "Swin-V2: sizes of `tiny` (32 px, CPU-sized) or the seed's `base`/`large` (timm swinv2_*_window12to24_192to384); the swin_* sizes below replace the preset's where set"),
            ParamSpec::optional("swin_resolution", Int, 0, "Swin-V2: images are resized (bilinear) to this square size, gray replicated to RGB (0 = the preset's)"),
            ParamSpec::optional("swin_patch", Int, 0, "Swin-V2: patch size (0 = the preset's)"),
            ParamSpec::optional("swin_embed_dim", Int, 0, "Swin-V2: width of the first stage, doubled at each later one (0 = the preset's)"),
            ParamSpec::optional("swin_depths", List(&Int), Value::List(vec![]), "Swin-V2: blocks per stage ([] = the preset's)"),
            ParamSpec::optional("swin_heads", List(&Int), Value::List(vec![]), "Swin-V2: attention heads per stage ([] = the preset's)"),
            ParamSpec::optional("swin_window", List(&Int), Value::List(vec![]), "Swin-V2: window size, one for all stages or one per stage ([] = the preset's)"),
            ParamSpec::optional("swin_pretrained_window", List(&Int), Value::List(vec![]), "Swin-V2: the checkpoint's window per stage, to fine-tune at another window (0 = none; [] = the preset's)"),
            ParamSpec::optional("swin_mlp_ratio", Float, 0.0, "Swin-V2: MLP hidden size / width (0 = the preset's)"),
            ParamSpec::optional(
                "pretrained",
                List(&Path),
                Value::List(vec![]),
                "backbone weights to start from: [] or one safetensors file named in the backbone's layout (e.g. data/efficientnet_lite0/efficientnet_lite0.safetensors); the head is always new",
            ),
        ];
        // After the CNN's sizes, as before they were shared.
        let at = specs.iter().position(|s| s.name == "head").unwrap_or(specs.len());
        specs.splice(at..at, vit_params());
        specs
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            // Connect exactly one of `train` and `oracle` (checked when the stage runs:
            // the engine has no "one of" for ports). Neither port being connected
            // changes no key of a stage that does not use it.
            PortSpec::one("train", types::LABELLED_SET, "training images and labels (connect this or `oracle`)").optional(),
            PortSpec::one("oracle", types::ORACLE_SET, "the benchmark's oracle set (true labels): trains the ceiling; the outputs carry the oracle mark, which the recipe's stages refuse").optional(),
            PortSpec::one("val", types::LABELLED_SET, "validation set: accuracy after every epoch").optional(),
            PortSpec::one("init", types::MODEL, "model to fine-tune from (its backbone; its head too when head and classes match)").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("model", types::MODEL, "final weights (model.safetensors) and config (model.json)"),
            PortSpec::one("checkpoints", types::CHECKPOINTS, "the last keep_checkpoints epochs (index.json + epoch-NNNN/)"),
            PortSpec::one("log", types::REPORT, "per-epoch loss, train acc, val acc, lr (log.json, log.txt)"),
        ]
    }
    fn resources(&self, _params: &Params) -> Resources {
        Resources::Heavy
    }
    fn backend_sensitive(&self) -> bool {
        true
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        StageError::field_errors(settings(params))
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "log" => std::fs::read_to_string(dir.join("log.txt")).ok(),
            "model" => checkpoint::read_config(dir).ok().map(|c| {
                let d = describe_model(&c);
                if artifact::is_oracle(dir) { format!("ORACLE (trained on the true labels; the ceiling only): {d}") } else { d }
            }),
            "checkpoints" => checkpoint::read_index(dir).ok().map(|entries| {
                let list: Vec<String> = entries
                    .iter()
                    .map(|(e, _)| match e.val_acc {
                        Some(v) => format!("epoch {} (val {:.2}%)", e.epoch, 100.0 * v),
                        None => format!("epoch {}", e.epoch),
                    })
                    .collect();
                format!("{} checkpoints: {}", list.len(), list.join(", "))
            }),
            _ => None,
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = settings(&ctx.params)?;
        let oracle = training_input(ctx)?;
        let train = if oracle { artifact::read_oracle_set(ctx.input("oracle")?)? } else { artifact::read_labelled_set(ctx.input("train")?)? };
        let val = if ctx.has_input("val") { Some(artifact::read_labelled_set(ctx.input("val")?)?) } else { None };
        let init = if ctx.has_input("init") { Some(ctx.input("init")?.to_path_buf()) } else { None };
        let pretrained = ctx.sources("pretrained").first().map(|(_, p)| p.clone());
        if pretrained.is_none() && !ctx.params.list("pretrained")?.is_empty() {
            // A caller that runs `train` itself (a fold of `clean`) must hand the source
            // over; dropping it would silently train from scratch.
            return Err(param_err("pretrained", "the file was not resolved for this run (its caller did not pass the source)"));
        }
        if init.is_some() && pretrained.is_some() {
            return Err(param_err("pretrained", "both `pretrained` and the `init` input give the backbone's weights: use one"));
        }
        if let Some(v) = &val
            && v.images.classes != train.images.classes
        {
            return Err(StageError::Input { name: "val".into(), msg: "its classes differ from the training set's".into() });
        }
        let counts = artifact::class_counts(&train.labels, train.n_classes()).into_iter().map(|n| n as u64).collect();
        let base = match &init {
            Some(dir) => Some(checkpoint::read_config(dir)?),
            None => None,
        };
        // Fine-tuning without `image_size` keeps the init model's resolution.
        let target = match (&base, s.image_size) {
            (Some(b), 0) => Ok(b.input()),
            _ => artifact::model_input(&[&train.images], s.image_size),
        }
        .map_err(|e| param_err("image_size", e))?;
        if let Some(v) = &val
            && v.images.channels() != target.channels
        {
            return Err(StageError::Input { name: "val".into(), msg: format!("its images have {} channels, the training set's {}", v.images.channels(), target.channels) });
        }
        let mut config = ModelConfig {
            format: MODEL_FORMAT,
            backbone: s.backbone.clone(),
            head: s.head.clone(),
            logit_adjust: s.logit_adjust,
            loss: s.loss.clone(),
            classes: train.images.classes.clone(),
            height: target.height,
            width: target.width,
            channels: target.channels,
            class_counts: counts,
            epoch: 0,
        };
        if let Some(base) = base {
            if (base.height, base.width, base.channels) != (config.height, config.width, config.channels) {
                return Err(StageError::Input {
                    name: "init".into(),
                    msg: format!(
                        "the model takes {}x{}x{} images, this run's are {}x{}x{} (`image_size` and the training set's channels)",
                        base.height, base.width, base.channels, config.height, config.width, config.channels
                    ),
                });
            }
            if base.backbone != config.backbone {
                ctx.log(format!("init: using the init model's backbone {:?} (the backbone parameters are ignored)", base.backbone));
            }
            config.backbone = base.backbone;
        }
        config.check().map_err(StageError::failed)?;
        ctx.log(format!(
            "train: {} images, {} classes, {}x{}x{}, backend {}",
            train.images.n(),
            config.num_classes(),
            config.height,
            config.width,
            config.channels,
            ctx.backend
        ));
        if oracle {
            ctx.log("oracle: training on the TRUE labels (the ceiling); the outputs carry the oracle mark");
        }
        let job = TrainJob { ctx, settings: &s, config, train: &train, val: val.as_ref(), init, pretrained, oracle };
        dispatch(&ctx.backend, job)
    }
}

/// Which training input is connected: `Ok(true)` for `oracle`, `Ok(false)` for `train`;
/// an error naming the field when both or neither are. Also refuses oracle-marked
/// artifacts on the other inputs (an oracle model as `init`, say).
fn training_input(ctx: &RunContext) -> Result<bool, StageError> {
    let oracle = match (ctx.has_input("train"), ctx.has_input("oracle")) {
        (true, false) => false,
        (false, true) => true,
        (true, true) => return Err(StageError::Input { name: "oracle".into(), msg: "both `train` and `oracle` are connected: connect exactly one".into() }),
        (false, false) => return Err(StageError::Input { name: "train".into(), msg: "neither `train` nor `oracle` is connected: connect exactly one".into() }),
    };
    artifact::refuse_oracle(ctx, &["oracle"])?;
    Ok(oracle)
}

struct TrainJob<'a, 'c> {
    ctx: &'a RunContext<'c>,
    settings: &'a Settings,
    config: ModelConfig,
    train: &'a LabelledSet,
    val: Option<&'a LabelledSet>,
    init: Option<PathBuf>,
    pretrained: Option<PathBuf>,
    oracle: bool,
}

fn labelled(set: &LabelledSet) -> Result<Labelled<'_>, StageError> {
    Ok(Labelled { images: &set.images, labels: &set.labels })
}

impl BackendJob for TrainJob<'_, '_> {
    type Output = ();
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<(), StageError> {
        let TrainJob { ctx, settings, config, train, val, init, pretrained, oracle } = self;
        let mut model: Classifier<B> = config.init(settings.train.seed, &device);
        if let Some(path) = &pretrained {
            let (backbone, report) = model.backbone.load_pretrained(path)?;
            model.backbone = backbone;
            ctx.log(format!("pretrained {}: {}", path.display(), report.summary()));
        }
        if let Some(dir) = &init {
            let (base, base_config) = checkpoint::load_model::<B>(dir, &device)?;
            model.backbone = base.backbone;
            if base_config.head == config.head && base_config.classes == config.classes {
                model.head = base.head;
                ctx.log("init: backbone and head loaded");
            } else {
                ctx.log("init: backbone loaded; head re-initialised (different head or classes)");
            }
        }
        let out_model = ctx.output_dir("model")?;
        let out_ckpt = ctx.output_dir("checkpoints")?;
        let out_log = ctx.output_dir("log")?;
        if oracle {
            for dir in [&out_model, &out_ckpt, &out_log] {
                artifact::mark_oracle(dir)?;
            }
        }
        let mut observer = Observer { ctx, config: &config, dir: out_ckpt, keep: settings.keep_checkpoints, kept: Vec::new(), logs: Vec::new(), epochs: settings.train.epochs };
        checkpoint::write_index(&observer.dir, &[])?;
        let final_model = train_loop::train::<B>(&device, model, &config, &settings.train, labelled(train)?, val.map(labelled).transpose()?, &mut observer)?;
        let mut final_config = config.clone();
        final_config.epoch = settings.train.epochs;
        checkpoint::save_model(&final_model, &final_config, &out_model)?;
        write_logs(&out_log, &observer.logs, &final_config, &settings.train, &ctx.backend)
    }
}

struct Observer<'a, 'c> {
    ctx: &'a RunContext<'c>,
    config: &'a ModelConfig,
    dir: PathBuf,
    keep: usize,
    kept: Vec<CheckpointEntry>,
    logs: Vec<EpochLog>,
    epochs: usize,
}

impl<B: burn::tensor::backend::Backend> TrainObserver<B> for Observer<'_, '_> {
    fn step(&mut self, step: usize, total: usize) {
        let epoch = self.logs.len() + 1;
        self.ctx.progress(step as u64, total as u64, &format!("epoch {epoch}/{}", self.epochs));
    }

    fn epoch(&mut self, log: &EpochLog, model: &Classifier<B>) -> Result<(), StageError> {
        self.ctx.log(format_epoch(log));
        self.logs.push(log.clone());
        // Only the last `keep` epochs can end up in the artifact: skip saving earlier ones.
        if self.keep == 0 || log.epoch + self.keep <= self.epochs {
            return Ok(());
        }
        let name = checkpoint::checkpoint_dir_name(log.epoch);
        let mut config = self.config.clone();
        config.epoch = log.epoch;
        checkpoint::save_model(model, &config, &self.dir.join(&name))?;
        self.kept.push(CheckpointEntry { epoch: log.epoch, dir: name, val_acc: log.val_acc });
        while self.kept.len() > self.keep {
            let old = self.kept.remove(0);
            let _ = std::fs::remove_dir_all(self.dir.join(&old.dir));
        }
        checkpoint::write_index(&self.dir, &self.kept)
    }
}

/// One paragraph about a model artifact (also used by `show` on checkpoints' models).
pub(crate) fn describe_model(c: &ModelConfig) -> String {
    let backbone = match &c.backbone {
        BackboneConfig::Cnn(b) => format!("CNN widths {:?} x{} blocks", b.widths, b.blocks),
        BackboneConfig::Vit(v) => format!("ViT patch {} dim {} depth {} heads {} mlp {}", v.patch, v.dim, v.depth, v.heads, v.mlp_ratio),
        BackboneConfig::EfficientnetLite(e) => format!("EfficientNet-{:?} at {}x{}", e.variant, e.resolution, e.resolution),
        BackboneConfig::Swinv2(w) => format!(
            "Swin-V2 embed {} depths {:?} heads {:?} window {:?} patch {} at {}x{}",
            w.embed_dim, w.depths, w.heads, w.window, w.patch, w.resolution, w.resolution
        ),
    };
    let head = match (&c.head, c.logit_adjust) {
        (HeadConfig::ArcFace { k, s }, _) => format!("sub-centre ArcFace k={k} s={s}"),
        (HeadConfig::Linear, Some(la)) => format!("linear, logit-adjusted tau={} ({:?})", la.tau, la.mode),
        (HeadConfig::Linear, None) => "linear".to_string(),
    };
    format!(
        "{backbone}; head {head}; loss {:?}; {} classes; {}x{}x{} images; {} training samples; epoch {}",
        c.loss,
        c.num_classes(),
        c.height,
        c.width,
        c.channels,
        c.class_counts.iter().sum::<u64>(),
        c.epoch
    )
}

fn format_epoch(l: &EpochLog) -> String {
    let val = l.val_acc.map(|v| format!("{:6.2}%", 100.0 * v)).unwrap_or_else(|| "      -".into());
    format!(
        "epoch {:>3}  loss {:.4}  train acc {:6.2}%  val acc {val}  lr {:.2e}  {:.1}s  {:.0} img/s",
        l.epoch,
        l.loss,
        100.0 * l.train_acc,
        l.lr,
        l.seconds,
        l.images_per_sec
    )
}

fn write_logs(dir: &Path, logs: &[EpochLog], config: &ModelConfig, tc: &TrainConfig, backend: &str) -> Result<(), StageError> {
    // No timings in log.json: they vary between identical runs, and the artifact's
    // digest should not. The text log keeps them for people.
    let epochs: Vec<Value> = logs
        .iter()
        .map(|l| {
            let mut m = std::collections::BTreeMap::new();
            m.insert("epoch".to_string(), Value::Int(l.epoch as i64));
            m.insert("loss".to_string(), Value::Float(l.loss));
            m.insert("train_acc".to_string(), Value::Float(l.train_acc));
            if let Some(v) = l.val_acc {
                m.insert("val_acc".to_string(), Value::Float(v));
            }
            m.insert("lr".to_string(), Value::Float(l.lr));
            Value::Map(m.into())
        })
        .collect();
    let json = serde_json::json!({ "backend": backend, "model": config, "train": tc, "epochs": epochs });
    write_json(&dir.join("log.json"), &json)?;
    let mut text = String::new();
    for l in logs {
        let _ = writeln!(text, "{}", format_epoch(l));
    }
    std::fs::write(dir.join("log.txt"), text).map_err(|e| StageError::io("writing log.txt", e))
}
