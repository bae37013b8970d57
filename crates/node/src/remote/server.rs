//! The serving side of `/pod/infer/1.0.0`: requests from peers go through the same engine
//! queue as local ones, with per-peer limits, and end with a signed receipt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use pod_inference::{
    EmbedRequest, EngineError, EngineHandle, GenerateEvent, GenerateRequest, ModelKind,
};

use super::{Frame, Request, MAX_REQUEST_BYTES, PROTOCOL};
use crate::access::Access;
use crate::receipts::{Ledger, Receipt, Role, SignedReceipt};
use crate::stage::server::StageHost;
use crate::wire::{encode_frame, read_frame, write_frame};

/// Bytes of a frame written at a time, each within the write timeout.
const WRITE_PIECE: usize = 64 * 1024;

/// Limits on what peers may ask of this node.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Serve peers at all (false: this node's models are for its own API only).
    pub serve_mesh: bool,
    /// Requests one peer may have running at once.
    pub max_concurrent_per_peer: usize,
    /// Requests one peer may start per minute (per `rate_window`).
    pub max_requests_per_minute_per_peer: u32,
    /// The window requests are counted in: a minute. A peer's use is forgotten once it has no
    /// request running and its window has passed, so the table holds the peers of the last
    /// window or two, not every peer ever served.
    pub rate_window: Duration,
    /// How long a peer may take to send its request after opening the stream.
    pub request_timeout: Duration,
    /// Longest silence on a stream; a heartbeat frame is sent when nothing else was.
    pub heartbeat: Duration,
    /// A progress receipt is sent every this many generated tokens.
    pub progress_every_tokens: usize,
    /// Which peers may run requests here; others are refused before their request is read.
    pub access: Access,
    /// Longest a frame may take to go out. A requester that stops reading fills the stream's
    /// window; past this the request is cancelled, so the engine frees the sequence and the
    /// peer's slot is released instead of pinned.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            serve_mesh: true,
            // A relay fronting a whole team's clients is one peer: allow it a queue's worth;
            // the engine still runs only its slots at once.
            max_concurrent_per_peer: 64,
            max_requests_per_minute_per_peer: 600,
            rate_window: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            progress_every_tokens: 8,
            access: Access::default(),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of the inference server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests accepted from peers.
    pub accepted: AtomicU64,
    /// Requests refused: limits, unknown model, serving disabled, peer not trusted.
    pub refused: AtomicU64,
    /// Requests refused because the peer is not trusted (`--serve-to trusted`), also counted
    /// in `refused`.
    pub untrusted: AtomicU64,
    /// Streams that sent garbage or nothing in time.
    pub malformed: AtomicU64,
    /// Requests cancelled because the requester went away.
    pub cancelled: AtomicU64,
}

#[derive(Debug, Default)]
struct PeerUse {
    active: usize,
    window_start: Option<Instant>,
    in_window: u32,
}

impl PeerUse {
    /// Whether there is nothing to remember of the peer: nothing running, its window passed.
    fn idle(&self, now: Instant, window: Duration) -> bool {
        self.active == 0
            && self
                .window_start
                .is_none_or(|t| now.duration_since(t) >= window)
    }
}

/// What each peer uses, pruned of idle peers once per window.
#[derive(Debug)]
struct PeerTable {
    by_peer: HashMap<PeerId, PeerUse>,
    pruned_at: Instant,
}

/// Serves `/pod/infer/1.0.0` from the local engine.
#[derive(Debug)]
pub struct InferServer {
    engine: EngineHandle,
    key: Keypair,
    ledger: Option<Arc<Ledger>>,
    config: ServerConfig,
    peers: Mutex<PeerTable>,
    stats: ServerStats,
    stages: Arc<StageHost>,
}

