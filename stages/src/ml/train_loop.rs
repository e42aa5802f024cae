//! The plain training loop (no burn-train `Learner`: custom losses, EQL statistics and
//! per-epoch checkpoints are simpler written out) and batched inference with flip TTA.
//!
//! One optimiser step per batch: augment on the CPU, forward with training logits
//! (ArcFace margins), apply the loss-side adjustments (in-loss logit adjustment,
//! balanced softmax, EQL), cross-entropy, backward, grouped AdamW at the scheduled
//! learning rate, then fold the batch's EQL increments into the model's buffers.
//! Randomness (shuffle, augmentation) comes from a ChaCha stream seeded by the run, and
//! weights are initialised from the seed (`init`), so a seed fixes a run on a backend.

use crate::ml::conv::{ConvBackend, TrainBackend};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use fgflow_engine::StageError;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::AugmentConfig;
use super::data::{Images, batch_tensor};
use super::head::{adaptive_margins, log_prior};
use super::loss::{LossConfig, add_per_class, cross_entropy, eql_adjust, eql_increments, eql_indicator};
use super::model::{AdjustMode, Classifier, ModelConfig};
use super::optim::GroupedAdamW;
use super::schedule::lr_at;

/// Everything about a run that is not the model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    /// ViT layer-wise learning-rate decay (1.0 = off; see `optim`).
    #[serde(default = "no_layer_decay")]
    pub layer_decay: f64,
    pub warmup_epochs: f64,
    pub seed: u64,
    pub label_smoothing: f64,
    /// ArcFace adaptive-margin parameters (m_x, m_y).
    pub margin_x: f64,
    pub margin_y: f64,
    pub augment: AugmentConfig,
}

fn no_layer_decay() -> f64 {
    1.0
}

