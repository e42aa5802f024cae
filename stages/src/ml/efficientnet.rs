//! EfficientNet-Lite (Lite0, Lite1, Lite2) as an ImageNet-pretrainable backbone: the
//! network of TensorFlow's `efficientnet-lite` and timm's `tf_efficientnet_lite*`, so
//! the committed ImageNet weights (`data/efficientnet_lite0`) load one for one.
//!
//! What makes it "Lite" and what this module must match exactly: MBConv blocks without
//! squeeze-excite, ReLU6 everywhere, BatchNorm eps 1e-3, stem (32) and head (1280)
//! widths fixed across variants, first and last stages not deepened, and TensorFlow
//! "SAME" padding: out = ceil(in / stride) with the odd pixel of padding at the bottom
//! and right, which is asymmetric on stride-2 layers and so padded explicitly here
//! (burn's convolution padding is symmetric).
//!
//! Input: images of 1 or 3 channels in fgflow's [-1, 1] scaling (the same as the
//! weights' (x/255 - 0.5)/0.5); a grayscale image is replicated to three channels,
//! and an image of another size is resized bilinearly to `resolution` first, so 28x28
//! drawings can use an ImageNet network at a resolution a CPU can afford.
//!
//! Parameter names (`stem.weight`, `blocks.N.{expand,depthwise,project}.{weight,bn.*}`,
//! `top.*`) are the layout `data/efficientnet_lite0/regen.py` writes; the ImageNet
//! classifier in that file (`classifier.*`) has no place here: the recipe's head
//! replaces it.
//!
//! Speed on flex (2 cores, batch 32). The depthwise convolutions are `conv::depthwise`,
//! an op with its own CPU forward and gradients: for [32, 96, 32, 32] 3x3 (same run,
//! machine loaded by parallel builds, load average 7) burn's grouped conv2d took 22 ms
//! forward + 360 ms backward (282 ms of it the input gradient), the op 39 ms forward +
//! 143 ms backward for both gradients, 2.1x less in all (`measure_convolution_costs`
//! in tests/efficientnet.rs). The 1x1 convolutions run as matrix products
//! ([`pointwise`]). Fine-tuning Lite0 from the committed weights then trained at 13
//! images/s at 32x32, 10 at 48, 7 at 64 and 5 at 96 (`measure_training_speed_by_resolution`,
//! one epoch of 192 images, under that same load; before the op, on an idle machine:
//! 24 at 32, 12 at 64, 7 at 96, 4 at 128); the default CNN trains at about 240. Those
//! two sets of figures are not comparable: re-measure on an idle machine.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::conv;
use super::kernels::KernelBackend;
use super::norm::BatchNorm2d;

/// BatchNorm epsilon of the TensorFlow weights.
const BN_EPS: f64 = 1e-3;
const STEM: usize = 32;
const FEATURES: usize = 1280;

/// (expansion, kernel, stride, output channels, repeats) of each stage of Lite0.
const STAGES: [(usize, usize, usize, usize, usize); 7] =
    [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)];

/// Blocks of the first stage, in every variant (its depth is not scaled): with the stem,
/// what `freeze_epochs` freezes (`optim::stem_params`).
pub const FIRST_STAGE_BLOCKS: usize = STAGES[0].4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiteVariant {
    Lite0,
    Lite1,
    Lite2,
}

impl LiteVariant {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lite0" => Some(LiteVariant::Lite0),
            "lite1" => Some(LiteVariant::Lite1),
            "lite2" => Some(LiteVariant::Lite2),
            _ => None,
        }
    }

    /// (width multiplier, depth multiplier, published resolution).
    pub fn scaling(self) -> (f64, f64, usize) {
        match self {
            LiteVariant::Lite0 => (1.0, 1.0, 224),
            LiteVariant::Lite1 => (1.0, 1.1, 240),
            LiteVariant::Lite2 => (1.1, 1.2, 260),
        }
    }
}

/// Sizes of the network (stored in the model config JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetConfig {
    pub variant: LiteVariant,
    /// Images are resized to resolution x resolution before the stem.
    pub resolution: usize,
}

/// TensorFlow's channel rounding: to a multiple of 8, never down by more than 10%.
fn round_channels(c: usize, mult: f64) -> usize {
    let v = c as f64 * mult;
    let mut r = (((v + 4.0) as usize) / 8 * 8).max(8);
    if (r as f64) < 0.9 * v {
        r += 8;
    }
    r
}

