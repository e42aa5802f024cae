//! A small Vision Transformer backbone: patch embedding (a strided conv), a class
//! token, learned position embeddings, pre-norm transformer blocks (multi-head
//! self-attention and a GELU MLP), a final LayerNorm; the feature is the mean of the
//! patch tokens (the winning ViT's pooling) or the class token (`VitPool`).
//! Sized for 28x28 inputs: patch 4, dim 128, depth 4, 4 heads, MLP ratio 2 is about
//! 0.55M parameters.
//!
//! The parameter names `cls_token` and `pos_embed` matter: the optimiser exempts them
//! from weight decay by name (see `optim`).

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::norm::LayerNorm;

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
            pool: self.pool,
        }
    }
}

/// Multi-head self-attention on tokens kept as a [N * T, dim] matrix: the projections
/// are plain 2-D matmuls with a row bias, the softmax runs on [N * H * T, T] rows (2-D
/// broadcasts only, see `norm`), and only the per-head reshuffles are 4-D. The fields
/// carry the names of burn's `MultiHeadAttention`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub output: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> Attention<B> {
    /// x [n * t, dim] -> [n * t, dim].
    pub fn forward(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        let [_, d] = x.dims();
        let (h, dh) = (self.heads, d / self.heads);
        let split = |m: Tensor<B, 2>| m.reshape([n, t, h, dh]).swap_dims(1, 2); // [n, h, t, dh]
        let q = split(self.query.forward(x.clone()).mul_scalar(1.0 / (dh as f64).sqrt()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let scores = q.matmul(k.swap_dims(2, 3)).reshape([n * h * t, t]);
        let weights = softmax_rows(scores).reshape([n, h, t, t]);
        let context = weights.matmul(v).swap_dims(1, 2).reshape([n * t, d]);
        self.output.forward(context)
    }
}

/// Softmax of every row of a matrix (max-subtracted).
fn softmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let shifted = x.clone() - x.detach().max_dim(1);
    let e = shifted.exp();
    e.clone() / e.sum_dim(1)
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Block<B> {
    /// x [n * t, dim] -> [n * t, dim].
    fn forward(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        let a = self.attn.forward(self.norm1.forward(x.clone()), n, t);
        let x = x + a;
        let m = self.fc2.forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
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
    /// Not a weight: rebuilt from the model config when a model is loaded.
    #[module(skip)]
    pub pool: VitPool,
}

impl<B: Backend> Block<B> {
    /// Public entry for other token models (the MAE decoder): x [n * t, dim].
    pub fn forward_tokens(&self, x: Tensor<B, 2>, n: usize, t: usize) -> Tensor<B, 2> {
        self.forward(x, n, t)
    }
}

impl<B: Backend> Vit<B> {
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
        let mut x = tokens.reshape([n * t, d]);
        for block in &self.blocks {
            x = block.forward(x, n, t);
        }
        self.norm.forward(x).reshape([n, t, d])
    }

    /// [N, C, H, W] -> [N, dim]: the mean of the patch tokens or the class token, after
    /// the final norm.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let (tokens, h, w) = self.patch_tokens(x);
        let [n, _, d] = tokens.dims();
        let x = self.encode(Tensor::cat(vec![self.class_token(n), tokens], 1));
        match self.pool {
            VitPool::Mean => x.narrow(1, 1, h * w).mean_dim(1).reshape([n, d]),
            VitPool::Cls => x.narrow(1, 0, 1).reshape([n, d]),
        }
    }
}
