//! BatchNorm (NCHW activations) and LayerNorm (rows of a matrix), written for speed on
//! the CPU backends.
//!
//! burn's `BatchNorm` computes per-channel statistics after `swap_dims(0, 1)` +
//! `reshape`, which copies the activation (and its gradient) into a new layout; on
//! flex that made BatchNorm cost more than the convolutions of the CNN. This version
//! reduces over (N, H, W) in place with one pass of sums and sums of squares and folds
//! normalisation and affine into one scale and shift per channel: measured 1.8x faster
//! forward+backward on flex ([64, 32, 28, 28], 2 threads). Semantics match burn's
//! (biased batch variance for normalising and for the running estimate, momentum 0.1,
//! running statistics in `RunningState`, used when autodiff is off), so soups average
//! the same buffers. E[x^2] - E[x]^2 is clamped at 0 against rounding.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::module::{Module, Param, ParamId, RunningState};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::{KernelBackend, register_grads};

#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    pub momentum: f64,
    pub epsilon: f64,
}

impl<B: Backend> BatchNorm2d<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        BatchNorm2d {
            gamma: Param::initialized(ParamId::new(), Tensor::ones([channels], device).require_grad()),
            beta: Param::initialized(ParamId::new(), Tensor::zeros([channels], device).require_grad()),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            momentum: 0.1,
            epsilon: 1e-5,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        // Every broadcast below is between an [N*C, H*W] matrix and an [N*C, 1] column:
        // flex runs 2-D broadcasts row by row, but 4-D ones (and the backward of 4-D
        // sums) element by element through a strided index, 5x slower here.
        let rows = x.reshape([n * c, h * w]);
        let (mean, var) = if B::ad_enabled(&rows.device()) {
            let count = (n * h * w).max(1) as f64;
            let per_channel = |t: Tensor<B, 2>| t.sum_dim(1).reshape([n, c]).sum_dim(0).reshape([c]).div_scalar(count);
            let mean = per_channel(rows.clone());
            let mean_sq = per_channel(rows.clone().square());
            let var = (mean_sq - mean.clone().square()).clamp_min(0.0);
            let m = self.momentum;
            let rm = self.running_mean.value_sync().mul_scalar(1.0 - m) + mean.clone().detach().mul_scalar(m);
            let rv = self.running_var.value_sync().mul_scalar(1.0 - m) + var.clone().detach().mul_scalar(m);
            self.running_mean.update(rm.detach());
            self.running_var.update(rv.detach());
            (mean, var)
        } else {
            (self.running_mean.value(), self.running_var.value())
        };
        // y = (x - mean) / sqrt(var + eps) * gamma + beta = x * scale + shift.
        let scale = var.add_scalar(self.epsilon).sqrt().recip() * self.gamma.val();
        let shift = self.beta.val() - mean * scale.clone();
        let column = |v: Tensor<B, 1>| v.reshape([1, c]).expand([n, c]).reshape([n * c, 1]);
        (rows * column(scale) + column(shift)).reshape([n, c, h, w])
    }
}

impl<B: KernelBackend> BatchNorm2d<B> {
    /// `relu(self.forward(x))`; in training one fused op ([`batch_norm_relu`]).
    pub fn forward_relu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if !B::ad_enabled(&x.device()) {
            // Inference: the running statistics folded into one scale and shift per channel.
            let scale = self.running_var.value().add_scalar(self.epsilon).sqrt().recip() * self.gamma.val();
            let shift = self.beta.val() - self.running_mean.value() * scale.clone();
            let y = B::scale_shift_relu(x.into_primitive().tensor(), scale.into_primitive().tensor(), shift.into_primitive().tensor());
            return Tensor::from_primitive(TensorPrimitive::Float(y));
        }
        let (y, mean, var) = batch_norm_relu(x, self.gamma.val(), self.beta.val(), self.epsilon);
        let m = self.momentum;
        let rm = self.running_mean.value_sync().mul_scalar(1.0 - m) + mean.mul_scalar(m);
        let rv = self.running_var.value_sync().mul_scalar(1.0 - m) + var.mul_scalar(m);
        self.running_mean.update(rm.detach());
        self.running_var.update(rv.detach());
        y
    }
}

