//! Progress for long downloads and loads: a bar on a terminal, log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

/// Bytes every [`Progress`] of this process has recorded: what a starting node's downloads
/// have moved so far, which decides whether systemd gives its start more time.
static BYTES_MOVED: AtomicU64 = AtomicU64::new(0);

/// The bytes all tasks of this process have recorded done so far; it only grows.
pub fn bytes_moved() -> u64 {
    BYTES_MOVED.load(Ordering::Relaxed)
}

/// Byte progress of one task.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    logged_quarter: AtomicU64,
}

impl Progress {
    /// Starts reporting `label`; the total grows as sources learn their sizes.
    pub fn bytes(label: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_owned());
            bar
        });
        Self {
            bar,
            label: label.to_owned(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            logged_quarter: AtomicU64::new(0),
        }
    }

    /// Adds to the expected total.
    pub fn grow(&self, n: u64) {
        let total = self.total.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// Records `n` more bytes done.
    pub fn inc(&self, n: u64) {
        BYTES_MOVED.fetch_add(n, Ordering::Relaxed);
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let total = self.total.load(Ordering::Relaxed);
        if let Some(quarter) = (done * 4).checked_div(total).map(|q| q.min(4)) {
            if quarter > self.logged_quarter.swap(quarter, Ordering::Relaxed) && quarter < 4 {
                tracing::info!(task = %self.label, done, total, "{}% done", quarter * 25);
            }
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
