//! `pod stop`: SIGTERM to the running node, once it is sure the pid is that node.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use pod_node::daemon_file::{DaemonFile, Liveness};

use super::node_client::Api;

#[derive(Debug, Args)]
pub(crate) struct StopArgs {
    /// Seconds to wait for the node to exit (it first lets in-flight requests finish, for its
    /// --shutdown-grace).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    timeout: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(home: &Path, args: StopArgs) -> Result<()> {
    let d = DaemonFile::read(home).ok_or_else(|| {
        anyhow!(
            "no pod is running (no {})",
            DaemonFile::path(home).display()
        )
    })?;
    if d.liveness() != Liveness::Running {
        DaemonFile::remove_stale(home);
        bail!(
            "no pod is running (process {} recorded in {} has exited)",
            d.pid,
            DaemonFile::path(home).display()
        );
    }
    // Make sure the pid is that node before signalling it: its API must answer with the
    // recorded PeerId. Without an API (or when it does not answer), the process start time in
    // daemon.json must match, which rules out a reused pid.
    let api_check = d.api.as_deref().map(|url| {
        let api = Api::new(url, std::env::var("POD_API_KEY").ok());
        match api.get(pod_api::paths::NODE) {
            Ok((200, text)) => {
                let node: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if node["peer_id"] == d.peer_id.as_str() {
                    Ok(())
                } else {
                    Err(format!(
                        "{url} answers as {}, not as {} recorded in daemon.json",
                        node["peer_id"], d.peer_id
                    ))
                }
            }
            Ok((status, _)) => Err(format!("{url} answers {status}")),
            Err(e) => Err(e.to_string()),
        }
    });
    match api_check {
        Some(Ok(())) => {}
        _ if d.process_start.is_some() => {}
        Some(Err(e)) => bail!("not stopping pid {}: {e}", d.pid),
        None => bail!(
            "not stopping pid {}: it has no API to confirm it is the pod of {}",
            d.pid,
            home.display()
        ),
    }
    let started = Instant::now();
    d.terminate().map_err(|e| {
        anyhow!(
            "cannot signal pid {}: {e}{}",
            d.pid,
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (it runs as another user: use sudo, or `systemctl stop pod` for the service)"
            } else {
                ""
            }
        )
    })?;
    let deadline = started + Duration::from_secs(args.timeout);
    while d.liveness() == Liveness::Running {
        if Instant::now() >= deadline {
            bail!(
                "pod (pid {}) did not stop within {} s; it may still be finishing requests",
                d.pid,
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "stopped": true,
                "pid": d.pid,
                "peer_id": d.peer_id,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "stopped pod {} (pid {}) in {seconds:.1} s",
            d.peer_id, d.pid
        );
    }
    Ok(())
}
