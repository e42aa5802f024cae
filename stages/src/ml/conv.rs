//! The models' convolutions as autodiff operations whose passes are chosen here instead
//! of burn's: the CNN's stride-1 "same" convolution ([`conv_same`]) and EfficientNet's
//! depthwise convolution ([`depthwise`]). The backend trait they go through is
//! [`KernelBackend`](super::kernels::KernelBackend); GPU backends keep burn's kernels.
//!
//! `conv_same` on the CPU backends ([`cpu_conv_same`]): per image, im2col then one gemm,
//! images in parallel. flex's own conv2d lays out the whole batch's im2col on the calling
//! thread, and its transposed convolution (burn's input gradient) is a direct loop on one
//! thread: together about half of that thread's time in the CNN's training step (perf,
//! 2 threads), while the other core waited. The input gradient of a stride-1 "same"
//! convolution is itself one, with the kernel transposed and flipped, so it runs through
//! the same code. The weight gradient is a plain matrix product, dW[o, (c, ky, kx)] = sum
//! over (n, y, x) of dY[n, o, y, x] * X[n, c, y + ky - p, x + kx - p] (burn runs it as a
//! convolution whose kernel is the whole output gradient: 57 ms for [64, 32, 28, 28]):
//! per chunk of images, im2col and one gemm per image accumulate into the chunk's sum;
//! chunks are fixed-size and summed in order, so the result does not depend on the
//! thread count. That product runs transposed, dW^T = im2col(x) * dY^T, with each
//! image's dY transposed first (same products, same order, same bits; faster in gemm).
//!
//! EfficientNet's depthwise convolutions (one 3x3 or 5x5 filter per channel, stride 1
//! or 2, TF "SAME" padding that may be uneven): burn's grouped conv2d backward on flex
//! cost about 10x its forward (input gradient 260-290 ms for [32, 96, 32, 32], 3x3). On
//! the CPU backends forward, input gradient and weight gradient are direct loops over
//! each (image, channel) plane ([`depthwise_cpu`]), each filter tap one long loop over a
//! zero-framed plane; GPU backends keep burn's kernels on an explicitly padded input
//! ([`burn_depthwise`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor, PadMode};
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::cpu::{CpuTensors, zeros};
use super::kernels::KernelBackend;

/// Images per partial sum of the weight gradient: fixed, so that the summation order
/// (and so the bits of the result) does not depend on how many threads run.
const IMAGES_PER_CHUNK: usize = 4;


/// The depthwise convolution through burn's own kernels (what GPU backends run).
pub mod burn_depthwise {
    use super::*;

    pub fn forward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let c = dims4::<B>(&weight)[0];
        B::conv2d(padded::<B>(x, pad), weight, None, depthwise_options(stride, c))
    }

    pub fn x_grad<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let [n, c, h, w] = dims4::<B>(&x);
        let dx = B::conv2d_x_backward(padded::<B>(x, pad), weight, grad, depthwise_options(stride, c));
        let dx: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(dx));
        dx.slice([0..n, 0..c, pad[0]..pad[0] + h, pad[2]..pad[2] + w]).into_primitive().tensor()
    }

    pub fn weight_grad<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let c = dims4::<B>(&weight)[0];
        B::conv2d_weight_backward(padded::<B>(x, pad), weight, grad, depthwise_options(stride, c))
    }
}

fn depthwise_options(stride: usize, channels: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [0, 0], [1, 1], channels)
}

fn dims4<B: Backend>(t: &FloatTensor<B>) -> [usize; 4] {
    use burn::tensor::TensorMetadata;
    t.shape().dims::<4>()
}

/// x with `pad` = [top, bottom, left, right] zeros around each plane.
fn padded<B: Backend>(x: FloatTensor<B>, pad: [usize; 4]) -> FloatTensor<B> {
    if pad == [0; 4] {
        return x;
    }
    let x: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(x));
    x.pad((pad[2], pad[3], pad[0], pad[1]), PadMode::Constant(0.0)).into_primitive().tensor()
}


pub(crate) fn options(k: usize) -> ConvOptions<2> {
    let p = (k - 1) / 2;
    ConvOptions::new([1, 1], [p, p], [1, 1], 1)
}

pub(crate) fn weight_kernel<B: Backend>(weight: &FloatTensor<B>) -> usize {
    dims4::<B>(weight)[2]
}

/// `conv_same` on tensors: the one call the models make.
pub fn conv_same<B: KernelBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, c, _, _] = x.dims();
    let [_, wc, kh, kw] = weight.dims();
    assert!(kh == kw && kh % 2 == 1 && c == wc, "conv_same needs an odd square kernel over all input channels");
    let out = B::conv_same(x.into_primitive().tensor(), weight.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}


#[derive(Debug)]
pub(crate) struct ConvSameBackward;

impl<B: KernelBackend> Backward<B, 2> for ConvSameBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::conv_same_x_grad(x.clone(), weight.clone(), grad.clone()));
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, B::conv_same_weight_grad(x, weight, grad));
        }
    }
}

#[derive(Debug)]
pub(crate) struct DepthwiseBackward {
    pub(crate) stride: usize,
    pub(crate) pad: [usize; 4],
}

impl<B: KernelBackend> Backward<B, 2> for DepthwiseBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        if let Some(node) = node_x {
            let dx = B::depthwise_x_grad(x.clone(), weight.clone(), grad.clone(), self.stride, self.pad);
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, B::depthwise_weight_grad(x, weight, grad, self.stride, self.pad));
        }
    }
}


