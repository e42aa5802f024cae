//! The `metrics` artifact (`metrics.json`) and how it is computed from predictions and
//! true labels: top-1, top-5, per-class accuracy, mean per-class accuracy, and, when the
//! training class counts are known, a head/middle/tail breakdown.
//!
//! Groups: `artifact::head_middle_tail` (thirds of the classes ranked by training count),
//! the same bands `show` and cleaning use. Relative thirds rather than absolute
//! thresholds (ImageNet-LT's >100 / 20..100 / <20) because the sets here range from
//! 28x28 toy data to WebiNat-5000.

use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::StageError;
use serde::{Deserialize, Serialize};

use super::predictions::{Predictions, read_json, write_json};

pub const METRICS_FILE: &str = "metrics.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    pub n: usize,
    pub correct: usize,
    /// null when the class has no evaluated image.
    pub acc: Option<f64>,
    pub train_count: Option<u64>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    pub group: String,
    pub classes: usize,
    pub n: usize,
    pub correct: usize,
    pub acc: Option<f64>,
    /// Mean of the group's per-class accuracies (classes with images only).
    pub mean_class_acc: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// What was evaluated against ("testa", "labels", ...).
    pub truth: String,
    pub n: usize,
    pub num_classes: usize,
    pub top1: f64,
    pub top5: f64,
    pub mean_class_acc: f64,
    pub groups: Vec<GroupMetrics>,
    pub per_class: Vec<ClassMetrics>,
    /// Which true labels these are: a digest of `truth`, the class names and the labels
    /// in order (first 16 hex digits), so a report can tell two benchmark draws, or two
    /// sets of one size, apart. Absent in metrics written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth_id: Option<String>,
}

/// The identity of a set of true labels (see `Metrics::truth_id`).
pub fn truth_id(truth: &str, classes: &[String], labels: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(truth.len() + 1 + labels.len() * 4);
    bytes.extend_from_slice(truth.as_bytes());
    bytes.push(0);
    for c in classes {
        bytes.extend_from_slice(c.as_bytes());
        bytes.push(0);
    }
    for l in labels {
        bytes.extend_from_slice(&l.to_le_bytes());
    }
    fgflow_cache::Digest::of_bytes(&bytes).to_hex()[..16].to_string()
}

/// Score `pred` against `labels` (one class index per prediction row, in the
/// predictions' class order). `train_counts` (same order) enables the groups.
pub fn compute(pred: &Predictions, labels: &[u32], train_counts: Option<&[u64]>, truth: &str) -> Result<Metrics, StageError> {
    let (n, c) = (pred.n(), pred.num_classes());
    if labels.len() != n {
        return Err(StageError::failed(format!("{} true labels for {n} predictions", labels.len())));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= c) {
        return Err(StageError::failed(format!("true label {bad} is out of range for {c} classes")));
    }
    if let Some(tc) = train_counts
        && tc.len() != c
    {
        return Err(StageError::failed(format!("{} training class counts for {c} classes", tc.len())));
    }
    let mut per_n = vec![0usize; c];
    let mut per_ok = vec![0usize; c];
    let (mut ok1, mut ok5) = (0usize, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        let row = pred.probs_row(i);
        let y = y as usize;
        // Rank of the true class: how many classes score strictly higher (ties favour the truth
        // only as far as argmax does: the lowest index wins).
        let py = row[y];
        let rank = row.iter().enumerate().filter(|&(j, &p)| p > py || (p == py && j < y)).count();
        per_n[y] += 1;
        if rank == 0 {
            ok1 += 1;
            per_ok[y] += 1;
        }
        if rank < 5 {
            ok5 += 1;
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { None } else { Some(a as f64 / b as f64) };
    let groups_of = train_counts.map(group_assignment);
    let per_class: Vec<ClassMetrics> = (0..c)
        .map(|k| ClassMetrics {
            class: pred.classes[k].clone(),
            n: per_n[k],
            correct: per_ok[k],
            acc: ratio(per_ok[k], per_n[k]),
            train_count: train_counts.map(|t| t[k]),
            group: groups_of.as_ref().map(|g| g[k].to_string()),
        })
        .collect();
    let mean = |accs: Vec<f64>| if accs.is_empty() { None } else { Some(accs.iter().sum::<f64>() / accs.len() as f64) };
    let mean_class_acc = mean(per_class.iter().filter_map(|m| m.acc).collect()).unwrap_or(0.0);
    let groups = match &groups_of {
        None => Vec::new(),
        Some(_) => ["head", "middle", "tail"]
            .iter()
            .map(|g| {
                let members: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.group.as_deref() == Some(*g)).collect();
                let gn: usize = members.iter().map(|m| m.n).sum();
                let gok: usize = members.iter().map(|m| m.correct).sum();
                GroupMetrics {
                    group: g.to_string(),
                    classes: members.len(),
                    n: gn,
                    correct: gok,
                    acc: ratio(gok, gn),
                    mean_class_acc: mean(members.iter().filter_map(|m| m.acc).collect()),
                }
            })
            .collect(),
    };
    Ok(Metrics {
        truth: truth.to_string(),
        n,
        num_classes: c,
        top1: ratio(ok1, n).unwrap_or(0.0),
        top5: ratio(ok5, n).unwrap_or(0.0),
        mean_class_acc,
        groups,
        per_class,
        truth_id: Some(truth_id(truth, &pred.classes, labels)),
    })
}

/// "head" / "middle" / "tail" for each class from its training count.
pub fn group_assignment(counts: &[u64]) -> Vec<&'static str> {
    let counts: Vec<usize> = counts.iter().map(|&n| n as usize).collect();
    crate::artifact::head_middle_tail(&counts).into_iter().map(|b| b.name()).collect()
}

