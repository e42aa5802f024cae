//! Training throughput of one model on one backend, for `benches/train_speed/bench.py`
//! (which alternates it with the same model in PyTorch) and `benches/gpu/run.sh`. Batch
//! 64, 28x28x1 images, 345 classes (QuickDraw's), the real training loop (augmentation,
//! AdamW, loss read back every step). Prints one JSON line: images/s of every epoch after
//! the first (the first pays for first-touch allocations and, on a GPU, kernel
//! compilation) and the process's peak resident memory.
//!
//! With a fifth argument `infer`, it times prediction instead: the seeded model in
//! inference mode (no autodiff), flip TTA (two forward passes, logits averaged, as the
//! `predict` kind does), batch 256, logits read back; one pass over the images per
//! "epoch", the first dropped.
//!
//! `check BACKEND [DATA_DIR]` is the GPU machine's test of a backend, since test binaries
//! do not travel there (see `benches/gpu/run.sh`): the same seeded CNN and ViT must give
//! flex's logits within 1e-3 on real drawings, and a CNN trained on five classes must
//! reach well above chance and about flex's accuracy; exit 1 otherwise.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p fgflow-stages --example train_speed -- cnn flex 640 3
//! RAYON_NUM_THREADS=2 cargo run --release -p fgflow-stages --example train_speed -- cnn flex 2048 3 infer
//! cargo run --release -p fgflow-stages --features wgpu --example train_speed -- check wgpu
//! ```

use burn::backend::{Autodiff, Flex};
use fgflow_engine::StageError;
use fgflow_stages::ml::augment::AugmentConfig;
use fgflow_stages::ml::backend::{BackendJob, dispatch};
use fgflow_stages::ml::cnn::CnnConfig;
use fgflow_stages::ml::kernels::TrainBackend;
use fgflow_stages::ml::data::Images;
use fgflow_stages::store::Target;

const T28: Target = Target { height: 28, width: 28, channels: 1 };
use fgflow_stages::ml::head::HeadConfig;
use fgflow_stages::ml::loss::LossConfig;
use fgflow_stages::ml::model::{BackboneConfig, Classifier, MODEL_FORMAT, ModelConfig};
use fgflow_stages::ml::train_loop::{EpochLog, Labelled, TrainConfig, TrainObserver, accuracy, predict_logits, train};
use fgflow_stages::ml::swinv2::SwinV2Config;
use fgflow_stages::ml::vit::{VitConfig, VitPool};
use std::path::PathBuf;

struct Rates(Vec<f64>);
impl<B: burn::tensor::backend::Backend> TrainObserver<B> for Rates {
    fn epoch(&mut self, log: &EpochLog, _: &Classifier<B>) -> Result<(), StageError> {
        self.0.push(log.images_per_sec);
        Ok(())
    }
}

/// The benchmark models; `benches/train_speed/torch_train.py` builds the same ones.
fn backbone(model: &str) -> Option<BackboneConfig> {
    match model {
        "cnn" => Some(BackboneConfig::Cnn(CnnConfig { widths: vec![32, 64, 128], blocks: 2 })),
        "vit" => Some(BackboneConfig::Vit(VitConfig { patch: 4, dim: 128, depth: 4, heads: 4, mlp_ratio: 2.0, pool: VitPool::Mean })),
        // The `tiny` preset: drawings replicated to RGB and resized to 32 px, patch 2,
        // dim 32, depths [2, 2], heads [2, 4], window 4.
        "swinv2" => SwinV2Config::preset("tiny").map(BackboneConfig::Swinv2),
        _ => None,
    }
}

fn config(backbone: BackboneConfig, classes: usize) -> ModelConfig {
    ModelConfig {
        format: MODEL_FORMAT,
        backbone,
        head: HeadConfig::Linear,
        logit_adjust: None,
        loss: LossConfig::Ce,
        classes: (0..classes).map(|i| format!("c{i}")).collect(),
        height: 28,
        width: 28,
        channels: 1,
        class_counts: vec![1; classes],
        epoch: 0,
    }
}

