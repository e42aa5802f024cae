//! The `predict` kind: runs a trained model over an image set (test A/B) or a labelled
//! set (validation) and writes logits and probabilities, optionally with horizontal
//! flip TTA (mean of the logits of the image and its mirror, then softmax) and post-hoc
//! long-tail logit adjustment (logits - tau*log prior, the prior from the class counts
//! stored in the model).

use std::path::PathBuf;

use crate::ml::kernels::TrainBackend;
use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, Resources, RunContext, StageError, StageKind};

use crate::artifact::{self, ImageSet};
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::checkpoint;
use crate::ml::head::log_prior;
use crate::ml::model::AdjustMode;
use crate::ml::predictions::Predictions;
use crate::ml::train_loop::{post_hoc_adjust, predict_logits};
use crate::types;

pub struct Predict;

impl StageKind for Predict {
    fn name(&self) -> &'static str {
        "predict"
    }
    fn version(&self) -> u32 {
        // 2: empty classes no longer get a ln(1e-12) logit adjustment.
        // 3: the ViT's own LayerNorm/attention (same maths, other rounding).
        // 4: images of another size or channel count are brought to the model's (was
        //    an error), streamed through the loader.
        // 5: the CPU kernels of `train` v6 (other rounding).
        // 6: the ViT's kernels of `train` v7 (vectorised GELU and softmax, token ops).
        // 7: Swin-V2's window attention of `train` v8 (other rounding).
        7
    }
    fn summary(&self) -> &'static str {
        "class probabilities and logits of a model over an image set (flip TTA, post-hoc logit adjustment)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("flip_tta", ParamType::Bool, true, "average the logits of each image and its horizontal mirror"),
            ParamSpec::optional(
                "logit_adjust",
                ParamType::Enum(&["model", "off", "on"]),
                "model",
                "post-hoc logit adjustment: as the model was trained for (logit_adjusted head, post_hoc mode), never, or always with logit_adjust_tau",
            ),
            ParamSpec::optional("logit_adjust_tau", ParamType::Float, 1.0, "tau when logit_adjust is \"on\""),
            ParamSpec::optional("batch_size", ParamType::Int, 256, "images per forward pass (memory only; results do not depend on it)"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::one("model", types::MODEL, "the trained model"),
            PortSpec::one("images", types::IMAGE_SET, "images to predict (connect this or `labelled`)").optional(),
            PortSpec::one("labelled", types::LABELLED_SET, "a labelled set to predict, labels ignored (e.g. validation)").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("predictions", types::PREDICTIONS, "predictions.safetensors (probs, logits [N, C]) + classes.json + ids.json")]
    }
    fn resources(&self, _params: &Params) -> Resources {
        Resources::Heavy
    }
    fn backend_sensitive(&self) -> bool {
        true
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        match params.int("batch_size") {
            Ok(b) if b < 1 => vec![("batch_size".into(), "must be at least 1".into())],
            _ => Vec::new(),
        }
    }

    fn describe_output(&self, output: &str, dir: &std::path::Path) -> Option<String> {
        if output != "predictions" {
            return None;
        }
        let p = Predictions::read(dir).ok()?;
        let n = p.n().max(1) as f64;
        let mean_top: f64 = (0..p.n()).map(|i| p.probs_row(i).iter().copied().fold(0f32, f32::max) as f64).sum::<f64>() / n;
        let mut predicted = vec![0usize; p.num_classes()];
        for k in p.top1() {
            predicted[k] += 1;
        }
        let empty = predicted.iter().filter(|&&c| c == 0).count();
        Some(format!(
            "{} images x {} classes; mean top probability {:.3}; {} classes never predicted",
            p.n(),
            p.num_classes(),
            mean_top,
            empty
        ))
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let images = match (ctx.has_input("images"), ctx.has_input("labelled")) {
            (true, false) => artifact::read_image_set(ctx.input("images")?)?,
            (false, true) => artifact::read_labelled_set(ctx.input("labelled")?)?.images,
            _ => return Err(StageError::Input { name: "images".into(), msg: "connect exactly one of `images` and `labelled`".into() }),
        };
        let model_dir = ctx.input("model")?.to_path_buf();
        let config = checkpoint::read_config(&model_dir)?;
        let target = config.input();
        if images.native_size() != Some((target.height, target.width)) || images.channels() != target.channels {
            let size = images.native_size().map_or("files of any size".to_string(), |(h, w)| format!("{h}x{w}"));
            ctx.log(format!(
                "the images ({size}, {} channels) are brought to the model's {}x{}x{} (centre crop, resize)",
                images.channels(),
                target.height,
                target.width,
                target.channels
            ));
        }
        if images.classes != config.classes {
            ctx.log("note: the image set's class list differs from the model's; predictions use the model's classes");
        }
        let tau = match ctx.params.str("logit_adjust")? {
            "off" => None,
            "on" => Some(ctx.params.float("logit_adjust_tau")?),
            _ => config.logit_adjust.filter(|la| la.mode == AdjustMode::PostHoc).map(|la| la.tau),
        };
        let flip = ctx.params.bool("flip_tta")?;
        let batch = ctx.params.usize("batch_size")?.max(1);
        ctx.log(format!("predict: {} images, flip TTA {flip}, logit adjustment {tau:?}, backend {}", images.n(), ctx.backend));
        let mut logits = dispatch(&ctx.backend, PredictJob { model_dir, target, images: &images, flip, batch })?;
        if let Some(tau) = tau {
            post_hoc_adjust(&mut logits, &log_prior(&config.class_counts, tau));
        }
        let pred = Predictions::from_logits(images.ids.clone(), config.classes.clone(), logits);
        let out = ctx.output_dir("predictions")?;
        pred.write(&out)?;
        // An oracle model's predictions stay marked, so the recipe's kinds refuse them.
        artifact::carry_oracle(ctx.input("model")?, &out)
    }
}

struct PredictJob<'a> {
    model_dir: PathBuf,
    target: crate::store::Target,
    images: &'a ImageSet,
    flip: bool,
    batch: usize,
}

impl BackendJob for PredictJob<'_> {
    type Output = Vec<f32>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Vec<f32>, StageError> {
        // Inference needs no autodiff: load straight onto the inner backend.
        let (model, _) = checkpoint::load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        predict_logits(&model, self.target, self.images, self.batch, self.flip)
    }
}
