//! The plain training loop (no burn-train `Learner`: custom losses, EQL statistics and
//! per-epoch checkpoints are simpler written out) and batched inference with flip TTA.
//!
//! One optimiser step per batch: augment on the CPU, forward with training logits
//! (ArcFace margins), apply the loss-side adjustments (in-loss logit adjustment,
//! balanced softmax, EQL), cross-entropy, backward, grouped AdamW at the scheduled
//! learning rate, then fold the batch's EQL increments into the model's buffers.
//! Batches are made ahead by the loader's worker threads (`loader`): the epoch's order
//! from (seed, epoch), each image's augmentation from (seed, epoch, index), and weights
//! from the seed (`init`), so a seed fixes a run on a backend whatever the threads.

use crate::ml::kernels::{KernelBackend, TrainBackend};
use std::time::Instant;

use std::collections::HashSet;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use fgflow_engine::StageError;
use serde::{Deserialize, Serialize};

use super::augment::AugmentConfig;
use super::loader::{Augmentation, ImageSource, LoaderConfig, batches_of, epoch_order, run_pass};
use super::resize::Target;
use super::head::{adaptive_margins, log_prior};
use super::loss::{LossConfig, add_per_class, cross_entropy, eql_adjust, eql_increments, eql_indicator};
use super::model::{AdjustMode, Classifier, ModelConfig};
use super::optim::{GroupedAdamW, stem_params};
use super::schedule::lr_at;
use super::step_pool::StepPool;

/// Everything about a run that is not the model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay per block (1.0 = off; see `optim`).
    #[serde(default = "no_layer_decay")]
    pub layer_decay: f64,
    /// The backbone's stem (`optim::stem_params`) takes no gradient and no optimiser
    /// step during the first `freeze_epochs` epochs (0 = never frozen). Its BatchNorm
    /// running statistics keep updating, as in PyTorch with `requires_grad = False` on
    /// a module left in train mode.
    #[serde(default)]
    pub freeze_epochs: usize,
    pub warmup_epochs: f64,
    pub seed: u64,
    pub label_smoothing: f64,
    /// ArcFace adaptive-margin parameters (m_x, m_y).
    pub margin_x: f64,
    pub margin_y: f64,
    pub augment: AugmentConfig,
    /// Stop after this many optimiser steps (the schedule is laid over them), for a few
    /// steps over a set too large for a whole epoch; `None`: every epoch runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
}

/// The loader's salt of `train` (order and augmentation streams).
const TRAIN_SALT: u64 = 0x5eed_da7a_0000_0001;

fn no_layer_decay() -> f64 {
    1.0
}

/// Images with one label each.
#[derive(Clone, Copy)]
pub struct Labelled<'a> {
    pub images: &'a dyn ImageSource,
    pub labels: &'a [u32],
}

/// One line of the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    /// On augmented images with the training logits (margins and loss adjustments applied).
    pub train_acc: f64,
    pub val_acc: Option<f64>,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
}

