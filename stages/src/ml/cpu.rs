//! The f32 buffers of CPU backends' tensors, for fgflow's own kernels (`conv`, `norm`).
//!
//! A kernel reads its inputs as `&[f32]` and returns a `Vec<f32>`. On flex both are
//! free: a contiguous f32 tensor is borrowed in place (its buffer is shared by
//! reference count, and autodiff keeps clones of the inputs it saves, so going through
//! `into_data` would copy every saved input once per use), and a new tensor takes the
//! vector's allocation. Other backends (ndarray) and other float types go through
//! `TensorData` with a copy. [`mm`] is the kernels' one-thread matrix product over
//! strided views (gemm's).

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A backend whose tensors fgflow's CPU kernels can read and build.
pub trait CpuTensors: Backend {
    /// Run `f` over the tensor's elements as f32, in row-major order.
    fn with_f32<R>(t: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> R {
        f(&copy_f32::<Self>(t.clone()))
    }

    /// A tensor of `shape` holding `v`, on `like`'s device and of its float type.
    fn from_f32(v: Vec<f32>, shape: &[usize], like: &FloatTensor<Self>) -> FloatTensor<Self> {
        let data = TensorData::new(v, Shape::from(shape.to_vec())).convert_dtype(like.dtype());
        Self::float_from_data(data, &Self::float_device(like))
    }
}

/// The elements as f32 through `TensorData` (a copy).
pub fn copy_f32<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    // The rank of the wrapper is not checked by `into_data`; the data keeps its shape.
    let t: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(t));
    // A float tensor always converts to f32.
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

impl CpuTensors for Flex {
    fn with_f32<R>(t: &FloatTensor<Self>, f: impl FnOnce(&[f32]) -> R) -> R {
        let contiguous = t.to_contiguous();
        match contiguous.as_slice::<f32>() {
            Some(slice) => f(slice),
            None => f(&copy_f32::<Self>(t.clone())),
        }
    }

    fn from_f32(v: Vec<f32>, shape: &[usize], like: &FloatTensor<Self>) -> FloatTensor<Self> {
        let data = TensorData::new(v, Shape::from(shape.to_vec()));
        let data = if like.dtype() == DType::F32 { data } else { data.convert_dtype(like.dtype()) };
        burn::backend::flex::FlexTensor::from_data(data)
    }
}

#[cfg(feature = "ndarray")]
impl CpuTensors for burn::backend::NdArray {}

/// Below this many elements a buffer is zeroed on the calling thread (waking the pool
/// costs more than the memset).
const SERIAL_ZEROS: usize = 1 << 15;

/// `n` zeros for a kernel's output, written by the pool's threads when the buffer is
/// large. Buffers come from the heap the allocator keeps (`allocator`), so `vec![0; n]`
/// is a memset on the calling thread while the pool sleeps: a quarter of that thread's
/// time in the ViT's training step (perf, 2 threads).
pub fn zeros(n: usize) -> Vec<f32> {
    if n < SERIAL_ZEROS {
        return vec![0.0; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(SERIAL_ZEROS).for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the capacity is at least n, and the chunks above wrote all of the first n.
    unsafe { v.set_len(n) };
    v
}

/// A kernel's output of `len` floats, written in parallel chunks of `chunk` floats by
/// `fill(index, chunk)`, without the zero fill first (zeroing an output that the kernel
/// then overwrites was 3% of the CNN's and 9% of the ViT's training step).
///
/// # Safety
/// `fill` must write every element of the chunk it is given.
pub unsafe fn filled(len: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        v.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    }
    // SAFETY: the capacity is at least len, the chunks cover 0..len, and the caller's
    // `fill` wrote every element of each.
    unsafe { v.set_len(len) };
    v
}

/// A strided matrix view: `rows` x `cols`, element (r, c) at `offset + r * rs + c * cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

/// dst (m x n) = beta * lhs (m x k) * rhs (k x n), plus dst's own values when
/// `accumulate`; one thread (the callers run many of these in parallel). The views' extents
/// are checked against the slices, so a wrong stride is a panic, not a stray write.
#[allow(clippy::too_many_arguments)]
pub fn mm(dst: &mut [f32], d: View, lhs: &[f32], l: View, rhs: &[f32], r: View, m: usize, n: usize, k: usize, beta: f32, accumulate: bool) {
    mm_with(dst, d, lhs, l, rhs, r, [m, n, k], beta, accumulate, gemm::Parallelism::None);
}

/// `mm` on every thread of the pool. gemm splits the work over output blocks only; the
/// depth is cut into blocks whose size depends on the shapes, never on the thread
/// count, and summed in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn mm_parallel(dst: &mut [f32], d: View, lhs: &[f32], l: View, rhs: &[f32], r: View, m: usize, n: usize, k: usize, beta: f32, accumulate: bool) {
    mm_with(dst, d, lhs, l, rhs, r, [m, n, k], beta, accumulate, gemm::Parallelism::Rayon(0));
}

