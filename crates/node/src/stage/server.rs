//! The serving side of `/pod/stage/1.0.0`: a pod that holds a later range of a model's blocks
//! runs heads' rows through them.
//!
//! One thread owns the stage's weights and caches. Requests from every head queue for it; it
//! runs all the rows that are waiting in one batched pass (the stage's continuous batching),
//! so several heads and sequences keep it busy. Each request is checked before anything is
//! allocated or queued: the model file and blocks must be the ones served, row counts and the
//! payload size must match, and a sequence belongs to the head that opened it.
//!
//! When a head frees a sequence, the stage answers with a receipt signed by its node key for
//! the rows it ran for it (see [`crate::receipts`], version 2), and keeps a copy in its own
//! ledger. A sequence freed by the stage itself (idle, or beyond a head's share) gets none.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::PeerId;
use pod_api::node::ServedStageView;
use pod_inference::model::stage::{StageCache, StageModel, StageOutput};
use tokio::sync::oneshot;

use super::client::MeshDownstream;
use super::{
    read_payload, write_payload, SeqRows, StageAnnouncement, StageReply, StageRequest,
    MAX_HEADER_BYTES, MAX_ROWS, MAX_SEQUENCES, PROTOCOL,
};
use crate::receipts::{Ledger, Receipt, Role, SignedReceipt, StageWork};
use crate::wire::{read_frame, write_frame, FrameError};

/// A sequence not fed for this long is freed (its head is gone or forgot it).
pub const IDLE_SEQUENCE: Duration = Duration::from_secs(600);

/// Most sequences one head may keep on a stage; the least recently used beyond it are freed
/// (the head rebuilds them if it comes back to them).
pub const MAX_SEQUENCES_PER_PEER: usize = 512;

/// A stream with no request for this long is closed.
const IDLE_STREAM: Duration = Duration::from_secs(900);

/// Longest wait to write an answer to a head that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pipeline stages a pod serves: a later stage it runs for heads, and the heads it
/// fronts itself.
#[derive(Debug, Default)]
pub struct StageHost {
    worker: RwLock<Option<Arc<Worker>>>,
    /// Sequences the stage holds caches of, as of its last pass.
    held: Arc<AtomicUsize>,
    heads: RwLock<Vec<(StageAnnouncement, Arc<MeshDownstream>)>>,
    /// The node key signing receipts for the work done for heads; `None`: no receipts.
    key: Option<Keypair>,
    /// Where receipts are kept: those this stage signs, and those its heads' stages sign.
    ledger: Option<Arc<Ledger>>,
}

#[derive(Debug)]
struct Worker {
    announcement: StageAnnouncement,
    hidden: usize,
    jobs: mpsc::Sender<Job>,
}

/// Work for the stage's thread.
enum Job {
    Forward {
        peer: PeerId,
        seqs: Vec<SeqRows>,
        payload: Vec<f32>,
        reply: oneshot::Sender<Outcome>,
    },
    Release {
        peer: PeerId,
        seqs: Vec<u64>,
        reply: oneshot::Sender<Vec<Freed>>,
    },
}

/// The work done for a sequence the head freed.
#[derive(Debug, Clone, Copy)]
struct Freed {
    sequence: u64,
    rows: u64,
    passes: u64,
    started_at_ms: u64,
}

/// A forward request's result.
enum Outcome {
    Hidden(Vec<f32>),
    Logits { vocab: usize, values: Vec<f32> },
    Missing(Vec<u64>),
    Failed(String),
}

impl StageHost {
    /// An empty host: it answers that it serves no stage until [`serve`](Self::serve).
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// An empty host that signs receipts for its work with `key` (the node's) and keeps
    /// receipts in `ledger`.
    pub fn with_receipts(key: Keypair, ledger: Option<Arc<Ledger>>) -> Arc<Self> {
        Arc::new(Self {
            key: Some(key),
            ledger,
            ..Self::default()
        })
    }

    /// The ledger receipts are kept in, for the heads this pod fronts.
    pub fn ledger(&self) -> Option<Arc<Ledger>> {
        self.ledger.clone()
    }

