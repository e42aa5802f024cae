//! The ViT's token assembly and pooling as ops: patch embeddings to token rows with the
//! class token and the position embeddings ([`embed`]), and the mean of each image's
//! patch tokens ([`mean`]).
//!
//! Why: composed of burn's ops, assembly is a transpose of the patch embeddings (a
//! strided copy), two broadcast additions and a concatenation, and pooling a narrow and
//! a mean whose backward builds a ones tensor, a broadcast product and a zero-padded
//! copy; flex runs each on the calling thread, several through its strided element
//! iterator (about a tenth of the ViT's training step on one thread while the other
//! waited, perf). On the CPU backends ([`cpu`]) each is one pass, images in parallel;
//! sums over images (the class token's and the position embeddings' gradients) run in
//! image order for each element, so no result depends on the thread count. The forward
//! of `embed` adds the same numbers as the composed ops do, so its bits are theirs.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::{KernelBackend, register_grads};

/// The shape of a batch of token rows: `n` images of `p` patches, width `d`; each image
/// has `1 + p` rows, its class token first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub n: usize,
    pub p: usize,
    pub d: usize,
}

impl Tokens {
    /// Rows per image.
    pub fn t(&self) -> usize {
        1 + self.p
    }
}

/// patches [n, d, p] (a patch embedding's output with its grid flattened), cls [1, 1, d],
/// pos [1, 1 + p, d] -> token rows [n * (1 + p), d]: per image the class token plus
/// pos[0], then each patch's embedding plus its position embedding.
pub fn embed<B: KernelBackend>(patches: Tensor<B, 3>, cls: Tensor<B, 3>, pos: Tensor<B, 3>) -> Tensor<B, 2> {
    let [n, d, p] = patches.dims();
    assert!(cls.dims() == [1, 1, d] && pos.dims() == [1, 1 + p, d], "tokens::embed: the class token or the position embeddings do not fit");
    let shape = Tokens { n, p, d };
    let out = B::token_embed(patches.into_primitive().tensor(), cls.into_primitive().tensor(), pos.into_primitive().tensor(), shape);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Token rows [n * (1 + p), d] -> [n, d], the mean of each image's patch rows (its class
/// token left out).
pub fn mean<B: KernelBackend>(x: Tensor<B, 2>, shape: Tokens) -> Tensor<B, 2> {
    assert!(x.dims() == [shape.n * shape.t(), shape.d] && shape.p > 0, "tokens::mean: the rows do not fit");
    Tensor::from_primitive(TensorPrimitive::Float(B::token_mean(x.into_primitive().tensor(), shape)))
}

#[derive(Debug)]
pub(crate) struct EmbedBackward {
    pub(crate) shape: Tokens,
}

impl<B: KernelBackend> Backward<B, 3> for EmbedBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), B::token_embed_backward(grad, self.shape));
    }
}

#[derive(Debug)]
pub(crate) struct MeanBackward {
    pub(crate) shape: Tokens,
}

impl<B: KernelBackend> Backward<B, 1> for MeanBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        register_grads::<B, 1>(grads, ops.parents.map(|p| p.map(|n| n.id)), [B::token_mean_backward(grad, self.shape)]);
    }
}

/// The ops in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    pub fn embed<B: Backend>(patches: FloatTensor<B>, cls: FloatTensor<B>, pos: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        let pos: Tensor<B, 3> = t(pos);
        let tokens = t::<B, 3>(patches).swap_dims(1, 2) + pos.clone().narrow(1, 1, s.p);
        let cls = (t::<B, 3>(cls) + pos.narrow(1, 0, 1)).expand([s.n, 1, s.d]);
        Tensor::cat(vec![cls, tokens], 1).reshape([s.n * s.t(), s.d]).into_primitive().tensor()
    }

    pub fn embed_backward<B: Backend>(grad: FloatTensor<B>, s: Tokens) -> [FloatTensor<B>; 3] {
        let g: Tensor<B, 3> = t::<B, 2>(grad).reshape([s.n, s.t(), s.d]);
        let patches = g.clone().narrow(1, 1, s.p).swap_dims(1, 2);
        let cls = g.clone().narrow(1, 0, 1).sum_dim(0);
        let pos = g.sum_dim(0);
        [patches, cls, pos].map(|x| x.into_primitive().tensor())
    }

    pub fn mean<B: Backend>(x: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        t::<B, 2>(x).reshape([s.n, s.t(), s.d]).narrow(1, 1, s.p).mean_dim(1).reshape([s.n, s.d]).into_primitive().tensor()
    }

    pub fn mean_backward<B: Backend>(grad: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        let g: Tensor<B, 2> = t(grad);
        let spread = g.div_scalar(s.p as f64).reshape([s.n, 1, s.d]).expand([s.n, s.p, s.d]);
        let zeros = Tensor::<B, 3>::zeros([s.n, 1, s.d], &spread.device());
        Tensor::cat(vec![zeros, spread], 1).reshape([s.n * s.t(), s.d]).into_primitive().tensor()
    }
}