/// One block of the network: (input, output, expansion, kernel, stride).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    pub cin: usize,
    pub cout: usize,
    pub expand: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl EfficientNetConfig {
    pub fn feature_dim(&self) -> usize {
        FEATURES
    }

    pub fn check(&self, channels: usize) -> Result<(), String> {
        if channels != 1 && channels != 3 {
            return Err(format!("efficientnet_lite takes 1- or 3-channel images, found {channels}"));
        }
        if self.resolution < 32 {
            return Err(format!("efficientnet resolution must be at least 32 (five stride-2 layers), found {}", self.resolution));
        }
        Ok(())
    }

    /// Every block in order, with the variant's widths and depths.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let (wm, dm, _) = self.variant.scaling();
        let mut out = Vec::new();
        let mut cin = STEM;
        for (i, &(expand, kernel, stride, c, repeats)) in STAGES.iter().enumerate() {
            let fixed = i == 0 || i == STAGES.len() - 1;
            let n = if fixed { repeats } else { (repeats as f64 * dm).ceil() as usize };
            let cout = round_channels(c, wm);
            for j in 0..n {
                out.push(BlockSpec { cin, cout, expand, kernel, stride: if j == 0 { stride } else { 1 } });
                cin = cout;
            }
        }
        out
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> EfficientNet<B> {
        let blocks: Vec<MbConv<B>> = self
            .blocks()
            .into_iter()
            .map(|b| {
                let mid = b.cin * b.expand;
                MbConv {
                    expand: (b.expand != 1).then(|| ConvBn::new(b.cin, mid, 1, 1, 1, device)),
                    depthwise: ConvBn::new(mid, mid, b.kernel, b.stride, mid, device),
                    project: ConvBn::new(mid, b.cout, 1, 1, 1, device),
                    residual: b.stride == 1 && b.cin == b.cout,
                }
            })
            .collect();
        let last = blocks.last().map(|b| b.project.bn.gamma.dims()[0]).unwrap_or(STEM);
        EfficientNet {
            stem: ConvBn::new(3, STEM, 3, 2, 1, device),
            blocks,
            top: ConvBn::new(last, FEATURES, 1, 1, 1, device),
            resolution: self.resolution,
        }
    }
}

/// A bias-free convolution with TF "SAME" padding and its BatchNorm.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    /// [out, in / groups, k, k], burn's (and PyTorch's) layout.
    pub weight: Param<Tensor<B, 4>>,
    pub bn: BatchNorm2d<B>,
    pub stride: usize,
    pub groups: usize,
}

impl<B: Backend> ConvBn<B> {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, groups: usize, device: &B::Device) -> Self {
        let mut bn = BatchNorm2d::new(cout, device);
        bn.epsilon = BN_EPS;
        ConvBn {
            // Zeros here; `init::reinit` (He uniform for a conv weight under this name) or
            // the pretrained file fills them.
            weight: Param::initialized(ParamId::new(), Tensor::zeros([cout, cin / groups, k, k], device).require_grad()),
            bn,
            stride,
            groups,
        }
    }

}

impl<B: KernelBackend> ConvBn<B> {
    /// Convolution, BatchNorm, then ReLU6 when `act`.
    fn forward(&self, x: Tensor<B, 4>, act: bool) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let k = self.weight.dims()[2];
        let (top, bottom) = same_padding(h, k, self.stride);
        let (left, right) = same_padding(w, k, self.stride);
        let depthwise = self.groups > 1 && self.groups == self.weight.dims()[0] && self.weight.dims()[1] == 1;
        let y = if k == 1 && self.stride == 1 && self.groups == 1 {
            pointwise(x, self.weight.val())
        } else if depthwise {
            conv::depthwise(x, self.weight.val(), self.stride, [top, bottom, left, right])
        } else {
            let (x, pad) = if top == bottom && left == right {
                (x, [top, left])
            } else {
                (x.pad((left, right, top, bottom), PadMode::Constant(0.0)), [0, 0])
            };
            conv2d(x, self.weight.val(), None, ConvOptions::new([self.stride, self.stride], pad, [1, 1], self.groups))
        };
        let y = self.bn.forward(y);
        if act { relu6(y) } else { y }
    }
}

/// A 1x1 convolution as a batched matrix product: [O, C] @ [N][C, H*W]; its weight
/// gradient is a matrix product too. burn's conv2d computes its weight gradient as a
/// convolution: on flex 10x its forward, and 2-4x this (`measure_convolution_costs` in
/// tests/efficientnet.rs). Depthwise convolutions are `conv::depthwise`, an op of
/// their own with hand-written CPU kernels.
pub fn pointwise<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let o = weight.dims()[0];
    weight.reshape([1, o, c]).matmul(x.reshape([n, c, h * w])).reshape([n, o, h, w])
}

/// TensorFlow "SAME": (before, after) padding of one axis of size `size`.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out.saturating_sub(1)) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

fn relu6<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.clamp(0.0, 6.0)
}

/// Inverted residual: 1x1 expansion (absent at expansion 1), depthwise kxk, 1x1
/// linear projection, identity shortcut when shapes allow.
#[derive(Module, Debug)]
pub struct MbConv<B: Backend> {
    pub expand: Option<ConvBn<B>>,
    pub depthwise: ConvBn<B>,
    pub project: ConvBn<B>,
    pub residual: bool,
}

