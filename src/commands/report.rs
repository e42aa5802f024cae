//! `fgflow report`: the pipeline's last run as a self-contained HTML page (see
//! `crate::report`), built from the cache alone.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::app::{App, CliResult, out};

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline file (default: the last one run or planned).
    #[arg(value_name = "PIPELINE")]
    pub pipeline: Option<PathBuf>,
    /// Directory to write `index.html` and its data files into (created if needed).
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(app: &App, a: Args) -> CliResult {
    let file = app.pipeline_or_last(a.pipeline)?;
    let p = app.load(&file)?;
    let page = crate::report::write(app, &p, None, &a.out)?;
    out(&format!("{}\n", page.display()))?;
    Ok(ExitCode::SUCCESS)
}