/// Hooks the caller gets during training.
pub trait TrainObserver<B: Backend> {
    /// After every optimiser step.
    fn step(&mut self, _step: usize, _total: usize) {}
    /// After every epoch, with the inference model of that epoch.
    fn epoch(&mut self, _log: &EpochLog, _model: &Classifier<B>) -> Result<(), StageError> {
        Ok(())
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl<B: Backend> TrainObserver<B> for Quiet {}

fn labels_tensor<B: Backend>(labels: &[u32], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(v, [labels.len()]), device)
}

fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// Train `model` (already initialised or loaded) and return the inference model.
pub fn train<B: TrainBackend>(
    device: &B::Device,
    mut model: Classifier<B>,
    config: &ModelConfig,
    tc: &TrainConfig,
    data: Labelled<'_>,
    val: Option<Labelled<'_>>,
    observer: &mut dyn TrainObserver<B::InnerBackend>,
) -> Result<Classifier<B::InnerBackend>, StageError> {
    let c = config.num_classes();
    let imgs = data.images;
    let n = imgs.len();
    if n == 0 {
        return Err(StageError::failed("the training set is empty"));
    }
    if data.labels.len() != n {
        return Err(StageError::failed(format!("{} labels for {n} training images", data.labels.len())));
    }
    if let Some(&bad) = data.labels.iter().find(|&&l| l as usize >= c) {
        return Err(StageError::failed(format!("training label {bad} is out of range for {c} classes")));
    }
    let target = config.input();
    let bs = tc.batch_size.max(1);
    let steps_per_epoch = n.div_ceil(bs);
    let total = (steps_per_epoch * tc.epochs).min(tc.max_steps.unwrap_or(usize::MAX)).max(1);
    let warmup = (tc.warmup_epochs * steps_per_epoch as f64).round() as usize;

    // Class-count-derived constants.
    let margins = matches!(config.head, super::head::HeadConfig::ArcFace { .. })
        .then(|| Tensor::<B, 1>::from_data(TensorData::new(adaptive_margins(&config.class_counts, tc.margin_x, tc.margin_y), [c]), device));
    let in_loss_prior = match (config.logit_adjust, &config.loss) {
        (Some(la), _) if la.mode == AdjustMode::Loss => Some(log_prior(&config.class_counts, la.tau)),
        _ => None,
    };
    let balanced_prior = matches!(config.loss, LossConfig::BalancedSoftmax).then(|| log_prior(&config.class_counts, 1.0));
    let as_tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [c]), device);
    let in_loss_prior = in_loss_prior.map(as_tensor);
    let balanced_prior = balanced_prior.map(as_tensor);

    let mut optim = GroupedAdamW::<B, Classifier<B>>::new(&model, tc.weight_decay, tc.layer_decay);
    // Frozen parameters leave the autodiff graph (no gradient computed, so none stepped,
    // and the frozen prefix of the network costs no backward pass at all).
    let frozen: HashSet<ParamId> = if tc.freeze_epochs > 0 { stem_params::<B, _>(&model).into_iter().collect() } else { HashSet::new() };
    if !frozen.is_empty() {
        model = set_require_grad(model, &frozen, false);
    }
    let mut step = 0usize;
    let (h, w, ch) = (target.height, target.width, target.channels);
    let loader = LoaderConfig::from_env();
    let step_pool = StepPool::new()?;

    for epoch in 1..=tc.epochs {
        if step >= total {
            break;
        }
        if epoch == tc.freeze_epochs + 1 && !frozen.is_empty() {
            model = set_require_grad(model, &frozen, true);
        }
        let started = Instant::now();
        let (mut batches, dropped) = batches_of(&epoch_order(n, TRAIN_SALT, tc.seed, epoch), bs);
        batches.truncate(total - step);
        let (mut loss_sum, mut seen, mut correct) = (0.0f64, 0usize, 0usize);
        let mut lr = tc.lr;
        // The model moves through each optimiser step; the slot is refilled before the
        // closure returns, and only an error leaves it empty (and ends the run).
        let mut slot = Some(model);
        let aug = Augmentation { config: &tc.augment, salt: TRAIN_SALT, seed: tc.seed, epoch };
        let pass = run_pass(imgs, &batches, target, Some(aug), loader, |_, batch| -> Result<(), StageError> {
            let Some(m) = slot.take() else { return Err(StageError::failed("the model was lost by a failed step")) };
            let n = batch.indices.len();
            let x = Tensor::<B, 4>::from_data(TensorData::new(batch.nchw, [n, ch, h, w]), device);
            let ys: Vec<u32> = batch.indices.iter().map(|&i| data.labels[i]).collect();
            let y = labels_tensor::<B>(&ys, device);

            // The step itself runs on the run's pool (`step_pool`).
            let work = || -> Result<_, StageError> {
                let mut logits = m.forward_train(x, y.clone(), margins.clone());
                if let Some(p) = &in_loss_prior {
                    logits = add_per_class(logits, p.clone());
                }
                if let Some(p) = &balanced_prior {
                    logits = add_per_class(logits, p.clone());
                }
                let mut eql_update = None;
                if let LossConfig::Eql { tau, eps, indicator } = config.loss {
                    let g = eql_indicator(m.eql_pos.val(), m.eql_neg.val(), indicator, eps).detach();
                    logits = eql_adjust(logits, y.clone(), g, tau, eps);
                    eql_update = Some(eql_increments(logits.clone().detach(), y.clone()));
                }
                let pred = to_f32(logits.clone().detach().argmax(1).float());
                let loss = cross_entropy(logits, y, tc.label_smoothing);
                let loss_value = to_f32(loss.clone().detach()).first().copied().unwrap_or(f32::NAN) as f64;
                if !loss_value.is_finite() {
                    return Err(StageError::failed(format!("the loss became {loss_value} at epoch {epoch}, step {step}: lower lr")));
                }
                let lr = lr_at(step, total, warmup, tc.lr, tc.min_lr);
                let grads = loss.backward();
                let mut m = optim.step(lr, m, grads);
                if let Some((dp, dn)) = eql_update {
                    let (p, n) = (m.eql_pos.val() + dp, m.eql_neg.val() + dn);
                    m = m.set_eql(p, n);
                }
                Ok((m, pred, loss_value, lr))
            };
            let (m, pred, loss_value, step_lr) = step_pool.run(work)?;
            correct += pred.iter().zip(&ys).filter(|(p, y)| **p as u32 == **y).count();
            loss_sum += loss_value * n as f64;
            seen += n;
            lr = step_lr;
            slot = Some(m);
            step += 1;
            observer.step(step, total);
            Ok(())
        });
        pass.map_err(|e| e.into_stage("training set"))?;
        model = slot.ok_or_else(|| StageError::failed("the model was lost by a failed step"))?;
        // The skipped lone sample still counts as a step of the schedule (reshuffled next epoch).
        if dropped && step < total {
            step += 1;
        }
        let inference = model.valid();
        let val_acc = match val {
            Some(v) => Some(accuracy(&inference, config, v, bs)?),
            None => None,
        };
        let seconds = started.elapsed().as_secs_f64();
        let log = EpochLog {
            epoch,
            loss: if seen > 0 { loss_sum / seen as f64 } else { f64::NAN },
            train_acc: if seen > 0 { correct as f64 / seen as f64 } else { 0.0 },
            val_acc,
            lr,
            seconds,
            images_per_sec: seen as f64 / seconds.max(1e-9),
        };
        observer.epoch(&log, &inference)?;
    }
    Ok(model.valid())
}

