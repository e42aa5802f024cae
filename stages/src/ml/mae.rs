//! Masked-autoencoder pre-training of the ViT (He et al., 2022), as the seed's ViT used:
//! per image a random `mask_ratio` of the patches is hidden; the encoder (the very
//! `Vit` that `train` fine-tunes) sees only the class token and the visible patches; a
//! small decoder gets the encoded visible tokens back in place, a shared learned mask
//! token everywhere else, its own position embeddings, and predicts every patch's
//! pixels; the loss is the mean squared error on the hidden patches only, against
//! pixels normalised per patch (`norm_pix`, MAE's default).
//!
//! Masks are drawn from the run's seeded stream, so a pre-training run is as
//! reproducible as a training run.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::AugmentConfig;
use super::kernels::TrainBackend;
use super::loader::{Augmentation, Concat, ImageSource, LoaderConfig, epoch_order, run_pass};
use super::resize::Target;
use super::kernels::KernelBackend;
use super::linear;
use super::norm::LayerNorm;
use super::optim::GroupedAdamW;
use super::schedule::lr_at;
use super::step_pool::StepPool;
use super::vit::{Attention, Block, Vit, VitConfig};
use burn::module::AutodiffModule;
use fgflow_engine::StageError;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::time::Instant;

/// The decoder's sizes and the masking (stored in the pre-training log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaeConfig {
    pub mask_ratio: f64,
    pub decoder_dim: usize,
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    pub norm_pix: bool,
}

#[derive(Module, Debug)]
pub struct Mae<B: Backend> {
    pub encoder: Vit<B>,
    pub decoder_embed: Linear<B>,
    pub mask_token: Param<Tensor<B, 3>>,
    /// Named like the encoder's so the optimiser exempts it from weight decay.
    pub pos_embed: Param<Tensor<B, 3>>,
    pub decoder_blocks: Vec<Block<B>>,
    pub decoder_norm: LayerNorm<B>,
    pub decoder_pred: Linear<B>,
    #[module(skip)]
    pub patch: usize,
}

impl MaeConfig {
    /// The offending parameter and what is wrong with it.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return Err(("mask_ratio", format!("mask_ratio must be in (0, 1), found {}", self.mask_ratio)));
        }
        for (field, value) in [("decoder_dim", self.decoder_dim), ("decoder_depth", self.decoder_depth), ("decoder_heads", self.decoder_heads)] {
            if value == 0 {
                return Err((field, format!("{field} must be positive")));
            }
        }
        if !self.decoder_dim.is_multiple_of(self.decoder_heads) {
            return Err(("decoder_heads", format!("decoder_dim {} is not divisible by decoder_heads {}", self.decoder_dim, self.decoder_heads)));
        }
        Ok(())
    }

    /// Patches kept visible out of `patches` (at least one, at most all but one).
    pub fn visible(&self, patches: usize) -> usize {
        (((patches as f64) * (1.0 - self.mask_ratio)).round() as usize).clamp(1, patches.saturating_sub(1).max(1))
    }

    /// An MAE around a fresh encoder (zero weights: `init::reinit` draws them).
    pub fn init<B: Backend>(&self, vit: &VitConfig, channels: usize, height: usize, width: usize, device: &B::Device) -> Mae<B> {
        let encoder = vit.init(channels, height, width, device);
        let patches = vit.num_patches(height, width);
        let dd = self.decoder_dim;
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_initializer(Initializer::Zeros).init(device);
        let zeros = |shape: [usize; 3]| Param::initialized(ParamId::new(), Tensor::<B, 3>::zeros(shape, device).require_grad());
        let hidden = ((dd as f64) * vit.mlp_ratio).round().max(1.0) as usize;
        let decoder_blocks = (0..self.decoder_depth)
            .map(|_| Block {
                norm1: LayerNorm::new(dd, 1e-6, device),
                attn: Attention { query: linear(dd, dd), key: linear(dd, dd), value: linear(dd, dd), output: linear(dd, dd), heads: self.decoder_heads },
                norm2: LayerNorm::new(dd, 1e-6, device),
                fc1: linear(dd, hidden),
                fc2: linear(hidden, dd),
            })
            .collect();
        Mae {
            encoder,
            decoder_embed: linear(vit.dim, dd),
            mask_token: zeros([1, 1, dd]),
            pos_embed: zeros([1, patches, dd]),
            decoder_blocks,
            decoder_norm: LayerNorm::new(dd, 1e-6, device),
            decoder_pred: linear(dd, vit.patch * vit.patch * channels),
            patch: vit.patch,
        }
    }
}