/// Images with one label each.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    pub images: Images<'a>,
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
    if imgs.n == 0 {
        return Err(StageError::failed("the training set is empty"));
    }
    if data.labels.len() != imgs.n {
        return Err(StageError::failed(format!("{} labels for {} training images", data.labels.len(), imgs.n)));
    }
    if let Some(&bad) = data.labels.iter().find(|&&l| l as usize >= c) {
        return Err(StageError::failed(format!("training label {bad} is out of range for {c} classes")));
    }
    if (imgs.height, imgs.width, imgs.channels) != (config.height, config.width, config.channels) {
        return Err(StageError::failed(format!(
            "training images are {}x{}x{}, the model expects {}x{}x{}",
            imgs.height, imgs.width, imgs.channels, config.height, config.width, config.channels
        )));
    }
    let bs = tc.batch_size.max(1);
    let steps_per_epoch = imgs.n.div_ceil(bs);
    let total = steps_per_epoch * tc.epochs;
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
    // A separate stream from the weight initialisation's (which uses `seed` itself).
    let mut rng = ChaCha8Rng::seed_from_u64(tc.seed ^ 0x5eed_da7a_0000_0001);
    let mut order: Vec<usize> = (0..imgs.n).collect();
    let mut step = 0usize;
    let (h, w, ch) = (imgs.height, imgs.width, imgs.channels);

    for epoch in 1..=tc.epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen, mut correct) = (0.0f64, 0usize, 0usize);
        let mut lr = tc.lr;
        for chunk in order.chunks(bs) {
            // A lone sample gives BatchNorm a zero variance; skip it (it is reshuffled next epoch).
            if chunk.len() < 2 && imgs.n >= 2 {
                step += 1;
                continue;
            }
            let augmented: Vec<Vec<u8>> = chunk.iter().map(|&i| tc.augment.apply(imgs.image(i), h, w, ch, &mut rng)).collect();
            let refs: Vec<&[u8]> = augmented.iter().map(|v| v.as_slice()).collect();
            let x = batch_tensor::<B>(&refs, h, w, ch, device);
            let ys: Vec<u32> = chunk.iter().map(|&i| data.labels[i]).collect();
            let y = labels_tensor::<B>(&ys, device);

            let mut logits = model.forward_train(x, y.clone(), margins.clone());
            if let Some(p) = &in_loss_prior {
                logits = add_per_class(logits, p.clone());
            }
            if let Some(p) = &balanced_prior {
                logits = add_per_class(logits, p.clone());
            }
            let mut eql_update = None;
            if let LossConfig::Eql { tau, eps, indicator } = config.loss {
                let g = eql_indicator(model.eql_pos.val(), model.eql_neg.val(), indicator, eps).detach();
                logits = eql_adjust(logits, y.clone(), g, tau, eps);
                eql_update = Some(eql_increments(logits.clone().detach(), y.clone()));
            }
            let pred = to_f32(logits.clone().detach().argmax(1).float());
            correct += pred.iter().zip(&ys).filter(|(p, y)| **p as u32 == **y).count();
            let loss = cross_entropy(logits, y, tc.label_smoothing);
            let loss_value = to_f32(loss.clone().detach()).first().copied().unwrap_or(f32::NAN) as f64;
            if !loss_value.is_finite() {
                return Err(StageError::failed(format!("the loss became {loss_value} at epoch {epoch}, step {step}: lower lr")));
            }
            loss_sum += loss_value * chunk.len() as f64;
            seen += chunk.len();

            lr = lr_at(step, total, warmup, tc.lr, tc.min_lr);
            let grads = loss.backward();
            model = optim.step(lr, model, grads);
            if let Some((dp, dn)) = eql_update {
                let (p, n) = (model.eql_pos.val() + dp, model.eql_neg.val() + dn);
                model = model.set_eql(p, n);
            }
            step += 1;
            observer.step(step, total);
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

/// Top-1 accuracy of an inference model (no TTA; the model's own post-hoc adjustment).
pub fn accuracy<B: ConvBackend>(model: &Classifier<B>, config: &ModelConfig, set: Labelled<'_>, batch_size: usize) -> Result<f64, StageError> {
    if set.images.n == 0 {
        return Ok(0.0);
    }
    let mut logits = predict_logits(model, set.images, batch_size, false)?;
    if let Some(la) = config.logit_adjust
        && la.mode == AdjustMode::PostHoc
    {
        post_hoc_adjust(&mut logits, &log_prior(&config.class_counts, la.tau));
    }
    let c = config.num_classes();
    let ok = logits.chunks(c).zip(set.labels).filter(|(row, y)| super::predictions::argmax(row) == **y as usize).count();
    Ok(ok as f64 / set.images.n as f64)
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

/// Logits [N*C] row-major of an inference model; with `flip_tta` the mean of the
/// logits of each image and its horizontal mirror.
pub fn predict_logits<B: ConvBackend>(model: &Classifier<B>, images: Images<'_>, batch_size: usize, flip_tta: bool) -> Result<Vec<f32>, StageError> {
    let device = model_device(model);
    let (h, w, c) = (images.height, images.width, images.channels);
    let mut out = Vec::new();
    let bs = batch_size.max(1);
    for start in (0..images.n).step_by(bs) {
        let end = (start + bs).min(images.n);
        let refs: Vec<&[u8]> = (start..end).map(|i| images.image(i)).collect();
        let x = batch_tensor::<B>(&refs, h, w, c, &device);
        out.extend(to_f32(batch_logits(model, x, flip_tta)));
    }
    Ok(out)
}

/// Logits of one batch, with optional flip TTA (flip on the width axis = mirror).
pub fn batch_logits<B: ConvBackend>(model: &Classifier<B>, x: Tensor<B, 4>, flip_tta: bool) -> Tensor<B, 2> {
    if !flip_tta {
        return model.forward(x);
    }
    let mirrored = x.clone().flip([3]);
    (model.forward(x) + model.forward(mirrored)).div_scalar(2.0)
}

fn model_device<B: Backend>(model: &Classifier<B>) -> B::Device {
    model.eql_pos.val().device()
}
