//! Flushing a partial file to disk while its download goes on.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes written to a partial file after which they are flushed to disk in the background.
const WRITEBACK_BYTES: u64 = 16 * 1024 * 1024;

/// Flushes a partial file to disk while its download goes on, every [`WRITEBACK_BYTES`], so
/// that the disk writes in parallel with the transfer and the final `fsync` only waits for the
/// last few chunks instead of the whole file.
#[derive(Debug)]
pub(super) struct Writeback {
    file: Arc<File>,
    /// Bytes written since the last flush started.
    unflushed: AtomicU64,
    /// A flush is running: at most one at a time.
    flushing: Arc<AtomicBool>,
}

impl Writeback {
    pub(super) fn new(file: Arc<File>) -> Self {
        Self {
            file,
            unflushed: AtomicU64::new(0),
            flushing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts `bytes` written; starts a flush on the blocking pool when enough are waiting
    /// and none runs. A failed flush is left to the final `fsync` to report.
    pub(super) fn landed(&self, bytes: u64) {
        let waiting = self.unflushed.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if waiting < WRITEBACK_BYTES || self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.unflushed.fetch_sub(waiting, Ordering::Relaxed);
        let file = Arc::clone(&self.file);
        let flushing = Arc::clone(&self.flushing);
        tokio::task::spawn_blocking(move || {
            let _ = file.sync_data();
            flushing.store(false, Ordering::Release);
        });
    }
}