/// Training-mode BatchNorm followed by ReLU as one autodiff op: x [N, C, H, W] is
/// normalised per channel over (N, H, W) with the biased batch variance, then
/// y = max(0, x_hat * gamma + beta). Returns (y, the batch mean, the batch variance);
/// the statistics are not tracked (they feed the running estimates).
///
/// Why one op: composed of burn's ops, the CNN's normalisation and activation are a
/// dozen element-wise passes and reductions forward and backward, which flex runs on
/// the calling thread (about a third of that thread's time in a training step, perf);
/// on the CPU backends ([`cpu`]) the forward is two passes and the backward two, each
/// parallel over channels or planes.
pub fn batch_norm_relu<B: KernelBackend>(x: Tensor<B, 4>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f64) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 1>) {
    let [c] = gamma.dims();
    assert!(x.dims()[1] == c && beta.dims() == [c], "batch_norm_relu needs gamma and beta of one value per channel");
    let [y, mean, var] = B::batch_norm_relu(x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor(), epsilon);
    let stat = |t| Tensor::from_primitive(TensorPrimitive::Float(t));
    (Tensor::from_primitive(TensorPrimitive::Float(y)), stat(mean), stat(var))
}

/// What the fused op keeps for its backward: x, gamma, beta, the batch mean and variance.
pub type Saved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

#[derive(Debug)]
pub(crate) struct BatchNormReluBackward {
    pub(crate) epsilon: f64,
}

impl<B: KernelBackend> Backward<B, 3> for BatchNormReluBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dx, dgamma, dbeta] = B::batch_norm_relu_backward(ops.state, self.epsilon, grad);
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx, dgamma, dbeta]);
    }
}

/// The fused op in burn's own ops (what GPU backends run, and the tests' reference).
pub mod reference {
    use super::*;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    fn column<B: Backend>(v: Tensor<B, 1>, n: usize, c: usize) -> Tensor<B, 2> {
        v.reshape([1, c]).expand([n, c]).reshape([n * c, 1])
    }

    fn per_channel<B: Backend>(rows: Tensor<B, 2>, n: usize, c: usize) -> Tensor<B, 1> {
        rows.sum_dim(1).reshape([n, c]).sum_dim(0).reshape([c])
    }

    pub fn forward<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, epsilon: f64) -> [FloatTensor<B>; 3] {
        let x: Tensor<B, 4> = t(x);
        let [n, c, h, w] = x.dims();
        let count = (n * h * w).max(1) as f64;
        let rows = x.reshape([n * c, h * w]);
        let mean = per_channel(rows.clone(), n, c).div_scalar(count);
        let var = (per_channel(rows.clone().square(), n, c).div_scalar(count) - mean.clone().square()).clamp_min(0.0);
        let scale = var.clone().add_scalar(epsilon).sqrt().recip() * t::<B, 1>(gamma);
        let shift = t::<B, 1>(beta) - mean.clone() * scale.clone();
        let y = relu(rows * column(scale, n, c) + column(shift, n, c)).reshape([n, c, h, w]);
        [y.into_primitive().tensor(), mean.into_primitive().tensor(), var.into_primitive().tensor()]
    }

    /// max(0, x * scale + shift) per channel of x [N, C, H, W] (inference).
    pub fn scale_shift_relu<B: Backend>(x: FloatTensor<B>, scale: FloatTensor<B>, shift: FloatTensor<B>) -> FloatTensor<B> {
        let x: Tensor<B, 4> = t(x);
        let [n, c, h, w] = x.dims();
        let rows = x.reshape([n * c, h * w]);
        relu(rows * column(t(scale), n, c) + column(t(shift), n, c)).reshape([n, c, h, w]).into_primitive().tensor()
    }

    pub fn backward<B: Backend>(saved: Saved<B>, epsilon: f64, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (x, gamma, beta, mean, var) = saved;
        let x: Tensor<B, 4> = t(x);
        let [n, c, h, w] = x.dims();
        let count = (n * h * w).max(1) as f64;
        let (gamma, mean): (Tensor<B, 1>, Tensor<B, 1>) = (t(gamma), t(mean));
        let rstd = t::<B, 1>(var).add_scalar(epsilon).sqrt().recip();
        let scale = rstd.clone() * gamma.clone();
        let shift = t::<B, 1>(beta) - mean.clone() * scale.clone();
        let rows = x.reshape([n * c, h * w]);
        let active = (rows.clone() * column(scale, n, c) + column(shift, n, c)).greater_elem(0.0).float();
        let g = t::<B, 4>(grad).reshape([n * c, h * w]) * active;
        let x_hat = (rows - column(mean, n, c)) * column(rstd.clone(), n, c);
        let dbeta = per_channel(g.clone(), n, c);
        let dgamma = per_channel(g.clone() * x_hat.clone(), n, c);
        let dx = column(gamma * rstd, n, c)
            * (g - column(dbeta.clone().div_scalar(count), n, c) - x_hat * column(dgamma.clone().div_scalar(count), n, c));
        [dx.reshape([n, c, h, w]).into_primitive().tensor(), dgamma.into_primitive().tensor(), dbeta.into_primitive().tensor()]
    }
}

