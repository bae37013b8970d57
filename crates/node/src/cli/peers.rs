//! `pod peers`: the peers the running node knows.

use std::path::Path;

use anyhow::Result;
use clap::Args;

use super::node_client::{locate, require_api, DaemonArgs};
use super::terminal::printable;

#[derive(Debug, Args)]
pub(crate) struct PeersArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

pub(crate) fn exec(home: &Path, args: PeersArgs) -> Result<()> {
    let located = locate(home, &args.daemon)?;
    let body = require_api(&located)?.get_json(pod_api::paths::PEERS)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body["data"])?);
        return Ok(());
    }
    let rows = body["data"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no peers");
        return Ok(());
    }
    println!(
        "{:<52} {:<14} {:<20} {:>8} {:>10} {:>9}  MODELS",
        "PEER", "AGENT", "PATH", "RTT", "LOAD", "SEEN"
    );
    for p in rows {
        let mut models: Vec<String> = p["models"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // Pipeline stages: the blocks a pod serves of a model, after its name.
        for s in p["stages"].as_array().into_iter().flatten() {
            let (Some(name), Some(layers)) = (s["model"].as_str(), s["layers"].as_str()) else {
                continue;
            };
            let entry = format!(
                "{name} (blocks {layers} of {})",
                s["total_layers"].as_u64().unwrap_or(0)
            );
            match models.iter_mut().find(|m| *m == name) {
                Some(m) => *m = entry,
                None => models.push(entry),
            }
        }
        let rtt = p["rtt_ms"]
            .as_f64()
            .map_or("-".to_owned(), |ms| format!("{ms:.1}ms"));
        let load = if p["load"].is_object() {
            format!(
                "{}+{}q",
                p["load"]["active"].as_u64().unwrap_or(0),
                p["load"]["queued"].as_u64().unwrap_or(0)
            )
        } else {
            "-".to_owned()
        };
        // How the connection reaches the peer, and the hole punch's outcome when one was tried.
        let path = match (p["path"].as_str(), p["hole_punch"].as_str()) {
            (None, _) => "-".to_owned(),
            (Some(path), None) => printable(path).into_owned(),
            (Some(path), Some(punch)) => printable(&format!("{path} (punch {punch})")).into_owned(),
        };
        let seen = format!(
            "{:.1}s ago",
            p["last_seen_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        println!(
            "{:<52} {:<14} {:<20} {:>8} {:>10} {:>9}  {}",
            printable(p["peer_id"].as_str().unwrap_or("?")),
            printable(p["agent"].as_str().unwrap_or("-")),
            path,
            rtt,
            load,
            seen,
            if models.is_empty() {
                "-".to_owned()
            } else {
                printable(&models.join(", ")).into_owned()
            }
        );
    }
    Ok(())
}
