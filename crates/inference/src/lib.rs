//! pod's local inference engine.
//!
//! Chat models are loaded from GGUF files (projections on pod's fused quantised CPU kernels,
//! [`kernels`], or candle's on other devices and formats), with the tokenizer and
//! chat template taken from the file's own metadata. Sentence-embedding models (BERT family) are
//! loaded from safetensors plus `tokenizer.json`. One [`Engine`] thread owns every loaded model;
//! callers talk to it through the cloneable [`EngineHandle`], sending a request and receiving a
//! stream of [`GenerateEvent`]s. Nothing here touches the network.
//!
//! Where things live:
//! - [`engine`]: the engine thread, its handle, scheduling, batching and the token pipeline
//!   (its module doc lists its files);
//! - [`decoder`]: [`BatchDecoder`], the trait the engine drives models through (the seam for
//!   other backends);
//! - [`model`]: [`ChatModel`], GGUF chat models: `model/cpu_decoder.rs` (pod's CPU decoder),
//!   `model/llama.rs` and `model/gemma3.rs` (candle, other devices), shared loading in
//!   `model/weights.rs`;
//! - [`kernels`]: the fused quantised CPU matrix kernels; [`gpu`]: GPU kernels and runtimes;
//! - [`tokenizer`], [`template`], [`chat`]: text in; [`sampling`], [`stop`], [`json`]: choosing
//!   tokens and ending completions;
//! - [`embedding`]: BERT sentence embeddings; [`gguf`]: reading GGUF files; [`device`]: picking
//!   a compute device; [`error`]: the error types;
//! - `test_utils` (in tests and with the `test-utils` feature): a deterministic test decoder
//!   for tests of the engine.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chat;
pub mod decoder;
pub mod device;
pub mod embedding;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod gpu;
pub mod json;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod stop;
pub mod template;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod tokenizer;

/// The compute device type models are loaded onto.
pub use candle_core::Device;
pub use chat::{ChatMessage, Role};
pub use decoder::{BatchDecoder, DecoderCache};
pub use device::{DeviceSpec, Placement};
pub use embedding::{Embedding, EmbeddingModel};
pub use engine::{
    ChatFormat, EmbedRequest, EmbedResponse, Engine, EngineConfig, EngineHandle, EngineStats,
    FinishReason, GenerateEvent, GenerateRequest, ModelInfo, ModelKind, Prompt, Resume,
    TokenLogprob, Usage,
};
pub use error::{EngineError, ForwardError, LoadError};
pub use model::{decoder_architectures, ChatModel, ChatModelInfo, Sequence};
pub use sampling::SamplingParams;

/// CPU threads inference uses when none are configured: one per physical core available to
/// this process.
pub fn default_threads() -> usize {
    candle_core::utils::get_num_threads()
}
