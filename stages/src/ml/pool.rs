//! 2x2 max pooling with stride 2 (the CNN's, between stages) as one op, and the global
//! average pooling that ends the CNN and EfficientNet ([`global_mean`]).
//!
//! Why: flex pools through a general 3-D kernel that keeps an index per output and
//! scatters the gradient back through those indices; in the CNN's training step that
//! was 6-10% of the samples (perf, 2 threads). The CPU kernel ([`cpu`]) keeps flex's
//! rule for ties (a window's first element is taken, then a later one only if strictly
//! greater, in row-major order, so a NaN in the first position stays) and its backward
//! recomputes each window's winner from the saved input instead of storing indices, then
//! adds the gradient to zeros there as flex does: forward and gradient are flex's bits
//! (tested). A remainder row or column (odd sizes) is dropped, as flex drops it. Both
//! run a row of windows at a time with selects instead of branches, which the compiler
//! turns into vector code (one window at a time, with branches and an index scattered
//! into a zeroed gradient, they were 9% of the CNN's training step).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::KernelBackend;

/// [N, C, H, W] -> [N, C, H / 2, W / 2], the maximum of each 2x2 window.
pub fn max_pool_2x2<B: KernelBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::max_pool_2x2(x.into_primitive().tensor())))
}

#[derive(Debug)]
pub(crate) struct MaxPoolBackward;

impl<B: KernelBackend> Backward<B, 1> for MaxPoolBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::max_pool_2x2_backward(ops.state, grad));
        }
    }
}

/// [N, C, H, W] -> [N, C], the mean of each plane: burn's `mean_dims(&[2, 3])` (so the
/// forward is the backend's own `mean_dim`, twice). Its own op for the backward: burn
/// differentiates each `mean_dim` by multiplying a tensor of ones by 1 / size and then
/// by the gradient broadcast over the plane, which flex runs through its strided
/// element iterator on one thread (4% of the CNN's training step, with the other core
/// waiting). The CPU kernel computes the same products and sums, plane by plane in
/// parallel: burn's bits (tested, zeros of both signs included).
pub fn global_mean<B: KernelBackend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::global_mean(x.into_primitive().tensor())))
}

#[derive(Debug)]
pub(crate) struct GlobalMeanBackward {
    pub shape: [usize; 4],
}

impl<B: KernelBackend> Backward<B, 1> for GlobalMeanBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::global_mean_backward(grad, self.shape));
        }
    }
}

/// The reciprocal burn's `mean_dim` backward scales by, as the f32 it becomes.
fn reciprocal(size: usize) -> f32 {
    (1.0 / size as f64) as f32
}

/// The op in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;
    use burn::tensor::TensorMetadata;

    pub fn forward<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        B::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    pub fn backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let indices = B::max_pool2d_with_indices(x.clone(), [2, 2], [2, 2], [0, 0], [1, 1], false).indices;
        B::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad
    }

    pub fn global_mean<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let [n, c, _, _] = x.shape().dims::<4>();
        B::float_reshape(B::float_mean_dim(B::float_mean_dim(x, 2), 3), [n, c].into())
    }

    /// burn's backward of `mean_dim(2)` then `mean_dim(3)`, run in reverse: each is
    /// (ones * 1 / size) * the gradient summed over that (size-1) dimension, broadcast.
    pub fn global_mean_backward<B: Backend>(grad: FloatTensor<B>, [n, c, h, w]: [usize; 4]) -> FloatTensor<B> {
        let device = B::float_device(&grad);
        let dtype = grad.dtype();
        let g = B::float_reshape(grad, [n, c, 1, 1].into());
        let scale_w = B::float_mul_scalar(B::float_ones([n, c, 1, w].into(), &device, dtype.into()), reciprocal(w).into());
        let g = B::float_mul(scale_w, B::float_sum_dim(g, 3));
        let scale_h = B::float_mul_scalar(B::float_ones([n, c, h, w].into(), &device, dtype.into()), reciprocal(h).into());
        B::float_mul(scale_h, B::float_sum_dim(g, 2))
    }
}