fn train_config(epochs: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 64,
        lr,
        min_lr: 1e-5,
        weight_decay: 0.05,
        layer_decay: 1.0,
        freeze_epochs: 0,
        warmup_epochs: 0.0,
        seed: 0,
        label_smoothing: 0.0,
        margin_x: 0.45,
        margin_y: 0.05,
        augment: AugmentConfig { shift: 2, flip: 0.5, erase: 0.25, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 },
        max_steps: None,
    }
}

/// Images/s of every epoch of one training run.
struct Speed<'a> {
    config: &'a ModelConfig,
    pixels: &'a [u8],
    labels: &'a [u32],
    epochs: usize,
}

impl BackendJob for Speed<'_> {
    type Output = Vec<f64>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Vec<f64>, StageError> {
        let model = self.config.init::<B>(0, &device);
        let images = Images::new(self.labels.len(), 28, 28, 1, self.pixels).map_err(StageError::failed)?;
        let mut r = Rates(Vec::new());
        train::<B>(&device, model, self.config, &train_config(self.epochs, 1e-3), Labelled { images: &images, labels: self.labels }, None, &mut r)?;
        Ok(r.0)
    }
}

/// Images/s of every prediction pass (flip TTA, batch 256) of a seeded model.
struct InferSpeed<'a> {
    config: &'a ModelConfig,
    pixels: &'a [u8],
    n: usize,
    passes: usize,
}

impl BackendJob for InferSpeed<'_> {
    type Output = Vec<f64>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Vec<f64>, StageError> {
        let model = self.config.init::<B::InnerBackend>(0, &device);
        let images = Images::new(self.n, 28, 28, 1, self.pixels).map_err(StageError::failed)?;
        let mut rates = Vec::new();
        for _ in 0..self.passes {
            let start = std::time::Instant::now();
            let logits = predict_logits(&model, T28, &images, 256, true)?;
            std::hint::black_box(&logits);
            rates.push(self.n as f64 / start.elapsed().as_secs_f64());
        }
        Ok(rates)
    }
}

/// Drawings of the given rows (classes) of `data/quickdraw/quickdraw.png`: the first
/// `train` of each row for training, the next `test` for testing.
struct Drawings {
    train: (Vec<u8>, Vec<u32>),
    test: (Vec<u8>, Vec<u32>),
}

fn drawings(dir: &std::path::Path, rows: &[u32], train: usize, test: usize) -> Result<Drawings, String> {
    let path = dir.join("quickdraw.png");
    let img = image::open(&path).map_err(|e| format!("{}: {e}", path.display()))?.into_luma8();
    let mut d = Drawings { train: (Vec::new(), Vec::new()), test: (Vec::new(), Vec::new()) };
    for (label, &row) in rows.iter().enumerate() {
        for j in 0..train + test {
            let set = if j < train { &mut d.train } else { &mut d.test };
            for y in 0..28u32 {
                for x in 0..28u32 {
                    let p = img.get_pixel_checked(j as u32 * 28 + x, row * 28 + y).ok_or_else(|| format!("{}: smaller than expected", path.display()))?;
                    set.0.push(p.0[0]);
                }
            }
            set.1.push(label as u32);
        }
    }
    Ok(d)
}

/// What `check` measures on one backend: logits of seeded models, and a trained CNN's
/// accuracy.
struct Check<'a> {
    configs: &'a [ModelConfig],
    data: &'a Drawings,
    epochs: usize,
}

struct Checked {
    logits: Vec<Vec<f32>>,
    accuracy: f64,
}

impl BackendJob for Check<'_> {
    type Output = Checked;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Checked, StageError> {
        let (tp, tl) = &self.data.test;
        let test = Images::new(tl.len(), 28, 28, 1, tp).map_err(StageError::failed)?;
        let mut logits = Vec::new();
        for c in self.configs {
            logits.push(predict_logits(&c.init::<B::InnerBackend>(3, &device), T28, &test, 32, true)?);
        }
        let cnn = &self.configs[0];
        let (p, l) = &self.data.train;
        let train_images = Images::new(l.len(), 28, 28, 1, p).map_err(StageError::failed)?;
        let train_set = Labelled { images: &train_images, labels: l };
        // stages/tests/ml.rs's settings for this set (`quick_train_config`).
        let mut tc = train_config(self.epochs, 3e-3);
        tc.batch_size = 32;
        tc.warmup_epochs = 0.5;
        tc.augment.erase = 0.0;
        let trained = train::<B>(&device, cnn.init::<B>(0, &device), cnn, &tc, train_set, None, &mut Rates(Vec::new()))?;
        let accuracy = accuracy(&trained, cnn, Labelled { images: &test, labels: tl }, 64)?;
        Ok(Checked { logits, accuracy })
    }
}

