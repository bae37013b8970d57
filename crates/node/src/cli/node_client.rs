//! Reaching the node that runs with this state directory (or the one `--api` names) over its
//! HTTP API.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use pod_node::daemon_file::{DaemonFile, Liveness};

/// How commands reach the running node.
#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// Base URL of a node's API. Default: the address the node running with this state
    /// directory recorded in its daemon.json.
    #[arg(long, value_name = "URL", env = "POD_API")]
    pub(crate) api: Option<String>,
    /// API key, if the node requires one.
    #[arg(long, value_name = "KEY", env = "POD_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
}

/// A client of a node's HTTP API.
#[derive(Debug)]
pub(crate) struct Api {
    /// The API's base URL, without a trailing `/`.
    pub(crate) base: String,
    /// The key sent as `Authorization: Bearer`.
    pub(crate) key: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    pub(crate) fn new(base: &str, key: Option<String>) -> Api {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build(),
        );
        Api {
            base: base.trim_end_matches('/').to_owned(),
            key,
            agent,
        }
    }

    /// GET `path`: the status and the body.
    pub(crate) fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut res = req
            .call()
            .map_err(|e| anyhow!("no pod answers at {} ({e})", self.base))?;
        let text = res
            .body_mut()
            .read_to_string()
            .with_context(|| format!("cannot read the answer of {}{path}", self.base))?;
        Ok((res.status().as_u16(), text))
    }

    /// GET `path` as JSON; a non-2xx status is an error carrying the API's message.
    pub(crate) fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, text) = self.get(path)?;
        let url = format!("{}{path}", self.base);
        let body: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
        if !(200..300).contains(&status) {
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            bail!("{url}: {status} {msg}");
        }
        Ok(body)
    }
}

/// The node this state directory's `daemon.json` names, or the one `--api` names.
#[derive(Debug)]
pub(crate) struct Located {
    /// Its API; `None` for a node running with `--no-api`.
    pub(crate) api: Option<Api>,
    /// Its `daemon.json`, when it is the node running with this state directory.
    pub(crate) daemon: Option<DaemonFile>,
}

pub(crate) fn locate(home: &Path, args: &DaemonArgs) -> Result<Located> {
    let recorded = DaemonFile::read(home).filter(|d| d.liveness() == Liveness::Running);
    if let Some(url) = &args.api {
        let same = |d: &DaemonFile| {
            d.api
                .as_deref()
                .is_some_and(|a| a.trim_end_matches('/') == url.trim_end_matches('/'))
        };
        return Ok(Located {
            api: Some(Api::new(url, args.api_key.clone())),
            daemon: recorded.filter(same),
        });
    }
    let d = running_daemon(home)?;
    Ok(Located {
        api: d.api.as_deref().map(|a| Api::new(a, args.api_key.clone())),
        daemon: Some(d),
    })
}

/// The `daemon.json` of the node running with this state directory; "no pod is running"
/// when there is none or it is stale.
pub(crate) fn running_daemon(home: &Path) -> Result<DaemonFile> {
    let path = DaemonFile::path(home);
    let Some(d) = DaemonFile::read(home) else {
        bail!(
            "no pod is running (no {}); start one with `pod start`, or pass --api URL for a pod elsewhere",
            path.display()
        );
    };
    match d.liveness() {
        Liveness::Running => Ok(d),
        Liveness::Exited | Liveness::Replaced => bail!(
            "no pod is running (process {} recorded in {} has exited)",
            d.pid,
            path.display()
        ),
    }
}

/// The node's API, or an error saying it has none.
pub(crate) fn require_api(located: &Located) -> Result<&Api> {
    located.api.as_ref().ok_or_else(|| {
        anyhow!(
            "the pod running here (pid {}) has no HTTP API (--no-api)",
            located.daemon.as_ref().map_or(0, |d| d.pid)
        )
    })
}

/// Sums the samples of metric `name` whose labels pass `keep`, in Prometheus text format.
pub(crate) fn metric_sum(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && keep(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}
