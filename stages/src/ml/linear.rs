//! A fully connected layer over rows as one op: y [rows, out] = x [rows, in] W + b, the
//! weight in burn's layout ([in, out], `burn::nn::Linear`) or torch's ([out, in],
//! Swin-V2's `TLinear`), see [`Layout`].
//!
//! Why one op: burn's linear on flex is a matmul whose set-up runs on the calling thread,
//! then a broadcast bias add and, backward, a bias reduction, all on that thread (a
//! third of its time in the ViT's step after attention and GELU were fused, perf). On
//! the CPU backends ([`cpu`]) rows go in fixed chunks, one task and one gemm per chunk;
//! the weight gradient is one product over all rows on every thread and the bias
//! gradient one sum per column in row order, so no result depends on the thread count.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::kernels::{KernelBackend, register_grads};

/// How the weight matrix is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [in, out] (burn's `Linear`).
    InOut,
    /// [out, in] (torch's `nn.Linear`).
    OutIn,
}

/// x [rows, in] -> [rows, out].
pub fn linear<B: KernelBackend>(x: Tensor<B, 2>, weight: &Param<Tensor<B, 2>>, bias: Option<&Param<Tensor<B, 1>>>, layout: Layout) -> Tensor<B, 2> {
    let [_, inputs] = x.dims();
    let [a, b] = weight.dims();
    let (w_in, w_out) = if layout == Layout::InOut { (a, b) } else { (b, a) };
    assert!(inputs == w_in && bias.is_none_or(|b| b.dims() == [w_out]), "linear: the weight does not fit the input");
    dense(x, weight.val(), bias.map(|b| b.val()), layout)
}

/// `linear` with a weight and bias computed from parameters (Swin-V2's qkv bias is q's
/// and v's parameters around k's zeros), shapes checked by the caller.
pub fn dense<B: KernelBackend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, layout: Layout) -> Tensor<B, 2> {
    let y = B::dense(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.map(|b| b.into_primitive().tensor()), layout);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// `linear` through a `burn::nn::Linear` (weight [in, out]).
pub fn forward<B: KernelBackend>(layer: &burn::nn::Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    linear(x, &layer.weight, layer.bias.as_ref(), Layout::InOut)
}

#[derive(Debug)]
pub(crate) struct LinearBackward {
    pub(crate) layout: Layout,
}

impl<B: KernelBackend> Backward<B, 3> for LinearBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        register_grads::<B, 3>(grads, ops.parents.map(|p| p.map(|n| n.id)), B::dense_backward(x, w, self.layout, grad));
    }
}

#[derive(Debug)]
pub(crate) struct LinearNoBiasBackward {
    pub(crate) layout: Layout,
}

impl<B: KernelBackend> Backward<B, 2> for LinearNoBiasBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let [dx, dw, _] = B::dense_backward(x, w, self.layout, grad);
        register_grads::<B, 2>(grads, ops.parents.map(|p| p.map(|n| n.id)), [dx, dw]);
    }
}

/// The op in burn's own ops (GPU backends, and the tests' reference).
pub mod reference {
    use super::*;

    fn t<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    /// The weight as [in, out].
    fn in_out<B: Backend>(w: FloatTensor<B>, layout: Layout) -> Tensor<B, 2> {
        let w: Tensor<B, 2> = t(w);
        if layout == Layout::InOut { w } else { w.transpose() }
    }

    pub fn forward<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, b: Option<FloatTensor<B>>, layout: Layout) -> FloatTensor<B> {
        let y = t::<B, 2>(x).matmul(in_out(w, layout));
        let y = match b {
            Some(b) => y + t::<B, 1>(b).unsqueeze_dim(0),
            None => y,
        };
        y.into_primitive().tensor()
    }

    /// (dx, dw in the weight's layout, db).
    pub fn backward<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>, layout: Layout, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let dy: Tensor<B, 2> = t(grad);
        let x: Tensor<B, 2> = t(x);
        let dx = dy.clone().matmul(in_out(w, layout).transpose());
        let dw = x.transpose().matmul(dy.clone());
        let dw = if layout == Layout::InOut { dw } else { dw.transpose() };
        let [_, out] = dy.dims();
        let db = dy.sum_dim(0).reshape([out]);
        [dx.into_primitive().tensor(), dw.into_primitive().tensor(), db.into_primitive().tensor()]
    }
}

/// The op on the CPU backends.
pub mod cpu {
    use super::*;
    use crate::ml::cpu::{CpuTensors, View, filled, mm_parallel, mm_uninit};
    use burn::tensor::TensorMetadata;
    use rayon::prelude::*;