#[allow(clippy::too_many_arguments)]
fn mm_with(dst: &mut [f32], d: View, lhs: &[f32], l: View, rhs: &[f32], r: View, mnk: [usize; 3], beta: f32, accumulate: bool, parallelism: gemm::Parallelism) {
    // SAFETY: initialised floats are valid MaybeUninit<f32>s, and mm_into writes only floats.
    let dst = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
    // SAFETY: dst is initialised, so reading it when accumulating is sound.
    unsafe { mm_into(dst, d, lhs, l, rhs, r, mnk, beta, accumulate, parallelism) }
}

/// `mm` into a buffer that may be uninitialised: without `accumulate`, every element of
/// the view is written and none read, so a kernel's output needs no zero fill first.
///
/// # Safety
/// With `accumulate`, every element of the destination view must have been written.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm_uninit(dst: &mut [MaybeUninit<f32>], d: View, lhs: &[f32], l: View, rhs: &[f32], r: View, m: usize, n: usize, k: usize, beta: f32, accumulate: bool) {
    // SAFETY: the caller's contract is this one's.
    unsafe { mm_into(dst, d, lhs, l, rhs, r, [m, n, k], beta, accumulate, gemm::Parallelism::None) }
}

/// # Safety
/// As [`mm_uninit`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm_into(dst: &mut [MaybeUninit<f32>], d: View, lhs: &[f32], l: View, rhs: &[f32], r: View, [m, n, k]: [usize; 3], beta: f32, accumulate: bool, parallelism: gemm::Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: View, rows: usize, cols: usize| v.offset + (rows - 1) * v.rs + (cols - 1) * v.cs;
    // The extents are checked here, so the raw pointers below stay inside the slices.
    assert!(last(d, m, n) < dst.len(), "mm: destination view out of bounds");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst[d.offset + r * d.rs + c * d.cs].write(0.0);
                }
            }
        }
        return;
    }
    assert!(last(l, m, k) < lhs.len() && last(r, k, n) < rhs.len(), "mm: operand view out of bounds");
    // SAFETY: every element gemm touches, (rows - 1) * rs + (cols - 1) * cs past
    // the offset at most, was checked to be inside its slice above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>().add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.offset),
            r.cs as isize,
            r.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_zeros_at_every_size() {
        for n in [0, 1, SERIAL_ZEROS - 1, SERIAL_ZEROS, 3 * SERIAL_ZEROS + 7] {
            let v = zeros(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.to_bits() == 0));
        }
    }

    #[test]
    fn flex_views_strided_tensors_in_logical_order_and_builds_tensors() {
        let d = Default::default();
        let t = Tensor::<Flex, 2>::from_data(TensorData::new((0..6).map(|v| v as f32).collect::<Vec<_>>(), [2, 3]), &d);
        let transposed = t.clone().transpose().into_primitive().tensor();
        let seen = Flex::with_f32(&transposed, |s| s.to_vec());
        assert_eq!(seen, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let built = Flex::from_f32(seen.clone(), &[3, 2], &transposed);
        let back: Tensor<Flex, 2> = Tensor::from_primitive(TensorPrimitive::Float(built));
        assert_eq!(back.dims(), [3, 2]);
        assert_eq!(back.into_data().to_vec::<f32>().unwrap(), seen);
    }
}
