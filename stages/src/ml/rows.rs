//! A permutation of the rows of every image as one op: Swin-V2's cyclic shift and
//! window partition, and their inverse, each one gather.
//!
//! Why one op: composed of burn's ops, a shift is two narrows and a cat per axis and a
//! partition a permute and a reshape, each a copy of the whole map, and their
//! gradients pad each narrow's gradient with zeros and add them, all on flex's calling
//! thread. A permutation is exact (copies only), so the op gives the same bits as the
//! composed ops; its gradient is the gather by the inverse permutation.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::{KernelBackend, register_grads};

/// Row r of each image's output is row `to[r]` of that image's input; `back` is the
/// inverse (the gradient's gather).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPermutation {
    to: Arc<[usize]>,
    back: Arc<[usize]>,
}

impl RowPermutation {
    /// `to` must hold each of 0..to.len() once (the caller builds it from a geometry).
    pub fn new(to: Vec<usize>) -> Self {
        let mut back = vec![usize::MAX; to.len()];
        for (r, &from) in to.iter().enumerate() {
            assert!(from < to.len() && back[from] == usize::MAX, "RowPermutation: not a permutation");
            back[from] = r;
        }
        RowPermutation { to: to.into(), back: back.into() }
    }

    pub fn inverse(&self) -> Self {
        RowPermutation { to: self.back.clone(), back: self.to.clone() }
    }

    /// Rows per image.
    pub fn len(&self) -> usize {
        self.to.len()
    }

    pub fn is_empty(&self) -> bool {
        self.to.is_empty()
    }

    /// Row r of the output takes row `source(r)` of the input.
    pub fn source(&self, r: usize) -> usize {
        self.to[r]
    }
}

/// x [images * p.len(), c] -> the same shape, each image's rows permuted by `p`.
pub fn permute_rows<B: KernelBackend>(x: Tensor<B, 2>, p: &RowPermutation) -> Tensor<B, 2> {
    let [rows, _] = x.dims();
    assert!(!p.is_empty() && rows % p.len() == 0, "permute_rows: {rows} rows are not whole images of {} rows", p.len());
    let out = B::permute_rows(x.into_primitive().tensor(), p);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
pub(crate) struct PermuteRowsBackward {
    pub(crate) p: RowPermutation,
}

impl<B: KernelBackend> Backward<B, 1> for PermuteRowsBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let dx = B::permute_rows(grad, &self.p.inverse());
        register_grads::<B, 1>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx]);
    }
}

/// The op in burn's own ops (GPU backends, and the tests' reference): one select.
pub mod reference {
    use super::*;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, TensorData};

    pub fn forward<B: Backend>(x: FloatTensor<B>, p: &RowPermutation) -> FloatTensor<B> {
        let x: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(x));
        let [rows, _] = x.dims();
        let index: Vec<i64> = (0..rows).map(|r| ((r / p.len()) * p.len() + p.source(r % p.len())) as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &x.device());
        x.select(0, index).into_primitive().tensor()
    }
}

/// The op on the CPU backends: images in parallel, rows copied in output order.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, filled};
    use burn::tensor::TensorMetadata;

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>, p: &RowPermutation) -> FloatTensor<B> {
        let [rows, c] = x.shape().dims::<2>();
        let per = p.len();
        let out = B::with_f32(&x, |xs| {
            // SAFETY: each image's chunk is written whole: its `per` rows of `c` floats.
            unsafe {
                filled(rows * c, (per * c).max(1), |i, chunk| {
                    let image = &xs[i * per * c..][..per * c];
                    for (r, row) in chunk.chunks_mut(c.max(1)).enumerate() {
                        let from = &image[p.source(r) * c..][..c];
                        for (o, v) in row.iter_mut().zip(from) {
                            o.write(*v);
                        }
                    }
                })
            }
        });
        B::from_f32(out, &[rows, c], &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    fn shuffled(n: usize, seed: usize) -> RowPermutation {
        let mut to: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            to.swap(i, (i * 7919 + seed * 104729) % (i + 1));
        }
        RowPermutation::new(to)
    }

    /// The CPU kernel equals burn's select, its gradient through autodiff is the
    /// inverse gather, and a permutation then its inverse gives the input back.
    #[test]
    fn cpu_kernel_equals_select_and_its_gradient_is_the_inverse() {
        let dev = Default::default();
        let p = shuffled(6, 3);
        let x = Tensor::<Flex, 2>::random([18, 5], Distribution::Normal(0.0, 1.0), &dev);
        let ours = permute_rows(x.clone(), &p);
        let theirs: Tensor<Flex, 2> = Tensor::from_primitive(TensorPrimitive::Float(reference::forward::<Flex>(x.clone().into_primitive().tensor(), &p)));
        assert_eq!(ours.to_data(), theirs.to_data());
        assert_eq!(permute_rows(ours, &p.inverse()).to_data(), x.to_data());

        let xa = Tensor::<Autodiff<Flex>, 2>::from_data(x.to_data(), &dev).require_grad();
        let weights = Tensor::<Autodiff<Flex>, 2>::random([18, 5], Distribution::Normal(0.0, 1.0), &dev);
        let g = (permute_rows(xa.clone(), &p) * weights.clone()).sum().backward();
        let expected = permute_rows(weights.inner(), &p.inverse());
        assert_eq!(xa.grad(&g).unwrap().to_data(), expected.to_data());
    }

    #[test]
    #[should_panic(expected = "not a permutation")]
    fn a_repeated_row_is_refused() {
        RowPermutation::new(vec![0, 1, 1]);
    }
}
