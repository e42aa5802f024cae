//! A small Vision Transformer backbone: patch embedding (a strided conv), a class
//! token, learned position embeddings, pre-norm transformer blocks (multi-head
//! self-attention and a GELU MLP), a final LayerNorm; the feature is the mean of the
//! patch tokens (the winning ViT's pooling) or the class token (`VitPool`).
//! Sized for 28x28 inputs: patch 4, dim 128, depth 4, 4 heads, MLP ratio 2 is about
//! 0.55M parameters.
//!
//! The parameter names `cls_token` and `pos_embed` matter: the optimiser exempts them
//! from weight decay by name (see `optim`).
//!
//! timm's `VisionTransformer` checkpoints (`vit_base_patch16_224.mae`, ...) load into
//! it: the math is timm's (pre-norm blocks, q scaled by dh^-1/2, exact GELU, LayerNorm
//! eps 1e-6, `pos_embed` with the class position; `VitPool::Cls` is timm's `token`
//! pooling and `VitPool::Avg` its `avg` with `fc_norm`), and [`adapt_checkpoint`] turns
//! timm's layout into this module's and resamples `pos_embed` to another patch grid as
//! timm does (stages/tests/timm_parity.rs: logits within 1e-4 of timm's). The layout
//! stays burn's (separate q/k/v, [in, out] weights) so models and MAE checkpoints
//! written before keep loading.

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use super::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::attention::{Heads, attention};
use super::kernels::KernelBackend;
use super::linear;
use super::norm::LayerNorm;
use super::tokens::{self, Tokens};
use super::pretrained::{FileTensor, FileTensors};

/// Sizes of the ViT (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    /// Model files written before pooling was a choice used the class token.
    #[serde(default = "VitPool::class_token")]
    pub pool: VitPool,
}

/// Which token(s) become the feature vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VitPool {
    /// Mean of the patch tokens after the final LayerNorm (the class token left out).
    Mean,
    /// The class token after the final LayerNorm.
    Cls,
    /// timm's `global_pool='avg'` (MAE fine-tuning): the mean of the patch tokens
    /// straight from the blocks, then its own LayerNorm `fc_norm` (the final `norm` is
    /// left unused, as timm replaces it by an identity).
    Avg,
}

impl VitPool {
    fn class_token() -> Self {
        VitPool::Cls
    }
}

impl VitConfig {
    pub fn feature_dim(&self) -> usize {
        self.dim
    }

    pub fn check(&self, height: usize, width: usize) -> Result<(), String> {
        if self.patch == 0 || self.dim == 0 || self.depth == 0 || self.heads == 0 {
            return Err("vit patch, dim, depth and heads must be positive".into());
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(format!("vit dim {} must be divisible by heads {}", self.dim, self.heads));
        }
        if height < self.patch || width < self.patch {
            return Err(format!("vit patch {} is larger than the {height}x{width} images", self.patch));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err("vit mlp_ratio must be positive".into());
        }
        Ok(())
    }

    /// Tokens per image (patches that fit; a remainder strip is dropped by the conv).
    pub fn num_patches(&self, height: usize, width: usize) -> usize {
        (height / self.patch) * (width / self.patch)
    }

    pub fn init<B: Backend>(&self, in_channels: usize, height: usize, width: usize, device: &B::Device) -> Vit<B> {
        let hidden = ((self.dim as f64) * self.mlp_ratio).round().max(1.0) as usize;
        let ln = || LayerNorm::new(self.dim, 1e-6, device);
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_initializer(Initializer::Zeros).init(device);
        let blocks = (0..self.depth)
            .map(|_| Block {
                norm1: ln(),
                attn: Attention {
                    query: linear(self.dim, self.dim),
                    key: linear(self.dim, self.dim),
                    value: linear(self.dim, self.dim),
                    output: linear(self.dim, self.dim),
                    heads: self.heads,
                },
                norm2: ln(),
                fc1: linear(self.dim, hidden),
                fc2: linear(hidden, self.dim),
            })
            .collect();
        let tokens = self.num_patches(height, width) + 1;
        let zeros = |shape: [usize; 3]| Param::initialized(ParamId::new(), Tensor::<B, 3>::zeros(shape, device).require_grad());
        Vit {
            patch_embed: Conv2dConfig::new([in_channels, self.dim], [self.patch, self.patch])
                .with_stride([self.patch, self.patch])
                .with_initializer(Initializer::Zeros)
                .init(device),
            cls_token: zeros([1, 1, self.dim]),
            pos_embed: zeros([1, tokens, self.dim]),
            blocks,
            norm: ln(),
            fc_norm: (self.pool == VitPool::Avg).then(ln),
            pool: self.pool,
        }
    }
}

