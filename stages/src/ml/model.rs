//! The classifier (backbone + head + EQL buffers) and its configuration, the JSON that
//! sits beside the weights in a model artifact. The config holds everything needed to
//! rebuild the module and use it: sizes, class names, image shape, and the training
//! class counts (for post-hoc logit adjustment and for head/middle/tail breakdowns).

use super::kernels::KernelBackend;
use burn::module::{Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use super::cnn::{Cnn, CnnConfig};
use super::efficientnet::{EfficientNet, EfficientNetConfig};
use super::pretrained::{LoadReport, load_pretrained, load_tensors, read_tensors};
use fgflow_engine::StageError;
use super::head::{Head, HeadConfig};
use super::loss::LossConfig;
use super::swinv2::{SwinV2, SwinV2Config};
use super::vit::{Vit, VitConfig};

/// Version of the model artifact layout; bump when the JSON or tensor names change.
pub const MODEL_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackboneConfig {
    Cnn(CnnConfig),
    Vit(VitConfig),
    EfficientnetLite(EfficientNetConfig),
    Swinv2(SwinV2Config),
}

impl BackboneConfig {
    pub fn feature_dim(&self) -> usize {
        match self {
            BackboneConfig::Cnn(c) => c.feature_dim(),
            BackboneConfig::Vit(v) => v.feature_dim(),
            BackboneConfig::EfficientnetLite(e) => e.feature_dim(),
            BackboneConfig::Swinv2(s) => s.feature_dim(),
        }
    }
}

/// Whether and how the long-tail logit adjustment is used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustMode {
    /// Train plainly; predict on logits - tau*log prior.
    PostHoc,
    /// Train on logits + tau*log prior; predict on raw logits.
    Loss,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LogitAdjust {
    pub tau: f64,
    pub mode: AdjustMode,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub format: u32,
    pub backbone: BackboneConfig,
    pub head: HeadConfig,
    /// Set for the "logit_adjusted" head.
    pub logit_adjust: Option<LogitAdjust>,
    /// The loss it was trained with (informational; predictions do not depend on it).
    pub loss: LossConfig,
    pub classes: Vec<String>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// Training samples per class of the run that produced these weights.
    pub class_counts: Vec<u64>,
    /// Epochs trained (for checkpoints: the epoch this snapshot was taken after).
    pub epoch: usize,
}

impl ModelConfig {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The input images are brought to (the loader's target).
    pub fn input(&self) -> super::resize::Target {
        super::resize::Target { height: self.height, width: self.width, channels: self.channels }
    }

    /// Build a freshly initialised classifier (weights from `seed`).
    pub fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Classifier<B> {
        let backbone = match &self.backbone {
            BackboneConfig::Cnn(c) => Backbone::Cnn(c.init(self.channels, device)),
            BackboneConfig::Vit(v) => Backbone::Vit(v.init(self.channels, self.height, self.width, device)),
            BackboneConfig::EfficientnetLite(e) => Backbone::EfficientnetLite(e.init(device)),
            BackboneConfig::Swinv2(s) => Backbone::Swinv2(s.init(device)),
        };
        let c = self.num_classes();
        let model = Classifier {
            backbone,
            head: self.head.init(self.backbone.feature_dim(), c, device),
            eql_pos: buffer(c, device),
            eql_neg: buffer(c, device),
        };
        let mut model = super::init::reinit(model, seed);
        // `reinit` knows burn's Conv2d; the EfficientNet's convolutions are its own.
        if let Backbone::EfficientnetLite(net) = model.backbone {
            model.backbone = Backbone::EfficientnetLite(super::efficientnet::he_init(net, seed));
        } else if let Backbone::Swinv2(net) = model.backbone {
            model.backbone = Backbone::Swinv2(super::swinv2::fix_init(net));
        }
        model
    }

    /// The checks that need more than one field.
    pub fn check(&self) -> Result<(), String> {
        if self.classes.is_empty() {
            return Err("the model has no classes".into());
        }
        if self.class_counts.len() != self.classes.len() {
            return Err(format!("{} class counts for {} classes", self.class_counts.len(), self.classes.len()));
        }
        match &self.backbone {
            BackboneConfig::Cnn(c) => c.check(),
            BackboneConfig::Vit(v) => v.check(self.height, self.width),
            BackboneConfig::EfficientnetLite(e) => e.check(self.channels),
            BackboneConfig::Swinv2(s) => s.check(self.channels),
        }
    }
}

/// A non-trainable [C] vector saved with the weights.
pub fn buffer<B: Backend>(c: usize, device: &B::Device) -> Param<Tensor<B, 1>> {
    Param::initialized(ParamId::new(), Tensor::zeros([c], device))
}

// One per model, so the size difference between variants costs nothing worth a Box
// (which burn's Module derive does not see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    Cnn(Cnn<B>),
    Vit(Vit<B>),
    EfficientnetLite(EfficientNet<B>),
    Swinv2(SwinV2<B>),
}

impl<B: Backend> Backbone<B> {
    /// Load weights named relative to the backbone (`stem.weight`, not
    /// `backbone.EfficientnetLite.stem.weight`) from a safetensors file. A file none of
    /// whose tensors fits is an error: it is the wrong file, not a partial start.
    pub fn load_pretrained(self, path: &std::path::Path) -> Result<(Self, LoadReport), StageError> {
        let (backbone, report) = match self {
            Backbone::Cnn(m) => load_pretrained(m, path).map(|(m, r)| (Backbone::Cnn(m), r))?,
            Backbone::Vit(m) => {
                let file = read_tensors(path)?;
                let fail = |e: String| StageError::failed(format!("{}: {e}", path.display()));
                let file = super::vit::adapt_checkpoint(file, &m).map_err(fail)?;
                load_tensors(m, &file, &|name: &str| name.to_string()).map(|(m, r)| (Backbone::Vit(m), r)).map_err(fail)?
            }
            Backbone::Swinv2(m) => {
                let fail = |e: String| StageError::failed(format!("{}: {e}", path.display()));
                let file = super::swinv2::adapt_checkpoint(read_tensors(path)?).map_err(fail)?;
                load_tensors(m, &file, &super::swinv2::timm_name).map(|(m, r)| (Backbone::Swinv2(m), r)).map_err(fail)?
            }
            Backbone::EfficientnetLite(m) => load_pretrained(m, path).map(|(m, r)| (Backbone::EfficientnetLite(m), r))?,
        };
        if report.loaded.is_empty() {
            let some = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
            return Err(StageError::failed(format!(
                "{}: none of its tensors is a tensor of this backbone (the file has {}...; the backbone needs {}...)",
                path.display(),
                some(&report.unused),
                some(&report.new)
            )));
        }
        // A backbone tensor the file lacks is a damaged or different checkpoint, except
        // what the architecture adds on top of one: the ViT's `fc_norm` (timm's mean
        // pooling, new over an MAE or class-token checkpoint) and, with that pooling,
        // the final `norm` it leaves unused.
        let optional = |name: &str| match &backbone {
            Backbone::Vit(v) => name.starts_with("fc_norm.") || (v.pool == super::vit::VitPool::Avg && name.starts_with("norm.")),
            _ => false,
        };
        let missing: Vec<&String> = report.new.iter().filter(|n| !optional(n)).collect();
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(5).map(|n| format!("`{n}`")).collect();
            let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
            return Err(StageError::failed(format!(
                "{}: {} tensors of this backbone are missing from the file: {}{more}",
                path.display(),
                missing.len(),
                shown.join(", ")
            )));
        }
        Ok((backbone, report))
    }
}

