//! [`KernelBackend`]: the ops fgflow implements itself instead of composing burn's, and
//! the backends that have them. Each op has a default made of burn's own ops (what the
//! GPU backends run), CPU kernels for flex and ndarray (in `conv`, `norm`, `attention`, `cosine_attention`,
//! `activation`, `linear`, `pool`, `rows`, `tokens`: parallel over images, channels, planes or fixed chunks of
//! rows, each output computed by one task in a fixed order, so results do not depend on
//! the thread count), and one autodiff op whose backward calls the backend's gradient
//! methods. Every kernel is tested against the default (values and gradients) and for
//! thread-count independence in its module.
//!
//! Why: flex runs its element-wise ops on the calling thread and lays some kernels out
//! on it (im2col, transposed convolution), so a training step composed of burn's ops
//! kept one of two cores waiting for half of its time (perf); see the README's
//! "Training speed" for what each op bought.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;

use super::{activation, attention, conv, cosine_attention, linear, norm, pool, rows, tokens};

/// Registers each gradient for its parent (`ops.parents`' ids), where that parent is
/// tracked: what every kernel's backward ends with.
pub(crate) fn register_grads<B: Backend, const N: usize>(grads: &mut Gradients, parents: [Option<NodeId>; N], values: [FloatTensor<B>; N]) {
    for (node, g) in parents.into_iter().zip(values) {
        if let Some(id) = node {
            grads.register::<B>(id, g);
        }
    }
}

/// A backend the models run on, with the ops fgflow implements itself: every method's
/// default is burn's own ops (what GPU backends run); the CPU backends override them.
pub trait KernelBackend: Backend {
    /// x [N, C, H, W], weight [O, C, k, k] -> [N, O, H, W] (padding (k-1)/2).
    fn conv_same(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = conv::weight_kernel::<Self>(&weight);
        Self::conv2d(x, weight, None, conv::options(k))
    }

