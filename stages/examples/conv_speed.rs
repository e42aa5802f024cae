//! Forward + backward of one 3x3 convolution layer on flex: burn's `conv2d` against
//! `ml::conv::conv_same` (the same forward, its own weight gradient), and the weight
//! gradient alone both ways. Alternating runs; medians.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p fgflow-stages --example conv_speed -- [n c o hw]
//! ```

use burn::backend::{Autodiff, Flex};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor, TensorPrimitive};
use fgflow_stages::ml::conv::conv_same;
use fgflow_stages::ml::kernels::KernelBackend;
use std::time::Instant;

type AD = Autodiff<Flex>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let d = Default::default();
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, c, o, hw) = (a.first().copied().unwrap_or(64), a.get(1).copied().unwrap_or(32), a.get(2).copied().unwrap_or(32), a.get(3).copied().unwrap_or(28));
    let xd = Tensor::<Flex, 4>::random([n, c, hw, hw], Distribution::Normal(0.0, 1.0), &d).into_data();
    let wd = Tensor::<Flex, 4>::random([o, c, 3, 3], Distribution::Normal(0.0, 0.1), &d).into_data();
    let gd = Tensor::<Flex, 4>::random([n, o, hw, hw], Distribution::Normal(0.0, 1.0), &d).into_data();
    let step = |ours: bool| {
        let x = Tensor::<AD, 4>::from_data(xd.clone(), &d).require_grad();
        let w = Tensor::<AD, 4>::from_data(wd.clone(), &d).require_grad();
        let t = Instant::now();
        let y = if ours { conv_same(x.clone(), w.clone()) } else { burn::tensor::module::conv2d(x.clone(), w.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)) };
        let g = (y * Tensor::<AD, 4>::from_data(gd.clone(), &d)).sum().backward();
        let _ = (x.grad(&g).unwrap().into_data(), w.grad(&g).unwrap().into_data());
        t.elapsed().as_secs_f64() * 1e3
    };
    let prim = |t: &burn::tensor::TensorData| Tensor::<Flex, 4>::from_data(t.clone(), &d).into_primitive().tensor();
    let dw = |ours: bool| {
        let t = Instant::now();
        let r = if ours {
            <Flex as KernelBackend>::conv_same_weight_grad(prim(&xd), prim(&wd), prim(&gd))
        } else {
            <Flex as burn::tensor::ops::ModuleOps<Flex>>::conv2d_weight_backward(prim(&xd), prim(&wd), prim(&gd), ConvOptions::new([1, 1], [1, 1], [1, 1], 1))
        };
        let _ = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(r)).into_data();
        t.elapsed().as_secs_f64() * 1e3
    };
    let (xs, ws) = (xd.to_vec::<f32>().unwrap(), wd.to_vec::<f32>().unwrap());
    let fwd = || {
        let t = Instant::now();
        std::hint::black_box(fgflow_stages::ml::conv::conv_same_f32(&xs, &ws, n, c, hw, hw, o, 3));
        t.elapsed().as_secs_f64() * 1e3
    };
    fwd();
    step(true);
    step(false);
    let (mut ours, mut burns, mut dw_ours, mut dw_burn, mut fw) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..7 {
        fw.push(fwd());
        ours.push(step(true));
        burns.push(step(false));
        dw_ours.push(dw(true));
        dw_burn.push(dw(false));
    }
    println!("[{n}, {c}, {hw}, {hw}] -> {o} channels, 3x3, median of 7:");
    println!("  forward+backward: burn conv2d {:.1} ms, conv_same {:.1} ms", median(burns), median(ours));
    println!("  weight gradient:  burn {:.1} ms, conv_same {:.1} ms", median(dw_burn), median(dw_ours));
    println!("  forward alone (conv_same_f32): {:.2} ms", median(fw));
}
