//! The engine: one thread owns every loaded model and serves requests sent through
//! [`EngineHandle`]s.
//!
//! Callers never touch tensors. [`EngineHandle::generate`] renders and tokenizes the prompt,
//! checks it, and queues it; the engine thread streams [`GenerateEvent`]s back.
//!
//! Continuous batching: every step runs one forward pass over all active sequences of a model
//! (each decoding sequence feeds its last token, prompts share the rest of the step's token
//! budget), then samples each sequence on its own. New requests join between steps and
//! finished ones leave; dropping the receiver cancels a request before its next step.
//! Finished sequences stay in a prefix cache so a later request starting with the same tokens
//! continues from their attention cache.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::chat::ChatMessage;
use crate::embedding::{Embedding, EmbeddingModel};
use crate::error::EngineError;
use crate::json::JsonPrefix;
use crate::model::{ChatModel, ChatModelInfo, Sequence};
use crate::sampling::{log_softmax, top_logprobs, Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopOutcome};
use crate::template::ChatTemplate;
use crate::tokenizer::{DecodeStream, PodTokenizer};

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences generated at once; more wait in the queue.
    pub max_active: usize,
    /// Requests allowed to wait; beyond this [`EngineError::QueueFull`] is returned.
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_active: 8,
            max_queue: 256,
            prefill_chunk: 512,
            prefix_cache_bytes: 256 << 20,
            max_context: None,
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

/// Counters describing the engine's load, readable at any time.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting to start.
    pub queued: AtomicUsize,
    /// Sequences being generated.
    pub active: AtomicUsize,
    /// Completions finished (stop or length).
    pub completed: AtomicU64,
    /// Completions abandoned because the caller went away.
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

#[derive(Debug)]
struct ChatEntry {
    tokenizer: Arc<PodTokenizer>,
    template: Arc<ChatTemplate>,
    info: ChatModelInfo,
}

#[derive(Debug)]
enum Entry {
    Chat(ChatEntry),
    Embedding(ModelInfo),
}

struct Job {
    model: String,
    /// What to feed before sampling: the prompt (in chunks), then any resumed completion
    /// tokens (one at a time).
    context: Vec<u32>,
    /// How many of `context` are the prompt.
    prompt_len: usize,
    logprobs: Option<usize>,
    state: Pipeline,
    events: mpsc::UnboundedSender<GenerateEvent>,
}

/// Per-sequence state that each generated token advances, apart from the model's KV cache.
struct Pipeline {
    sampler: Sampler,
    decoder: DecodeStream,
    stops: StopMatcher,
    json: Option<JsonPrefix>,
    /// Completion tokens so far, resumed ones included.
    generated: usize,
    limits: Limits,
}

/// When a completion ends for length.
#[derive(Debug, Clone, Copy)]
struct Limits {
    prompt_len: usize,
    max_tokens: usize,
    context_length: usize,
}

/// What one completion token did to the text.
struct Advance {
    /// Text now safe to send (may be empty).
    text: String,
    /// Set when this token ended the completion.
    finish: Option<FinishReason>,
}

impl Pipeline {
    fn new(
        tokenizer: &Arc<PodTokenizer>,
        req: &GenerateRequest,
        prompt: &[u32],
        limits: Limits,
    ) -> Self {
        Self {
            sampler: Sampler::new(req.sampling.clone(), prompt),
            decoder: tokenizer.stream(),
            stops: StopMatcher::new(&req.stop),
            json: req.json.then(JsonPrefix::default),
            generated: 0,
            limits,
        }
    }

