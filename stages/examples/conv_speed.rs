//! Forward+backward time of one 3x3 convolution layer, burn's `Conv2d` vs an
//! im2col + matmul formulation built from tensor ops, on flex.
use burn::backend::{Autodiff, Flex};
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Distribution, Tensor};
use burn::tensor::ops::PadMode;
use std::time::Instant;

type AD = Autodiff<Flex>;

fn im2col_nhwc(x: Tensor<AD, 4>, w: Tensor<AD, 2>) -> Tensor<AD, 4> {
    // x: [N, H, W, C]; w: [9C, O]
    let [n, h, wd, c] = x.dims();
    let xp = x.pad([(0, 0), (1, 1), (1, 1), (0, 0)], PadMode::Constant(0.0));
    let mut parts = Vec::new();
    for dy in 0..3 {
        for dx in 0..3 {
            parts.push(xp.clone().slice([0..n, dy..dy + h, dx..dx + wd, 0..c]));
        }
    }
    let cols = Tensor::cat(parts, 3).reshape([n * h * wd, 9 * c]);
    let o = w.dims()[1];
    cols.matmul(w).reshape([n, h, wd, o])
}

fn main() {
    let d = Default::default();
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, c, o, hw) = (args.first().copied().unwrap_or(64), args.get(1).copied().unwrap_or(32), args.get(2).copied().unwrap_or(32), args.get(3).copied().unwrap_or(28));
    let conv = Conv2dConfig::new([c, o], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).with_bias(false).init::<AD>(&d);
    let xdata = Tensor::<Flex, 4>::random([n, c, hw, hw], Distribution::Normal(0.0, 1.0), &d).into_data();
    let flops = 2.0 * (n * hw * hw * c * 9 * o) as f64 * 3.0;
    for rep in 0..5 {
        let x = Tensor::<AD, 4>::from_data(xdata.clone(), &d).require_grad();
        let t = Instant::now();
        let y = conv.forward(x.clone());
        let _ = y.clone().into_data();
        let tf = t.elapsed().as_secs_f64();
        let g = y.sum().backward();
        let gx = x.grad(&g).unwrap();
        let _ = gx.into_data();
        let tt = t.elapsed().as_secs_f64();
        println!("burn conv2d rep {rep}: fwd {:.1} ms, fwd+bwd {:.1} ms, {:.1} GFLOP/s", tf * 1e3, tt * 1e3, flops / tt / 1e9);
    }
    {
        use burn::tensor::module::{conv2d, conv_transpose2d};
        use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
        let x = Tensor::<Flex, 4>::from_data(xdata.clone(), &d);
        let w = Tensor::<Flex, 4>::random([o, c, 3, 3], Distribution::Normal(0.0, 0.1), &d);
        let gy = Tensor::<Flex, 4>::random([n, o, hw, hw], Distribution::Normal(0.0, 0.1), &d);
        for rep in 0..3 {
            let t = Instant::now();
            let _ = conv2d(x.clone(), w.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).into_data();
            let a = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let _ = conv_transpose2d(gy.clone(), w.clone(), None, ConvTransposeOptions::new([1, 1], [1, 1], [0, 0], [1, 1], 1)).into_data();
            let b = t.elapsed().as_secs_f64();
            let t = Instant::now();
            // dx as a forward conv with the kernel transposed and flipped.
            let wf = w.clone().swap_dims(0, 1).flip([2, 3]);
            let _ = conv2d(gy.clone(), wf, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).into_data();
            let b2 = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let _ = conv2d(x.clone().swap_dims(0, 1), gy.clone().swap_dims(0, 1), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).into_data();
            let cw = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let xp = x.clone().pad([(0, 0), (0, 0), (1, 1), (1, 1)], PadMode::Constant(0.0));
            let cols = xp.unfold::<5, _>(2, 3, 1).unfold::<6, _>(3, 3, 1); // [N, C, H, W, 3, 3]
            let cols = cols.permute([0, 2, 3, 1, 4, 5]).reshape([n * hw * hw, c * 9]);
            let g2 = gy.clone().permute([1, 0, 2, 3]).reshape([o, n * hw * hw]);
            let _ = g2.matmul(cols).into_data();
            let cw2 = t.elapsed().as_secs_f64();
            println!("dW via unfold+matmul {:.1} ms", cw2 * 1e3);
            println!("ops rep {rep}: conv2d {:.1} ms, conv_transpose2d (dx) {:.1} ms, dx as conv2d {:.1} ms, weight-grad conv {:.1} ms", a * 1e3, b * 1e3, b2 * 1e3, cw * 1e3);
        }
    }
    let wt = Tensor::<AD, 2>::random([9 * c, o], Distribution::Normal(0.0, 0.1), &d).require_grad();
    let xn = Tensor::<Flex, 4>::from_data(xdata.clone(), &d).permute([0, 2, 3, 1]).into_data();
    for rep in 0..5 {
        let x = Tensor::<AD, 4>::from_data(xn.clone(), &d).require_grad();
        let t = Instant::now();
        let y = im2col_nhwc(x.clone(), wt.clone());
        let _ = y.clone().into_data();
        let tf = t.elapsed().as_secs_f64();
        let g = y.sum().backward();
        let gx = x.grad(&g).unwrap();
        let _ = gx.into_data();
        let _ = wt.grad(&g).unwrap().into_data();
        let tt = t.elapsed().as_secs_f64();
        println!("im2col nhwc rep {rep}: fwd {:.1} ms, fwd+bwd {:.1} ms, {:.1} GFLOP/s", tf * 1e3, tt * 1e3, flops / tt / 1e9);
    }
    let a = Tensor::<Flex, 2>::random([n * hw * hw, 9 * c], Distribution::Normal(0.0, 1.0), &d);
    let b = Tensor::<Flex, 2>::random([9 * c, o], Distribution::Normal(0.0, 1.0), &d);
    for rep in 0..3 {
        let t = Instant::now();
        let _ = a.clone().matmul(b.clone()).into_data();
        let tt = t.elapsed().as_secs_f64();
        println!("plain matmul rep {rep}: {:.1} ms, {:.1} GFLOP/s", tt * 1e3, flops / 3.0 / tt / 1e9);
    }
}