/// The fused op on the CPU backends. Per-channel sums run one task per channel over its
/// N planes in order (each plane summed in f32 lanes, planes added in f64); element
/// passes run one task per plane. So every result is independent of the thread count.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, filled};
    use std::mem::MaybeUninit;
    use rayon::prelude::*;

    fn dims<B: Backend>(x: &FloatTensor<B>) -> [usize; 4] {
        use burn::tensor::TensorMetadata;
        x.shape().dims::<4>()
    }

    crate::widest_fn! {
        /// (sum of a, sum of a * b) over one plane: 16 f32 lanes (a plane is short, so
        /// this is as accurate as f64 here and vectorises), returned in f64 to be summed
        /// over planes.
        fn plane_sums(a: &[f32], b: &[f32]) -> (f64, f64) {
            let mut s = [0f32; 16];
            let mut q = [0f32; 16];
            let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
            let (ra, rb) = (a16.remainder(), b16.remainder());
            for (x, y) in a16.zip(b16) {
                for l in 0..16 {
                    s[l] += x[l];
                    q[l] += x[l] * y[l];
                }
            }
            for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
                s[l] += x;
                q[l] += x * y;
            }
            (s.iter().map(|v| *v as f64).sum(), q.iter().map(|v| *v as f64).sum())
        }
    }

    crate::widest_fn! {
        /// One plane of the forward: max(0, x * scale + shift).
        fn scale_shift_relu_plane(out: &mut [MaybeUninit<f32>], xs: &[f32], scale: f32, shift: f32) {
            for (o, v) in out.iter_mut().zip(xs) {
                o.write((v * scale + shift).max(0.0));
            }
        }
    }

    /// The per-channel constants of one plane in the backward.
    #[derive(Clone, Copy)]
    struct Channel {
        scale: f32,
        shift: f32,
        mean: f32,
        rstd: f32,
    }

    crate::widest_fn! {
        /// g' = dy where the forward's pre-activation was positive, and x_hat.
        fn masked_grad_plane(g: &mut [f32], x_hat: &mut [f32], xs: &[f32], dy: &[f32], k: Channel) {
            for (((g, h), x), dy) in g.iter_mut().zip(x_hat.iter_mut()).zip(xs).zip(dy) {
                *g = if x * k.scale + k.shift > 0.0 { *dy } else { 0.0 };
                *h = (x - k.mean) * k.rstd;
            }
        }
    }

    crate::widest_fn! {
        /// dx = gamma * rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)) on one plane.
        fn input_grad_plane(out: &mut [MaybeUninit<f32>], xs: &[f32], dy: &[f32], k: Channel, factor: f32, mean_g: f32, mean_gx: f32) {
            for ((o, x), dy) in out.iter_mut().zip(xs).zip(dy) {
                let x_hat = (x - k.mean) * k.rstd;
                let g = if x * k.scale + k.shift > 0.0 { *dy } else { 0.0 };
                o.write(factor * (g - mean_g - x_hat * mean_gx));
            }
        }
    }

    /// Per channel, the sums of f(plane, channel, scratch) over its planes in order.
    /// The planes run in parallel in memory order, whole images per task, each task with
    /// two planes of scratch; then each channel's results are added over images in
    /// order. (One task per channel striding over the images was slower on small
    /// planes: 7 x 7 planes are 196 bytes, 25 KB apart.)
    fn per_channel(n: usize, c: usize, hw: usize, f: impl Fn(usize, usize, &mut (Vec<f32>, Vec<f32>)) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
        let mut planes = vec![(0.0, 0.0); n * c];
        if c > 0 {
            planes.par_chunks_mut(c).enumerate().for_each_init(
                || (vec![0f32; hw], vec![0f32; hw]),
                |scratch, (ni, image)| {
                    for (ci, r) in image.iter_mut().enumerate() {
                        *r = f(ni * c + ci, ci, scratch);
                    }
                },
            );
        }
        (0..c).map(|ci| (0..n).map(|ni| planes[ni * c + ci]).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))).collect()
    }

    /// The per-channel affine the forward applies: (scale, shift, 1 / std), in f32 as
    /// both passes compute them, so the backward's ReLU mask is the forward's.
    fn affine(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], epsilon: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (*v + epsilon as f32).sqrt()).collect();
        let scale: Vec<f32> = rstd.iter().zip(gamma).map(|(r, g)| r * g).collect();
        let shift: Vec<f32> = beta.iter().zip(mean.iter().zip(&scale)).map(|(b, (m, s))| b - m * s).collect();
        (scale, shift, rstd)
    }

    /// max(0, x * scale + shift) with the per-channel scale and shift, planes in parallel.
    fn apply(xs: &[f32], scale: &[f32], shift: &[f32], c: usize, hw: usize) -> Vec<f32> {
        if hw == 0 {
            return Vec::new();
        }
        // SAFETY: the chunks are whole planes of hw floats (xs.len() is a multiple of
        // hw), and scale_shift_relu_plane writes every element of its plane.
        unsafe { filled(xs.len(), hw, |plane, out| scale_shift_relu_plane(out, &xs[plane * hw..][..hw], scale[plane % c], shift[plane % c])) }
    }

    pub fn scale_shift_relu<B: CpuTensors>(x: FloatTensor<B>, scale: FloatTensor<B>, shift: FloatTensor<B>) -> FloatTensor<B> {
        let [n, c, h, w] = dims::<B>(&x);
        let (scale, shift) = (B::with_f32(&scale, |s| s.to_vec()), B::with_f32(&shift, |s| s.to_vec()));
        let y = B::with_f32(&x, |xs| apply(xs, &scale, &shift, c, h * w));
        B::from_f32(y, &[n, c, h, w], &x)
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, epsilon: f64) -> [FloatTensor<B>; 3] {
        let [n, c, h, w] = dims::<B>(&x);
        let hw = h * w;
        let count = (n * hw).max(1) as f64;
        let (gamma_v, beta_v) = (B::with_f32(&gamma, |s| s.to_vec()), B::with_f32(&beta, |s| s.to_vec()));
        let (y, mean, var) = B::with_f32(&x, |xs| {
            let stats = per_channel(n, c, hw, |plane, _, _| {
                let p = &xs[plane * hw..][..hw];
                plane_sums(p, p)
            });
            let mean: Vec<f32> = stats.iter().map(|(s, _)| (s / count) as f32).collect();
            let var: Vec<f32> = stats.iter().map(|(s, q)| (q / count - (s / count) * (s / count)).max(0.0) as f32).collect();
            let (scale, shift, _) = affine(&gamma_v, &beta_v, &mean, &var, epsilon);
            (apply(xs, &scale, &shift, c, hw), mean, var)
        });
        [B::from_f32(y, &[n, c, h, w], &x), B::from_f32(mean, &[c], &gamma), B::from_f32(var, &[c], &gamma)]
    }

    pub fn backward<B: CpuTensors>(saved: Saved<B>, epsilon: f64, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (x, gamma, beta, mean, var) = saved;
        let [n, c, h, w] = dims::<B>(&x);
        let hw = h * w;
        let count = (n * hw).max(1) as f32;
        let read = |t: &FloatTensor<B>| B::with_f32(t, |s| s.to_vec());
        let (gamma_v, mean_v) = (read(&gamma), read(&mean));
        let (scale, shift, rstd) = affine(&gamma_v, &read(&beta), &mean_v, &read(&var), epsilon);
        let (dx, dgamma, dbeta) = B::with_f32(&x, |xs| {
            B::with_f32(&grad, |gs| {
                let channel = |ci: usize| Channel { scale: scale[ci], shift: shift[ci], mean: mean_v[ci], rstd: rstd[ci] };
                let sums_of = per_channel(n, c, hw, |plane, ci, (g, x_hat)| {
                    masked_grad_plane(g, x_hat, &xs[plane * hw..][..hw], &gs[plane * hw..][..hw], channel(ci));
                    plane_sums(g, x_hat)
                });
                let dbeta: Vec<f32> = sums_of.iter().map(|(s, _)| *s as f32).collect();
                let dgamma: Vec<f32> = sums_of.iter().map(|(_, q)| *q as f32).collect();
                // SAFETY: the chunks are whole planes of hw floats, and input_grad_plane
                // writes every element of its plane (xs and gs have as many).
                let dx = if hw == 0 {
                    Vec::new()
                } else {
                    unsafe {
                        filled(xs.len(), hw, |plane, out| {
                            let ci = plane % c;
                            let (k, mb, mg) = (gamma_v[ci] * rstd[ci], dbeta[ci] / count, dgamma[ci] / count);
                            input_grad_plane(out, &xs[plane * hw..][..hw], &gs[plane * hw..][..hw], channel(ci), k, mb, mg);
                        })
                    }
                };
                (dx, dgamma, dbeta)
            })
        });
        [B::from_f32(dx, &[n, c, h, w], &x), B::from_f32(dgamma, &[c], &gamma), B::from_f32(dbeta, &[c], &gamma)]
    }
}

