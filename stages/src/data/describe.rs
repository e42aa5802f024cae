//! The text `fgflow show` prints for data artifacts: counts, the per-class histogram
//! split into head / middle / tail, and (from the ground truth) noise rates.

use std::fmt::Write;
use std::path::Path;

use crate::artifact::{self, Band, Noise};

fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

/// Per-class counts as bands and a coarse bar chart over the ranking.
pub fn histogram(counts: &[usize]) -> String {
    let mut out = String::new();
    if counts.is_empty() {
        return out;
    }
    let order = artifact::rank_by_count(counts);
    let sorted: Vec<usize> = order.iter().map(|&c| counts[c]).collect();
    let total: usize = sorted.iter().sum();
    let (max, min) = (sorted[0], sorted[sorted.len() - 1]);
    let ratio = if min > 0 { format!("{:.1}", max as f64 / min as f64) } else { "inf".into() };
    let _ = writeln!(out, "images per class: max {max}, median {}, min {min} (head/tail ratio {ratio})", sorted[sorted.len() / 2]);
    let bands = artifact::head_middle_tail(counts);
    for band in Band::ALL {
        let members: Vec<usize> = (0..counts.len()).filter(|&c| bands[c] == band).map(|c| counts[c]).collect();
        if members.is_empty() {
            continue;
        }
        let n: usize = members.iter().sum();
        let (hi, lo) = (members.iter().max().copied().unwrap_or(0), members.iter().min().copied().unwrap_or(0));
        let _ = writeln!(out, "  {:<6} {:>4} classes {:>7} images ({:>5.1}%), {lo}..{hi} per class", band.name(), members.len(), n, pct(n, total));
    }
    if max == min {
        // Balanced: the bars would say nothing the line above does not.
        return out;
    }
    // Ten bars over the ranking: the shape of the tail at a glance.
    let bins = sorted.len().min(10);
    let _ = writeln!(out, "by rank (mean images per class):");
    for b in 0..bins {
        let (lo, hi) = (b * sorted.len() / bins, (b + 1) * sorted.len() / bins);
        let mean = sorted[lo..hi].iter().sum::<usize>() as f64 / (hi - lo) as f64;
        let bar = if max == 0 { 0 } else { (40.0 * mean / max as f64).round() as usize };
        let _ = writeln!(out, "  ranks {:>5}-{:<5} {:<40} {mean:.1}", lo, hi - 1, "#".repeat(bar));
    }
    out
}

fn shape(s: &artifact::ImageSet) -> String {
    let dims = match s.native_size() {
        Some((h, w)) => format!("{h}x{w}x{}", s.channels()),
        None => format!("files of any size, decoded to {} channel(s)", s.channels()),
    };
    let mib = s.store.bytes_total() as f64 / (1 << 20) as f64;
    format!("{} images {dims}, {} classes; rows over an image store of {} images ({mib:.1} MiB, shared with the sets made from it)", s.n(), s.classes.len(), s.store.len())
}

/// A labelled set (training or validation).
pub fn labelled_set(dir: &Path) -> Option<String> {
    let s = artifact::read_labelled_set(dir).ok()?;
    let counts = artifact::class_counts(&s.labels, s.n_classes());
    Some(format!("{} (histogram of the labels as given)\n{}", shape(&s.images), histogram(&counts)))
}

/// An unlabelled image set (a test set).
pub fn image_set(dir: &Path) -> Option<String> {
    let s = artifact::read_image_set(dir).ok()?;
    Some(format!("{}, unlabelled\n", shape(&s)))
}

/// The ground truth: test balance, noise rates, the clean long tail.
pub fn ground_truth(dir: &Path) -> Option<String> {
    let t = artifact::read_ground_truth(dir).ok()?;
    let c = t.classes.len();
    let mut out = String::new();
    let _ = writeln!(out, "ground truth: {c} classes (+{} open-set source classes)", t.open_set_classes.len());
    for (name, labels) in [("test A", &t.testa_labels), ("test B", &t.testb_labels)] {
        let counts = artifact::class_counts(labels, c);
        let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        let _ = writeln!(out, "{name}: {} images, {lo}..{hi} per class", labels.len());
    }
    let n = t.train_noise.len();
    let count = |k: Noise| t.train_noise.iter().filter(|&&x| x == k).count();
    let wrong = n - count(Noise::Clean);
    let _ = writeln!(out, "training: {n} samples, {wrong} ({:.1}%) with a wrong label", pct(wrong, n));
    for k in Noise::ALL {
        let _ = writeln!(out, "  {:<10} {:>7} {:>5.1}%", k.name(), count(k), pct(count(k), n));
    }
    let in_vocab = n - count(Noise::OpenSet);
    let flipped = count(Noise::Uniform) + count(Noise::NearClass);
    let _ = writeln!(out, "label noise among the {in_vocab} in-vocabulary samples: {:.1}%", pct(flipped, in_vocab));
    let clean: Vec<u32> = t.train_clean_labels.iter().flatten().copied().collect();
    let _ = write!(out, "clean training labels: {}", histogram(&artifact::class_counts(&clean, c)));
    Some(out)
}
