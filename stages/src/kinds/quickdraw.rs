//! The `quickdraw` kind: builds the noisy long-tailed benchmark from the committed
//! Quick, Draw! drawings (`data/quickdraw/`). Recipe in `crate::data::benchmark`.

use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind};

use crate::artifact;
use crate::data::benchmark::{self, BenchmarkConfig};
use crate::data::describe;
use crate::data::quickdraw::Drawings;
use crate::types::{GROUND_TRUTH, IMAGE_SET, LABELLED_SET, ORACLE_SET};

pub struct QuickDraw;

/// Classes in the committed data (`data/quickdraw/classes.txt`): `classes` must leave at
/// least one of them for open-set noise.
pub const SOURCE_CLASSES: usize = 345;
/// Drawings per class in the committed data: the per-class counts must fit in them.
pub const DRAWINGS_PER_CLASS: usize = 100;

fn config(p: &Params) -> Result<BenchmarkConfig, StageError> {
    Ok(BenchmarkConfig {
        // Negative seeds are fine: only the bits matter.
        seed: p.int("seed")? as u64,
        classes: p.usize("classes")?,
        val_per_class: p.usize("val_per_class")?,
        testa_per_class: p.usize("testa_per_class")?,
        testb_per_class: p.usize("testb_per_class")?,
        train_max: p.usize("train_max")?,
        imbalance: p.float("imbalance")?,
        noise: p.float("noise")?,
        near_share: p.float("near_share")?,
        open_set: p.float("open_set")?,
    })
}

