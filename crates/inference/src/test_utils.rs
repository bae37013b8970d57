//! Test fixtures: [`TestDecoder`], a tiny chat decoder whose next token is a fixed function of
//! the previous token and its position ([`next_token`]), so tests of the engine's scheduling
//! know every output in advance and can read back which rows each forward pass ran.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::decoder::{BatchDecoder, DecoderCache};
use crate::engine::ChatFormat;
use crate::error::{ForwardError, LoadError};
use crate::model::ChatModelInfo;
use crate::template::ChatTemplate;
use crate::tokenizer::PodTokenizer;

/// Tokens in the test vocabulary: `<eos>`, then `w1`, `w2`...
pub const VOCAB: usize = 64;
/// The token that ends a completion.
pub const EOS: u32 = 0;
/// A token the decoder fails on, in any pass that feeds it; it never generates it.
pub const POISON: u32 = VOCAB as u32 - 1;
/// Context length the test model announces.
pub const CONTEXT: usize = 4096;
/// Bytes a [`TestCache`] counts per token held.
pub const KV_BYTES_PER_TOKEN: usize = 64;

/// The token the test decoder predicts after `last`, fed at position `pos - 1` (so `pos`
/// tokens are in the cache). Never [`EOS`] nor [`POISON`].
pub fn next_token(last: u32, pos: usize) -> u32 {
    1 + ((last as usize + pos) % (VOCAB - 2)) as u32
}

/// The first `count` tokens greedy decoding generates after `prompt`.
pub fn completion(prompt: &[u32], count: usize) -> Vec<u32> {
    let mut fed = prompt.to_vec();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let last = fed.last().copied().unwrap_or(EOS);
        let next = next_token(last, fed.len());
        out.push(next);
        fed.push(next);
    }
    out
}

/// One row of a recorded forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The cache's id: caches are numbered as [`BatchDecoder::new_cache`] makes them, and a
    /// copy keeps its original's id.
    pub cache: u64,
    /// Tokens the cache held before the row.
    pub start: usize,
    /// The row's tokens.
    pub tokens: Vec<u32>,
}

/// The rows of every forward pass that succeeded, in order.
pub type PassLog = Arc<Mutex<Vec<Vec<Row>>>>;

/// A [`TestDecoder`]'s cache: the tokens fed.
#[derive(Debug, Clone)]
pub struct TestCache {
    id: u64,
    tokens: Vec<u32>,
}

impl DecoderCache for TestCache {
    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn truncate(&mut self, len: usize) -> bool {
        self.tokens.truncate(len);
        true
    }

    fn bytes(&self) -> usize {
        self.tokens.len() * KV_BYTES_PER_TOKEN
    }

    fn shrink_to_fit(&mut self) {
        self.tokens.shrink_to_fit();
    }
}

/// A deterministic decoder for engine tests: one-hot logits at [`next_token`].
#[derive(Debug)]
pub struct TestDecoder {
    invariant: bool,
    delay: Duration,
    next_id: AtomicU64,
    log: PassLog,
}

impl TestDecoder {
    /// A decoder that says it is batch-invariant or not (it is, either way).
    pub fn new(invariant: bool) -> Self {
        Self {
            invariant,
            delay: Duration::ZERO,
            next_id: AtomicU64::new(0),
            log: PassLog::default(),
        }
    }

    /// The same, sleeping `delay` in each forward pass, so that tests can act while sequences
    /// are still running.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// The log of its forward passes, readable after the decoder moved into an engine.
    pub fn log(&self) -> PassLog {
        Arc::clone(&self.log)
    }

    /// Its text side: a word-level tokenizer over the test vocabulary and a template that
    /// joins the messages' contents.
    pub fn format(&self) -> Result<ChatFormat, LoadError> {
        let words: Vec<String> = std::iter::once("<eos>".to_owned())
            .chain((1..VOCAB).map(|i| format!("w{i}")))
            .collect();
        let tokenizer = PodTokenizer::word_level(&words, EOS)?;
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m.content }} {% endfor %}",
            "",
            "<eos>",
        )?;
        Ok(ChatFormat {
            info: ChatModelInfo {
                architecture: "test".into(),
                quantization: "F32".into(),
                context_length: CONTEXT,
                vocab_size: tokenizer.vocab_size(),
            },
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
        })
    }
}

impl BatchDecoder for TestDecoder {
    type Cache = TestCache;

    fn new_cache(&self) -> TestCache {
        TestCache {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tokens: Vec::new(),
        }
    }

    fn batch_invariant(&self) -> bool {
        self.invariant
    }

    fn kv_bytes_per_token(&self) -> usize {
        KV_BYTES_PER_TOKEN
    }

    fn forward_rows(
        &self,
        caches: &mut [&mut TestCache],
        rows: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        if caches.len() != rows.len() || rows.iter().any(|r| r.is_empty()) {
            return Err(ForwardError::InvalidBatch(format!(
                "{} caches for {} rows",
                caches.len(),
                rows.len()
            )));
        }
        if rows.iter().any(|r| r.contains(&POISON)) {
            return Err(ForwardError::Compute("poisoned row".into()));
        }
        std::thread::sleep(self.delay);
        let mut pass = Vec::with_capacity(rows.len());
        let mut logits = Vec::with_capacity(rows.len());
        for (cache, row) in caches.iter_mut().zip(rows) {
            pass.push(Row {
                cache: cache.id,
                start: cache.tokens.len(),
                tokens: row.to_vec(),
            });
            cache.tokens.extend_from_slice(row);
            let last = cache.tokens.last().copied().unwrap_or(EOS);
            let mut l = vec![0.0f32; VOCAB];
            l[next_token(last, cache.tokens.len()) as usize] = 1.0;
            logits.push(l);
        }
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pass);
        Ok(logits)
    }
}
