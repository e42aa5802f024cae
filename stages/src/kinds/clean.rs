//! The `clean` kind: drops training samples whose label the models do not support
//! (step 3 of the seed, "use trained weights to drop training samples", whose criterion
//! was never published).
//!
//! # Criterion: out-of-fold predictions
//!
//! A model that trained on a noisy sample has memorised its label, so it cannot judge
//! it. The set is split into `folds` folds, stratified by the given label (each class's
//! samples shuffled from `seed` and dealt round-robin, with the dealing offset carried
//! from class to class so fold sizes differ by at most one). For each fold a model is
//! trained on the other folds, with exactly the `train` kind's code and parameters, and
//! predicts the held-out fold (no flip TTA; the model's own post-hoc logit adjustment,
//! as `predict` applies by default, so tail classes are not judged by a head-biased
//! prior). Every sample is thus judged by a model that never saw it. A sample is
//! dropped when
//!
//! - its given label's probability is below `min_label_prob` (the label is not
//!   supported: uniform and open-set noise), or
//! - the top class is another class with probability above `max_other_prob` (the
//!   model is confident it is something else: near-class noise).
//!
//! The ground truth, when connected, is read only for the report: the kept set never
//! depends on it.
//!
//! # Outputs
//!
//! `train`: the kept samples, in their original order. `report`: `clean.json` (counts
//! per reason, each fold's agreement with the given labels, and with `truth` the
//! precision and recall of dropping against the hidden noise flags, per noise type),
//! `clean.txt`, and `oof/` (the out-of-fold predictions, a PREDICTIONS layout).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::ml::kernels::TrainBackend;
use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, ProgressSink, Resources, RunContext, StageError, StageKind, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::artifact::{self, LabelledSet, Noise};
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::checkpoint;
use crate::ml::head::log_prior;
use crate::ml::model::AdjustMode;
use crate::ml::predictions::{Predictions, argmax, write_json};
use crate::ml::train_loop::{post_hoc_adjust, predict_logits};
use crate::types;

use super::train::Train;

pub struct Clean;

pub const REPORT_JSON: &str = "clean.json";
pub const REPORT_TXT: &str = "clean.txt";
pub const OOF_DIR: &str = "oof";

/// Parameters of `clean` that are its own; every other parameter is `train`'s.
const OWN: &[&str] = &["folds", "min_label_prob", "max_other_prob"];
/// `train` parameters that make no sense here (the fold models are thrown away).
const NOT_FORWARDED: &[&str] = &["keep_checkpoints"];

/// The parameters of one fold's `train` run: every `train` parameter present in
/// `params`, and no checkpoints.
pub(crate) fn train_params(params: &Params) -> Params {
    let mut p = Params::default();
    for spec in Train.params() {
        if NOT_FORWARDED.contains(&spec.name) {
            continue;
        }
        if let Some(v) = params.get(spec.name) {
            p.0.insert(spec.name.to_string(), v.clone());
        }
    }
    p.0.insert("keep_checkpoints".into(), Value::Int(0));
    p
}

struct Settings {
    folds: usize,
    min_label_prob: f64,
    max_other_prob: f64,
    seed: u64,
}

fn settings(p: &Params) -> Result<Settings, StageError> {
    let param = |name: &str, msg: String| StageError::Param { name: name.into(), msg };
    let folds = p.int("folds")?;
    if folds < 2 {
        return Err(param("folds", format!("must be at least 2 (a model must never judge the samples it trained on), found {folds}")));
    }
    let prob = |name: &str| -> Result<f64, StageError> {
        let v = p.float(name)?;
        if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(param(name, format!("must be a probability in [0, 1], found {v}"))) }
    };
    Ok(Settings { folds: folds as usize, min_label_prob: prob("min_label_prob")?, max_other_prob: prob("max_other_prob")?, seed: p.int("seed")? as u64 })
}