impl Metrics {
    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        write_json(&dir.join(METRICS_FILE), self)
    }

    pub fn read(dir: &Path) -> Result<Self, StageError> {
        read_json(&dir.join(METRICS_FILE))
    }

    /// The table `fgflow show` prints.
    pub fn table(&self) -> String {
        let pct = |v: Option<f64>| v.map(|x| format!("{:6.2}%", 100.0 * x)).unwrap_or_else(|| "     -".into());
        let mut s = String::new();
        let _ = writeln!(s, "evaluated against {}: {} images, {} classes", self.truth, self.n, self.num_classes);
        let _ = writeln!(s, "  top-1            {}", pct(Some(self.top1)));
        let _ = writeln!(s, "  top-5            {}", pct(Some(self.top5)));
        let _ = writeln!(s, "  mean class acc   {}", pct(Some(self.mean_class_acc)));
        if !self.groups.is_empty() {
            let _ = writeln!(s, "  {:<8} {:>7} {:>7} {:>8} {:>10}", "group", "classes", "images", "acc", "class-acc");
            for g in &self.groups {
                let _ = writeln!(s, "  {:<8} {:>7} {:>7} {:>8} {:>10}", g.group, g.classes, g.n, pct(g.acc), pct(g.mean_class_acc));
            }
        }
        // The five worst classes with images: where to look first.
        let mut worst: Vec<&ClassMetrics> = self.per_class.iter().filter(|m| m.acc.is_some()).collect();
        worst.sort_by(|a, b| a.acc.partial_cmp(&b.acc).unwrap_or(std::cmp::Ordering::Equal));
        if !worst.is_empty() {
            let _ = writeln!(s, "  worst classes:");
            for m in worst.iter().take(5) {
                let _ = writeln!(s, "    {:<28} {} ({}/{})", m.class, pct(m.acc), m.correct, m.n);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(rows: &[[f32; 3]]) -> Predictions {
        Predictions::from_logits(
            (0..rows.len()).map(|i| i.to_string()).collect(),
            vec!["a".into(), "b".into(), "c".into()],
            rows.iter().flatten().copied().collect(),
        )
    }

    #[test]
    fn top1_per_class_and_groups() {
        let p = pred(&[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]);
        let m = compute(&p, &[0, 1, 1, 2], Some(&[50, 10, 1]), "labels").unwrap();
        assert_eq!(m.top1, 0.75);
        assert_eq!(m.top5, 1.0);
        assert_eq!(m.per_class[1].acc, Some(0.5));
        assert!((m.mean_class_acc - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(group_assignment(&[50, 10, 1]), vec!["head", "middle", "tail"]);
        assert_eq!(m.groups[1].acc, Some(0.5));
        assert!(m.table().contains("top-1"));
        assert!(compute(&p, &[0, 1, 1, 7], None, "x").is_err());
    }
}
