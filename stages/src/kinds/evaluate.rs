//! The `evaluate` kind: scores predictions against the truth (a test split of the
//! hidden ground truth, or the labels of a labelled set such as validation) and writes
//! `metrics.json`: top-1, top-5, per-class accuracy, and a head/middle/tail breakdown
//! when the training set is connected for the class counts.

use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind};

use crate::artifact;
use crate::ml::metrics::{self, Metrics};
use crate::ml::predictions::Predictions;
use crate::types;

pub struct Evaluate;

/// Map labels from `truth_classes` to the predictions' columns by class name.
fn to_columns(labels: &[u32], truth_classes: &[String], pred_classes: &[String]) -> Result<Vec<u32>, StageError> {
    if truth_classes == pred_classes {
        return Ok(labels.to_vec());
    }
    let map: Vec<Option<u32>> = truth_classes.iter().map(|c| pred_classes.iter().position(|p| p == c).map(|i| i as u32)).collect();
    labels
        .iter()
        .map(|&l| {
            map.get(l as usize).copied().flatten().ok_or_else(|| {
                StageError::failed(format!("true class `{}` is not among the predictions' classes", truth_classes.get(l as usize).map(String::as_str).unwrap_or("?")))
            })
        })
        .collect()
}

impl StageKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    /// 2: metrics carry `truth_id` (which labels they were scored against).
    fn version(&self) -> u32 {
        2
    }
    /// Cheap (a pass over predictions and labels): under a cluster executor it runs in the controlling
    /// process rather than waiting in a queue.
    fn local_by_default(&self) -> bool {
        true
    }
    fn summary(&self) -> &'static str {
        "top-1 / top-5 / per-class / head-middle-tail accuracy of predictions against the truth"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional("split", ParamType::Enum(&["testa", "testb"]), "testa", "which test split of `truth` the predictions are for")]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::one("predictions", types::PREDICTIONS, "what a model (or ensemble) predicted"),
            PortSpec::one("truth", types::GROUND_TRUTH, "hidden test labels (connect this or `labels`)").optional(),
            PortSpec::one("labels", types::LABELLED_SET, "a labelled set whose labels are the truth, e.g. validation").optional(),
            PortSpec::one("train", types::LABELLED_SET, "training set: its class counts give the head/middle/tail breakdown").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("metrics", types::METRICS, "metrics.json")]
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let pred = Predictions::read(ctx.input("predictions")?)?;
        let (labels, truth_classes, what) = match (ctx.has_input("truth"), ctx.has_input("labels")) {
            (true, false) => {
                let t = artifact::read_ground_truth(ctx.input("truth")?)?;
                let split = ctx.params.str("split")?.to_string();
                let labels = if split == "testb" { t.testb_labels } else { t.testa_labels };
                (labels, t.classes, split)
            }
            (false, true) => {
                let s = artifact::read_labelled_set(ctx.input("labels")?)?;
                if s.images.ids != pred.ids {
                    return Err(StageError::Input { name: "labels".into(), msg: "its images are not the ones the predictions are for (ids differ)".into() });
                }
                (s.labels, s.images.classes, "labels".to_string())
            }
            _ => return Err(StageError::Input { name: "truth".into(), msg: "connect exactly one of `truth` and `labels`".into() }),
        };
        if labels.len() != pred.n() {
            return Err(StageError::failed(format!("{} true labels for {} predictions (wrong split?)", labels.len(), pred.n())));
        }
        let labels = to_columns(&labels, &truth_classes, &pred.classes)?;
        let counts = if ctx.has_input("train") {
            let t = artifact::read_labelled_set(ctx.input("train")?)?;
            let raw = artifact::class_counts(&t.labels, t.n_classes());
            // Counts follow the training set's class order; re-order them to the predictions'.
            let mut counts = vec![0u64; pred.num_classes()];
            for (k, name) in t.images.classes.iter().enumerate() {
                if let Some(col) = pred.classes.iter().position(|p| p == name) {
                    counts[col] = raw[k] as u64;
                }
            }
            Some(counts)
        } else {
            None
        };
        let m = metrics::compute(&pred, &labels, counts.as_deref(), &what)?;
        ctx.log(format!("top-1 {:.4}  top-5 {:.4}  mean class acc {:.4}", m.top1, m.top5, m.mean_class_acc));
        let out = ctx.output_dir("metrics")?;
        m.write(&out)?;
        // So that a report marks an oracle row "(oracle)".
        artifact::carry_oracle(ctx.input("predictions")?, &out)
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        (output == "metrics").then(|| Metrics::read(dir).map(|m| m.table()).unwrap_or_else(|e| format!("unreadable metrics: {e}")))
    }
}