/// The fold (0..folds) of every sample, stratified by label and fixed by `seed`: each
/// class's samples are shuffled and dealt round-robin, the dealing continuing from
/// where the previous class stopped, so every fold gets a share of every class with at
/// least `folds` samples and fold sizes differ by at most one.
pub fn stratified_folds(labels: &[u32], folds: usize, seed: u64) -> Vec<usize> {
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    // A stream of its own: the fold split must not move when training's randomness does.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0xc1ea_f01d);
    let mut fold_of = vec![0usize; labels.len()];
    let mut next = 0usize;
    for members in by_class.values_mut() {
        // Fisher-Yates on raw words (Lemire's bounded draw), independent of how `rand`
        // implements shuffles, so the split is stable across `rand` releases.
        for i in (1..members.len()).rev() {
            let j = below(&mut rng, i + 1);
            members.swap(i, j);
        }
        for &i in members.iter() {
            fold_of[i] = next % folds.max(1);
            next += 1;
        }
    }
    fold_of
}

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as usize;
        }
    }
}

/// Why a sample is dropped (both may hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    pub low_label_prob: bool,
    pub confident_other: bool,
}

impl Verdict {
    pub fn dropped(self) -> bool {
        self.low_label_prob || self.confident_other
    }
}

/// Judge one sample from its out-of-fold probability row and given label.
pub fn judge(probs: &[f32], label: u32, min_label_prob: f64, max_other_prob: f64) -> Verdict {
    let top = argmax(probs);
    let p_label = probs.get(label as usize).copied().unwrap_or(0.0) as f64;
    Verdict { low_label_prob: p_label < min_label_prob, confident_other: top != label as usize && probs[top] as f64 > max_other_prob }
}

/// Dropping scored against one noise type. Fields in alphabetical order (sorted keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeScore {
    /// Samples of this type that were dropped.
    pub dropped: usize,
    /// Samples of this type.
    pub n: usize,
    pub noise: String,
    /// dropped / (all dropped samples): this type's share of the drops, i.e. the
    /// precision of dropping if only this type counted as noise (null: nothing dropped).
    pub precision: Option<f64>,
    /// dropped / n: the share of this type that was caught (for `clean`, the share of
    /// good samples wrongly dropped) (null: no sample of this type).
    pub recall: Option<f64>,
}

/// Dropping scored against the hidden noise flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseScores {
    pub by_type: Vec<TypeScore>,
    /// Noisy samples (any type but clean) that were dropped.
    pub dropped_noisy: usize,
    pub noisy: usize,
    /// dropped_noisy / dropped (null when nothing was dropped).
    pub precision: Option<f64>,
    /// dropped_noisy / noisy (null when nothing was noisy).
    pub recall: Option<f64>,
}

fn ratio(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Precision and recall of `dropped` against `noise` (aligned by sample), overall
/// (every type but clean counts as noise) and per type.
pub fn noise_scores(dropped: &[bool], noise: &[Noise]) -> NoiseScores {
    let total_dropped = dropped.iter().filter(|&&d| d).count();
    let by_type: Vec<TypeScore> = Noise::ALL
        .iter()
        .map(|&t| {
            let n = noise.iter().filter(|&&x| x == t).count();
            let d = noise.iter().zip(dropped).filter(|&(&x, &d)| x == t && d).count();
            TypeScore { dropped: d, n, noise: t.name().into(), precision: ratio(d, total_dropped), recall: ratio(d, n) }
        })
        .collect();
    let noisy = noise.iter().filter(|&&x| x != Noise::Clean).count();
    let dropped_noisy = noise.iter().zip(dropped).filter(|&(&x, &d)| x != Noise::Clean && d).count();
    NoiseScores { by_type, dropped_noisy, noisy, precision: ratio(dropped_noisy, total_dropped), recall: ratio(dropped_noisy, noisy) }
}

/// `clean.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CleanReport {
    pub dropped: usize,
    /// Dropped for both reasons (also counted in each reason's count).
    pub dropped_both: usize,
    pub dropped_confident_other: usize,
    pub dropped_low_label_prob: usize,
    /// Per fold: share of its held-out samples whose top class is the given label.
    pub fold_agreement: Vec<f64>,
    pub folds: usize,
    pub kept: usize,
    pub max_other_prob: f64,
    pub min_label_prob: f64,
    pub n: usize,
    /// Only when `truth` was connected.
    pub noise: Option<NoiseScores>,
}

