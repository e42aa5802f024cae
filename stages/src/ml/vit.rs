//! A small Vision Transformer backbone: patch embedding (a strided conv), a class
//! token, learned position embeddings, pre-norm transformer blocks (multi-head
//! self-attention and a GELU MLP), a final LayerNorm; the class token is the feature.
//! Sized for 28x28 inputs: patch 4, dim 128, depth 4, 4 heads, MLP ratio 2 is about
//! 0.55M parameters.
//!
//! The parameter names `cls_token` and `pos_embed` matter: the optimiser exempts them
//! from weight decay by name (see `optim`).

use burn::module::{Module, Param, ParamId};
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// Sizes of the ViT (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
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
        let ln = || LayerNormConfig::new(self.dim).with_epsilon(1e-6).init(device);
        let blocks = (0..self.depth)
            .map(|_| Block {
                norm1: ln(),
                attn: MultiHeadAttentionConfig::new(self.dim, self.heads)
                    .with_dropout(0.0)
                    .with_initializer(Initializer::Zeros)
                    .init(device),
                norm2: ln(),
                fc1: LinearConfig::new(self.dim, hidden).with_initializer(Initializer::Zeros).init(device),
                fc2: LinearConfig::new(hidden, self.dim).with_initializer(Initializer::Zeros).init(device),
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
        }
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: MultiHeadAttention<B>,
    pub norm2: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Block<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = self.attn.forward(MhaInput::self_attn(self.norm1.forward(x.clone()))).context;
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
}

impl<B: Backend> Vit<B> {
    /// [N, C, H, W] -> [N, dim] (the class token after the final norm).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let p = self.patch_embed.forward(x); // [N, dim, h', w']
        let [n, d, h, w] = p.dims();
        let tokens = p.reshape([n, d, h * w]).swap_dims(1, 2); // [N, h'w', dim]
        let cls = self.cls_token.val().expand([n, 1, d]);
        let mut x = Tensor::cat(vec![cls, tokens], 1) + self.pos_embed.val();
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = self.norm.forward(x);
        x.narrow(1, 0, 1).reshape([n, d])
    }
}