/// `require_grad` on the parameters in `ids`, leaving their values untouched.
fn set_require_grad<B: TrainBackend>(model: Classifier<B>, ids: &HashSet<ParamId>, require_grad: bool) -> Classifier<B> {
    struct Mark<'a> {
        ids: &'a HashSet<ParamId>,
        require_grad: bool,
    }
    impl<B: Backend> ModuleMapper<B> for Mark<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.ids.contains(&param.id) { param.set_require_grad(self.require_grad) } else { param }
        }
    }
    model.map(&mut Mark { ids, require_grad })
}

/// Top-1 accuracy of an inference model (no TTA; the model's own post-hoc adjustment).
pub fn accuracy<B: KernelBackend>(model: &Classifier<B>, config: &ModelConfig, set: Labelled<'_>, batch_size: usize) -> Result<f64, StageError> {
    let n = set.images.len();
    if n == 0 {
        return Ok(0.0);
    }
    let mut logits = predict_logits(model, config.input(), set.images, batch_size, false)?;
    if let Some(la) = config.logit_adjust
        && la.mode == AdjustMode::PostHoc
    {
        post_hoc_adjust(&mut logits, &log_prior(&config.class_counts, la.tau));
    }
    let c = config.num_classes();
    let ok = logits.chunks(c).zip(set.labels).filter(|(row, y)| super::predictions::argmax(row) == **y as usize).count();
    Ok(ok as f64 / n as f64)
}

/// logits[:, c] -= prior[c] (post-hoc logit adjustment, prior = tau*log p_c).
pub fn post_hoc_adjust(logits: &mut [f32], prior: &[f32]) {
    let c = prior.len().max(1);
    for row in logits.chunks_mut(c) {
        for (v, a) in row.iter_mut().zip(prior) {
            *v -= a;
        }
    }
}

/// Logits [N*C] row-major of an inference model over `images` brought to `target` (the
/// centre crop), streamed through the loader; with `flip_tta` the mean of the logits of
/// each image and its horizontal mirror.
pub fn predict_logits<B: KernelBackend>(model: &Classifier<B>, target: Target, images: &dyn ImageSource, batch_size: usize, flip_tta: bool) -> Result<Vec<f32>, StageError> {
    let device = model_device(model);
    let bs = batch_size.max(1);
    let order: Vec<usize> = (0..images.len()).collect();
    let batches: Vec<Vec<usize>> = order.chunks(bs).map(|c| c.to_vec()).collect();
    let mut out = Vec::with_capacity(images.len());
    let Target { height: h, width: w, channels: c } = target;
    let step_pool = StepPool::new()?;
    let pass = run_pass(images, &batches, target, None, LoaderConfig::from_env(), |_, batch| -> Result<(), StageError> {
        let n = batch.indices.len();
        let x = Tensor::<B, 4>::from_data(TensorData::new(batch.nchw, [n, c, h, w]), &device);
        out.extend(step_pool.run(|| to_f32(batch_logits(model, x, flip_tta))));
        Ok(())
    });
    pass.map_err(|e| e.into_stage("images"))?;
    Ok(out)
}