/// LayerNorm over the last dimension of a [rows, dim] matrix (the ViT keeps its tokens
/// as [N * T, dim]). Same parameters and semantics as burn's `LayerNorm` (biased
/// variance, gamma/beta), computed by [`layer_norm`].
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, epsilon: f64, device: &B::Device) -> Self {
        LayerNorm {
            gamma: Param::initialized(ParamId::new(), Tensor::ones([dim], device).require_grad()),
            beta: Param::initialized(ParamId::new(), Tensor::zeros([dim], device).require_grad()),
            epsilon,
        }
    }
}

impl<B: KernelBackend> LayerNorm<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}

/// LayerNorm of every row of x [rows, dim] as one op: y = (x - mean) / sqrt(var + eps)
/// * gamma + beta, the variance biased and computed from the centred row.
///
/// Why one op: composed of burn's ops it is seven element-wise passes and two
/// reductions forward and about twice that backward, which flex runs on the calling
/// thread (with GELU, the ViT's largest share of that thread, perf); on the CPU
/// backends ([`layer_cpu`]) each row is one task's few passes over data in cache.
pub fn layer_norm<B: KernelBackend>(x: Tensor<B, 2>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f64) -> Tensor<B, 2> {
    let [d] = gamma.dims();
    assert!(x.dims()[1] == d && beta.dims() == [d], "layer_norm needs gamma and beta of one value per column");
    let y = B::layer_norm_rows(x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor(), epsilon);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// What the LayerNorm op keeps for its backward: x, gamma, the rows' means and 1 / std.
pub type LayerSaved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

#[derive(Debug)]
pub(crate) struct LayerNormBackward;

impl<B: KernelBackend> Backward<B, 3> for LayerNormBackward {
    type State = LayerSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dx, dgamma, dbeta] = B::layer_norm_rows_backward(ops.state, grad);
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx, dgamma, dbeta]);
    }
}

