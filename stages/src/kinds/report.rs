//! The `report` kind: a table of several evaluations, one row each, in the order the
//! pipeline gives them (the ablation table of the recipe). Rows are computed from the
//! `metrics` artifacts of evaluate stages, so every figure in it comes from a run.
//!
//! With `seeds` (labels of benchmark draws, e.g. `["7", "11"]`) each row is measured on
//! every seed: the `metrics` inputs are row by row, seed by seed within a row, and the
//! row's figures are means over the seeds, with the spread (min..max of top-1) and, per
//! row, the change against the row above with how many seeds agree on its sign, so a
//! conclusion that rests on one lucky draw shows as "1 of 2".
//!
//! Output `report/`: `table.md` (Markdown: row, top-1, top-5, mean class accuracy,
//! head / middle / tail top-1, and the change of top-1 against the first row, or with
//! seeds against the row above) and `table.json` (the same numbers; with seeds, `seeds`
//! and each row's `per_seed` top-1).

use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind, Value};
use serde::{Deserialize, Serialize};

use crate::ml::metrics::Metrics;
use crate::ml::predictions::{read_json, write_json};
use crate::types;

pub struct Report;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    label: String,
    evaluated_on: String,
    n: usize,
    top1: f64,
    top5: f64,
    mean_class_acc: f64,
    head: Option<f64>,
    middle: Option<f64>,
    tail: Option<f64>,
    /// Top-1 on each seed, in `Table::seeds` order (empty without seeds); the fields
    /// above are then means over the seeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    per_seed: Vec<f64>,
    /// Which true labels the row was scored against (`Metrics::truth_id`): checked,
    /// not shown.
    #[serde(skip)]
    truth_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Table {
    title: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seeds: Vec<String>,
    rows: Vec<Row>,
}

impl Row {
    fn from_metrics(label: &str, m: &Metrics) -> Row {
        let group = |g: &str| m.groups.iter().find(|x| x.group == g).and_then(|x| x.acc);
        Row {
            label: label.to_string(),
            evaluated_on: m.truth.clone(),
            n: m.n,
            top1: m.top1,
            top5: m.top5,
            mean_class_acc: m.mean_class_acc,
            head: group("head"),
            middle: group("middle"),
            tail: group("tail"),
            per_seed: Vec::new(),
            truth_id: m.truth_id.clone(),
        }
    }

    /// One row from the same row measured on each seed: means, and each seed's top-1.
    fn mean_over_seeds(label: &str, runs: &[Row]) -> Row {
        let k = runs.len() as f64;
        let mean = |f: &dyn Fn(&Row) -> f64| runs.iter().map(f).sum::<f64>() / k;
        // A group missing on one seed (no class fell in it) has no mean.
        let mean_opt = |f: &dyn Fn(&Row) -> Option<f64>| runs.iter().map(f).collect::<Option<Vec<f64>>>().map(|v| v.iter().sum::<f64>() / k);
        Row {
            label: label.to_string(),
            evaluated_on: runs[0].evaluated_on.clone(),
            n: runs[0].n,
            top1: mean(&|r| r.top1),
            top5: mean(&|r| r.top5),
            mean_class_acc: mean(&|r| r.mean_class_acc),
            head: mean_opt(&|r| r.head),
            middle: mean_opt(&|r| r.middle),
            tail: mean_opt(&|r| r.tail),
            per_seed: runs.iter().map(|r| r.top1).collect(),
            truth_id: None,
        }
    }
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.2}", v * 100.0)).unwrap_or_else(|| "-".into())
}

fn signed(x: f64) -> String {
    format!("{}{:.2}", if x >= 0.0 { "+" } else { "" }, x)
}

/// The table over seeds: mean top-1, its spread, each seed, and the change against the
/// row above with how many seeds move the same way as the mean.
fn markdown_seeds(t: &Table) -> String {
    let mut s = format!("### {}\n\n", t.title);
    let seeds: Vec<String> = t.seeds.iter().map(|x| format!("seed {x} %")).collect();
    let _ = writeln!(s, "| | top-1 % (mean of {}) | spread | {} | vs row above (seeds agreeing) | top-5 % | mean class acc % | head % | middle % | tail % |", t.seeds.len(), seeds.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(9 + t.seeds.len()));
    let mut above: Option<&Row> = None;
    for r in &t.rows {
        let lo = r.per_seed.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.per_seed.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let per: Vec<String> = r.per_seed.iter().map(|&x| pct(Some(x))).collect();
        let change = match above {
            None => "-".to_string(),
            Some(a) => {
                let d = r.top1 - a.top1;
                let agree = r.per_seed.iter().zip(&a.per_seed).filter(|&(x, y)| (x - y) * d > 0.0 || (x - y == 0.0 && d == 0.0)).count();
                format!("{} ({} of {})", signed(d * 100.0), agree, r.per_seed.len())
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.2}..{:.2} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            pct(Some(r.top1)),
            lo * 100.0,
            hi * 100.0,
            per.join(" | "),
            change,
            pct(Some(r.top5)),
            pct(Some(r.mean_class_acc)),
            pct(r.head),
            pct(r.middle),
            pct(r.tail)
        );
        above = Some(r);
    }
    if let Some(r) = t.rows.first() {
        let _ = writeln!(s, "\nEvaluated on {} ({} images) of each of {} benchmark draws (seeds {}); head/middle/tail are means.", r.evaluated_on, r.n, t.seeds.len(), t.seeds.join(", "));
    }
    s
}