/// `depthwise` on tensors: x [N, C, H, W], weight [C, 1, k, k], padding [top, bottom,
/// left, right] -> [N, C, (H + top + bottom - k) / stride + 1, ...].
pub fn depthwise<B: KernelBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, stride: usize, pad: [usize; 4]) -> Tensor<B, 4> {
    let [_, c, h, w] = x.dims();
    let [wc, one, kh, kw] = weight.dims();
    assert!(
        wc == c && one == 1 && kh == kw && stride >= 1 && h + pad[0] + pad[1] >= kh && w + pad[2] + pad[3] >= kw,
        "depthwise needs a [C, 1, k, k] weight over C channels and an input at least as large as the kernel"
    );
    let out = B::depthwise(x.into_primitive().tensor(), weight.into_primitive().tensor(), stride, pad);
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// A stride-1 "same" convolution on the CPU: per image, im2col then one gemm, images
/// in parallel (each image's output is computed by one task, so the result does not
/// depend on the thread count). flex's own conv2d lays out the whole batch's im2col on
/// the calling thread (21% of that thread's time in the CNN's training step, perf).
///
/// With `transposed`, `x` is an output gradient and the result the input gradient: for
/// a stride-1 "same" convolution that is itself a "same" convolution, with the kernel's
/// input and output channels swapped and both spatial axes flipped (flex's transposed
/// convolution, a direct loop on one thread, was 31% of that thread's time).
pub(crate) fn cpu_conv_same<B: CpuTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, transposed: bool) -> FloatTensor<B> {
    let [n, c, h, w] = dims4::<B>(&x);
    let [o, wc, k, _] = dims4::<B>(&weight);
    // Transposed: x has the kernel's o channels and the result its wc channels.
    let out_channels = if transposed { wc } else { o };
    let kernel = B::with_f32(&weight, |wt| if transposed { transpose_kernel(wt, o, wc, k) } else { wt.to_vec() });
    let y = if transposed {
        B::with_f32(&x, |xs| same_conv(xs, &kernel, [n, c, h, w, out_channels, k], input_grad_image))
    } else {
        B::with_f32(&x, |xs| same_conv(xs, &kernel, [n, c, h, w, out_channels, k], forward_image))
    };
    B::from_f32(y, &[n, out_channels, h, w], &x)
}