    /// Takes a chosen completion token (the sampler and the JSON state already advanced past
    /// it) through detokenisation, stop matching and the limits.
    fn push(&mut self, tokenizer: &PodTokenizer, token: u32) -> Result<Advance, EngineError> {
        self.generated += 1;
        if tokenizer.is_stop_token(token) {
            return Ok(Advance {
                text: self.stops.finish(),
                finish: Some(FinishReason::Stop),
            });
        }
        let piece = self
            .decoder
            .push(token)
            .map_err(EngineError::Internal)?
            .unwrap_or_default();
        let mut text = match self.stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                return Ok(Advance {
                    text,
                    finish: Some(FinishReason::Stop),
                })
            }
            StopOutcome::Continue(text) => text,
        };
        let finish = if self.json.as_ref().is_some_and(JsonPrefix::is_complete) {
            Some(FinishReason::Stop)
        } else {
            let l = self.limits;
            let at_context_end = l.prompt_len + self.generated >= l.context_length;
            (self.generated >= l.max_tokens || at_context_end).then_some(FinishReason::Length)
        };
        if finish.is_some() {
            text.push_str(&self.stops.finish());
        }
        Ok(Advance { text, finish })
    }

    /// Replays already generated completion tokens, as if this pipeline had produced them.
    /// Returns the text they yield and, when the completion ended within them, why; tokens
    /// after that point are left out (`generated` says how many were taken).
    fn replay(
        &mut self,
        tokenizer: &PodTokenizer,
        tokens: &[u32],
    ) -> Result<(String, Option<FinishReason>), EngineError> {
        let mut text = String::new();
        for (i, &token) in tokens.iter().enumerate() {
            if let Some(state) = self.json.take() {
                self.json = Some(json_step(tokenizer, &state, token).ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "`resume.tokens`: token {i} (id {token}) cannot continue the JSON output"
                    ))
                })?);
            }
            self.sampler.replay(token);
            let advance = self.push(tokenizer, token)?;
            text.push_str(&advance.text);
            if advance.finish.is_some() {
                return Ok((text, advance.finish));
            }
        }
        Ok((text, None))
    }
}

/// The JSON state after `token`, or `None` when JSON-constrained sampling may not pick it.
fn json_step(tokenizer: &PodTokenizer, state: &JsonPrefix, token: u32) -> Option<JsonPrefix> {
    if tokenizer.is_stop_token(token) {
        return None;
    }
    let piece = tokenizer.token_piece(token);
    if piece.is_empty() || piece.contains('\u{FFFD}') {
        return None;
    }
    state.advance(&piece)
}

enum Command {
    Generate(Box<Job>),
    Embed(
        EmbedRequest,
        oneshot::Sender<Result<EmbedResponse, EngineError>>,
    ),
    AddChat(String, Box<ChatModel>),
    AddEmbedding(String, Box<EmbeddingModel>),
}

/// Cloneable handle through which everything talks to the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    models: Arc<RwLock<HashMap<String, Entry>>>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Generate(_) => "Generate",
            Command::Embed(..) => "Embed",
            Command::AddChat(..) => "AddChat",
            Command::AddEmbedding(..) => "AddEmbedding",
        })
    }
}

/// Starts engines.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Starts the engine thread with no models; add them with
    /// [`EngineHandle::add_chat_model`] and [`EngineHandle::add_embedding_model`]. The thread
    /// ends when every handle is dropped.
    pub fn start(config: EngineConfig) -> EngineHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(EngineStats::default());
        let worker = Worker {
            commands: rx,
            chat: HashMap::new(),
            embedding: HashMap::new(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            prefixes: PrefixCache::default(),
            stats: Arc::clone(&stats),
            config: config.clone(),
        };
        let spawned = thread::Builder::new()
            .name("pod-engine".into())
            .spawn(move || worker.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the engine thread");
        }
        EngineHandle {
            commands: tx,
            models: Arc::new(RwLock::new(HashMap::new())),
            stats,
            config,
        }
    }
}

impl EngineHandle {
    /// Hands a loaded chat model to the engine under `name`.
    pub fn add_chat_model(&self, name: &str, model: ChatModel) -> Result<(), EngineError> {
        let mut info = model.info().clone();
        if let Some(cap) = self.config.max_context {
            info.context_length = info.context_length.min(cap.max(1));
        }
        let entry = ChatEntry {
            tokenizer: Arc::clone(model.tokenizer()),
            template: Arc::clone(model.template()),
            info,
        };
        self.commands
            .send(Command::AddChat(name.to_owned(), Box::new(model)))
            .map_err(|_| EngineError::Stopped)?;
        self.write_models()
            .insert(name.to_owned(), Entry::Chat(entry));
        Ok(())
    }