impl<B: KernelBackend> MbConv<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = match &self.expand {
            Some(e) => e.forward(x.clone(), true),
            None => x.clone(),
        };
        let y = self.project.forward(self.depthwise.forward(h, true), false);
        if self.residual { y + x } else { y }
    }
}

#[derive(Module, Debug)]
pub struct EfficientNet<B: Backend> {
    pub stem: ConvBn<B>,
    pub blocks: Vec<MbConv<B>>,
    /// The 1x1 convolution to the 1280 features (`_conv_head` in the PyTorch names).
    pub top: ConvBn<B>,
    pub resolution: usize,
}

impl<B: KernelBackend> EfficientNet<B> {
    /// [N, 1 or 3, H, W] -> the last feature map [N, 1280, h, w].
    pub fn feature_map(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = super::data::rgb_at(x, self.resolution);
        let mut x = self.stem.forward(x, true);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.top.forward(x, true)
    }

    /// [N, 1 or 3, H, W] -> features [N, 1280] (global average pool).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        super::pool::global_mean(self.feature_map(x))
    }
}

/// He-uniform initialisation of every convolution weight (fan-in = in/groups * k * k),
/// from its own ChaCha stream of `seed`, for training from scratch (`init::reinit`
/// only recognises burn's `Conv2d`). BatchNorm parameters keep their constants.
pub fn he_init<B: Backend>(net: EfficientNet<B>, seed: u64) -> EfficientNet<B> {
    // A stream distinct from `init::reinit`'s, which already drew the head from `seed`.
    let mut mapper = HeInit { rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6566_6669_6369_656e) };
    net.map(&mut mapper)
}

struct HeInit {
    rng: ChaCha8Rng,
}

impl<B: Backend> ModuleMapper<B> for HeInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims: Vec<usize> = tensor.shape().iter().copied().collect();
        if D != 4 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let fan_in = (dims[1] * dims[2] * dims[3]).max(1) as f32;
        let bound = (6.0 / fan_in).sqrt();
        let values: Vec<f32> = (0..dims.iter().product::<usize>()).map(|_| self.rng.random_range(-bound..=bound)).collect();
        let require_grad = tensor.is_require_grad();
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values, dims), &tensor.device());
        Param::from_mapped_value(id, fresh.set_require_grad(require_grad), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding_puts_the_odd_pixel_after() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(75, 3, 2), (1, 1));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1), (0, 0));
    }

    /// The matmul pointwise convolution equals burn's conv2d, forward and both gradients.
    #[test]
    fn pointwise_matches_conv2d() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::Distribution;
        type AD = Autodiff<Flex>;
        let d = Default::default();
        let v = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| {
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(a.len() == b.len() && worst < 1e-3, "max difference {worst}");
        };
        for (c, o, k, stride, side, groups) in [(3, 6, 1, 1, 5, 1), (8, 4, 1, 1, 4, 1)] {
            let xd = Tensor::<Flex, 4>::random([2, c, side, side], Distribution::Normal(0.0, 1.0), &d).into_data();
            let wd = Tensor::<Flex, 4>::random([o, c / groups, k, k], Distribution::Normal(0.0, 1.0), &d).into_data();
            let run = |ours: bool| {
                let x = Tensor::<AD, 4>::from_data(xd.clone(), &d).require_grad();
                let w = Tensor::<AD, 4>::from_data(wd.clone(), &d).require_grad();
                let (top, bottom) = same_padding(side, k, stride);
                let xp = x.clone().pad((top, bottom, top, bottom), PadMode::Constant(0.0));
                let y = if ours { pointwise(xp, w.clone()) } else { conv2d(xp, w.clone(), None, ConvOptions::new([stride, stride], [0, 0], [1, 1], groups)) };
                let g = (y.clone() * y.clone()).sum().backward();
                (v(y.inner()), v(x.grad(&g).unwrap()), v(w.grad(&g).unwrap()))
            };
            let (a, b) = (run(true), run(false));
            close(a.0, b.0);
            close(a.1, b.1);
            close(a.2, b.2);
        }
    }

    #[test]
    fn published_widths_and_depths() {
        let count = |v| EfficientNetConfig { variant: v, resolution: 224 }.blocks().len();
        // timm's tf_efficientnet_lite{0,1,2}: [1,2,2,3,3,4,1], [1,3,3,4,4,5,1] twice.
        assert_eq!(count(LiteVariant::Lite0), 16);
        assert_eq!(count(LiteVariant::Lite1), 21);
        assert_eq!(count(LiteVariant::Lite2), 21);
        let lite2 = EfficientNetConfig { variant: LiteVariant::Lite2, resolution: 260 }.blocks();
        let widths: Vec<usize> = lite2.iter().map(|b| b.cout).collect();
        for w in [16, 24, 48, 88, 120, 208, 352] {
            assert!(widths.contains(&w), "{w} missing from {widths:?}");
        }
        assert_eq!(lite2.last().map(|b| b.cout), Some(352));
        assert_eq!(lite2.first().map(|b| b.cout), Some(16));
    }
}