/// Logits of one batch, with optional flip TTA (flip on the width axis = mirror).
pub fn batch_logits<B: KernelBackend>(model: &Classifier<B>, x: Tensor<B, 4>, flip_tta: bool) -> Tensor<B, 2> {
    if !flip_tta {
        return model.forward(x);
    }
    let mirrored = x.clone().flip([3]);
    (model.forward(x) + model.forward(mirrored)).div_scalar(2.0)
}

fn model_device<B: Backend>(model: &Classifier<B>) -> B::Device {
    model.eql_pos.val().device()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::cnn::CnnConfig;
    use crate::ml::efficientnet::{EfficientNetConfig, LiteVariant};
    use crate::ml::head::HeadConfig;
    use crate::ml::model::{Backbone, BackboneConfig, MODEL_FORMAT};
    use burn::backend::{Autodiff, Flex};

    type AD = Autodiff<Flex>;

    fn config(backbone: BackboneConfig) -> ModelConfig {
        ModelConfig {
            format: MODEL_FORMAT,
            backbone,
            head: HeadConfig::Linear,
            logit_adjust: None,
            loss: LossConfig::Ce,
            classes: (0..3).map(|i| format!("c{i}")).collect(),
            height: 28,
            width: 28,
            channels: 1,
            class_counts: vec![4; 3],
            epoch: 0,
        }
    }

    fn train_config(epochs: usize, freeze_epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 6,
            lr: 1e-2,
            min_lr: 1e-3,
            weight_decay: 0.05,
            layer_decay: 1.0,
            freeze_epochs,
            warmup_epochs: 0.0,
            seed: 3,
            label_smoothing: 0.0,
            margin_x: 0.45,
            margin_y: 0.05,
            augment: AugmentConfig { shift: 0, flip: 0.0, erase: 0.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 },
            max_steps: None,
        }
    }

    /// Every epoch's inference model.
    struct Snapshots(Vec<Classifier<Flex>>);
    impl TrainObserver<Flex> for Snapshots {
        fn epoch(&mut self, _: &EpochLog, model: &Classifier<Flex>) -> Result<(), StageError> {
            self.0.push(model.clone());
            Ok(())
        }
    }

    /// (stem tensors, one tensor after the stem) of a model, as values.
    fn probe(model: &Classifier<Flex>) -> (Vec<Vec<f32>>, Vec<f32>) {
        let v = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
        let v1 = |t: Tensor<Flex, 1>| t.into_data().to_vec::<f32>().unwrap();
        match &model.backbone {
            Backbone::EfficientnetLite(net) => (
                vec![v(net.stem.weight.val()), v1(net.stem.bn.gamma.val()), v(net.blocks[0].depthwise.weight.val()), v(net.blocks[0].project.weight.val())],
                v(net.blocks[1].depthwise.weight.val()),
            ),
            Backbone::Cnn(cnn) => (
                cnn.stages[0].blocks.iter().flat_map(|b| [v(b.conv.weight.val()), v1(b.norm.beta.val())]).collect(),
                v(cnn.stages[1].blocks[0].conv.weight.val()),
            ),
            _ => unreachable!(),
        }
    }

    /// `freeze_epochs: 1` of 2: the stem is bit-identical after epoch 1 while the rest
    /// trains, and changes in epoch 2; with 0 it trains from the start.
    #[test]
    fn freeze_epochs_keep_the_stem_bit_identical_then_train_it() {
        let d = Default::default();
        let pixels: Vec<u8> = (0..12 * 784).map(|i| ((i * 7919) % 251) as u8).collect();
        let labels: Vec<u32> = (0..12).map(|i| i % 3).collect();
        let images = super::super::data::Images::new(12, 28, 28, 1, &pixels).unwrap();
        let data = Labelled { images: &images, labels: &labels };
        for backbone in [
            BackboneConfig::Cnn(CnnConfig { widths: vec![4, 8], blocks: 2 }),
            BackboneConfig::EfficientnetLite(EfficientNetConfig { variant: LiteVariant::Lite0, resolution: 32 }),
        ] {
            let c = config(backbone);
            let initial = probe(&c.init::<AD>(0, &d).valid());
            let mut frozen = Snapshots(Vec::new());
            train::<AD>(&d, c.init::<AD>(0, &d), &c, &train_config(2, 1), data, None, &mut frozen).unwrap();
            let (after1, after2) = (probe(&frozen.0[0]), probe(&frozen.0[1]));
            assert_eq!(after1.0, initial.0, "{:?}: the stem moved while frozen", c.backbone);
            assert_ne!(after1.1, initial.1, "{:?}: the layers after the stem must train", c.backbone);
            for (i, (a, b)) in after2.0.iter().zip(&initial.0).enumerate() {
                assert_ne!(a, b, "{:?}: stem tensor {i} did not train after unfreezing", c.backbone);
            }
            let mut free = Snapshots(Vec::new());
            train::<AD>(&d, c.init::<AD>(0, &d), &c, &train_config(1, 0), data, None, &mut free).unwrap();
            assert_ne!(probe(&free.0[0]).0[0], initial.0[0]);
        }
    }

    /// Layer-wise decay: lr of layer l = lr * d^(L + 1 - l) per block (stem l = 0, head
    /// and `top` L + 1), for EfficientNet (L = 16 blocks) and the CNN (L = its blocks).
    #[test]
    fn layer_decay_follows_the_formula_per_block() {
        use crate::ml::optim::GroupedAdamW;
        let d = Default::default();
        let decay = 0.75f64;
        let c = config(BackboneConfig::EfficientnetLite(EfficientNetConfig { variant: LiteVariant::Lite0, resolution: 32 }));
        let model = c.init::<AD>(0, &d);
        let scales = GroupedAdamW::<AD, _>::new(&model, 0.05, decay).lr_scales();
        let Backbone::EfficientnetLite(net) = &model.backbone else { unreachable!() };
        let l = net.blocks.len();
        assert_eq!(l, 16);
        assert_eq!(scales[&net.stem.weight.id], decay.powi(17));
        assert_eq!(scales[&net.stem.bn.beta.id], decay.powi(17));
        for (i, b) in net.blocks.iter().enumerate() {
            let want = decay.powi((l - i) as i32);
            assert_eq!(scales[&b.depthwise.weight.id], want, "block {i}");
            assert_eq!(scales[&b.project.bn.gamma.id], want, "block {i}");
            if let Some(e) = &b.expand {
                assert_eq!(scales[&e.weight.id], want, "block {i}");
            }
        }
        assert_eq!(scales[&net.top.weight.id], 1.0);

        let c = config(BackboneConfig::Cnn(CnnConfig { widths: vec![4, 8], blocks: 2 }));
        let model = c.init::<AD>(0, &d);
        let scales = GroupedAdamW::<AD, _>::new(&model, 0.05, decay).lr_scales();
        let Backbone::Cnn(cnn) = &model.backbone else { unreachable!() };
        // L = 4 blocks: stage s block b is block 2s + b + 1.
        for (s, stage) in cnn.stages.iter().enumerate() {
            for (b, block) in stage.blocks.iter().enumerate() {
                let want = decay.powi((4 + 1 - (2 * s + b + 1)) as i32);
                assert_eq!(scales[&block.conv.weight.id], want);
                assert_eq!(scales[&block.norm.gamma.id], want);
            }
        }
        assert!(GroupedAdamW::<AD, _>::new(&model, 0.05, 1.0).lr_scales().values().all(|&s| s == 1.0));

        // Swin-V2 tiny, depths [2, 2]: L = 4 blocks; stage 1's patch merging goes with
        // its first block; logit_scale and the position-bias MLP take no weight decay.
        let c = config(BackboneConfig::Swinv2(crate::ml::swinv2::SwinV2Config::preset("tiny").unwrap()));
        let model = c.init::<AD>(0, &d);
        let scales = GroupedAdamW::<AD, _>::new(&model, 0.05, decay).lr_scales();
        let Backbone::Swinv2(net) = &model.backbone else { unreachable!() };
        assert_eq!(scales[&net.patch_embed.proj.weight.id], decay.powi(5));
        for (s, stage) in net.layers.iter().enumerate() {
            for (b, block) in stage.blocks.iter().enumerate() {
                assert_eq!(scales[&block.attn.qkv.weight.id], decay.powi((4 - (2 * s + b)) as i32), "stage {s} block {b}");
            }
        }
        let merge = net.layers[1].downsample.as_ref().expect("stage 1 merges patches");
        assert_eq!(scales[&merge.reduction.weight.id], decay.powi(2));
        assert_eq!(scales[&net.norm.gamma.id], 1.0);
        let (groups, _) = crate::ml::optim::param_groups::<AD, _>(&model);
        let decayed: std::collections::BTreeMap<_, _> = groups.into_iter().map(|(id, k)| (id, k.decayed)).collect();
        let attn = &net.layers[0].blocks[0].attn;
        assert!(decayed[&attn.qkv.weight.id]);
        assert!(!decayed[&attn.logit_scale.id] && !decayed[&attn.cpb_mlp.fc1.weight.id] && !decayed[&attn.cpb_mlp.fc2.weight.id]);
    }
}
