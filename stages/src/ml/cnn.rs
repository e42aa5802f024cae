//! The small CNN backbone: stages of (3x3 conv, BatchNorm, ReLU) blocks, 2x2 max-pool
//! between stages, global average pool at the end. BatchNorm is `norm::BatchNorm2d`
//! (burn's is slow on the CPU backends). Sized for 28x28 grayscale on a CPU:
//! widths [32, 64, 128] with 2 blocks per stage is about 290k parameters.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::conv::conv_same;
use super::kernels::KernelBackend;
use super::norm::BatchNorm2d;
use super::pool::{global_mean, max_pool_2x2};

/// Sizes of the CNN (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnConfig {
    /// Channels of each stage; the feature dimension is the last one.
    pub widths: Vec<usize>,
    /// Conv blocks per stage.
    pub blocks: usize,
}

impl CnnConfig {
    pub fn feature_dim(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.widths.is_empty() || self.widths.contains(&0) {
            return Err("cnn widths must be a non-empty list of positive integers".into());
        }
        if self.blocks == 0 {
            return Err("cnn blocks must be at least 1".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, in_channels: usize, device: &B::Device) -> Cnn<B> {
        let mut convs = Vec::new();
        let mut cin = in_channels;
        for &w in &self.widths {
            let mut stage = Vec::new();
            for _ in 0..self.blocks {
                stage.push(ConvBlock {
                    // No bias: the BatchNorm right after has its own shift.
                    conv: Conv2dConfig::new([cin, w], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .with_bias(false)
                        .with_initializer(Initializer::Zeros)
                        .init(device),
                    norm: BatchNorm2d::new(w, device),
                });
                cin = w;
            }
            convs.push(Stage { blocks: stage });
        }
        Cnn { stages: convs, pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init() }
    }
}

#[derive(Module, Debug)]
pub struct ConvBlock<B: Backend> {
    pub conv: Conv2d<B>,
    pub norm: BatchNorm2d<B>,
}

#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    pub blocks: Vec<ConvBlock<B>>,
}

#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    pub stages: Vec<Stage<B>>,
    pub pool: MaxPool2d,
}

impl<B: KernelBackend> Cnn<B> {
    /// [N, C, H, W] -> [N, feature_dim].
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        let last = self.stages.len().saturating_sub(1);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in &stage.blocks {
                x = block.norm.forward_relu(conv_same(x, block.conv.weight.val()));
            }
            // Pool between stages only while there is room (28 -> 14 -> 7 -> 3).
            let [_, _, h, w] = x.dims();
            if i < last && h >= 2 && w >= 2 {
                // `pool` is 2x2 with stride 2; `max_pool_2x2` is that op as one kernel.
                x = max_pool_2x2(x);
            }
        }
        global_mean(x)
    }
}
