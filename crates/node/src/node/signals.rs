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

/// Under systemd (`Type=notify`), a first start may spend minutes downloading models: keeps
/// extending the start timeout until aborted.
pub(super) async fn extend_start_timeout() {
    let mut tick = tokio::time::interval(Duration::from_secs(20));
    loop {
        tick.tick().await;
        notify_systemd(&[sd_notify::NotifyState::ExtendTimeoutUsec(60_000_000)]);
    }
}
