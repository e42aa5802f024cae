//! `fgflow kinds`: every registered stage kind with its parameters and ports.

use std::process::ExitCode;

use fgflow_engine::Params;

use crate::app::{App, CliResult, out};

pub fn run(app: &App) -> CliResult {
    let mut s = String::new();
    for k in app.registry.iter() {
        s.push_str(&format!("{} (v{}): {}\n", k.name(), k.version(), k.summary()));
        for p in k.params() {
            let default = p.default.as_ref().map(|d| format!(" = {d}")).unwrap_or_else(|| " (required)".into());
            s.push_str(&format!("  param  {}: {}{default}  {}\n", p.name, p.ty, p.doc));
        }
        for p in k.inputs() {
            s.push_str(&format!("  input  {}: {}{}{}  {}\n", p.name, p.ty, if p.many { " (list)" } else { "" }, if p.optional { " (optional)" } else { "" }, p.doc));
        }
        for p in k.outputs(&Params::default()) {
            s.push_str(&format!("  output {}: {}  {}\n", p.name, p.ty, p.doc));
        }
    }
    out(&s)?;
    Ok(ExitCode::SUCCESS)
}