/// Multi-head self-attention on tokens kept as a [N * T, dim] matrix: the projections
/// are plain 2-D matmuls with a row bias, the heads one op over q, k and v as the
/// projections give them ([`attention`]). The fields carry the names of burn's
/// `MultiHeadAttention`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub output: Linear<B>,
    pub heads: usize,
}

impl<B: KernelBackend> Attention<B> {
    /// x [n * t, dim] -> [n * t, dim].
    pub fn forward(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        let [_, d] = x.dims();
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let (q, k, v) = (linear::forward(&self.query, x.clone()), linear::forward(&self.key, x.clone()), linear::forward(&self.value, x));
        linear::forward(&self.output, attention(q, k, v, Heads { n, t, heads: self.heads }, scale))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: KernelBackend> Block<B> {
    /// x [n * t, dim] -> [n * t, dim].
    fn forward(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        let a = self.attn.forward(self.norm1.forward(x.clone()), n, t);
        let x = x + a;
        let m = linear::forward(&self.fc2, gelu(linear::forward(&self.fc1, self.norm2.forward(x.clone()))));
        x + m
    }
}

#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    pub patch_embed: Conv2d<B>,
    pub cls_token: Param<Tensor<B, 3>>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    /// Only with `VitPool::Avg`.
    pub fc_norm: Option<LayerNorm<B>>,
    /// Not a weight: rebuilt from the model config when a model is loaded.
    #[module(skip)]
    pub pool: VitPool,
}

impl<B: KernelBackend> Block<B> {
    /// Public entry for other token models (the MAE decoder): x [n * t, dim].
    pub fn forward_tokens(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        self.forward(x, n, t)
    }
}

impl<B: KernelBackend> Vit<B> {
    /// [N, C, H, W] -> patch tokens with their position embeddings [N, P, dim] and the
    /// patch grid (h', w').
    pub fn patch_tokens(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, usize, usize) {
        let p = self.patch_embed.forward(x); // [N, dim, h', w']
        let [n, d, h, w] = p.dims();
        let tokens = p.reshape([n, d, h * w]).swap_dims(1, 2); // [N, h'w', dim]
        (tokens + self.pos_embed.val().narrow(1, 1, h * w), h, w)
    }

    /// The class token with its position embedding, for a batch of `n`: [n, 1, dim].
    pub fn class_token(&self, n: usize) -> Tensor<B, 3> {
        let d = self.pos_embed.dims()[2];
        (self.cls_token.val() + self.pos_embed.val().narrow(1, 0, 1)).expand([n, 1, d])
    }

    /// Transformer blocks and the final norm over any token sequence [N, T, dim] (the
    /// class token first): [N, T, dim].
    pub fn encode(&self, tokens: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, t, d] = tokens.dims();
        self.norm.forward(self.run_blocks(tokens)).reshape([n, t, d])
    }

