//! What chat and text completions share: turning API parameters into engine requests,
//! collecting a whole answer, and streaming one as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use pod_inference::{GenerateEvent, GenerateRequest, SamplingParams, TokenLogprob, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use crate::backend::Generation;
use crate::error::ApiError;
use crate::{AppState, Backend, SERVED_BY_HEADER};

/// Sampling fields common to both completion endpoints.
#[derive(Debug, Default)]
pub(super) struct CommonParams {
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) top_k: Option<i64>,
    pub(super) min_p: Option<f32>,
    pub(super) repetition_penalty: Option<f32>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) max_tokens: Option<i64>,
    pub(super) n: Option<i64>,
}

/// Validated sampling parameters plus the number of choices.
pub(super) struct Plan {
    pub(super) sampling: SamplingParams,
    pub(super) max_tokens: Option<usize>,
    pub(super) n: usize,
}

pub(super) fn plan(p: &CommonParams, max_choices: usize) -> Result<Plan, ApiError> {
    let n = p.n.unwrap_or(1);
    if n < 1 || n as usize > max_choices {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {max_choices}"),
        ));
    }
    let max_tokens = match p.max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ))
        }
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let top_k = match p.top_k {
        Some(k) if k < 0 => return Err(ApiError::invalid("top_k", "`top_k` must be >= 0")),
        Some(k) => k as usize,
        None => 0,
    };
    let sampling = SamplingParams {
        temperature: p.temperature.unwrap_or(1.0),
        top_p: p.top_p.unwrap_or(1.0),
        top_k,
        min_p: p.min_p.unwrap_or(0.0),
        seed: p.seed,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|m| ApiError::from(pod_inference::EngineError::InvalidRequest(m)))?;
    Ok(Plan {
        sampling,
        max_tokens,
        n: n as usize,
    })
}

/// Starts one generation per request; choice `i` of a seeded request uses seed + i so the
/// choices differ but stay reproducible.
pub(super) async fn start<B: Backend>(
    state: &AppState<B>,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<Generation>, ApiError> {
    if !state.backend.is_ready() {
        return Err(ApiError::loading());
    }
    let mut out = Vec::with_capacity(requests.len());
    for req in requests {
        out.push(state.backend.generate(req).await?);
    }
    Ok(out)
}

pub(super) fn seeded(base: &GenerateRequest, n: usize) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut r = base.clone();
            if let Some(seed) = r.sampling.seed {
                r.sampling.seed = Some(seed.wrapping_add(i as u64));
            }
            r
        })
        .collect()
}

/// A finished choice.
#[derive(Debug, Default)]
pub(super) struct Collected {
    pub(super) text: String,
    pub(super) finish_reason: String,
    pub(super) usage: Usage,
    pub(super) logprobs: Vec<TokenLogprob>,
}

/// Times tokens for the latency histograms.
struct Timer {
    started: Instant,
    last: Option<Instant>,
}

impl Timer {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: None,
        }
    }

    fn tokens<B>(&mut self, state: &AppState<B>, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        match self.last {
            None => state
                .metrics
                .first_token(now.duration_since(self.started).as_secs_f64()),
            Some(prev) => {
                let gap = now.duration_since(prev).as_secs_f64() / count as f64;
                for _ in 0..count {
                    state.metrics.token_gap(gap);
                }
            }
        }
        self.last = Some(now);
    }
}

/// Drains a generation into a whole answer.
pub(super) async fn collect<B: Backend>(
    state: &AppState<B>,
    model: &str,
    mut generation: Generation,
) -> Result<Collected, ApiError> {
    let mut out = Collected::default();
    let mut timer = Timer::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerateEvent::Delta {
                text,
                tokens,
                logprobs,
            } => {
                timer.tokens(state, tokens.len());
                out.text.push_str(&text);
                out.logprobs.extend(logprobs);
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
            } => {
                state
                    .metrics
                    .tokens(model, usage.prompt_tokens, usage.completion_tokens);
                state.metrics.cached_tokens(model, usage.cached_tokens);
                out.finish_reason = finish_reason.as_str().into();
                out.usage = usage;
                return Ok(out);
            }
            GenerateEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::from(pod_inference::EngineError::Stopped))
}

