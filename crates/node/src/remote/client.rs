//! The requesting side of `/pod/infer/1.0.0`: send a request to the best peer, stream its
//! answer, and when that peer drops out mid-answer, continue on another one by replaying the
//! prompt plus the tokens already streamed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::AsyncReadExt;
use libp2p::PeerId;
use pod_inference::{
    EmbedResponse, Embedding, EngineError, FinishReason, GenerateEvent, GenerateRequest, Resume,
};
use tokio::sync::mpsc;

use super::{Frame, Request, MAX_FRAME_BYTES, MAX_STAGES, PROTOCOL};
use crate::receipts::{Ledger, Role, SignedReceipt};
use crate::remote::bounds::{AnswerBounds, Broken};
use crate::wire::{read_frame, write_frame};

/// How the requester waits on peers.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Longest wait to open a stream and have the request accepted.
    pub open_timeout: Duration,
    /// Longest silence from a serving peer before it is given up (it heartbeats every second).
    pub stall_timeout: Duration,
    /// Longest a serving peer may go without sending a token (heartbeats keep a peer from
    /// stalling but not from this): long enough for a queue wait and a long prompt's prefill.
    pub token_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            token_timeout: Duration::from_secs(300),
        }
    }
}

/// Counters of the requesting side.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Requests sent to peers.
    pub requests: AtomicU64,
    /// Times a stream moved to another peer mid-answer.
    pub failovers: AtomicU64,
    /// Receipts that did not verify or did not match the work received.
    pub receipts_rejected: AtomicU64,
    /// Answers given up because the peer broke the request's bounds: more tokens than asked,
    /// more text than its tokens can hold, or heartbeats and no tokens.
    pub misbehaved: AtomicU64,
}

/// Finds the peers that serve a model, best first, leaving out `exclude`.
pub type Providers = Arc<dyn Fn(&str, &[PeerId]) -> Vec<PeerId> + Send + Sync>;

/// Sends requests to peers.
#[derive(Clone)]
pub struct InferClient {
    control: libp2p_stream::Control,
    local: PeerId,
    ledger: Option<Arc<Ledger>>,
    config: ClientConfig,
    providers: Providers,
    stats: Arc<ClientStats>,
}

impl std::fmt::Debug for InferClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferClient")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

type Reader = ReadHalf<libp2p::Stream>;
type Writer = WriteHalf<libp2p::Stream>;

/// A request a peer accepted.
struct Session {
    peer: PeerId,
    /// The pods running the later blocks of the model, where the peer is a pipeline head.
    stages: Vec<PeerId>,
    rd: Reader,
    // Kept open: closing it tells the server to stop.
    _wr: Writer,
}

/// What the requester has received so far, to resume elsewhere.
#[derive(Debug, Default)]
struct Progress {
    tokens: Vec<u32>,
    emitted_bytes: usize,
    from_this_peer: usize,
    resumed_at_start: usize,
    last_receipt: Option<SignedReceipt>,
}

impl InferClient {
    /// A client opening streams with `control`; `providers` ranks the peers for a model.
    pub fn new(
        control: libp2p_stream::Control,
        local: PeerId,
        ledger: Option<Arc<Ledger>>,
        config: ClientConfig,
        providers: Providers,
    ) -> Self {
        Self {
            control,
            local,
            ledger,
            config,
            providers,
            stats: Arc::new(ClientStats::default()),
        }
    }