/// Which patches each image of a batch keeps: `keep` [n, k] (indices in image order,
/// shuffled), `restore` [n, p] (where each patch sits in [kept..., hidden...]), and
/// `hidden` [n, p] (1.0 where the patch is hidden).
pub struct Masks {
    pub keep: Vec<i64>,
    pub restore: Vec<i64>,
    pub hidden: Vec<f32>,
    pub n: usize,
    pub patches: usize,
    pub visible: usize,
}

impl Masks {
    pub fn draw(n: usize, patches: usize, visible: usize, rng: &mut ChaCha8Rng) -> Masks {
        let (mut keep, mut restore, mut hidden) = (Vec::new(), vec![0i64; n * patches], vec![1f32; n * patches]);
        for i in 0..n {
            let mut order: Vec<usize> = (0..patches).collect();
            order.shuffle(rng);
            for (pos, &patch) in order.iter().enumerate() {
                restore[i * patches + patch] = pos as i64;
                if pos < visible {
                    keep.push(patch as i64);
                    hidden[i * patches + patch] = 0.0;
                }
            }
        }
        Masks { keep, restore, hidden, n, patches, visible }
    }
}

impl<B: KernelBackend> Mae<B> {
    /// Mean squared error on the hidden patches of `x` [N, C, H, W] (pixels as
    /// `data::batch_tensor` maps them).
    pub fn loss(&self, x: Tensor<B, 4>, masks: &Masks, norm_pix: bool) -> Tensor<B, 1> {
        let device = x.device();
        let (n, p, k) = (masks.n, masks.patches, masks.visible);
        let target = patchify(x.clone(), self.patch);
        let (tokens, _, _) = self.encoder.patch_tokens(x);
        let d = tokens.dims()[2];
        let keep = Tensor::<B, 2, Int>::from_data(TensorData::new(masks.keep.clone(), [n, k]), &device);
        let visible = tokens.gather(1, keep.reshape([n, k, 1]).expand([n, k, d]));
        let encoded = self.encoder.encode(Tensor::cat(vec![self.encoder.class_token(n), visible], 1));

        // Decoder: visible tokens back in place, the mask token everywhere else.
        let dd = self.pos_embed.dims()[2];
        let e = linear::forward(&self.decoder_embed, encoded.reshape([n * (k + 1), d])).reshape([n, k + 1, dd]);
        let shuffled = Tensor::cat(vec![e.narrow(1, 1, k), self.mask_token.val().expand([n, p - k, dd])], 1);
        let restore = Tensor::<B, 2, Int>::from_data(TensorData::new(masks.restore.clone(), [n, p]), &device);
        let mut y = (shuffled.gather(1, restore.reshape([n, p, 1]).expand([n, p, dd])) + self.pos_embed.val()).reshape([n * p, dd]);
        for block in &self.decoder_blocks {
            y = block.forward_tokens(y, n, p);
        }
        let pred = linear::forward(&self.decoder_pred, self.decoder_norm.forward(y));

        let [_, _, pixels] = target.dims();
        let mut target = target.reshape([n * p, pixels]);
        if norm_pix {
            let mean = target.clone().mean_dim(1);
            let centred = target - mean;
            let var = centred.clone().square().mean_dim(1);
            target = centred / var.add_scalar(1e-6).sqrt();
        }
        let per_patch = (pred - target).square().mean_dim(1).reshape([n * p]);
        let hidden = Tensor::<B, 1>::from_data(TensorData::new(masks.hidden.clone(), [n * p]), &device);
        (per_patch * hidden).sum().div_scalar((n * (p - k)).max(1) as f64)
    }
}

/// The optimisation settings of a pre-training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub seed: u64,
    pub augment: AugmentConfig,
}

/// One epoch of pre-training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainEpoch {
    pub epoch: usize,
    /// Mean reconstruction loss on the hidden patches.
    pub loss: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
}

/// The loader's salt of pre-training (order and augmentation streams).
const MAE_SALT: u64 = 0x5eed_da7a_0000_0002;

