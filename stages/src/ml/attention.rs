//! Multi-head softmax attention over token rows as one op: the ViT's (and the MAE
//! decoder's) `softmax(q k^T * scale) v` for every image and head, from q, k, v in the
//! layout the linear layers give ([n * t, heads * dh]) to the context in the layout the
//! output projection takes.
//!
//! Why one op: composed of burn's ops, each head split and merge is a reshape of a
//! transposed tensor (a copy), and the softmax four element-wise passes and two
//! reductions, forward and backward, which flex runs on the calling thread (with the
//! batched matmuls' set-up, most of the ViT's single-threaded time, perf). On the CPU
//! backends ([`cpu`]) one task per image runs every head with small gemms reading q, k
//! and v in place (strided), so nothing is copied and each output is computed by one
//! task in a fixed order: results do not depend on the thread count. The attention
//! weights are kept for the backward ([n, heads, t, t]: 2.5 MiB for the ViT's batch).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::{KernelBackend, register_grads};

/// The shape of one attention call: `n` images of `t` tokens, `heads` heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub n: usize,
    pub t: usize,
    pub heads: usize,
}

/// q, k, v [n * t, d] -> context [n * t, d], with d = heads * dh, each head attending
/// within its image: softmax(q_h k_h^T * scale) v_h.
pub fn attention<B: KernelBackend>(q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, shape: Heads, scale: f64) -> Tensor<B, 2> {
    let [rows, d] = q.dims();
    assert!(
        rows == shape.n * shape.t && shape.heads > 0 && d % shape.heads == 0 && k.dims() == [rows, d] && v.dims() == [rows, d],
        "attention needs q, k, v of [n * t, heads * dh]"
    );
    let out = B::token_attention(q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor(), shape, scale);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// What the op keeps for its backward: q, k, v and the attention weights.
pub type Saved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

#[derive(Debug)]
pub(crate) struct AttentionBackward {
    pub(crate) shape: Heads,
    pub(crate) scale: f64,
}

impl<B: KernelBackend> Backward<B, 3> for AttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dq, dk, dv] = B::token_attention_backward(ops.state, self.shape, self.scale, grad);
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dq, dk, dv]);
    }
}

/// The op in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    /// [n * t, d] -> [n, heads, t, dh].
    fn split<B: Backend>(m: FloatTensor<B>, s: Heads) -> Tensor<B, 4> {
        let m: Tensor<B, 2> = t(m);
        let d = m.dims()[1];
        m.reshape([s.n, s.t, s.heads, d / s.heads]).swap_dims(1, 2)
    }

    /// [n, heads, t, dh] -> [n * t, d].
    fn merge<B: Backend>(m: Tensor<B, 4>) -> FloatTensor<B> {
        let [n, h, t, dh] = m.dims();
        m.swap_dims(1, 2).reshape([n * t, h * dh]).into_primitive().tensor()
    }

    /// (context [n * t, d], weights [n, heads, t, t]).
    pub fn forward<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, s: Heads, scale: f64) -> [FloatTensor<B>; 2] {
        let scores = split::<B>(q, s).matmul(split::<B>(k, s).swap_dims(2, 3)).mul_scalar(scale);
        let weights = softmax(scores, 3);
        let context = weights.clone().matmul(split(v, s));
        [merge(context), weights.into_primitive().tensor()]
    }

    pub fn backward<B: Backend>(saved: Saved<B>, s: Heads, scale: f64, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (q, k, v, p) = saved;
        let p: Tensor<B, 4> = t(p);
        let dc = split(grad, s);
        let dv = p.clone().swap_dims(2, 3).matmul(dc.clone());
        let dp = dc.matmul(split(v, s).swap_dims(2, 3));
        let ds = (p.clone() * (dp.clone() - (dp * p).sum_dim(3))).mul_scalar(scale);
        let dq = ds.clone().matmul(split(k, s));
        let dk = ds.swap_dims(2, 3).matmul(split(q, s));
        [merge(dq), merge(dk), merge(dv)]
    }
}