/// The op on the CPU backends: planes in parallel, each by one task.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, filled, zeros};
    use burn::tensor::TensorMetadata;
    use std::mem::MaybeUninit;

    /// Planes per task: at least about 4096 outputs (the last stage's planes are 3x3).
    fn min_planes(plane: usize) -> usize {
        4096usize.div_ceil(plane.max(1))
    }

    /// Which of a window's four values (a, b on top, c, d below, row-major) wins: the
    /// first, then a later one only where strictly greater (flex's rule).
    #[inline(always)]
    fn winner(a: f32, b: f32, c: f32, d: f32) -> (f32, u32) {
        let (mut v, mut i) = (a, 0);
        for (u, j) in [(b, 1), (c, 2), (d, 3)] {
            // Branch-free selects, so that a row of windows becomes vector code.
            let later = u > v;
            v = if later { u } else { v };
            i = if later { j } else { i };
        }
        (v, i)
    }

    crate::widest_fn! {
        /// One row of windows: out[x] = the winner of r0[2x..2x+2], r1[2x..2x+2].
        fn forward_row(r0: &[f32], r1: &[f32], out: &mut [MaybeUninit<f32>]) {
            let ow = out.len();
            let (r0, r1) = (&r0[..2 * ow], &r1[..2 * ow]);
            for x in 0..ow {
                out[x].write(winner(r0[2 * x], r0[2 * x + 1], r1[2 * x], r1[2 * x + 1]).0);
            }
        }
    }

    crate::widest_fn! {
        /// The gradient of one row of windows: 0 + g at each window's winner (added to
        /// zero, as flex scatters it: -0.0 becomes 0.0 alike), 0 at the other three, and
        /// at a last column no window covers.
        fn backward_row(r0: &[f32], r1: &[f32], g: &[f32], o0: &mut [MaybeUninit<f32>], o1: &mut [MaybeUninit<f32>]) {
            let ow = g.len();
            let (r0, r1) = (&r0[..2 * ow], &r1[..2 * ow]);
            let w = o0.len();
            let (o0, o1) = (&mut o0[..w], &mut o1[..w]);
            for x in 0..ow {
                let (_, i) = winner(r0[2 * x], r0[2 * x + 1], r1[2 * x], r1[2 * x + 1]);
                let v = 0.0 + g[x];
                o0[2 * x].write(if i == 0 { v } else { 0.0 });
                o0[2 * x + 1].write(if i == 1 { v } else { 0.0 });
                o1[2 * x].write(if i == 2 { v } else { 0.0 });
                o1[2 * x + 1].write(if i == 3 { v } else { 0.0 });
            }
            for x in 2 * ow..w {
                o0[x].write(0.0);
                o1[x].write(0.0);
            }
        }
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>) -> FloatTensor<B> {
        let [n, c, h, w] = x.shape().dims::<4>();
        let (oh, ow) = (h / 2, w / 2);
        let y = B::with_f32(&x, |xs| {
            if oh * ow == 0 {
                return Vec::new();
            }
            // Planes per task as for the gradient below; each output element written once.
            let planes = min_planes(oh * ow);
            // SAFETY: each chunk is `planes` whole output planes (the last may have fewer),
            // and forward_row writes every element of each of its rows.
            unsafe {
                filled(n * c * oh * ow, planes * oh * ow, |chunk, out| {
                    for (i, out) in out.chunks_mut(oh * ow).enumerate() {
                        let p = &xs[(chunk * planes + i) * h * w..][..h * w];
                        for (oy, row) in out.chunks_mut(ow).enumerate() {
                            forward_row(&p[2 * oy * w..][..w], &p[(2 * oy + 1) * w..][..w], row);
                        }
                    }
                })
            }
        });
        B::from_f32(y, &[n, c, oh, ow], &x)
    }

    pub fn backward<B: CpuTensors>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let [n, c, h, w] = x.shape().dims::<4>();
        let (oh, ow) = (h / 2, w / 2);
        let dx = B::with_f32(&x, |xs| {
            B::with_f32(&grad, |gs| {
                if oh * ow == 0 {
                    return zeros(n * c * h * w);
                }
                let planes = min_planes(h * w);
                // SAFETY: each chunk is `planes` whole input planes (the last may have
                // fewer); backward_row writes every element of both rows it is given, and
                // a last row no window covers is filled with zeros.
                unsafe {
                    filled(n * c * h * w, planes * h * w, |chunk, out| {
                        for (i, out) in out.chunks_mut(h * w).enumerate() {
                            let plane = chunk * planes + i;
                            let (p, g) = (&xs[plane * h * w..][..h * w], &gs[plane * oh * ow..][..oh * ow]);
                            let (pairs, rest) = out.split_at_mut(2 * oh * w);
                            for (oy, rows) in pairs.chunks_mut(2 * w).enumerate() {
                                let (o0, o1) = rows.split_at_mut(w);
                                backward_row(&p[2 * oy * w..][..w], &p[(2 * oy + 1) * w..][..w], &g[oy * ow..][..ow], o0, o1);
                            }
                            rest.fill(MaybeUninit::new(0.0));
                        }
                    })
                }
            })
        });
        B::from_f32(dx, &[n, c, h, w], &x)
    }

    /// Each plane of the input gradient is one value, (1 / H) * (0 + (1 / W) * (0 + g)):
    /// the zeros are burn's sums over a dimension of size 1, which turn -0.0 into 0.0.
    pub fn global_mean_backward<B: CpuTensors>(grad: FloatTensor<B>, [n, c, h, w]: [usize; 4]) -> FloatTensor<B> {
        let (sh, sw) = (reciprocal(h), reciprocal(w));
        let hw = h * w;
        let dx = B::with_f32(&grad, |gs| {
            assert_eq!(gs.len(), n * c, "global mean: the gradient is [n, c]");
            if hw == 0 {
                return Vec::new();
            }
            let planes = min_planes(hw);
            // SAFETY: each chunk is `planes` whole planes (the last may have fewer), and
            // every element of each is written.
            unsafe {
                filled(n * c * hw, planes * hw, |chunk, out| {
                    for (i, plane) in out.chunks_mut(hw).enumerate() {
                        let v = sh * (0.0 + sw * (0.0 + gs[chunk * planes + i]));
                        plane.fill(std::mem::MaybeUninit::new(v));
                    }
                })
            }
        });
        B::from_f32(dx, &[n, c, h, w], &grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    fn flat(t: FloatTensor<Flex>) -> Vec<u32> {
        Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Forward and gradient are flex's bits, on values with many ties (zeros of both
    /// signs, repeated values, a NaN), odd sizes and planes too small to pool.
    #[test]
    fn matches_flex_bit_for_bit_with_ties() {
        let d = Default::default();
        for [n, c, h, w] in [[2, 3, 6, 8], [1, 2, 7, 5], [3, 1, 1, 4], [1, 4, 3, 3]] {
            let len = n * c * h * w;
            let vals: Vec<f32> = (0..len)
                .map(|i| match (i * 7919) % 11 {
                    0 | 1 => 0.0,
                    2 => -0.0,
                    3 if i == 5 => f32::NAN,
                    k => (k as f32 - 6.0) * 0.5,
                })
                .collect();
            let x = Tensor::<Flex, 4>::from_data(TensorData::new(vals, [n, c, h, w]), &d).into_primitive().tensor();
            let g: Vec<f32> = (0..n * c * (h / 2) * (w / 2)).map(|i| if i % 3 == 0 { -0.0 } else { i as f32 - 4.5 }).collect();
            let g = Tensor::<Flex, 4>::from_data(TensorData::new(g, [n, c, h / 2, w / 2]), &d).into_primitive().tensor();
            assert_eq!(flat(cpu::forward::<Flex>(x.clone())), flat(reference::forward::<Flex>(x.clone())), "forward {n}x{c}x{h}x{w}");
            assert_eq!(flat(cpu::backward::<Flex>(x.clone(), g.clone())), flat(reference::backward::<Flex>(x, g)), "backward {n}x{c}x{h}x{w}");
        }
    }

    /// The global mean is burn's `mean_dims(&[2, 3])` bit for bit, values and input
    /// gradients (under autodiff, with a gradient holding zeros of both signs), and the
    /// CPU backward is the reference backward's bits.
    #[test]
    fn global_mean_matches_burns_mean_dims_bit_for_bit() {
        type AD = burn::backend::Autodiff<Flex>;
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let d = Default::default();
        for [n, c, h, w] in [[2, 3, 7, 7], [1, 2, 3, 5], [3, 1, 1, 1], [2, 4, 6, 4]] {
            let vals: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 97) as f32 * 0.37 - 11.0).collect();
            let weights: Vec<f32> = (0..n * c).map(|i| if i % 4 == 0 { -0.0 } else { i as f32 * 0.3 - 1.1 }).collect();
            let run = |ours: bool| {
                let x = Tensor::<AD, 4>::from_data(TensorData::new(vals.clone(), [n, c, h, w]), &d).require_grad();
                let y = if ours { global_mean(x.clone()) } else { x.clone().mean_dims(&[2, 3]).reshape([n, c]) };
                let grads = (y.clone() * Tensor::<AD, 2>::from_data(TensorData::new(weights.clone(), [n, c]), &d)).sum().backward();
                let dx = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
                (bits(y.into_data().to_vec::<f32>().unwrap()), bits(dx))
            };
            assert_eq!(run(true), run(false), "{n}x{c}x{h}x{w}");
            let g = Tensor::<Flex, 2>::from_data(TensorData::new(weights.clone(), [n, c]), &d).into_primitive().tensor();
            assert_eq!(
                flat(cpu::global_mean_backward::<Flex>(g.clone(), [n, c, h, w])),
                flat(reference::global_mean_backward::<Flex>(g, [n, c, h, w])),
                "backward {n}x{c}x{h}x{w}"
            );
        }
    }
}
