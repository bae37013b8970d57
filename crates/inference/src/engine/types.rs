//! The engine's public request, response and event types, its limits and its counters.

use std::sync::atomic::{AtomicU64, AtomicUsize};

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::embedding::Embedding;
use crate::error::EngineError;
use crate::sampling::SamplingParams;

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences generated at once; more wait in the queue.
    pub max_active: usize,
    /// Requests allowed to wait (embedding requests count until answered); beyond this
    /// [`EngineError::QueueFull`] is returned.
    pub max_queue: usize,
    /// Tokens fed per step over all sequences: each decoding sequence feeds one, prompts
    /// share the rest, so one long prompt does not stall the others.
    pub prefill_chunk: usize,
    /// Bytes of attention cache kept from finished requests for reuse by later ones that start
    /// with the same tokens (0 turns the prefix cache off).
    pub prefix_cache_bytes: usize,
    /// Longest prompt plus completion per request, below the models' own context lengths;
    /// it bounds each sequence's attention cache. `None`: each model's own.
    pub max_context: Option<usize>,
    /// Bytes of attention (KV) cache all running sequences and the prefix cache may hold
    /// together. A request is started only while what the running sequences may still grow
    /// to (prompt plus `max_tokens`, or the rest of the context without one) and its own need
    /// fit; cached prefixes are evicted first, then it waits in the queue. A model's context
    /// is cut to what fits this budget alone, so a request that could never run is refused
    /// at once. `None`: no bound but `max_active` sequences of `max_context` tokens.
    pub kv_memory_bytes: Option<usize>,
    /// How long a sequence may wait for a caller that leaves [`EVENT_QUEUE`] events unread
    /// before it is cancelled and its slot freed.
    pub reader_stall: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_active: 8,
            max_queue: 256,
            prefill_chunk: 512,
            prefix_cache_bytes: 256 << 20,
            max_context: None,
            kv_memory_bytes: None,
            reader_stall: READER_STALL,
        }
    }
}

/// What a completion starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template and the assistant turn opened.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is (BOS added when the model wants one).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A completion request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Name of a loaded chat model.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` runs until a stop or the end of the context.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends before the first one and it is not returned.
    pub stop: Vec<String>,
    /// Return each token's log-probability and this many alternatives (`None`: none at all).
    pub logprobs: Option<usize>,
    /// Constrain the output to one JSON object; generation stops when it is complete.
    #[serde(default)]
    pub json: bool,
    /// Continue a generation another node started: these completion tokens were already
    /// generated (and `emitted_bytes` bytes of their text delivered to the client).
    #[serde(default)]
    pub resume: Option<Resume>,
}

/// Where a generation interrupted elsewhere (say, on a node that died mid-stream) picks up.
///
/// The engine feeds these tokens to the model after the prompt, replays them through everything
/// that generated tokens drive (incremental detokenisation, held-back stop-string text, the JSON
/// constraint, penalties, the seeded RNG) and continues sampling after them. Of
/// the text the replay produces, the first `emitted_bytes` bytes are not sent again; the rest
/// arrives in the first [`GenerateEvent::Delta`], so the client's stream goes on with no gap
/// and no repeat. Deltas carry only new tokens, while `max_tokens` and
/// [`Usage::completion_tokens`] count the resumed ones too.
///
/// With the same request, model and device, the resumed stream is exactly the rest of the
/// uninterrupted one, for greedy decoding and seeded sampling alike: the resumed tokens are fed
/// one at a time, as they were when generated, so the attention cache is bit-for-bit the same
/// (a batched prefill is faster but rounds differently, which soon changes near-tie choices),
/// and the sampler's RNG takes one value per token whatever the sampling mode. Resuming thus
/// costs about one decoding step per resumed token.
///
/// When the completion already ended within these tokens (end-of-turn token, stop string,
/// complete JSON object, `max_tokens` or the context reached), it finishes there without
/// sampling: the unsent text, then [`GenerateEvent::Done`]; tokens after that point are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Completion tokens already generated, in order: the concatenated `tokens` of the deltas
    /// the client received.
    pub tokens: Vec<u32>,
    /// Bytes of completion text the client already has: the total length of the deltas' `text`.
    pub emitted_bytes: usize,
}

impl GenerateRequest {
    /// A greedy request with no limits other than the context.
    pub fn new(model: impl Into<String>, prompt: Prompt) -> Self {
        Self {
            model: model.into(),
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            logprobs: None,
            json: false,
            resume: None,
        }
    }
}

/// Log-probability of one generated token and its best alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// The token's text.
    pub text: String,
    /// Natural-log probability under the model (before penalties and temperature).
    pub logprob: f32,
    /// The most likely tokens at this position, best first: (id, text, logprob).
    pub top: Vec<(u32, String, f32)>,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn or a stop string matched.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens whose attention came from the prefix cache rather than being computed.
    #[serde(default)]
    pub cached_tokens: usize,
}

/// What the engine streams back for a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerateEvent {
    /// New text, with the ids of the tokens generated since the previous delta. Text may lag
    /// tokens (an incomplete UTF-8 character or a possible stop string is held back).
    Delta {
        /// Text to append.
        text: String,
        /// Tokens generated since the last delta.
        tokens: Vec<u32>,
        /// Their log-probabilities, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The completion ended normally; always the last event.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The completion failed; always the last event.
    Error(EngineError),
}

/// An embedding request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    /// Name of a loaded embedding model.
    pub model: String,
    /// Texts to embed.
    pub input: Vec<String>,
}

/// Vectors for an [`EmbedRequest`], one per input in order.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedResponse {
    /// The embeddings.
    pub data: Vec<Embedding>,
    /// Tokens read over all inputs.
    pub prompt_tokens: usize,
}

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Text generation.
    Chat,
    /// Sentence embeddings.
    Embedding,
}

/// A loaded model as listings show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Name requests use.
    pub name: String,
    /// Chat or embedding.
    pub kind: ModelKind,
    /// Architecture, e.g. `llama` or `bert`.
    pub architecture: String,
    /// Dominant tensor type, e.g. `Q4_1` or `F32`.
    pub quantization: String,
    /// Longest input in tokens.
    pub context_length: usize,
    /// Vector length, for embedding models.
    pub dimension: Option<usize>,
}

/// Events of one completion a caller may leave unread: past this the engine pauses the
/// sequence until the caller reads, so what waits for a reader is bounded.
pub const EVENT_QUEUE: usize = 1024;

/// How long a sequence may stay paused for a caller that does not read before the engine
/// cancels it and frees its slot (the default of [`EngineConfig::reader_stall`]).
pub const READER_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Counters describing the engine's load, readable at any time.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting to start, and embedding requests not answered yet.
    pub queued: AtomicUsize,
    /// Sequences being generated.
    pub active: AtomicUsize,
    /// Completions finished (stop or length).
    pub completed: AtomicU64,
    /// Completions and embedding requests abandoned because the caller went away.
    pub cancelled: AtomicU64,
    /// Prompt tokens processed (and resumed completion tokens fed back in).
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of being computed.
    pub cached_prompt_tokens: AtomicU64,
    /// Forward passes run; with several sequences batched, fewer than the tokens fed.
    pub forward_passes: AtomicU64,
}
