//! The Quick, Draw! benchmark: from the committed drawings and a seed, the training
//! set of a webly-supervised problem (long tail, label noise, open-set images), a clean
//! validation set, two balanced unlabelled test sets and the hidden ground truth.
//!
//! Recipe, every number a parameter:
//! 1. A random `classes` of the source classes form the vocabulary (ids in name
//!    order); the rest only supply open-set images.
//! 2. Each class's drawings are shuffled and cut into `val`, `testa`, `testb` and a
//!    training pool of `train_max`.
//! 3. The vocabulary is put in a random rank order; the class at rank r keeps
//!    `round(train_max * imbalance^(-r / (classes - 1)))` of its pool.
//! 4. `round(noise * N)` of those N samples get a wrong label: a `near_share` part the
//!    class whose mean drawing is nearest (fixed per class, the systematic confusion
//!    of web search), the rest a uniformly drawn other class.
//! 5. Open-set drawings with uniform in-vocabulary labels are added until they are the
//!    `open_set` fraction of the training set.
//! 6. Every set is shuffled; ids are opaque (`train/00042`), provenance goes to the
//!    ground truth only, so no stage can read the answer off an id or the order.
//! 7. The oracle set: the training set's in-vocabulary images (same ids, same order)
//!    with their true labels, open-set images removed. Derived after everything else,
//!    so it draws nothing and the other sets are the same bytes with or without it.

use crate::artifact::{GroundTruth, ImageSet, LabelledSet, Noise};
use crate::data::quickdraw::Drawings;
use crate::data::rng::{DetRng, Stream};

#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkConfig {
    pub seed: u64,
    /// In-vocabulary classes; the other source classes are open-set noise.
    pub classes: usize,
    pub val_per_class: usize,
    pub testa_per_class: usize,
    pub testb_per_class: usize,
    /// Training pool per class = images kept by the head class.
    pub train_max: usize,
    /// Head-to-tail ratio of training images (rho).
    pub imbalance: f64,
    /// Fraction of in-vocabulary training labels replaced.
    pub noise: f64,
    /// Share of those replacements that go to the near class (the rest: uniform).
    pub near_share: f64,
    /// Fraction of the final training set that is open-set images.
    pub open_set: f64,
}

impl Default for BenchmarkConfig {
    fn default() -> Self {
        BenchmarkConfig {
            seed: 0,
            classes: 300,
            val_per_class: 10,
            testa_per_class: 15,
            testb_per_class: 15,
            train_max: 60,
            imbalance: 10.0,
            noise: 0.2,
            near_share: 0.5,
            open_set: 0.1,
        }
    }
}