/// The LayerNorm op in burn's own ops (GPU backends, and the tests' reference).
pub mod layer_reference {
    use super::*;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    /// (y, row means [rows], rows' 1 / std [rows]).
    pub fn forward<B: Backend>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, epsilon: f64) -> [FloatTensor<B>; 3] {
        let x: Tensor<B, 2> = t(x);
        let [rows, d] = x.dims();
        let mean = x.clone().mean_dim(1);
        let centred = x - mean.clone();
        let rstd = centred.clone().square().mean_dim(1).add_scalar(epsilon).sqrt().recip();
        let y = centred * rstd.clone() * t::<B, 1>(gamma).reshape([1, d]) + t::<B, 1>(beta).reshape([1, d]);
        [y.into_primitive().tensor(), mean.reshape([rows]).into_primitive().tensor(), rstd.reshape([rows]).into_primitive().tensor()]
    }

    pub fn backward<B: Backend>(saved: LayerSaved<B>, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (x, gamma, mean, rstd) = saved;
        let x: Tensor<B, 2> = t(x);
        let [rows, d] = x.dims();
        let (mean, rstd) = (t::<B, 1>(mean).reshape([rows, 1]), t::<B, 1>(rstd).reshape([rows, 1]));
        let dy: Tensor<B, 2> = t(grad);
        let x_hat = (x - mean) * rstd.clone();
        let g = dy.clone() * t::<B, 1>(gamma).reshape([1, d]);
        let dx = rstd * (g.clone() - g.clone().mean_dim(1) - x_hat.clone() * (g * x_hat.clone()).mean_dim(1));
        let dgamma = (dy.clone() * x_hat).sum_dim(0).reshape([d]);
        let dbeta = dy.sum_dim(0).reshape([d]);
        [dx.into_primitive().tensor(), dgamma.into_primitive().tensor(), dbeta.into_primitive().tensor()]
    }
}

/// The LayerNorm op on the CPU backends: rows in fixed chunks, one task per chunk; the
/// gamma and beta gradients are per-chunk partial sums added in chunk order. So no
/// result depends on the thread count.
pub mod layer_cpu {
    use super::*;
    use crate::ml::cpu::CpuTensors;
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    /// Rows per task and per partial sum of the parameter gradients.
    const ROWS_PER_CHUNK: usize = 32;

    fn dims<B: Backend>(x: &FloatTensor<B>) -> [usize; 2] {
        use burn::tensor::TensorMetadata;
        x.shape().dims::<2>()
    }

