//! `fgflow status` (alias `plan`): Fresh / Stale (reasons) / Pending per stage, nothing run.

use std::path::PathBuf;
use std::process::ExitCode;

use fgflow_engine::{Planned, Status};

use crate::app::{App, CliResult, out};
use crate::console::{REASON_BYTES, esc, shown};

#[derive(clap::Args)]
pub struct Args {
    pub pipeline: PathBuf,
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn plan(app: &App, pipeline: &std::path::Path, backend: Option<String>) -> Result<(fgflow_engine::Pipeline, Vec<Planned>), crate::app::CliError> {
    let p = app.load(pipeline)?;
    let backend = app.backend(backend, &p)?;
    let (sources, _, _) = app.sources(&p)?;
    let planned = fgflow_engine::plan(&p, &app.store, &sources, &backend)?;
    Ok((p, planned))
}

pub fn render(planned: &[Planned]) -> String {
    let w = crate::console::column_width(planned.iter().map(|s| s.name.as_str()), 1);
    let mut s = String::new();
    for st in planned {
        let status = match st.status {
            Status::Fresh => "fresh",
            Status::Stale => "stale",
            Status::Pending => "pending",
        };
        let key = st.key.map(|k| k.short()).unwrap_or_else(|| "-".repeat(12));
        let why = st.reasons.iter().map(|r| shown(&r.to_string(), REASON_BYTES)).collect::<Vec<_>>().join("; ");
        s.push_str(format!("  {status:<8} {:<w$}  {key}  {why}", esc(&st.name)).trim_end());
        s.push('\n');
    }
    let count = |x: Status| planned.iter().filter(|p| p.status == x).count();
    s.push_str(&format!("{} fresh, {} stale, {} pending\n", count(Status::Fresh), count(Status::Stale), count(Status::Pending)));
    s
}

pub fn run(app: &App, a: Args) -> CliResult {
    let (p, planned) = plan(app, &a.pipeline, a.backend)?;
    // The process ends after printing: freeing a large pipeline's many small
    // allocations one by one would cost a tenth of the verb's time for nothing.
    std::mem::forget(p);
    app.remember(&a.pipeline);
    if a.json {
        let stages: Vec<serde_json::Value> = planned
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "status": p.status,
                    "key": p.key.map(|k| k.to_hex()),
                    "reasons": p.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                    "changes": p.reasons,
                })
            })
            .collect();
        let doc = serde_json::json!({ "pipeline": a.pipeline.to_string_lossy(), "stages": stages });
        out(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default()))?;
    } else {
        out(&render(&planned))?;
    }
    std::mem::forget(planned);
    Ok(ExitCode::SUCCESS)
}