    /// Serves `stage` of the model file described by `announcement`, on a thread of its own.
    pub fn serve(&self, stage: StageModel, announcement: StageAnnouncement) -> std::io::Result<()> {
        let (jobs, rx) = mpsc::channel();
        let hidden = stage.info().hidden_size;
        let held = Arc::clone(&self.held);
        std::thread::Builder::new()
            .name("pod-stage".into())
            .spawn(move || work(stage, rx, &held))?;
        tracing::info!(
            model = %announcement.model,
            blocks = %announcement.layers,
            total = announcement.total_layers,
            "serving pipeline stage"
        );
        *self.worker.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Worker {
            announcement,
            hidden,
            jobs,
        }));
        Ok(())
    }

    /// Stops serving the later stage, if any: heads are refused from now on, and its weights
    /// and caches are dropped once the requests running on it are answered.
    pub fn stop_serving(&self) {
        if let Some(w) = self
            .worker
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            tracing::info!(
                model = %w.announcement.model,
                blocks = %w.announcement.layers,
                "no longer serving pipeline stage"
            );
        }
    }

    /// Records a head this pod fronts (its blocks from 0, and the stages after them).
    pub fn add_head(&self, announcement: StageAnnouncement, downstream: Arc<MeshDownstream>) {
        self.heads
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((announcement, downstream));
    }

    /// The stages after this pod's blocks of `model`, where it is that model's head.
    pub fn head(&self, model: &str) -> Option<Arc<MeshDownstream>> {
        self.heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(a, _)| a.model == model)
            .map(|(_, d)| Arc::clone(d))
    }

    /// Sequences the stage this pod serves holds caches of.
    pub fn sequences(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Every stage this pod serves, heads first, for `/pod/v1/node`.
    pub fn served(&self) -> Vec<ServedStageView> {
        let view = |a: &StageAnnouncement, role: &str| ServedStageView {
            model: a.model.clone(),
            layers: a.layers.to_string(),
            total_layers: a.total_layers,
            role: role.to_owned(),
            chain: Vec::new(),
            sequences: 0,
        };
        let mut all: Vec<ServedStageView> = self
            .heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, d)| ServedStageView {
                chain: d
                    .chain()
                    .iter()
                    .map(|h| format!("blocks {} on {}", h.layers, h.peer))
                    .collect(),
                ..view(a, "head")
            })
            .collect();
        all.extend(self.worker().map(|w| ServedStageView {
            sequences: self.sequences(),
            ..view(&w.announcement, "stage")
        }));
        all
    }

    /// Every stage this pod serves, heads first, as it announces them.
    pub fn announcements(&self) -> Vec<StageAnnouncement> {
        let mut all: Vec<StageAnnouncement> = self
            .heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, _)| a.clone())
            .collect();
        all.extend(self.worker().map(|w| w.announcement.clone()));
        all
    }

    fn worker(&self) -> Option<Arc<Worker>> {
        self.worker
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Answers stage streams until the mesh stops.
    pub async fn run(self: Arc<Self>, control: libp2p_stream::Control) {
        crate::mesh::serve_streams(control, PROTOCOL, move |peer, stream| {
            let host = Arc::clone(&self);
            async move { host.handle(peer, stream).await }
        })
        .await;
    }

    /// One head's stream: requests answered in order until it closes, idles or breaks the
    /// framing.
    async fn handle(self: Arc<Self>, peer: PeerId, mut stream: libp2p::Stream) {
        loop {
            let request = match tokio::time::timeout(
                IDLE_STREAM,
                read_frame::<_, StageRequest>(&mut stream, MAX_HEADER_BYTES),
            )
            .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(FrameError::Io(_))) | Err(_) => return,
                Ok(Err(e)) => {
                    // The frame's payload, if any, cannot be skipped: the stream is closed.
                    tracing::debug!(peer = %peer, error = %e, "bad stage request");
                    let _ = reply(&mut stream, &error(e.to_string()), None).await;
                    return;
                }
            };
            let Some(worker) = self.worker() else {
                let _ = reply(
                    &mut stream,
                    &error("this pod serves no pipeline stage".into()),
                    None,
                )
                .await;
                return;
            };
            let (answer, payload) = match request {
                StageRequest::Release { seqs } => {
                    if seqs.len() > MAX_SEQUENCES_PER_PEER {
                        (error("too many sequences to release".into()), None)
                    } else {
                        let (tx, rx) = oneshot::channel();
                        let job = Job::Release {
                            peer,
                            seqs,
                            reply: tx,
                        };
                        if worker.jobs.send(job).is_err() {
                            return;
                        }
                        let freed = rx.await.unwrap_or_default();
                        let receipts = self.receipts(peer, &worker.announcement, &freed).await;
                        (StageReply::Released { receipts }, None)
                    }
                }
                StageRequest::Forward {
                    sha256,
                    layers,
                    seqs,
                } => {
                    let checked = check(&worker, &sha256, layers, &seqs);
                    let expected = rows_of(&seqs).saturating_mul(worker.hidden);
                    let payload = match read_payload(&mut stream, expected).await {
                        Ok(p) => p,
                        Err(FrameError::Malformed(m)) => {
                            let _ = reply(&mut stream, &error(m), None).await;
                            continue;
                        }
                        Err(e) => {
                            let _ = reply(&mut stream, &error(e.to_string()), None).await;
                            return;
                        }
                    };
                    if let Err(why) = checked {
                        let _ = reply(&mut stream, &error(why), None).await;
                        continue;
                    }
                    let (tx, rx) = oneshot::channel();
                    let job = Job::Forward {
                        peer,
                        seqs,
                        payload,
                        reply: tx,
                    };
                    if worker.jobs.send(job).is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(Outcome::Hidden(values)) => (StageReply::Hidden, Some(values)),
                        Ok(Outcome::Logits { vocab, values }) => {
                            (StageReply::Logits { vocab }, Some(values))
                        }
                        Ok(Outcome::Missing(seqs)) => (StageReply::Missing { seqs }, None),
                        Ok(Outcome::Failed(why)) => (error(why), None),
                        Err(_) => return,
                    }
                }
            };
            if reply(&mut stream, &answer, payload.as_deref())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