/// Forwards a fold's training progress to the stage's bar, naming the fold.
struct FoldProgress<'a, 'c> {
    ctx: &'a RunContext<'c>,
    fold: usize,
    folds: usize,
}

impl ProgressSink for FoldProgress<'_, '_> {
    fn progress(&self, _stage: &str, done: u64, total: u64, message: &str) {
        self.ctx.progress(done, total, &format!("fold {}/{}: {message}", self.fold + 1, self.folds));
    }
}

impl StageKind for Clean {
    fn name(&self) -> &'static str {
        "clean"
    }
    fn version(&self) -> u32 {
        // 2: empty classes no longer get a ln(1e-12) logit adjustment.
        // 3: training as `train` v3 (conv weight gradient, own norms and attention).
        // 4: training as `train` v5 (the loader); sets over image stores.
        // 5: training as `train` v6 (the CPU kernels).
        // 6: training as `train` v7 (vectorised GELU and softmax).
        // 7: training as `train` v8 (Swin-V2's window attention).
        7
    }
    fn summary(&self) -> &'static str {
        "drop training samples whose label out-of-fold models do not support (k-fold train + predict)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut v = vec![
            ParamSpec::optional("folds", ParamType::Int, 3, "folds of the out-of-fold split (stratified by given label; `seed` fixes it)"),
            ParamSpec::optional("min_label_prob", ParamType::Float, 0.1, "drop a sample whose given label has out-of-fold probability below this"),
            ParamSpec::optional("max_other_prob", ParamType::Float, 0.7, "drop a sample whose top out-of-fold class is another one with probability above this"),
        ];
        // Every fold model is trained as `train` would train it, so its parameters are
        // taken over unchanged (and follow that kind when it grows new ones).
        v.extend(Train.params().into_iter().filter(|s| !NOT_FORWARDED.contains(&s.name) && !OWN.contains(&s.name)));
        v
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::one("train", types::LABELLED_SET, "the (noisy) training set to clean"),
            PortSpec::one("truth", types::GROUND_TRUTH, "hidden noise flags, for the report only (never changes what is kept)").optional(),
            PortSpec::one("init", types::MODEL, "model every fold model fine-tunes from (as train's `init`)").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("train", types::LABELLED_SET, "the kept samples, in their original order"),
            PortSpec::one("report", types::REPORT, "clean.json / clean.txt: drops per reason, precision/recall against the noise flags; oof/: out-of-fold predictions"),
        ]
    }
    fn resources(&self, _params: &Params) -> Resources {
        Resources::Heavy
    }
    fn backend_sensitive(&self) -> bool {
        true
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        let mut errs = StageError::field_errors(settings(params));
        errs.extend(Train.validate(&train_params(params)));
        errs
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "report" => std::fs::read_to_string(dir.join(REPORT_TXT)).ok(),
            "train" => crate::data::describe::labelled_set(dir),
            _ => None,
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = settings(&ctx.params)?;
        artifact::refuse_oracle(ctx, &[])?;
        let train_dir = ctx.input("train")?;
        let train = artifact::read_labelled_set(train_dir)?;
        let truth = if ctx.has_input("truth") { Some(artifact::read_ground_truth(ctx.input("truth")?)?) } else { None };
        if let Some(t) = &truth
            && t.train_noise.len() != train.images.n()
        {
            return Err(StageError::Input {
                name: "truth".into(),
                msg: format!("{} noise flags for {} training samples: connect the ground truth of this very training set", t.train_noise.len(), train.images.n()),
            });
        }
        let n = train.images.n();
        if n < s.folds * 2 {
            return Err(StageError::Input { name: "train".into(), msg: format!("{n} samples are too few for {} folds", s.folds) });
        }
        let fold_of = stratified_folds(&train.labels, s.folds, s.seed);
        let small = artifact::class_counts(&train.labels, train.n_classes()).iter().filter(|&&c| c > 0 && c < s.folds).count();
        if small > 0 {
            ctx.log(format!("note: {small} classes have fewer samples than folds; some fold models never see them, so their samples tend to be dropped"));
        }
        let fold_params = train_params(&ctx.params);
        let c = train.n_classes();
        let mut logits = vec![0f32; n * c];
        let mut fold_agreement = Vec::with_capacity(s.folds);
        for fold in 0..s.folds {
            let held: Vec<usize> = (0..n).filter(|&i| fold_of[i] == fold).collect();
            let rest: Vec<usize> = (0..n).filter(|&i| fold_of[i] != fold).collect();
            ctx.log(format!("fold {}/{}: training on {} samples, judging {}", fold + 1, s.folds, rest.len(), held.len()));
            let root = ctx.scratch_dir().join(format!("fold-{fold}"));
            let set_dir = root.join("train");
            std::fs::create_dir_all(&set_dir).map_err(|e| StageError::io(format!("creating {}", set_dir.display()), e))?;
            artifact::write_labelled_set(&set_dir, &train.select(&rest))?;
            let mut inputs = BTreeMap::new();
            inputs.insert("train".to_string(), vec![set_dir.clone()]);
            if ctx.has_input("init") {
                inputs.insert("init".to_string(), vec![ctx.input("init")?.to_path_buf()]);
            }
            let progress = FoldProgress { ctx, fold, folds: s.folds };
            let fold_ctx = RunContext::new(
                format!("{}/fold-{fold}", ctx.stage),
                fold_params.clone(),
                ctx.backend.clone(),
                inputs,
                // The fold models start from the same weights file as the stage says.
                BTreeMap::from([("pretrained".to_string(), ctx.sources("pretrained").to_vec())]),
                root.join("out"),
                root.join("scratch"),
                &progress,
            );
            let result = Train.run(&fold_ctx);
            for line in fold_ctx.take_log().lines() {
                ctx.log(format!("  fold {}: {line}", fold + 1));
            }
            result.map_err(|e| StageError::failed(format!("training the model of fold {}: {e}", fold + 1)))?;
            let model_dir = root.join("out").join("model");
            let held_set = train.select(&held);
            let batch = ctx.params.usize("batch_size")?.max(1);
            let fold_logits = dispatch(&ctx.backend, PredictFold { model_dir, set: &held_set, batch })?;
            let agree = fold_logits.chunks(c).zip(&held_set.labels).filter(|(row, y)| argmax(row) == **y as usize).count();
            fold_agreement.push(agree as f64 / held.len().max(1) as f64);
            for (k, &i) in held.iter().enumerate() {
                logits[i * c..(i + 1) * c].copy_from_slice(&fold_logits[k * c..(k + 1) * c]);
            }
            // The fold's model and set are not needed any more; free the disk early.
            let _ = std::fs::remove_dir_all(&root);
        }
        let oof = Predictions::from_logits(train.images.ids.clone(), train.images.classes.clone(), logits);
        let verdicts: Vec<Verdict> = (0..n).map(|i| judge(oof.probs_row(i), train.labels[i], s.min_label_prob, s.max_other_prob)).collect();
        let kept: Vec<usize> = (0..n).filter(|&i| !verdicts[i].dropped()).collect();
        if kept.is_empty() {
            return Err(StageError::failed("every sample would be dropped: the fold models learnt nothing (train longer) or the thresholds are too strict"));
        }
        let dropped: Vec<bool> = verdicts.iter().map(|v| v.dropped()).collect();
        let report = CleanReport {
            dropped: n - kept.len(),
            dropped_both: verdicts.iter().filter(|v| v.low_label_prob && v.confident_other).count(),
            dropped_confident_other: verdicts.iter().filter(|v| v.confident_other).count(),
            dropped_low_label_prob: verdicts.iter().filter(|v| v.low_label_prob).count(),
            fold_agreement,
            folds: s.folds,
            kept: kept.len(),
            max_other_prob: s.max_other_prob,
            min_label_prob: s.min_label_prob,
            n,
            noise: truth.as_ref().map(|t| noise_scores(&dropped, &t.train_noise)),
        };
        artifact::write_labelled_set(&ctx.output_dir("train")?, &train.select(&kept))?;
        let out = ctx.output_dir("report")?;
        write_json(&out.join(REPORT_JSON), &report)?;
        oof.write(&out.join(OOF_DIR))?;
        let text = report_text(&report);
        ctx.log(text.trim_end());
        std::fs::write(out.join(REPORT_TXT), text).map_err(|e| StageError::io(format!("writing {REPORT_TXT}"), e))
    }
}