    /// Hands a loaded embedding model to the engine under `name`.
    pub fn add_embedding_model(
        &self,
        name: &str,
        model: EmbeddingModel,
    ) -> Result<(), EngineError> {
        let info = ModelInfo {
            name: name.to_owned(),
            kind: ModelKind::Embedding,
            architecture: "bert".into(),
            quantization: "F32".into(),
            context_length: model.max_tokens(),
            dimension: Some(model.dimension()),
        };
        self.commands
            .send(Command::AddEmbedding(name.to_owned(), Box::new(model)))
            .map_err(|_| EngineError::Stopped)?;
        self.write_models()
            .insert(name.to_owned(), Entry::Embedding(info));
        Ok(())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every loaded model, sorted by name.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut list: Vec<ModelInfo> = self
            .read_models()
            .iter()
            .map(|(name, e)| match e {
                Entry::Chat(c) => ModelInfo {
                    name: name.clone(),
                    kind: ModelKind::Chat,
                    architecture: c.info.architecture.clone(),
                    quantization: c.info.quantization.clone(),
                    context_length: c.info.context_length,
                    dimension: None,
                },
                Entry::Embedding(info) => info.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Load counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Limits the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Renders and tokenizes a prompt for a chat model without queuing anything.
    pub fn tokenize_prompt(&self, model: &str, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let models = self.read_models();
        let entry = match models.get(model) {
            Some(Entry::Chat(c)) => c,
            Some(Entry::Embedding(_)) => {
                return Err(EngineError::WrongKind {
                    model: model.to_owned(),
                    what: "text generation".into(),
                })
            }
            None => return Err(EngineError::UnknownModel(model.to_owned())),
        };
        let ids = match prompt {
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::InvalidRequest(
                        "`messages` must not be empty".into(),
                    ));
                }
                let text = entry
                    .template
                    .render(messages, true)
                    .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))?;
                entry
                    .tokenizer
                    .encode(&text)
                    .map_err(EngineError::Internal)?
            }
            Prompt::Text(text) => entry
                .tokenizer
                .encode(text)
                .map_err(EngineError::Internal)?,
            Prompt::Tokens(ids) => {
                let vocab = entry.info.vocab_size;
                if let Some(bad) = ids.iter().find(|i| **i as usize >= vocab) {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {bad} is outside the vocabulary of {vocab} tokens"
                    )));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(ids)
    }

    /// Queues a completion; events arrive on the returned receiver. Drop it to cancel.
    ///
    /// With [`GenerateRequest::resume`], the resumed tokens are checked and replayed here, so a
    /// resume that does not fit the request fails at once with [`EngineError::InvalidRequest`].
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>, EngineError> {
        req.sampling
            .validate()
            .map_err(EngineError::InvalidRequest)?;
        if req.max_tokens == Some(0) {
            return Err(EngineError::InvalidRequest(
                "`max_tokens` must be at least 1".into(),
            ));
        }
        let mut context = self.tokenize_prompt(&req.model, &req.prompt)?;
        let prompt_len = context.len();
        let (tokenizer, info) = match self.read_models().get(&req.model) {
            Some(Entry::Chat(c)) => (Arc::clone(&c.tokenizer), c.info.clone()),
            _ => return Err(EngineError::UnknownModel(req.model.clone())),
        };
        let context_length = info.context_length;
        let requested = req.max_tokens.unwrap_or(0);
        if prompt_len + requested > context_length || prompt_len >= context_length {
            return Err(EngineError::ContextLength {
                prompt_tokens: prompt_len,
                max_tokens: requested,
                context_length,
            });
        }
        let limits = Limits {
            prompt_len,
            max_tokens: req.max_tokens.unwrap_or(context_length - prompt_len),
            context_length,
        };
        let mut state = Pipeline::new(&tokenizer, &req, &context, limits);
        let mut unsent = String::new();
        let mut finished = None;
        if let Some(resume) = &req.resume {
            check_resume(resume, prompt_len, &info)?;
            let (text, finish) = state.replay(&tokenizer, &resume.tokens)?;
            let Some(rest) = text.get(resume.emitted_bytes..) else {
                return Err(EngineError::InvalidRequest(
                    if resume.emitted_bytes > text.len() {
                        format!(
                            "`resume.emitted_bytes` is {}, but the resumed tokens yield only {} \
                             bytes of text so far",
                            resume.emitted_bytes,
                            text.len()
                        )
                    } else {
                        format!(
                            "`resume.emitted_bytes` ({}) falls inside a character of the \
                             resumed text",
                            resume.emitted_bytes
                        )
                    },
                ));
            };
            unsent = rest.to_owned();
            finished = finish;
            context.extend_from_slice(&resume.tokens[..state.generated]);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let send_unsent = || {
            if !unsent.is_empty() {
                let _ = tx.send(GenerateEvent::Delta {
                    text: unsent.clone(),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                });
            }
        };
        if let Some(finish_reason) = finished {
            // Nothing left to generate: the resumed tokens already ended the completion.
            send_unsent();
            let _ = tx.send(GenerateEvent::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens: prompt_len,
                    completion_tokens: state.generated,
                    cached_tokens: 0,
                },
            });
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            return Ok(rx);
        }
        let queued = self.stats.queued.load(Ordering::Relaxed);
        if queued >= self.config.max_queue {
            return Err(EngineError::QueueFull(queued));
        }
        send_unsent();
        let job = Job {
            model: req.model,
            context,
            prompt_len,
            logprobs: req.logprobs,
            state,
            events: tx,
        };
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self
            .commands
            .send(Command::Generate(Box::new(job)))
            .is_err()
        {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        Ok(rx)
    }

    /// Embeds texts with an embedding model.
    pub async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse, EngineError> {
        match self.read_models().get(&req.model) {
            Some(Entry::Embedding(_)) => {}
            Some(Entry::Chat(_)) => {
                return Err(EngineError::WrongKind {
                    model: req.model.clone(),
                    what: "embeddings".into(),
                })
            }
            None => return Err(EngineError::UnknownModel(req.model.clone())),
        }
        if req.input.is_empty() {
            return Err(EngineError::InvalidRequest(
                "`input` must not be empty".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Embed(req, tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

/// Checks what can be checked of a resume before replaying it.
fn check_resume(
    resume: &Resume,
    prompt_len: usize,
    info: &ChatModelInfo,
) -> Result<(), EngineError> {
    let vocab = info.vocab_size;
    if let Some((i, bad)) = resume
        .tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(EngineError::InvalidRequest(format!(
            "`resume.tokens`: token {i} has id {bad}, outside the vocabulary of {vocab} tokens"
        )));
    }
    if prompt_len + resume.tokens.len() > info.context_length {
        return Err(EngineError::InvalidRequest(format!(
            "`resume.tokens`: the prompt's {prompt_len} tokens and {} resumed tokens exceed the \
             model's context length of {} tokens",
            resume.tokens.len(),
            info.context_length
        )));
    }
    Ok(())
}

struct Active {
    job: Box<Job>,
    seq: Sequence,
    fed: usize,
    next_input: Option<u32>,
    /// Every token fed to `seq`, in order: what the prefix cache keys it by.
    history: Vec<u32>,
    /// Tokens of the context taken from the prefix cache.
    cached: usize,
    pending_tokens: Vec<u32>,
    pending_logprobs: Vec<TokenLogprob>,
}

impl Active {
    /// The tokens this sequence feeds in the next step: a prompt chunk of up to `budget`
    /// tokens (never fewer than one), or the token sampled last.
    fn input(&self, invariant: bool, chunk: usize, budget: usize) -> Result<Vec<u32>, EngineError> {
        let context = &self.job.context;
        if self.fed < context.len() {
            let end = if invariant {
                // Prompt and resumed tokens alike: the model gives the same logits however
                // they are split.
                self.fed + budget.clamp(1, context.len() - self.fed)
            } else if self.fed < self.job.prompt_len {
                (self.fed + chunk.max(1)).min(self.job.prompt_len)
            } else {
                // Replayed one at a time, exactly as they were generated: other models'
                // multi-token passes round differently.
                self.fed + 1
            };
            return Ok(context[self.fed..end].to_vec());
        }
        match self.next_input {
            Some(tok) => Ok(vec![tok]),
            None => Err(EngineError::Internal("sequence has no next token".into())),
        }
    }
}

/// Finished sequences kept so that a request starting with the same tokens (a shared system
/// prompt, the next turn of a conversation) skips recomputing them. Least recently used go
/// first once the caches exceed the byte budget.
#[derive(Default)]
struct PrefixCache {
    entries: VecDeque<(String, Vec<u32>, Sequence)>,
    bytes: usize,
}

/// Shortest shared prefix worth reusing.
const MIN_PREFIX: usize = 16;

impl PrefixCache {
    fn store(&mut self, model: &str, tokens: Vec<u32>, mut seq: Sequence, budget: usize) {
        seq.shrink_to_fit();
        let size = seq.cache_bytes();
        if tokens.len() < MIN_PREFIX || size == 0 || size > budget {
            return;
        }
        // An entry that is a prefix of this one is redundant now.
        let mut kept = VecDeque::with_capacity(self.entries.len() + 1);
        for e in self.entries.drain(..) {
            if e.0 == model && tokens.starts_with(&e.1) {
                self.bytes -= e.2.cache_bytes();
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        self.bytes += size;
        self.entries.push_back((model.to_owned(), tokens, seq));
        while self.bytes > budget {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.2.cache_bytes(),
                None => break,
            }
        }
    }

    /// A copy of the cached sequence sharing the longest prefix with `context`, cut to that
    /// prefix (always leaving at least one token of `context` to feed).
    fn lookup(&mut self, model: &str, context: &[u32]) -> Option<(Sequence, usize)> {
        let (best, common) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.0 == model)
            .map(|(i, e)| {
                let common = e.1.iter().zip(context).take_while(|(a, b)| a == b).count();
                (i, common.min(context.len().saturating_sub(1)))
            })
            .max_by_key(|&(_, common)| common)?;
        if common < MIN_PREFIX {
            return None;
        }
        let entry = self.entries.remove(best)?;
        let mut seq = entry.2.clone();
        self.entries.push_back(entry);
        seq.truncate(common).then_some((seq, common))
    }
}

struct Worker {
    commands: mpsc::UnboundedReceiver<Command>,
    chat: HashMap<String, ChatModel>,
    embedding: HashMap<String, EmbeddingModel>,
    waiting: VecDeque<Box<Job>>,
    active: Vec<Active>,
    prefixes: PrefixCache,
    stats: Arc<EngineStats>,
    config: EngineConfig,
}

enum Step {
    Continue,
    Finished,
}

impl Worker {
    fn run(mut self) {
        let mut open = true;
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                if !open {
                    break;
                }
                match self.commands.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.admit();
            self.step_all();
        }
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::Embed(req, reply) => {
                let result = match self.embedding.get(&req.model) {
                    Some(m) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        m.embed(&req.input)
                    }))
                    .unwrap_or_else(|_| Err("embedding model code panicked".into()))
                    .map(|data| EmbedResponse {
                        prompt_tokens: data.iter().map(|e| e.tokens).sum(),
                        data,
                    })
                    .map_err(EngineError::Internal),
                    None => Err(EngineError::UnknownModel(req.model)),
                };
                let _ = reply.send(result);
            }
            Command::AddChat(name, model) => {
                self.chat.insert(name, *model);
            }
            Command::AddEmbedding(name, model) => {
                self.embedding.insert(name, *model);
            }
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.config.max_active.max(1) {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(model) = self.chat.get(&job.model) else {
                let _ = job
                    .events
                    .send(GenerateEvent::Error(EngineError::UnknownModel(
                        job.model.clone(),
                    )));
                continue;
            };
            let (seq, fed) = match self.prefixes.lookup(&job.model, &job.context) {
                Some((seq, fed)) => {
                    self.stats
                        .cached_prompt_tokens
                        .fetch_add(fed as u64, Ordering::Relaxed);
                    tracing::debug!(tokens = fed, "prompt prefix reused from the cache");
                    (seq, fed)
                }
                None => (model.new_sequence(), 0),
            };
            self.active.push(Active {
                seq,
                fed,
                next_input: None,
                history: job.context[..fed].to_vec(),
                cached: fed,
                pending_tokens: Vec::new(),
                pending_logprobs: Vec::new(),
                job,
            });
            self.stats.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One step of every active sequence: for each model, one forward pass over all its
    /// sequences (decoders feed one token each; prompts share what is left of the step's
    /// token budget), then sampling for each.
    fn step_all(&mut self) {
        let mut done = vec![false; self.active.len()];
        for (a, d) in self.active.iter().zip(done.iter_mut()) {
            if a.job.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                *d = true;
            }
        }
        let mut models: Vec<String> = Vec::new();
        for (a, &d) in self.active.iter().zip(&done) {
            if !d && !models.contains(&a.job.model) {
                models.push(a.job.model.clone());
            }
        }
        for name in models {
            let Some(model) = self.chat.get(&name) else {
                for (a, d) in self.active.iter().zip(done.iter_mut()) {
                    if a.job.model == name {
                        *d = true;
                    }
                }
                continue;
            };
            let invariant = model.batch_invariant();
            let chunk = self.config.prefill_chunk.max(1);
            let mut budget = chunk;
            let mut inputs: Vec<(usize, Vec<u32>)> = Vec::new();
            // Decoders first, one token each; then prompts, while the budget lasts (the first
            // prompt always gets at least one token).
            let mut prompting = false;
            for decoding in [true, false] {
                for (i, a) in self.active.iter().enumerate() {
                    if done[i] || a.job.model != name || (a.fed >= a.job.context.len()) != decoding
                    {
                        continue;
                    }
                    if !decoding && budget == 0 && prompting {
                        continue;
                    }
                    match a.input(invariant, chunk, budget) {
                        Ok(toks) => {
                            budget = budget.saturating_sub(toks.len());
                            prompting |= !decoding;
                            inputs.push((i, toks));
                        }
                        Err(e) => {
                            let _ = a.job.events.send(GenerateEvent::Error(e));
                            done[i] = true;
                        }
                    }
                }
            }
            let (results, passes) = forward(model, &mut self.active, &inputs);
            self.stats
                .forward_passes
                .fetch_add(passes as u64, Ordering::Relaxed);
            for ((i, toks), result) in inputs.into_iter().zip(results) {
                let a = &mut self.active[i];
                let outcome = result.and_then(|logits| {
                    a.history.extend_from_slice(&toks);
                    guarded(|| after_forward(a, model, toks.len(), logits, &self.stats))
                });
                match outcome {
                    Ok(Step::Continue) => {}
                    Ok(Step::Finished) => {
                        self.stats.completed.fetch_add(1, Ordering::Relaxed);
                        done[i] = true;
                        if invariant {
                            let history = std::mem::take(&mut a.history);
                            let seq = std::mem::replace(&mut a.seq, model.new_sequence());
                            self.prefixes.store(
                                &name,
                                history,
                                seq,
                                self.config.prefix_cache_bytes,
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, model = %name, "generation failed");
                        let _ = a.job.events.send(GenerateEvent::Error(e));
                        done[i] = true;
                    }
                }
            }
        }
        let mut i = self.active.len();
        while i > 0 {
            i -= 1;
            if done[i] {
                self.active.swap_remove(i);
                self.stats.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `f`, with a panic in model code turned into an error for this request alone, so one
/// bad input cannot take the engine down for everyone.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(EngineError::Internal(format!(
            "model code panicked: {what}"
        )))
    })
}

