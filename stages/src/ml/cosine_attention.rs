//! Swin-V2's window attention as one op: scaled cosine attention with a learned scale
//! per head and an additive bias per window (the continuous position bias plus the
//! shift mask). For every window i and head j,
//! softmax(unit(q) unit(k)^T * scale_j + bias[i % W, j]) v, from the rows of the qkv
//! projection ([n * t, 3d]: q, k, v side by side) to the context ([n * t, d]), where
//! unit(x) = x / max(|x|, 1e-12) row by row, as timm's `F.normalize`.
//!
//! Why one op: composed of burn's ops, each of the three head splits and the merge is a
//! copy of a transposed tensor, the two normalisations five element-wise passes each,
//! then the scale, the bias, the softmax's passes and reductions and their backward,
//! all of which flex runs on the calling thread (the Swin-V2 step's time was mostly
//! that thread's, perf). On the CPU backends ([`cpu`]) one task per window runs every
//! head with small gemms reading q, k and v in place (strided); the gradients of the
//! scale and of the bias, sums over windows, are added afterwards in window order, so
//! results do not depend on the thread count. The attention weights are kept for the
//! backward ([n, heads, t, t]), the normalised q and k are recomputed there.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::attention::Heads;
use super::kernels::{KernelBackend, register_grads};

/// timm's `F.normalize` floor on a row's norm.
pub const NORM_FLOOR: f32 = 1e-12;

/// qkv [n * t, 3d], scale [heads], bias [W, heads, t, t] with n a multiple of W ->
/// context [n * t, d]: window i takes the bias of i % W (the windows of each image in
/// order, images one after another).
pub fn cosine_attention<B: KernelBackend>(qkv: Tensor<B, 2>, scale: Tensor<B, 1>, bias: Tensor<B, 4>, shape: Heads) -> Tensor<B, 2> {
    let [rows, d3] = qkv.dims();
    let [w, h, t1, t2] = bias.dims();
    assert!(
        rows == shape.n * shape.t
            && shape.heads > 0
            && d3 % (3 * shape.heads) == 0
            && scale.dims() == [shape.heads]
            && [h, t1, t2] == [shape.heads, shape.t, shape.t]
            && w > 0
            && shape.n % w == 0,
        "cosine_attention needs qkv [n * t, 3 * heads * dh], scale [heads], bias [W, heads, t, t] with W dividing n"
    );
    let out = B::cosine_attention(qkv.into_primitive().tensor(), scale.into_primitive().tensor(), bias.into_primitive().tensor(), shape);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// What the op keeps for its backward: qkv, the scale and the attention weights.
pub type Saved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

#[derive(Debug)]
pub(crate) struct CosineAttentionBackward {
    pub(crate) shape: Heads,
    /// W: how many biases the windows cycle through.
    pub(crate) windows: usize,
}

impl<B: KernelBackend> Backward<B, 3> for CosineAttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dqkv, dscale, dbias] = B::cosine_attention_backward(ops.state, self.shape, self.windows, grad);
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dqkv, dscale, dbias]);
    }
}

