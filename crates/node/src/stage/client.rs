//! The head's side of `/pod/stage/1.0.0`: the blocks after the head's, run on the stages the
//! mesh announces, with failover.
//!
//! The head plans a chain of stages from its block boundary to the model's last block
//! (longest reach first, so fewest hops; then connected peers, lowest round trip), keeps one
//! stream per stage, and sends each pass's rows along the chain. For each sequence it knows
//! how many positions the chain holds; whatever the chain lacks (a new sequence, a copy, a
//! replaced stage) is sent from the hidden states the head kept. When a stage fails, stalls
//! or refuses, it is avoided for a while, a new chain is planned, and the pass is replayed on
//! it from position 0 of every sequence.
//!
//! When a sequence ends, each stage of the chain frees it and answers with its signed receipt
//! for the work it did; the head checks each (signature, stage, sequence, blocks, file) and
//! keeps it in its ledger, beside the receipts of whole requests served by other pods.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use pod_inference::model::stage::{Downstream, DownstreamRow, LayerRange};
use pod_inference::ForwardError;

use super::{
    coverage, read_payload, write_payload, SeqRows, StageReply, StageRequest, MAX_HEADER_BYTES,
    PROTOCOL,
};
use crate::mesh;
use crate::receipts::{Ledger, Role, SignedReceipt};
use crate::wire::{read_frame, write_frame};

/// Longest wait for one stage's answer to one pass before it counts as stalled.
pub const HOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a stage that failed is left out of new chains.
const AVOID_FOR: Duration = Duration::from_secs(30);

/// Chains tried for one pass before it fails.
const ATTEMPTS: usize = 4;

/// Longest wait to tell a stage a sequence is gone, and how often it is tried (stages free
/// idle ones themselves).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const RELEASE_ATTEMPTS: usize = 3;

/// The stages after a head, reached over the mesh.
#[derive(Debug)]
pub struct MeshDownstream {
    model: String,
    sha256: String,
    /// The first block after the head's.
    boundary: usize,
    total: usize,
    mesh: mesh::Client,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    /// The chain last planned, for listings (readable while a pass runs).
    published: RwLock<Vec<Hop>>,
    /// Where the stages' receipts are kept; `None`: they are checked, then dropped.
    ledger: Option<Arc<Ledger>>,
}

#[derive(Default)]
struct State {
    chain: Vec<Hop>,
    /// Positions the chain holds, per sequence.
    synced: HashMap<u64, usize>,
    streams: HashMap<PeerId, libp2p::Stream>,
    avoided: HashMap<PeerId, Instant>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("chain", &self.chain)
            .field("sequences", &self.synced.len())
            .finish_non_exhaustive()
    }
}

/// One stage of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The pod.
    pub peer: PeerId,
    /// Its blocks.
    pub layers: LayerRange,
}

/// Why a pass failed on a chain.
enum PassError {
    /// These sequences must be resent from position 0.
    Missing(Vec<u64>),
    /// A stage failed: avoid it and plan again.
    Stage(PeerId, String),
}