fn markdown(t: &Table) -> String {
    if !t.seeds.is_empty() {
        return markdown_seeds(t);
    }
    let mut s = format!("### {}\n\n", t.title);
    s.push_str("| | top-1 % | vs first row | top-5 % | mean class acc % | head % | middle % | tail % |\n|---|---|---|---|---|---|---|---|\n");
    let base = t.rows.first().map(|r| r.top1).unwrap_or(0.0);
    for r in &t.rows {
        let delta = (r.top1 - base) * 100.0;
        let _ = writeln!(
            s,
            "| {} | {} | {}{:.2} | {} | {} | {} | {} | {} |",
            r.label,
            pct(Some(r.top1)),
            if delta >= 0.0 { "+" } else { "" },
            delta,
            pct(Some(r.top5)),
            pct(Some(r.mean_class_acc)),
            pct(r.head),
            pct(r.middle),
            pct(r.tail)
        );
    }
    if let Some(r) = t.rows.first() {
        let _ = writeln!(s, "\nEvaluated on {} ({} images).", r.evaluated_on, r.n);
    }
    s
}

impl StageKind for Report {
    fn name(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> u32 {
        1
    }
    /// Cheap (a table of metrics files): under a cluster executor it runs in the controlling
    /// process rather than waiting in a queue.
    fn local_by_default(&self) -> bool {
        true
    }
    fn summary(&self) -> &'static str {
        "a table of several evaluations (the ablation table), one row per metrics input"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("title", ParamType::Str, "Evaluation", "heading of the table"),
            ParamSpec::required("rows", ParamType::List(&ParamType::Str), "one label per `metrics` input, same order (with `seeds`: one per group of as many inputs as seeds)"),
            ParamSpec::optional(
                "seeds",
                ParamType::List(&ParamType::Str),
                Value::List(vec![]),
                "labels of the benchmark draws each row was measured on: the metrics inputs are then row by row, seed by seed within a row, and the table gives means and spreads",
            ),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![PortSpec::many("metrics", types::METRICS, "metrics of evaluate stages, one per row")]
    }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("report", types::REPORT, "table.md and table.json")]
    }
    fn validate(&self, p: &Params) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if let Ok(rows) = p.strs("rows")
            && rows.is_empty()
        {
            errors.push(("rows".into(), "needs at least one row".into()));
        }
        if let Ok(seeds) = p.strs("seeds") {
            if seeds.len() == 1 {
                errors.push(("seeds".into(), "one seed is no spread: give two or more, or none".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            if let Some(dup) = seeds.iter().find(|s| !seen.insert(**s)) {
                errors.push(("seeds".into(), format!("seed `{dup}` appears twice")));
            }
        }
        errors
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let labels = ctx.params.strs("rows")?;
        let seeds: Vec<String> = ctx.params.strs("seeds")?.into_iter().map(str::to_string).collect();
        let inputs = ctx.inputs("metrics");
        let per_row = seeds.len().max(1);
        if labels.len() * per_row != inputs.len() {
            let msg = if seeds.is_empty() {
                format!("{} labels for {} metrics inputs", labels.len(), inputs.len())
            } else {
                format!("{} labels x {} seeds = {} metrics inputs expected, {} connected (row by row, seed by seed within a row)", labels.len(), seeds.len(), labels.len() * seeds.len(), inputs.len())
            };
            return Err(StageError::Param { name: "rows".into(), msg });
        }
        // runs[row][seed]
        let mut runs: Vec<Vec<Row>> = Vec::with_capacity(labels.len());
        for (label, dirs) in labels.iter().zip(inputs.chunks(per_row)) {
            runs.push(dirs.iter().map(|dir| Metrics::read(dir).map(|m| Row::from_metrics(&oracle_label(label, dir), &m))).collect::<Result<_, _>>()?);
        }
        // Rows are compared seed by seed: each seed's column must be one evaluation set.
        for s in 0..per_row {
            let first = &runs[0][s];
            let other_labels = |r: &Row| matches!((&r.truth_id, &first.truth_id), (Some(a), Some(b)) if a != b);
            if let Some(odd) = runs.iter().map(|r| &r[s]).find(|r| r.evaluated_on != first.evaluated_on || r.n != first.n || other_labels(r)) {
                if odd.evaluated_on == first.evaluated_on && odd.n == first.n {
                    let on = seeds.get(s).map(|x| format!(" for seed {x}")).unwrap_or_default();
                    return Err(StageError::failed(format!(
                        "row `{}`{on} was scored against other true labels than the first row (another benchmark draw?): rows must be comparable{}",
                        odd.label,
                        if seeds.is_empty() { "" } else { "; with `seeds`, give the metrics row by row, seed by seed within a row, in `seeds` order" }
                    )));
                }
                let on = seeds.get(s).map(|x| format!(" (seed {x})")).unwrap_or_default();
                return Err(StageError::failed(format!("row `{}` was evaluated on {} ({} images){on}, the first on {} ({}): rows must be comparable", odd.label, odd.evaluated_on, odd.n, first.evaluated_on, first.n)));
            }
        }
        // Two seeds of one row scored against the same labels: not two draws, or the
        // inputs listed seed by seed instead of row by row. Either way the means would lie.
        for r in &runs {
            for (i, a) in r.iter().enumerate() {
                if let Some(j) = r[..i].iter().position(|b| a.truth_id.is_some() && a.truth_id == b.truth_id) {
                    return Err(StageError::failed(format!(
                        "row `{}`: its metrics for seeds {} and {} were scored against the same true labels: give the metrics row by row, seed by seed within a row, each seed from its own benchmark draw",
                        a.label, seeds[j], seeds[i]
                    )));
                }
            }
        }
        let rows = if seeds.is_empty() {
            runs.into_iter().map(|mut r| r.remove(0)).collect()
        } else {
            runs.iter().map(|r| Row::mean_over_seeds(&r[0].label, r)).collect()
        };
        let table = Table { title: ctx.params.str("title")?.to_string(), seeds, rows };
        let out = ctx.output_dir("report")?;
        let md = markdown(&table);
        ctx.log(&md);
        std::fs::write(out.join("table.md"), &md).map_err(|e| StageError::io("writing table.md", e))?;
        write_json(&out.join("table.json"), &table)
    }
    fn describe_output(&self, _output: &str, dir: &Path) -> Option<String> {
        read_json::<Table>(&dir.join("table.json")).ok().map(|t| markdown(&t))
    }
}

/// A row evaluated from the true labels (an oracle model's metrics) says so, whatever
/// its label: it is the ceiling, not a step of the recipe.
fn oracle_label(label: &str, metrics_dir: &Path) -> String {
    if crate::artifact::is_oracle(metrics_dir) && !label.to_lowercase().contains("(oracle") { format!("{label} (oracle)") } else { label.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, top1: f64) -> Row {
        Row { label: label.into(), evaluated_on: "testb".into(), n: 10, top1, top5: 0.9, mean_class_acc: top1, head: Some(0.5), middle: None, tail: Some(0.1), per_seed: vec![], truth_id: None }
    }

    #[test]
    fn seeds_give_means_spreads_and_how_many_seeds_agree() {
        let mut low = row("plain", 0.40);
        low.head = None;
        let rows = vec![
            Row::mean_over_seeds("plain", &[low, row("plain", 0.50)]),
            // Up on seed 1 (+0.10), down on seed 2 (-0.02): the mean rises, one seed of two agrees.
            Row::mean_over_seeds("+ trick", &[row("+ trick", 0.50), row("+ trick", 0.48)]),
            // Up on both.
            Row::mean_over_seeds("+ more", &[row("+ more", 0.60), row("+ more", 0.52)]),
        ];
        assert!((rows[0].top1 - 0.45).abs() < 1e-12);
        assert_eq!(rows[0].head, None, "a group missing on one seed has no mean");
        assert_eq!(rows[1].per_seed, vec![0.50, 0.48]);
        let t = Table { title: "Ablation".into(), seeds: vec!["7".into(), "11".into()], rows };
        let md = markdown(&t);
        assert!(md.contains("| seed 7 % | seed 11 % |"), "{md}");
        assert!(md.contains("| plain | 45.00 | 40.00..50.00 | 40.00 | 50.00 | - |"), "{md}");
        assert!(md.contains("| + trick | 49.00 | 48.00..50.00 | 50.00 | 48.00 | +4.00 (1 of 2) |"), "{md}");
        assert!(md.contains("| + more | 56.00 | 52.00..60.00 | 60.00 | 52.00 | +7.00 (2 of 2) |"), "{md}");
        // Round trip: `show` re-renders from table.json.
        let back: Table = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(markdown(&back), md);
    }

    #[test]
    fn table_has_one_row_per_input_and_deltas_against_the_first() {
        let t = Table { title: "Ablation".into(), seeds: vec![], rows: vec![row("plain", 0.5), row("+ trick", 0.55)] };
        let md = markdown(&t);
        assert!(md.contains("| plain | 50.00 | +0.00 |"), "{md}");
        assert!(md.contains("| + trick | 55.00 | +5.00 |"), "{md}");
        assert!(md.contains("| - |"), "missing groups print as -: {md}");
    }
}

