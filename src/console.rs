//! The terminal observer of a run: one line per stage as it settles (ran with why,
//! reused, failed with its log, skipped), a progress bar per long stage on stderr.
//! With `--json` it stays silent on stdout and the report is printed at the end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fgflow_engine::{Event, Observer, ProgressSink};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Console {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    why: Mutex<HashMap<String, String>>,
    /// Print stage lines (false for --json, which prints one object at the end).
    lines: bool,
    width: usize,
}

impl Console {
    pub fn new(lines: bool, width: usize) -> Console {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        Console { multi, bars: Mutex::new(HashMap::new()), why: Mutex::new(HashMap::new()), lines, width }
    }

    fn line(&self, s: String) {
        if !self.lines {
            return;
        }
        // Through the progress bars, so lines never tear a bar; plain stdout when hidden.
        if self.multi.is_hidden() {
            println!("{s}");
        } else {
            let _ = self.multi.println(s);
        }
    }

    fn finish_bar(&self, stage: &str) {
        if let Some(bar) = self.bars.lock().unwrap_or_else(|e| e.into_inner()).remove(stage) {
            bar.finish_and_clear();
        }
    }
}

pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 { format!("{:.0}ms", s * 1000.0) } else { format!("{s:.1}s") }
}

impl ProgressSink for Console {
    fn progress(&self, stage: &str, done: u64, total: u64, message: &str) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(stage.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "),
            );
            bar.set_prefix(stage.to_string());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(message.to_string());
    }
}

impl Observer for Console {
    fn event(&self, event: &Event) {
        let w = self.width;
        match event {
            Event::Started { stage, reasons, .. } => {
                let why = reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; ");
                self.why.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.clone(), why);
            }
            Event::Reused { stage, key, by_other_process } => {
                let note = if *by_other_process { "  (just produced by another fgflow process)" } else { "" };
                self.line(format!("  reused   {stage:<w$}  {}{note}", key.short()));
            }
            Event::Ran { stage, key, duration, outputs_unchanged } => {
                self.finish_bar(stage);
                let note = if *outputs_unchanged { "  [outputs unchanged: dependents reuse their results]" } else { "" };
                let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).remove(stage).unwrap_or_default();
                self.line(format!("  ran      {stage:<w$}  {}  {:>6}  ({why}){note}", key.short(), secs(*duration)));
            }
            Event::Failed { stage, error, log, .. } => {
                self.finish_bar(stage);
                self.line(format!("  FAILED   {stage:<w$}  {error}"));
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                for l in tail.into_iter().rev() {
                    self.line(format!("           | {l}"));
                }
            }
            Event::Skipped { stage, because } => self.line(format!("  skipped  {stage:<w$}  {because}")),
        }
    }
}