#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub backbone: Backbone<B>,
    pub head: Head<B>,
    /// EQL running sums of |dL/dz| for samples of each class (buffers, no gradient).
    pub eql_pos: Param<Tensor<B, 1>>,
    /// EQL running sums of |dL/dz| for samples of other classes.
    pub eql_neg: Param<Tensor<B, 1>>,
}

impl<B: KernelBackend> Classifier<B> {
    /// [N, C, H, W] -> features [N, d].
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        match &self.backbone {
            Backbone::Cnn(m) => m.forward(x),
            Backbone::Vit(m) => m.forward(x),
            Backbone::EfficientnetLite(m) => m.forward(x),
            Backbone::Swinv2(m) => m.forward(x),
        }
    }

    /// Inference logits [N, C].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(self.features(x))
    }

    /// Training logits (ArcFace margins applied to the targets).
    pub fn forward_train(&self, x: Tensor<B, 4>, labels: Tensor<B, 1, Int>, margins: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
        self.head.forward_train(self.features(x), labels, margins)
    }

    /// Replace the EQL sums (values are detached: they are statistics, not weights).
    pub fn set_eql(mut self, pos: Tensor<B, 1>, neg: Tensor<B, 1>) -> Self {
        self.eql_pos = Param::initialized(self.eql_pos.id, pos.detach());
        self.eql_neg = Param::initialized(self.eql_neg.id, neg.detach());
        self
    }
}
