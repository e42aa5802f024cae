//! The `report` kind: a table of several evaluations, one row each, in the order the
//! pipeline gives them (the ablation table of the recipe). Rows are computed from the
//! `metrics` artifacts of evaluate stages, so every figure in it comes from a run.
//!
//! Output `report/`: `table.md` (Markdown: row, top-1, top-5, mean class accuracy,
//! head / middle / tail top-1, and the change of top-1 against the first row) and
//! `table.json` (the same numbers).

use std::fmt::Write as _;
use std::path::Path;

use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, RunContext, StageError, StageKind};
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Table {
    title: String,
    rows: Vec<Row>,
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.2}", v * 100.0)).unwrap_or_else(|| "-".into())
}

fn markdown(t: &Table) -> String {
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
            ParamSpec::required("rows", ParamType::List(&ParamType::Str), "one label per `metrics` input, same order"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![PortSpec::many("metrics", types::METRICS, "metrics of evaluate stages, one per row")]
    }
    fn outputs(&self, _: &Params) -> Vec<PortSpec> {
        vec![PortSpec::one("report", types::REPORT, "table.md and table.json")]
    }
    fn validate(&self, p: &Params) -> Vec<(String, String)> {
        match p.strs("rows") {
            Ok(rows) if rows.is_empty() => vec![("rows".into(), "needs at least one row".into())],
            _ => Vec::new(),
        }
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let labels = ctx.params.strs("rows")?;
        let inputs = ctx.inputs("metrics");
        if labels.len() != inputs.len() {
            return Err(StageError::Param { name: "rows".into(), msg: format!("{} labels for {} metrics inputs", labels.len(), inputs.len()) });
        }
        let mut rows = Vec::new();
        for (label, dir) in labels.iter().zip(inputs) {
            let m = Metrics::read(dir)?;
            let group = |g: &str| m.groups.iter().find(|x| x.group == g).and_then(|x| x.acc);
            rows.push(Row {
                label: label.to_string(),
                evaluated_on: m.truth.clone(),
                n: m.n,
                top1: m.top1,
                top5: m.top5,
                mean_class_acc: m.mean_class_acc,
                head: group("head"),
                middle: group("middle"),
                tail: group("tail"),
            });
        }
        if let Some(first) = rows.first()
            && let Some(odd) = rows.iter().find(|r| r.evaluated_on != first.evaluated_on || r.n != first.n)
        {
            return Err(StageError::failed(format!("row `{}` was evaluated on {} ({} images), the first on {} ({}): rows must be comparable", odd.label, odd.evaluated_on, odd.n, first.evaluated_on, first.n)));
        }
        let table = Table { title: ctx.params.str("title")?.to_string(), rows };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_input_and_deltas_against_the_first() {
        let row = |label: &str, top1: f64| Row { label: label.into(), evaluated_on: "testb".into(), n: 10, top1, top5: 0.9, mean_class_acc: top1, head: Some(0.5), middle: None, tail: Some(0.1) };
        let t = Table { title: "Ablation".into(), rows: vec![row("plain", 0.5), row("+ trick", 0.55)] };
        let md = markdown(&t);
        assert!(md.contains("| plain | 50.00 | +0.00 |"), "{md}");
        assert!(md.contains("| + trick | 55.00 | +5.00 |"), "{md}");
        assert!(md.contains("| - |"), "missing groups print as -: {md}");
    }
}