impl BenchmarkConfig {
    /// Checks that need no data: `(field, message)` pairs, as `StageKind::validate` wants.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut errs = Vec::new();
        let mut err = |f: &str, m: String| errs.push((f.to_string(), m));
        if self.classes < 2 {
            err("classes", format!("must be at least 2 (uniform noise needs another class), found {}", self.classes));
        }
        if !(self.imbalance >= 1.0 && self.imbalance.is_finite()) {
            err("imbalance", format!("must be a finite number >= 1, found {}", self.imbalance));
        }
        for (f, v) in [("noise", self.noise), ("near_share", self.near_share)] {
            if !(0.0..=1.0).contains(&v) {
                err(f, format!("must be in [0, 1], found {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.open_set) {
            err("open_set", format!("must be in [0, 1), found {}", self.open_set));
        }
        errs
    }

    fn per_class_needed(&self) -> usize {
        self.val_per_class + self.testa_per_class + self.testb_per_class + self.train_max
    }

    /// Clean training images of the class at each tail rank.
    pub fn tail_counts(&self) -> Vec<usize> {
        long_tail_counts(self.train_max, self.classes, self.imbalance)
    }
}

/// `round(max * rho^(-r / (classes - 1)))` for r = 0..classes: `max` at the head,
/// `max / rho` at the tail.
pub fn long_tail_counts(max: usize, classes: usize, rho: f64) -> Vec<usize> {
    let span = classes.saturating_sub(1).max(1) as f64;
    (0..classes).map(|r| (max as f64 * rho.powf(-(r as f64) / span)).round() as usize).collect()
}

#[derive(Debug)]
pub struct Benchmark {
    pub train: LabelledSet,
    pub val: LabelledSet,
    pub testa: ImageSet,
    pub testb: ImageSet,
    pub truth: GroundTruth,
    /// The training images with their true labels, open-set images removed (the ceiling).
    pub oracle: LabelledSet,
}

/// One drawing on its way into a set.
#[derive(Clone, Copy)]
struct Sample {
    source: usize,
    k: usize,
    label: u32,
    clean: Option<u32>,
    noise: Noise,
}

/// For each vocabulary class, the other vocabulary class whose mean drawing is nearest
/// (Euclidean). Every class has the same number of drawings, so comparing pixel *sums*
/// ranks like comparing means, in exact integers: no float ties, no platform drift.
/// Ties go to the lower id.
pub fn near_classes(d: &Drawings, vocab: &[usize]) -> Vec<u32> {
    let len = d.side * d.side;
    let sums: Vec<Vec<i64>> = vocab
        .iter()
        .map(|&s| {
            let mut acc = vec![0i64; len];
            for k in 0..d.per_class {
                for (a, &p) in acc.iter_mut().zip(d.drawing(s, k)) {
                    *a += i64::from(p);
                }
            }
            acc
        })
        .collect();
    (0..vocab.len())
        .map(|c| {
            let mut best = (i64::MAX, 0u32);
            for (o, other) in sums.iter().enumerate() {
                if o == c {
                    continue;
                }
                let dist: i64 = sums[c].iter().zip(other).map(|(a, b)| (a - b) * (a - b)).sum();
                if dist < best.0 {
                    best = (dist, o as u32);
                }
            }
            best.1
        })
        .collect()
}

/// Builds the benchmark. Errors (as text) when the data cannot satisfy the config.
pub fn build(d: &Drawings, cfg: &BenchmarkConfig) -> Result<Benchmark, String> {
    if let Some((field, msg)) = cfg.check().into_iter().next() {
        return Err(format!("`{field}` {msg}"));
    }
    let n_source = d.classes.len();
    if cfg.classes >= n_source {
        return Err(format!("`classes` = {} leaves no open-set classes: the data has {n_source} classes", cfg.classes));
    }
    if cfg.per_class_needed() > d.per_class {
        return Err(format!(
            "val_per_class + testa_per_class + testb_per_class + train_max = {} but the data has {} drawings per class",
            cfg.per_class_needed(),
            d.per_class
        ));
    }
    let c = cfg.classes;

    // 1. Vocabulary.
    let mut pick = DetRng::new(cfg.seed, Stream::Vocabulary).permutation(n_source);
    let (vocab, open) = pick.split_at_mut(c);
    vocab.sort_unstable();
    open.sort_unstable();
    let (vocab, open) = (vocab.to_vec(), open.to_vec());

    // 2. Per-class cuts, drawn for every source class in source order so that the
    // split of a class does not depend on which other classes are in the vocabulary.
    let mut splits = DetRng::new(cfg.seed, Stream::Splits);
    let perms: Vec<Vec<usize>> = (0..n_source).map(|_| splits.permutation(d.per_class)).collect();
    let (v, ta, tb) = (cfg.val_per_class, cfg.testa_per_class, cfg.testb_per_class);
    let clean = |id: usize, source: usize, k: usize| Sample { source, k, label: id as u32, clean: Some(id as u32), noise: Noise::Clean };
    let mut val = Vec::new();
    let mut testa = Vec::new();
    let mut testb = Vec::new();
    let mut pools = Vec::with_capacity(c);
    for (id, &s) in vocab.iter().enumerate() {
        let p = &perms[s];
        val.extend(p[..v].iter().map(|&k| clean(id, s, k)));
        testa.extend(p[v..v + ta].iter().map(|&k| clean(id, s, k)));
        testb.extend(p[v + ta..v + ta + tb].iter().map(|&k| clean(id, s, k)));
        pools.push(&p[v + ta + tb..v + ta + tb + cfg.train_max]);
    }

    // 3. Long tail.
    let rank_of = DetRng::new(cfg.seed, Stream::TailRanks).permutation(c);
    let counts = cfg.tail_counts();
    let mut train: Vec<Sample> = Vec::new();
    for (id, pool) in pools.iter().enumerate() {
        let s = vocab[id];
        train.extend(pool[..counts[rank_of[id]]].iter().map(|&k| clean(id, s, k)));
    }

    // 4. Label noise among the in-vocabulary samples.
    let near = near_classes(d, &vocab);
    let n_in = train.len();
    let n_noisy = (cfg.noise * n_in as f64).round() as usize;
    let n_near = (cfg.near_share * n_noisy as f64).round() as usize;
    let mut rng = DetRng::new(cfg.seed, Stream::LabelNoise);
    let victims = rng.permutation(n_in);
    for (j, &i) in victims[..n_noisy].iter().enumerate() {
        let truth = train[i].label;
        if j < n_near {
            train[i].label = near[truth as usize];
            train[i].noise = Noise::NearClass;
        } else {
            let other = rng.below(c - 1) as u32;
            train[i].label = if other >= truth { other + 1 } else { other };
            train[i].noise = Noise::Uniform;
        }
    }

    // 5. Open-set images: n_open / (n_in + n_open) = open_set.
    let n_open = (cfg.open_set * n_in as f64 / (1.0 - cfg.open_set)).round() as usize;
    let mut open_pool: Vec<(usize, usize)> = open.iter().flat_map(|&s| (0..d.per_class).map(move |k| (s, k))).collect();
    if n_open > open_pool.len() {
        return Err(format!("`open_set` = {} needs {n_open} open-set images but the {} open-set classes hold {}", cfg.open_set, open.len(), open_pool.len()));
    }
    let mut rng = DetRng::new(cfg.seed, Stream::OpenSet);
    rng.shuffle(&mut open_pool);
    for &(source, k) in &open_pool[..n_open] {
        train.push(Sample { source, k, label: rng.below(c) as u32, clean: None, noise: Noise::OpenSet });
    }

    // 6. Order and assembly.
    for (set, stream) in [(&mut train, Stream::OrderTrain), (&mut val, Stream::OrderVal), (&mut testa, Stream::OrderTestA), (&mut testb, Stream::OrderTestB)] {
        DetRng::new(cfg.seed, stream).shuffle(set);
    }
    let classes: Vec<String> = vocab.iter().map(|&s| d.classes[s].clone()).collect();
    let source = |s: &Sample| format!("quickdraw/{}/{}", d.classes[s.source], s.k);
    // One image store for every split (so pseudo-labelled test images can join the
    // training set as rows); each split is its range of rows, ids `<split>/<index>`.
    let splits: [(&str, &[Sample]); 4] = [("train", &train), ("val", &val), ("testa", &testa), ("testb", &testb)];
    let total: usize = splits.iter().map(|(_, s)| s.len()).sum();
    let mut pixels = Vec::with_capacity(total * d.side * d.side);
    let mut ids = Vec::with_capacity(total);
    for (name, samples) in splits {
        let width = samples.len().saturating_sub(1).to_string().len().max(5);
        for (i, s) in samples.iter().enumerate() {
            pixels.extend_from_slice(d.drawing(s.source, s.k));
            ids.push(format!("{name}/{i:0width$}"));
        }
    }
    let all = ImageSet::from_pixels(d.side, d.side, 1, pixels, ids, classes.clone())?;
    let mut start = 0;
    let mut ranges = Vec::with_capacity(4);
    for (_, samples) in splits {
        ranges.push((start..start + samples.len()).collect::<Vec<usize>>());
        start += samples.len();
    }
    let images = |split: usize| all.select(&ranges[split]);
    let labels = |samples: &[Sample]| samples.iter().map(|s| s.label).collect::<Vec<_>>();
    let truth = GroundTruth {
        classes: classes.clone(),
        testa_labels: labels(&testa),
        testb_labels: labels(&testb),
        train_clean_labels: train.iter().map(|s| s.clean).collect(),
        train_noise: train.iter().map(|s| s.noise).collect(),
        near_class: near,
        open_set_classes: open.iter().map(|&s| d.classes[s].clone()).collect(),
        train_sources: train.iter().map(source).collect(),
        val_sources: val.iter().map(source).collect(),
        testa_sources: testa.iter().map(source).collect(),
        testb_sources: testb.iter().map(source).collect(),
    };
    let train = LabelledSet { images: images(0), labels: labels(&train) };
    let oracle = oracle_set(&train, &truth.train_clean_labels);
    Ok(Benchmark { train, val: LabelledSet { images: images(1), labels: labels(&val) }, testa: images(2), testb: images(3), truth, oracle })
}

/// Step 7: the samples of `train` that have a true label, relabelled with it, in order.
/// `clean_labels` is aligned with `train` (`None`: an open-set image).
pub fn oracle_set(train: &LabelledSet, clean_labels: &[Option<u32>]) -> LabelledSet {
    let keep: Vec<usize> = clean_labels.iter().enumerate().filter_map(|(i, l)| l.map(|_| i)).collect();
    let mut oracle = train.select(&keep);
    oracle.labels = keep.iter().filter_map(|&i| clean_labels[i]).collect();
    oracle
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 6 classes of 8 distinct 2x2 drawings; class 1 is a near copy of class 0.
    fn toy() -> Drawings {
        let mut pixels = Vec::new();
        for c in 0..6u8 {
            for k in 0..8u8 {
                let base = if c == 1 { 0 } else { c * 40 };
                pixels.extend_from_slice(&[base, base + k, base + 1, base + c]);
            }
        }
        Drawings { classes: (0..6).map(|c| format!("c{c}")).collect(), side: 2, per_class: 8, pixels }
    }

    fn cfg() -> BenchmarkConfig {
        BenchmarkConfig {
            seed: 3,
            classes: 4,
            val_per_class: 1,
            testa_per_class: 2,
            testb_per_class: 1,
            train_max: 4,
            imbalance: 4.0,
            noise: 0.5,
            near_share: 0.5,
            open_set: 0.2,
        }
    }

    #[test]
    fn tail_goes_from_max_to_max_over_rho() {
        let t = long_tail_counts(60, 300, 10.0);
        assert_eq!((t[0], t[299]), (60, 6));
        assert!(t.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(long_tail_counts(5, 1, 10.0), vec![5]);
    }

    #[test]
    fn toy_benchmark_has_the_asked_shape() {
        let b = build(&toy(), &cfg()).unwrap();
        assert_eq!(b.val.images.n(), 4);
        assert_eq!((b.testa.n(), b.testb.n()), (8, 4));
        let n_in: usize = long_tail_counts(4, 4, 4.0).iter().sum();
        let wrong = b.truth.train_noise.iter().filter(|n| matches!(n, Noise::Uniform | Noise::NearClass)).count();
        assert_eq!(wrong, (0.5 * n_in as f64).round() as usize);
        for (i, n) in b.truth.train_noise.iter().enumerate() {
            match n {
                Noise::Clean => assert_eq!(Some(b.train.labels[i]), b.truth.train_clean_labels[i]),
                Noise::Uniform => assert_ne!(Some(b.train.labels[i]), b.truth.train_clean_labels[i]),
                Noise::NearClass => {
                    let t = b.truth.train_clean_labels[i].unwrap();
                    assert_eq!(b.train.labels[i], b.truth.near_class[t as usize]);
                }
                Noise::OpenSet => assert!(b.truth.train_clean_labels[i].is_none()),
            }
        }
        b.truth.check().unwrap();
    }

    #[test]
    fn oracle_set_is_the_training_set_with_true_labels_and_no_open_set_image() {
        let b = build(&toy(), &cfg()).unwrap();
        let kept: Vec<usize> = (0..b.train.images.n()).filter(|&i| b.truth.train_noise[i] != Noise::OpenSet).collect();
        assert!(kept.len() < b.train.images.n(), "the toy config has open-set images");
        assert_eq!(b.oracle.images.n(), kept.len());
        for (j, &i) in kept.iter().enumerate() {
            assert_eq!(b.oracle.images.ids[j], b.train.images.ids[i]);
            assert_eq!(b.oracle.images.image(j), b.train.images.image(i));
            assert_eq!(Some(b.oracle.labels[j]), b.truth.train_clean_labels[i]);
        }
        assert_ne!(b.oracle.labels, kept.iter().map(|&i| b.train.labels[i]).collect::<Vec<_>>(), "some labels were noisy");
        b.oracle.check().unwrap();
    }

    #[test]
    fn too_few_drawings_is_an_error() {
        let mut c = cfg();
        c.train_max = 5;
        assert!(build(&toy(), &c).unwrap_err().contains("drawings per class"));
        c.train_max = 4;
        c.classes = 6;
        assert!(build(&toy(), &c).unwrap_err().contains("no open-set classes"));
    }

    #[test]
    fn near_class_is_the_nearest_mean() {
        let d = toy();
        let near = near_classes(&d, &[0, 1, 2, 5]);
        assert_eq!(near[0], 1);
        assert_eq!(near[1], 0);
    }
}