/// Releases a peer's concurrency slot when a request ends.
struct Slot<'a> {
    server: &'a InferServer,
    peer: PeerId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut peers) = self.server.peers.lock() {
            if let Some(u) = peers.by_peer.get_mut(&self.peer) {
                u.active = u.active.saturating_sub(1);
                if u.idle(Instant::now(), self.server.config.rate_window) {
                    peers.by_peer.remove(&self.peer);
                }
            }
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl InferServer {
    /// A server over `engine`, signing receipts with `key`.
    pub fn new(
        engine: EngineHandle,
        key: Keypair,
        ledger: Option<Arc<Ledger>>,
        config: ServerConfig,
    ) -> Arc<Self> {
        Self::with_stages(engine, key, ledger, config, StageHost::new())
    }

    /// [`new`](Self::new), for a node whose pipeline heads are in `stages`: answers of a
    /// model it heads name the stages that run its later blocks ([`Frame::Stages`]).
    pub fn with_stages(
        engine: EngineHandle,
        key: Keypair,
        ledger: Option<Arc<Ledger>>,
        config: ServerConfig,
        stages: Arc<StageHost>,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            key,
            ledger,
            config,
            peers: Mutex::new(PeerTable {
                by_peer: HashMap::new(),
                pruned_at: Instant::now(),
            }),
            stats: ServerStats::default(),
            stages,
        })
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Peers whose use the server keeps: those with requests running or started within the
    /// rate window (and, until the next pruning, those of the window before).
    pub fn tracked_peers(&self) -> usize {
        self.peers.lock().map_or(0, |p| p.by_peer.len())
    }

    /// Accepts streams until the mesh stops.
    pub async fn run(self: Arc<Self>, control: libp2p_stream::Control) {
        crate::mesh::serve_streams(control, PROTOCOL, move |peer, stream| {
            let server = Arc::clone(&self);
            async move { server.handle(peer, stream).await }
        })
        .await;
    }

    /// Takes a slot for `peer`, or says why not.
    fn admit(&self, peer: PeerId) -> Result<Slot<'_>, EngineError> {
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| EngineError::Internal("peer table poisoned".into()))?;
        let now = Instant::now();
        let window = self.config.rate_window;
        // PeerIds are free: without pruning, every identity that ever asked stays here.
        if now.duration_since(peers.pruned_at) >= window {
            peers.by_peer.retain(|_, u| !u.idle(now, window));
            peers.pruned_at = now;
        }
        let u = peers.by_peer.entry(peer).or_default();
        match u.window_start {
            Some(t) if now.duration_since(t) < window => u.in_window += 1,
            _ => {
                u.window_start = Some(now);
                u.in_window = 1;
            }
        }
        if u.in_window > self.config.max_requests_per_minute_per_peer
            || u.active >= self.config.max_concurrent_per_peer
        {
            return Err(EngineError::QueueFull(u.active));
        }
        u.active += 1;
        Ok(Slot { server: self, peer })
    }

    async fn handle(&self, peer: PeerId, stream: libp2p::Stream) {
        let (mut rd, mut wr) = stream.split();
        // Before anything of the request is read: an untrusted peer gets nothing but the
        // refusal, which its pod takes as a reason to ask another provider.
        if let Err(why) = self.config.access.check(&peer) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.stats.untrusted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, reason = why, "refused a peer's request: not trusted");
            let frame = Frame::Error(EngineError::Unavailable(why.to_owned()));
            let _ = tokio::time::timeout(self.config.request_timeout, async {
                let _ = write_frame(&mut wr, &frame).await;
                let _ = wr.close().await;
                // The request is discarded unread, so that a requester still writing a long
                // prompt gets to read the refusal rather than a reset stream.
                let mut rest = (&mut rd).take(MAX_REQUEST_BYTES as u64 + 4);
                let _ = futures::io::copy(&mut rest, &mut futures::io::sink()).await;
            })
            .await;
            return;
        }
        let request: Request = match tokio::time::timeout(
            self.config.request_timeout,
            read_frame(&mut rd, MAX_REQUEST_BYTES),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "bad inference request");
                let frame = Frame::Error(EngineError::InvalidRequest(e.to_string()));
                let _ = self.send(&mut wr, &frame).await;
                self.close(&mut wr).await;
                return;
            }
            Err(_) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "no inference request in time");
                self.close(&mut wr).await;
                return;
            }
        };
        // Before anything of the request is logged or signed: its strings are the peer's.
        if let Err(e) = request.check_limits() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, reason = %e, "refused a peer's oversized request");
            let frame = Frame::Error(EngineError::InvalidRequest(e.to_string()));
            let _ = self.send(&mut wr, &frame).await;
            self.close(&mut wr).await;
            return;
        }
        let refuse = |e: EngineError| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, id = request.id(), reason = %e, "refused a peer's request");
            Frame::Error(e)
        };
        if !self.config.serve_mesh {
            let frame = refuse(EngineError::Unavailable(
                "this pod does not serve the mesh".into(),
            ));
            let _ = self.send(&mut wr, &frame).await;
            return;
        }
        let (model, kind) = match &request {
            Request::Generate { request, .. } => (request.model.clone(), ModelKind::Chat),
            Request::Embed { model, .. } => (model.clone(), ModelKind::Embedding),
        };
        if !self
            .engine
            .models()
            .iter()
            .any(|m| m.name == model && m.kind == kind)
        {
            let _ = self
                .send(&mut wr, &refuse(EngineError::UnknownModel(model)))
                .await;
            self.close(&mut wr).await;
            return;
        }
        let _slot = match self.admit(peer) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.send(&mut wr, &refuse(e)).await;
                self.close(&mut wr).await;
                return;
            }
        };
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, id = request.id(), %model, "serving a peer's request");
        match request {
            Request::Generate { id, request } => self.generate(peer, id, request, rd, wr).await,
            Request::Embed { id, model, input } => {
                self.embed(peer, id, model, input, wr).await;
            }
        }
    }

    /// Writes one frame, failing with [`std::io::ErrorKind::TimedOut`] when the requester takes
    /// none of it for the write timeout. The timeout is on progress, not on the whole frame: a
    /// large answer (many embeddings) to a slow but reading requester still goes out.
    async fn send<W>(&self, wr: &mut W, frame: &Frame) -> std::io::Result<()>
    where
        W: futures::AsyncWrite + Unpin,
    {
        let stalled = || std::io::Error::from(std::io::ErrorKind::TimedOut);
        let buf = encode_frame(frame)?;
        for piece in buf.chunks(WRITE_PIECE) {
            tokio::time::timeout(self.config.write_timeout, wr.write_all(piece))
                .await
                .map_err(|_| stalled())??;
        }
        tokio::time::timeout(self.config.write_timeout, wr.flush())
            .await
            .map_err(|_| stalled())?
    }

    /// Closes the writing half, giving up after the write timeout.
    async fn close<W>(&self, wr: &mut W)
    where
        W: futures::AsyncWrite + Unpin,
    {
        let _ = tokio::time::timeout(self.config.write_timeout, wr.close()).await;
    }

    fn receipt(
        &self,
        peer: PeerId,
        id: &str,
        model: &str,
        (prompt_tokens, completion_tokens): (usize, usize),
        started_at_ms: u64,
        partial: bool,
    ) -> Option<SignedReceipt> {
        let receipt = Receipt {
            request_id: id.to_owned(),
            model: model.to_owned(),
            prompt_tokens: prompt_tokens as u64,
            completion_tokens: completion_tokens as u64,
            requester: peer.to_string(),
            server: self.key.public().to_peer_id().to_string(),
            started_at_ms,
            finished_at_ms: now_ms(),
            partial,
            stage: None,
        };
        match SignedReceipt::sign(receipt, &self.key) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign a receipt");
                None
            }
        }
    }

    async fn record(&self, receipt: &Option<SignedReceipt>) {
        if let (Some(ledger), Some(r)) = (&self.ledger, receipt) {
            let write = Arc::clone(ledger).append_off_runtime(Role::Served, r.clone());
            if let Err(e) = write.await {
                tracing::warn!(error = %e, "cannot write the receipt ledger");
            }
        }
    }

    async fn generate<R, W>(
        &self,
        peer: PeerId,
        id: String,
        request: GenerateRequest,
        mut rd: R,
        mut wr: W,
    ) where
        R: futures::AsyncRead + Unpin,
        W: futures::AsyncWrite + Unpin,
    {
        let started_at = now_ms();
        let model = request.model.clone();
        let resumed = request.resume.as_ref().map_or(0, |r| r.tokens.len());
        let mut events = match self.engine.generate_async(request).await {
            Ok(e) => e,
            Err(e) => {
                let _ = self.send(&mut wr, &Frame::Error(e)).await;
                self.close(&mut wr).await;
                return;
            }
        };
        if let Some(head) = self.stages.head(&model) {
            let peers: Vec<String> = head
                .chain_or_plan()
                .await
                .iter()
                .take(super::MAX_STAGES)
                .map(|hop| hop.peer.to_string())
                .collect();
            if !peers.is_empty() && self.send(&mut wr, &Frame::Stages { peers }).await.is_err() {
                return;
            }
        }
        if self.send(&mut wr, &Frame::Accepted).await.is_err() {
            return;
        }
        // The requester never writes after its request: a read that returns means it hung up.
        let mut probe = [0u8; 1];
        let hung_up = rd.read(&mut probe);
        tokio::pin!(hung_up);
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        heartbeat.tick().await;
        let mut produced = 0usize;
        let mut since_progress = 0usize;
        let mut prompt_tokens = 0usize;
        loop {
            let frame = tokio::select! {
                _ = &mut hung_up => {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, %id, produced, "requester went away: cancelled");
                    return;
                }
                _ = heartbeat.tick() => Frame::Heartbeat,
                event = events.recv() => match event {
                    Some(GenerateEvent::Delta { text, tokens, logprobs }) => {
                        produced += tokens.len();
                        since_progress += tokens.len();
                        Frame::Delta { text, tokens, logprobs }
                    }
                    Some(GenerateEvent::Done { finish_reason, usage }) => {
                        prompt_tokens = usage.prompt_tokens + resumed;
                        let receipt = self.receipt(
                            peer,
                            &id,
                            &model,
                            (prompt_tokens, usage.completion_tokens.saturating_sub(resumed)),
                            started_at,
                            false,
                        );
                        self.record(&receipt).await;
                        let done = Frame::Done { finish_reason, usage, receipt };
                        let _ = self.send(&mut wr, &done).await;
                        self.close(&mut wr).await;
                        tracing::info!(%peer, %id, completion_tokens = produced, "served a peer's request");
                        return;
                    }
                    Some(GenerateEvent::Error(e)) => Frame::Error(e),
                    None => Frame::Error(EngineError::Stopped),
                },
            };
            let last = matches!(frame, Frame::Error(_));
            if let Err(e) = self.send(&mut wr, &frame).await {
                // Returning drops `events`: the engine sees it closed and frees the sequence.
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, %id, produced, error = %e, "requester not reading: cancelled");
                return;
            }
            if last {
                self.close(&mut wr).await;
                return;
            }
            heartbeat.reset();
            if since_progress >= self.config.progress_every_tokens {
                since_progress = 0;
                if let Some(receipt) = self.receipt(
                    peer,
                    &id,
                    &model,
                    (prompt_tokens, produced),
                    started_at,
                    true,
                ) {
                    if let Err(e) = self.send(&mut wr, &Frame::Progress { receipt }).await {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, %id, produced, error = %e, "requester not reading: cancelled");
                        return;
                    }
                }
            }
        }
    }

    async fn embed<W>(&self, peer: PeerId, id: String, model: String, input: Vec<String>, mut wr: W)
    where
        W: futures::AsyncWrite + Unpin,
    {
        let started_at = now_ms();
        if self.send(&mut wr, &Frame::Accepted).await.is_err() {
            return;
        }
        let frame = match self
            .engine
            .embed(EmbedRequest {
                model: model.clone(),
                input,
            })
            .await
        {
            Ok(r) => {
                let receipt =
                    self.receipt(peer, &id, &model, (r.prompt_tokens, 0), started_at, false);
                self.record(&receipt).await;
                Frame::Embeddings {
                    data: r.data.into_iter().map(|e| e.vector).collect(),
                    prompt_tokens: r.prompt_tokens,
                    receipt,
                }
            }
            Err(e) => Frame::Error(e),
        };
        let _ = self.send(&mut wr, &frame).await;
        self.close(&mut wr).await;
    }
}
