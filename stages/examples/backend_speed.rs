//! Training throughput of the default CNN and ViT on the CPU backends, to choose the
//! default one. Batch 64, 28x28x1 images, 345 classes (QuickDraw's), the real training
//! loop (augmentation included). Runs alternate between backends so drift in machine
//! load hits both; the median of each is reported.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p fgflow-stages --example backend_speed -- [runs] [images]
//! ```

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use fgflow_stages::ml::augment::AugmentConfig;
use fgflow_stages::ml::cnn::CnnConfig;
use fgflow_stages::ml::data::Images;
use fgflow_stages::ml::head::HeadConfig;
use fgflow_stages::ml::loss::LossConfig;
use fgflow_stages::ml::model::{BackboneConfig, Classifier, MODEL_FORMAT, ModelConfig};
use fgflow_stages::ml::train_loop::{EpochLog, Labelled, TrainConfig, TrainObserver, train};
use fgflow_stages::ml::vit::VitConfig;

struct Rate(f64);
impl<B: burn::tensor::backend::Backend> TrainObserver<B> for Rate {
    fn epoch(&mut self, log: &EpochLog, _: &Classifier<B>) -> Result<(), fgflow_engine::StageError> {
        self.0 = log.images_per_sec;
        Ok(())
    }
}

fn config(backbone: BackboneConfig) -> ModelConfig {
    ModelConfig {
        format: MODEL_FORMAT,
        backbone,
        head: HeadConfig::Linear,
        logit_adjust: None,
        loss: LossConfig::Ce,
        classes: (0..345).map(|i| format!("c{i}")).collect(),
        height: 28,
        width: 28,
        channels: 1,
        class_counts: vec![1; 345],
        epoch: 0,
    }
}

fn rate<B: AutodiffBackend>(config: &ModelConfig, pixels: &[u8], labels: &[u32]) -> f64 {
    let device = B::Device::default();
    let model = config.init::<B>(0, &device);
    let tc = TrainConfig {
        epochs: 1,
        batch_size: 64,
        lr: 1e-3,
        min_lr: 1e-5,
        weight_decay: 0.05,
        warmup_epochs: 0.0,
        seed: 0,
        label_smoothing: 0.0,
        margin_x: 0.45,
        margin_y: 0.05,
        augment: AugmentConfig { shift: 2, flip: 0.5, erase: 0.25 },
    };
    let data = Labelled { images: Images::new(labels.len(), 28, 28, 1, pixels).unwrap(), labels };
    let mut r = Rate(0.0);
    train::<B>(&device, model, config, &tc, data, None, &mut r).unwrap();
    r.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let runs = args.first().copied().unwrap_or(5);
    let n = args.get(1).copied().unwrap_or(640);
    let mut s = 7u64;
    let pixels: Vec<u8> = (0..n * 784)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (s >> 60) < 3 { 255 } else { 0 } // sparse strokes, like drawings
        })
        .collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 345).collect();
    let models = [
        ("cnn [32,64,128]x2", config(BackboneConfig::Cnn(CnnConfig { widths: vec![32, 64, 128], blocks: 2 }))),
        ("vit p4 d128 L4 h4", config(BackboneConfig::Vit(VitConfig { patch: 4, dim: 128, depth: 4, heads: 4, mlp_ratio: 2.0 }))),
    ];
    println!("threads: RAYON_NUM_THREADS={}", std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()));
    for (name, cfg) in &models {
        let params = burn::module::Module::num_params(&cfg.init::<Flex>(0, &Default::default()));
        // One unmeasured run each: first-touch allocations, lazy initialisation.
        rate::<Autodiff<Flex>>(cfg, &pixels[..128 * 784], &labels[..128]);
        rate::<Autodiff<NdArray>>(cfg, &pixels[..128 * 784], &labels[..128]);
        let (mut flex, mut nd) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            flex.push(rate::<Autodiff<Flex>>(cfg, &pixels, &labels));
            nd.push(rate::<Autodiff<NdArray>>(cfg, &pixels, &labels));
        }
        println!(
            "{name} ({params} params): flex median {:.0} img/s {:?}; ndarray median {:.0} img/s {:?}",
            median(flex.clone()),
            flex.iter().map(|v| v.round()).collect::<Vec<_>>(),
            median(nd.clone()),
            nd.iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
}