    /// The gradient of `conv_same` with respect to its input.
    fn conv_same_x_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = conv::weight_kernel::<Self>(&weight);
        Self::conv2d_x_backward(x, weight, grad, conv::options(k))
    }

    /// The gradient of `conv_same` with respect to its weight.
    fn conv_same_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = conv::weight_kernel::<Self>(&weight);
        Self::conv2d_weight_backward(x, weight, grad, conv::options(k))
    }

    /// Depthwise convolution without bias: x [N, C, H, W], weight [C, 1, k, k] ->
    /// [N, C, oh, ow], zero padding `pad` = [top, bottom, left, right] (uneven allowed).
    /// Default: burn's grouped conv2d on an explicitly padded input ([`conv::burn_depthwise`]).
    fn depthwise(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
        conv::burn_depthwise::forward::<Self>(x, weight, stride, pad)
    }

    /// The gradient of `depthwise` with respect to its input.
    fn depthwise_x_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
        conv::burn_depthwise::x_grad::<Self>(x, weight, grad, stride, pad)
    }

    /// The gradient of `depthwise` with respect to its weight.
    fn depthwise_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
        conv::burn_depthwise::weight_grad::<Self>(x, weight, grad, stride, pad)
    }

    /// Training-mode BatchNorm then ReLU over x [N, C, H, W] ([`norm::batch_norm_relu`]):
    /// (y, batch mean [C], biased batch variance [C]).
    fn batch_norm_relu(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        norm::reference::forward::<Self>(x, gamma, beta, epsilon)
    }

    /// max(0, x * scale + shift) per channel of x [N, C, H, W]: BatchNorm + ReLU in
    /// inference, the running statistics folded into `scale` and `shift` [C].
    fn scale_shift_relu(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>) -> FloatTensor<Self> {
        norm::reference::scale_shift_relu::<Self>(x, scale, shift)
    }

    /// The gradients (x, gamma, beta) of `batch_norm_relu` from what it saved.
    fn batch_norm_relu_backward(saved: norm::Saved<Self>, epsilon: f64, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        norm::reference::backward::<Self>(saved, epsilon, grad)
    }

    /// A fully connected layer over rows ([`linear::linear`]): x [rows, in] -> [rows, out].
    fn dense(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, layout: linear::Layout) -> FloatTensor<Self> {
        linear::reference::forward::<Self>(x, weight, bias, layout)
    }

    /// The gradients (x, weight in its layout, bias) of `dense`.
    fn dense_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, layout: linear::Layout, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        linear::reference::backward::<Self>(x, weight, layout, grad)
    }

    /// Token rows from patch embeddings, the class token and the position embeddings
    /// ([`tokens::embed`]).
    fn token_embed(patches: FloatTensor<Self>, cls: FloatTensor<Self>, pos: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
        tokens::reference::embed::<Self>(patches, cls, pos, shape)
    }

    /// The gradients (patches, class token, position embeddings) of `token_embed`.
    fn token_embed_backward(grad: FloatTensor<Self>, shape: tokens::Tokens) -> [FloatTensor<Self>; 3] {
        tokens::reference::embed_backward::<Self>(grad, shape)
    }

    /// The mean of each image's patch rows ([`tokens::mean`]).
    fn token_mean(x: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
        tokens::reference::mean::<Self>(x, shape)
    }

    /// The gradient of `token_mean`.
    fn token_mean_backward(grad: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
        tokens::reference::mean_backward::<Self>(grad, shape)
    }

    /// 2x2 max pooling with stride 2 ([`pool::max_pool_2x2`]).
    fn max_pool_2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        pool::reference::forward::<Self>(x)
    }

    /// The gradient of `max_pool_2x2`, from its input.
    fn max_pool_2x2_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        pool::reference::backward::<Self>(x, grad)
    }

    /// The mean of each plane ([`pool::global_mean`]).
    fn global_mean(x: FloatTensor<Self>) -> FloatTensor<Self> {
        pool::reference::global_mean::<Self>(x)
    }

    /// The gradient of `global_mean`, for an input of `shape`.
    fn global_mean_backward(grad: FloatTensor<Self>, shape: [usize; 4]) -> FloatTensor<Self> {
        pool::reference::global_mean_backward::<Self>(grad, shape)
    }

    /// GELU with erf ([`activation::gelu`]).
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        activation::reference::forward::<Self>(x)
    }

    /// The gradient of `gelu_exact`: grad * (Phi(x) + x * phi(x)).
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        activation::reference::backward::<Self>(x, grad)
    }

    /// Multi-head softmax attention over token rows ([`attention::attention`]): q, k, v
    /// [n * t, d] -> (context [n * t, d], attention weights [n, heads, t, t]).
    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, shape: attention::Heads, scale: f64) -> FloatTensor<Self> {
        let [context, _] = Self::token_attention_weights(q, k, v, shape, scale);
        context
    }

    /// `attention` with the weights its backward needs.
    fn token_attention_weights(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, shape: attention::Heads, scale: f64) -> [FloatTensor<Self>; 2] {
        attention::reference::forward::<Self>(q, k, v, shape, scale)
    }

    /// The gradients (q, k, v) of `attention` from what it saved.
    fn token_attention_backward(saved: attention::Saved<Self>, shape: attention::Heads, scale: f64, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        attention::reference::backward::<Self>(saved, shape, scale, grad)
    }

    /// Swin-V2's window attention ([`cosine_attention::cosine_attention`]): qkv
    /// [n * t, 3d], scale [heads], bias [W, heads, t, t] -> context [n * t, d].
    fn cosine_attention(qkv: FloatTensor<Self>, scale: FloatTensor<Self>, bias: FloatTensor<Self>, shape: attention::Heads) -> FloatTensor<Self> {
        let [context, _] = Self::cosine_attention_weights(qkv, scale, bias, shape);
        context
    }

    /// `cosine_attention` with the weights its backward needs.
    fn cosine_attention_weights(qkv: FloatTensor<Self>, scale: FloatTensor<Self>, bias: FloatTensor<Self>, shape: attention::Heads) -> [FloatTensor<Self>; 2] {
        cosine_attention::reference::forward::<Self>(qkv, scale, bias, shape)
    }

    /// The gradients (qkv, scale, bias) of `cosine_attention` from what it saved; the
    /// bias cycles through `windows` matrices.
    fn cosine_attention_backward(saved: cosine_attention::Saved<Self>, shape: attention::Heads, windows: usize, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        cosine_attention::reference::backward::<Self>(saved, shape, windows, grad)
    }

    /// Each image's rows of x [images * p.len(), c] permuted ([`rows::permute_rows`]).
    fn permute_rows(x: FloatTensor<Self>, p: &rows::RowPermutation) -> FloatTensor<Self> {
        rows::reference::forward::<Self>(x, p)
    }

    /// LayerNorm of every row of x [rows, dim] ([`norm::layer_norm`]): y.
    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let [y, _, _] = Self::layer_norm_rows_stats(x, gamma, beta, epsilon);
        y
    }

    /// `layer_norm` with what its backward needs: (y, row means, rows' 1 / std).
    fn layer_norm_rows_stats(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        norm::layer_reference::forward::<Self>(x, gamma, beta, epsilon)
    }

    /// The gradients (x, gamma, beta) of `layer_norm` from what it saved.
    fn layer_norm_rows_backward(saved: norm::LayerSaved<Self>, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
        norm::layer_reference::backward::<Self>(saved, grad)
    }
}

/// An autodiff backend for training: it and its inner (inference) backend are
/// [`KernelBackend`]s.
pub trait TrainBackend: AutodiffBackend<InnerBackend: KernelBackend> + KernelBackend {}
impl<T: AutodiffBackend<InnerBackend: KernelBackend> + KernelBackend> TrainBackend for T {}

