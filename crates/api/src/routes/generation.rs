//! What chat and text completions share: turning API parameters into engine requests,
//! collecting a whole answer, and streaming one as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use pod_inference::{GenerateEvent, GenerateRequest, Prompt, SamplingParams, TokenLogprob, Usage};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use crate::backend::Generation;
use crate::error::ApiError;
use crate::openai::{GenerationParams, StopSpec};
use crate::{AppState, Backend, SERVED_BY_HEADER};

// The engine's limits, checked here too so the 400 names the `stop` field.
use pod_inference::engine::limits::{MAX_STOPS, MAX_STOP_BYTES};

/// Validated sampling parameters, stop sequences and the number of choices.
pub(super) struct Plan {
    pub(super) sampling: SamplingParams,
    pub(super) max_tokens: Option<usize>,
    pub(super) stop: Vec<String>,
    pub(super) n: usize,
}

impl Plan {
    /// An engine request for `prompt` with these settings.
    pub(super) fn request(&self, model: &str, prompt: Prompt) -> GenerateRequest {
        let mut request = GenerateRequest::new(model.to_owned(), prompt);
        request.sampling = self.sampling.clone();
        request.max_tokens = self.max_tokens;
        request.stop = self.stop.clone();
        request
    }
}

/// Validates the shared fields; `max_tokens` is the endpoint's reading of them (an alias or
/// a default).
pub(super) fn plan(
    p: &GenerationParams,
    max_tokens: Option<i64>,
    max_choices: usize,
) -> Result<Plan, ApiError> {
    let n = p.n.unwrap_or(1);
    if n < 1 || n as usize > max_choices {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {max_choices}"),
        ));
    }
    let max_tokens = match max_tokens {
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
        stop: stops(p.stop.as_ref())?,
        n: n as usize,
    })
}

fn stops(stop: Option<&StopSpec>) -> Result<Vec<String>, ApiError> {
    let list = stop.cloned().map(StopSpec::into_vec).unwrap_or_default();
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOPS} sequences, not {}",
                list.len()
            ),
        ));
    }
    if let Some(long) = list.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "each `stop` sequence may be at most {MAX_STOP_BYTES} bytes long, not {}",
                long.len()
            ),
        ));
    }
    Ok(list)
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
        state.metrics.generated(count);
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
async fn collect<B: Backend>(
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
async fn collect_all<B: Backend>(
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
fn total_usage(choices: &[Collected]) -> crate::openai::Usage {
    let prompt = choices.first().map_or(0, |c| c.usage.prompt_tokens);
    let cached = choices.first().map_or(0, |c| c.usage.cached_tokens);
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    crate::openai::Usage::new(prompt, completion, cached)
}

/// What names one answer: the same in the whole body and in every chunk of its stream.
#[derive(Debug, Clone)]
pub(super) struct Head {
    /// `chatcmpl-…` or `cmpl-…`.
    pub(super) id: String,
    /// Unix seconds.
    pub(super) created: u64,
    /// The model asked for.
    pub(super) model: String,
}

impl Head {
    /// A new answer's head, its id starting with `prefix`.
    pub(super) fn new(prefix: &str, model: &str) -> Self {
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: now(),
            model: model.to_owned(),
        }
    }

    /// A stream chunk of this answer; `usage` only in the last one.
    pub(super) fn chunk(
        &self,
        object: &str,
        choices: serde_json::Value,
        usage: Option<crate::openai::Usage>,
    ) -> serde_json::Value {
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        v
    }
}

/// How one endpoint spells its stream chunks.
pub(super) trait ChunkFormat: Send + 'static {
    /// The answer the chunks belong to.
    fn head(&self) -> &Head;
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

/// Whether to stream, and then whether to end with a usage chunk.
pub(super) fn streaming(p: &GenerationParams) -> Option<bool> {
    p.stream
        .unwrap_or(false)
        .then(|| p.stream_options.as_ref().is_some_and(|o| o.include_usage))
}

/// Answers with the generations: streamed as `format` spells chunks when `streaming` says so
/// (see [`streaming`]), else drained and turned into one body by `whole`, which gets the
/// finished choices in order and their summed usage.
pub(super) async fn answer<B: Backend, F: ChunkFormat, T: Serialize>(
    state: Arc<AppState<B>>,
    generations: Vec<Generation>,
    streaming: Option<bool>,
    format: F,
    whole: impl FnOnce(Vec<Collected>, crate::openai::Usage) -> T,
) -> Result<Response, ApiError> {
    let served_by = generations
        .first()
        .map(|g| g.served_by.clone())
        .unwrap_or_default();
    let res = match streaming {
        Some(include_usage) => stream(state, generations, format, include_usage),
        None => {
            let collected = collect_all(&state, &format.head().model, generations).await?;
            let usage = total_usage(&collected);
            axum::Json(whole(collected, usage)).into_response()
        }
    };
    Ok(with_served_by(res, &served_by))
}

/// Streams generations as server-sent events ending with `data: [DONE]`. A client that hangs
/// up drops the stream, which drops the engine receivers and so cancels the work.
fn stream<B: Backend, F: ChunkFormat>(
    state: Arc<AppState<B>>,
    generations: Vec<Generation>,
    format: F,
    include_usage: bool,
) -> Response {
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
            map.insert(i, ReceiverStream::new(g.events));
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
                    let model = &format.head().model;
                    state
                        .metrics
                        .tokens(model, usage.prompt_tokens, usage.completion_tokens);
                    state.metrics.cached_tokens(model, usage.cached_tokens);
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
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Adds `x-pod-served-by` to a response.
pub(super) fn with_served_by(mut res: Response, served_by: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(served_by) {
        res.headers_mut().insert(SERVED_BY_HEADER, v);
    }
    res
}

/// Unix seconds now.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Identifies this build in responses.
pub(super) const FINGERPRINT: &str = concat!("pod-", env!("CARGO_PKG_VERSION"));