/// w [o, c, k, k] -> [c, o, k, k] with both spatial axes reversed.
fn transpose_kernel(w: &[f32], o: usize, c: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut t = vec![0f32; w.len()];
    for oi in 0..o {
        for ci in 0..c {
            let src = &w[(oi * c + ci) * kk..][..kk];
            let dst = &mut t[(ci * o + oi) * kk..][..kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    t
}

/// A kernel [o, c, k, k] as the matrix [c * k * k, o].
fn columns_major(wt: &[f32], o: usize) -> Vec<f32> {
    transposed(wt, o, wt.len() / o.max(1))
}

/// y [n, o, h, w] = x [n, c, h, w] (*) w [o, c, k, k], padding (k-1)/2, stride 1.
#[allow(clippy::too_many_arguments)]
pub fn conv_same_f32(x: &[f32], wt: &[f32], n: usize, c: usize, h: usize, w: usize, o: usize, k: usize) -> Vec<f32> {
    same_conv(x, wt, [n, c, h, w, o, k], forward_image)
}

/// One image's output of a "same" convolution: `image` is [`forward_image`] or
/// [`input_grad_image`], the same code under two names so that a profile tells the
/// forward from the input gradient (the tasks run on pool workers, whose call chains
/// do not reach the caller).
type ImageConv = fn(&[f32], &Kernel, &mut [MaybeUninit<f32>], [&mut Vec<MaybeUninit<f32>>; 2], [usize; 5]);

/// The kernel matrix in the layout of the product that [`image_conv`] computes.
enum Kernel {
    /// [o, c * k * k]: y = wt * im2col(x).
    Rows(Vec<f32>),
    /// [c * k * k, o]: y^T = im2col(x)^T * wt, then transposed.
    Columns(Vec<f32>),
}

/// gemm's f32 lanes with AVX-512: it copies the left operand into packed panels when
/// its row count is not a multiple of this (see [`image_conv`]). Elsewhere (8 lanes
/// with AVX2) the choice it makes may be the slower one; it never changes the bits.
const GEMM_LANES: usize = 16;

/// [n, c, h, w, o, k] as in [`conv_same_f32`], `wt` [o, c, k, k].
fn same_conv(x: &[f32], wt: &[f32], [n, c, h, w, o, k]: [usize; 6], image: ImageConv) -> Vec<f32> {
    let (hw, ckk) = (h * w, c * k * k);
    let len = n * o * hw;
    if hw == 0 || o == 0 || ckk == 0 {
        return zeros(len);
    }
    let wt = if hw % GEMM_LANES != 0 && c > 1 { Kernel::Columns(columns_major(wt, o)) } else { Kernel::Rows(wt.to_vec()) };
    let wt = &wt;
    // Not zero-filled first: every image's gemm writes all of its o * hw outputs without
    // reading them (filling the output with zeros was 3% of the CNN's training step).
    let mut y: Vec<f32> = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(o * hw)
        .enumerate()
        .for_each_init(|| (scratch(ckk * hw), Vec::new()), |(cols, yt), (i, yi)| image(&x[i * c * hw..(i + 1) * c * hw], wt, yi, [cols, yt], [c, h, w, o, k]));
    // SAFETY: the capacity is at least len, and the tasks above wrote all of it (the
    // chunks of o * hw cover 0..len, since len = n * o * hw).
    unsafe { y.set_len(len) };
    y
}

// Each names itself through `black_box` after the work: without it the two bodies are
// identical, the build folds them into one symbol, and the gemm call may become a tail
// call that leaves no frame of either on the stack.
#[inline(never)]
fn forward_image(img: &[f32], wt: &Kernel, yi: &mut [MaybeUninit<f32>], scratch: [&mut Vec<MaybeUninit<f32>>; 2], dims: [usize; 5]) {
    image_conv(img, wt, yi, scratch, dims);
    std::hint::black_box("conv forward");
}

#[inline(never)]
fn input_grad_image(img: &[f32], wt: &Kernel, yi: &mut [MaybeUninit<f32>], scratch: [&mut Vec<MaybeUninit<f32>>; 2], dims: [usize; 5]) {
    image_conv(img, wt, yi, scratch, dims);
    std::hint::black_box("conv input gradient");
}

/// yi [o, h * w] = wt [o, c * k * k] * im2col(img) [c * k * k, h * w], every element
/// of yi written.
///
/// With [`Kernel::Columns`], computed transposed, yi^T [h * w, o] = im2col(img)^T *
/// wt^T, into `yt`, then transposed into yi: the same products summed in the same order
/// (same bits), and gemm packs im2col(img)^T into panels when h * w is not a multiple
/// of its lanes, which ran the CNN's 14 x 14 and 7 x 7 layers 1.1x to 1.3x faster; at
/// 28 x 28 it reads that operand in place, and the form is 10% slower, with a single
/// input channel 2x slower ([`same_conv`] picks).
#[inline(always)]
fn image_conv(img: &[f32], wt: &Kernel, yi: &mut [MaybeUninit<f32>], [cols, yt]: [&mut Vec<MaybeUninit<f32>>; 2], [c, h, w, o, k]: [usize; 5]) {
    let (hw, ckk) = (h * w, c * k * k);
    assert!(img.len() == c * hw && yi.len() == o * hw && cols.len() == ckk * hw);
    im2col(img, cols, c, h, w, k, (k - 1) / 2);
    let cols = cols.as_ptr().cast::<f32>();
    match wt {
        Kernel::Rows(wt) => {
            assert!(wt.len() == o * ckk);
            // SAFETY: the lengths are checked above and the strides below stay inside
            // them; with read_dst false, gemm writes every element of yi and reads none;
            // im2col wrote every element of cols (MaybeUninit<f32> has f32's layout).
            unsafe { gemm::gemm(o, hw, ckk, yi.as_mut_ptr().cast::<f32>(), 1, hw as isize, false, wt.as_ptr(), 1, ckk as isize, cols, 1, hw as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None) }
        }
        Kernel::Columns(wt) => {
            assert!(wt.len() == ckk * o);
            yt.resize(hw * o, MaybeUninit::uninit());
            // SAFETY: as above, with yt [hw, o] in place of yi.
            unsafe { gemm::gemm(hw, o, ckk, yt.as_mut_ptr().cast::<f32>(), 1, o as isize, false, cols, hw as isize, 1, wt.as_ptr(), 1, o as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None) }
            // SAFETY: gemm wrote every element of yt.
            let yt = unsafe { &*(yt.as_slice() as *const [MaybeUninit<f32>] as *const [f32]) };
            transpose(yt, yi, hw, o);
        }
    }
}

/// The weight gradient on the CPU: im2col per image, then one gemm per image.
pub(crate) fn cpu_weight_grad<B: CpuTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let [o, c, k, _] = dims4::<B>(&weight);
    let [n, _, h, w] = dims4::<B>(&x);
    let dw = B::with_f32(&x, |xs| B::with_f32(&grad, |gs| weight_grad_f32(xs, gs, n, c, h, w, o, k)));
    B::from_f32(dw, &[o, c, k, k], &weight)
}

/// dW [o, c*k*k] for x [n, c, h, w], g [n, o, h, w], padding (k-1)/2, stride 1.
///
/// Computed transposed, dW^T [c*k*k, o] = sum over images of im2col(x) [c*k*k, h*w] *
/// g^T [h*w, o], each image's gradient transposed first: gemm runs this form at 1.2x to
/// 4x the speed of dW = g * im2col(x)^T at the CNN's shapes (it packs the row-major
/// g of the other form, per call, with a gather; 4.5% of the CNN's training step), and
/// the products and the order of their sums over (n, y, x) are the same, so are the bits.
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_f32(x: &[f32], g: &[f32], n: usize, c: usize, h: usize, w: usize, o: usize, k: usize) -> Vec<f32> {
    let p = (k - 1) / 2;
    let (hw, ckk) = (h * w, c * k * k);
    let partials: Vec<Vec<f32>> = (0..n)
        .collect::<Vec<_>>()
        .par_chunks(IMAGES_PER_CHUNK)
        .map(|images| {
            let mut acc = vec![0f32; ckk * o];
            let mut cols = scratch(ckk * hw);
            let mut gt = scratch(hw * o);
            for &i in images {
                im2col(&x[i * c * hw..(i + 1) * c * hw], &mut cols, c, h, w, k, p);
                transpose(&g[i * o * hw..(i + 1) * o * hw], &mut gt, o, hw);
                // acc[ckk, o] += cols[ckk, hw] * gt[hw, o]
                // SAFETY: the three buffers hold exactly ckk*hw, hw*o and ckk*o floats,
                // and the strides below stay inside them; im2col and transpose wrote all
                // of cols and gt.
                unsafe {
                    gemm::gemm(
                        ckk,
                        o,
                        hw,
                        acc.as_mut_ptr(),
                        1,
                        o as isize,
                        true,
                        cols.as_ptr().cast::<f32>(),
                        1,
                        hw as isize,
                        gt.as_ptr().cast::<f32>(),
                        1,
                        o as isize,
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
    let mut total = vec![0f32; ckk * o];
    for part in partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    transposed(&total, ckk, o)
}

/// src [rows, cols]^T as a new [cols, rows] vector.
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = Vec::with_capacity(src.len());
    transpose(src, &mut t.spare_capacity_mut()[..src.len()], rows, cols);
    // SAFETY: the capacity is at least src.len(), and transpose wrote all of it.
    unsafe { t.set_len(src.len()) };
    t
}

/// dst [cols, rows] = src [rows, cols]^T, every element of dst written: 8 x 8 tiles
/// through AVX registers where the CPU has AVX (the compiler's own code for a tile was
/// scalar moves through the stack: 4% of the CNN's training step), the edges and other
/// CPUs one element at a time.
fn transpose(src: &[f32], dst: &mut [MaybeUninit<f32>], rows: usize, cols: usize) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols);
    let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        for r0 in (0..full_r).step_by(8) {
            for c0 in (0..full_c).step_by(8) {
                // SAFETY: the CPU has AVX (checked above); rows r0..r0 + 8 and columns
                // c0..c0 + 8 lie inside src [rows, cols] and, transposed, inside dst
                // [cols, rows] (r0 + 8 <= rows, c0 + 8 <= cols).
                unsafe { transpose_8x8_avx(src.as_ptr().add(r0 * cols + c0), cols, dst.as_mut_ptr().add(c0 * rows + r0).cast::<f32>(), rows) };
            }
        }
        transpose_scalar(src, dst, rows, cols, [full_r, full_c]);
        return;
    }
    transpose_scalar(src, dst, rows, cols, [0, 0]);
}

/// The elements of the transpose outside the first `done` = [r, c] rows and columns
/// (the tiles already written).
fn transpose_scalar(src: &[f32], dst: &mut [MaybeUninit<f32>], rows: usize, cols: usize, [done_r, done_c]: [usize; 2]) {
    for r in 0..rows {
        let first = if r < done_r { done_c } else { 0 };
        for c in first..cols {
            dst[c * rows + r] = MaybeUninit::new(src[r * cols + c]);
        }
    }
}

/// One 8 x 8 tile: dst[c * dst_stride + r] = src[r * src_stride + c], r, c < 8
/// (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves).
///
/// # Safety
/// The CPU has AVX, and the 8 rows of 8 floats at src and at dst, `*_stride` floats
/// apart, are inside their allocations.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_8x8_avx(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract: every load and store below is inside the tile.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let q = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * dst_stride), _mm256_permute2f128_ps::<0x20>(q[i], q[i + 4]));
            _mm256_storeu_ps(dst.add((i + 4) * dst_stride), _mm256_permute2f128_ps::<0x31>(q[i], q[i + 4]));
        }
    }
}