/// Drains every choice, in order.
pub(super) async fn collect_all<B: Backend>(
    state: &AppState<B>,
    model: &str,
    generations: Vec<Generation>,
) -> Result<Vec<Collected>, ApiError> {
    let mut out = Vec::with_capacity(generations.len());
    for g in generations {
        out.push(collect(state, model, g).await?);
    }
    Ok(out)
}

/// Sums usage over choices; the prompt is counted once, as OpenAI does.
pub(super) fn total_usage(choices: &[Collected]) -> crate::openai::Usage {
    let prompt = choices.first().map_or(0, |c| c.usage.prompt_tokens);
    let cached = choices.first().map_or(0, |c| c.usage.cached_tokens);
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    crate::openai::Usage::new(prompt, completion, cached)
}

/// How one endpoint spells its stream chunks.
pub(super) trait ChunkFormat: Send + 'static {
    /// Chunk opening choice `index`, if the format has one.
    fn start(&self, index: usize) -> Option<serde_json::Value>;
    /// Chunk with new text.
    fn delta(&self, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> serde_json::Value;
    /// Chunk closing choice `index`.
    fn finish(&self, index: usize, reason: &str) -> serde_json::Value;
    /// The final usage chunk.
    fn usage(&self, usage: crate::openai::Usage) -> serde_json::Value;
}

fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// Streams generations as server-sent events ending with `data: [DONE]`. A client that hangs
/// up drops the stream, which drops the engine receivers and so cancels the work.
pub(super) fn stream<B: Backend, F: ChunkFormat>(
    state: Arc<AppState<B>>,
    model: String,
    generations: Vec<Generation>,
    format: F,
    include_usage: bool,
) -> Response {
    let served_by = generations
        .first()
        .map(|g| g.served_by.clone())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut map = StreamMap::new();
        let mut usages = Vec::new();
        for (i, g) in generations.into_iter().enumerate() {
            if let Some(chunk) = format.start(i) {
                if tx.send(data(&chunk)).await.is_err() {
                    return;
                }
            }
            map.insert(i, UnboundedReceiverStream::new(g.events));
        }
        let mut timers: Vec<Timer> = (0..map.len()).map(|_| Timer::new()).collect();
        loop {
            // Watch the client while waiting for the engine, so a hang-up cancels the work
            // at once instead of at the next token.
            let next = tokio::select! {
                () = tx.closed() => return,
                next = map.next() => next,
            };
            let Some((i, event)) = next else { break };
            let chunk = match event {
                GenerateEvent::Delta {
                    text,
                    tokens,
                    logprobs,
                } => {
                    if let Some(t) = timers.get_mut(i) {
                        t.tokens(&state, tokens.len());
                    }
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    format.delta(i, text, logprobs)
                }
                GenerateEvent::Done {
                    finish_reason,
                    usage,
                } => {
                    state
                        .metrics
                        .tokens(&model, usage.prompt_tokens, usage.completion_tokens);
                    state.metrics.cached_tokens(&model, usage.cached_tokens);
                    usages.push(Collected {
                        usage,
                        ..Default::default()
                    });
                    format.finish(i, finish_reason.as_str())
                }
                GenerateEvent::Error(e) => {
                    let err = ApiError::from(e);
                    let _ = tx
                        .send(data(&serde_json::to_value(err.body()).unwrap_or_default()))
                        .await;
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
            };
            if tx.send(data(&chunk)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let _ = tx.send(data(&format.usage(total_usage(&usages)))).await;
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    let body = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut res = Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&served_by) {
        res.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    res
}

/// Adds `x-pod-served-by` to a response.
pub(super) fn with_served_by(mut res: Response, served_by: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(served_by) {
        res.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    res
}

/// Unix seconds now.
pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random id with a prefix, e.g. `chatcmpl-…`.
pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Identifies this build in responses.
pub(super) const FINGERPRINT: &str = concat!("pod-", env!("CARGO_PKG_VERSION"));
