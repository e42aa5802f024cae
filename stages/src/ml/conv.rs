//! The CNN's 3x3 "same" convolution as one autodiff operation whose backward pass is
//! chosen here instead of burn's.
//!
//! Measured on flex (burn 0.21.0, [64, 32, 28, 28] -> 32 channels, 2 threads): forward
//! 22 ms, input gradient 22 ms, but burn's weight gradient 57 ms, because it runs as a
//! convolution whose kernel is the whole 28x28 output gradient (an im2col with 9 output
//! positions and one narrow gemm per input channel). The weight gradient is a plain
//! matrix product, dW[o, (c, ky, kx)] = sum over (n, y, x) of dY[n, o, y, x] *
//! X[n, c, y + ky - p, x + kx - p], so on the CPU backends it is computed here: per
//! chunk of images, the shifted input rows are laid out once (im2col, row copies) and
//! one gemm per image accumulates into the chunk's sum; chunks are fixed-size and summed
//! in order, so the result does not depend on the thread count. GPU backends keep
//! burn's kernels ([`ConvBackend`]'s default).
//!
//! Every backend a model runs on implements [`ConvBackend`]; [`TrainBackend`] is what the
//! training code asks for (an autodiff backend whose inner backend has it too).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

/// Images per partial sum of the weight gradient: fixed, so that the summation order
/// (and so the bits of the result) does not depend on how many threads run.
const IMAGES_PER_CHUNK: usize = 4;

/// A backend the models run on: a stride-1, "same"-padded convolution without bias
/// (odd square kernel), with its weight gradient overridable per backend.
pub trait ConvBackend: Backend {
    /// x [N, C, H, W], weight [O, C, k, k] -> [N, O, H, W] (padding (k-1)/2).
    fn conv_same(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = weight_kernel::<Self>(&weight);
        Self::conv2d(x, weight, None, options(k))
    }

    /// The gradient of `conv_same` with respect to its weight.
    fn conv_same_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = weight_kernel::<Self>(&weight);
        Self::conv2d_weight_backward(x, weight, grad, options(k))
    }
}

/// An autodiff backend for training: it and its inner (inference) backend are
/// [`ConvBackend`]s.
pub trait TrainBackend: AutodiffBackend<InnerBackend: ConvBackend> + ConvBackend {}
impl<T: AutodiffBackend<InnerBackend: ConvBackend> + ConvBackend> TrainBackend for T {}

fn options(k: usize) -> ConvOptions<2> {
    let p = (k - 1) / 2;
    ConvOptions::new([1, 1], [p, p], [1, 1], 1)
}

fn weight_kernel<B: Backend>(weight: &FloatTensor<B>) -> usize {
    use burn::tensor::TensorMetadata;
    weight.shape().dims::<4>()[2]
}

/// `conv_same` on tensors: the one call the models make.
pub fn conv_same<B: ConvBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, c, _, _] = x.dims();
    let [_, wc, kh, kw] = weight.dims();
    assert!(kh == kw && kh % 2 == 1 && c == wc, "conv_same needs an odd square kernel over all input channels");
    let out = B::conv_same(x.into_primitive().tensor(), weight.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl ConvBackend for Flex {
    fn conv_same_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        cpu_weight_grad::<Self>(x, weight, grad)
    }
}

impl ConvBackend for NdArray {
    fn conv_same_weight_grad(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        cpu_weight_grad::<Self>(x, weight, grad)
    }
}

#[cfg(feature = "wgpu")]
impl ConvBackend for burn::backend::Wgpu {}

#[cfg(feature = "cuda")]
impl ConvBackend for burn::backend::Cuda {}

#[derive(Debug)]
struct ConvSameBackward;

impl<B: ConvBackend> Backward<B, 2> for ConvSameBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let k = weight_kernel::<B>(&weight);
        if let Some(node) = node_x {
            let dx = B::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options(k));
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, B::conv_same_weight_grad(x, weight, grad));
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn conv_same(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = weight_kernel::<B>(&weight.primitive);
        match ConvSameBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::conv_same(x.primitive.clone(), weight.primitive.clone());
                prep.finish((x.primitive, weight.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d(x.primitive, weight.primitive, None, options(k))),
        }
    }
}

fn to_vec<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let t: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(t));
    // A float tensor always converts to f32.
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// The weight gradient on the CPU: im2col per image, then one gemm per image.
fn cpu_weight_grad<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    use burn::tensor::TensorMetadata;
    let device = B::float_device(&weight);
    let dtype = weight.dtype();
    let [o, c, k, _] = weight.shape().dims::<4>();
    let [n, _, h, w] = x.shape().dims::<4>();
    let (x, g) = (to_vec::<B>(x), to_vec::<B>(grad));
    let dw = weight_grad_f32(&x, &g, n, c, h, w, o, k);
    let t: Tensor<B, 4> = Tensor::from_data(TensorData::new(dw, [o, c, k, k]).convert_dtype(dtype), &device);
    t.into_primitive().tensor()
}