/// Pre-train `mae` on every image of `sets` (one shuffled pool); returns the inference
/// model. `on_step(step, total)` and `on_epoch` report progress.
pub fn pretrain<B: TrainBackend>(
    device: &B::Device,
    mut mae: Mae<B>,
    config: &MaeConfig,
    tc: &PretrainConfig,
    target: Target,
    sets: &[&dyn ImageSource],
    on_step: &mut dyn FnMut(usize, usize),
    on_epoch: &mut dyn FnMut(&PretrainEpoch) -> Result<(), StageError>,
) -> Result<Mae<B::InnerBackend>, StageError> {
    let pool = Concat::new(sets);
    if pool.is_empty() {
        return Err(StageError::failed("no images to pre-train on"));
    }
    let (h, w, ch) = (target.height, target.width, target.channels);
    let patches = (h / mae.patch) * (w / mae.patch);
    let visible = config.visible(patches);
    if patches < 2 {
        return Err(StageError::failed(format!("{h}x{w} images have {patches} patch of {}: nothing to mask", mae.patch)));
    }
    let bs = tc.batch_size.max(1);
    let steps_per_epoch = pool.len().div_ceil(bs);
    let total = steps_per_epoch * tc.epochs;
    let warmup = (tc.warmup_epochs * steps_per_epoch as f64).round() as usize;
    let mut optim = GroupedAdamW::<B, Mae<B>>::new(&mae, tc.weight_decay, 1.0);
    // The masks come from their own stream, drawn in batch order on this thread.
    let mut mask_rng = ChaCha8Rng::seed_from_u64(tc.seed ^ 0x5eed_da7a_0000_0003);
    let mut step = 0usize;
    let loader = LoaderConfig::from_env();
    let step_pool = StepPool::new()?;
    for epoch in 1..=tc.epochs {
        let started = Instant::now();
        let batches: Vec<Vec<usize>> = epoch_order(pool.len(), MAE_SALT, tc.seed, epoch).chunks(bs).map(|c| c.to_vec()).collect();
        let (mut loss_sum, mut seen, mut lr) = (0.0f64, 0usize, tc.lr);
        let mut slot = Some(mae);
        let aug = Augmentation { config: &tc.augment, salt: MAE_SALT, seed: tc.seed, epoch };
        let pass = run_pass(&pool, &batches, target, Some(aug), loader, |_, batch| -> Result<(), StageError> {
            let Some(m) = slot.take() else { return Err(StageError::failed("the model was lost by a failed step")) };
            let n = batch.indices.len();
            let x = Tensor::<B, 4>::from_data(TensorData::new(batch.nchw, [n, ch, h, w]), device);
            let masks = Masks::draw(n, patches, visible, &mut mask_rng);
            let work = || -> Result<_, StageError> {
                let loss = m.loss(x, &masks, config.norm_pix);
                let value = loss.clone().detach().into_data().convert::<f64>().to_vec::<f64>().ok().and_then(|v| v.first().copied()).unwrap_or(f64::NAN);
                if !value.is_finite() {
                    return Err(StageError::failed(format!("the reconstruction loss became {value} at epoch {epoch}, step {step}: lower lr")));
                }
                let lr = lr_at(step, total, warmup, tc.lr, tc.min_lr);
                Ok((optim.step(lr, m, loss.backward()), value, lr))
            };
            let (m, value, step_lr) = step_pool.run(work)?;
            loss_sum += value * n as f64;
            seen += n;
            lr = step_lr;
            slot = Some(m);
            step += 1;
            on_step(step, total);
            Ok(())
        });
        pass.map_err(|e| e.into_stage("pre-training images"))?;
        mae = slot.ok_or_else(|| StageError::failed("the model was lost by a failed step"))?;
        let seconds = started.elapsed().as_secs_f64();
        on_epoch(&PretrainEpoch { epoch, loss: loss_sum / seen.max(1) as f64, lr, seconds, images_per_sec: seen as f64 / seconds.max(1e-9) })?;
    }
    Ok(mae.valid())
}

/// [N, C, H, W] -> [N, P, patch * patch * C] in the patch embedding's order (row-major
/// patches; pixels row-major, channels last), ignoring a remainder the conv ignores too.
pub fn patchify<B: Backend>(x: Tensor<B, 4>, patch: usize) -> Tensor<B, 3> {
    let [n, c, h, w] = x.dims();
    let (gh, gw) = (h / patch, w / patch);
    let x = x.narrow(2, 0, gh * patch).narrow(3, 0, gw * patch);
    x.reshape([n, c, gh, patch, gw, patch]).permute([0, 2, 4, 3, 5, 1]).reshape([n, gh * gw, patch * patch * c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn masks_keep_the_right_count_and_restore_inverts_the_shuffle() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = Masks::draw(4, 16, 4, &mut rng);
        assert_eq!(m.keep.len(), 16);
        for i in 0..4 {
            let hidden: f32 = m.hidden[i * 16..(i + 1) * 16].iter().sum();
            assert_eq!(hidden, 12.0);
            for (j, &patch) in m.keep[i * 4..(i + 1) * 4].iter().enumerate() {
                // A kept patch sits at its shuffled position j.
                assert_eq!(m.restore[i * 16 + patch as usize], j as i64);
                assert_eq!(m.hidden[i * 16 + patch as usize], 0.0);
            }
        }
    }

    #[test]
    fn patchify_matches_the_pixel_layout() {
        let d = Default::default();
        // One 1x4x4 image with pixel value = its index: patch 2 gives 4 patches.
        let x = Tensor::<Flex, 4>::from_data(TensorData::new((0..16).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 4, 4]), &d);
        let p = patchify(x, 2).into_data().to_vec::<f32>().unwrap();
        assert_eq!(p, vec![0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]);
    }
}
