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
//! continues from their attention cache. Embedding requests wait in the same queue and run one
//! batch of texts per turn of the loop, so a long one does not stall the running generations.
//!
//! Where things live:
//! - [`types`]: the public request, response and event types, the limits and the counters;
//! - [`handle`]: [`EngineHandle`], the client side, and the commands it sends;
//! - [`limits`]: what one request may ask (stops, log-probabilities, embedding inputs),
//!   checked for every caller;
//! - `admission`: checks, tokenisation and resume replay, on the caller's thread;
//! - `event_loop`: [`Engine`], the thread that owns the models and runs the loop;
//! - `scheduler`: the batching policy (which sequences step together, prompt chunking,
//!   admission order), pure logic;
//! - `forward`: the batched forward pass with the per-sequence fallback;
//! - `pipeline`: each sequence's tokens through sampling, logprobs, detokenising, stops, JSON
//!   mode and events;
//! - `prefix_cache`: finished sequences' caches kept for requests with the same start.
//!
//! The engine drives chat models through [`BatchDecoder`](crate::decoder::BatchDecoder), so
//! any backend that implements it can be served.

mod admission;
mod event_loop;
mod forward;
pub mod handle;
pub mod limits;
mod pipeline;
mod prefix_cache;
mod scheduler;
pub mod types;

pub use event_loop::Engine;
pub use handle::{ChatFormat, EngineHandle};
pub use types::{
    EmbedRequest, EmbedResponse, EngineConfig, EngineStats, FinishReason, GenerateEvent,
    GenerateRequest, ModelInfo, ModelKind, Prompt, Resume, TokenLogprob, Usage,
};
