//! The `pseudo_label` kind: the seed's pseudo-labelling step. It turns predictions on an
//! unlabelled set (in the seed: the plain, f = 0, ensemble on test A or test B) into
//! extra training samples for the next round.
//!
//! # Rule
//!
//! Image n of the unlabelled set is kept when its top probability strictly exceeds the
//! threshold, and is labelled by its argmax (ties: the lowest class index):
//!
//! ```text
//! keep(n)  <=>  max_c p_nc > threshold          (seed: 0.45; 0.4 and 0.5 also used;
//!                                               compared in f32, the stored precision)
//! label(n) =    argmax_c p_nc
//! ```
//!
//! The output `train` is the previous training set followed by the kept images, in the
//! unlabelled set's order, each with the id `pseudo:<its id>` so that later stages (and
//! people) can tell pseudo-labels from given labels.
//!
//! Rounds chain: round a2 reads a1's `train`, which already holds test A pseudo-labels.
//! Samples of the previous set whose id is `pseudo:<id>` for an image of *this*
//! unlabelled set are dropped before the new ones are appended, so each round replaces
//! its set's pseudo-labels (as the seed regenerated them from each round's ensemble)
//! instead of piling up a second, possibly contradicting, copy. Pseudo-labels of another
//! set (test A ones while labelling test B) are kept.
//!
//! The optional `truth` input is read only for the report (how many kept labels are
//! right); the training set never sees it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind};
use serde::{Deserialize, Serialize};

use crate::artifact::{self, ImageSet, LabelledSet};
use crate::data::describe;
use crate::ml::predictions::{Predictions, argmax, read_json, write_json};
use crate::types::{GROUND_TRUTH, IMAGE_SET, LABELLED_SET, PREDICTIONS, REPORT};

pub struct PseudoLabel;

pub const REPORT_FILE: &str = "report.json";
/// Prefix of the id of every pseudo-labelled sample.
pub const PSEUDO_PREFIX: &str = "pseudo:";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassCount {
    pub class: String,
    /// Kept pseudo-labels right according to the truth (null without truth).
    pub correct: Option<usize>,
    pub kept: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthCheck {
    /// Accuracy of the argmax over every image, kept or not: what the threshold filters.
    pub argmax_accuracy: f64,
    pub correct: usize,
    /// Accuracy of the argmax over the images left out.
    pub dropped_accuracy: Option<f64>,
    /// correct / kept.
    pub precision: Option<f64>,
    pub split: String,
}

/// `report.json`. Fields in alphabetical order: the JSON keys come out sorted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PseudoReport {
    pub kept: usize,
    pub kept_fraction: f64,
    pub per_class: Vec<ClassCount>,
    /// Samples of the incoming training set.
    pub previous_train: usize,
    /// Earlier pseudo-labels of this image set dropped from the incoming training set.
    pub replaced_previous: usize,
    pub threshold: f64,
    pub total: usize,
    /// Samples of the output training set.
    pub train: usize,
    pub truth: Option<TruthCheck>,
}

/// Indices (in order) of the rows whose top probability exceeds `threshold`, and their argmax.
pub fn select(pred: &Predictions, threshold: f64) -> (Vec<usize>, Vec<u32>) {
    let mut kept = Vec::new();
    let mut labels = Vec::new();
    for i in 0..pred.n() {
        let row = pred.probs_row(i);
        let best = argmax(row);
        // Compared at the stored (f32) precision, so a probability written as 0.45 is not
        // "above 0.45" because 0.45f32 happens to exceed 0.45f64.
        if row.get(best).is_some_and(|&p| p > threshold as f32) {
            kept.push(i);
            labels.push(best as u32);
        }
    }
    (kept, labels)
}

/// The previous set minus its stale pseudo-labels of `images`, then `images[kept]` with
/// `labels`, ids prefixed: rows over the one image store both sets share (no image is
/// copied). Returns the merged set and how many stale samples went; sets over two
/// different stores cannot be merged.
pub fn merge(train: &LabelledSet, images: &ImageSet, kept: &[usize], labels: &[u32]) -> Result<(LabelledSet, usize), String> {
    let stale: HashSet<String> = images.ids.iter().map(|id| format!("{PSEUDO_PREFIX}{id}")).collect();
    let keep_old: Vec<usize> = (0..train.images.n()).filter(|&i| !stale.contains(&train.images.ids[i])).collect();
    let replaced = train.images.n() - keep_old.len();
    let mut out = if replaced == 0 { train.clone() } else { train.select(&keep_old) };
    let mut new = images.select(kept);
    new.ids = new.ids.iter().map(|id| format!("{PSEUDO_PREFIX}{id}")).collect();
    out.images = out.images.concat(&new)?;
    out.labels.extend_from_slice(labels);
    Ok((out, replaced))
}

