//! GELU (the exact one, with erf: timm's and PyTorch's default) as one op with its
//! exact derivative.
//!
//! Why one op: burn's `gelu` is five element-wise passes forward, and its backward
//! (the derivative of the tanh approximation, not of the erf form it computes) about
//! a dozen, which flex runs on the calling thread: half of that thread's time in the
//! ViT's training step (perf). On the CPU backends ([`cpu`]) forward and backward are
//! one pass each over fixed-size chunks in parallel (element-wise, so nothing depends
//! on the thread count). The backward is PyTorch's: Phi(x) + x * phi(x).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::KernelBackend;

/// x * Phi(x), Phi the standard normal distribution function.
pub fn gelu<B: KernelBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gelu_exact(x.into_primitive().tensor())))
}

#[derive(Debug)]
pub(crate) struct GeluBackward;

impl<B: KernelBackend> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::gelu_exact_backward(ops.state, grad));
        }
    }
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// The op in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;

    pub fn forward<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        B::gelu(x)
    }

    pub fn backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let x: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(x));
        let grad: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(grad));
        let cdf = x.clone().mul_scalar(FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
        let pdf = x.clone().square().mul_scalar(-0.5).exp().mul_scalar(FRAC_1_SQRT_2PI);
        ((cdf + x * pdf) * grad).into_primitive().tensor()
    }
}

/// The op on the CPU backends.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, filled};
    use crate::ml::fastmath;
    use std::mem::MaybeUninit;
    use burn::tensor::TensorMetadata;

    /// Elements per task.
    const CHUNK: usize = 16 * 1024;

    // erf and exp from `fastmath`: they vectorise (libm's were a tenth of the ViT's step).
    #[inline(always)]
    fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2 as f32))
    }

    #[inline(always)]
    fn gelu_grad(x: f32) -> f32 {
        0.5 * (1.0 + fastmath::erf(x * FRAC_1_SQRT_2 as f32)) + x * fastmath::exp(-0.5 * x * x) * FRAC_1_SQRT_2PI as f32
    }

    crate::widest_fn! {
        fn forward_chunk(out: &mut [MaybeUninit<f32>], xs: &[f32]) {
            for (o, x) in out.iter_mut().zip(xs) {
                o.write(gelu(*x));
            }
        }
    }

    crate::widest_fn! {
        fn backward_chunk(out: &mut [MaybeUninit<f32>], xs: &[f32], grad: &[f32]) {
            for (o, (x, g)) in out.iter_mut().zip(xs.iter().zip(grad)) {
                o.write(gelu_grad(*x) * g);
            }
        }
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>) -> FloatTensor<B> {
        let shape = x.shape().to_vec();
        let y = B::with_f32(&x, |xs| {
            // SAFETY: forward_chunk writes all of its chunk (xs has as many elements).
            unsafe { filled(xs.len(), CHUNK, |i, o| forward_chunk(o, &xs[i * CHUNK..][..o.len()])) }
        });
        B::from_f32(y, &shape, &x)
    }

    pub fn backward<B: CpuTensors>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let shape = x.shape().to_vec();
        let dx = B::with_f32(&x, |xs| {
            B::with_f32(&grad, |gs| {
                // SAFETY: backward_chunk writes all of its chunk (xs and gs have as many
                // elements: the gradient has the input's shape).
                assert_eq!(xs.len(), gs.len());
                unsafe { filled(xs.len(), CHUNK, |i, o| backward_chunk(o, &xs[i * CHUNK..][..o.len()], &gs[i * CHUNK..][..o.len()])) }
            })
        });
        B::from_f32(dx, &shape, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    /// Forward and backward equal the reference (burn's gelu, the exact derivative in
    /// burn's ops), on more than one chunk; and through autodiff the gradient is the
    /// exact derivative (a finite difference in f64 agrees).
    #[test]
    fn matches_the_reference_and_the_exact_derivative() {
        let d = Default::default();
        Flex::seed(&d, 3);
        let x = Tensor::<Flex, 2>::random([3, 7000], Distribution::Normal(0.0, 3.0), &d).into_primitive().tensor();
        let g = Tensor::<Flex, 2>::random([3, 7000], Distribution::Normal(0.0, 1.0), &d).into_primitive().tensor();
        let flat = |t: FloatTensor<Flex>| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| {
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "max difference {worst}");
        };
        close(flat(cpu::forward::<Flex>(x.clone())), flat(reference::forward::<Flex>(x.clone())));
        close(flat(cpu::backward::<Flex>(x.clone(), g.clone())), flat(reference::backward::<Flex>(x, g)));

        let points = [-4.0f32, -1.3, -0.2, 0.0, 0.4, 1.7, 5.0];
        let xt = Tensor::<Autodiff<Flex>, 1>::from_floats(points, &d).require_grad();
        let grads = gelu(xt.clone()).sum().backward();
        let ours = xt.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let exact = |x: f64| 0.5 * x * (1.0 + libm::erf(x * FRAC_1_SQRT_2));
        for (x, g) in points.iter().zip(ours) {
            let h = 1e-5;
            let numeric = (exact(*x as f64 + h) - exact(*x as f64 - h)) / (2.0 * h);
            assert!((numeric - g as f64).abs() < 1e-5, "at {x}: {g} vs {numeric}");
        }
    }
}