    #[inline(always)]
    fn sum(v: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let chunks = v.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..16 {
                lanes[l] += c[l];
            }
        }
        for (l, x) in rest.iter().enumerate() {
            lanes[l] += x;
        }
        lanes.iter().sum()
    }

    crate::widest_fn! {
        /// One chunk of rows: y, and each row's mean and 1 / std.
        fn forward_rows(ys: &mut [MaybeUninit<f32>], ms: &mut [f32], rs: &mut [f32], xs: &[f32], gamma: &[f32], beta: &[f32], epsilon: f32) {
            let d = gamma.len();
            let mut centred = vec![0f32; d];
            let mut sq = vec![0f32; d];
            for ((yr, xr), (m, rstd)) in ys.chunks_mut(d).zip(xs.chunks(d)).zip(ms.iter_mut().zip(rs.iter_mut())) {
                *m = sum(xr) / d as f32;
                for (c, x) in centred.iter_mut().zip(xr) {
                    *c = x - *m;
                }
                for (q, c) in sq.iter_mut().zip(&centred) {
                    *q = c * c;
                }
                *rstd = 1.0 / (sum(&sq) / d as f32 + epsilon).sqrt();
                for ((o, c), (g, b)) in yr.iter_mut().zip(&centred).zip(gamma.iter().zip(beta)) {
                    o.write(c * *rstd * g + b);
                }
            }
        }
    }

    crate::widest_fn! {
        /// One chunk of rows of the backward: dx, and the chunk's partial sums of the
        /// gamma and beta gradients.
        fn backward_rows(dxs: &mut [MaybeUninit<f32>], xs: &[f32], gs: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32]) -> (Vec<f32>, Vec<f32>) {
            let d = gamma.len();
            let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
            let (mut x_hat, mut g, mut gx) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
            for (((out, xr), dy), (&m, &rs)) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)).zip(mean.iter().zip(rstd)) {
                for i in 0..d {
                    x_hat[i] = (xr[i] - m) * rs;
                    g[i] = dy[i] * gamma[i];
                    dgamma[i] += dy[i] * x_hat[i];
                    dbeta[i] += dy[i];
                }
                let mean_g = sum(&g) / d as f32;
                for i in 0..d {
                    gx[i] = g[i] * x_hat[i];
                }
                let mean_gx = sum(&gx) / d as f32;
                for i in 0..d {
                    out[i].write(rs * (g[i] - mean_g - x_hat[i] * mean_gx));
                }
            }
            (dgamma, dbeta)
        }
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>, gamma: FloatTensor<B>, beta: FloatTensor<B>, epsilon: f64) -> [FloatTensor<B>; 3] {
        let [rows, d] = dims::<B>(&x);
        let (gamma_v, beta_v) = (B::with_f32(&gamma, |s| s.to_vec()), B::with_f32(&beta, |s| s.to_vec()));
        let (y, mean, rstd) = B::with_f32(&x, |xs| {
            let len = rows * d;
            let mut y: Vec<f32> = Vec::with_capacity(len);
            let mut mean = vec![0f32; rows];
            let mut rstd = vec![0f32; rows];
            if d > 0 {
                y.spare_capacity_mut()[..len]
                    .par_chunks_mut(ROWS_PER_CHUNK * d)
                    .zip(mean.par_chunks_mut(ROWS_PER_CHUNK))
                    .zip(rstd.par_chunks_mut(ROWS_PER_CHUNK))
                    .enumerate()
                    .for_each(|(chunk, ((ys, ms), rs))| {
                        let xs = &xs[chunk * ROWS_PER_CHUNK * d..][..ys.len()];
                        forward_rows(ys, ms, rs, xs, &gamma_v, &beta_v, epsilon as f32);
                    });
            }
            // SAFETY: the capacity is at least len; with d > 0 the chunks above cover
            // 0..len and forward_rows writes every element of its rows (len is 0 else).
            unsafe { y.set_len(len) };
            (y, mean, rstd)
        });
        [B::from_f32(y, &[rows, d], &x), B::from_f32(mean, &[rows], &x), B::from_f32(rstd, &[rows], &x)]
    }

    pub fn backward<B: CpuTensors>(saved: LayerSaved<B>, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (x, gamma, mean, rstd) = saved;
        let [rows, d] = dims::<B>(&x);
        let read = |t: &FloatTensor<B>| B::with_f32(t, |s| s.to_vec());
        let (gamma_v, mean_v, rstd_v) = (read(&gamma), read(&mean), read(&rstd));
        let (dx, dgamma, dbeta) = B::with_f32(&x, |xs| {
            B::with_f32(&grad, |gs| {
                let len = rows * d;
                let mut dx: Vec<f32> = Vec::with_capacity(len);
                let partials: Vec<(Vec<f32>, Vec<f32>)> = if d == 0 {
                    Vec::new()
                } else {
                    dx.spare_capacity_mut()[..len]
                        .par_chunks_mut(ROWS_PER_CHUNK * d)
                        .enumerate()
                        .map(|(chunk, dxs)| {
                            let (first, n) = (chunk * ROWS_PER_CHUNK, dxs.len() / d);
                            let (xs, gs) = (&xs[first * d..][..dxs.len()], &gs[first * d..][..dxs.len()]);
                            backward_rows(dxs, xs, gs, &mean_v[first..first + n], &rstd_v[first..first + n], &gamma_v)
                        })
                        .collect()
                };
                // SAFETY: as in the forward, backward_rows wrote every element of 0..len.
                unsafe { dx.set_len(len) };
                let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
                for (pg, pb) in partials {
                    for i in 0..d {
                        dgamma[i] += pg[i];
                        dbeta[i] += pb[i];
                    }
                }
                (dx, dgamma, dbeta)
            })
        });
        [B::from_f32(dx, &[rows, d], &x), B::from_f32(dgamma, &[d], &gamma), B::from_f32(dbeta, &[d], &gamma)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::tensor::ops::FloatTensor;
    use burn::nn::BatchNormConfig;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn close(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) {
        close_within(a, b, 1e-4);
    }

    /// Relative to the size of the value.
    fn close_within(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>, tolerance: f32) {
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
        assert!(worst < tolerance, "max difference {worst}");
    }

    #[test]
    fn matches_burns_batchnorm_in_training_and_inference() {
        let d = Default::default();
        let data = Tensor::<Flex, 4>::random([4, 3, 5, 5], Distribution::Normal(2.0, 3.0), &d).into_data();
        let x = || Tensor::<AD, 4>::from_data(data.clone(), &d);
        let ours = BatchNorm2d::<AD>::new(3, &d);
        let theirs = BatchNormConfig::new(3).init::<AD>(&d);
        close(ours.forward(x()).inner(), theirs.forward(x()).inner());
        // After that one update, inference uses the running statistics.
        let xi = Tensor::<Flex, 4>::from_data(data.clone(), &d);
        close(ours.valid().forward(xi.clone()), theirs.valid().forward(xi));
    }

    /// The fused BatchNorm + ReLU equals BatchNorm2d then relu: output, the gradients of
    /// x, gamma and beta, and the running statistics; odd sizes, and 1x1 planes. The
    /// input is centred and every channel has 16 values or more: the composed ops compute
    /// the variance as E[x^2] - E[x]^2 in f32, which cancels when a channel's spread is
    /// small next to its mean (with two values per channel, 1/std was off by up to 4%;
    /// the fused op adds the planes' sums in f64).
    #[test]
    fn fused_batch_norm_relu_matches_the_composed_ops() {
        let d = Default::default();
        Flex::seed(&d, 7);
        for [n, c, h, w] in [[4, 3, 5, 5], [3, 5, 7, 3], [16, 2, 1, 1]] {
            let xd = Tensor::<Flex, 4>::random([n, c, h, w], Distribution::Normal(0.0, 2.0), &d).into_data();
            let gd = Tensor::<Flex, 4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d).into_data();
            let gamma = Tensor::<Flex, 1>::random([c], Distribution::Normal(1.0, 0.5), &d).into_data();
            let beta = Tensor::<Flex, 1>::random([c], Distribution::Normal(0.0, 0.5), &d).into_data();
            let run = |fused: bool| {
                let mut bn = BatchNorm2d::<AD>::new(c, &d);
                bn.gamma = Param::initialized(ParamId::new(), Tensor::from_data(gamma.clone(), &d).require_grad());
                bn.beta = Param::initialized(ParamId::new(), Tensor::from_data(beta.clone(), &d).require_grad());
                let x = Tensor::<AD, 4>::from_data(xd.clone(), &d).require_grad();
                let y = if fused { bn.forward_relu(x.clone()) } else { relu(bn.forward(x.clone())) };
                let grads = (y.clone() * Tensor::<AD, 4>::from_data(gd.clone(), &d)).sum().backward();
                let flat = |t: Tensor<Flex, 1>| t.reshape([1, 1, 1, -1]);
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    flat(bn.gamma.val().grad(&grads).unwrap()),
                    flat(bn.beta.val().grad(&grads).unwrap()),
                    flat(bn.running_mean.value().inner()),
                    flat(bn.running_var.value().inner()),
                )
            };
            let (a, b) = (run(true), run(false));
            close(a.0, b.0);
            close_within(a.1, b.1, 1e-3);
            close(a.2, b.2);
            close(a.3, b.3);
            close(a.4, b.4);
            close(a.5, b.5);
        }
    }

    /// In inference (running statistics) the fused path equals BatchNorm2d then relu.
    #[test]
    fn fused_inference_matches_the_composed_ops() {
        let d = Default::default();
        Flex::seed(&d, 9);
        let trained = BatchNorm2d::<AD>::new(3, &d);
        let _ = trained.forward_relu(Tensor::<AD, 4>::random([4, 3, 5, 5], Distribution::Normal(1.0, 2.0), &d));
        let bn = trained.valid();
        let x = Tensor::<Flex, 4>::random([2, 3, 6, 7], Distribution::Normal(0.5, 2.0), &d);
        close(bn.forward_relu(x.clone()), relu(bn.forward(x)));
    }

    /// The CPU kernels and the burn-ops reference agree, and the kernels give the same
    /// bits with one thread and with three.
    #[test]
    fn fused_batch_norm_relu_kernels_do_not_depend_on_the_thread_count() {
        let d = Default::default();
        Flex::seed(&d, 7);
        let prim = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
        let prim1 = |t: Tensor<Flex, 1>| t.into_primitive().tensor();
        let x = Tensor::<Flex, 4>::random([6, 4, 9, 11], Distribution::Normal(0.3, 1.5), &d);
        let g = Tensor::<Flex, 4>::random([6, 4, 9, 11], Distribution::Normal(0.0, 1.0), &d);
        let gamma = Tensor::<Flex, 1>::random([4], Distribution::Normal(1.0, 0.5), &d);
        let beta = Tensor::<Flex, 1>::random([4], Distribution::Normal(0.0, 0.5), &d);
        let bits = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let [y, mean, var] = cpu::forward::<Flex>(prim(x.clone()), prim1(gamma.clone()), prim1(beta.clone()), 1e-5);
                let saved = (prim(x.clone()), prim1(gamma.clone()), prim1(beta.clone()), mean.clone(), var.clone());
                let grads = cpu::backward::<Flex>(saved, 1e-5, prim(g.clone()));
                [y, mean, var].into_iter().chain(grads).map(|t| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap()).collect::<Vec<_>>()
            })
        };
        let one = bits(1);
        assert_eq!(one, bits(3));
        let [y, mean, var] = reference::forward::<Flex>(prim(x.clone()), prim1(gamma.clone()), prim1(beta.clone()), 1e-5);
        let saved = (prim(x.clone()), prim1(gamma.clone()), prim1(beta.clone()), mean.clone(), var.clone());
        let grads = reference::backward::<Flex>(saved, 1e-5, prim(g.clone()));
        for (ours, theirs) in one.iter().zip([y, mean, var].into_iter().chain(grads)) {
            let theirs = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(theirs)).into_data().to_vec::<f32>().unwrap();
            let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst}");
        }
    }

    /// The LayerNorm op's CPU kernels equal the burn-ops reference (values and the three
    /// gradients, rows not a multiple of the chunk, a row with a large mean) and give
    /// the same bits with one thread and with three.
    #[test]
    fn layer_norm_kernels_match_the_reference_and_the_thread_count() {
        let d = Default::default();
        Flex::seed(&d, 7);
        let x = Tensor::<Flex, 2>::random([75, 24], Distribution::Normal(0.3, 1.5), &d);
        let x = Tensor::cat(vec![x.clone().slice([0..1, 0..24]).add_scalar(1000.0), x.slice([1..75, 0..24])], 0);
        let g = Tensor::<Flex, 2>::random([75, 24], Distribution::Normal(0.0, 1.0), &d);
        let gamma = Tensor::<Flex, 1>::random([24], Distribution::Normal(1.0, 0.5), &d).into_primitive().tensor();
        let beta = Tensor::<Flex, 1>::random([24], Distribution::Normal(0.0, 0.5), &d).into_primitive().tensor();
        let (xp, gp) = (x.into_primitive().tensor(), g.into_primitive().tensor());
        let flat = |t: FloatTensor<Flex>| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap();
        let run = |cpu: bool| {
            let [y, mean, rstd] = if cpu {
                layer_cpu::forward::<Flex>(xp.clone(), gamma.clone(), beta.clone(), 1e-6)
            } else {
                layer_reference::forward::<Flex>(xp.clone(), gamma.clone(), beta.clone(), 1e-6)
            };
            let saved = (xp.clone(), gamma.clone(), mean.clone(), rstd.clone());
            let grads = if cpu { layer_cpu::backward::<Flex>(saved, gp.clone()) } else { layer_reference::backward::<Flex>(saved, gp.clone()) };
            [y, mean, rstd].into_iter().chain(grads).map(flat).collect::<Vec<_>>()
        };
        let in_pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run(true));
        let ours = in_pool(1);
        assert_eq!(ours, in_pool(3));
        for (a, b) in ours.iter().zip(run(false)) {
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst}");
        }
    }

    #[test]
    fn layer_norm_matches_burns() {
        let d = Default::default();
        let x = Tensor::<Flex, 3>::random([2, 3, 8], Distribution::Normal(1.0, 2.0), &d);
        let ours = LayerNorm::<Flex>::new(8, 1e-6, &d);
        let theirs = burn::nn::LayerNormConfig::new(8).with_epsilon(1e-6).init::<Flex>(&d);
        let a = ours.forward(x.clone().reshape([6, 8])).reshape([2, 3, 8, 1]);
        close(a, theirs.forward(x).reshape([2, 3, 8, 1]));
    }
}