/// The op in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::backend::Backend;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    /// Part `i` (q, k, v) of qkv [n * t, 3d] -> [n, heads, t, dh].
    fn split<B: Backend>(qkv: &Tensor<B, 2>, i: usize, s: Heads) -> Tensor<B, 4> {
        let d = qkv.dims()[1] / 3;
        qkv.clone().narrow(1, i * d, d).reshape([s.n, s.t, s.heads, d / s.heads]).swap_dims(1, 2)
    }

    /// [n, heads, t, dh] -> [n * t, d].
    fn merge<B: Backend>(m: Tensor<B, 4>) -> Tensor<B, 2> {
        let [n, h, t, dh] = m.dims();
        m.swap_dims(1, 2).reshape([n * t, h * dh])
    }

    /// (unit rows, their norms before the floor).
    fn unit<B: Backend>(x: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let norm = x.clone().square().sum_dim(3).sqrt();
        (x / norm.clone().clamp_min(NORM_FLOOR), norm)
    }

    fn scale4<B: Backend>(scale: FloatTensor<B>, h: usize) -> Tensor<B, 4> {
        t::<B, 1>(scale).reshape([1, h, 1, 1])
    }

    /// (context [n * t, d], weights [n, heads, t, t]).
    pub fn forward<B: Backend>(qkv: FloatTensor<B>, scale: FloatTensor<B>, bias: FloatTensor<B>, s: Heads) -> [FloatTensor<B>; 2] {
        let qkv = t::<B, 2>(qkv);
        let bias = t::<B, 4>(bias);
        let w = bias.dims()[0];
        let (q, _) = unit(split(&qkv, 0, s));
        let (k, _) = unit(split(&qkv, 1, s));
        let scores = q.matmul(k.swap_dims(2, 3)) * scale4::<B>(scale, s.heads);
        let scores = scores.reshape([s.n / w, w * s.heads, s.t, s.t]) + bias.reshape([1, w * s.heads, s.t, s.t]);
        let weights = softmax(scores.reshape([s.n, s.heads, s.t, s.t]), 3);
        let context = weights.clone().matmul(split(&qkv, 2, s));
        [merge(context).into_primitive().tensor(), weights.into_primitive().tensor()]
    }

    /// The gradient of unit(x) given the gradient `g` of its output `u` and x's norms:
    /// (g - u (u . g)) / |x|, or g / floor where the floor applied.
    fn unit_backward<B: Backend>(u: Tensor<B, 4>, norm: Tensor<B, 4>, g: Tensor<B, 4>) -> Tensor<B, 4> {
        let above = norm.clone().greater_elem(NORM_FLOOR).float();
        let along = u.clone() * (u * g.clone()).sum_dim(3) * above;
        (g - along) / norm.clamp_min(NORM_FLOOR)
    }

    /// (dqkv [n * t, 3d], dscale [heads], dbias [windows, heads, t, t]).
    pub fn backward<B: Backend>(saved: Saved<B>, s: Heads, windows: usize, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (qkv, scale, p) = saved;
        let (qkv, p) = (t::<B, 2>(qkv), t::<B, 4>(p));
        let scale = scale4::<B>(scale, s.heads);
        let (q, q_norm) = unit(split(&qkv, 0, s));
        let (k, k_norm) = unit(split(&qkv, 1, s));
        let v = split(&qkv, 2, s);
        let dc = t::<B, 2>(grad).reshape([s.n, s.t, s.heads, qkv.dims()[1] / 3 / s.heads]).swap_dims(1, 2);
        let dv = p.clone().swap_dims(2, 3).matmul(dc.clone());
        let dp = dc.matmul(v.swap_dims(2, 3));
        let ds = p.clone() * (dp.clone() - (dp * p).sum_dim(3));
        let dbias = ds.clone().reshape([s.n / windows, windows * s.heads, s.t, s.t]).sum_dim(0).reshape([windows, s.heads, s.t, s.t]);
        let raw = q.clone().matmul(k.clone().swap_dims(2, 3));
        let dscale = (ds.clone() * raw).sum_dim(0).sum_dim(2).sum_dim(3).reshape([s.heads]);
        let ds = ds * scale;
        let dq = unit_backward(q.clone(), q_norm, ds.clone().matmul(k.clone()));
        let dk = unit_backward(k, k_norm, ds.swap_dims(2, 3).matmul(q));
        let dqkv = Tensor::cat(vec![merge(dq), merge(dk), merge(dv)], 1);
        [dqkv.into_primitive().tensor(), dscale.into_primitive().tensor(), dbias.into_primitive().tensor()]
    }
}

/// The op on the CPU backends: one task per window, every head in order.
pub mod cpu {
    use super::*;
    use crate::ml::attention::cpu::{softmax_backward, softmax_row};
    use crate::ml::cpu::{CpuTensors, View, mm, zeros};
    use burn::tensor::TensorMetadata;
    use rayon::prelude::*;

    /// The unit rows (into `out`, [t, dh]) and norms (into `norms`) of the t rows of
    /// width dh at `offset` in rows of `stride` from `base`.
    #[allow(clippy::too_many_arguments)]
    fn unit_rows(x: &[f32], base: usize, stride: usize, offset: usize, t: usize, dh: usize, out: &mut [f32], norms: &mut [f32]) {
        for r in 0..t {
            let row = &x[base + r * stride + offset..][..dh];
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            norms[r] = norm;
            let floor = norm.max(NORM_FLOOR);
            for (o, v) in out[r * dh..][..dh].iter_mut().zip(row) {
                *o = v / floor;
            }
        }
    }

