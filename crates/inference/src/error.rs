//! Error types of the inference crate, one enum per failing operation.

use std::path::PathBuf;

/// Loading a model from disk failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid GGUF file (bad magic, truncated, unknown tensor type...).
    #[error("{path} is not a valid GGUF model: {reason}")]
    InvalidGguf {
        /// File that failed.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A metadata key the model needs is missing or has the wrong type.
    #[error("GGUF metadata key `{key}` is missing or invalid")]
    Metadata {
        /// The key.
        key: String,
    },
    /// The model's architecture has no implementation here.
    #[error(
        "unsupported model architecture `{0}` (supported: llama, mistral, gemma3, qwen2, qwen3, qwen3moe, phi3)"
    )]
    UnsupportedArchitecture(String),
    /// The tokenizer described in the metadata cannot be built.
    #[error("cannot build tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template in the metadata does not compile.
    #[error("invalid chat template: {0}")]
    Template(String),
    /// Building the model's tensors failed.
    #[error("cannot build model from {path}: {source}")]
    Model {
        /// File that failed.
        path: PathBuf,
        /// Underlying candle error.
        source: candle_core::Error,
    },
    /// An embedding model's configuration file is invalid.
    #[error("invalid model configuration {path}: {reason}")]
    Config {
        /// File that failed.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The requested compute device is not available in this build or on this machine.
    #[error("{0}")]
    Device(String),
}

/// A request to the engine failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EngineError {
    /// No loaded model has that name.
    #[error("model `{0}` is not loaded")]
    UnknownModel(String),
    /// The model exists but cannot serve this kind of request (e.g. chat on an embedding model).
    #[error("model `{model}` does not support {what}")]
    WrongKind {
        /// The model.
        model: String,
        /// The unsupported operation.
        what: String,
    },
    /// Prompt plus requested completion do not fit the model's context window.
    #[error("prompt has {prompt_tokens} tokens{requested}, over the model's context length of {context_length} tokens", requested = if *max_tokens > 0 { format!(" and {max_tokens} more were requested") } else { String::new() })]
    ContextLength {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Completion tokens asked for (0 when only the prompt is over).
        max_tokens: usize,
        /// The model's window.
        context_length: usize,
    },
    /// The request is malformed (empty prompt, bad parameter...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The engine's queue is full; try again later.
    #[error("the engine queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The engine thread has stopped.
    #[error("the inference engine has stopped")]
    Stopped,
    /// The model failed while computing.
    #[error("inference failed: {0}")]
    Internal(String),
    /// No node that serves the model could take or finish the request (peers gone or busy).
    #[error("{0}")]
    Unavailable(String),
}

/// A batched forward pass of a [`BatchDecoder`](crate::decoder::BatchDecoder) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForwardError {
    /// The rows do not fit the caches: counts differ, a row is empty, or a cache belongs to
    /// another model.
    #[error("{0}")]
    InvalidBatch(String),
    /// The model failed while computing.
    #[error("{0}")]
    Compute(String),
    /// Part of the model runs elsewhere (pipeline stages on other pods) and cannot be
    /// reached: says what is missing.
    #[error("{0}")]
    Unavailable(String),
}

impl From<candle_core::Error> for ForwardError {
    fn from(e: candle_core::Error) -> Self {
        ForwardError::Compute(e.to_string())
    }
}
