//! `pod status`: the running node's uptime, profile, models, peers, requests and device.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;

use super::node_client::{locate, metric_sum, DaemonArgs};
use super::terminal::printable;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

pub(crate) fn exec(home: &Path, args: StatusArgs) -> Result<()> {
    let located = locate(home, &args.daemon)?;
    let daemon = located.daemon.as_ref();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = serde_json::json!({
        "running": true,
        "pid": daemon.map(|d| d.pid),
        "api": located.api.as_ref().map(|a| &a.base),
        "device": daemon.map(|d| &d.device).filter(|d| !d.is_empty()),
    });
    match &located.api {
        None => {
            let d = daemon.context("a pod without an API has a daemon.json")?;
            out["peer_id"] = d.peer_id.clone().into();
            out["version"] = format!("pod/{}", d.version).into();
            out["profile"] = d.profile.clone().into();
            out["uptime_seconds"] = now.saturating_sub(d.started_at).into();
        }
        Some(api) => {
            let (health, _) = api.get(pod_api::paths::HEALTH)?;
            let node = api.get_json(pod_api::paths::NODE)?;
            let models = api.get_json(pod_api::paths::MODELS)?;
            let (_, metrics) = api.get(pod_api::paths::METRICS)?;
            let peer_id = node["peer_id"].as_str().unwrap_or_default();
            if daemon.is_some_and(|d| d.peer_id != peer_id) {
                out["pid"] = serde_json::Value::Null;
                out["device"] = serde_json::Value::Null;
            }
            let models: Vec<serde_json::Value> = models["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    serde_json::json!({
                        "name": m["id"],
                        "kind": m["kind"],
                        "local": m["owned_by"] == peer_id,
                        "providers": m["providers"],
                    })
                })
                .collect();
            let generation = |labels: &str| {
                ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
                    .iter()
                    .any(|r| labels.contains(&format!("route=\"{r}\"")))
                    && labels.contains("status=\"2")
            };
            out["ready"] = (health == 200).into();
            out["peer_id"] = node["peer_id"].clone();
            out["version"] = node["agent"].clone();
            out["profile"] = node["profile"].clone();
            if let Some(why) = node.get("device_fallback").filter(|v| v.is_string()) {
                out["device_fallback"] = why.clone();
            }
            out["uptime_seconds"] = node["uptime_seconds"].clone();
            out["models"] = models.into();
            out["peers"] = serde_json::json!({
                "connected": node["connected_peers"],
                "known": node["known_peers"],
            });
            out["requests"] = serde_json::json!({
                "queued": metric_sum(&metrics, "pod_queue_depth", |_| true),
                "active": metric_sum(&metrics, "pod_active_sequences", |_| true),
                "served": metric_sum(&metrics, "pod_http_requests_total", generation),
            });
            out["tokens"] = serde_json::json!({
                "prompt": metric_sum(&metrics, "pod_prompt_tokens_total", |_| true),
                "completion": metric_sum(&metrics, "pod_completion_tokens_total", |_| true),
            });
            out["nat_status"] = node["nat_status"].clone();
            out["relays"] = node["relays"].clone();
            out["reachability"] = reachability(&node["nat_status"], &node["relays"]).into();
            out["listen_addrs"] = node["listen_addrs"].clone();
            out["stages"] = node["stages"].clone();
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    // Model names and relay addresses come from peers: printed without terminal controls.
    let s = |v: &serde_json::Value| printable(v.as_str().unwrap_or("-")).into_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "pod       {}{}, {}, up {}",
        s(&out["peer_id"]),
        out["pid"]
            .as_u64()
            .map_or(String::new(), |p| format!(" (pid {p})")),
        match out["ready"].as_bool() {
            Some(true) => "ready",
            Some(false) => "loading models",
            None => "running",
        },
        human_duration(n(&out["uptime_seconds"]))
    );
    println!("version   {}", s(&out["version"]));
    println!(
        "api       {}",
        printable(out["api"].as_str().unwrap_or("none (--no-api)"))
    );
    println!("profile   {}", s(&out["profile"]));
    println!("device    {}", s(&out["device"]));
    if out["device_fallback"].is_string() {
        println!("          {}", s(&out["device_fallback"]));
    }
    if let Some(models) = out["models"].as_array() {
        let list: Vec<String> = models
            .iter()
            .map(|m| {
                let place = if m["local"] == true {
                    "here".to_owned()
                } else {
                    match n(&m["providers"]) {
                        1 => "1 peer".to_owned(),
                        p => format!("{p} peers"),
                    }
                };
                format!("{} ({}, {place})", s(&m["name"]), s(&m["kind"]))
            })
            .collect();
        println!(
            "models    {}",
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(", ")
            }
        );
        println!(
            "peers     {} connected, {} known",
            n(&out["peers"]["connected"]),
            n(&out["peers"]["known"])
        );
        println!("reach     {}", s(&out["reachability"]));
        for stage in out["stages"].as_array().into_iter().flatten() {
            let detail = if stage["role"] == "head" {
                let chain: Vec<String> = stage["chain"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(&s)
                    .collect();
                if chain.is_empty() {
                    "head; no chain planned yet".to_owned()
                } else {
                    format!("head; then {}", chain.join(", "))
                }
            } else {
                format!("stage; {} sequences held", n(&stage["sequences"]))
            };
            println!(
                "stage     {} blocks {} of {} ({detail})",
                s(&stage["model"]),
                s(&stage["layers"]),
                n(&stage["total_layers"])
            );
        }
        println!(
            "requests  {} queued, {} active, {} served",
            n(&out["requests"]["queued"]),
            n(&out["requests"]["active"]),
            n(&out["requests"]["served"])
        );
    }
    Ok(())
}

/// One line on whether peers can reach the node: `public`, or `private` and through which
/// relays, or why not.
fn reachability(nat_status: &serde_json::Value, relays: &serde_json::Value) -> String {
    let relays: Vec<&str> = relays
        .as_array()
        .map(|r| r.iter().filter_map(|r| r.as_str()).collect())
        .unwrap_or_default();
    match (nat_status.as_str(), relays.is_empty()) {
        (Some("public"), _) => "public: peers reach this node directly".to_owned(),
        (Some("private"), false) => format!(
            "private: peers reach this node through relay {}",
            relays.join(", ")
        ),
        (Some("private"), true) => {
            "private and not reachable: no relay holds a reservation for this node".to_owned()
        }
        _ => "unknown: no peer has checked whether this node is reachable yet".to_owned(),
    }
}

fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}
