//! The `pretrain` kind: masked-autoencoder pre-training of the ViT on images without
//! their labels (the seed pre-trained on the training set and test A). Outputs a model
//! whose backbone is the pre-trained encoder, in the format `train` reads from its
//! `init` input (the head is a fresh linear layer: `train` re-initialises or keeps it
//! like any other init model's), and the per-epoch reconstruction loss.
//! The model code lives in `crate::ml::mae`.

use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, Resources, RunContext, StageError, StageKind};

use super::train::{check_schedule, describe_model, image_size, param_err, probability, vit_config, vit_params};
use crate::artifact::{self, ImageSet};
use crate::ml::augment::AugmentConfig;
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::checkpoint;
use crate::ml::kernels::TrainBackend;
use crate::ml::loader::ImageSource;
use crate::ml::head::HeadConfig;
use crate::ml::loss::LossConfig;
use crate::ml::mae::{MaeConfig, PretrainConfig, PretrainEpoch, pretrain};
use crate::ml::model::{Backbone, BackboneConfig, MODEL_FORMAT, ModelConfig};
use crate::ml::predictions::write_json;
use crate::ml::vit::VitConfig;
use crate::types;

pub struct Pretrain;

struct Settings {
    vit: VitConfig,
    mae: MaeConfig,
    train: PretrainConfig,
    image_size: usize,
}

fn settings(p: &Params) -> Result<Settings, StageError> {
    let vit = vit_config(p)?;
    let mae = MaeConfig {
        mask_ratio: p.float("mask_ratio")?,
        decoder_dim: p.usize("decoder_dim")?,
        decoder_depth: p.usize("decoder_depth")?,
        decoder_heads: p.usize("decoder_heads")?,
        norm_pix: p.bool("norm_pix")?,
    };
    mae.check().map_err(|(field, msg)| param_err(field, msg))?;
    let flip = probability(p, "aug_flip")?;
    let train = PretrainConfig {
        epochs: p.usize("epochs")?,
        batch_size: p.usize("batch_size")?,
        lr: p.float("lr")?,
        min_lr: p.float("min_lr")?,
        weight_decay: p.float("weight_decay")?,
        warmup_epochs: p.float("warmup_epochs")?,
        seed: p.int("seed")? as u64,
        augment: AugmentConfig { shift: p.usize("aug_shift")?, flip, erase: 0.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 },
    };
    check_schedule(train.epochs, train.lr, train.min_lr, train.warmup_epochs, train.weight_decay)?;
    if train.batch_size == 0 {
        return Err(param_err("batch_size", "must be at least 1"));
    }
    let image_size = image_size(p)?;
    Ok(Settings { vit, mae, train, image_size })
}