    /// The transformer blocks alone: [N, T, dim] -> [N * T, dim].
    fn run_blocks(&self, tokens: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, t, d] = tokens.dims();
        let mut x = tokens.reshape([n * t, d]);
        for block in &self.blocks {
            x = block.forward(x, n, t);
        }
        x
    }

    /// [N, C, H, W] -> [N, dim]: the mean of the patch tokens or the class token, after
    /// the final norm.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let p = self.patch_embed.forward(x); // [N, dim, h', w']
        let [n, d, h, w] = p.dims();
        let shape = Tokens { n, p: h * w, d };
        // The token rows [N * (1 + h'w'), dim] in one op (`tokens`): what `patch_tokens`
        // and `class_token` compute, concatenated.
        let mut x = tokens::embed(p.reshape([n, d, h * w]), self.cls_token.val(), self.pos_embed.val().narrow(1, 0, shape.t()));
        for block in &self.blocks {
            x = block.forward(x, n, shape.t());
        }
        if let (VitPool::Avg, Some(fc_norm)) = (self.pool, &self.fc_norm) {
            return fc_norm.forward(tokens::mean(x, shape));
        }
        let x = self.norm.forward(x);
        match self.pool {
            VitPool::Mean | VitPool::Avg => tokens::mean(x, shape),
            VitPool::Cls => x.reshape([n, shape.t(), d]).narrow(1, 0, 1).reshape([n, d]),
        }
    }
}

/// Whether a weights file is in timm's ViT layout (a fused `attn.qkv`), not this
/// module's (which `pretrain` writes).
pub fn is_timm_layout(file: &FileTensors) -> bool {
    file.keys().any(|k| k.ends_with(".attn.qkv.weight"))
}

/// A checkpoint made fit for `vit`: timm's layout converted to this module's (see
/// [`from_timm`]), an RGB patch embedding summed to one channel for gray images, and
/// `pos_embed` resampled to the model's patch grid when the file's
/// grid differs (timm's `resample_abs_pos_embed`, square grids, the class position
/// kept as it is).
pub fn adapt_checkpoint<B: Backend>(file: FileTensors, vit: &Vit<B>) -> Result<FileTensors, String> {
    let mut file = if is_timm_layout(&file) { from_timm(file) } else { file };
    // An RGB checkpoint on gray images: the kernel summed over its input channels, as
    // timm's `adapt_input_conv` does for in_chans=1.
    let [_, cin, _, _] = vit.patch_embed.weight.dims();
    if let Some(FileTensor { shape, values: Ok(values) }) = file.get("patch_embed.weight")
        && cin == 1
        && shape.len() == 4
        && shape[1] == 3
    {
        let plane = shape[2] * shape[3];
        let summed = values.chunks_exact(3 * plane).flat_map(|k| (0..plane).map(move |i| k[i] + k[plane + i] + k[2 * plane + i])).collect();
        let shape = vec![shape[0], 1, shape[2], shape[3]];
        file.insert("patch_embed.weight".into(), FileTensor { shape, values: Ok(summed) });
    }
    let [_, tokens, dim] = vit.pos_embed.dims();
    if let Some(FileTensor { shape, values: Ok(values) }) = file.get("pos_embed")
        && shape.len() == 3
        && shape[2] == dim
        && shape[1] != tokens
    {
        let side = |t: usize| (1..=t).find(|s| s * s + 1 >= t).filter(|s| s * s + 1 == t);
        let (Some(from), Some(to)) = (side(shape[1]), side(tokens)) else {
            return Err(format!("tensor `pos_embed` has {} positions in the file and the model needs {tokens}: only square patch grids are resampled", shape[1]));
        };
        let resampled = resample_pos_embed(values, dim, from, to);
        file.insert("pos_embed".into(), FileTensor { shape: vec![1, tokens, dim], values: Ok(resampled) });
    }
    Ok(file)
}