fn first_difference(a: &[String], b: &[String]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} against {}", a.len(), b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y).map(|k| format!("entry {k} is `{}` against `{}`", a[k], b[k]))
}

impl StageKind for PseudoLabel {
    fn name(&self) -> &'static str {
        "pseudo_label"
    }
    fn version(&self) -> u32 {
        // 2: sets over image stores (the merged set is rows over the shared store).
        2
    }
    /// Cheap (a threshold over predictions, appended to a set): under a cluster executor it runs in the controlling
    /// process rather than waiting in a queue.
    fn local_by_default(&self) -> bool {
        true
    }
    fn summary(&self) -> &'static str {
        "adds the unlabelled images whose top probability exceeds a threshold, labelled by argmax, to the training set"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("threshold", ParamType::Float, 0.45, "keep images whose top probability is strictly above this (seed: 0.45; 0.4, 0.5 also used)"),
            ParamSpec::optional("split", ParamType::Enum(&["testa", "testb"]), "testa", "which test split of `truth` the images are (report only)"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::one("predictions", PREDICTIONS, "predictions on the unlabelled set (seed: the plain ensemble)"),
            PortSpec::one("images", IMAGE_SET, "the unlabelled set the predictions are for (same ids, same order)"),
            PortSpec::one("train", LABELLED_SET, "the previous round's training set"),
            PortSpec::one("truth", GROUND_TRUTH, "hidden test labels: only to report how many pseudo-labels are right").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("train", LABELLED_SET, "previous training set + pseudo-labelled images (ids `pseudo:<id>`)"),
            PortSpec::one("report", REPORT, "report.json: kept / total, per-class counts, precision when truth is connected"),
        ]
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        match params.float("threshold") {
            Ok(t) if !(0.0..=1.0).contains(&t) => vec![("threshold".into(), format!("must be in [0, 1] (a probability threshold), found {t}"))],
            _ => Vec::new(),
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let threshold = ctx.params.float("threshold")?;
        artifact::refuse_oracle(ctx, &[])?;
        let pred = Predictions::read(ctx.input("predictions")?)?;
        let images = artifact::read_image_set(ctx.input("images")?)?;
        let train = artifact::read_labelled_set(ctx.input("train")?)?;

        if let Some(d) = first_difference(&pred.ids, &images.ids) {
            return Err(StageError::Input { name: "images".into(), msg: format!("not the set the predictions are for: ids differ ({d})") });
        }
        if let Some(d) = first_difference(&pred.classes, &train.images.classes) {
            return Err(StageError::Input { name: "predictions".into(), msg: format!("class columns differ from the training set's classes ({d})") });
        }
        if let Some(d) = first_difference(&images.classes, &train.images.classes) {
            return Err(StageError::Input { name: "images".into(), msg: format!("label space differs from the training set's ({d})") });
        }
        let (kept, labels) = select(&pred, threshold);
        let (merged, replaced) = merge(&train, &images, &kept, &labels).map_err(|e| StageError::Input { name: "images".into(), msg: format!("{e}: they cannot share a set") })?;
        merged.check().map_err(|e| StageError::failed(format!("merged training set is inconsistent: {e}")))?;

        let c = pred.num_classes();
        let counts = artifact::class_counts(&labels, c);
        let truth = if ctx.has_input("truth") {
            let gt = artifact::read_ground_truth(ctx.input("truth")?)?;
            if let Some(d) = first_difference(&gt.classes, &pred.classes) {
                return Err(StageError::Input { name: "truth".into(), msg: format!("classes differ from the predictions' ({d})") });
            }
            let split = ctx.params.str("split")?.to_string();
            let truth_labels = if split == "testb" { &gt.testb_labels } else { &gt.testa_labels };
            if truth_labels.len() != pred.n() {
                return Err(StageError::Input { name: "truth".into(), msg: format!("{split} has {} labels for {} predictions (wrong `split`?)", truth_labels.len(), pred.n()) });
            }
            Some((split, truth_labels.clone()))
        } else {
            None
        };
        let mut per_class: Vec<ClassCount> = pred.classes.iter().zip(&counts).map(|(name, &k)| ClassCount { class: name.clone(), correct: None, kept: k }).collect();
        let truth_check = truth.map(|(split, truth_labels)| {
            let mut per_ok = vec![0usize; c];
            for (&i, &l) in kept.iter().zip(&labels) {
                if truth_labels[i] == l {
                    per_ok[l as usize] += 1;
                }
            }
            for (pc, ok) in per_class.iter_mut().zip(&per_ok) {
                pc.correct = Some(*ok);
            }
            let correct: usize = per_ok.iter().sum();
            let top = pred.top1();
            let all_ok = top.iter().zip(&truth_labels).filter(|(p, t)| **p == **t as usize).count();
            let dropped = pred.n() - kept.len();
            let ratio = |a: usize, b: usize| if b == 0 { None } else { Some(a as f64 / b as f64) };
            TruthCheck {
                argmax_accuracy: ratio(all_ok, pred.n()).unwrap_or(0.0),
                correct,
                dropped_accuracy: ratio(all_ok - correct, dropped),
                precision: ratio(correct, kept.len()),
                split,
            }
        });

        let report = PseudoReport {
            kept: kept.len(),
            kept_fraction: if pred.n() == 0 { 0.0 } else { kept.len() as f64 / pred.n() as f64 },
            per_class,
            previous_train: train.images.n(),
            replaced_previous: replaced,
            threshold,
            total: pred.n(),
            train: merged.images.n(),
            truth: truth_check,
        };
        ctx.log(format!(
            "kept {} of {} images (threshold {threshold}); training set {} -> {} (replaced {replaced} earlier pseudo-labels)",
            report.kept, report.total, report.previous_train, report.train
        ));
        if let Some(t) = &report.truth {
            ctx.log(format!(
                "pseudo-label precision {} ({} right), argmax accuracy over all {:.4}",
                t.precision.map(|p| format!("{p:.4}")).unwrap_or_else(|| "-".into()),
                t.correct,
                t.argmax_accuracy
            ));
        }
        artifact::write_labelled_set(&ctx.output_dir("train")?, &merged)?;
        write_json(&ctx.output_dir("report")?.join(REPORT_FILE), &report)
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "train" => describe::labelled_set(dir),
            "report" => {
                let r: PseudoReport = match read_json(&dir.join(REPORT_FILE)) {
                    Ok(r) => r,
                    Err(e) => return Some(format!("unreadable report: {e}")),
                };
                let mut s = String::new();
                let _ = writeln!(s, "pseudo-labels: kept {} of {} images ({:.1}%) above {}", r.kept, r.total, 100.0 * r.kept_fraction, r.threshold);
                let _ = writeln!(s, "training set: {} -> {} samples ({} earlier pseudo-labels of this set replaced)", r.previous_train, r.train, r.replaced_previous);
                if let Some(t) = &r.truth {
                    let pct = |v: Option<f64>| v.map(|x| format!("{:.2}%", 100.0 * x)).unwrap_or_else(|| "-".into());
                    let _ = writeln!(
                        s,
                        "against {}: {} right, precision {}, left-out accuracy {}, argmax accuracy {}",
                        t.split,
                        t.correct,
                        pct(t.precision),
                        pct(t.dropped_accuracy),
                        pct(Some(t.argmax_accuracy))
                    );
                }
                let counts: Vec<usize> = r.per_class.iter().map(|c| c.kept).collect();
                let _ = write!(s, "pseudo-labels per class: {}", describe::histogram(&counts));
                Some(s)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five 1x1 images in one store; `rows` of them under `ids`.
    fn images(ids: &[&str], rows: &[usize]) -> ImageSet {
        let all = ImageSet::from_pixels(1, 1, 1, (0..5u8).collect(), (0..5).map(|i| i.to_string()).collect(), vec!["a".into(), "b".into()]).unwrap();
        let mut s = all.select(rows);
        s.ids = ids.iter().map(|s| s.to_string()).collect();
        s
    }

    #[test]
    fn threshold_is_strict_and_labels_are_argmax() {
        let p = Predictions {
            ids: vec!["u0".into(), "u1".into(), "u2".into()],
            classes: vec!["a".into(), "b".into()],
            probs: vec![0.45, 0.55, 0.9, 0.1, 0.5, 0.5],
            logits: vec![0.0; 6],
        };
        assert_eq!(select(&p, 0.5), (vec![0, 1], vec![1, 0]));
        assert_eq!(select(&p, 0.55), (vec![1], vec![0]));
    }

    #[test]
    fn merge_replaces_stale_pseudo_labels_of_the_same_set() {
        let train = LabelledSet { images: images(&["t0", "pseudo:u1", "pseudo:v0"], &[0, 1, 2]), labels: vec![0, 0, 1] };
        let unlabelled = images(&["u0", "u1"], &[3, 4]);
        let (m, replaced) = merge(&train, &unlabelled, &[1], &[1]).unwrap();
        assert_eq!(replaced, 1);
        assert_eq!(m.images.ids, vec!["t0", "pseudo:v0", "pseudo:u1"]);
        assert_eq!(m.labels, vec![0, 1, 1]);
        let px: Vec<u8> = (0..3).map(|i| m.images.image(i).unwrap().pixels[0]).collect();
        assert_eq!(px, vec![0, 2, 4], "rows over the shared store, no pixel copied");
        m.check().unwrap();
        // Images of another store (another data set) cannot join the set.
        let other = ImageSet::from_pixels(1, 1, 1, vec![9, 8], vec!["x".into(), "y".into()], vec!["a".into(), "b".into()]).unwrap();
        assert!(merge(&train, &other, &[0], &[0]).unwrap_err().contains("different image stores"));
    }
}
