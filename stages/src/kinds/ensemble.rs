//! The `ensemble` kind: the seed's adaptive ensemble of M models' predictions over one
//! image set.
//!
//! # Formula
//!
//! Model i has validation top-1 accuracy `acc_i` (from its `metrics` artifact) and
//! weight
//!
//! ```text
//! w_i = (acc_i / min_j acc_j)^f          f = 25 in the seed; f = 0: every w_i = 1
//! ```
//!
//! so the weakest model weighs 1. With `average: "probs"` (the seed) the ensemble
//! score of image n, class c is
//!
//! ```text
//! s_nc = sum_i w_i * p_inc / M
//! ```
//!
//! and the artifact stores `probs_nc = s_nc / sum_c' s_nc'` (each row renormalised: the
//! division by M, and by sum_i w_i, do not change the argmax but would leave rows that do
//! not sum to 1, which pseudo-label thresholds read as confidences) and
//! `logits_nc = ln(max(probs_nc, f32::MIN_POSITIVE))`, so that `probs = softmax(logits)`
//! holds as for every predictions artifact.
//!
//! With `average: "logits"` the models' logits are averaged instead:
//! `logits_nc = sum_i w_i * z_inc / sum_i w_i`, `probs = softmax(logits)`. Dividing by
//! `sum_i w_i` rather than M keeps the logits on the members' scale: the argmax is the
//! same as for `/ M`, but the softmax temperature (which thresholds see) does not drift
//! with f.
//!
//! The `weights` output (`weights.json`) lists each model's accuracy, weight and how
//! often its top-1 agrees with the ensemble's.

use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind};
use serde::{Deserialize, Serialize};

use crate::ml::metrics::Metrics;
use crate::ml::predictions::{Predictions, argmax, read_json, softmax_in_place, write_json};
use crate::types::{METRICS, PREDICTIONS, REPORT};

pub struct Ensemble;

pub const WEIGHTS_FILE: &str = "weights.json";

/// One row of `weights.json`. Fields in alphabetical order: the JSON keys come out sorted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelWeight {
    /// Validation top-1 accuracy; null when no metrics were connected (f = 0).
    pub accuracy: Option<f64>,
    /// Share of images whose top-1 equals the ensemble's.
    pub agreement: f64,
    /// Position in the `predictions` list.
    pub index: usize,
    /// What the metrics were computed against (`labels` for a validation set).
    pub metrics_truth: Option<String>,
    pub weight: f64,
}

/// `weights.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsReport {
    pub average: String,
    pub classes: usize,
    pub f: f64,
    pub images: usize,
    pub models: Vec<ModelWeight>,
}

/// `w_i = (acc_i / min_j acc_j)^f`. Every accuracy must be finite and > 0 (the minimum
/// divides). With f = 0 the weights are all 1 whatever the accuracies.
pub fn adaptive_weights(accs: &[f64], f: f64) -> Result<Vec<f64>, String> {
    if let Some((i, a)) = accs.iter().enumerate().find(|(_, a)| !a.is_finite() || **a <= 0.0 || **a > 1.0) {
        return Err(format!("model {i} has validation accuracy {a}; adaptive weights need 0 < acc <= 1"));
    }
    let min = accs.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(accs.iter().map(|a| if f == 0.0 { 1.0 } else { (a / min).powf(f) }).collect())
}

/// Weighted combination of `preds` (already checked to share ids and classes).
pub fn combine(preds: &[Predictions], weights: &[f64], average: &str) -> Predictions {
    let first = &preds[0];
    let (n, c) = (first.n(), first.num_classes());
    let m = preds.len() as f64;
    let wsum: f64 = weights.iter().sum();
    // Accumulate in f64: with 17 models and weights up to ~100, f32 sums lose digits
    // that decide near-tied argmaxes.
    let mut acc = vec![0.0f64; n * c];
    let mut probs = vec![0.0f32; n * c];
    let mut logits = vec![0.0f32; n * c];
    match average {
        "logits" => {
            for (p, &w) in preds.iter().zip(weights) {
                for (a, &z) in acc.iter_mut().zip(&p.logits) {
                    *a += w * z as f64;
                }
            }
            for (row, (lrow, prow)) in acc.chunks(c.max(1)).zip(logits.chunks_mut(c.max(1)).zip(probs.chunks_mut(c.max(1)))) {
                for (j, &s) in row.iter().enumerate() {
                    lrow[j] = (s / wsum) as f32;
                }
                prow.copy_from_slice(lrow);
                softmax_in_place(prow);
            }
        }
        _ => {
            for (p, &w) in preds.iter().zip(weights) {
                for (a, &q) in acc.iter_mut().zip(&p.probs) {
                    *a += w * q as f64 / m;
                }
            }
            for (row, (lrow, prow)) in acc.chunks(c.max(1)).zip(logits.chunks_mut(c.max(1)).zip(probs.chunks_mut(c.max(1)))) {
                let total: f64 = row.iter().sum();
                for (j, &s) in row.iter().enumerate() {
                    // A row of zeros (every model gave 0 everywhere) stays zeros rather than NaN.
                    let q = if total > 0.0 { s / total } else { 0.0 };
                    prow[j] = q as f32;
                    lrow[j] = (q as f32).max(f32::MIN_POSITIVE).ln();
                }
            }
        }
    }
    Predictions { ids: first.ids.clone(), classes: first.classes.clone(), probs, logits }
}