pub fn report_text(r: &CleanReport) -> String {
    let pct = |v: Option<f64>| v.map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "clean: kept {} of {} ({} dropped: {} label prob < {}, {} another class > {}, {} both); {} folds, agreement with given labels {}",
        r.kept,
        r.n,
        r.dropped,
        r.dropped_low_label_prob,
        r.min_label_prob,
        r.dropped_confident_other,
        r.max_other_prob,
        r.dropped_both,
        r.folds,
        r.fold_agreement.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>().join(" / ")
    );
    if let Some(ns) = &r.noise {
        let _ = writeln!(s, "against the noise flags: precision {} recall {} ({} of {} noisy samples dropped)", pct(ns.precision), pct(ns.recall), ns.dropped_noisy, ns.noisy);
        let _ = writeln!(s, "  {:<11} {:>6} {:>8} {:>14} {:>16}", "noise", "n", "dropped", "caught (rec.)", "share of drops");
        for t in &ns.by_type {
            let _ = writeln!(s, "  {:<11} {:>6} {:>8} {:>14} {:>16}", t.noise, t.n, t.dropped, pct(t.recall), pct(t.precision));
        }
    }
    s
}

/// Logits of one fold's model over its held-out samples, with the model's own post-hoc
/// adjustment (what `predict` does by default), no flip.
struct PredictFold<'a> {
    model_dir: PathBuf,
    set: &'a LabelledSet,
    batch: usize,
}