/// An im2col buffer: not zero-filled, since [`im2col`] writes every element (the zero
/// fill of each task's buffer was 2% of the CNN's training step).
fn scratch(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation, and the capacity is len.
    unsafe { v.set_len(len) };
    v
}

/// cols[(c, ky, kx), (y, x)] = img[c, y + ky - p, x + kx - p], zero outside; every
/// element of cols written.
///
/// Each row of `cols` is its plane shifted by (ky - p) * w + (kx - p) elements: one
/// bulk copy, then the rows and columns that fell off an edge are zeroed. (Copying row
/// by row, 7 to 28 floats at a time, was a fifth of the CNN's training step, perf.)
fn im2col(img: &[f32], cols: &mut [MaybeUninit<f32>], c: usize, h: usize, w: usize, k: usize, p: usize) {
    let hw = h * w;
    for ci in 0..c {
        let plane = &img[ci * hw..(ci + 1) * hw];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((ci * k + ky) * k + kx) * hw..][..hw];
                let (dy, dx) = (ky as isize - p as isize, kx as isize - p as isize);
                // Rows y in [y0, y1) and columns x in [x0, x1) have a source inside the plane.
                let (y0, y1) = (dy.min(0).unsigned_abs(), (h as isize - dy.max(0)).max(0) as usize);
                let (x0, x1) = (dx.min(0).unsigned_abs(), (w as isize - dx.max(0)).max(0) as usize);
                if y0 >= y1 || x0 >= x1 {
                    row.fill(MaybeUninit::new(0.0));
                    continue;
                }
                // Destination span from (y0, 0) to (y1, 0): every element in it reads
                // plane[j + dy * w + dx], inside the plane for j in [y0 * w + x0, (y1 - 1) * w + x1).
                let (first, last) = (y0 * w + x0, (y1 - 1) * w + x1);
                let shift = dy * w as isize + dx;
                let src = (first as isize + shift) as usize;
                row[first..last].write_copy_of_slice(&plane[src..src + (last - first)]);
                row[..first].fill(MaybeUninit::new(0.0));
                row[last..].fill(MaybeUninit::new(0.0));
                // The bulk copy wrapped around the left and right edges; zero those columns.
                // At most p floats a side: stored one by one, as volatile stores, because
                // LLVM turns a zeroing loop (or `fill`) into a call to memset, and these
                // calls of 4 or 8 bytes were 3% of the CNN's training step.
                // Through a raw pointer: with slices and iterators this loop was 6% of the
                // CNN's training step (bounds checks and splits around every store).
                if x0 > 0 || x1 < w {
                    let base = row.as_mut_ptr().cast::<f32>();
                    for y in y0..y1 {
                        // SAFETY: y < h and x < w, so y * w + x < h * w = row.len(), and
                        // MaybeUninit<f32> has f32's layout.
                        unsafe {
                            for x in 0..x0 {
                                std::ptr::write_volatile(base.add(y * w + x), 0.0);
                            }
                            for x in x1..w {
                                std::ptr::write_volatile(base.add(y * w + x), 0.0);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The depthwise convolution on the CPU: direct loops over each (image, channel) plane,
/// one k x k filter per channel (nothing for a gemm to batch). Planes run in parallel
/// and each is computed by one task in a fixed loop order; the weight gradient sums
/// the per-plane partials over images in image order. So no result depends on the
/// thread count.
pub mod depthwise_cpu {
    use super::*;

    /// Shapes and padding of one depthwise convolution.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Geometry {
        pub n: usize,
        pub c: usize,
        pub h: usize,
        pub w: usize,
        pub k: usize,
        pub stride: usize,
        /// [top, bottom, left, right].
        pub pad: [usize; 4],
    }

    impl Geometry {
        pub fn out(&self) -> (usize, usize) {
            let oh = (self.h + self.pad[0] + self.pad[1] - self.k) / self.stride + 1;
            let ow = (self.w + self.pad[2] + self.pad[3] - self.k) / self.stride + 1;
            (oh, ow)
        }
    }

    /// Planes per rayon task: at least about 4096 outputs, so the many tiny planes of
    /// the late layers do not cost a task each.
    fn min_planes(plane: usize) -> usize {
        (4096 / plane.max(1)).max(1)
    }

    fn geometry<B: Backend>(x: &FloatTensor<B>, weight: &FloatTensor<B>, stride: usize, pad: [usize; 4]) -> Geometry {
        let [n, c, h, w] = dims4::<B>(x);
        let k = dims4::<B>(weight)[2];
        Geometry { n, c, h, w, k, stride, pad }
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let g = geometry::<B>(&x, &weight, stride, pad);
        let (oh, ow) = g.out();
        let y = B::with_f32(&x, |xs| B::with_f32(&weight, |ws| forward_f32(xs, ws, g)));
        B::from_f32(y, &[g.n, g.c, oh, ow], &weight)
    }

    pub fn x_grad<B: CpuTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let g = geometry::<B>(&x, &weight, stride, pad);
        let dx = B::with_f32(&weight, |ws| B::with_f32(&grad, |gs| x_grad_f32(ws, gs, g)));
        B::from_f32(dx, &[g.n, g.c, g.h, g.w], &grad)
    }

    pub fn weight_grad<B: CpuTensors>(x: FloatTensor<B>, weight: FloatTensor<B>, grad: FloatTensor<B>, stride: usize, pad: [usize; 4]) -> FloatTensor<B> {
        let g = geometry::<B>(&x, &weight, stride, pad);
        let dw = B::with_f32(&x, |xs| B::with_f32(&grad, |gs| weight_grad_f32(xs, gs, g)));
        B::from_f32(dw, &[g.c, 1, g.k, g.k], &weight)
    }

    /// The padded layout every kernel works in, so that each filter tap is ONE long
    /// loop over a whole plane instead of a short loop per row: the input plane is
    /// copied into a zero frame of row length `wp` = w + left + right, and outputs live
    /// in rows of the same length, so output i reads input stride * i + (ky * wp + kx)
    /// (output row oy starts at input row stride * oy). The columns past the real
    /// output width are scratch (half of each row at stride 2, which costs less than a
    /// short loop per row).
    #[derive(Debug, Clone, Copy)]
    struct Padded {
        wp: usize,
        rows: usize,
        oh: usize,
        ow: usize,
    }

    impl Padded {
        fn new(g: &Geometry) -> Self {
            let (oh, ow) = g.out();
            // The last output reads up to stride * (oh * wp - 1) + (k - 1) * wp + k - 1.
            Padded { wp: g.w + g.pad[2] + g.pad[3], rows: g.stride * oh + g.k, oh, ow }
        }

        /// Copy a plane of x into the zero frame.
        fn load_input(&self, g: &Geometry, plane: &[f32], buf: &mut Vec<f32>) {
            buf.clear();
            buf.resize(self.rows * self.wp, 0.0);
            for (y, row) in plane.chunks_exact(g.w).enumerate() {
                buf[(g.pad[0] + y) * self.wp + g.pad[2]..][..g.w].copy_from_slice(row);
            }
        }

        /// Copy a plane of output gradients into padded output rows (scratch columns 0).
        fn load_output(&self, plane: &[f32], buf: &mut Vec<f32>) {
            buf.clear();
            buf.resize(self.oh * self.wp, 0.0);
            for (oy, row) in plane.chunks_exact(self.ow).enumerate() {
                buf[oy * self.wp..][..self.ow].copy_from_slice(row);
            }
        }

        fn tap(&self, ky: usize, kx: usize) -> usize {
            ky * self.wp + kx
        }
    }

    /// y[n, c] = x[n, c] (*) w[c], planes row-major.
    pub fn forward_f32(x: &[f32], w: &[f32], g: Geometry) -> Vec<f32> {
        let p = Padded::new(&g);
        let (k, s, hw, len) = (g.k, g.stride, g.h * g.w, p.oh * p.wp);
        let mut y = zeros(g.n * g.c * p.oh * p.ow);
        y.par_chunks_mut(p.oh * p.ow).with_min_len(min_planes(p.oh * p.ow)).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(xpad, acc), (plane, out)| {
                p.load_input(&g, &x[plane * hw..(plane + 1) * hw], xpad);
                acc.clear();
                acc.resize(len, 0.0);
                for (t, &wv) in w[(plane % g.c) * k * k..][..k * k].iter().enumerate() {
                    let src = &xpad[p.tap(t / k, t % k)..];
                    if s == 1 {
                        for (a, v) in acc.iter_mut().zip(&src[..len]) {
                            *a += wv * v;
                        }
                    } else {
                        for (a, v) in acc.iter_mut().zip(src.iter().step_by(s)) {
                            *a += wv * v;
                        }
                    }
                }
                for (dst, row) in out.chunks_exact_mut(p.ow).zip(acc.chunks_exact(p.wp)) {
                    dst.copy_from_slice(&row[..p.ow]);
                }
            },
        );
        y
    }

    /// dx[n, c] = the transposed convolution of dy[n, c] with w[c].
    pub fn x_grad_f32(w: &[f32], dy: &[f32], g: Geometry) -> Vec<f32> {
        let p = Padded::new(&g);
        let (k, s, hw, len, oplane) = (g.k, g.stride, g.h * g.w, p.oh * p.wp, p.oh * p.ow);
        let mut dx = zeros(g.n * g.c * hw);
        dx.par_chunks_mut(hw).with_min_len(min_planes(hw)).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(gpad, acc), (plane, out)| {
                p.load_output(&dy[plane * oplane..(plane + 1) * oplane], gpad);
                acc.clear();
                acc.resize(p.rows * p.wp, 0.0);
                for (t, &wv) in w[(plane % g.c) * k * k..][..k * k].iter().enumerate() {
                    let dst = &mut acc[p.tap(t / k, t % k)..];
                    if s == 1 {
                        for (d, v) in dst[..len].iter_mut().zip(gpad.iter()) {
                            *d += wv * v;
                        }
                    } else {
                        for (d, v) in dst.iter_mut().step_by(s).zip(gpad.iter()) {
                            *d += wv * v;
                        }
                    }
                }
                for (y, row) in out.chunks_exact_mut(g.w).enumerate() {
                    row.copy_from_slice(&acc[(g.pad[0] + y) * p.wp + g.pad[2]..][..g.w]);
                }
            },
        );
        dx
    }

    /// dw[c] = sum over images of the correlation of x[n, c] with dy[n, c]: one k x k
    /// partial per plane, summed over n in order.
    pub fn weight_grad_f32(x: &[f32], dy: &[f32], g: Geometry) -> Vec<f32> {
        let p = Padded::new(&g);
        let (k, s, hw, kk, oplane) = (g.k, g.stride, g.h * g.w, g.k * g.k, p.oh * p.ow);
        let mut partials = zeros(g.n * g.c * kk);
        partials.par_chunks_mut(kk).with_min_len(min_planes(oplane)).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(xpad, gpad), (plane, acc)| {
                p.load_input(&g, &x[plane * hw..(plane + 1) * hw], xpad);
                p.load_output(&dy[plane * oplane..(plane + 1) * oplane], gpad);
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = dot(gpad, &xpad[p.tap(t / k, t % k)..], s);
                }
            },
        );
        let mut dw = vec![0f32; g.c * kk];
        for image in partials.chunks(g.c * kk) {
            for (d, p) in dw.iter_mut().zip(image) {
                *d += p;
            }
        }
        dw
    }

    /// sum over i of a[i] * b[stride * i], in eight interleaved partial sums (so it
    /// vectorises at stride 1; the order is fixed, so the bits are too).
    fn dot(a: &[f32], b: &[f32], stride: usize) -> f32 {
        let mut lanes = [0f32; 8];
        let full = a.len() / 8 * 8;
        if stride == 1 {
            for (x, y) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
                for i in 0..8 {
                    lanes[i] += x[i] * y[i];
                }
            }
        } else {
            for (j, x) in a[..full].chunks_exact(8).enumerate() {
                let y = &b[stride * 8 * j..];
                for i in 0..8 {
                    lanes[i] += x[i] * y[stride * i];
                }
            }
        }
        let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for i in full..a.len() {
            sum += a[i] * b[stride * i];
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;
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

    /// The transpose writes every element to its place, full tiles and edges alike.
    #[test]
    fn transpose_matches_its_definition() {
        for (rows, cols) in [(1, 1), (1, 9), (9, 1), (8, 8), (13, 21), (16, 24), (32, 784), (7, 49), (49, 64), (17, 8), (8, 17)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![MaybeUninit::new(f32::NAN); rows * cols];
            let mut scalar = vec![MaybeUninit::new(f32::NAN); rows * cols];
            transpose(&src, &mut dst, rows, cols);
            transpose_scalar(&src, &mut scalar, rows, cols, [0, 0]);
            for r in 0..rows {
                for c in 0..cols {
                    // SAFETY: every element was initialised (NaN, then transpose's writes).
                    let (tiled, one_by_one) = unsafe { (dst[c * rows + r].assume_init(), scalar[c * rows + r].assume_init()) };
                    assert_eq!((tiled, one_by_one), (src[r * cols + c], src[r * cols + c]), "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }

    /// Both layouts of the convolution's product give the same bits, at the sizes where
    /// [`same_conv`] picks the transposed one (h * w not a multiple of gemm's lanes) and
    /// where it does not.
    #[test]
    fn both_product_layouts_give_the_same_bits() {
        for [c, h, w, o, k] in [[32, 14, 14, 64, 3], [128, 7, 7, 128, 3], [3, 9, 5, 7, 5], [32, 28, 28, 32, 3], [1, 7, 7, 8, 3]] {
            let (hw, ckk) = (h * w, c * k * k);
            let img: Vec<f32> = (0..c * hw).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
            let wt: Vec<f32> = (0..o * ckk).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
            let mut outputs = Vec::new();
            for kernel in [Kernel::Rows(wt.clone()), Kernel::Columns(columns_major(&wt, o))] {
                let mut y = vec![MaybeUninit::new(f32::NAN); o * hw];
                image_conv(&img, &kernel, &mut y, [&mut scratch(ckk * hw), &mut Vec::new()], [c, h, w, o, k]);
                // SAFETY: every element was initialised (NaN, then the product's writes).
                outputs.push(y.into_iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect::<Vec<_>>());
            }
            assert_eq!(outputs[0], outputs[1], "{:?}", [c, h, w, o, k]);
        }
    }

    /// The weight gradient computed transposed (dW^T = im2col(x) * g^T) has the bits of
    /// dW = g * im2col(x)^T, the form the determinism pipelines' figures were made with:
    /// the same products, summed in the same order. Shapes of the CNN's layers, spatial
    /// sizes past gemm's depth blocks (28 x 28 = 784 > 512), an uneven last chunk.
    #[test]
    fn weight_gradient_has_the_bits_of_the_untransposed_product() {
        fn untransposed(x: &[f32], g: &[f32], [n, c, h, w, o, k]: [usize; 6]) -> Vec<f32> {
            let (hw, ckk) = (h * w, c * k * k);
            let mut total = vec![0f32; o * ckk];
            for images in (0..n).collect::<Vec<_>>().chunks(IMAGES_PER_CHUNK) {
                let mut acc = vec![0f32; o * ckk];
                let mut cols = scratch(ckk * hw);
                for &i in images {
                    im2col(&x[i * c * hw..(i + 1) * c * hw], &mut cols, c, h, w, k, (k - 1) / 2);
                    // SAFETY: im2col wrote every element of cols.
                    let cols: Vec<f32> = cols.iter().map(|v| unsafe { v.assume_init() }).collect();
                    let (gi, row, col) = (&g[i * o * hw..(i + 1) * o * hw], View { offset: 0, rs: hw, cs: 1 }, View { offset: 0, rs: 1, cs: hw });
                    crate::ml::cpu::mm(&mut acc, View { offset: 0, rs: ckk, cs: 1 }, gi, row, &cols, col, o, ckk, hw, 1.0, true);
                }
                for (t, v) in total.iter_mut().zip(acc) {
                    *t += v;
                }
            }
            total
        }
        use crate::ml::cpu::View;
        for [n, c, h, w, o, k] in [[6, 1, 28, 28, 32, 3], [5, 32, 14, 14, 64, 3], [3, 128, 7, 7, 128, 3], [2, 3, 9, 5, 7, 5]] {
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
            let g: Vec<f32> = (0..n * o * h * w).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
            let ours = weight_grad_f32(&x, &g, n, c, h, w, o, k);
            let reference = untransposed(&x, &g, [n, c, h, w, o, k]);
            assert!(ours.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{:?}", [n, c, h, w, o, k]);
        }
    }

    /// The shifted-copy im2col equals the definition element by element, for kernels
    /// wider than the plane too (every tap off the plane).
    #[test]
    fn im2col_matches_its_definition() {
        for (c, h, w, k) in [(2, 5, 7, 3), (1, 1, 1, 3), (3, 2, 2, 5), (1, 4, 1, 3), (2, 6, 6, 1), (1, 3, 9, 7)] {
            let p = (k - 1) / 2;
            let img: Vec<f32> = (0..c * h * w).map(|i| i as f32 + 1.0).collect();
            let mut cols = vec![MaybeUninit::new(f32::NAN); c * k * k * h * w];
            im2col(&img, &mut cols, c, h, w, k, p);
            // SAFETY: every element was initialised (NaN, then im2col's writes).
            let cols: Vec<f32> = cols.into_iter().map(|v| unsafe { v.assume_init() }).collect();
            for ci in 0..c {
                for ky in 0..k {
                    for kx in 0..k {
                        for y in 0..h {
                            for x in 0..w {
                                let (sy, sx) = (y as isize + ky as isize - p as isize, x as isize + kx as isize - p as isize);
                                let want = if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) { img[ci * h * w + sy as usize * w + sx as usize] } else { 0.0 };
                                let got = cols[((ci * k + ky) * k + kx) * h * w + y * w + x];
                                assert_eq!(got, want, "c{c} h{h} w{w} k{k} at ({ci},{ky},{kx},{y},{x})");
                            }
                        }
                    }
                }
            }
        }
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

    /// The depthwise op equals burn's grouped conv2d on an explicitly padded input:
    /// values and both gradients, 3x3 and 5x5, strides 1 and 2, even and uneven (TF
    /// "SAME") padding, odd sizes, planes smaller than the kernel's reach.
    #[test]
    fn depthwise_matches_burns_grouped_conv2d() {
        let d = Default::default();
        let cases = [
            // (n, c, h, w, k, stride, [top, bottom, left, right])
            (2, 3, 7, 9, 3, 1, [1, 1, 1, 1]),
            (3, 4, 8, 8, 3, 2, [0, 1, 0, 1]),
            (2, 5, 9, 7, 5, 2, [1, 2, 2, 1]),
            (1, 2, 6, 5, 5, 1, [2, 2, 2, 2]),
            (2, 3, 5, 5, 3, 2, [1, 1, 1, 1]),
            (2, 2, 2, 3, 5, 1, [2, 2, 2, 2]),
            (3, 6, 11, 11, 5, 2, [1, 2, 1, 2]),
            (1, 3, 4, 4, 3, 1, [0, 0, 0, 0]),
            (2, 2, 1, 1, 3, 2, [1, 1, 1, 1]),
            // A 1x1 plane under a 5x5 kernel (Lite0's last stride-1 stage at 32 px).
            (2, 3, 1, 1, 5, 1, [2, 2, 2, 2]),
            (2, 3, 2, 2, 5, 2, [1, 2, 1, 2]),
        ];
        for (n, c, h, w, k, stride, pad) in cases {
            let xd = Tensor::<Flex, 4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d).into_data();
            let wd = Tensor::<Flex, 4>::random([c, 1, k, k], Distribution::Normal(0.0, 1.0), &d).into_data();
            let run = |ours: bool| {
                let x = Tensor::<AD, 4>::from_data(xd.clone(), &d).require_grad();
                let wt = Tensor::<AD, 4>::from_data(wd.clone(), &d).require_grad();
                let y = if ours {
                    depthwise(x.clone(), wt.clone(), stride, pad)
                } else {
                    let xp = x.clone().pad((pad[2], pad[3], pad[0], pad[1]), PadMode::Constant(0.0));
                    burn::tensor::module::conv2d(xp, wt.clone(), None, depthwise_options(stride, c))
                };
                let gd = Tensor::<AD, 4>::from_data(
                    TensorData::new((0..y.shape().num_elements()).map(|i| ((i * 29 % 17) as f32 - 8.0) / 5.0).collect::<Vec<_>>(), y.dims()),
                    &d,
                );
                let g = (y.clone() * gd).sum().backward();
                (y.dims(), v(y.inner()), v(x.grad(&g).unwrap()), v(wt.grad(&g).unwrap()))
            };
            let (a, b) = (run(true), run(false));
            assert_eq!(a.0, b.0, "output shape of {:?}", (n, c, h, w, k, stride, pad));
            close(a.1, b.1);
            close(a.2, b.2);
            close(a.3, b.3);
        }
        // The GPU backends' default (burn's kernels on the inner backend) agrees too.
        for (n, c, h, w, k, stride, pad) in cases {
            let x = Tensor::<Flex, 4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d);
            let wt = Tensor::<Flex, 4>::random([c, 1, k, k], Distribution::Normal(0.0, 1.0), &d);
            let p = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
            let t = |f: FloatTensor<Flex>| v(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(f)));
            let y = t(Flex::depthwise(p(x.clone()), p(wt.clone()), stride, pad));
            let oh = (h + pad[0] + pad[1] - k) / stride + 1;
            let ow = (w + pad[2] + pad[3] - k) / stride + 1;
            let gy = Tensor::<Flex, 4>::random([n, c, oh, ow], Distribution::Normal(0.0, 1.0), &d);
            close(y, t(burn_depthwise::forward::<Flex>(p(x.clone()), p(wt.clone()), stride, pad)));
            close(
                t(Flex::depthwise_x_grad(p(x.clone()), p(wt.clone()), p(gy.clone()), stride, pad)),
                t(burn_depthwise::x_grad::<Flex>(p(x.clone()), p(wt.clone()), p(gy.clone()), stride, pad)),
            );
            close(
                t(Flex::depthwise_weight_grad(p(x.clone()), p(wt.clone()), p(gy.clone()), stride, pad)),
                t(burn_depthwise::weight_grad::<Flex>(p(x), p(wt), p(gy), stride, pad)),
            );
        }
    }

    #[test]
    fn depthwise_is_bit_identical_with_one_and_two_threads() {
        use depthwise_cpu::{Geometry, forward_f32, weight_grad_f32, x_grad_f32};
        let g = Geometry { n: 7, c: 5, h: 13, w: 11, k: 5, stride: 2, pad: [1, 2, 1, 2] };
        let (oh, ow) = g.out();
        let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let w: Vec<f32> = (0..g.c * g.k * g.k).map(|i| ((i * 13 % 23) as f32 - 11.0) / 9.0).collect();
        let dy: Vec<f32> = (0..g.n * g.c * oh * ow).map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.0).collect();
        let all = |g: Geometry| (forward_f32(&x, &w, g), x_grad_f32(&w, &dy, g), weight_grad_f32(&x, &dy, g));
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(one.install(|| all(g)), two.install(|| all(g)));
        let g1 = Geometry { stride: 1, pad: [2, 2, 2, 2], ..g };
        let dy1: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.0).collect();
        let all1 = || (forward_f32(&x, &w, g1), x_grad_f32(&w, &dy1, g1), weight_grad_f32(&x, &dy1, g1));
        assert_eq!(one.install(all1), two.install(all1));
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