    /// The gradient of unit rows `u` ([t, dh], norms `norms`) given their gradient `g`,
    /// written into t rows of `out` of width dh at `offset` in rows of `stride`:
    /// (g - u (u . g)) / |x|, or g / floor where the floor applied.
    #[allow(clippy::too_many_arguments)]
    fn unit_backward(g: &[f32], u: &[f32], norms: &[f32], out: &mut [f32], offset: usize, stride: usize, t: usize, dh: usize) {
        for r in 0..t {
            let (g, u) = (&g[r * dh..][..dh], &u[r * dh..][..dh]);
            let o = &mut out[r * stride + offset..][..dh];
            if norms[r] > NORM_FLOOR {
                let dot: f32 = u.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                    *o = (g - u * dot) / norms[r];
                }
            } else {
                for (o, g) in o.iter_mut().zip(g) {
                    *o = g / NORM_FLOOR;
                }
            }
        }
    }

    /// A task's buffers for one head: unit q and k rows and their norms, a [t, t]
    /// product and a [t, dh] gradient.
    struct Scratch {
        q: Vec<f32>,
        k: Vec<f32>,
        q_norms: Vec<f32>,
        k_norms: Vec<f32>,
        square: Vec<f32>,
        rows: Vec<f32>,
    }

    impl Scratch {
        fn new(t: usize, dh: usize) -> Self {
            Scratch { q: vec![0.0; t * dh], k: vec![0.0; t * dh], q_norms: vec![0.0; t], k_norms: vec![0.0; t], square: vec![0.0; t * t], rows: vec![0.0; t * dh] }
        }

        /// q and k of head j (columns j * dh of q's and k's parts) of the window whose
        /// rows start at `base`.
        fn load(&mut self, qkv: &[f32], base: usize, d: usize, j: usize, t: usize, dh: usize) {
            unit_rows(qkv, base, 3 * d, j * dh, t, dh, &mut self.q, &mut self.q_norms);
            unit_rows(qkv, base, 3 * d, d + j * dh, t, dh, &mut self.k, &mut self.k_norms);
        }
    }

    fn sizes<B: CpuTensors>(qkv: &FloatTensor<B>, s: Heads) -> (usize, usize, usize) {
        let [_, d3] = qkv.shape().dims::<2>();
        let d = d3 / 3;
        (s.t, d, d / s.heads)
    }

    pub fn forward<B: CpuTensors>(qkv: FloatTensor<B>, scale: FloatTensor<B>, bias: FloatTensor<B>, s: Heads) -> [FloatTensor<B>; 2] {
        let (t, d, dh) = sizes::<B>(&qkv, s);
        let h = s.heads;
        let windows = bias.shape().dims::<4>()[0];
        let mut context = zeros(s.n * t * d);
        let mut weights = zeros(s.n * h * t * t);
        if t > 0 && dh > 0 {
            B::with_f32(&qkv, |x| {
                B::with_f32(&scale, |sc| {
                    B::with_f32(&bias, |bs| {
                        context.par_chunks_mut(t * d).zip(weights.par_chunks_mut(h * t * t)).enumerate().for_each_init(
                            || Scratch::new(t, dh),
                            |scratch, (i, (ctx, ps))| {
                                let base = i * t * 3 * d;
                                for j in 0..h {
                                    scratch.load(x, base, d, j, t, dh);
                                    let p = &mut ps[j * t * t..][..t * t];
                                    let rows = View { offset: 0, rs: dh, cs: 1 };
                                    mm(p, View { offset: 0, rs: t, cs: 1 }, &scratch.q, rows, &scratch.k, View { offset: 0, rs: 1, cs: dh }, t, t, dh, 1.0, false);
                                    let b = &bs[((i % windows) * h + j) * t * t..][..t * t];
                                    for (v, b) in p.iter_mut().zip(b) {
                                        *v = *v * sc[j] + b;
                                    }
                                    for r in p.chunks_mut(t) {
                                        softmax_row(r);
                                    }
                                    let v = View { offset: base + 2 * d + j * dh, rs: 3 * d, cs: 1 };
                                    mm(ctx, View { offset: j * dh, rs: d, cs: 1 }, p, View { offset: 0, rs: t, cs: 1 }, x, v, t, dh, t, 1.0, false);
                                }
                            },
                        );
                    })
                })
            });
        }
        [B::from_f32(context, &[s.n * t, d], &qkv), B::from_f32(weights, &[s.n, h, t, t], &qkv)]
    }

    pub fn backward<B: CpuTensors>(saved: Saved<B>, s: Heads, windows: usize, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (qkv, scale, p) = saved;
        let (t, d, dh) = sizes::<B>(&qkv, s);
        let h = s.heads;
        let mut dqkv = zeros(s.n * t * 3 * d);
        // dS of every window and head, and each window's share of dscale, summed over
        // windows below in window order.
        let mut ds_all = zeros(s.n * h * t * t);
        let mut dscale_parts = zeros(s.n * h);
        if t > 0 && dh > 0 {
            B::with_f32(&qkv, |x| {
                B::with_f32(&scale, |sc| {
                    B::with_f32(&p, |pw| {
                        B::with_f32(&grad, |gs| {
                            dqkv.par_chunks_mut(t * 3 * d)
                                .zip(ds_all.par_chunks_mut(h * t * t))
                                .zip(dscale_parts.par_chunks_mut(h))
                                .enumerate()
                                .for_each_init(
                                    || Scratch::new(t, dh),
                                    |scratch, (i, ((dx, dsi), dsc))| {
                                        let base = i * t * 3 * d;
                                        let square = View { offset: 0, rs: t, cs: 1 };
                                        let square_t = View { offset: 0, rs: 1, cs: t };
                                        let rows = View { offset: 0, rs: dh, cs: 1 };
                                        for j in 0..h {
                                            scratch.load(x, base, d, j, t, dh);
                                            let pij = &pw[(i * h + j) * t * t..][..t * t];
                                            let dc = View { offset: i * t * d + j * dh, rs: d, cs: 1 };
                                            // dV = P^T dC.
                                            mm(dx, View { offset: 2 * d + j * dh, rs: 3 * d, cs: 1 }, pij, square_t, gs, dc, t, dh, t, 1.0, false);
                                            // dP = dC V^T, then dS = P * (dP - rowsum(dP * P)).
                                            let ds = &mut dsi[j * t * t..][..t * t];
                                            let v_t = View { offset: base + 2 * d + j * dh, rs: 1, cs: 3 * d };
                                            mm(ds, square, gs, dc, x, v_t, t, t, dh, 1.0, false);
                                            softmax_backward(ds, pij, t, 1.0);
                                            // This window's part of dscale_j: dS . (unit(q) unit(k)^T).
                                            mm(&mut scratch.square, square, &scratch.q, rows, &scratch.k, View { offset: 0, rs: 1, cs: dh }, t, t, dh, 1.0, false);
                                            dsc[j] = ds.iter().zip(&scratch.square).map(|(a, b)| a * b).sum();
                                            // The scores' gradient: dS * scale_j.
                                            for (o, g) in scratch.square.iter_mut().zip(ds.iter()) {
                                                *o = g * sc[j];
                                            }
                                            // d unit(q) = scores' gradient * unit(k); d unit(k) = its transpose * unit(q).
                                            mm(&mut scratch.rows, rows, &scratch.square, square, &scratch.k, rows, t, dh, t, 1.0, false);
                                            unit_backward(&scratch.rows, &scratch.q, &scratch.q_norms, dx, j * dh, 3 * d, t, dh);
                                            mm(&mut scratch.rows, rows, &scratch.square, square_t, &scratch.q, rows, t, dh, t, 1.0, false);
                                            unit_backward(&scratch.rows, &scratch.k, &scratch.k_norms, dx, d + j * dh, 3 * d, t, dh);
                                        }
                                    },
                                );
                        })
                    })
                })
            });
        }
        // One [t, t] bias matrix per task, its windows added in window order.
        let mut dbias = zeros(windows * h * t * t);
        if t > 0 {
            dbias.par_chunks_mut(t * t).enumerate().for_each(|(wj, out)| {
                let (w, j) = (wj / h, wj % h);
                for i in (w..s.n).step_by(windows) {
                    for (o, g) in out.iter_mut().zip(&ds_all[(i * h + j) * t * t..][..t * t]) {
                        *o += g;
                    }
                }
            });
        }
        let mut dscale = vec![0f32; h];
        for part in dscale_parts.chunks(h) {
            for (o, g) in dscale.iter_mut().zip(part) {
                *o += g;
            }
        }
        [
            B::from_f32(dqkv, &[s.n * t, 3 * d], &qkv),
            B::from_f32(dscale, &[h], &qkv),
            B::from_f32(dbias, &[windows, h, t, t], &qkv),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;
    use burn::tensor::backend::Backend;

    type AD = Autodiff<Flex>;

    fn flat(t: FloatTensor<Flex>) -> Vec<f32> {
        Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{what}: {x} against {y}");
        }
    }

    /// Inputs of a shape: qkv (with `zero_row`, the first q row zero, where the norm's
    /// floor applies; burn's autodiff of the composed ops gives NaN there), scales, biases with -100 entries as the shift mask has, a gradient.
    fn inputs(s: Heads, windows: usize, dh: usize, zero_row: bool) -> [FloatTensor<Flex>; 4] {
        let dev = Default::default();
        let d = s.heads * dh;
        let mut qkv = Tensor::<Flex, 2>::random([s.n * s.t, 3 * d], Distribution::Normal(0.0, 1.5), &dev).into_data().to_vec::<f32>().unwrap();
        if zero_row {
            qkv[..dh].fill(0.0);
        }
        let qkv = Tensor::<Flex, 2>::from_data(burn::tensor::TensorData::new(qkv, [s.n * s.t, 3 * d]), &dev);
        let scale = Tensor::<Flex, 1>::random([s.heads], Distribution::Uniform(0.5, 10.0), &dev);
        let bias = Tensor::<Flex, 4>::random([windows, s.heads, s.t, s.t], Distribution::Normal(0.0, 2.0), &dev);
        let mask = Tensor::<Flex, 4>::random([windows, s.heads, s.t, s.t], Distribution::Bernoulli(0.2), &dev).mul_scalar(-100.0);
        let grad = Tensor::<Flex, 2>::random([s.n * s.t, d], Distribution::Normal(0.0, 1.0), &dev);
        [qkv.into_primitive().tensor(), scale.into_primitive().tensor(), (bias + mask).into_primitive().tensor(), grad.into_primitive().tensor()]
    }

    /// The CPU kernels equal the burn-ops reference (context, weights and the three
    /// gradients; one token, one window per bias, odd sizes) and give the same bits
    /// with 1 and 3 threads.
    #[test]
    fn kernels_match_the_reference_and_do_not_depend_on_the_thread_count() {
        Flex::seed(&Default::default(), 5);
        for (s, windows, dh) in [(Heads { n: 4, t: 5, heads: 2 }, 2, 3), (Heads { n: 3, t: 1, heads: 3 }, 1, 2), (Heads { n: 4, t: 9, heads: 1 }, 4, 5), (Heads { n: 6, t: 4, heads: 2 }, 3, 4)] {
            let [qkv, scale, bias, grad] = inputs(s, windows, dh, true);
            let run = |cpu: bool| {
                let [c, p] = if cpu { cpu::forward::<Flex>(qkv.clone(), scale.clone(), bias.clone(), s) } else { reference::forward::<Flex>(qkv.clone(), scale.clone(), bias.clone(), s) };
                let saved = (qkv.clone(), scale.clone(), p.clone());
                let grads = if cpu { cpu::backward::<Flex>(saved, s, windows, grad.clone()) } else { reference::backward::<Flex>(saved, s, windows, grad.clone()) };
                [c, p].into_iter().chain(grads).map(flat).collect::<Vec<_>>()
            };
            let pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run(true));
            let ours = pool(1);
            assert_eq!(ours, pool(3));
            for (what, (a, b)) in ["context", "weights", "dqkv", "dscale", "dbias"].iter().zip(ours.iter().zip(run(false))) {
                assert_close(a, &b, &format!("{s:?} {what}"));
            }
        }
    }

    /// Through autodiff: the op's values and gradients (qkv, scale, bias) equal those
    /// burn's autodiff finds for the composed reference.
    #[test]
    fn autodiff_gradients_match_the_composed_ops() {
        let dev = Default::default();
        Flex::seed(&dev, 9);
        let s = Heads { n: 4, t: 4, heads: 2 };
        let [qkv, scale, bias, _] = inputs(s, 2, 3, false);
        let data = |p: &FloatTensor<Flex>| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(p.clone())).into_data();
        let (qd, sd, bd) = (data(&qkv), data(&scale), data(&bias));
        let run = |fused: bool| {
            let qkv = Tensor::<AD, 2>::from_data(qd.clone(), &dev).require_grad();
            let scale = Tensor::<AD, 1>::from_data(sd.clone(), &dev).require_grad();
            let bias = Tensor::<AD, 4>::from_data(bd.clone(), &dev).require_grad();
            let c = if fused {
                cosine_attention(qkv.clone(), scale.clone(), bias.clone(), s)
            } else {
                let prim = |p: burn::tensor::TensorPrimitive<AD>| p.tensor();
                let [c, _] = reference::forward::<AD>(prim(qkv.clone().into_primitive()), prim(scale.clone().into_primitive()), prim(bias.clone().into_primitive()), s);
                Tensor::from_primitive(TensorPrimitive::Float(c))
            };
            let g = (c.clone() * c.clone().sin()).sum().backward();
            let flat1 = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
            [
                flat1(c.inner()),
                flat1(qkv.grad(&g).unwrap()),
                scale.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap(),
                bias.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap(),
            ]
        };
        for (what, (a, b)) in ["context", "dqkv", "dscale", "dbias"].iter().zip(run(true).iter().zip(run(false))) {
            assert_close(a, &b, what);
        }
    }
}
