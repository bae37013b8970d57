//! pod's local inference engine.
//!
//! Chat models are loaded from GGUF files (projections on pod's fused quantised CPU kernels,
//! [`kernels`], or candle's on other devices and formats), with the tokenizer and
//! chat template taken from the file's own metadata. Sentence-embedding models (BERT family) are
//! loaded from safetensors plus `tokenizer.json`. One [`Engine`] thread owns every loaded model;
//! callers talk to it through the cloneable [`EngineHandle`], sending a request and receiving a
//! stream of [`GenerateEvent`]s. Nothing here touches the network.
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
pub mod tokenizer;

/// The compute device type models are loaded onto.
pub use candle_core::Device;
pub use chat::{ChatMessage, Role};
pub use decoder::{BatchDecoder, DecoderCache};
pub use device::DeviceSpec;
pub use embedding::{Embedding, EmbeddingModel};
pub use engine::{
    ChatFormat, EmbedRequest, EmbedResponse, Engine, EngineConfig, EngineHandle, EngineStats,
    FinishReason, GenerateEvent, GenerateRequest, ModelInfo, ModelKind, Prompt, Resume,
    TokenLogprob, Usage,
};
pub use error::{EngineError, ForwardError, LoadError};
pub use model::{ChatModel, ChatModelInfo, Sequence};
pub use sampling::SamplingParams;

/// CPU threads inference uses when none are configured: one per physical core available to
/// this process.
pub fn default_threads() -> usize {
    candle_core::utils::get_num_threads()
}