    /// Rows per task: the rows cut into about 8 tasks (even on 1, 2, 4 or 8 threads),
    /// of at least 64 rows, a multiple of 16. From the shape alone, so no result depends
    /// on the thread count. (Fixed 128-row tasks ran the ViT's 3200 x 128 x 128 products
    /// at 313 GFLOP/s on 2 threads; 400-row tasks at about 370: each task packs the
    /// weight again, and a larger one amortises it.)
    fn rows_per_task(rows: usize) -> usize {
        rows.div_ceil(8).next_multiple_of(16).max(64)
    }
    /// Bias-gradient columns per task.
    const COLUMNS_PER_TASK: usize = 64;

    /// The weight as the [in, out] right-hand side of a product.
    fn weight_view(layout: Layout, inputs: usize, outputs: usize) -> View {
        match layout {
            Layout::InOut => View { offset: 0, rs: outputs, cs: 1 },
            Layout::OutIn => View { offset: 0, rs: 1, cs: inputs },
        }
    }

    fn sizes<B: Backend>(x: &FloatTensor<B>, w: &FloatTensor<B>, layout: Layout) -> (usize, usize, usize) {
        let [rows, inputs] = x.shape().dims::<2>();
        let [a, b] = w.shape().dims::<2>();
        (rows, inputs, if layout == Layout::InOut { b } else { a })
    }

    pub fn forward<B: CpuTensors>(x: FloatTensor<B>, w: FloatTensor<B>, b: Option<FloatTensor<B>>, layout: Layout) -> FloatTensor<B> {
        let (rows, inputs, outputs) = sizes::<B>(&x, &w, layout);
        let bias = b.map(|b| B::with_f32(&b, |s| s.to_vec()));
        if outputs == 0 {
            return B::from_f32(Vec::new(), &[rows, outputs], &x);
        }
        let y = B::with_f32(&x, |xs| {
            B::with_f32(&w, |ws| {
                let task = rows_per_task(rows);
                // SAFETY: each task writes all of its rows: the bias, then the product
                // added to it, or the product alone (its dst view is the whole chunk).
                unsafe {
                    filled(rows * outputs, task * outputs, |chunk, ys| {
                        let r = ys.len() / outputs;
                        if let Some(bias) = &bias {
                            for row in ys.chunks_mut(outputs) {
                                for (d, b) in row.iter_mut().zip(bias) {
                                    d.write(*b);
                                }
                            }
                        }
                        let lhs = View { offset: chunk * task * inputs, rs: inputs, cs: 1 };
                        let dst = View { offset: 0, rs: outputs, cs: 1 };
                        // When accumulating onto the bias, the loop above wrote every row.
                        mm_uninit(ys, dst, xs, lhs, ws, weight_view(layout, inputs, outputs), r, outputs, inputs, 1.0, bias.is_some());
                    })
                }
            })
        });
        B::from_f32(y, &[rows, outputs], &x)
    }

