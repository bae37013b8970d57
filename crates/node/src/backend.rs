//! The API's backend in a node: the local engine for the models it holds, the mesh's peers
//! for the others (`/pod/infer/1.0.0`), and the mesh's views for `/pod/v1/*`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pod_api::node::{
    FileList, FileView, NodeView, PeerLoad, PeerView, PeerWork, ReceiptsPage, ReceiptsView,
    StageView, WorkTotals,
};
use pod_api::openai::{ModelPipeline, ModelStage};
use pod_api::{Backend, BlobTotals, Embeddings, Generation, LocalBackend, ModelEntry};
use pod_inference::model::stage::LayerRange;
use pod_inference::{EmbedRequest, EngineError, GenerateRequest};

use crate::blob::{BlobServer, BlobStats, ServedFile};
use crate::mesh::{self, ConnectionPath, HolePunch, PeerSnapshot};
use crate::profile::Profile;
use crate::receipts::Ledger;
use crate::remote::client::{ClientConfig, InferClient, Providers};
use crate::stage::coverage;
use crate::stage::server::StageHost;
use crate::stage::StageAnnouncement;

/// Where requests for a model go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// Local when this node holds the model, else the best peer.
    #[default]
    Auto,
    /// Only this node's models.
    Local,
    /// Only peers, even for models this node holds.
    Mesh,
}

/// The peer table as last read, shared by routing and model listings.
type PeerCache = Arc<RwLock<Vec<PeerSnapshot>>>;

/// What the node's API talks to.
#[derive(Debug, Clone)]
pub struct NodeBackend {
    local: LocalBackend,
    mesh: mesh::Client,
    profile: Profile,
    started: Instant,
    peers: PeerWatch,
    infer: InferClient,
    route: Route,
    ledger: Option<Arc<Ledger>>,
    blob_stats: Arc<BlobStats>,
    blobs: Option<Arc<BlobServer>>,
    device: String,
    device_fallback: Option<String>,
    stages: Arc<StageHost>,
}

impl NodeBackend {
    /// A backend over the local engine and the mesh; keeps a copy of the peer table fresh
    /// (spawns a task, so call it inside a tokio runtime).
    pub fn new(
        local: LocalBackend,
        mesh: mesh::Client,
        profile: Profile,
        ledger: Option<Arc<Ledger>>,
        route: Route,
    ) -> Self {
        let peers = PeerWatch::start(mesh.clone());
        let infer = InferClient::new(
            mesh.streams(),
            mesh.peer_id(),
            ledger.clone(),
            ClientConfig::default(),
            peers.providers(),
        );
        Self {
            local,
            mesh,
            profile,
            started: Instant::now(),
            peers,
            infer,
            route,
            ledger,
            blob_stats: Arc::default(),
            blobs: None,
            device: String::new(),
            device_fallback: None,
            stages: Arc::default(),
        }
    }

    /// The pipeline stages this node serves and fronts.
    pub fn with_stages(mut self, stages: Arc<StageHost>) -> Self {
        self.stages = stages;
        self
    }

    /// Names the device the local models run on, for `/pod/v1/node`, and, where `--device
    /// auto` fell back to the CPU, which devices it tried and why it used none.
    pub fn with_device(mut self, device: impl Into<String>, fallback: Option<String>) -> Self {
        self.device = device.into();
        self.device_fallback = fallback;
        self
    }

    /// Counts model-file transfers in `stats` and lists the files `server` serves (`None`:
    /// this node serves none).
    pub fn with_blobs(mut self, stats: Arc<BlobStats>, server: Option<Arc<BlobServer>>) -> Self {
        self.blob_stats = stats;
        self.blobs = server;
        self
    }

    /// The counters of model-file transfers.
    pub fn blob_stats(&self) -> &Arc<BlobStats> {
        &self.blob_stats
    }

    /// The local engine's backend.
    pub fn local(&self) -> &LocalBackend {
        &self.local
    }