impl StageHost {
    /// Signs a receipt for each freed sequence and keeps them in the ledger.
    async fn receipts(
        &self,
        peer: PeerId,
        served: &StageAnnouncement,
        freed: &[Freed],
    ) -> Vec<SignedReceipt> {
        let Some(key) = &self.key else {
            return Vec::new();
        };
        let server = key.public().to_peer_id().to_string();
        let finished_at_ms = crate::receipts::now_ms();
        let mut signed = Vec::with_capacity(freed.len());
        for f in freed {
            let receipt = Receipt {
                request_id: format!("stage-{}-{}", f.sequence, f.started_at_ms),
                model: served.model.clone(),
                prompt_tokens: f.rows,
                completion_tokens: 0,
                requester: peer.to_string(),
                server: server.clone(),
                started_at_ms: f.started_at_ms,
                finished_at_ms,
                partial: false,
                stage: Some(StageWork {
                    sha256: served.sha256.clone(),
                    first_block: served.layers.start as u64,
                    last_block: served.layers.end.saturating_sub(1) as u64,
                    sequence: f.sequence,
                    rows: f.rows,
                    passes: f.passes,
                }),
            };
            match SignedReceipt::sign(receipt, key) {
                Ok(r) => signed.push(r),
                Err(e) => tracing::warn!(error = %e, "cannot sign a stage receipt"),
            }
        }
        if let Some(ledger) = &self.ledger {
            for r in &signed {
                let write = Arc::clone(ledger).append_off_runtime(Role::Served, r.clone());
                if let Err(e) = write.await {
                    tracing::warn!(error = %e, "cannot write the receipt ledger");
                }
            }
        }
        signed
    }
}

fn error(message: String) -> StageReply {
    StageReply::Error { message }
}

/// Rows of a request (saturating: the sum is checked against [`MAX_ROWS`] anyway).
fn rows_of(seqs: &[SeqRows]) -> usize {
    seqs.iter().fold(0usize, |a, s| a.saturating_add(s.count))
}

