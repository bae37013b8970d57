//! The node's capability announcement, kept current while it runs: what peers route by.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pod_api::LocalBackend;
use pod_inference::EngineHandle;

use crate::access::Access;
use crate::backend::ANNOUNCE_REFRESH;
use crate::blob::BlobServer;
use crate::mesh::capability::{ApiInfo, HardwareSummary, Load};
use crate::mesh::{self, Capabilities};
use crate::profile::Profile;
use crate::stage::server::StageHost;

/// Keeps the node's capability announcement current: models, load, API readiness, and the
/// files it serves, and to whom.
pub(super) async fn announce(
    mesh: mesh::Client,
    engine: EngineHandle,
    api: LocalBackend,
    profile: Profile,
    (device, http_api): (String, bool),
    (blobs, stages): (Option<Arc<BlobServer>>, Arc<StageHost>),
    access: Access,
) {
    use pod_api::Backend as _;
    let hardware = HardwareSummary {
        device,
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: crate::profile::memory_bytes().unwrap_or(0),
    };
    let mut tick = tokio::time::interval(ANNOUNCE_REFRESH);
    loop {
        tick.tick().await;
        let stats = engine.stats();
        let caps = Capabilities {
            agent: mesh::agent_version(),
            profile: profile.to_string(),
            models: engine.models(),
            load: Load {
                queued: stats.queued.load(Ordering::Relaxed),
                active: stats.active.load(Ordering::Relaxed),
                max_active: engine.config().max_active,
            },
            hardware: hardware.clone(),
            // Peers route to nodes whose `api.ready` is set, over the mesh, whether or not the
            // node has an HTTP API; `version: none` says it has none.
            api: Some(ApiInfo {
                version: if http_api { "openai/v1" } else { "none" }.into(),
                ready: api.is_ready(),
            }),
            addrs: Vec::new(),
            files: blobs
                .as_ref()
                .map(|b| b.files().into_iter().map(|(sha, _)| sha).collect())
                .unwrap_or_default(),
            stages: stages.announcements(),
            serve_to: access.serve_to,
            trusted: access.announced(),
            seq: 0,
        };
        if mesh.announce(caps).await.is_err() {
            break;
        }
    }
}