    /// The mesh this backend routes through.
    pub fn mesh(&self) -> &mesh::Client {
        &self.mesh
    }

    /// The requesting side of remote inference.
    pub fn infer_client(&self) -> &InferClient {
        &self.infer
    }

    /// Every pipeline stage this node and its peers announce, with the pod serving it.
    fn announced_stages(&self) -> Vec<(String, StageAnnouncement)> {
        let local = self.peers.local.to_string();
        let mut all: Vec<(String, StageAnnouncement)> = self
            .stages
            .announcements()
            .into_iter()
            .map(|a| (local.clone(), a))
            .collect();
        if let Ok(peers) = self.peers.peers.read() {
            for p in peers.iter() {
                let Some(caps) = &p.capabilities else {
                    continue;
                };
                let peer = p.peer_id.to_string();
                all.extend(caps.stages.iter().map(|s| (peer.clone(), s.clone())));
            }
        }
        all
    }

    /// Whether this node serves `model` itself: it holds it, and if it holds only the first
    /// blocks (a pipeline head), no peer holding the whole model is free.
    fn holds(&self, model: &str) -> bool {
        if self.route == Route::Mesh || !self.local.models().iter().any(|m| m.info.name == model) {
            return false;
        }
        if self.stages.head(model).is_none() {
            return true;
        }
        let whole = self.peers.serves_whole(model);
        tracing::debug!(
            model,
            whole_model_peer = whole,
            "pipeline head: {}",
            if whole {
                "a peer holding the whole model is free; routing there"
            } else {
                "serving through the stages"
            }
        );
        !whole
    }
}

/// The stages of every model split across pods, by model name, from `announced`: each
/// stage's pod and what it announces.
fn pipelines(announced: Vec<(String, StageAnnouncement)>) -> BTreeMap<String, ModelPipeline> {
    let mut by_model: BTreeMap<String, Vec<(String, StageAnnouncement)>> = BTreeMap::new();
    for (peer, stage) in announced {
        by_model
            .entry(stage.model.clone())
            .or_default()
            .push((peer, stage));
    }
    by_model
        .into_iter()
        .map(|(model, mut stages)| {
            stages.sort_by(|(pa, a), (pb, b)| {
                (a.layers.start, a.layers.end, pa).cmp(&(b.layers.start, b.layers.end, pb))
            });
            // Only the stages of one file and one block count chain together.
            let chain_of = |sha256: &str, total: usize| {
                let ranges: Vec<LayerRange> = stages
                    .iter()
                    .filter(|(_, s)| s.sha256 == sha256 && s.total_layers == total)
                    .map(|(_, s)| s.layers)
                    .collect();
                coverage::chains(&ranges, total)
            };
            let complete = stages
                .iter()
                .any(|(_, s)| chain_of(&s.sha256, s.total_layers));
            let total_layers = stages
                .iter()
                .find(|(_, s)| !complete || chain_of(&s.sha256, s.total_layers))
                .map_or(0, |(_, s)| s.total_layers);
            let stages = stages
                .into_iter()
                .map(|(peer, s)| ModelStage {
                    peer,
                    layers: s.layers.to_string(),
                    sha256: s.sha256,
                })
                .collect();
            (
                model,
                ModelPipeline {
                    total_layers,
                    complete,
                    stages,
                },
            )
        })
        .collect()
}

/// The mesh's peer table, re-read a few times a second: what routing to peers needs, for a
/// node's backend and for commands that only talk to the mesh.
#[derive(Debug, Clone)]
pub struct PeerWatch {
    peers: PeerCache,
    /// This node: peers that do not serve it (`--serve-to trusted` elsewhere) are left out.
    local: PeerId,
}

