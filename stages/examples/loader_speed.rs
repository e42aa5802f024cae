//! Loader throughput: images/s decoded, random-resized-cropped and flipped to the
//! model's input by `ml::loader` over an exported set (a directory written by
//! `import_folder`), the work a training step waits for. For
//! `benches/data_scale/bench.py`, which runs PyTorch's `DataLoader` on the same files.
//!
//!     cargo run --release -p fgflow-stages --example loader_speed -- SET_DIR SIZE THREADS IMAGES [BATCH]
//!
//! Prints one JSON line: images, seconds, images_per_sec, threads.

use std::path::PathBuf;
use std::time::Instant;

use fgflow_stages::artifact;
use fgflow_stages::ml::augment::AugmentConfig;
use fgflow_stages::ml::loader::{Augmentation, LoaderConfig, run_pass};
use fgflow_stages::store::Target;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: loader_speed SET_DIR SIZE THREADS IMAGES [BATCH]");
        std::process::exit(2);
    }
    let num = |i: usize, what: &str| -> usize {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("{what}: not a number: {}", args[i]);
            std::process::exit(2)
        })
    };
    let dir = PathBuf::from(&args[1]);
    let (size, threads, images) = (num(2, "SIZE"), num(3, "THREADS"), num(4, "IMAGES"));
    let batch = if args.len() > 5 { num(5, "BATCH") } else { 64 };
    let set = match artifact::read_image_set(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    };
    let n = images.min(set.n());
    let order = fgflow_stages::ml::loader::epoch_order(set.n(), 1, 0, 1);
    let batches: Vec<Vec<usize>> = order[..n].chunks(batch.max(1)).map(|c| c.to_vec()).collect();
    // torchvision's RandomResizedCrop(size) + RandomHorizontalFlip(), nothing else.
    let aug = AugmentConfig { shift: 0, flip: 0.5, erase: 0.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.08 };
    let target = Target { height: size, width: size, channels: set.channels() };
    let started = Instant::now();
    let mut seen = 0usize;
    let result = run_pass(&set, &batches, target, Some(Augmentation { config: &aug, salt: 1, seed: 0, epoch: 1 }), LoaderConfig { threads, prefetch: 4 }, |_, b| {
        seen += b.indices.len();
        std::hint::black_box(&b.nchw);
        Ok::<(), ()>(())
    });
    if let Err(e) = result {
        eprintln!("{e:?}");
        std::process::exit(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{{\"images\": {seen}, \"seconds\": {seconds:.3}, \"images_per_sec\": {:.1}, \"threads\": {threads}}}", seen as f64 / seconds);
}
