//! Finished sequences kept so that a request starting with the same tokens (a shared system
//! prompt, the next turn of a conversation) continues from their attention cache instead of
//! recomputing it. Only batch-invariant models' caches are kept: elsewhere a reused prefix
//! would not give the logits a fresh pass gives.

use std::collections::VecDeque;

use crate::decoder::DecoderCache;

/// Shortest shared prefix worth reusing.
pub(super) const MIN_PREFIX: usize = 16;

/// One kept sequence: its model, every token fed to it, and its cache.
#[derive(Debug)]
struct Kept<C> {
    model: String,
    tokens: Vec<u32>,
    cache: C,
}

/// Kept caches, least recently used first; the oldest go once the caches exceed the byte
/// budget.
#[derive(Debug)]
pub(super) struct PrefixCache<C> {
    entries: VecDeque<Kept<C>>,
    bytes: usize,
}

impl<C> Default for PrefixCache<C> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<C: DecoderCache> PrefixCache<C> {
    /// Keeps `cache`, which was fed `tokens`, within `budget` bytes over all entries.
    pub(super) fn store(&mut self, model: &str, tokens: Vec<u32>, mut cache: C, budget: usize) {
        cache.shrink_to_fit();
        let size = cache.bytes();
        if tokens.len() < MIN_PREFIX || size == 0 || size > budget {
            return;
        }
        // An entry that is a prefix of this one is redundant now.
        let mut kept = VecDeque::with_capacity(self.entries.len() + 1);
        for e in self.entries.drain(..) {
            if e.model == model && tokens.starts_with(&e.tokens) {
                self.bytes -= e.cache.bytes();
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        self.bytes += size;
        self.entries.push_back(Kept {
            model: model.to_owned(),
            tokens,
            cache,
        });
        while self.bytes > budget {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.cache.bytes(),
                None => break,
            }
        }
    }

    /// Bytes the kept caches hold.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the least recently used entry; returns whether there was one.
    pub(super) fn evict_oldest(&mut self) -> bool {
        match self.entries.pop_front() {
            Some(e) => {
                self.bytes -= e.cache.bytes();
                true
            }
            None => false,
        }
    }

    /// A copy of the kept cache sharing the longest prefix with `context`, cut to that prefix
    /// (always leaving at least one token of `context` to feed), and that prefix's length.
    pub(super) fn lookup(&mut self, model: &str, context: &[u32]) -> Option<(C, usize)> {
        let (best, common) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model == model)
            .map(|(i, e)| {
                let common = e
                    .tokens
                    .iter()
                    .zip(context)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, common.min(context.len().saturating_sub(1)))
            })
            .max_by_key(|&(_, common)| common)?;
        if common < MIN_PREFIX {
            return None;
        }
        let entry = self.entries.remove(best)?;
        let mut cache = entry.cache.clone();
        self.entries.push_back(entry);
        cache.truncate(common).then_some((cache, common))
    }
}