/// Checks a forward request's header against what this stage serves.
fn check(
    worker: &Worker,
    sha256: &str,
    layers: pod_inference::model::stage::LayerRange,
    seqs: &[SeqRows],
) -> Result<(), String> {
    let a = &worker.announcement;
    if sha256 != a.sha256 {
        return Err("this stage serves another model file".into());
    }
    if layers != a.layers {
        return Err(format!(
            "this stage serves blocks {}, not {layers}",
            a.layers
        ));
    }
    if seqs.is_empty() || seqs.len() > MAX_SEQUENCES {
        return Err(format!("1 to {MAX_SEQUENCES} sequences per request"));
    }
    if seqs.iter().any(|s| s.count == 0) {
        return Err("a sequence with no rows".into());
    }
    if rows_of(seqs) > MAX_ROWS {
        return Err(format!("at most {MAX_ROWS} rows per request"));
    }
    let mut ids = HashSet::new();
    if !seqs.iter().all(|s| ids.insert(s.id)) {
        return Err("a sequence appears twice".into());
    }
    Ok(())
}

async fn reply(
    stream: &mut libp2p::Stream,
    answer: &StageReply,
    payload: Option<&[f32]>,
) -> std::io::Result<()> {
    let write = async {
        write_frame(stream, answer).await?;
        if let Some(values) = payload {
            write_payload(stream, values).await?;
        }
        Ok(())
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::other("the head does not read"))?
}

/// One sequence's cache on this stage.
struct Entry {
    cache: StageCache,
    used: Instant,
    /// Rows run for the sequence, replays included.
    rows: u64,
    /// Passes that carried its rows.
    passes: u64,
    /// When the stage first held it, unix milliseconds.
    started_at_ms: u64,
}

type Key = (PeerId, u64);

