//! Training throughput of one model on one backend, for `benches/train_speed/bench.py`
//! (which alternates it with the same model in PyTorch). Batch 64, 28x28x1 images, 345
//! classes (QuickDraw's), the real training loop (augmentation, AdamW, loss read back
//! every step). Prints one JSON line: images/s of every epoch after the first (the first
//! pays for first-touch allocations) and the process's peak resident memory.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p fgflow-stages --example train_speed -- cnn flex 640 3
//! ```

use burn::backend::{Autodiff, Flex, NdArray};
use fgflow_stages::ml::conv::TrainBackend;
use fgflow_stages::ml::augment::AugmentConfig;
use fgflow_stages::ml::cnn::CnnConfig;
use fgflow_stages::ml::data::Images;
use fgflow_stages::ml::head::HeadConfig;
use fgflow_stages::ml::loss::LossConfig;
use fgflow_stages::ml::model::{BackboneConfig, Classifier, MODEL_FORMAT, ModelConfig};
use fgflow_stages::ml::train_loop::{EpochLog, Labelled, TrainConfig, TrainObserver, train};
use fgflow_stages::ml::vit::{VitConfig, VitPool};

struct Rates(Vec<f64>);
impl<B: burn::tensor::backend::Backend> TrainObserver<B> for Rates {
    fn epoch(&mut self, log: &EpochLog, _: &Classifier<B>) -> Result<(), fgflow_engine::StageError> {
        self.0.push(log.images_per_sec);
        Ok(())
    }
}

/// The two benchmark models; `benches/train_speed/torch_train.py` builds the same ones.
fn config(model: &str) -> Option<ModelConfig> {
    let backbone = match model {
        "cnn" => BackboneConfig::Cnn(CnnConfig { widths: vec![32, 64, 128], blocks: 2 }),
        "vit" => BackboneConfig::Vit(VitConfig { patch: 4, dim: 128, depth: 4, heads: 4, mlp_ratio: 2.0, pool: VitPool::Mean }),
        _ => return None,
    };
    Some(ModelConfig {
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
    })
}

fn rates<B: TrainBackend>(config: &ModelConfig, pixels: &[u8], labels: &[u32], epochs: usize) -> Vec<f64> {
    let device = B::Device::default();
    let model = config.init::<B>(0, &device);
    let tc = TrainConfig {
        epochs,
        batch_size: 64,
        lr: 1e-3,
        min_lr: 1e-5,
        weight_decay: 0.05,
        layer_decay: 1.0,
        warmup_epochs: 0.0,
        seed: 0,
        label_smoothing: 0.0,
        margin_x: 0.45,
        margin_y: 0.05,
        augment: AugmentConfig { shift: 2, flip: 0.5, erase: 0.25, randaugment_n: 0, randaugment_m: 0 },
    };
    let data = Labelled { images: Images::new(labels.len(), 28, 28, 1, pixels).expect("sizes match"), labels };
    let mut r = Rates(Vec::new());
    train::<B>(&device, model, config, &tc, data, None, &mut r).expect("training runs");
    r.0
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("cnn");
    let backend = args.get(1).map(String::as_str).unwrap_or("flex");
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(640);
    let epochs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3).max(2);
    let Some(cfg) = config(model) else {
        eprintln!("unknown model {model:?} (cnn, vit)");
        std::process::exit(2);
    };
    // Sparse strokes, like drawings; the same bytes as torch_train.py's generator.
    let mut s = 7u64;
    let pixels: Vec<u8> = (0..n * 784)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (s >> 60) < 3 { 255 } else { 0 }
        })
        .collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 345).collect();
    let all = match backend {
        "flex" => rates::<Autodiff<Flex>>(&cfg, &pixels, &labels, epochs),
        "ndarray" => rates::<Autodiff<NdArray>>(&cfg, &pixels, &labels, epochs),
        _ => {
            eprintln!("unknown backend {backend:?} (flex, ndarray)");
            std::process::exit(2);
        }
    };
    let params = burn::module::Module::num_params(&cfg.init::<Flex>(0, &Default::default()));
    let rates: Vec<String> = all[1..].iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "{{\"impl\": \"burn-{backend}\", \"model\": \"{model}\", \"params\": {params}, \"images_per_sec\": [{}], \"peak_rss_mib\": {:.1}}}",
        rates.join(", "),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}
