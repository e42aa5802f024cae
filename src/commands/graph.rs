//! `fgflow graph`: the stage DAG as text (stage <- inputs) or Graphviz DOT.

use std::path::PathBuf;
use std::process::ExitCode;

use petgraph::dot::{Config, Dot};

use crate::app::{App, CliResult, out};
use crate::console::esc;

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline file (default: the last one run or planned).
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    /// The pipeline file given positionally (`fgflow graph FILE`), as before `-p`.
    #[arg(value_name = "FILE", conflicts_with = "pipeline")]
    pub file: Option<PathBuf>,
    /// Graphviz DOT output.
    #[arg(long)]
    pub dot: bool,
}

pub fn run(app: &App, a: Args) -> CliResult {
    let file = app.pipeline_or_last(a.pipeline.or(a.file))?;
    let p = app.load(&file)?;
    if a.dot {
        let edge = |_, e: petgraph::graph::EdgeReference<'_, fgflow_engine::OutputRef>| format!("label=\"{}\"", dot_text(&e.weight().output));
        let node = |_, (_, n): (petgraph::graph::NodeIndex, &String)| {
            let kind = p.stage(n).map(|s| s.kind.name()).unwrap_or("?");
            format!("label=\"{}\\n({kind})\" shape=box", dot_text(n))
        };
        let dot = Dot::with_attr_getters(&p.graph, &[Config::EdgeNoLabel, Config::NodeNoLabel], &edge, &node);
        out(&format!("{dot:?}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut s = String::new();
    for st in &p.stages {
        s.push_str(&format!("{} ({})\n", esc(&st.name), st.kind.name()));
        for (port, refs) in &st.inputs {
            for r in refs {
                s.push_str(&format!("  <- {}: {}\n", esc(port), esc(&r.to_string())));
            }
        }
    }
    out(&s)?;
    Ok(ExitCode::SUCCESS)
}

/// A name inside a quoted DOT label: control characters escaped, quotes and
/// backslashes too, so a name cannot end the label.
fn dot_text(s: &str) -> String {
    esc(s).replace('\\', "\\\\").replace('"', "\\\"")
}