impl PeerWatch {
    /// Starts re-reading `mesh`'s peer table until the mesh stops (spawns a task, so call it
    /// inside a tokio runtime).
    pub fn start(mesh: mesh::Client) -> Self {
        let peers: PeerCache = Arc::default();
        let local = mesh.peer_id();
        tokio::spawn(refresh_peers(mesh, Arc::clone(&peers)));
        Self { peers, local }
    }

    /// Ranks the peers for a model, best first, for an [`InferClient`].
    pub fn providers(&self) -> Providers {
        let ranking = Arc::clone(&self.peers);
        let local = self.local;
        Arc::new(move |model: &str, exclude: &[PeerId]| rank(&ranking, model, exclude, &local))
    }

    /// Whether a peer with a ready API that would serve this node announces `model`.
    pub fn serves(&self, model: &str) -> bool {
        !rank(&self.peers, model, &[], &self.local).is_empty()
    }

    /// Whether a connected peer with a ready API and a free slot holds all of `model`.
    pub fn serves_whole(&self, model: &str) -> bool {
        let Ok(peers) = self.peers.read() else {
            return false;
        };
        peers.iter().any(|p| {
            p.connected
                && p.capabilities.as_ref().is_some_and(|c| {
                    c.models.iter().any(|m| m.name == model)
                        && !is_head(c, model)
                        && c.serves(&self.local)
                        && c.api.as_ref().is_some_and(|a| a.ready)
                        && c.load.active + c.load.queued < c.load.max_active.max(1)
                })
        })
    }
}

/// Re-reads the peer table a few times a second until the mesh stops.
async fn refresh_peers(mesh: mesh::Client, cache: PeerCache) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Ok(peers) = mesh.peers().await else {
            return;
        };
        if let Ok(mut c) = cache.write() {
            *c = peers;
        }
    }
}

/// Whether `caps` announce only the first blocks of `model` (a pipeline head).
fn is_head(caps: &crate::mesh::Capabilities, model: &str) -> bool {
    caps.stages
        .iter()
        .any(|s| s.model == model && s.layers.start == 0 && s.layers.end < s.total_layers)
}

/// Peers that announce `model` and a ready API and serve `local`, best first: connected peers
/// before ones only heard of, then pods holding the whole model before pipeline heads, then
/// fewest requests per slot, then lowest round-trip time.
fn rank(cache: &PeerCache, model: &str, exclude: &[PeerId], local: &PeerId) -> Vec<PeerId> {
    let Ok(peers) = cache.read() else {
        return Vec::new();
    };
    let mut scored: Vec<(bool, bool, u64, PeerId)> = peers
        .iter()
        .filter(|p| !exclude.contains(&p.peer_id))
        .filter_map(|p| {
            let caps = p.capabilities.as_ref()?;
            let serves = caps.models.iter().any(|m| m.name == model);
            let ready = caps.api.as_ref().is_some_and(|a| a.ready);
            if !serves || !ready || !caps.serves(local) {
                return None;
            }
            let slots = caps.load.max_active.max(1) as u64;
            let busy = (caps.load.active + caps.load.queued) as u64;
            // Expected wait in "milli-slots" plus the round trip in microseconds / 100.
            let rtt = p.rtt.map_or(50_000, |d| d.as_micros() as u64);
            let score = busy * 1000 / slots * 10 + rtt / 100;
            Some((!p.connected, is_head(caps, model), score, p.peer_id))
        })
        .collect();
    scored.sort();
    scored.into_iter().map(|(.., p)| p).collect()
}

