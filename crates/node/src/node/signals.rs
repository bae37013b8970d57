//! What the node hears from and tells whatever supervises it: ctrl-c and SIGTERM, and
//! systemd's notify protocol (`Type=notify` units).

use std::time::Duration;

/// Tells systemd about the service's state; a no-op outside a `Type=notify` unit.
pub(super) fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// How often a starting node looks at its downloads to decide whether to extend systemd's
/// start timeout.
const EXTEND_EVERY: Duration = Duration::from_secs(20);
/// How far past each look an extension reaches: a download may stall for a while (a slow
/// mirror, a peer that went away) and still get its next extension.
const EXTEND_BY: Duration = Duration::from_secs(90);

/// Whether a starting node's downloads moved since the last look. systemd's `TimeoutStartSec`
/// holds in any case; an extension (`EXTEND_TIMEOUT_USEC`) only lets a start outlast it, so a
/// start that downloads nothing, or whose download stalled, still times out.
#[derive(Debug)]
pub(super) struct DownloadWatch {
    /// Bytes moved at the last look.
    last: u64,
}

impl DownloadWatch {
    /// Starts watching a counter of bytes moved that stands at `moved` now.
    pub(super) fn new(moved: u64) -> Self {
        Self { last: moved }
    }

    /// Whether to extend the start timeout at a look where the counter stands at `moved`:
    /// only when bytes moved since the previous look.
    pub(super) fn should_extend(&mut self, moved: u64) -> bool {
        let progressed = moved > self.last;
        self.last = self.last.max(moved);
        progressed
    }
}

/// Under systemd (`Type=notify`), a first start may spend a long time downloading models:
/// while `moved` (bytes downloaded so far) grows, keeps extending the start timeout past
/// `TimeoutStartSec`, by [`EXTEND_BY`] from each look; runs until aborted.
pub(super) async fn extend_start_timeout(moved: impl Fn() -> u64) {
    let mut watch = DownloadWatch::new(moved());
    let first = tokio::time::Instant::now() + EXTEND_EVERY;
    let mut tick = tokio::time::interval_at(first, EXTEND_EVERY);
    loop {
        tick.tick().await;
        if watch.should_extend(moved()) {
            let usec = u32::try_from(EXTEND_BY.as_micros()).unwrap_or(u32::MAX);
            notify_systemd(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extends_only_after_bytes_moved() {
        let mut watch = DownloadWatch::new(100);
        assert!(!watch.should_extend(100), "nothing moved since the start");
        assert!(watch.should_extend(101));
        assert!(!watch.should_extend(101), "stalled");
        assert!(!watch.should_extend(101), "still stalled");
        assert!(watch.should_extend(5_000_000), "moving again");
        // A counter never runs backwards; if one did, that would not be progress.
        assert!(!watch.should_extend(7));
        assert!(!watch.should_extend(5_000_000));
        assert!(watch.should_extend(5_000_001));
    }
}