/// dW [o, c*k*k] for x [n, c, h, w], g [n, o, h, w], padding (k-1)/2, stride 1.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_f32(x: &[f32], g: &[f32], n: usize, c: usize, h: usize, w: usize, o: usize, k: usize) -> Vec<f32> {
    let p = (k - 1) / 2;
    let (hw, ckk) = (h * w, c * k * k);
    let partials: Vec<Vec<f32>> = (0..n)
        .collect::<Vec<_>>()
        .par_chunks(IMAGES_PER_CHUNK)
        .map(|images| {
            let mut acc = vec![0f32; o * ckk];
            let mut cols = vec![0f32; ckk * hw];
            for &i in images {
                im2col(&x[i * c * hw..(i + 1) * c * hw], &mut cols, c, h, w, k, p);
                let gi = &g[i * o * hw..(i + 1) * o * hw];
                // acc[o, ckk] += gi[o, hw] * cols[ckk, hw]^T
                // SAFETY: the three buffers hold exactly o*hw, ckk*hw and o*ckk floats,
                // and the strides below stay inside them.
                unsafe {
                    gemm::gemm(
                        o,
                        ckk,
                        hw,
                        acc.as_mut_ptr(),
                        1,
                        ckk as isize,
                        true,
                        gi.as_ptr(),
                        1,
                        hw as isize,
                        cols.as_ptr(),
                        hw as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; o * ckk];
    for part in partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    total
}

/// cols[(c, ky, kx), (y, x)] = img[c, y + ky - p, x + kx - p], zero outside.
fn im2col(img: &[f32], cols: &mut [f32], c: usize, h: usize, w: usize, k: usize, p: usize) {
    let hw = h * w;
    for ci in 0..c {
        let plane = &img[ci * hw..(ci + 1) * hw];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * hw..][..hw];
                // Source column range for a shift of kx - p.
                let (x0, x1) = (p.saturating_sub(kx), (w + p - kx).min(w));
                for y in 0..h {
                    let out = &mut row[y * w..(y + 1) * w];
                    let sy = y + ky;
                    if sy < p || sy - p >= h || x0 >= x1 {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(sy - p) * w..(sy - p + 1) * w];
                    out[..x0].fill(0.0);
                    out[x1..].fill(0.0);
                    out[x0..x1].copy_from_slice(&src[x0 + kx - p..x1 + kx - p]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn close(a: Vec<f32>, b: Vec<f32>) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "max difference {worst}");
    }

    fn v<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Forward and both gradients equal burn's own conv2d (3x3 and 5x5, odd sizes).
    #[test]
    fn matches_burns_conv2d_forward_and_gradients() {
        let d = Default::default();
        for (n, c, o, h, w, k) in [(3, 2, 4, 5, 7, 3), (2, 3, 2, 6, 6, 5), (5, 4, 3, 1, 2, 3)] {
            let xd = Tensor::<Flex, 4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d).into_data();
            let wd = Tensor::<Flex, 4>::random([o, c, k, k], Distribution::Normal(0.0, 1.0), &d).into_data();
            let gd = Tensor::<Flex, 4>::random([n, o, h, w], Distribution::Normal(0.0, 1.0), &d).into_data();
            let run = |ours: bool| {
                let x = Tensor::<AD, 4>::from_data(xd.clone(), &d).require_grad();
                let wt = Tensor::<AD, 4>::from_data(wd.clone(), &d).require_grad();
                let y = if ours {
                    conv_same(x.clone(), wt.clone())
                } else {
                    burn::tensor::module::conv2d(x.clone(), wt.clone(), None, options(k))
                };
                let g = (y.clone() * Tensor::<AD, 4>::from_data(gd.clone(), &d)).sum().backward();
                (v(y.inner()), v(x.grad(&g).unwrap()), v(wt.grad(&g).unwrap()))
            };
            let (a, b) = (run(true), run(false));
            close(a.0, b.0);
            close(a.1, b.1);
            close(a.2, b.2);
        }
    }

    #[test]
    fn weight_gradient_does_not_depend_on_thread_count() {
        let (n, c, o, h, w, k) = (9, 3, 4, 6, 6, 3);
        let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let g: Vec<f32> = (0..n * o * h * w).map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.0).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = one.install(|| weight_grad_f32(&x, &g, n, c, h, w, o, k));
        let b = three.install(|| weight_grad_f32(&x, &g, n, c, h, w, o, k));
        assert_eq!(a, b);
    }
}