impl Backend for NodeBackend {
    fn models(&self) -> Vec<ModelEntry> {
        let mut by_name: BTreeMap<String, ModelEntry> = BTreeMap::new();
        if self.route != Route::Mesh {
            for m in self.local.models() {
                by_name.insert(m.info.name.clone(), m);
            }
        }
        if self.route != Route::Local {
            if let Ok(peers) = self.peers.peers.read() {
                for p in peers.iter() {
                    let Some(caps) = &p.capabilities else {
                        continue;
                    };
                    // A pod that would refuse this node offers it nothing.
                    if !caps.api.as_ref().is_some_and(|a| a.ready)
                        || !caps.serves(&self.peers.local)
                    {
                        continue;
                    }
                    for info in &caps.models {
                        by_name
                            .entry(info.name.clone())
                            .and_modify(|e| e.providers += 1)
                            .or_insert_with(|| ModelEntry {
                                info: info.clone(),
                                providers: 1,
                                owned_by: p.peer_id.to_string(),
                                pipeline: None,
                            });
                    }
                }
            }
        }
        let mut pipelines = pipelines(self.announced_stages());
        for (name, entry) in &mut by_name {
            entry.pipeline = pipelines.remove(name);
        }
        by_name.into_values().collect()
    }

    fn is_ready(&self) -> bool {
        self.local.is_ready()
    }

    fn load(&self) -> (usize, usize) {
        self.local.load()
    }

    async fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        if self.holds(&req.model) {
            let head = self.stages.head(&req.model);
            let mut generation = self.local.generate(req).await?;
            if let Some(head) = head {
                // Every pod that works on the answer: this head, then the stages after it.
                for hop in head.chain_or_plan().await {
                    generation.served_by = format!("{}, {}", generation.served_by, hop.peer);
                }
            }
            return Ok(generation);
        }
        if self.route == Route::Local {
            return Err(EngineError::UnknownModel(req.model));
        }
        let (peer, stages, events) = self.infer.generate_staged(req).await?;
        // The serving pod, then the stages after it where it heads a pipeline.
        let served_by = std::iter::once(peer)
            .chain(stages)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Generation { events, served_by })
    }

    async fn embed(&self, req: EmbedRequest) -> Result<Embeddings, EngineError> {
        if self.holds(&req.model) {
            return self.local.embed(req).await;
        }
        if self.route == Route::Local {
            return Err(EngineError::UnknownModel(req.model));
        }
        let (peer, response) = self.infer.embed(&req.model, req.input).await?;
        Ok(Embeddings {
            response,
            served_by: peer.to_string(),
        })
    }

    async fn node(&self) -> Option<NodeView> {
        let info = self.mesh.node_info().await.ok()?;
        Some(NodeView {
            peer_id: info.peer_id.to_string(),
            agent: info.agent,
            profile: self.profile.to_string(),
            device: self.device.clone(),
            device_fallback: self.device_fallback.clone(),
            listen_addrs: info.listen_addrs.iter().map(ToString::to_string).collect(),
            external_addrs: info
                .external_addrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            nat_status: info.nat_status,
            relays: info.relays.iter().map(ToString::to_string).collect(),
            connected_peers: info.connected_peers,
            known_peers: info.known_peers,
            uptime_seconds: self.started.elapsed().as_secs(),
            stages: self.stages.served(),
        })
    }

    async fn receipts(&self, page: ReceiptsPage) -> Option<ReceiptsView> {
        let ledger = self.ledger.clone()?;
        tokio::task::spawn_blocking(move || receipts_page(&ledger, &page))
            .await
            .ok()
    }

    async fn peers(&self) -> Option<Vec<PeerView>> {
        let peers = self.mesh.peers().await.ok()?;
        Some(peers.into_iter().map(peer_view).collect())
    }

    fn blob_totals(&self) -> Option<BlobTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.blob_stats;
        Some(BlobTotals {
            bytes_served: s.bytes_served.load(Relaxed),
            bytes_fetched: s.bytes_fetched.load(Relaxed),
            requests_refused: s.refused.load(Relaxed),
            chunks_corrupt: s.chunks_corrupt.load(Relaxed),
        })
    }

    async fn files(&self) -> Option<FileList> {
        let data = self
            .blobs
            .as_ref()
            .map(|b| b.served().into_iter().map(file_view).collect());
        Some(FileList {
            object: "list".into(),
            serving: data.is_some(),
            data: data.unwrap_or_default(),
        })
    }
}