    /// The client's counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Opens a stream to `peer`, sends `request` and waits until it is accepted.
    async fn open(&self, peer: PeerId, request: &Request) -> Result<Session, EngineError> {
        let attempt = async {
            let mut control = self.control.clone();
            // A connection can close just as a stream is opened on it (two nodes dialling each
            // other at once keep only one connection): try again on a fresh one.
            let mut attempt = 0;
            let stream = loop {
                match control.open_stream(peer, PROTOCOL).await {
                    Ok(s) => break s,
                    Err(libp2p_stream::OpenStreamError::Io(e)) if attempt < 2 => {
                        attempt += 1;
                        tracing::debug!(%peer, error = %e, "stream open failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                    }
                    Err(e) => {
                        return Err(EngineError::Unavailable(format!("peer {peer}: {e}")));
                    }
                }
            };
            let (mut rd, mut wr) = stream.split();
            write_frame(&mut wr, request)
                .await
                .map_err(|e| EngineError::Unavailable(format!("peer {peer}: {e}")))?;
            let mut stages = None;
            loop {
                match read_frame::<_, Frame>(&mut rd, MAX_FRAME_BYTES).await {
                    Ok(Frame::Accepted) => {
                        return Ok(Session {
                            peer,
                            stages: stages.unwrap_or_default(),
                            rd,
                            _wr: wr,
                        })
                    }
                    // Once, before the acceptance, naming at most MAX_STAGES valid peers.
                    Ok(Frame::Stages { peers }) if stages.is_none() => {
                        let parsed: Option<Vec<PeerId>> = (peers.len() <= MAX_STAGES)
                            .then(|| peers.iter().map(|p| p.parse().ok()).collect())
                            .flatten();
                        stages = Some(parsed.ok_or_else(|| {
                            EngineError::Unavailable(format!(
                                "peer {peer} named its stages wrongly"
                            ))
                        })?);
                    }
                    Ok(Frame::Error(e)) => return Err(e),
                    Ok(_) => {
                        return Err(EngineError::Unavailable(format!(
                            "peer {peer} answered before accepting the request"
                        )))
                    }
                    Err(e) => return Err(EngineError::Unavailable(format!("peer {peer}: {e}"))),
                }
            }
        };
        tokio::time::timeout(self.config.open_timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(EngineError::Unavailable(format!(
                    "peer {peer} did not accept within {:?}",
                    self.config.open_timeout
                )))
            })
    }

    /// Tries the providers of `model` in order until one accepts. Errors that are the
    /// request's fault (bad parameters, too long) end the search at once.
    async fn open_any(
        &self,
        model: &str,
        request: &Request,
        tried: &mut Vec<PeerId>,
    ) -> Result<Session, EngineError> {
        let mut last = None;
        loop {
            let Some(peer) = (self.providers)(model, tried).into_iter().next() else {
                return Err(last.unwrap_or_else(|| EngineError::UnknownModel(model.to_owned())));
            };
            tried.push(peer);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match self.open(peer, request).await {
                Ok(s) => {
                    tracing::info!(%peer, %model, id = request.id(), "routed to peer");
                    return Ok(s);
                }
                Err(
                    e @ (EngineError::InvalidRequest(_)
                    | EngineError::ContextLength { .. }
                    | EngineError::WrongKind { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::warn!(%peer, %model, error = %e, "peer could not take the request; trying another");
                    last = Some(match e {
                        // Its announcement was stale: to the caller the model is simply not
                        // served, unless another peer has a better excuse.
                        EngineError::UnknownModel(_) if last.is_none() => e,
                        _ => EngineError::Unavailable(format!(
                            "no peer serving `{model}` could take the request (last: {e})"
                        )),
                    });
                }
            }
        }
    }

    /// Starts a completion on the best peer. Returns the serving peer and the events, which
    /// continue on another peer if the first one fails mid-answer.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<(PeerId, mpsc::Receiver<GenerateEvent>), EngineError> {
        self.generate_staged(request)
            .await
            .map(|(peer, _, events)| (peer, events))
    }

    /// [`generate`](Self::generate), also returning the pods running the later blocks of the
    /// model where the serving peer is a pipeline head (empty otherwise).
    pub async fn generate_staged(
        &self,
        request: GenerateRequest,
    ) -> Result<(PeerId, Vec<PeerId>, mpsc::Receiver<GenerateEvent>), EngineError> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut tried = Vec::new();
        let session = self
            .open_any(
                &request.model,
                &Request::Generate {
                    id: id.clone(),
                    request: request.clone(),
                },
                &mut tried,
            )
            .await?;
        let peer = session.peer;
        let stages = session.stages.clone();
        let (tx, rx) = mpsc::channel(pod_inference::engine::types::EVENT_QUEUE);
        let client = self.clone();
        tokio::spawn(async move { client.drive(id, request, session, tried, tx).await });
        Ok((peer, stages, rx))
    }

    /// Streams a session's frames to `tx`, failing over when the peer goes away.
    async fn drive(
        &self,
        id: String,
        request: GenerateRequest,
        mut session: Session,
        mut tried: Vec<PeerId>,
        tx: mpsc::Sender<GenerateEvent>,
    ) {
        let mut progress = Progress::default();
        if let Some(r) = &request.resume {
            progress.tokens.clone_from(&r.tokens);
            progress.emitted_bytes = r.emitted_bytes;
        }
        progress.resumed_at_start = progress.tokens.len();
        let mut bounds = AnswerBounds::new(&request, self.config.token_timeout);
        loop {
            let failure = match self
                .stream_session(&id, &mut session, &mut progress, &mut bounds, &tx)
                .await
            {
                Ok(()) => return,
                Err(failure) => failure,
            };
            // The peer went away mid-answer: keep its last progress receipt, then resume.
            self.keep_partial(&mut progress).await;
            if tx.is_closed() {
                return;
            }
            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
            let resume = GenerateRequest {
                resume: Some(Resume {
                    tokens: progress.tokens.clone(),
                    emitted_bytes: progress.emitted_bytes,
                }),
                ..request.clone()
            };
            tracing::warn!(
                peer = %session.peer,
                error = %failure,
                tokens = progress.tokens.len(),
                "serving peer failed mid-answer; resuming on another"
            );
            match self
                .open_any(
                    &request.model,
                    &Request::Generate {
                        id: id.clone(),
                        request: resume,
                    },
                    &mut tried,
                )
                .await
            {
                Ok(next) => {
                    tracing::info!(from = %session.peer, to = %next.peer, "failed over");
                    session = next;
                    progress.from_this_peer = 0;
                    progress.resumed_at_start = progress.tokens.len();
                }
                Err(e) => {
                    let _ = tx.send(GenerateEvent::Error(EngineError::Unavailable(format!(
                        "the serving peer {} failed after {} tokens and no other peer could continue: {e}",
                        session.peer,
                        progress.tokens.len()
                    )))).await;
                    return;
                }
            }
        }
    }

    /// Forwards one session's frames. `Ok` when the answer ended (or the caller left);
    /// `Err` when the peer failed and another should continue.
    async fn stream_session(
        &self,
        id: &str,
        session: &mut Session,
        progress: &mut Progress,
        bounds: &mut AnswerBounds,
        tx: &mpsc::Sender<GenerateEvent>,
    ) -> Result<(), String> {
        bounds.restart(tokio::time::Instant::now());
        loop {
            let wait = self
                .config
                .stall_timeout
                .min(bounds.time_left(tokio::time::Instant::now()));
            let frame = tokio::select! {
                () = tx.closed() => return Ok(()),
                read = tokio::time::timeout(
                    wait,
                    read_frame::<_, Frame>(&mut session.rd, super::MAX_GENERATE_FRAME_BYTES),
                ) => match read {
                    Err(_) => {
                        let now = tokio::time::Instant::now();
                        if bounds.time_left(now).is_zero() {
                            return Err(self.misbehaved(session.peer, &Broken::NoTokens(self.config.token_timeout)));
                        }
                        return Err(format!("no answer for {:?}", self.config.stall_timeout));
                    }
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(frame)) => frame,
                },
            };
            if let Err(broken) = bounds.admit(&frame, tokio::time::Instant::now()) {
                return Err(self.misbehaved(session.peer, &broken));
            }
            match frame {
                Frame::Accepted | Frame::Stages { .. } | Frame::Heartbeat => {}
                Frame::Delta {
                    text,
                    tokens,
                    logprobs,
                } => {
                    progress.tokens.extend_from_slice(&tokens);
                    progress.from_this_peer += tokens.len();
                    progress.emitted_bytes += text.len();
                    if tx
                        .send(GenerateEvent::Delta {
                            text,
                            tokens,
                            logprobs,
                        })
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                Frame::Progress { receipt } => {
                    if self.check_receipt(id, session.peer, &receipt, None, true) {
                        progress.last_receipt = Some(receipt);
                    }
                }
                Frame::Done {
                    finish_reason,
                    usage,
                    receipt,
                } => {
                    progress.last_receipt = None;
                    // A stop token is generated, counted and signed for, but not sent.
                    let received = progress.from_this_peer;
                    let stop = usize::from(finish_reason == FinishReason::Stop);
                    match receipt {
                        Some(r)
                            if self.check_receipt(
                                id,
                                session.peer,
                                &r,
                                Some(received..=received + stop),
                                false,
                            ) =>
                        {
                            self.record(&r).await;
                        }
                        Some(_) => {}
                        None => tracing::warn!(peer = %session.peer, "peer sent no receipt"),
                    }
                    let _ = tx
                        .send(GenerateEvent::Done {
                            finish_reason,
                            usage,
                        })
                        .await;
                    return Ok(());
                }
                Frame::Error(e) => {
                    let _ = tx.send(GenerateEvent::Error(e)).await;
                    return Ok(());
                }
                Frame::Embeddings { .. } => {
                    return Err("peer answered embeddings to a completion".into());
                }
            }
        }
    }

    /// Counts and logs a peer that broke an answer's bounds; the reason to fail over.
    fn misbehaved(&self, peer: PeerId, broken: &Broken) -> String {
        self.stats.misbehaved.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, problem = %broken, "serving peer broke the answer's bounds");
        broken.to_string()
    }