    pub fn backward<B: CpuTensors>(x: FloatTensor<B>, w: FloatTensor<B>, layout: Layout, grad: FloatTensor<B>) -> [FloatTensor<B>; 3] {
        let (rows, inputs, outputs) = sizes::<B>(&x, &w, layout);
        let mut dx = Vec::new();
        // The weight gradient is computed as [in, out], then laid out as the weight.
        let (mut dw, mut db) = (vec![0f32; inputs * outputs], vec![0f32; outputs]);
        if inputs > 0 && outputs > 0 && rows > 0 {
            B::with_f32(&x, |xs| {
                B::with_f32(&w, |ws| {
                    B::with_f32(&grad, |gs| {
                        // dx = dy W^T, chunks of rows in parallel.
                        let wv = weight_view(layout, inputs, outputs);
                        let w_t = View { offset: 0, rs: wv.cs, cs: wv.rs };
                        let task = rows_per_task(rows);
                        // SAFETY: not accumulating, each product writes all of its chunk
                        // (whole rows) and reads none of it.
                        dx = unsafe {
                            filled(rows * inputs, task * inputs, |chunk, dxs| {
                                let r = dxs.len() / inputs;
                                let dy = View { offset: chunk * task * outputs, rs: outputs, cs: 1 };
                                mm_uninit(dxs, View { offset: 0, rs: inputs, cs: 1 }, gs, dy, ws, w_t, r, inputs, outputs, 1.0, false);
                            })
                        };
                        // dW = x^T dy over all rows at once: one product whose depth is
                        // the rows (see `mm_parallel` for why that is thread-count free).
                        // (Blocks of dW's rows, one gemm each, in parallel, trained the ViT
                        // about 5% faster in one build, within what a rebuild alone moves
                        // it here, and gemm sums some shapes, 1088 x 256 x 64 among them,
                        // in another order then.)
                        let x_t = View { offset: 0, rs: 1, cs: inputs };
                        let dy = View { offset: 0, rs: outputs, cs: 1 };
                        mm_parallel(&mut dw, View { offset: 0, rs: outputs, cs: 1 }, xs, x_t, gs, dy, inputs, outputs, rows, 1.0, false);
                        // db: each column's sum over the rows in order, columns in parallel.
                        db.par_chunks_mut(COLUMNS_PER_TASK).enumerate().for_each(|(block, sums)| {
                            let first = block * COLUMNS_PER_TASK;
                            for row in gs.chunks(outputs) {
                                for (s, g) in sums.iter_mut().zip(&row[first..]) {
                                    *s += g;
                                }
                            }
                        });
                    })
                })
            });
        }
        if dx.len() != rows * inputs {
            // An empty product (no outputs): the input gradient is zero.
            dx = vec![0.0; rows * inputs];
        }
        if layout == Layout::OutIn {
            let mut t = vec![0f32; dw.len()];
            for i in 0..inputs {
                for o in 0..outputs {
                    t[o * inputs + i] = dw[i * outputs + o];
                }
            }
            dw = t;
        }
        let w_shape = if layout == Layout::InOut { [inputs, outputs] } else { [outputs, inputs] };
        [B::from_f32(dx, &[rows, inputs], &x), B::from_f32(dw, &w_shape, &w), B::from_f32(db, &[outputs], &w)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::ParamId;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    /// Values and the three gradients equal burn's matmul + bias through autodiff, in
    /// both layouts, with and without bias, rows not a multiple of the chunk; and the
    /// CPU kernels give the same bits with 1 and 3 threads.
    #[test]
    fn matches_burns_ops_in_both_layouts_and_any_thread_count() {
        let d = Default::default();
        Flex::seed(&d, 5);
        let (rows, inputs, outputs) = (300, 7, 5);
        let xd = Tensor::<Flex, 2>::random([rows, inputs], Distribution::Normal(0.0, 1.0), &d).into_data();
        let gd = Tensor::<Flex, 2>::random([rows, outputs], Distribution::Normal(0.0, 1.0), &d).into_data();
        let bd = Tensor::<Flex, 1>::random([outputs], Distribution::Normal(0.0, 1.0), &d).into_data();
        for layout in [Layout::InOut, Layout::OutIn] {
            let shape = if layout == Layout::InOut { [inputs, outputs] } else { [outputs, inputs] };
            let wd = Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &d).into_data();
            for with_bias in [true, false] {
                let run = |fused: bool| {
                    let x = Tensor::<AD, 2>::from_data(xd.clone(), &d).require_grad();
                    let w = Param::initialized(ParamId::new(), Tensor::<AD, 2>::from_data(wd.clone(), &d).require_grad());
                    let b = Param::initialized(ParamId::new(), Tensor::<AD, 1>::from_data(bd.clone(), &d).require_grad());
                    let bias = with_bias.then_some(&b);
                    let y = if fused {
                        linear(x.clone(), &w, bias, layout)
                    } else {
                        let prim = reference::forward::<AD>(x.clone().into_primitive().tensor(), w.val().into_primitive().tensor(), bias.map(|b| b.val().into_primitive().tensor()), layout);
                        Tensor::from_primitive(TensorPrimitive::Float(prim))
                    };
                    let g = (y.clone() * Tensor::<AD, 2>::from_data(gd.clone(), &d)).sum().backward();
                    let mut out = vec![y.inner().into_data().to_vec::<f32>().unwrap(), x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap(), w.val().grad(&g).unwrap().into_data().to_vec::<f32>().unwrap()];
                    if with_bias {
                        out.push(b.val().grad(&g).unwrap().into_data().to_vec::<f32>().unwrap());
                    }
                    out
                };
                for (a, b) in run(true).iter().zip(run(false)) {
                    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
                    assert!(worst < 1e-4, "{layout:?} bias {with_bias}: max difference {worst}");
                }
            }
            let prim = |data: &burn::tensor::TensorData| Tensor::<Flex, 2>::from_data(data.clone(), &d).into_primitive().tensor();
            let bits = |threads: usize| {
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                    let y = cpu::forward::<Flex>(prim(&xd), prim(&wd), Some(Tensor::<Flex, 1>::from_data(bd.clone(), &d).into_primitive().tensor()), layout);
                    let grads = cpu::backward::<Flex>(prim(&xd), prim(&wd), layout, prim(&gd));
                    std::iter::once(y).chain(grads).map(|t| Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(t)).into_data().to_vec::<f32>().unwrap()).collect::<Vec<_>>()
                })
            };
            assert_eq!(bits(1), bits(3));
        }
    }
}
