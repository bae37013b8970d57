//! [`EngineHandle`], the client side of the engine: cloneable, usable from any thread, it checks
//! and tokenizes requests on the caller's thread and sends them to the engine thread as
//! commands.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, oneshot};

use super::admission::{self, Job};
use super::limits;
use super::types::{
    EmbedRequest, EmbedResponse, EngineConfig, EngineStats, GenerateEvent, GenerateRequest,
    ModelInfo, ModelKind, Prompt, Usage,
};
use crate::decoder::BatchDecoder;
use crate::embedding::EmbeddingModel;
use crate::error::EngineError;
use crate::model::{ChatModel, ChatModelInfo};
use crate::template::ChatTemplate;
use crate::tokenizer::PodTokenizer;

/// The text side of a chat model: what turns requests into tokens and tokens into text.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    /// The model's tokenizer.
    pub tokenizer: Arc<PodTokenizer>,
    /// The model's chat template.
    pub template: Arc<ChatTemplate>,
    /// Architecture, quantisation, context length, vocabulary size.
    pub info: ChatModelInfo,
}

impl ChatFormat {
    /// The text side of a loaded chat model.
    pub fn of(model: &ChatModel) -> Self {
        Self {
            tokenizer: Arc::clone(model.tokenizer()),
            template: Arc::clone(model.template()),
            info: model.info().clone(),
        }
    }
}

/// A loaded model as the handles see it.
#[derive(Debug)]
enum Entry {
    Chat(ChatFormat),
    Embedding(ModelInfo),
}

/// What a handle asks of the engine thread.
pub(super) enum Command<D> {
    /// Run a checked completion.
    Generate(Box<Job>),
    /// Embed texts and reply (already counted in the queue).
    Embed(
        EmbedRequest,
        oneshot::Sender<Result<EmbedResponse, EngineError>>,
    ),
    /// Serve a chat model under a name.
    AddChat(String, Box<D>),
    /// Serve an embedding model under a name.
    AddEmbedding(String, Box<EmbeddingModel>),
}

impl<D> std::fmt::Debug for Command<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Generate(_) => "Generate",
            Command::Embed(..) => "Embed",
            Command::AddChat(..) => "AddChat",
            Command::AddEmbedding(..) => "AddEmbedding",
        })
    }
}

/// Cloneable handle through which everything talks to the engine; the engine thread ends when
/// the last one is dropped. `D` is the kind of chat model the engine drives.
pub struct EngineHandle<D = ChatModel> {
    commands: mpsc::UnboundedSender<Command<D>>,
    models: Arc<RwLock<HashMap<String, Entry>>>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
}

impl<D> Clone for EngineHandle<D> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            models: Arc::clone(&self.models),
            stats: Arc::clone(&self.stats),
            config: self.config.clone(),
        }
    }
}

impl<D> std::fmt::Debug for EngineHandle<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("models", &self.models)
            .field("stats", &self.stats)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EngineHandle<ChatModel> {
    /// Hands a loaded chat model to the engine under `name`.
    pub fn add_chat_model(&self, name: &str, model: ChatModel) -> Result<(), EngineError> {
        self.add_decoder(name, ChatFormat::of(&model), model)
    }
}

impl<D: BatchDecoder> EngineHandle<D> {
    /// A handle sending to `commands`, with the engine thread's counters.
    pub(super) fn new(
        commands: mpsc::UnboundedSender<Command<D>>,
        stats: Arc<EngineStats>,
        config: EngineConfig,
    ) -> Self {
        Self {
            commands,
            models: Arc::new(RwLock::new(HashMap::new())),
            stats,
            config,
        }
    }