impl BackendJob for PredictFold<'_> {
    type Output = Vec<f32>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Vec<f32>, StageError> {
        let (model, config) = checkpoint::load_model::<B::InnerBackend>(&self.model_dir, &device)?;
        let mut logits = predict_logits(&model, config.input(), &self.set.images, self.batch, false)?;
        if let Some(la) = config.logit_adjust
            && la.mode == AdjustMode::PostHoc
        {
            post_hoc_adjust(&mut logits, &log_prior(&config.class_counts, la.tau));
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified_balanced_and_deterministic() {
        // 3 classes of 7, 5 and 1 samples.
        let labels: Vec<u32> = [0u32; 7].into_iter().chain([1; 5]).chain([2; 1]).collect();
        let a = stratified_folds(&labels, 3, 11);
        assert_eq!(a, stratified_folds(&labels, 3, 11));
        assert_ne!(a, stratified_folds(&labels, 3, 12), "another seed, another split");
        let size = |f: usize| a.iter().filter(|&&x| x == f).count();
        let sizes = [size(0), size(1), size(2)];
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        for class in 0..2u32 {
            for f in 0..3 {
                let k = labels.iter().zip(&a).filter(|&(&l, &x)| l == class && x == f).count();
                assert!(k >= 1, "class {class} missing from fold {f}: {a:?}");
            }
        }
    }

    #[test]
    fn judge_applies_both_thresholds() {
        // Label prob 0.05 < 0.1: low; top is class 1 at 0.9 > 0.7: confident other.
        assert_eq!(judge(&[0.05, 0.9, 0.05], 0, 0.1, 0.7), Verdict { low_label_prob: true, confident_other: true });
        // Label prob 0.25 is supported enough, but class 1 at 0.75 is confident.
        assert_eq!(judge(&[0.25, 0.75, 0.0], 0, 0.1, 0.7), Verdict { low_label_prob: false, confident_other: true });
        // Spread out: label 0.05 is low, no class is confident.
        assert_eq!(judge(&[0.05, 0.5, 0.45], 0, 0.1, 0.7), Verdict { low_label_prob: true, confident_other: false });
        // The label is the top class: kept whatever its confidence.
        assert!(!judge(&[0.95, 0.05, 0.0], 0, 0.1, 0.7).dropped());
        assert!(!judge(&[0.4, 0.3, 0.3], 0, 0.1, 0.7).dropped());
    }

    #[test]
    fn noise_scores_count_by_hand() {
        use Noise::*;
        // 10 samples: 5 clean (1 dropped), 2 uniform (2 dropped), 2 near-class (1 dropped), 1 open-set (0 dropped).
        let noise = [Clean, Clean, Clean, Clean, Clean, Uniform, Uniform, NearClass, NearClass, OpenSet];
        let dropped = [true, false, false, false, false, true, true, false, true, false];
        let s = noise_scores(&dropped, &noise);
        // 4 dropped, 3 of them noisy; 5 noisy in all.
        assert_eq!((s.dropped_noisy, s.noisy), (3, 5));
        assert_eq!(s.precision, Some(0.75));
        assert_eq!(s.recall, Some(0.6));
        let get = |name: &str| s.by_type.iter().find(|t| t.noise == name).unwrap().clone();
        let (c, u, nc, o) = (get("clean"), get("uniform"), get("near_class"), get("open_set"));
        assert_eq!((c.n, c.dropped, c.recall, c.precision), (5, 1, Some(0.2), Some(0.25)));
        assert_eq!((u.n, u.dropped, u.recall, u.precision), (2, 2, Some(1.0), Some(0.5)));
        assert_eq!((nc.n, nc.dropped, nc.recall, nc.precision), (2, 1, Some(0.5), Some(0.25)));
        assert_eq!((o.n, o.dropped, o.recall, o.precision), (1, 0, Some(0.0), Some(0.0)));
        // Nothing dropped: precision undefined; nothing noisy: recall undefined.
        let s = noise_scores(&[false, false], &[Clean, Clean]);
        assert_eq!((s.precision, s.recall), (None, None));
        assert_eq!(s.by_type[1].recall, None);
    }

    #[test]
    fn params_are_train_params_plus_own() {
        let names: Vec<&str> = Clean.params().iter().map(|s| s.name).collect();
        for own in OWN {
            assert_eq!(names.iter().filter(|n| *n == own).count(), 1, "{own}");
        }
        assert!(names.contains(&"epochs") && names.contains(&"seed") && !names.contains(&"keep_checkpoints"));
        let mut p = Params::default();
        for spec in Clean.params() {
            if let Some(d) = spec.default {
                p.0.insert(spec.name.into(), d);
            }
        }
        assert!(Clean.validate(&p).is_empty(), "{:?}", Clean.validate(&p));
        let bad = p.clone().with("folds", 1).with("epochs", 0);
        let errs = Clean.validate(&bad);
        assert!(errs.iter().any(|(n, _)| n == "folds") && errs.iter().any(|(n, _)| n == "epochs"), "{errs:?}");
        assert_eq!(train_params(&p).get("keep_checkpoints"), Some(&Value::Int(0)));
    }
}