impl MeshDownstream {
    /// The stages after blocks `0..boundary` of `model` (file `sha256`, `total` blocks),
    /// found through `mesh`; passes run on `runtime` (the engine thread waits for them).
    pub fn new(
        model: String,
        sha256: String,
        boundary: usize,
        total: usize,
        mesh: mesh::Client,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            model,
            sha256,
            boundary,
            total,
            mesh,
            runtime,
            state: Mutex::default(),
            published: RwLock::default(),
            ledger: None,
        }
    }

    /// Keeps the receipts the stages sign in `ledger`.
    #[must_use]
    pub fn with_ledger(mut self, ledger: Option<Arc<Ledger>>) -> Self {
        self.ledger = ledger;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The chain last planned (empty before the first pass).
    pub fn chain(&self) -> Vec<Hop> {
        self.published
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The chain last planned, or the one a pass would plan now (empty: none covers the
    /// blocks).
    pub async fn chain_or_plan(&self) -> Vec<Hop> {
        let chain = self.chain();
        if !chain.is_empty() {
            return chain;
        }
        let Ok(peers) = self.mesh.peers().await else {
            return Vec::new();
        };
        plan(
            &peers,
            &self.sha256,
            self.boundary,
            self.total,
            &HashMap::new(),
        )
        .unwrap_or_default()
    }

    async fn forward_async(
        &self,
        state: &mut State,
        rows: &[DownstreamRow<'_>],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            if state.chain.is_empty() {
                state.avoided.retain(|_, t| t.elapsed() < AVOID_FOR);
                let peers = self
                    .mesh
                    .peers()
                    .await
                    .map_err(|e| ForwardError::Compute(e.to_string()))?;
                state.chain = plan(&peers, &self.sha256, self.boundary, self.total, &state.avoided)
                    .map_err(|at| {
                        ForwardError::Unavailable(format!(
                            "no pod serves block {at} of {} (pipeline stages needed for blocks {}-{}){}",
                            self.model,
                            self.boundary,
                            self.total - 1,
                            if last_error.is_empty() {
                                String::new()
                            } else {
                                format!("; last stage error: {last_error}")
                            }
                        ))
                    })?;
                state.synced.clear();
                *self
                    .published
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = state.chain.clone();
                tracing::info!(
                    model = %self.model,
                    chain = %describe(&state.chain),
                    "pipeline stages planned"
                );
            }
            match self.pass(state, rows).await {
                Ok(logits) => {
                    for r in rows {
                        state.synced.insert(r.id, r.history.len() / r.hidden.max(1));
                    }
                    return Ok(logits);
                }
                Err(PassError::Missing(ids)) => {
                    for id in ids {
                        state.synced.insert(id, 0);
                    }
                }
                Err(PassError::Stage(peer, why)) => {
                    tracing::warn!(
                        model = %self.model,
                        stage = %peer,
                        error = %why,
                        "pipeline stage failed; planning the chain again and replaying"
                    );
                    state.avoided.insert(peer, Instant::now());
                    state.streams.remove(&peer);
                    state.chain.clear();
                    last_error = why;
                }
            }
        }
        Err(ForwardError::Unavailable(format!(
            "the pipeline stages of {} kept failing: {last_error}",
            self.model
        )))
    }

    /// One pass along the chain.
    async fn pass(
        &self,
        state: &mut State,
        rows: &[DownstreamRow<'_>],
    ) -> Result<Vec<Vec<f32>>, PassError> {
        let mut seqs = Vec::with_capacity(rows.len());
        let mut input = Vec::new();
        for r in rows {
            let d = r.hidden.max(1);
            let held = r.history.len() / d;
            // A sequence new to the chain but copied from one it holds starts from that one.
            let (known, fork) = match (state.synced.get(&r.id), r.parent) {
                (Some(&n), _) => (n, None),
                (None, Some(p)) => match state.synced.get(&p) {
                    Some(&n) => (n, Some(p)),
                    None => (0, None),
                },
                (None, None) => (0, None),
            };
            let start = known.min(r.new_from).min(held);
            seqs.push(SeqRows {
                id: r.id,
                start,
                count: held - start,
                fork: fork.filter(|_| start > 0),
            });
            input.extend_from_slice(&r.history[start * d..]);
        }
        let chain = state.chain.clone();
        for (i, hop) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let stream = match state.streams.remove(&hop.peer) {
                Some(s) => s,
                None => {
                    let mut control = self.mesh.streams();
                    match tokio::time::timeout(HOP_TIMEOUT, control.open_stream(hop.peer, PROTOCOL))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return Err(PassError::Stage(hop.peer, e.to_string())),
                        Err(_) => {
                            return Err(PassError::Stage(hop.peer, "no stream opened".into()))
                        }
                    }
                }
            };
            let mut stream = stream;
            let exchange = async {
                let request = StageRequest::Forward {
                    sha256: self.sha256.clone(),
                    layers: hop.layers,
                    seqs: seqs.clone(),
                };
                write_frame(&mut stream, &request)
                    .await
                    .map_err(|e| e.to_string())?;
                write_payload(&mut stream, &input)
                    .await
                    .map_err(|e| e.to_string())?;
                let reply: StageReply = read_frame(&mut stream, MAX_HEADER_BYTES)
                    .await
                    .map_err(|e| e.to_string())?;
                let values = match &reply {
                    StageReply::Hidden if !last => Some(
                        read_payload(&mut stream, input.len())
                            .await
                            .map_err(|e| e.to_string())?,
                    ),
                    StageReply::Logits { vocab } if last && *vocab > 0 => Some(
                        read_payload(&mut stream, seqs.len() * vocab)
                            .await
                            .map_err(|e| e.to_string())?,
                    ),
                    _ => None,
                };
                Ok::<_, String>((reply, values))
            };
            let outcome = tokio::time::timeout(HOP_TIMEOUT, exchange).await;
            let (reply, values) = match outcome {
                Ok(Ok(r)) => r,
                Ok(Err(why)) => return Err(PassError::Stage(hop.peer, why)),
                Err(_) => {
                    return Err(PassError::Stage(
                        hop.peer,
                        format!("no answer in {} s", HOP_TIMEOUT.as_secs()),
                    ))
                }
            };
            match (reply, values) {
                (StageReply::Missing { seqs: ids }, _) => {
                    state.streams.insert(hop.peer, stream);
                    return Err(PassError::Missing(ids));
                }
                (StageReply::Error { message }, _) => {
                    return Err(PassError::Stage(hop.peer, message));
                }
                (StageReply::Hidden, Some(values)) => {
                    state.streams.insert(hop.peer, stream);
                    input = values;
                }
                (StageReply::Logits { vocab }, Some(values)) => {
                    state.streams.insert(hop.peer, stream);
                    return Ok(values.chunks_exact(vocab).map(<[f32]>::to_vec).collect());
                }
                (other, _) => {
                    return Err(PassError::Stage(
                        hop.peer,
                        format!("unexpected answer {other:?}"),
                    ))
                }
            }
        }
        Err(PassError::Stage(
            chain.last().map_or(PeerId::random(), |h| h.peer),
            "the chain ended without logits".into(),
        ))
    }
}

