//! The terminal observer of a run: one line per stage as it settles (ran with why,
//! reused, failed with its log, skipped), a progress bar per long stage on stderr, and
//! where stderr is not a terminal (no bars) one line per state change of a cluster job.
//! With `--json` it stays silent on stdout and the report is printed at the end.
//!
//! Also the one place that makes user-controlled text printable: [`esc`] (names,
//! values, paths, messages) and [`esc_block`] (whole outputs) escape control
//! characters, so a stage name with ESC or a newline cannot drive the terminal.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fgflow_engine::{Event, Observer, ProgressSink};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A reason longer than this (a changed 50 MB value) is cut in `ran` lines.
pub const REASON_BYTES: usize = 500;

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
        // Warnings about a damaged cache go through the bars too (stderr when hidden).
        let sink = multi.clone();
        fgflow_cache::damage::set_warning_sink(Box::new(move |w| {
            if sink.is_hidden() {
                eprintln!("{w}");
            } else {
                let _ = sink.println(w);
            }
        }));
        Console { multi, bars: Mutex::new(HashMap::new()), why: Mutex::new(HashMap::new()), lines, width }
    }

    fn line(&self, s: String) {
        if !self.lines {
            return;
        }
        let s = esc_block(&s).into_owned();
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

/// A user-controlled string (stage name, value, path, message from a file or a stage)
/// made inert: control characters (newline and ESC included) written as escapes
/// (`\n`, `\u{1b}`).
pub fn esc(s: &str) -> Cow<'_, str> {
    fgflow_engine::diagnostic::printable(s)
}

/// A block of output: like [`esc`] line by line, keeping its newlines.
pub fn esc_block(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && fgflow_engine::diagnostic::needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(|l| esc(l)).collect::<Vec<_>>().join("\n"))
}

/// [`esc`], then at most `max` bytes with `… (N bytes)`: for values in listings.
pub fn shown(s: &str, max: usize) -> String {
    fgflow_engine::diagnostic::shown(s, max)
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
            bar.set_prefix(esc(stage).into_owned());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(shown(message, 200));
    }
}

/// One line per state change of a cluster job, for logs (stderr not a terminal, so no
/// progress bar shows it): `stage train: job 123 RUNNING`.
pub fn job_line(stage: &str, job: u64, state: &str, detail: &str) -> String {
    let sep = if detail.is_empty() { "" } else { " " };
    format!("stage {}: job {job} {}{sep}{}", esc(stage), esc(state), esc(detail))
}

impl Observer for Console {
    fn job_state(&self, stage: &str, job: u64, state: &str, detail: &str) {
        if self.multi.is_hidden() {
            // On stderr, where the bars would be: stdout keeps its stage lines (or JSON).
            eprintln!("{}", job_line(stage, job, state, detail));
        } else {
            self.progress(stage, 0, 1, &fgflow_engine::exec::job_message(job, state, detail));
        }
    }

    fn event(&self, event: &Event) {
        let w = self.width;
        match event {
            Event::Started { stage, reasons, .. } => {
                let why = reasons.iter().map(|r| shown(&r.to_string(), REASON_BYTES)).collect::<Vec<_>>().join("; ");
                self.why.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.clone(), why);
            }
            Event::Reused { stage, key, by_other_process } => {
                let note = if *by_other_process { "  (just produced by another fgflow process)" } else { "" };
                self.line(format!("  reused   {:<w$}  {}{note}", esc(stage), key.short()));
            }
            Event::Ran { stage, key, duration, outputs_unchanged } => {
                self.finish_bar(stage);
                let note = if *outputs_unchanged { "  [outputs unchanged: dependents reuse their results]" } else { "" };
                let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).remove(stage).unwrap_or_default();
                self.line(format!("  ran      {:<w$}  {}  {:>6}  ({why}){note}", esc(stage), key.short(), secs(*duration)));
            }
            Event::Failed { stage, error, log, .. } => {
                self.finish_bar(stage);
                self.line(format!("  FAILED   {:<w$}  {}", esc(stage), shown(error, 4000)));
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                for l in tail.into_iter().rev() {
                    self.line(format!("           | {}", shown(l, 4000)));
                }
            }
            Event::Skipped { stage, because } => self.line(format!("  skipped  {:<w$}  {}", esc(stage), esc(because))),
        }
    }
}

/// Width of a column of names: the widest, escaped, but at most 64 characters (a longer
/// name overflows its column rather than widening every row; `format!` also panics on
/// widths over 65535, and names in a damaged cache are unbounded).
pub fn column_width<'a>(names: impl Iterator<Item = &'a str>, min: usize) -> usize {
    names.map(|n| esc(n).chars().count()).max().unwrap_or(min).clamp(min, 64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_lines_are_plain_and_escaped() {
        assert_eq!(super::job_line("train", 123, "RUNNING", ""), "stage train: job 123 RUNNING");
        assert_eq!(super::job_line("bad", 7, "FAILED", "(exit code 1)"), "stage bad: job 7 FAILED (exit code 1)");
        assert!(!super::job_line("a\u{1b}[2J", 1, "PENDING", "").contains('\u{1b}'));
    }
}