/// Feeds `inputs` (index into `active`, tokens; each index once) through `model`: in one
/// batched pass where the model batches, and if that fails or it does not, each sequence alone,
/// so that one bad sequence fails only itself. Returns the results in the order of `inputs`
/// and the number of forward passes run.
fn forward(
    model: &ChatModel,
    active: &mut [Active],
    inputs: &[(usize, Vec<u32>)],
) -> (Vec<Result<Vec<f32>, EngineError>>, usize) {
    let internal = |e: candle_core::Error| EngineError::Internal(e.to_string());
    if inputs.len() > 1 && model.batch_invariant() {
        let mut slots: Vec<Option<&mut Sequence>> =
            active.iter_mut().map(|a| Some(&mut a.seq)).collect();
        let mut seqs: Vec<&mut Sequence> = inputs
            .iter()
            .filter_map(|(i, _)| slots.get_mut(*i).and_then(Option::take))
            .collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let tokens: Vec<&[u32]> = inputs.iter().map(|(_, t)| &t[..]).collect();
        let batched = guarded(|| model.forward_batch(&mut seqs, &tokens).map_err(internal));
        match batched {
            Ok(logits) if logits.len() == inputs.len() => {
                return (logits.into_iter().map(Ok).collect(), 1)
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "batched step failed; retrying sequences one by one")
            }
        }
        for (s, len) in seqs.iter_mut().zip(lens) {
            s.truncate(len);
        }
    }
    let results = inputs
        .iter()
        .map(|(i, toks)| guarded(|| active[*i].seq.forward(toks).map_err(internal)))
        .collect();
    (results, inputs.len())
}