    /// Verifies a receipt and that it describes this request, this peer and (when known)
    /// the number of tokens actually received from it (a range: an answer that ended on a
    /// stop token was generated one token longer than it was sent).
    fn check_receipt(
        &self,
        id: &str,
        peer: PeerId,
        receipt: &SignedReceipt,
        completion_tokens: Option<std::ops::RangeInclusive<usize>>,
        partial: bool,
    ) -> bool {
        let r = &receipt.receipt;
        let problem = if let Err(e) = receipt.verify() {
            Some(e.to_string())
        } else if r.request_id != id {
            Some("wrong request id".into())
        } else if r.server != peer.to_string() {
            Some("signed by another peer".into())
        } else if r.requester != self.local.to_string() {
            Some("made out to another requester".into())
        } else if r.partial != partial {
            Some("wrong partial flag".into())
        } else {
            completion_tokens
                .filter(|n| !n.contains(&(r.completion_tokens as usize)))
                .map(|n| {
                    format!(
                        "claims {} completion tokens, {} were received",
                        r.completion_tokens,
                        n.start()
                    )
                })
        };
        match problem {
            None => true,
            Some(p) => {
                self.stats.receipts_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, problem = %p, "rejected a receipt");
                false
            }
        }
    }

    async fn record(&self, receipt: &SignedReceipt) {
        if let Some(ledger) = &self.ledger {
            let write = Arc::clone(ledger).append_off_runtime(Role::Consumed, receipt.clone());
            if let Err(e) = write.await {
                tracing::warn!(error = %e, "cannot write the receipt ledger");
            }
        }
    }

    /// Keeps the failed peer's last progress receipt, if it covers no more than was received.
    async fn keep_partial(&self, progress: &mut Progress) {
        if let Some(r) = progress.last_receipt.take() {
            if r.receipt.completion_tokens <= progress.from_this_peer as u64 {
                self.record(&r).await;
            } else {
                self.stats.receipts_rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Embeds texts on the best peer serving `model`.
    pub async fn embed(
        &self,
        model: &str,
        input: Vec<String>,
    ) -> Result<(PeerId, EmbedResponse), EngineError> {
        let id = uuid::Uuid::new_v4().to_string();
        let request = Request::Embed {
            id: id.clone(),
            model: model.to_owned(),
            input,
        };
        let mut tried = Vec::new();
        loop {
            let mut session = self.open_any(model, &request, &mut tried).await?;
            let answer = tokio::time::timeout(
                self.config.stall_timeout * 6,
                read_frame::<_, Frame>(&mut session.rd, MAX_FRAME_BYTES),
            )
            .await;
            match answer {
                Ok(Ok(Frame::Embeddings {
                    data,
                    prompt_tokens,
                    receipt,
                })) => {
                    if let Some(r) = receipt {
                        if self.check_receipt(&id, session.peer, &r, Some(0..=0), false) {
                            self.record(&r).await;
                        }
                    }
                    let data = data
                        .into_iter()
                        .map(|vector| Embedding { vector, tokens: 0 })
                        .collect();
                    return Ok((
                        session.peer,
                        EmbedResponse {
                            data,
                            prompt_tokens,
                        },
                    ));
                }
                Ok(Ok(Frame::Error(e))) => return Err(e),
                Ok(Ok(_)) => {
                    tracing::warn!(peer = %session.peer, "unexpected answer to embeddings");
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %session.peer, error = %e, "embedding peer failed")
                }
                Err(_) => tracing::warn!(peer = %session.peer, "embedding peer timed out"),
            }
            // Embeddings have no partial state: simply ask the next provider.
            self.stats.failovers.fetch_add(1, Ordering::Relaxed);
        }
    }
}