/// The CPU overrides, the same for every CPU backend.
macro_rules! cpu_kernel_backend {
    ($backend:ty) => {
        impl KernelBackend for $backend {
            fn conv_same(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
                conv::cpu_conv_same::<Self>(x, weight, false)
            }
            fn conv_same_x_grad(_x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
                conv::cpu_conv_same::<Self>(grad, weight, true)
            }
            fn conv_same_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
                conv::cpu_weight_grad::<Self>(x, weight, grad)
            }
            fn depthwise(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
                conv::depthwise_cpu::forward::<Self>(x, weight, stride, pad)
            }
            fn depthwise_x_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
                conv::depthwise_cpu::x_grad::<Self>(x, weight, grad, stride, pad)
            }
            fn depthwise_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
                conv::depthwise_cpu::weight_grad::<Self>(x, weight, grad, stride, pad)
            }
            fn batch_norm_relu(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> [FloatTensor<Self>; 3] {
                norm::cpu::forward::<Self>(x, gamma, beta, epsilon)
            }
            fn batch_norm_relu_backward(saved: norm::Saved<Self>, epsilon: f64, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
                norm::cpu::backward::<Self>(saved, epsilon, grad)
            }
            fn scale_shift_relu(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>) -> FloatTensor<Self> {
                norm::cpu::scale_shift_relu::<Self>(x, scale, shift)
            }
            fn layer_norm_rows_stats(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> [FloatTensor<Self>; 3] {
                norm::layer_cpu::forward::<Self>(x, gamma, beta, epsilon)
            }
            fn layer_norm_rows_backward(saved: norm::LayerSaved<Self>, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
                norm::layer_cpu::backward::<Self>(saved, grad)
            }
            fn dense(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, layout: linear::Layout) -> FloatTensor<Self> {
                linear::cpu::forward::<Self>(x, weight, bias, layout)
            }
            fn dense_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, layout: linear::Layout, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
                linear::cpu::backward::<Self>(x, weight, layout, grad)
            }
            fn token_embed(patches: FloatTensor<Self>, cls: FloatTensor<Self>, pos: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
                tokens::cpu::embed::<Self>(patches, cls, pos, shape)
            }
            fn token_embed_backward(grad: FloatTensor<Self>, shape: tokens::Tokens) -> [FloatTensor<Self>; 3] {
                tokens::cpu::embed_backward::<Self>(grad, shape)
            }
            fn token_mean(x: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
                tokens::cpu::mean::<Self>(x, shape)
            }
            fn token_mean_backward(grad: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
                tokens::cpu::mean_backward::<Self>(grad, shape)
            }
            fn max_pool_2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
                pool::cpu::forward::<Self>(x)
            }
            fn max_pool_2x2_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
                pool::cpu::backward::<Self>(x, grad)
            }
            fn global_mean_backward(grad: FloatTensor<Self>, shape: [usize; 4]) -> FloatTensor<Self> {
                pool::cpu::global_mean_backward::<Self>(grad, shape)
            }
            fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
                activation::cpu::forward::<Self>(x)
            }
            fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
                activation::cpu::backward::<Self>(x, grad)
            }
            fn token_attention_weights(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, shape: attention::Heads, scale: f64) -> [FloatTensor<Self>; 2] {
                attention::cpu::forward::<Self>(q, k, v, shape, scale)
            }
            fn token_attention_backward(saved: attention::Saved<Self>, shape: attention::Heads, scale: f64, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
                attention::cpu::backward::<Self>(saved, shape, scale, grad)
            }
            fn permute_rows(x: FloatTensor<Self>, p: &rows::RowPermutation) -> FloatTensor<Self> {
                rows::cpu::forward::<Self>(x, p)
            }
            fn cosine_attention_weights(qkv: FloatTensor<Self>, scale: FloatTensor<Self>, bias: FloatTensor<Self>, shape: attention::Heads) -> [FloatTensor<Self>; 2] {
                cosine_attention::cpu::forward::<Self>(qkv, scale, bias, shape)
            }
            fn cosine_attention_backward(saved: cosine_attention::Saved<Self>, shape: attention::Heads, windows: usize, grad: FloatTensor<Self>) -> [FloatTensor<Self>; 3] {
                cosine_attention::cpu::backward::<Self>(saved, shape, windows, grad)
            }
        }
    };
}

cpu_kernel_backend!(Flex);
#[cfg(feature = "ndarray")]
cpu_kernel_backend!(burn::backend::NdArray);

#[cfg(feature = "wgpu")]
impl KernelBackend for burn::backend::Wgpu {}

#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {}