impl StageKind for Pretrain {
    fn name(&self) -> &'static str {
        "pretrain"
    }
    fn version(&self) -> u32 {
        // 2: the loader's order and per-image augmentation streams (see `train` 5);
        //    sets over image stores, `image_size`.
        // 3: the CPU kernels of `train` v6.
        // 4: the vectorised GELU and softmax of `train` v7.
        4
    }
    fn summary(&self) -> &'static str {
        "masked-autoencoder pre-training of the ViT on unlabelled images; `train` starts from it through `init`"
    }
    fn params(&self) -> Vec<ParamSpec> {
        use ParamType::*;
        let mut specs = vit_params();
        specs.extend([
            ParamSpec::optional("mask_ratio", Float, 0.75, "fraction of each image's patches hidden from the encoder"),
            ParamSpec::optional("decoder_dim", Int, 64, "decoder token dimension"),
            ParamSpec::optional("decoder_depth", Int, 1, "decoder transformer blocks"),
            ParamSpec::optional("decoder_heads", Int, 4, "decoder attention heads (must divide decoder_dim)"),
            ParamSpec::optional("norm_pix", Bool, true, "reconstruct pixels normalised per patch (MAE's default)"),
            ParamSpec::optional("image_size", Int, 0, "images are brought to image_size x image_size (centre crop + resize; 0 = the size they have, which a generated benchmark's have)"),
            ParamSpec::optional("epochs", Int, 10, "epochs over all connected images"),
            ParamSpec::optional("batch_size", Int, 64, "images per optimiser step"),
            ParamSpec::optional("lr", Float, 1.5e-3, "peak learning rate (AdamW)"),
            ParamSpec::optional("min_lr", Float, 1e-5, "learning rate at the end of the cosine"),
            ParamSpec::optional("weight_decay", Float, 0.05, "AdamW weight decay (not on norms, biases, position embeddings)"),
            ParamSpec::optional("warmup_epochs", Float, 1.0, "linear warm-up length in epochs"),
            ParamSpec::optional("seed", Int, 0, "weights, masks, shuffling and augmentation"),
            ParamSpec::optional("aug_shift", Int, 2, "random shift in pixels (0 = off)"),
            ParamSpec::optional("aug_flip", Float, 0.5, "horizontal flip probability"),
        ]);
        specs
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::many("labelled", types::LABELLED_SET, "labelled sets whose images are used (labels ignored)").optional(),
            PortSpec::many("images", types::IMAGE_SET, "unlabelled image sets (test A, ...)").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("model", types::MODEL, "the pre-trained encoder as a ViT model (model.safetensors, model.json) for train's `init`"),
            PortSpec::one("log", types::REPORT, "per-epoch reconstruction loss (log.json, log.txt)"),
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
            "model" => checkpoint::read_config(dir).ok().map(|c| describe_model(&c)),
            _ => None,
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = settings(&ctx.params)?;
        let mut sets: Vec<ImageSet> = Vec::new();
        for dir in ctx.inputs("labelled") {
            sets.push(artifact::read_labelled_set(dir)?.images);
        }
        for dir in ctx.inputs("images") {
            sets.push(artifact::read_image_set(dir)?);
        }
        let Some(first) = sets.first() else {
            return Err(StageError::failed("pretrain needs images: connect `labelled` and/or `images`"));
        };
        let refs: Vec<&ImageSet> = sets.iter().collect();
        let target = artifact::model_input(&refs, s.image_size).map_err(|e| param_err("image_size", e))?;
        let shape = (target.height, target.width, target.channels);
        if shape.0 < s.vit.patch || shape.1 < s.vit.patch {
            return Err(param_err("vit_patch", format!("patch {} is larger than the {}x{} images", s.vit.patch, shape.0, shape.1)));
        }
        let classes = first.classes.clone();
        let config = ModelConfig {
            format: MODEL_FORMAT,
            backbone: BackboneConfig::Vit(s.vit.clone()),
            head: HeadConfig::Linear,
            logit_adjust: None,
            loss: LossConfig::Ce,
            class_counts: vec![0; classes.len()],
            classes,
            height: shape.0,
            width: shape.1,
            channels: shape.2,
            epoch: 0,
        };
        config.check().map_err(StageError::failed)?;
        let total: usize = sets.iter().map(|s| s.n()).sum();
        ctx.log(format!("pretrain: {total} images from {} set(s), {}x{}x{}, backend {}", sets.len(), shape.0, shape.1, shape.2, ctx.backend));
        dispatch(&ctx.backend, PretrainJob { ctx, settings: &s, config, sets: &sets })
    }
}

struct PretrainJob<'a, 'c> {
    ctx: &'a RunContext<'c>,
    settings: &'a Settings,
    config: ModelConfig,
    sets: &'a [ImageSet],
}

impl BackendJob for PretrainJob<'_, '_> {
    type Output = ();
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<(), StageError> {
        let PretrainJob { ctx, settings, config, sets } = self;
        let views: Vec<&dyn ImageSource> = sets.iter().map(|s| s as &dyn ImageSource).collect();
        let mae = settings.mae.init::<B>(&settings.vit, config.channels, config.height, config.width, &device);
        let mae = crate::ml::init::reinit(mae, settings.train.seed);
        let mut logs: Vec<PretrainEpoch> = Vec::new();
        let epochs = settings.train.epochs;
        let mut on_step = |step: usize, total: usize| ctx.progress(step as u64, total as u64, "pretrain");
        let mut on_epoch = |e: &PretrainEpoch| {
            ctx.log(format_epoch(e, epochs));
            logs.push(e.clone());
            Ok(())
        };
        let trained = pretrain::<B>(&device, mae, &settings.mae, &settings.train, config.input(), &views, &mut on_step, &mut on_epoch)?;
        // The encoder becomes the backbone of an ordinary ViT classifier.
        let mut model = config.init::<B::InnerBackend>(settings.train.seed, &device);
        model.backbone = Backbone::Vit(trained.encoder);
        checkpoint::save_model(&model, &config, &ctx.output_dir("model")?)?;

        let dir = ctx.output_dir("log")?;
        // No timings in log.json (identical runs must give identical artifacts).
        let epochs_json: Vec<serde_json::Value> = logs.iter().map(|e| serde_json::json!({ "epoch": e.epoch, "loss": e.loss, "lr": e.lr })).collect();
        let json = serde_json::json!({ "backend": ctx.backend, "vit": settings.vit, "mae": settings.mae, "train": settings.train, "epochs": epochs_json });
        write_json(&dir.join("log.json"), &json)?;
        let mut text = String::new();
        for e in &logs {
            let _ = writeln!(text, "{}", format_epoch(e, epochs));
        }
        std::fs::write(dir.join("log.txt"), text).map_err(|e| StageError::io("writing log.txt", e))
    }
}

fn format_epoch(e: &PretrainEpoch, epochs: usize) -> String {
    format!("epoch {:>3}/{epochs}  reconstruction loss {:.4}  lr {:.2e}  {:.1}s  {:.0} img/s", e.epoch, e.loss, e.lr, e.seconds, e.images_per_sec)
}