/// What follows a forward pass of one sequence that fed `fed_now` tokens: more prompt to come,
/// or sample, detokenise and stream the next token.
fn after_forward(
    a: &mut Active,
    model: &ChatModel,
    fed_now: usize,
    mut logits: Vec<f32>,
    stats: &EngineStats,
) -> Result<Step, EngineError> {
    if a.fed < a.job.context.len() {
        a.fed += fed_now;
        stats
            .prompt_tokens
            .fetch_add(fed_now as u64, Ordering::Relaxed);
        if a.fed < a.job.context.len() {
            return Ok(Step::Continue);
        }
    }

    let logprob_info = a.job.logprobs.map(|k| (log_softmax(&logits), k));
    let tokenizer = model.tokenizer();
    let state = &mut a.job.state;
    let token = match state.json.take() {
        None => state.sampler.sample(&mut logits),
        Some(json) => {
            let mut next_json = None;
            let token = state.sampler.sample_constrained(&mut logits, |t| {
                next_json = json_step(tokenizer, &json, t);
                next_json.is_some()
            });
            let Some(token) = token else {
                return Err(EngineError::Internal(
                    "no token can continue the JSON output".into(),
                ));
            };
            state.json = next_json;
            token
        }
    };
    state.sampler.accept(token);
    stats.completion_tokens.fetch_add(1, Ordering::Relaxed);

    if !tokenizer.is_stop_token(token) {
        a.pending_tokens.push(token);
        if let Some((lp, k)) = logprob_info {
            a.pending_logprobs.push(TokenLogprob {
                id: token,
                text: tokenizer.token_piece(token),
                logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
                top: top_logprobs(&lp, k)
                    .into_iter()
                    .map(|(id, l)| (id, tokenizer.token_piece(id), l))
                    .collect(),
            });
        }
    }
    let Advance { text, finish } = a.job.state.push(tokenizer, token)?;
    if let Some(finish_reason) = finish {
        flush(a, text);
        let usage = Usage {
            prompt_tokens: a.job.prompt_len,
            completion_tokens: a.job.state.generated,
            cached_tokens: a.cached.min(a.job.prompt_len),
        };
        send_done(a, finish_reason, usage);
        return Ok(Step::Finished);
    }
    if !text.is_empty() {
        flush(a, text);
    }
    a.next_input = Some(token);
    Ok(Step::Continue)
}

fn flush(a: &mut Active, text: String) {
    if text.is_empty() && a.pending_tokens.is_empty() {
        return;
    }
    let _ = a.job.events.send(GenerateEvent::Delta {
        text,
        tokens: std::mem::take(&mut a.pending_tokens),
        logprobs: std::mem::take(&mut a.pending_logprobs),
    });
}

fn send_done(a: &Active, finish_reason: FinishReason, usage: Usage) {
    let _ = a.job.events.send(GenerateEvent::Done {
        finish_reason,
        usage,
    });
}
