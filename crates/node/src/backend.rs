//! The API's backend in a node: the local engine, plus the mesh for `/pod/v1/*`.

use std::time::{Duration, Instant};

use pod_api::node::{NodeView, PeerLoad, PeerView};
use pod_api::{Backend, Generation, LocalBackend, ModelEntry};
use pod_inference::{EmbedRequest, EmbedResponse, EngineError, GenerateRequest};

use crate::mesh::{self, PeerSnapshot};
use crate::profile::Profile;

/// What the node's API talks to.
#[derive(Debug, Clone)]
pub struct NodeBackend {
    local: LocalBackend,
    mesh: mesh::Client,
    profile: Profile,
    started: Instant,
}

impl NodeBackend {
    /// A backend over the local engine and the mesh.
    pub fn new(local: LocalBackend, mesh: mesh::Client, profile: Profile) -> Self {
        Self {
            local,
            mesh,
            profile,
            started: Instant::now(),
        }
    }

    /// The local engine's backend.
    pub fn local(&self) -> &LocalBackend {
        &self.local
    }
}

impl Backend for NodeBackend {
    fn models(&self) -> Vec<ModelEntry> {
        self.local.models()
    }

    fn is_ready(&self) -> bool {
        self.local.is_ready()
    }

    fn load(&self) -> (usize, usize) {
        self.local.load()
    }

    async fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        self.local.generate(req).await
    }

    async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse, EngineError> {
        self.local.embed(req).await
    }

    async fn node(&self) -> Option<NodeView> {
        let info = self.mesh.node_info().await.ok()?;
        Some(NodeView {
            peer_id: info.peer_id.to_string(),
            agent: info.agent,
            profile: self.profile.to_string(),
            listen_addrs: info.listen_addrs.iter().map(ToString::to_string).collect(),
            external_addrs: info
                .external_addrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            nat_status: info.nat_status,
            connected_peers: info.connected_peers,
            known_peers: info.known_peers,
            uptime_seconds: self.started.elapsed().as_secs(),
        })
    }

    async fn peers(&self) -> Option<Vec<PeerView>> {
        let peers = self.mesh.peers().await.ok()?;
        Some(peers.into_iter().map(peer_view).collect())
    }
}

/// A peer-table row as the API shows it.
pub fn peer_view(p: PeerSnapshot) -> PeerView {
    let caps = p.capabilities;
    PeerView {
        peer_id: p.peer_id.to_string(),
        agent: p.agent.or_else(|| caps.as_ref().map(|c| c.agent.clone())),
        addrs: p.addrs.iter().map(ToString::to_string).collect(),
        connected: p.connected,
        rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
        profile: caps.as_ref().map(|c| c.profile.clone()),
        models: caps.as_ref().map(|c| c.models.clone()).unwrap_or_default(),
        load: caps.as_ref().map(|c| PeerLoad {
            queued: c.load.queued,
            active: c.load.active,
            max_active: c.load.max_active,
        }),
        device: caps.as_ref().map(|c| c.hardware.device.clone()),
        api_ready: caps.as_ref().and_then(|c| c.api.as_ref().map(|a| a.ready)),
        last_seen_ms: u64::try_from(p.last_seen_ago.as_millis()).unwrap_or(u64::MAX),
    }
}

/// How often the node refreshes what it announces (the mesh publishes only changes, and
/// re-announces on its own period).
pub const ANNOUNCE_REFRESH: Duration = Duration::from_millis(500);