/// The op on the CPU backends: one task per image, every head in order.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, View, mm, zeros};
    use crate::ml::fastmath;
    use rayon::prelude::*;

    fn dims<B: Backend>(x: &FloatTensor<B>) -> [usize; 2] {
        use burn::tensor::TensorMetadata;
        x.shape().dims::<2>()
    }

    pub fn forward<B: CpuTensors>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, s: Heads, scale: f64) -> [FloatTensor<B>; 2] {
        let [_, d] = dims::<B>(&q);
        let (t, h) = (s.t, s.heads);
        let dh = d / h;
        let mut context = zeros(s.n * t * d);
        let mut weights = zeros(s.n * h * t * t);
        if t > 0 && d > 0 {
            B::with_f32(&q, |qs| {
                B::with_f32(&k, |ks| {
                    B::with_f32(&v, |vs| {
                        context.par_chunks_mut(t * d).zip(weights.par_chunks_mut(h * t * t)).enumerate().for_each(|(i, (ctx, ps))| {
                            let base = i * t * d;
                            for j in 0..h {
                                let p = &mut ps[j * t * t..][..t * t];
                                let row = View { offset: base + j * dh, rs: d, cs: 1 };
                                let row_t = View { offset: base + j * dh, rs: 1, cs: d };
                                mm(p, View { offset: 0, rs: t, cs: 1 }, qs, row, ks, row_t, t, t, dh, scale as f32, false);
                                for r in p.chunks_mut(t) {
                                    softmax_row(r);
                                }
                                mm(ctx, View { offset: j * dh, rs: d, cs: 1 }, p, View { offset: 0, rs: t, cs: 1 }, vs, row, t, dh, t, 1.0, false);
                            }
                        });
                    })
                })
            });
        }
        let out = B::from_f32(context, &[s.n * t, d], &q);
        [out, B::from_f32(weights, &[s.n, h, t, t], &q)]
    }

    crate::widest_fn! {
        fn exp_shifted(r: &mut [f32], max: f32) {
            for x in r.iter_mut() {
                *x = fastmath::exp(*x - max);
            }
        }
    }

    /// In place: exp(x - max) / sum. The exps vectorise (`fastmath`); the sum stays in
    /// element order.
    pub(crate) fn softmax_row(r: &mut [f32]) {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        exp_shifted(r, max);
        let inv = 1.0 / r.iter().sum::<f32>();
        for x in r.iter_mut() {
            *x *= inv;
        }
    }

    /// In place, row by row of `t`: the softmax's input gradient from its output
    /// gradient `dp` and its output `p`, times `scale`: p * (dp - rowsum(dp * p)) * scale.
    pub(crate) fn softmax_backward(dp: &mut [f32], p: &[f32], t: usize, scale: f32) {
        for (dr, pr) in dp.chunks_mut(t).zip(p.chunks(t)) {
            let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
            for (x, p) in dr.iter_mut().zip(pr) {
                *x = p * (*x - dot) * scale;
            }
        }
    }

    pub fn backward<B: CpuTensors>(saved: Saved<B>, s: Heads, scale: f64, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (q, k, v, p) = saved;
        let [rows, d] = dims::<B>(&q);
        let (t, h) = (s.t, s.heads);
        let dh = d / h;
        let (mut dq, mut dk, mut dv) = (zeros(rows * d), zeros(rows * d), zeros(rows * d));
        if t > 0 && d > 0 {
            B::with_f32(&q, |qs| {
                B::with_f32(&k, |ks| {
                    B::with_f32(&v, |vs| {
                        B::with_f32(&p, |pw| {
                            B::with_f32(&grad, |gs| {
                                dq.par_chunks_mut(t * d)
                                    .zip(dk.par_chunks_mut(t * d))
                                    .zip(dv.par_chunks_mut(t * d))
                                    .enumerate()
                                    .for_each_init(
                                        || vec![0f32; t * t],
                                        |ds, (i, ((dqi, dki), dvi))| {
                                            let base = i * t * d;
                                            let square = View { offset: 0, rs: t, cs: 1 };
                                            let square_t = View { offset: 0, rs: 1, cs: t };
                                            for j in 0..h {
                                                let pij = &pw[(i * h + j) * t * t..][..t * t];
                                                let row = View { offset: base + j * dh, rs: d, cs: 1 };
                                                let row_t = View { offset: base + j * dh, rs: 1, cs: d };
                                                let out = View { offset: j * dh, rs: d, cs: 1 };
                                                // dV = P^T dC; dP = dC V^T.
                                                mm(dvi, out, pij, square_t, gs, row, t, dh, t, 1.0, false);
                                                mm(ds, square, gs, row, vs, row_t, t, t, dh, 1.0, false);
                                                // dS = P * (dP - rowsum(dP * P)) * scale.
                                                softmax_backward(ds, pij, t, scale as f32);
                                                // dQ = dS K; dK = dS^T Q.
                                                mm(dqi, out, ds, square, ks, row, t, dh, t, 1.0, false);
                                                mm(dki, out, ds, square_t, qs, row, t, dh, t, 1.0, false);
                                            }
                                        },
                                    );
                            })
                        })
                    })
                })
            });
        }
        let grads = [dq, dk, dv].map(|g| B::from_f32(g, &[rows, d], &q));
        grads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn flat(t: FloatTensor<Flex>) -> Vec<f32> {
        Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap()
    }

    /// The CPU kernels equal the burn-ops reference (context, weights and the three
    /// gradients; one token, odd sizes) and give the same bits with 1 and 3 threads.
    #[test]
    fn kernels_match_the_reference_and_do_not_depend_on_the_thread_count() {
        let dev = Default::default();
        Flex::seed(&dev, 11);
        for s in [Heads { n: 3, t: 5, heads: 2 }, Heads { n: 2, t: 1, heads: 3 }, Heads { n: 4, t: 7, heads: 1 }] {
            let d = s.heads * 3;
            let r = |rows: usize| Tensor::<Flex, 2>::random([rows, d], Distribution::Normal(0.0, 1.5), &dev).into_primitive().tensor();
            let (q, k, v, g) = (r(s.n * s.t), r(s.n * s.t), r(s.n * s.t), r(s.n * s.t));
            let run = |cpu: bool| {
                let [c, p] = if cpu { cpu::forward::<Flex>(q.clone(), k.clone(), v.clone(), s, 0.6) } else { reference::forward::<Flex>(q.clone(), k.clone(), v.clone(), s, 0.6) };
                let saved = (q.clone(), k.clone(), v.clone(), p.clone());
                let grads = if cpu { cpu::backward::<Flex>(saved, s, 0.6, g.clone()) } else { reference::backward::<Flex>(saved, s, 0.6, g.clone()) };
                [c, p].into_iter().chain(grads).map(flat).collect::<Vec<_>>()
            };
            let pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run(true));
            let ours = pool(1);
            assert_eq!(ours, pool(3));
            for (a, b) in ours.iter().zip(run(false)) {
                assert_eq!(a.len(), b.len());
                let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{s:?}: max difference {worst}");
            }
        }
    }

    /// Through autodiff: the op's gradients equal those of the composed burn ops.
    #[test]
    fn autodiff_gradients_match_the_composed_ops() {
        let dev = Default::default();
        Flex::seed(&dev, 11);
        let s = Heads { n: 2, t: 4, heads: 2 };
        let data = |seed: f64| Tensor::<Flex, 2>::random([8, 6], Distribution::Normal(seed, 1.0), &dev).into_data();
        let (qd, kd, vd) = (data(0.1), data(-0.2), data(0.3));
        let run = |fused: bool| {
            let leaf = |d: &burn::tensor::TensorData| Tensor::<AD, 2>::from_data(d.clone(), &dev).require_grad();
            let (q, k, v) = (leaf(&qd), leaf(&kd), leaf(&vd));
            let c = if fused {
                attention(q.clone(), k.clone(), v.clone(), s, 0.5)
            } else {
                let prim = |t: &Tensor<AD, 2>| t.clone().into_primitive().tensor();
                let [c, _] = reference::forward::<AD>(prim(&q), prim(&k), prim(&v), s, 0.5);
                Tensor::from_primitive(TensorPrimitive::Float(c))
            };
            let g = (c.clone() * c.clone()).sum().backward();
            [c.inner(), q.grad(&g).unwrap(), k.grad(&g).unwrap(), v.grad(&g).unwrap()].map(|t| t.into_data().to_vec::<f32>().unwrap())
        };
        for (a, b) in run(true).iter().zip(run(false)) {
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst}");
        }
    }
}