/// The stage's thread: runs every waiting request's rows in one pass.
fn work(stage: StageModel, jobs: mpsc::Receiver<Job>, held: &AtomicUsize) {
    let mut caches: HashMap<Key, Entry> = HashMap::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        held.store(caches.len(), Ordering::Relaxed);
        if waiting.is_empty() {
            match jobs.recv_timeout(Duration::from_secs(30)) {
                Ok(job) => waiting.push_back(job),
                Err(RecvTimeoutError::Timeout) => {
                    caches.retain(|_, e| e.used.elapsed() < IDLE_SEQUENCE);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        waiting.extend(jobs.try_iter());
        // This pass: every waiting forward whose sequences are not already in it.
        let mut batch = Vec::new();
        let mut keys = HashSet::new();
        let mut later = VecDeque::new();
        for job in waiting.drain(..) {
            match job {
                Job::Release { peer, seqs, reply } => {
                    let freed = seqs
                        .into_iter()
                        .filter_map(|id| {
                            caches.remove(&(peer, id)).map(|e| Freed {
                                sequence: id,
                                rows: e.rows,
                                passes: e.passes,
                                started_at_ms: e.started_at_ms,
                            })
                        })
                        .collect();
                    let _ = reply.send(freed);
                }
                Job::Forward {
                    peer,
                    seqs,
                    payload,
                    reply,
                } => {
                    if seqs.iter().any(|s| keys.contains(&(peer, s.id))) {
                        later.push_back(Job::Forward {
                            peer,
                            seqs,
                            payload,
                            reply,
                        });
                        continue;
                    }
                    match admit(&stage, &mut caches, peer, &seqs) {
                        Ok(()) => {
                            keys.extend(seqs.iter().map(|s| (peer, s.id)));
                            batch.push((peer, seqs, payload, reply));
                        }
                        Err(outcome) => {
                            let _ = reply.send(outcome);
                        }
                    }
                }
            }
        }
        waiting = later;
        if !batch.is_empty() {
            run_batch(&stage, &mut caches, batch);
        }
    }
}

/// Makes room for a request's sequences: each new one starts at position 0, a known one is
/// cut back to the request's start; a gap (a start beyond what is cached) is refused.
fn admit(
    stage: &StageModel,
    caches: &mut HashMap<Key, Entry>,
    peer: PeerId,
    seqs: &[SeqRows],
) -> Result<(), Outcome> {
    let context = stage.info().context_length;
    let mut gaps = Vec::new();
    for s in seqs {
        if s.start.saturating_add(s.count) > context {
            return Err(Outcome::Failed(format!(
                "sequence {} would hold {} positions; this stage holds {context}",
                s.id,
                s.start.saturating_add(s.count)
            )));
        }
        let have = match (caches.get(&(peer, s.id)), s.fork) {
            (Some(e), _) => e.cache.len(),
            (None, Some(parent)) => caches.get(&(peer, parent)).map_or(0, |e| e.cache.len()),
            (None, None) => 0,
        };
        if have < s.start {
            gaps.push(s.id);
        }
    }
    if !gaps.is_empty() {
        return Err(Outcome::Missing(gaps));
    }
    let mut added = false;
    for s in seqs {
        if !caches.contains_key(&(peer, s.id)) {
            added = true;
            let cache = match s.fork.and_then(|p| caches.get(&(peer, p))) {
                Some(parent) => {
                    let mut c = parent.cache.clone();
                    c.truncate(s.start);
                    c
                }
                None => stage.new_cache(),
            };
            caches.insert(
                (peer, s.id),
                Entry {
                    cache,
                    used: Instant::now(),
                    rows: 0,
                    passes: 0,
                    started_at_ms: crate::receipts::now_ms(),
                },
            );
        }
        let Some(entry) = caches.get_mut(&(peer, s.id)) else {
            continue;
        };
        entry.cache.truncate(s.start);
        entry.used = Instant::now();
    }
    if !added {
        return Ok(());
    }
    // Keep each head within its share (checked only as it grows, not on every decode step):
    // its least recently used sequences go first.
    let mut mine: Vec<(Instant, u64)> = caches
        .iter()
        .filter(|((p, _), _)| *p == peer)
        .map(|((_, id), e)| (e.used, *id))
        .collect();
    if mine.len() > MAX_SEQUENCES_PER_PEER {
        mine.sort();
        let excess = mine.len() - MAX_SEQUENCES_PER_PEER;
        for (_, id) in mine.into_iter().take(excess) {
            caches.remove(&(peer, id));
        }
    }
    Ok(())
}

type Batched = (PeerId, Vec<SeqRows>, Vec<f32>, oneshot::Sender<Outcome>);

/// One pass over the rows of every request in `batch`, each answered with its share.
fn run_batch(stage: &StageModel, caches: &mut HashMap<Key, Entry>, batch: Vec<Batched>) {
    let hidden = stage.info().hidden_size;
    let mut taken: Vec<(Key, Entry)> = Vec::new();
    let mut rows: Vec<&[f32]> = Vec::new();
    for (peer, seqs, payload, _) in &batch {
        let mut at = 0;
        for s in seqs {
            if let Some(e) = caches.remove(&(*peer, s.id)) {
                taken.push(((*peer, s.id), e));
            }
            rows.push(&payload[at..at + s.count * hidden]);
            at += s.count * hidden;
        }
    }
    if taken.len() != rows.len() {
        // Admitted sequences are always cached; nothing ran.
        for (key, e) in taken {
            caches.insert(key, e);
        }
        for (.., reply) in batch {
            let _ = reply.send(Outcome::Failed("internal: a sequence went missing".into()));
        }
        return;
    }
    let mut refs: Vec<&mut StageCache> = taken.iter_mut().map(|(_, e)| &mut e.cache).collect();
    let out = stage.forward(&mut refs, &rows);
    drop(rows);
    let ran = out.is_ok();
    for ((key, mut e), rows) in taken.into_iter().zip(batch.iter().flat_map(|b| &b.1)) {
        if ran {
            e.rows = e.rows.saturating_add(rows.count as u64);
            e.passes = e.passes.saturating_add(1);
        }
        caches.insert(key, e);
    }
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            for (.., reply) in batch {
                let _ = reply.send(Outcome::Failed(format!("the stage failed: {e}")));
            }
            return;
        }
    };
    let mut per_seq = match out {
        StageOutput::Hidden(h) => h.into_iter().map(|v| (false, v)).collect::<Vec<_>>(),
        StageOutput::Logits(l) => l.into_iter().map(|v| (true, v)).collect(),
    }
    .into_iter();
    for (_, seqs, _, reply) in batch {
        let mut values = Vec::new();
        let mut vocab = 0;
        let mut logits = false;
        for _ in &seqs {
            if let Some((is_logits, v)) = per_seq.next() {
                logits = is_logits;
                vocab = v.len();
                values.extend_from_slice(&v);
            }
        }
        let _ = reply.send(if logits {
            Outcome::Logits { vocab, values }
        } else {
            Outcome::Hidden(values)
        });
    }
}
