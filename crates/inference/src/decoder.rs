//! The seam between the engine and the models it drives: a decoder that runs one forward pass
//! over rows of many sequences, each sequence with its own attention cache.
//!
//! The engine schedules; a [`BatchDecoder`] computes. The CPU models ([`ChatModel`]) implement
//! it today; a GPU backend implements the same trait, keeping its caches on the device behind
//! the [`DecoderCache`] handles the engine holds.
//!
//! [`ChatModel`]: crate::model::ChatModel

use crate::error::ForwardError;

/// One sequence's attention cache, or a handle to it where the cache lives on a device.
///
/// The engine owns these: one per running sequence, plus copies kept in its prefix cache.
pub trait DecoderCache: Clone + Send + 'static {
    /// Tokens fed so far.
    fn len(&self) -> usize;

    /// Whether nothing was fed yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the first `len` tokens fed, so a copy can continue from a shared prefix or a
    /// failed pass can be undone. Returns whether it was done (caches of models that are not
    /// [batch-invariant](BatchDecoder::batch_invariant) may refuse).
    fn truncate(&mut self, len: usize) -> bool;

    /// Bytes the cache holds (0 where the model does not say: such caches are never kept for
    /// reuse).
    fn bytes(&self) -> usize;

    /// Gives back memory reserved for tokens not fed yet (for a cache kept but not growing).
    fn shrink_to_fit(&mut self);
}

/// A model the engine can drive: it feeds rows of tokens to many sequences at once and returns
/// each sequence's next-token logits.
pub trait BatchDecoder: Send + 'static {
    /// The per-sequence cache this decoder fills.
    type Cache: DecoderCache;

    /// A new, empty cache for a sequence.
    fn new_cache(&self) -> Self::Cache;

    /// Whether every token's logits come out the same, bit for bit, whatever the batch around
    /// them and however a sequence's tokens are split into passes. The engine then batches
    /// all sequences into one pass, feeds resumed tokens many at a time and reuses cached
    /// prompt prefixes; otherwise it runs each sequence alone and replays resumed tokens one
    /// by one.
    fn batch_invariant(&self) -> bool;

    /// Bytes a sequence's cache grows by per token fed (0 where the model does not say: the
    /// engine's KV memory budget then does not count its sequences).
    fn kv_bytes_per_token(&self) -> usize {
        0
    }

    /// Feeds `rows[i]` (at least one token) to `caches[i]` for every `i` and returns the
    /// logits of the token after each row, in order. On error every cache is left as it was.
    fn forward_rows(
        &self,
        caches: &mut [&mut Self::Cache],
        rows: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError>;
}