    /// Hands a chat decoder and its text side to the engine under `name`. Its context is cut
    /// to the engine's `max_context` and to what the KV memory budget holds for one sequence.
    pub fn add_decoder(
        &self,
        name: &str,
        mut format: ChatFormat,
        decoder: D,
    ) -> Result<(), EngineError> {
        if let Some(cap) = self.config.max_context {
            format.info.context_length = format.info.context_length.min(cap.max(1));
        }
        let per_token = decoder.kv_bytes_per_token();
        if let (Some(budget), true) = (self.config.kv_memory_bytes, per_token > 0) {
            let fits = budget / per_token;
            if fits < format.info.context_length {
                tracing::warn!(
                    model = name,
                    context = format.info.context_length,
                    fits,
                    kv_bytes_per_token = per_token,
                    "the KV memory budget holds fewer tokens than the context: requests are \
                     limited to what it holds"
                );
                format.info.context_length = fits.max(1);
            }
        }
        let command = Command::AddChat(name.to_owned(), Box::new(decoder));
        self.register(name, command, Entry::Chat(format))
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
        let command = Command::AddEmbedding(name.to_owned(), Box::new(model));
        self.register(name, command, Entry::Embedding(info))
    }

    /// Hands a model to the engine thread with `command`, then lists it as `entry`.
    fn register(&self, name: &str, command: Command<D>, entry: Entry) -> Result<(), EngineError> {
        self.commands
            .send(command)
            .map_err(|_| EngineError::Stopped)?;
        self.write_models().insert(name.to_owned(), entry);
        Ok(())
    }

    fn write_models(&self) -> RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.models.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_models(&self) -> RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.models.read().unwrap_or_else(PoisonError::into_inner)
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

    /// The text side of the chat model `model`.
    fn chat_format(&self, model: &str) -> Result<ChatFormat, EngineError> {
        match self.read_models().get(model) {
            Some(Entry::Chat(c)) => Ok(c.clone()),
            Some(Entry::Embedding(_)) => Err(EngineError::WrongKind {
                model: model.to_owned(),
                what: "text generation".into(),
            }),
            None => Err(EngineError::UnknownModel(model.to_owned())),
        }
    }

    /// Renders and tokenizes a prompt for a chat model without queuing anything.
    pub fn tokenize_prompt(&self, model: &str, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        admission::tokenize(&self.chat_format(model)?, prompt)
    }

    /// [`generate`](Self::generate) for async callers: rendering the prompt and tokenizing it
    /// (long prompts take milliseconds) run on tokio's blocking pool, not on the caller's
    /// runtime thread. Must be called within a tokio runtime.
    pub async fn generate_async(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        let handle = self.clone();
        tokio::task::spawn_blocking(move || handle.generate(req))
            .await
            .map_err(|e| EngineError::Internal(format!("admission failed: {e}")))?
    }

    /// Queues a completion; events arrive on the returned receiver. Drop it to cancel.
    ///
    /// With [`GenerateRequest::resume`], the resumed tokens are checked and replayed here, so a
    /// resume that does not fit the request fails at once with [`EngineError::InvalidRequest`].
    pub fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<mpsc::Receiver<GenerateEvent>, EngineError> {
        admission::check_request(&req)?;
        let format = self.chat_format(&req.model)?;
        let admitted = admission::admit(req, &format)?;
        let job = admitted.job;
        let send_unsent = || {
            if !admitted.unsent.is_empty() {
                let _ = job.events.try_send(GenerateEvent::Delta {
                    text: admitted.unsent.clone(),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                });
            }
        };
        if let Some(finish_reason) = admitted.finished {
            // Nothing left to generate: the resumed tokens already ended the completion.
            send_unsent();
            let _ = job.events.try_send(GenerateEvent::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens: job.prompt_len,
                    completion_tokens: job.state.generated,
                    cached_tokens: 0,
                },
            });
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            return Ok(admitted.events);
        }
        let queued = self.stats.queued.load(Ordering::Relaxed);
        if queued >= self.config.max_queue {
            return Err(EngineError::QueueFull(queued));
        }
        send_unsent();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self
            .commands
            .send(Command::Generate(Box::new(job)))
            .is_err()
        {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        Ok(admitted.events)
    }

    /// Embeds texts with an embedding model. The request is checked against the [`limits`]
    /// and counts against the queue until it is answered; dropping the future cancels it
    /// before its next batch.
    ///
    /// [`limits`]: super::limits
    pub async fn embed(&self, req: EmbedRequest) -> Result<EmbedResponse, EngineError> {
        limits::check_embed(&req)?;
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
        let queued = self.stats.queued.load(Ordering::Relaxed);
        if queued >= self.config.max_queue {
            return Err(EngineError::QueueFull(queued));
        }
        let (tx, rx) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.commands.send(Command::Embed(req, tx)).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