impl<B: KernelBackend, C: CheckpointStrategy> KernelBackend for Autodiff<B, C> {
    fn conv_same(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        match conv::ConvSameBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::conv_same(x.primitive.clone(), weight.primitive.clone());
                prep.finish((x.primitive, weight.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv_same(x.primitive, weight.primitive)),
        }
    }

    fn depthwise(x: FloatTensor<Self>, weight: FloatTensor<Self>, stride: usize, pad: [usize; 4]) -> FloatTensor<Self> {
        match (conv::DepthwiseBackward { stride, pad }).prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::depthwise(x.primitive.clone(), weight.primitive.clone(), stride, pad);
                prep.finish((x.primitive, weight.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::depthwise(x.primitive, weight.primitive, stride, pad)),
        }
    }

    fn batch_norm_relu(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> [FloatTensor<Self>; 3] {
        let [y, mean, var] = B::batch_norm_relu(x.primitive.clone(), gamma.primitive.clone(), beta.primitive.clone(), epsilon);
        let y = match (norm::BatchNormReluBackward { epsilon }).prepare::<C>([x.node, gamma.node, beta.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, beta.primitive, mean.clone(), var.clone()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        // The batch statistics feed the running estimates only: not differentiated.
        [y, Self::from_inner(mean), Self::from_inner(var)]
    }

    fn layer_norm_rows(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        match norm::LayerNormBackward.prepare::<C>([x.node, gamma.node.clone(), beta.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let [y, mean, rstd] = B::layer_norm_rows_stats(x.primitive.clone(), gamma.primitive.clone(), beta.primitive, epsilon);
                prep.finish((x.primitive, gamma.primitive, mean, rstd), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_rows(x.primitive, gamma.primitive, beta.primitive, epsilon)),
        }
    }

    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, shape: attention::Heads, scale: f64) -> FloatTensor<Self> {
        match (attention::AttentionBackward { shape, scale }).prepare::<C>([q.node, k.node, v.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let [context, weights] = B::token_attention_weights(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), shape, scale);
                prep.finish((q.primitive, k.primitive, v.primitive, weights), context)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_attention(q.primitive, k.primitive, v.primitive, shape, scale)),
        }
    }

    fn cosine_attention(qkv: FloatTensor<Self>, scale: FloatTensor<Self>, bias: FloatTensor<Self>, shape: attention::Heads) -> FloatTensor<Self> {
        let windows = burn::tensor::TensorMetadata::shape(&bias.primitive).dims::<4>()[0];
        match (cosine_attention::CosineAttentionBackward { shape, windows }).prepare::<C>([qkv.node, scale.node, bias.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let [context, weights] = B::cosine_attention_weights(qkv.primitive.clone(), scale.primitive.clone(), bias.primitive, shape);
                prep.finish((qkv.primitive, scale.primitive, weights), context)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cosine_attention(qkv.primitive, scale.primitive, bias.primitive, shape)),
        }
    }

    fn permute_rows(x: FloatTensor<Self>, p: &rows::RowPermutation) -> FloatTensor<Self> {
        let out = B::permute_rows(x.primitive, p);
        match (rows::PermuteRowsBackward { p: p.clone() }).prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn token_embed(patches: FloatTensor<Self>, cls: FloatTensor<Self>, pos: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
        let out = B::token_embed(patches.primitive, cls.primitive, pos.primitive, shape);
        match (tokens::EmbedBackward { shape }).prepare::<C>([patches.node, cls.node, pos.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn token_mean(x: FloatTensor<Self>, shape: tokens::Tokens) -> FloatTensor<Self> {
        let out = B::token_mean(x.primitive, shape);
        match (tokens::MeanBackward { shape }).prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn max_pool_2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match pool::MaxPoolBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::max_pool_2x2(x.primitive.clone());
                prep.finish(x.primitive, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::max_pool_2x2(x.primitive)),
        }
    }

    fn global_mean(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&x.primitive).dims::<4>();
        let out = B::global_mean(x.primitive);
        match (pool::GlobalMeanBackward { shape }).prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match activation::GeluBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::gelu_exact(x.primitive.clone());
                prep.finish(x.primitive, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_exact(x.primitive)),
        }
    }

    fn dense(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, layout: linear::Layout) -> FloatTensor<Self> {
        match bias {
            Some(b) => match (linear::LinearBackward { layout }).prepare::<C>([x.node, weight.node, b.node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = B::dense(x.primitive.clone(), weight.primitive.clone(), Some(b.primitive), layout);
                    prep.finish((x.primitive, weight.primitive), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::dense(x.primitive, weight.primitive, Some(b.primitive), layout)),
            },
            None => match (linear::LinearNoBiasBackward { layout }).prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = B::dense(x.primitive.clone(), weight.primitive.clone(), None, layout);
                    prep.finish((x.primitive, weight.primitive), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::dense(x.primitive, weight.primitive, None, layout)),
            },
        }
    }
}
