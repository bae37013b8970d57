//! The node's own routes under `/pod/v1`: this node, the peers it knows, the work exchanged
//! with them and the model files it serves.

use pod_inference::ModelInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /pod/v1/node`: this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// The node's libp2p PeerId.
    pub peer_id: String,
    /// Software and version, e.g. `pod/0.1.0`.
    pub agent: String,
    /// The profile it runs.
    pub profile: String,
    /// Where its models run (`cpu`, `cuda:0`, ...); empty when not known.
    #[serde(default)]
    pub device: String,
    /// Where `--device auto` found no GPU to use: which devices it tried and why it used
    /// none, so the models run on the CPU. Absent when a GPU opened or a device was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_fallback: Option<String>,
    /// Multiaddrs it listens on.
    pub listen_addrs: Vec<String>,
    /// Multiaddrs others reach it at (confirmed by AutoNAT, or configured).
    pub external_addrs: Vec<String>,
    /// `public`, `private` or `unknown` (AutoNAT).
    pub nat_status: String,
    /// Relays holding a reservation for this node (PeerIds): while it is private, peers reach
    /// it through these. Empty when it needs none or has none.
    #[serde(default)]
    pub relays: Vec<String>,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Peers in the peer table.
    pub known_peers: usize,
    /// Seconds since the node started.
    pub uptime_seconds: u64,
    /// Pipeline stages this node serves: as a model's head (blocks from 0, the rest on
    /// peers) or as a later stage for heads.
    #[serde(default)]
    pub stages: Vec<ServedStageView>,
}

/// A pipeline stage this node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServedStageView {
    /// The model.
    pub model: String,
    /// The blocks, first-last.
    pub layers: String,
    /// Blocks of the whole model.
    pub total_layers: usize,
    /// `head` (serves the model's requests) or `stage` (runs heads' rows).
    pub role: String,
    /// A head's chain after its blocks, as last planned: `blocks 15-29 on <peer>` per hop.
    pub chain: Vec<String>,
    /// A stage's sequences held for heads.
    pub sequences: usize,
}

/// `GET /pod/v1/peers`: the peer table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerList {
    /// Always `list`.
    pub object: String,
    /// The peers, sorted by id.
    pub data: Vec<PeerView>,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerView {
    /// Its PeerId.
    pub peer_id: String,
    /// Its identify agent version, if it was identified (`pod/<version>` for pods).
    pub agent: Option<String>,
    /// Addresses it was seen at or announced.
    pub addrs: Vec<String>,
    /// Whether a connection to it is open.
    pub connected: bool,
    /// `direct` or `relayed` (through a circuit relay) while connected.
    #[serde(default)]
    pub path: Option<String>,
    /// `succeeded` or `failed`: the latest hole punch (DCUtR) with it, if one was tried.
    #[serde(default)]
    pub hole_punch: Option<String>,
    /// Latest ping round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Its profile, from its announcement.
    pub profile: Option<String>,
    /// Models it serves, from its announcement.
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<ModelInfo>,
    /// Its load, from its announcement.
    pub load: Option<PeerLoad>,
    /// Its compute device, from its announcement.
    pub device: Option<String>,
    /// Whether its HTTP API takes requests, from its announcement.
    pub api_ready: Option<bool>,
    /// Pipeline stages it serves: blocks of a model, from its announcement.
    #[serde(default)]
    pub stages: Vec<StageView>,
    /// Milliseconds since it was last heard of.
    pub last_seen_ms: u64,
}

/// Blocks of a model a pod serves as a pipeline stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StageView {
    /// The model.
    pub model: String,
    /// SHA-256 of its file.
    pub sha256: String,
    /// The blocks, first-last, e.g. `0-14`.
    pub layers: String,
    /// Blocks of the whole model.
    pub total_layers: usize,
}

/// A peer's announced load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerLoad {
    /// Requests waiting.
    pub queued: usize,
    /// Sequences being generated.
    pub active: usize,
    /// Sequences it generates at once.
    pub max_active: usize,
}

/// `GET /pod/v1/receipts`: work exchanged with each peer, from the signed receipt ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReceiptsView {
    /// Always `list`.
    pub object: String,
    /// One row per counterpart peer, sorted by id.
    pub data: Vec<PeerWork>,
    /// Receipts in the ledger.
    pub receipts: usize,
    /// Ledger lines skipped because their signature does not verify.
    pub invalid: usize,
    /// Ledger lines skipped because they are incomplete (a crash mid-write).
    pub torn: usize,
    /// Whether more peers follow this page: ask again with `after` set to the last row's
    /// `peer`.
    #[serde(default)]
    pub has_more: bool,
}

/// Which rows of `/pod/v1/receipts` to answer, peers being sorted by PeerId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsPage {
    /// Most rows.
    pub limit: usize,
    /// Only peers whose PeerId sorts after this one (`None`: from the first).
    pub after: Option<String>,
}

/// Work exchanged with one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PeerWork {
    /// The peer.
    pub peer: String,
    /// Work this node did for the peer.
    pub served: WorkTotals,
    /// Work the peer did for this node.
    pub consumed: WorkTotals,
}

/// Totals of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkTotals {
    /// Requests, partial ones (cut short by a failover) included.
    pub requests: u64,
    /// Input tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

/// `GET /pod/v1/files`: the model files this node serves to peers over `/pod/blob/1.0.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    pub object: String,
    /// Whether this node serves model files at all (the `storage` and `full` profiles).
    pub serving: bool,
    /// The files served, sorted by model and file name; empty when `serving` is false.
    pub data: Vec<FileView>,
}

/// One served file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileView {
    /// The catalogue model the file belongs to.
    pub model: String,
    /// The file's name in the model's directory.
    pub file: String,
    /// SHA-256 of the file, lowercase hex: its name on the mesh.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Distinct peers this node sent chunks of the file to since it started (counted up to
    /// 10,000).
    pub peers_served: usize,
    /// Bytes of the file sent to peers since the node started.
    pub bytes_served: u64,
}