/// A served file as the API shows it.
pub fn file_view(f: ServedFile) -> FileView {
    FileView {
        model: f.model,
        file: f.file,
        sha256: f.sha256,
        size: f.size,
        peers_served: f.peers_served,
        bytes_served: f.bytes_served,
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
        path: p.path.map(|p| match p {
            ConnectionPath::Direct => "direct".to_owned(),
            ConnectionPath::Relayed => "relayed".to_owned(),
        }),
        hole_punch: p.hole_punch.map(|h| match h {
            HolePunch::Succeeded => "succeeded".to_owned(),
            HolePunch::Failed => "failed".to_owned(),
        }),
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
        stages: caps
            .as_ref()
            .map(|c| {
                c.stages
                    .iter()
                    .map(|s| StageView {
                        model: s.model.clone(),
                        sha256: s.sha256.clone(),
                        layers: s.layers.to_string(),
                        total_layers: s.total_layers,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        last_seen_ms: u64::try_from(p.last_seen_ago.as_millis()).unwrap_or(u64::MAX),
    }
}

/// How often the node refreshes what it announces (the mesh publishes only changes, and
/// re-announces on its own period).
pub const ANNOUNCE_REFRESH: Duration = Duration::from_millis(500);

/// The ledger's totals as the API shows them.
pub fn receipts_view(ledger: &Ledger) -> Option<ReceiptsView> {
    let summary = match ledger.summary() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the receipt ledger");
            return None;
        }
    };
    Some(view_of(ledger, summary, false))
}

/// One page of [`receipts_view`]: `page.limit` peers after `page.after`.
pub fn receipts_page(ledger: &Ledger, page: &ReceiptsPage) -> ReceiptsView {
    let (rows, more) = ledger.summary_page(page.after.as_deref(), page.limit);
    view_of(ledger, rows, more)
}

fn view_of(
    ledger: &Ledger,
    rows: Vec<crate::receipts::PeerSummary>,
    has_more: bool,
) -> ReceiptsView {
    let counts = ledger.counts();
    let totals = |t: crate::receipts::Totals| WorkTotals {
        requests: t.requests,
        prompt_tokens: t.prompt_tokens,
        completion_tokens: t.completion_tokens,
    };
    let data = rows
        .into_iter()
        .map(|p| PeerWork {
            peer: p.peer,
            served: totals(p.served),
            consumed: totals(p.consumed),
        })
        .collect();
    ReceiptsView {
        object: "list".into(),
        data,
        receipts: counts.records,
        invalid: counts.invalid,
        torn: counts.torn,
        has_more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(model: &str, sha256: &str, layers: &str) -> StageAnnouncement {
        StageAnnouncement {
            model: model.into(),
            sha256: sha256.into(),
            layers: LayerRange::parse(layers).unwrap(),
            total_layers: 30,
        }
    }

    #[test]
    fn a_split_model_lists_its_stages_and_whether_they_chain() {
        let listed = pipelines(vec![
            ("tail".into(), stage("m", "a", "15-29")),
            ("head".into(), stage("m", "a", "0-14")),
            ("other".into(), stage("n", "a", "0-14")),
            // Another file's stage never completes a chain of this one's.
            ("stranger".into(), stage("n", "b", "15-29")),
        ]);
        let m = &listed["m"];
        assert!(m.complete);
        assert_eq!(m.total_layers, 30);
        let stages: Vec<(&str, &str)> = m
            .stages
            .iter()
            .map(|s| (s.peer.as_str(), s.layers.as_str()))
            .collect();
        assert_eq!(stages, [("head", "0-14"), ("tail", "15-29")]);
        let n = &listed["n"];
        assert!(!n.complete);
        assert_eq!(n.stages.len(), 2);
        assert_eq!(n.stages[1].sha256, "b");
    }
}