/// The ops on the CPU backends: one task per image; sums over images per element, in
/// image order.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, zeros};
    use rayon::prelude::*;

    /// Elements of the position-embedding gradient per task.
    const COLUMNS_PER_TASK: usize = 1024;

    pub fn embed<B: CpuTensors>(patches: FloatTensor<B>, cls: FloatTensor<B>, pos: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        let Tokens { p, d, .. } = s;
        let t = s.t();
        let out = B::with_f32(&patches, |ps| {
            B::with_f32(&cls, |cs| {
                B::with_f32(&pos, |pe| {
                    let mut out = zeros(s.n * t * d);
                    if t * d > 0 {
                        out.par_chunks_mut(t * d).enumerate().for_each(|(i, rows)| {
                            let image = &ps[i * d * p..][..d * p];
                            for (o, (c, e)) in rows[..d].iter_mut().zip(cs.iter().zip(pe)) {
                                *o = c + e;
                            }
                            for (q, row) in rows[d..].chunks_mut(d).enumerate() {
                                let e = &pe[(1 + q) * d..][..d];
                                for (j, (o, e)) in row.iter_mut().zip(e).enumerate() {
                                    *o = image[j * p + q] + e;
                                }
                            }
                        });
                    }
                    out
                })
            })
        });
        B::from_f32(out, &[s.n * t, d], &patches)
    }

    /// Per element, the sum over images of g[image * per + offset + element], in image
    /// order; elements in parallel.
    fn sum_over_images(g: &[f32], n: usize, per: usize, len: usize) -> Vec<f32> {
        let mut sums = zeros(len);
        sums.par_chunks_mut(COLUMNS_PER_TASK).enumerate().for_each(|(block, out)| {
            let first = block * COLUMNS_PER_TASK;
            for i in 0..n {
                for (o, v) in out.iter_mut().zip(&g[i * per + first..]) {
                    *o += v;
                }
            }
        });
        sums
    }

    pub fn embed_backward<B: CpuTensors>(grad: FloatTensor<B>, s: Tokens) -> [FloatTensor<B>; 3] {
        let Tokens { n, p, d } = s;
        let t = s.t();
        let (dp, dcls, dpos) = B::with_f32(&grad, |g| {
            let mut dp = zeros(n * d * p);
            if d * p > 0 {
                dp.par_chunks_mut(d * p).enumerate().for_each(|(i, out)| {
                    let rows = &g[(i * t + 1) * d..][..p * d];
                    for (q, row) in rows.chunks(d).enumerate() {
                        for (j, v) in row.iter().enumerate() {
                            out[j * p + q] = *v;
                        }
                    }
                });
            }
            let dpos = sum_over_images(g, n, t * d, t * d);
            (dp, dpos[..d].to_vec(), dpos)
        });
        [B::from_f32(dp, &[n, d, p], &grad), B::from_f32(dcls, &[1, 1, d], &grad), B::from_f32(dpos, &[1, t, d], &grad)]
    }

    pub fn mean<B: CpuTensors>(x: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        let Tokens { n, p, d } = s;
        let t = s.t();
        let y = B::with_f32(&x, |xs| {
            let mut y = zeros(n * d);
            if d > 0 {
                y.par_chunks_mut(d).enumerate().for_each(|(i, out)| {
                    for row in xs[(i * t + 1) * d..][..p * d].chunks(d) {
                        for (o, v) in out.iter_mut().zip(row) {
                            *o += v;
                        }
                    }
                    for o in out.iter_mut() {
                        *o /= p as f32;
                    }
                });
            }
            y
        });
        B::from_f32(y, &[n, d], &x)
    }

    pub fn mean_backward<B: CpuTensors>(grad: FloatTensor<B>, s: Tokens) -> FloatTensor<B> {
        let Tokens { n, p, d } = s;
        let t = s.t();
        let dx = B::with_f32(&grad, |g| {
            let mut dx = zeros(n * t * d);
            if d > 0 {
                dx.par_chunks_mut(t * d).enumerate().for_each(|(i, rows)| {
                    let gi = &g[i * d..][..d];
                    for row in rows[d..].chunks_mut(d) {
                        for (o, v) in row.iter_mut().zip(gi) {
                            *o = v / p as f32;
                        }
                    }
                });
            }
            dx
        });
        B::from_f32(dx, &[n * t, d], &grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn v<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn close(a: Vec<f32>, b: Vec<f32>) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "max difference {worst}");
    }

    /// Both ops and their gradients through autodiff equal the composed burn ops (the
    /// embedding's forward bit for bit), and the CPU kernels give the same bits on 1 and 3
    /// threads.
    #[test]
    fn match_the_composed_ops_and_do_not_depend_on_the_thread_count() {
        let dev = Default::default();
        for s in [Tokens { n: 3, p: 4, d: 5 }, Tokens { n: 1, p: 1, d: 2 }, Tokens { n: 5, p: 9, d: 300 }] {
            Flex::seed(&dev, 13);
            let r = |dims: [usize; 3]| Tensor::<Flex, 3>::random(dims, Distribution::Normal(0.0, 1.0), &dev).into_data();
            let (pd, cd, ed) = (r([s.n, s.d, s.p]), r([1, 1, s.d]), r([1, s.t(), s.d]));
            let gd = Tensor::<Flex, 2>::random([s.n, s.d], Distribution::Normal(0.0, 1.0), &dev).into_data();
            let gt = Tensor::<Flex, 2>::random([s.n * s.t(), s.d], Distribution::Normal(0.0, 1.0), &dev).into_data();
            let run = |ours: bool| {
                let leaf = |data: &burn::tensor::TensorData| Tensor::<AD, 3>::from_data(data.clone(), &dev).require_grad();
                let (patches, cls, pos) = (leaf(&pd), leaf(&cd), leaf(&ed));
                let rows = if ours {
                    embed(patches.clone(), cls.clone(), pos.clone())
                } else {
                    Tensor::from_primitive(TensorPrimitive::Float(reference::embed::<AD>(
                        patches.clone().into_primitive().tensor(),
                        cls.clone().into_primitive().tensor(),
                        pos.clone().into_primitive().tensor(),
                        s,
                    )))
                };
                let pooled = if ours { mean(rows.clone(), s) } else { Tensor::from_primitive(TensorPrimitive::Float(reference::mean::<AD>(rows.clone().into_primitive().tensor(), s))) };
                let loss = (pooled.clone() * Tensor::<AD, 2>::from_data(gd.clone(), &dev)).sum() + (rows.clone() * Tensor::<AD, 2>::from_data(gt.clone(), &dev)).sum();
                let grads = loss.backward();
                let g = |x: &Tensor<AD, 3>| v(x.grad(&grads).unwrap());
                (v(rows.inner()), v(pooled.inner()), g(&patches), g(&cls), g(&pos))
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.0, theirs.0, "embed forward bits");
            close(ours.1, theirs.1);
            close(ours.2, theirs.2);
            close(ours.3, theirs.3);
            close(ours.4, theirs.4);
            let pool = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run(true));
            let (one, three) = (pool(1), pool(3));
            assert!(one.0 == three.0 && one.1 == three.1 && one.2 == three.2 && one.3 == three.3 && one.4 == three.4);
        }
    }
}
