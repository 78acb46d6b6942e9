//! Progress bars on stderr; hidden with `--quiet` or when stderr is not a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// Draws one bar per phase reported by library code.
pub struct BarReporter {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl Default for BarReporter {
    fn default() -> Self {
        BarReporter {
            bar: Mutex::new(None),
            enabled: !crate::printer::quiet() && std::io::stderr().is_terminal(),
        }
    }
}

impl BarReporter {
    pub fn start(&self, label: &str, total: u64) {
        if !self.enabled {
            return;
        }
        let bar = if total > 0 {
            ProgressBar::new(total)
        } else {
            ProgressBar::new_spinner()
        };
        let style = if total > 0 {
            ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg} ({per_sec})")
        } else {
            ProgressStyle::with_template("{prefix:>14} {spinner} {pos} {msg}")
        };
        if let Ok(s) = style {
            bar.set_style(s.progress_chars("=> "));
        }
        bar.set_prefix(label.to_string());
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.replace(bar) {
                old.finish_and_clear();
            }
        }
    }

    pub fn advance(&self, n: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(n);
            }
        }
    }

    pub fn message(&self, msg: String) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.set_message(msg);
            }
        }
    }

    pub fn done(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

impl crate::bench::measure::Progress for BarReporter {
    fn phase(&self, label: &str, total: u64) {
        self.start(label, total)
    }
    fn inc(&self, n: u64) {
        self.advance(n)
    }
    fn finish(&self) {
        self.done()
    }
}

impl crate::distill::train::Progress for BarReporter {
    fn phase(&self, label: &str, total: u64) {
        self.start(label, total)
    }
    fn advance(&self, samples: u64) {
        BarReporter::advance(self, samples)
    }
    fn status(&self, loss: f64, acc: f64, samples_per_s: f64) {
        self.message(format!(
            "loss {loss:.4}  acc {:.1}%  {samples_per_s:.0} samples/s",
            acc * 100.0
        ))
    }
    fn finish(&self) {
        self.done()
    }
}