impl StageKind for QuickDraw {
    fn name(&self) -> &'static str {
        "quickdraw"
    }

    fn version(&self) -> u32 {
        // 2: the `oracle` output. The other outputs are the same bytes as version 1's, so
        //    only this stage re-runs; everything downstream keeps its key (early cutoff).
        //    Without the bump, a version-1 entry (no `oracle`) would be reused.
        // 3: sets as rows over one image store of every split (set format 2).
        3
    }

    fn summary(&self) -> &'static str {
        "Builds the Quick, Draw! benchmark: long-tailed noisy training set, clean validation set, balanced unlabelled test sets A and B, hidden ground truth, and the oracle set (true labels) for the ceiling"
    }

    fn params(&self) -> Vec<ParamSpec> {
        let d = BenchmarkConfig::default();
        vec![
            ParamSpec::required("root", ParamType::Path, "folder with quickdraw.png and classes.txt (the committed data/quickdraw)"),
            ParamSpec::required("seed", ParamType::Int, "seed of every random choice (vocabulary, splits, tail order, noise)"),
            ParamSpec::optional("classes", ParamType::Int, d.classes as i64, "in-vocabulary classes; the other source classes supply open-set noise"),
            ParamSpec::optional("val_per_class", ParamType::Int, d.val_per_class as i64, "clean validation images per class"),
            ParamSpec::optional("testa_per_class", ParamType::Int, d.testa_per_class as i64, "test A images per class (balanced, unlabelled)"),
            ParamSpec::optional("testb_per_class", ParamType::Int, d.testb_per_class as i64, "test B images per class (balanced, unlabelled)"),
            ParamSpec::optional("train_max", ParamType::Int, d.train_max as i64, "training images of the head class (each class's pool)"),
            ParamSpec::optional(
                "imbalance",
                ParamType::Float,
                d.imbalance,
                "head/tail ratio rho: the class at rank r keeps round(train_max * rho^(-r/(classes-1)))",
            ),
            ParamSpec::optional("noise", ParamType::Float, d.noise, "fraction of in-vocabulary training labels replaced"),
            ParamSpec::optional(
                "near_share",
                ParamType::Float,
                d.near_share,
                "share of replaced labels set to the class with the nearest mean image (the rest: uniform)",
            ),
            ParamSpec::optional("open_set", ParamType::Float, d.open_set, "fraction of the training set that is open-set images with random labels"),
        ]
    }

    fn inputs(&self) -> Vec<PortSpec> {
        Vec::new()
    }

    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("train", LABELLED_SET, "training set with noisy labels"),
            PortSpec::one("val", LABELLED_SET, "clean validation set"),
            PortSpec::one("testa", IMAGE_SET, "test A, balanced, unlabelled"),
            PortSpec::one("testb", IMAGE_SET, "test B, balanced, unlabelled"),
            PortSpec::one("truth", GROUND_TRUTH, "true test labels, clean training labels and noise flags: for evaluation only"),
            PortSpec::one("oracle", ORACLE_SET, "the training images with their TRUE labels, open-set images removed: the ceiling, only for `train`'s `oracle` input"),
        ]
    }

    /// Every numeric parameter is range-checked here, at load time, against the
    /// committed data, so a value the data cannot satisfy (or a negative count) is a
    /// located error instead of a failure when the stage runs. A regenerated data folder
    /// with more drawings needs these limits raised.
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        let cfg = match config(params) {
            Ok(cfg) => cfg,
            Err(_) => {
                // Report every field that does not parse (a negative count), not just the first.
                let mut errs = Vec::new();
                for f in ["classes", "val_per_class", "testa_per_class", "testb_per_class", "train_max"] {
                    errs.extend(StageError::field_errors(params.usize(f)));
                }
                errs.extend(StageError::field_errors(params.int("seed")));
                for f in ["imbalance", "noise", "near_share", "open_set"] {
                    errs.extend(StageError::field_errors(params.float(f)));
                }
                return errs;
            }
        };
        let mut errs = cfg.check();
        let mut err = |f: &str, m: String| {
            if !errs.iter().any(|(g, _)| g == f) {
                errs.push((f.to_string(), m));
            }
        };
        if cfg.classes >= SOURCE_CLASSES {
            err("classes", format!("must be at most {} (the data has {SOURCE_CLASSES} classes and at least one must be left for open-set noise), found {}", SOURCE_CLASSES - 1, cfg.classes));
        }
        let counts = [("val_per_class", cfg.val_per_class), ("testa_per_class", cfg.testa_per_class), ("testb_per_class", cfg.testb_per_class), ("train_max", cfg.train_max)];
        for (f, v) in counts {
            if !(1..=DRAWINGS_PER_CLASS).contains(&v) {
                err(f, format!("must be between 1 and {DRAWINGS_PER_CLASS} (drawings per class in the data), found {v}"));
            }
        }
        let needed: usize = counts.iter().map(|(_, v)| (*v).min(DRAWINGS_PER_CLASS + 1)).sum();
        if counts.iter().all(|(_, v)| (1..=DRAWINGS_PER_CLASS).contains(v)) && needed > DRAWINGS_PER_CLASS {
            err("train_max", format!("val_per_class + testa_per_class + testb_per_class + train_max = {needed}, but the data has {DRAWINGS_PER_CLASS} drawings per class"));
        }
        // The tail class keeps round(train_max / imbalance) images: at least one.
        if cfg.imbalance.is_finite() && cfg.imbalance >= 1.0 && (1..=DRAWINGS_PER_CLASS).contains(&cfg.train_max) && (cfg.train_max as f64 / cfg.imbalance).round() < 1.0 {
            err("imbalance", format!("must be at most {} (twice `train_max`, so the tail class keeps an image), found {}", 2 * cfg.train_max, cfg.imbalance));
        }
        // Open-set images come from the classes left out of the vocabulary.
        if errs.is_empty() {
            let n_in: usize = cfg.tail_counts().iter().sum();
            let n_open = (cfg.open_set * n_in as f64 / (1.0 - cfg.open_set)).round();
            let pool = (SOURCE_CLASSES - cfg.classes) * DRAWINGS_PER_CLASS;
            if n_open > pool as f64 {
                errs.push(("open_set".into(), format!("{} needs {n_open} open-set images but the {} classes left out of the vocabulary hold {pool}", cfg.open_set, SOURCE_CLASSES - cfg.classes)));
            }
        }
        errs
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let cfg = config(&ctx.params)?;
        let root = ctx.source("root")?;
        ctx.progress(0, 3, "reading drawings");
        let drawings = Drawings::load(root)?;
        ctx.log(format!("{}: {} classes x {} drawings of {}x{}", root.display(), drawings.classes.len(), drawings.per_class, drawings.side, drawings.side));
        ctx.progress(1, 3, "building benchmark");
        let b = benchmark::build(&drawings, &cfg).map_err(StageError::Failed)?;
        ctx.progress(2, 3, "writing");
        artifact::write_labelled_set(&ctx.output_dir("train")?, &b.train)?;
        artifact::write_labelled_set(&ctx.output_dir("val")?, &b.val)?;
        artifact::write_image_set(&ctx.output_dir("testa")?, &b.testa)?;
        artifact::write_image_set(&ctx.output_dir("testb")?, &b.testb)?;
        artifact::write_ground_truth(&ctx.output_dir("truth")?, &b.truth)?;
        artifact::write_oracle_set(&ctx.output_dir("oracle")?, &b.oracle)?;
        let open = b.truth.train_noise.iter().filter(|n| **n == artifact::Noise::OpenSet).count();
        ctx.log(format!("train {} ({} open-set), val {}, test A {}, test B {}", b.train.images.n(), open, b.val.images.n(), b.testa.n(), b.testb.n()));
        ctx.progress(3, 3, "done");
        Ok(())
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "train" | "val" => describe::labelled_set(dir),
            "oracle" => describe::labelled_set(dir).map(|d| format!("oracle (true labels, open-set images removed; the ceiling only)\n{d}")),
            "testa" | "testb" => describe::image_set(dir),
            "truth" => describe::ground_truth(dir),
            _ => None,
        }
    }
}
