//! Joining the mesh from a command (`--p2p`, `pod models pull`) with a throwaway identity,
//! and running requests on its peers over `/pod/infer` without a node of our own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use libp2p::Multiaddr;
use pod_inference::{GenerateEvent, GenerateRequest};
use pod_node::backend::PeerWatch;
use pod_node::daemon_file::{DaemonFile, Liveness};
use pod_node::mesh::mesh_key::read_mesh_key;
use pod_node::mesh::{self, is_quic, MeshConfig};
use pod_node::remote::client::{ClientConfig, InferClient};
use tokio::sync::mpsc::Receiver;

use super::node_client::Api;

/// The mesh as joined by a command.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The client of the mesh's event loop; the loop ends when its last clone is dropped.
    pub(crate) mesh: mesh::Client,
    /// The peers dialled on the way in; empty when only mDNS can find any.
    pub(crate) dialled: Vec<Multiaddr>,
}

/// The flag of the commands that join the mesh themselves.
#[derive(Debug, clap::Args)]
pub(crate) struct MeshKeyArg {
    /// When joining the mesh: the pre-shared key file of a private mesh (`pod start
    /// --mesh-key`); TCP only. Default: none, the open mesh.
    #[arg(long, value_name = "FILE", env = "POD_MESH_KEY")]
    pub(crate) mesh_key: Option<PathBuf>,
}

/// Joins the mesh with a throwaway identity, through `bootstrap`, the node running with this
/// state directory (if any) and, failing both, mDNS; with the key in `key`, a private mesh.
/// (A throwaway identity is trusted by no pod: pods that serve trusted peers only refuse it.)
pub(crate) async fn join_mesh(
    home: &Path,
    bootstrap: &[Multiaddr],
    key: &MeshKeyArg,
) -> Result<Joined> {
    let mesh_key = key.mesh_key.as_deref().map(read_mesh_key).transpose()?;
    let mut peers = bootstrap.to_vec();
    // The node running on this machine, if any, is the nearest way in.
    let local_api = DaemonFile::read(home)
        .filter(|d| d.liveness() == Liveness::Running)
        .and_then(|d| d.api);
    if let Some(api) = local_api {
        if let Ok(node) = Api::new(&api, None).get_json(pod_api::paths::NODE) {
            let id = node["peer_id"].as_str().unwrap_or_default();
            peers.extend(
                node["listen_addrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .filter_map(|a| format!("{a}/p2p/{id}").parse::<Multiaddr>().ok())
                    .filter(|a| mesh_key.is_none() || !is_quic(a)),
            );
        }
    }
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        listen_optional: Vec::new(),
        bootstrap: peers.clone(),
        mdns: peers.is_empty(),
        mesh_key,
        ..MeshConfig::default()
    };
    let key = libp2p::identity::Keypair::generate_ed25519();
    let (mesh, event_loop) = mesh::new(key, config)?;
    tokio::spawn(event_loop.run());
    Ok(Joined {
        mesh,
        dialled: peers,
    })
}

/// Runs requests on the best peer that serves the model, as a node's API does for models it
/// does not hold.
#[derive(Debug)]
pub(crate) struct MeshInfer {
    // Held so the mesh lives as long as the requests do.
    _mesh: mesh::Client,
    peers: PeerWatch,
    infer: InferClient,
    only_mdns: bool,
}

impl MeshInfer {
    /// Starts watching the joined mesh's peers (inside a tokio runtime).
    pub(crate) fn new(joined: Joined) -> Self {
        let peers = PeerWatch::start(joined.mesh.clone());
        let infer = InferClient::new(
            joined.mesh.streams(),
            joined.mesh.peer_id(),
            None,
            ClientConfig::default(),
            peers.providers(),
        );
        Self {
            _mesh: joined.mesh,
            peers,
            infer,
            only_mdns: joined.dialled.is_empty(),
        }
    }

    /// Waits until a peer announces `model`, for at most `wait` seconds.
    pub(crate) async fn wait_for_model(&self, model: &str, wait: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(wait);
        while !self.peers.serves(model) {
            if Instant::now() > deadline {
                bail!(
                    "no peer serving `{model}` found within {wait} s{}",
                    if self.only_mdns {
                        " (no --bootstrap peer and no local node; relying on mDNS)"
                    } else {
                        ""
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Starts `request` on the best peer: the peer's id and the events, which continue on
    /// another peer if the first one fails mid-answer.
    pub(crate) async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<(String, Receiver<GenerateEvent>)> {
        let (peer, events) = self.infer.generate(request).await?;
        Ok((peer.to_string(), events))
    }
}
