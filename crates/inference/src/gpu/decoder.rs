//! The CPU decoder's architectures (the llama family, Qwen 2/3 and Qwen 3 MoE, Phi 3,
//! Gemma 3) on a GPU runtime: the CPU decoder's forward pass (`model/cpu_decoder.rs`), step
//! for step, as kernel launches over device memory.
//!
//! Loading goes through the CPU decoder's GGUF reading, then uploads once: every matrix in its
//! GGUF blocks, norms as f32, the RoPE tables. Each sequence's keys and values live in device
//! memory behind its [`GpuCache`].
//!
//! A pass over rows of many sequences runs: embed → per layer (rms_norm → quantise → q/k/v
//! matvec → [Gemma: q/k norms] → rope → kv_append → attention → quantise → o matvec →
//! [Gemma: norm] → add → rms_norm → quantise → gate/up matvec → silu_mul or gelu_mul →
//! quantise → down matvec → [Gemma: norm] → add; a mixture of experts instead routes each row
//! on the device and runs only its chosen experts, see `forward.rs`) → each sequence's last
//! row gathered → final
//! norm → quantise → output matvec → logits copied back. Projections, norms and element-wise
//! steps run over all rows at once; kv_append and attention once per sequence, on its own
//! cache.
//!
//! Batch invariance: every kernel computes each row alone, in an order fixed by its block
//! size, and block sizes depend only on the model's shapes ([`launch`]). A row's logits are
//! therefore the same bits alone or batched, prefilled or decoded one token at a time.
//!
//! Its parts: [`upload`] reads and uploads the weights, [`memory`] sizes what a model needs
//! before that, [`workspace`] keeps the buffers of the passes, [`forward`] runs a pass through
//! the typed launches of [`launch`], and [`cache`] holds each sequence's keys and values.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::decoder::BatchDecoder;
use crate::error::{ForwardError, LoadError};
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, RuntimeError};

mod cache;
mod forward;
mod launch;
mod memory;
#[cfg(test)]
mod tests;
mod upload;
mod workspace;

pub use cache::GpuCache;
pub use memory::{Demand, MemoryNeed, HEADROOM};
use upload::{GpuLayer, GpuMatrix, Shape};
use workspace::Buffers;

/// Loading a model onto a GPU runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuLoadError {
    /// The file could not be opened, or is not GGUF.
    #[error(transparent)]
    File(#[from] LoadError),
    /// The architecture has no GPU decoder.
    #[error(
        "no GPU decoder for architecture `{0}` (supported: llama, mistral, gemma3, qwen2, qwen3, qwen3moe, phi3)"
    )]
    Architecture(String),
    /// The weights could not be read (missing tensors, formats the kernels do not read).
    #[error("reading the weights: {0}")]
    Weights(candle_core::Error),
    /// Uploading to the device failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The device has too little free memory for the model at the context and batch asked.
    #[error(
        "the model needs {need} of device memory but the device has {} free; lower --ctx-size or --max-batch (or --kv-memory, --prefix-cache), or run it on the CPU with --device cpu",
        memory::gib(*free)
    )]
    Memory {
        /// What the model needs.
        need: MemoryNeed,
        /// Free device memory, bytes.
        free: usize,
    },
}

/// A decoder of one of the CPU decoder's architectures whose weights and caches live on a
/// [`DeviceRuntime`].
pub struct GpuDecoder<R: DeviceRuntime> {
    runtime: Arc<R>,
    /// Tells this decoder's caches from others'.
    id: u64,
    embed: GpuMatrix<R>,
    layers: Vec<GpuLayer<R>>,
    norm: DeviceBuffer<R>,
    /// `None` when tied to the embeddings.
    output: Option<GpuMatrix<R>>,
    /// Cosine and sine tables `[max_len, head_dim / 2]`, one pair per RoPE base.
    ropes: Vec<(DeviceBuffer<R>, DeviceBuffer<R>)>,
    shape: Shape,
    /// The buffers of the last pass, kept for the next: allocating and freeing device memory
    /// on every pass would cost more than small passes themselves. Grown when a pass carries
    /// more rows or sequences; one pass at a time holds it.
    buffers: Mutex<Buffers<R>>,
}

impl<R: DeviceRuntime> fmt::Debug for GpuDecoder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuDecoder")
            .field("layers", &self.layers.len())
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    /// The runtime it runs on.
    pub fn runtime(&self) -> &Arc<R> {
        &self.runtime
    }

    /// Bytes of keys and values a sequence's cache holds per position.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.shape.n_kv_head * self.shape.head_dim * 4
    }

    /// Tokens of context it serves.
    pub fn max_len(&self) -> usize {
        self.shape.max_len
    }

    /// Entries of each logits row.
    pub fn vocab_size(&self) -> usize {
        self.shape.vocab
    }
}

impl<R: DeviceRuntime> BatchDecoder for GpuDecoder<R> {
    type Cache = GpuCache<R>;

    fn new_cache(&self) -> GpuCache<R> {
        GpuCache {
            owner: self.id,
            store: None,
            len: 0,
            layers: self.layers.len(),
            kv_w: self.shape.kv_w(),
        }
    }

    /// Always: see the module documentation.
    fn batch_invariant(&self) -> bool {
        true
    }

    fn kv_bytes_per_token(&self) -> usize {
        GpuDecoder::kv_bytes_per_token(self)
    }

    fn forward_rows(
        &self,
        caches: &mut [&mut GpuCache<R>],
        rows: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let invalid = |m: String| Err(ForwardError::InvalidBatch(m));
        if caches.len() != rows.len() {
            return invalid(format!("{} caches for {} rows", caches.len(), rows.len()));
        }
        if caches.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = self.embed.rows;
        for (c, toks) in caches.iter().zip(rows) {
            if c.owner != self.id {
                return invalid("a cache of another model".into());
            }
            if toks.is_empty() {
                return invalid("a row with no tokens".into());
            }
            if c.len + toks.len() > self.shape.max_len {
                let n = c.len + toks.len();
                return invalid(format!(
                    "{n} tokens exceed the context of {}",
                    self.shape.max_len
                ));
            }
            if let Some(&id) = toks.iter().find(|&&t| t as usize >= vocab) {
                return invalid(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                ));
            }
        }
        // Growing or unsharing a store keeps the tokens fed so far, so the caches stay as they
        // were if the pass then fails; positions it wrote past their lengths are never read.
        for (c, toks) in caches.iter_mut().zip(rows) {
            let need = c.len + toks.len();
            c.reserve(&self.runtime, need, self.shape.max_len)?;
        }
        let logits = self.run(caches, rows)?;
        for (c, toks) in caches.iter_mut().zip(rows) {
            c.len += toks.len();
        }
        Ok(logits)
    }
}