impl Downstream for MeshDownstream {
    fn forward(&self, rows: &[DownstreamRow<'_>]) -> Result<Vec<Vec<f32>>, ForwardError> {
        let mut state = self.state();
        self.runtime.block_on(self.forward_async(&mut state, rows))
    }

    fn release(&self, id: u64) {
        let chain = {
            let mut state = self.state();
            if state.synced.remove(&id).is_none() {
                return;
            }
            state.chain.clone()
        };
        // At once, on streams of their own: the pass streams belong to the engine thread.
        let control = self.mesh.streams();
        let check = ReceiptCheck {
            head: self.mesh.peer_id(),
            sha256: self.sha256.clone(),
            sequence: id,
            ledger: self.ledger.clone(),
        };
        self.runtime.spawn(async move {
            for hop in chain {
                for attempt in 0..RELEASE_ATTEMPTS {
                    let mut control = control.clone();
                    let send = async {
                        let mut s = control.open_stream(hop.peer, PROTOCOL).await.ok()?;
                        let release = StageRequest::Release { seqs: vec![id] };
                        write_frame(&mut s, &release).await.ok()?;
                        read_frame::<_, StageReply>(&mut s, MAX_HEADER_BYTES)
                            .await
                            .ok()
                    };
                    match tokio::time::timeout(RELEASE_TIMEOUT, send).await {
                        Ok(Some(StageReply::Released { receipts })) => {
                            check.keep(hop, receipts).await;
                            break;
                        }
                        _ => {
                            tracing::debug!(
                                stage = %hop.peer,
                                sequence = id,
                                attempt,
                                "could not free a sequence on a stage; trying again"
                            );
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        });
    }

    fn describe(&self) -> String {
        let state = self.state();
        if state.chain.is_empty() {
            format!(
                "blocks {}-{} on peers",
                self.boundary,
                self.total.saturating_sub(1)
            )
        } else {
            describe(&state.chain)
        }
    }
}

/// What a stage's receipt for a freed sequence must say.
struct ReceiptCheck {
    head: PeerId,
    sha256: String,
    sequence: u64,
    ledger: Option<Arc<Ledger>>,
}

impl ReceiptCheck {
    /// Keeps the receipts of `hop` that verify and describe its work on this sequence.
    async fn keep(&self, hop: Hop, receipts: Vec<SignedReceipt>) {
        for signed in receipts {
            let r = &signed.receipt;
            let problem = if let Err(e) = signed.verify() {
                Some(e.to_string())
            } else if r.server != hop.peer.to_string() {
                Some(format!("signed by {}, not the stage", r.server))
            } else if r.requester != self.head.to_string() {
                Some(format!("names requester {}", r.requester))
            } else {
                match &r.stage {
                    None => Some("not a stage receipt".into()),
                    Some(w) if w.sequence != self.sequence => Some(format!(
                        "for sequence {}, not {}",
                        w.sequence, self.sequence
                    )),
                    Some(w) if w.sha256 != self.sha256 => Some("for another model file".into()),
                    Some(w)
                        if w.first_block != hop.layers.start as u64
                            || w.last_block.checked_add(1) != Some(hop.layers.end as u64) =>
                    {
                        Some(format!(
                            "for blocks {}-{}, not {}",
                            w.first_block, w.last_block, hop.layers
                        ))
                    }
                    Some(_) => None,
                }
            };
            if let Some(p) = problem {
                tracing::warn!(stage = %hop.peer, problem = %p, "rejected a stage receipt");
                continue;
            }
            if let Some(ledger) = &self.ledger {
                let write = Arc::clone(ledger).append_off_runtime(Role::Consumed, signed);
                if let Err(e) = write.await {
                    tracing::warn!(error = %e, "cannot write the receipt ledger");
                }
            }
        }
    }
}

/// `blocks 15-29 on 12D3…` for each hop.
pub fn describe(chain: &[Hop]) -> String {
    chain
        .iter()
        .map(|h| format!("blocks {} on {}", h.layers, h.peer))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A chain of stages of file `sha256` from block `from` to `total`, from the peers'
/// announcements, leaving out `avoided` ones: the fewest hops, then connected peers before
/// others, then the lowest sum of round trips ([`coverage::shortest_chain`]). Fails with the
/// furthest block a chain reaches, where no stage goes on.
pub fn plan(
    peers: &[mesh::PeerSnapshot],
    sha256: &str,
    from: usize,
    total: usize,
    avoided: &HashMap<PeerId, Instant>,
) -> Result<Vec<Hop>, usize> {
    // A peer not connected weighs more than any sum of round trips (microseconds).
    const UNCONNECTED: u128 = 1 << 100;
    let mut stages = Vec::new();
    let mut owners = Vec::new();
    for p in peers.iter().filter(|p| !avoided.contains_key(&p.peer_id)) {
        let Some(caps) = p.capabilities.as_ref() else {
            continue;
        };
        let rtt = p.rtt.map_or(u128::from(u64::MAX), |d| d.as_micros());
        let weight = rtt + if p.connected { 0 } else { UNCONNECTED };
        for s in caps
            .stages
            .iter()
            .filter(|s| s.sha256 == sha256 && s.total_layers == total)
        {
            stages.push((s.layers, weight));
            owners.push(p.peer_id);
        }
    }
    let chain = coverage::shortest_chain(&stages, from, total)?;
    Ok(chain
        .into_iter()
        .map(|i| Hop {
            peer: owners[i],
            layers: stages[i].0,
        })
        .collect())
}
