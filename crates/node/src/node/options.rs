//! How to run a node: what `pod start` resolved from its flags, `config.toml` and the
//! environment, and the checks that refuse unsafe settings before anything binds.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use pod_api::{ApiConfig, ApiKeys};
use pod_inference::{EngineConfig, Placement};

use super::NodeError;
use crate::access::Access;
use crate::backend::Route;
use crate::identity::Identity;
use crate::mesh::MeshConfig;
use crate::profile::Profile;
use crate::stage::placement::StageLayers;

/// How to run a node.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The node's identity; its PeerId names the node in responses.
    pub identity: Identity,
    /// Capabilities.
    pub profile: Profile,
    /// Models to load instead of the profile's defaults (empty: the defaults).
    pub models: Vec<String>,
    /// Serve the HTTP API (false: mesh and serving peers only).
    pub api: bool,
    /// Address the API binds.
    pub api_host: IpAddr,
    /// Port the API binds (0: any free port).
    pub api_port: u16,
    /// Accepted API keys.
    pub api_keys: ApiKeys,
    /// Allow binding a non-loopback address without keys.
    pub public_api: bool,
    /// Web origins whose pages may call the API from a browser (`*`: any); empty: none.
    pub cors_origins: Vec<String>,
    /// The opened compute device models are loaded on.
    pub placement: Placement,
    /// The device models run on, e.g. `cpu`, `rocm:0` or `cuda:0`, for announcements and
    /// `pod status`; `none` without models.
    pub device_name: String,
    /// The blocks of the (single) model this node serves as a pipeline stage, or `auto`;
    /// `None`: whole models.
    pub layers: Option<StageLayers>,
    /// Bytes a stage with `--layers auto` may fill (`None`: what the system has available).
    pub max_memory: Option<u64>,
    /// Engine limits.
    pub engine: EngineConfig,
    /// Pull missing catalogued models.
    pub pull: bool,
    /// How long in-flight requests may run after a stop signal.
    pub grace: Duration,
    /// The mesh's addresses, bootstrap peers and limits.
    pub mesh: MeshConfig,
    /// State directory; the running daemon's address is written to `daemon.json` there.
    pub home: PathBuf,
    /// Serve this node's models to peers (false: only to its own API).
    pub serve_mesh: bool,
    /// Where API requests go: local models, peers, or both.
    pub route: Route,
    /// Bytes per second each peer may pull model files at (0: no limit).
    pub serve_rate: u64,
    /// Where to listen for bulk connections when serving files (see [`crate::blob`]'s
    /// documentation): the IPs, and the port of the first (0: any free one). Empty: none.
    pub bulk_listen: Vec<std::net::SocketAddr>,
    /// Pull from peers over their bulk connections where offered.
    pub pull_bulk: bool,
    /// Which peers may run inference on this node and pull its model files.
    pub access: Access,
}

impl StartOptions {
    /// Refuses unsafe or contradictory settings.
    pub fn check(&self) -> Result<(), NodeError> {
        if let Some(range) = self.layers {
            if self.models.len() != 1 {
                return Err(NodeError::Refused(format!(
                    "--layers {range} serves blocks of one model: give exactly one --model"
                )));
            }
        }
        check_api_exposure(self.api, self.api_host, &self.api_keys, self.public_api)?;
        self.api_config(String::new())
            .check()
            .map_err(|e| NodeError::Refused(e.to_string()))
    }

    /// The API's settings, naming the node `node_name`.
    pub(crate) fn api_config(&self, node_name: String) -> ApiConfig {
        ApiConfig {
            keys: self.api_keys.clone(),
            node_name,
            cors_origins: self.cors_origins.clone(),
            ..ApiConfig::default()
        }
    }
}

/// Refuses an API open to the network without keys unless `public` says so; `pod start
/// --dry-run` runs the same check.
pub fn check_api_exposure(
    api: bool,
    host: IpAddr,
    keys: &ApiKeys,
    public: bool,
) -> Result<(), NodeError> {
    if api && !host.is_loopback() && keys.is_empty() && !public {
        return Err(NodeError::Refused(format!(
            "refusing to serve the API on {host} without API keys; pass --api-key-file, or --public-api to serve it open"
        )));
    }
    Ok(())
}
