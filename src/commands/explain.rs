//! `fgflow explain STAGE`: why a stage is stale, field by field, against its last run
//! (cargo's dirty reasons, moon's hash diff), with the upstream stage behind each
//! changed input.

use std::path::PathBuf;
use std::process::ExitCode;

use fgflow_engine::{Reason, Status};

use crate::app::{App, CliError, CliResult, out};
use crate::commands::status::plan;
use crate::console::{REASON_BYTES, esc, shown};

#[derive(clap::Args)]
pub struct Args {
    pub stage: String,
    /// Pipeline file (default: the last one run or planned).
    #[arg(short, long)]
    pub pipeline: Option<PathBuf>,
    #[arg(long)]
    pub backend: Option<String>,
}

pub fn run(app: &App, a: Args) -> CliResult {
    let file = app.pipeline_or_last(a.pipeline)?;
    let (p, planned) = plan(app, &file, a.backend)?;
    let Some(st) = planned.iter().find(|s| s.name == a.stage) else {
        let names: Vec<&str> = planned.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError::Usage(format!("no stage `{}` in {}; stages: {}", esc(&a.stage), esc(&file.display().to_string()), shown(&names.join(", "), 2000))));
    };
    out(&explain(&p, &planned, st))?;
    Ok(ExitCode::SUCCESS)
}

pub fn explain(p: &fgflow_engine::Pipeline, planned: &[fgflow_engine::Planned], st: &fgflow_engine::Planned) -> String {
    let stage = p.stage(&st.name).expect("planned stages come from the pipeline");
    let mut s = String::new();
    let kind = stage.kind.name();
    let name = esc(&st.name);
    match st.status {
        Status::Fresh => s.push_str(&format!("`{name}` ({kind}) is fresh: key {} is in the cache\n", st.key.map(|k| k.short()).unwrap_or_default())),
        Status::Stale => s.push_str(&format!("`{name}` ({kind}) is stale: key {} is not in the cache\n", st.key.map(|k| k.short()).unwrap_or_default())),
        Status::Pending => s.push_str(&format!("`{name}` ({kind}) is pending: its key is known once its upstream stages have run\n")),
    }
    match st.previous.as_deref() {
        Some((k, _)) => s.push_str(&format!("  last run: key {}\n", k.short())),
        None => s.push_str("  last run: none recorded for this pipeline file\n"),
    }
    for r in &st.reasons {
        match r {
            Reason::Input { port, from, old, new } => {
                for (i, origin) in from.iter().enumerate() {
                    let (o, n) = (old.get(i).map(|d| d.short()), new.get(i).map(|d| d.short()));
                    if o == n {
                        continue;
                    }
                    let producer = origin.rsplit_once('.').map(|(s, _)| s).unwrap_or(origin);
                    let why = planned.iter().find(|x| x.name == producer).map(|x| match x.status {
                        Status::Fresh => "its producer's cached result differs from the one used last time".to_string(),
                        _ => format!("produced by `{}`, which is {}", esc(producer), format!("{:?}", x.status).to_lowercase()),
                    });
                    s.push_str(&format!(
                        "  - input `{}` from `{}`: {} -> {} ({})\n",
                        esc(port),
                        esc(origin),
                        o.unwrap_or_else(|| "(none)".into()),
                        n.unwrap_or_else(|| "(none)".into()),
                        why.unwrap_or_default()
                    ));
                }
            }
            Reason::Upstream { stage } => {
                let up = planned.iter().find(|x| &x.name == stage);
                let detail = up.map(|u| u.reasons.iter().map(|r| shown(&r.to_string(), REASON_BYTES)).collect::<Vec<_>>().join("; ")).unwrap_or_default();
                s.push_str(&format!("  - waits for upstream `{}` ({detail})\n", esc(stage)));
            }
            other => s.push_str(&format!("  - {}\n", shown(&other.to_string(), REASON_BYTES))),
        }
    }
    if st.status == Status::Stale && st.reasons.is_empty() {
        s.push_str("  - no recorded difference\n");
    }
    let down = p.downstream(&st.name);
    if !down.is_empty() && st.status != Status::Fresh {
        s.push_str(&format!("  re-running it may also re-run: {}\n", esc(&down.join(", "))));
    }
    s
}