/// timm's ViT names and layouts as this module's: `patch_embed.proj` -> `patch_embed`;
/// LayerNorm `weight`/`bias` -> `gamma`/`beta`; the fused `attn.qkv` split into
/// `query`/`key`/`value` and `attn.proj` -> `attn.output`; `mlp.fc1`/`mlp.fc2` ->
/// `fc1`/`fc2`; torch's [out, in] linear weights transposed to burn's [in, out]. Other
/// tensors (the classifier `head`) keep their names and go unused.
pub fn from_timm(file: FileTensors) -> FileTensors {
    let mut out = FileTensors::new();
    for (name, t) in file {
        let norm = |stem: &str, leaf: &str| format!("{stem}.{}", if leaf == "weight" { "gamma" } else { "beta" });
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            ["patch_embed", "proj", leaf] => {
                out.insert(format!("patch_embed.{leaf}"), t);
            }
            [stem @ ("norm" | "fc_norm"), leaf @ ("weight" | "bias")] => {
                out.insert(norm(stem, leaf), t);
            }
            ["blocks", i, n @ ("norm1" | "norm2"), leaf @ ("weight" | "bias")] => {
                out.insert(norm(&format!("blocks.{i}.{n}"), leaf), t);
            }
            ["blocks", i, "attn", "qkv", leaf] => {
                let d = t.shape[0] / 3;
                for (k, part) in ["query", "key", "value"].iter().enumerate() {
                    let slice = rows(&t, k * d, d);
                    let slice = if *leaf == "weight" { transpose(slice) } else { slice };
                    out.insert(format!("blocks.{i}.attn.{part}.{leaf}"), slice);
                }
            }
            ["blocks", i, layer @ ("attn" | "mlp"), linear @ ("proj" | "fc1" | "fc2"), leaf] => {
                let target = match (*layer, *linear) {
                    ("attn", "proj") => format!("blocks.{i}.attn.output.{leaf}"),
                    _ => format!("blocks.{i}.{linear}.{leaf}"),
                };
                out.insert(target, if *leaf == "weight" { transpose(t) } else { t });
            }
            _ => {
                out.insert(name, t);
            }
        }
    }
    out
}

/// Rows `start..start + len` of a tensor (along its first dimension).
fn rows(t: &FileTensor, start: usize, len: usize) -> FileTensor {
    let mut shape = t.shape.clone();
    let inner: usize = shape.iter().skip(1).product();
    shape[0] = len;
    let values = t.values.as_ref().map(|v| v[start * inner..(start + len) * inner].to_vec()).map_err(|d| d.clone());
    FileTensor { shape, values }
}

/// A matrix transposed (any other rank is left as it is: the loader reports its shape).
fn transpose(t: FileTensor) -> FileTensor {
    let [r, c] = t.shape[..] else { return t };
    let values = t.values.map(|v| (0..c * r).map(|k| v[(k % r) * c + k / r]).collect());
    FileTensor { shape: vec![c, r], values }
}

/// `pos_embed` [1, 1 + from^2, dim] -> [1, 1 + to^2, dim]: the class position kept, the
/// patch grid resized as torch's `F.interpolate(mode='bicubic', antialias=True,
/// align_corners=False)` does (what timm's `resample_abs_pos_embed` calls): separable
/// Keys cubic with a = -0.5, widened by the scale when shrinking, weights normalised.
pub fn resample_pos_embed(values: &[f32], dim: usize, from: usize, to: usize) -> Vec<f32> {
    let weights = antialiased_cubic_weights(from, to);
    let grid = &values[dim..];
    // Along the width first, then the height (torch's order).
    let mut wide = vec![0f32; from * to * dim];
    for y in 0..from {
        for (x, (start, ws)) in weights.iter().enumerate() {
            for (j, w) in ws.iter().enumerate() {
                let src = &grid[(y * from + start + j) * dim..][..dim];
                let dst = &mut wide[(y * to + x) * dim..][..dim];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += w * s);
            }
        }
    }
    let mut out = values[..dim].to_vec();
    out.resize(dim + to * to * dim, 0.0);
    for (y, (start, ws)) in weights.iter().enumerate() {
        for x in 0..to {
            for (j, w) in ws.iter().enumerate() {
                let src = &wide[((start + j) * to + x) * dim..][..dim];
                let dst = &mut out[dim + (y * to + x) * dim..][..dim];
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += w * s);
            }
        }
    }
    out
}

/// Per output index: the first input index and the normalised weights from there
/// (aten's `_compute_index_ranges_weights` for antialiased bicubic).
fn antialiased_cubic_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let cubic = |x: f64| {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let (support, inv) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // Truncation toward zero, as the C++ casts do.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let ws: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) * inv)).collect();
            let total: f64 = ws.iter().sum();
            (lo, ws.iter().map(|w| (w / total) as f32).collect())
        })
        .collect()
}