fn check(backend: &str, data_dir: PathBuf) -> Result<String, String> {
    // The first five classes of stages/tests/ml.rs's `TEN`, as its wgpu test uses.
    let data = drawings(&data_dir, &[4, 20, 40, 60, 80], 40, 20)?;
    let cnn = config(BackboneConfig::Cnn(CnnConfig { widths: vec![8, 16], blocks: 1 }), 5);
    let vit = config(BackboneConfig::Vit(VitConfig { patch: 7, dim: 32, depth: 1, heads: 2, mlp_ratio: 2.0, pool: VitPool::Mean }), 5);
    let configs = [cnn, vit];
    let job = |epochs| Check { configs: &configs, data: &data, epochs };
    let reference = dispatch("flex", job(6)).map_err(|e| e.to_string())?;
    let got = dispatch(backend, job(6)).map_err(|e| e.to_string())?;
    let mut report = Vec::new();
    let mut failed = false;
    for ((name, a), b) in ["cnn", "vit"].iter().zip(&reference.logits).zip(&got.logits) {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        failed |= worst >= 1e-3 || a.len() != b.len();
        report.push(format!("{name} logits: max |{backend} - flex| = {worst:.2e} (tolerance 1e-3)"));
    }
    let (acc, flex_acc) = (got.accuracy, reference.accuracy);
    // Kernels sum in other orders, so training drifts apart: same level, not same bits.
    failed |= acc <= 0.35 || (acc - flex_acc).abs() > 0.15;
    report.push(format!("cnn trained 6 epochs on 5 classes: accuracy {acc:.3} on {backend}, {flex_acc:.3} on flex (chance 0.2; need > 0.35 and within 0.15)"));
    let text = report.join("\n");
    if failed { Err(text) } else { Ok(text) }
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    // As the fgflow binary does, so the benchmark measures what `fgflow run` runs.
    fgflow_stages::ml::allocator::keep_freed_buffers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("cnn");
    let backend = args.get(1).map(String::as_str).unwrap_or("flex");
    if model == "check" {
        let dir = args.get(2).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/quickdraw"));
        match check(backend, dir) {
            Ok(report) => println!("{report}\ncheck {backend}: ok"),
            Err(report) => {
                println!("{report}\ncheck {backend}: FAILED");
                std::process::exit(1);
            }
        }
        return;
    }
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(640);
    let epochs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3).max(2);
    let Some(backbone) = backbone(model) else {
        eprintln!("unknown model {model:?} (cnn, vit, swinv2, or `check BACKEND`)");
        std::process::exit(2);
    };
    let cfg = config(backbone, 345);
    // Sparse strokes, like drawings; the same bytes as torch_train.py's generator.
    let mut s = 7u64;
    let pixels: Vec<u8> = (0..n * 784)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (s >> 60) < 3 { 255 } else { 0 }
        })
        .collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 345).collect();
    let infer = args.get(4).map(String::as_str) == Some("infer");
    let run = if infer {
        dispatch(backend, InferSpeed { config: &cfg, pixels: &pixels, n, passes: epochs })
    } else {
        dispatch(backend, Speed { config: &cfg, pixels: &pixels, labels: &labels, epochs })
    };
    let all = match run {
        Ok(all) => all,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let params = burn::module::Module::num_params(&cfg.init::<Autodiff<Flex>>(0, &Default::default()));
    let rates: Vec<String> = all[1..].iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "{{\"impl\": \"burn-{backend}\", \"model\": \"{model}\", \"mode\": \"{}\", \"params\": {params}, \"images_per_sec\": [{}], \"peak_rss_mib\": {:.1}}}",
        if infer { "infer" } else { "train" },
        rates.join(", "),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}