/// Every prediction must cover the first one's images and classes, in the same order.
fn check_aligned(preds: &[Predictions]) -> Result<(), StageError> {
    let first = &preds[0];
    for (i, p) in preds.iter().enumerate().skip(1) {
        let mismatch = |msg: String| StageError::Input { name: "predictions".into(), msg: format!("predictions[{i}] does not match predictions[0]: {msg}") };
        if p.ids.len() != first.ids.len() {
            return Err(mismatch(format!("{} images against {} (predicted on a different set?)", p.ids.len(), first.ids.len())));
        }
        if let Some(k) = p.ids.iter().zip(&first.ids).position(|(a, b)| a != b) {
            return Err(mismatch(format!("image {k} is `{}` against `{}` (a different set, or another order)", p.ids[k], first.ids[k])));
        }
        if p.classes.len() != first.classes.len() {
            return Err(mismatch(format!("{} classes against {}", p.classes.len(), first.classes.len())));
        }
        if let Some(k) = p.classes.iter().zip(&first.classes).position(|(a, b)| a != b) {
            return Err(mismatch(format!("class column {k} is `{}` against `{}`", p.classes[k], first.classes[k])));
        }
    }
    Ok(())
}

impl StageKind for Ensemble {
    fn name(&self) -> &'static str {
        "ensemble"
    }
    fn version(&self) -> u32 {
        1
    }
    /// Cheap (a weighted mean of prediction files): under a cluster executor it runs in the controlling
    /// process rather than waiting in a queue.
    fn local_by_default(&self) -> bool {
        true
    }
    fn summary(&self) -> &'static str {
        "adaptive ensemble: weights w_i = (acc_i / min acc)^f from validation accuracy, weighted mean of probabilities (or logits)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("f", ParamType::Float, 25.0, "exponent of w_i = (acc_i / min_j acc_j)^f; 0 gives the plain mean (and needs no metrics)"),
            ParamSpec::optional("average", ParamType::Enum(&["probs", "logits"]), "probs", "average probabilities (the seed) or logits"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::many("predictions", PREDICTIONS, "each model's predictions over the same image set (same ids and classes, same order)"),
            PortSpec::many("metrics", METRICS, "each model's validation metrics, in the order of `predictions`; required unless f = 0").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("predictions", PREDICTIONS, "the ensemble: rows renormalised, probs = softmax(logits)"),
            PortSpec::one("weights", REPORT, "weights.json: each model's accuracy, weight and agreement with the ensemble"),
        ]
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        match params.float("f") {
            Ok(f) if !f.is_finite() || f < 0.0 => vec![("f".into(), format!("must be a finite number >= 0, found {f}"))],
            _ => Vec::new(),
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let f = ctx.params.float("f")?;
        let average = ctx.params.str("average")?.to_string();
        crate::artifact::refuse_oracle(ctx, &[])?;
        let dirs = ctx.inputs("predictions");
        if dirs.is_empty() {
            return Err(StageError::Input { name: "predictions".into(), msg: "no predictions connected".into() });
        }
        let preds = dirs.iter().map(|d| Predictions::read(d)).collect::<Result<Vec<_>, _>>()?;
        check_aligned(&preds)?;
        let metric_dirs = ctx.inputs("metrics");
        if f != 0.0 && metric_dirs.is_empty() {
            return Err(StageError::Input {
                name: "metrics".into(),
                msg: format!("f = {f} weighs models by validation accuracy: connect one metrics artifact per model (or set f: 0)"),
            });
        }
        if !metric_dirs.is_empty() && metric_dirs.len() != preds.len() {
            return Err(StageError::Input {
                name: "metrics".into(),
                msg: format!("{} metrics for {} predictions: give one per model, in the same order", metric_dirs.len(), preds.len()),
            });
        }
        let metrics = metric_dirs.iter().map(|d| Metrics::read(d)).collect::<Result<Vec<_>, _>>()?;
        for (i, m) in metrics.iter().enumerate() {
            if m.truth == "testa" || m.truth == "testb" {
                // Not an error (a study may want it), but weighting by test accuracy leaks the answer.
                ctx.log(format!("warning: metrics[{i}] was computed against {}: weights from test accuracy leak the test labels; use validation metrics", m.truth));
            }
        }
        let accs: Vec<f64> = metrics.iter().map(|m| m.top1).collect();
        let weights = if metrics.is_empty() { vec![1.0; preds.len()] } else { adaptive_weights(&accs, f).map_err(|msg| StageError::Input { name: "metrics".into(), msg })? };
        let ens = combine(&preds, &weights, &average);
        let top = ens.top1();
        let models = preds
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let agree = p.top1().iter().zip(&top).filter(|(a, b)| a == b).count();
                ModelWeight {
                    accuracy: accs.get(i).copied(),
                    agreement: if top.is_empty() { 1.0 } else { agree as f64 / top.len() as f64 },
                    index: i,
                    metrics_truth: metrics.get(i).map(|m| m.truth.clone()),
                    weight: weights[i],
                }
            })
            .collect::<Vec<_>>();
        for m in &models {
            ctx.log(format!("model {}: acc {} weight {:.4} agreement {:.4}", m.index, m.accuracy.map(|a| format!("{a:.4}")).unwrap_or_else(|| "-".into()), m.weight, m.agreement));
        }
        ens.write(&ctx.output_dir("predictions")?)?;
        let report = WeightsReport { average, classes: ens.num_classes(), f, images: ens.n(), models };
        write_json(&ctx.output_dir("weights")?.join(WEIGHTS_FILE), &report)
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "weights" => {
                let r: WeightsReport = match read_json(&dir.join(WEIGHTS_FILE)) {
                    Ok(r) => r,
                    Err(e) => return Some(format!("unreadable weights: {e}")),
                };
                let mut s = String::new();
                let _ = writeln!(s, "ensemble of {} models over {} images, {} classes (f = {}, average {})", r.models.len(), r.images, r.classes, r.f, r.average);
                let _ = writeln!(s, "  {:>5} {:>9} {:>10} {:>10}", "model", "val acc", "weight", "agreement");
                for m in &r.models {
                    let acc = m.accuracy.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or_else(|| "-".into());
                    let _ = writeln!(s, "  {:>5} {:>9} {:>10.4} {:>9.2}%", m.index, acc, m.weight, 100.0 * m.agreement);
                }
                Some(s)
            }
            "predictions" => {
                let p = Predictions::read(dir).ok()?;
                let conf: f64 = (0..p.n()).map(|i| p.probs_row(i)[argmax(p.probs_row(i))] as f64).sum::<f64>() / p.n().max(1) as f64;
                Some(format!("predictions: {} images x {} classes, mean top probability {conf:.4}\n", p.n(), p.num_classes()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(ids: &[&str], rows: &[[f32; 2]]) -> Predictions {
        let probs: Vec<f32> = rows.iter().flatten().copied().collect();
        let logits = probs.iter().map(|p| p.ln()).collect();
        Predictions { ids: ids.iter().map(|s| s.to_string()).collect(), classes: vec!["a".into(), "b".into()], probs, logits }
    }

    #[test]
    fn weights_follow_the_formula() {
        assert_eq!(adaptive_weights(&[0.5, 0.6], 0.0).unwrap(), vec![1.0, 1.0]);
        let w = adaptive_weights(&[0.5, 0.6], 25.0).unwrap();
        assert_eq!(w[0], 1.0);
        assert!((w[1] - 1.2f64.powi(25)).abs() < 1e-9 * w[1]);
        assert!(adaptive_weights(&[0.5, 0.0], 25.0).is_err());
    }

    #[test]
    fn weighted_mean_of_probs_is_renormalised() {
        let a = pred(&["x"], &[[0.8, 0.2]]);
        let b = pred(&["x"], &[[0.3, 0.7]]);
        let plain = combine(&[a.clone(), b.clone()], &[1.0, 1.0], "probs");
        assert!((plain.probs[0] - 0.55).abs() < 1e-6 && (plain.probs[1] - 0.45).abs() < 1e-6);
        let w = 1.2f64.powi(25);
        let weighted = combine(&[a, b], &[1.0, w], "probs");
        let want = (0.8 + w * 0.3) / (1.0 + w);
        assert!((weighted.probs[0] as f64 - want).abs() < 1e-6);
        assert_eq!(weighted.top1(), vec![1]);
        assert!((weighted.logits[0] - weighted.probs[0].ln()).abs() < 1e-6);
    }

    #[test]
    fn misaligned_predictions_are_refused() {
        let a = pred(&["x", "y"], &[[0.5, 0.5], [0.5, 0.5]]);
        let b = pred(&["x", "z"], &[[0.5, 0.5], [0.5, 0.5]]);
        let err = check_aligned(&[a, b]).unwrap_err().to_string();
        assert!(err.contains("predictions[1]") && err.contains("`z`"), "{err}");
    }
}
