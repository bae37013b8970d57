//! Pipeline stages: a model's blocks split over several pods.
//!
//! The pod holding block 0 (the *head*) is a [`ChatModel`](super::ChatModel) like any other
//! for the engine: it tokenizes, samples and streams. Its forward pass runs its own blocks,
//! then hands the hidden states to a [`Downstream`], which runs the remaining blocks on other
//! pods (each a [`StageModel`]) and returns the logits. The head keeps, for each sequence, the
//! hidden states it has handed on (one row per position), so that a downstream stage that was
//! replaced can be rebuilt by replaying them: every stage computes each row the same way
//! whatever the batch, so a replayed cache is the one that was lost, bit for bit.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::cpu_decoder::{CpuDecoder, KvCache, StageInput};
use crate::error::{ForwardError, LoadError};
use crate::gguf::GgufFile;

pub use super::cpu_decoder::StageOutput;

/// A contiguous range of a model's blocks: `start..end`, written `first-last` (inclusive) on
/// the command line and in listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// The first block.
    pub start: usize,
    /// One past the last block.
    pub end: usize,
}

impl LayerRange {
    /// Blocks in the range.
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses `first-last` (inclusive block numbers, e.g. `0-14`) or a single block `n`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a block range like 0-14");
        let (a, b) = text
            .trim()
            .split_once('-')
            .unwrap_or((text.trim(), text.trim()));
        let first: usize = a.trim().parse().map_err(|_| bad())?;
        let last: usize = b.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(format!("block range {text} ends before it starts"));
        }
        Ok(Self {
            start: first,
            end: last + 1,
        })
    }
}

impl std::str::FromStr for LayerRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end.saturating_sub(1))
    }
}

/// Facts about a stage's model, to check that stages fit together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageInfo {
    /// `general.architecture` of the GGUF file.
    pub architecture: String,
    /// The blocks held.
    pub layers: LayerRange,
    /// Blocks of the whole model.
    pub total_layers: usize,
    /// Values per hidden state.
    pub hidden_size: usize,
    /// Positions a sequence may hold.
    pub context_length: usize,
}

/// The block count and architecture of a GGUF chat model, read from its metadata.
pub fn block_count(path: &Path) -> Result<(String, usize), LoadError> {
    let file = GgufFile::open(path)?;
    let arch = file.architecture()?;
    let blocks = blocks_of(&file, &arch)?;
    Ok((arch, blocks))
}

/// What each part of a GGUF chat model takes in memory on a stage, from its tensor directory:
/// what `--layers auto` sizes a range of blocks by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSizes {
    /// Bytes of each block's tensors, block 0 first.
    pub blocks: Vec<u64>,
    /// Bytes of the token embeddings (`token_embd.weight`).
    pub embeddings: u64,
    /// Bytes of the output norm (`output_norm.weight`).
    pub output_norm: u64,
    /// Bytes of the output head (`output.weight`); `None` where the model has none and the
    /// embedding table is the head (tied), so the last stage holds that table.
    pub output: Option<u64>,
    /// Bytes of attention cache one position takes in one block: keys and values, as f32.
    pub kv_per_position: u64,
}

impl StageSizes {
    /// Reads the sizes of the model at `path`.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let arch = file.architecture()?;
        let total = blocks_of(&file, &arch)?;
        let md = |key: &str| file.uint(&format!("{arch}.{key}"));
        let missing = |key: &str| LoadError::Metadata {
            key: format!("{arch}.{key}"),
        };
        let heads = md("attention.head_count").ok_or_else(|| missing("attention.head_count"))?;
        let kv_heads = md("attention.head_count_kv").unwrap_or(heads);
        let hidden = md("embedding_length").ok_or_else(|| missing("embedding_length"))?;
        let head_dim = md("attention.key_length").unwrap_or(hidden / heads.max(1));
        let mut sizes = Self {
            blocks: vec![0; total],
            embeddings: 0,
            output_norm: 0,
            output: None,
            kv_per_position: 2 * kv_heads * head_dim * 4,
        };
        for (name, info) in &file.content.tensor_infos {
            let dtype = info.ggml_dtype;
            let bytes =
                (info.shape.elem_count() / dtype.block_size().max(1) * dtype.type_size()) as u64;
            let block = name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(n, _)| n.parse::<usize>().ok());
            match (block, name.as_str()) {
                (Some(i), _) => {
                    if let Some(b) = sizes.blocks.get_mut(i) {
                        *b += bytes;
                    }
                }
                (None, "token_embd.weight") => sizes.embeddings += bytes,
                (None, "output_norm.weight") => sizes.output_norm += bytes,
                (None, "output.weight") => sizes.output = Some(bytes),
                // Other tensors (e.g. rope factors) are small; counted with the embeddings.
                (None, _) => sizes.embeddings += bytes,
            }
        }
        Ok(sizes)
    }

    /// Blocks of the whole model.
    pub fn total_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes a stage of blocks `range` holds, as the CPU decoder loads it (the embeddings on
    /// the stage holding block 0, the output norm and head on the one holding the last),
    /// with room for `kv_positions` cached positions in each block.
    pub fn bytes(&self, range: LayerRange, kv_positions: u64) -> u64 {
        let end = range.end.min(self.blocks.len());
        let start = range.start.min(end);
        let blocks: u64 = self.blocks[start..end].iter().sum();
        let first = start == 0;
        let last = end == self.blocks.len();
        let embeddings = if first || (last && self.output.is_none()) {
            self.embeddings
        } else {
            0
        };
        let head = if last {
            self.output_norm + self.output.unwrap_or(0)
        } else {
            0
        };
        blocks + embeddings + head + self.kv_per_position * kv_positions * (end - start) as u64
    }
}

fn blocks_of(file: &GgufFile, arch: &str) -> Result<usize, LoadError> {
    let key = format!("{arch}.block_count");
    file.uint(&key)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or(LoadError::Metadata { key })
}

/// Opens `path` and reads the decoder of blocks `range`, for contexts of at most
/// `max_context` tokens. Returns it with the architecture and the model's block count.
pub(super) fn load_decoder(
    path: &Path,
    range: LayerRange,
    max_context: usize,
) -> Result<(CpuDecoder, String, usize), LoadError> {
    let file = GgufFile::open(path)?;
    let arch = file.architecture()?;
    let total = blocks_of(&file, &arch)?;
    if range.is_empty() || range.end > total {
        return Err(LoadError::Device(format!(
            "blocks {range} are not within the model's {total} (0-{})",
            total.saturating_sub(1)
        )));
    }
    if !super::cpu_decoder::ARCHITECTURES.contains(&arch.as_str()) {
        return Err(LoadError::Device(format!(
            "pipeline stages run on pod's CPU decoder, which does not run `{arch}`"
        )));
    }
    let context = file.servable_context().min(max_context);
    let GgufFile {
        content,
        mut reader,
        path,
    } = file;
    let decoder = CpuDecoder::from_gguf_range(&content, &mut reader, &arch, context, Some(range))
        .map_err(|source| LoadError::Model { path, source })?;
    Ok((decoder, arch, total))
}

/// A pipeline stage that does not hold block 0: it is fed hidden states and returns hidden
/// states, or logits where it holds the last block.
#[derive(Debug)]
pub struct StageModel {
    decoder: CpuDecoder,
    info: StageInfo,
}

/// One sequence's attention cache on a [`StageModel`].
#[derive(Debug, Clone, Default)]
pub struct StageCache(KvCache);

impl StageCache {
    /// Positions fed so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }
}

impl StageModel {
    /// Loads blocks `range` of the GGUF chat model at `path` (not starting at block 0: that
    /// stage is a [`ChatModel`](super::ChatModel) head), for contexts of at most
    /// `max_context` tokens.
    pub fn load(path: &Path, range: LayerRange, max_context: usize) -> Result<Self, LoadError> {
        if range.start == 0 {
            return Err(LoadError::Device(
                "the stage holding block 0 is loaded as a chat model".into(),
            ));
        }
        let (decoder, architecture, total_layers) = load_decoder(path, range, max_context)?;
        let info = StageInfo {
            architecture,
            layers: range,
            total_layers,
            hidden_size: decoder.hidden_size(),
            context_length: decoder.max_len(),
        };
        Ok(Self { decoder, info })
    }

    /// What this stage is.
    pub fn info(&self) -> &StageInfo {
        &self.info
    }

    /// A new, empty cache for a sequence.
    pub fn new_cache(&self) -> StageCache {
        StageCache(self.decoder.new_cache())
    }

    /// Feeds `rows[s]` (positions × hidden values) to `caches[s]` for every `s` in one pass.
    /// On error every cache is left as it was.
    pub fn forward(
        &self,
        caches: &mut [&mut StageCache],
        rows: &[&[f32]],
    ) -> Result<StageOutput, ForwardError> {
        let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let mut inner: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c.0).collect();
        let out = self
            .decoder
            .forward_stage(&mut inner, StageInput::Hidden(rows));
        if out.is_err() {
            for (c, len) in inner.iter_mut().zip(lens) {
                c.truncate(len);
            }
        }
        Ok(out?)
    }
}

/// One sequence's rows for the blocks after the head's.
#[derive(Debug, Clone, Copy)]
pub struct DownstreamRow<'a> {
    /// The sequence, unique in this process (a copy of a sequence gets a new id).
    pub id: u64,
    /// The hidden states after the head's last block, of every position fed so far
    /// (positions × hidden values): what a replaced stage is rebuilt from.
    pub history: &'a [f32],
    /// The first position of this pass: rows before it were handed on in earlier passes
    /// (unless a stage was replaced since).
    pub new_from: usize,
    /// Values per hidden state (the history holds whole rows of them).
    pub hidden: usize,
    /// The sequence this one was copied from, if it was: where the stages still hold that
    /// one, they can copy its caches instead of being sent the shared positions again.
    pub parent: Option<u64>,
}

/// What runs the blocks after the head's: stages on other pods.
pub trait Downstream: Send + Sync + fmt::Debug + 'static {
    /// Runs `rows` through the remaining blocks and returns each sequence's next-token
    /// logits, in order. Blocks: the engine thread waits for the stages.
    fn forward(&self, rows: &[DownstreamRow<'_>]) -> Result<Vec<Vec<f32>>, ForwardError>;

    /// The sequence `id` is gone: the stages may free its caches.
    fn release(&self, id: u64);

    /// Who runs the remaining blocks now, for logs and listings.
    fn describe(&self) -> String;
}

/// The head of a pipeline: blocks from 0 on, then the downstream stages.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) decoder: CpuDecoder,
    pub(super) downstream: Arc<dyn Downstream>,
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// A head sequence's tie to the downstream stages: its id there and the hidden states handed
/// on. A copy is a new sequence downstream (rebuilt from the copied states when first used);
/// dropping it frees the sequence on the stages.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) id: u64,
    pub(super) history: Vec<f32>,
    /// The link this one is a copy of.
    parent: Option<u64>,
    downstream: Arc<dyn Downstream>,
}

impl Link {
    pub(super) fn new(downstream: &Arc<dyn Downstream>) -> Self {
        Self {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            history: Vec::new(),
            parent: None,
            downstream: Arc::clone(downstream),
        }
    }
}

impl Clone for Link {
    fn clone(&self) -> Self {
        let mut copy = Self::new(&self.downstream);
        copy.history.clone_from(&self.history);
        copy.parent = Some(self.id);
        copy
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.downstream.release(self.id);
    }
}

/// A head's pass: `tokens[i]` through the head's blocks for `caches[i]`, the new hidden
/// states appended to `links[i]`, then the downstream stages. On error every cache and link
/// is left as it was.
pub(super) fn head_forward(
    head: &Head,
    caches: &mut [&mut KvCache],
    links: &mut [&mut Link],
    tokens: &[&[u32]],
) -> Result<Vec<Vec<f32>>, ForwardError> {
    let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
    let d = head.decoder.hidden_size();
    let undo = |caches: &mut [&mut KvCache], links: &mut [&mut Link]| {
        for ((c, l), &len) in caches.iter_mut().zip(links.iter_mut()).zip(&lens) {
            c.truncate(len);
            l.history.truncate(len * d);
        }
    };
    let hidden = match head
        .decoder
        .forward_stage(caches, StageInput::Tokens(tokens))
    {
        Ok(StageOutput::Hidden(h)) => h,
        Ok(StageOutput::Logits(_)) => {
            undo(caches, links);
            return Err(ForwardError::InvalidBatch(
                "the head holds every block".into(),
            ));
        }
        Err(e) => {
            undo(caches, links);
            return Err(e.into());
        }
    };
    for ((l, h), &len) in links.iter_mut().zip(hidden).zip(&lens) {
        l.history.truncate(len * d);
        l.history.extend_from_slice(&h);
    }
    let rows: Vec<DownstreamRow<'_>> = links
        .iter()
        .zip(&lens)
        .map(|(l, &len)| DownstreamRow {
            id: l.id,
            history: &l.history,
            new_from: len,
            hidden: d,
            parent: l.parent,
        })
        .collect();
    let out = head.downstream.forward(&rows);
    drop(rows);
    match out {
        Ok(logits) if logits.len() == links.len() => Ok(logits),
        Ok(logits) => {
            undo(caches, links);
            Err(ForwardError::InvalidBatch(format!(
                "the stages returned {} rows of logits for {} sequences",
                logits.len(),
                links.len()
            )))
        }
        Err(e) => {
            undo(caches, links);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::gpu::synthetic::{self, shapes};
    use crate::model::ChatModel;

    /// Downstream stages run in this process, one batched pass per stage.
    #[derive(Debug)]
    struct Local {
        stages: Vec<StageModel>,
        caches: Mutex<HashMap<u64, Vec<StageCache>>>,
        released: Mutex<Vec<u64>>,
    }

    impl Local {
        fn new(stages: Vec<StageModel>) -> Arc<Self> {
            Arc::new(Self {
                stages,
                caches: Mutex::default(),
                released: Mutex::default(),
            })
        }

        /// Forgets every cache, as a replaced stage would.
        fn forget(&self) {
            self.caches.lock().unwrap().clear();
        }
    }

    impl Downstream for Local {
        fn forward(&self, rows: &[DownstreamRow<'_>]) -> Result<Vec<Vec<f32>>, ForwardError> {
            let d = rows.first().map_or(1, |r| r.hidden);
            let mut all = self.caches.lock().unwrap();
            let mut taken: Vec<Vec<StageCache>> = rows
                .iter()
                .map(|r| {
                    all.remove(&r.id)
                        .unwrap_or_else(|| self.stages.iter().map(StageModel::new_cache).collect())
                })
                .collect();
            let mut input: Vec<Vec<f32>> = rows
                .iter()
                .zip(taken.iter_mut())
                .map(|(r, caches)| {
                    let start = caches[0].len().min(r.new_from);
                    for c in caches.iter_mut() {
                        c.truncate(start);
                    }
                    r.history[start * d..].to_vec()
                })
                .collect();
            let mut logits = Vec::new();
            for (j, stage) in self.stages.iter().enumerate() {
                let mut caches: Vec<&mut StageCache> =
                    taken.iter_mut().map(|c| &mut c[j]).collect();
                let refs: Vec<&[f32]> = input.iter().map(Vec::as_slice).collect();
                match stage.forward(&mut caches, &refs)? {
                    StageOutput::Hidden(h) => input = h,
                    StageOutput::Logits(l) => logits = l,
                }
            }
            for (r, c) in rows.iter().zip(taken) {
                all.insert(r.id, c);
            }
            Ok(logits)
        }

        fn release(&self, id: u64) {
            self.caches.lock().unwrap().remove(&id);
            self.released.lock().unwrap().push(id);
        }

        fn describe(&self) -> String {
            "local stages".into()
        }
    }

    /// A four-block llama with random weights.
    fn model(dir: &Path) -> std::path::PathBuf {
        let mut shape = shapes::shape("tiny", "q8_0").unwrap();
        let layer = shape.layer_formats[0];
        shape.layer_formats = vec![layer; 4];
        let path = dir.join("four.gguf");
        synthetic::write_chat_model(&path, 7, &shape).unwrap();
        path
    }

    fn range(start: usize, end: usize) -> LayerRange {
        LayerRange { start, end }
    }

    #[test]
    fn stage_sizes_account_for_every_tensor_and_the_parts_each_stage_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = model(dir.path());
        let sizes = StageSizes::read(&path).unwrap();
        assert_eq!(sizes.total_layers(), 4);
        // The same formats in every block: the same size.
        assert!(sizes.blocks[0] > 0);
        assert!(sizes.blocks.iter().all(|b| *b == sizes.blocks[0]));
        assert!(sizes.embeddings > 0 && sizes.output_norm > 0);
        // Every tensor's bytes are counted once, and they all fit in the file.
        let file = GgufFile::open(&path).unwrap();
        let tensors: u64 = file
            .content
            .tensor_infos
            .values()
            .map(|i| {
                (i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64
            })
            .sum();
        let whole = sizes.bytes(range(0, 4), 0);
        let tied = sizes.output.is_none();
        assert_eq!(whole, tensors);
        assert!(whole <= std::fs::metadata(&path).unwrap().len());
        let block = sizes.blocks[0];
        assert_eq!(sizes.bytes(range(1, 3), 0), 2 * block);
        assert_eq!(sizes.bytes(range(0, 2), 0), 2 * block + sizes.embeddings);
        let head = sizes.output_norm + sizes.output.unwrap_or(sizes.embeddings);
        assert_eq!(sizes.bytes(range(2, 4), 0), 2 * block + head);
        if tied {
            // The whole model holds its embedding table once.
            assert_eq!(whole, 4 * block + sizes.embeddings + sizes.output_norm);
        }
        // The attention cache: keys and values of every KV head, f32, per position and block.
        let shape = shapes::shape("tiny", "q8_0").unwrap();
        let kv = 2 * (shape.kv_heads * shape.head_dim() * 4) as u64;
        assert_eq!(sizes.kv_per_position, kv);
        assert_eq!(sizes.bytes(range(1, 3), 10), 2 * block + 2 * 10 * kv);
    }

    #[test]
    fn ranges_parse_and_print_inclusively() {
        assert_eq!(LayerRange::parse("0-14").unwrap(), range(0, 15));
        assert_eq!(LayerRange::parse("7").unwrap(), range(7, 8));
        assert_eq!(LayerRange::parse("15-29").unwrap().to_string(), "15-29");
        assert!(LayerRange::parse("9-3").is_err());
        assert!(LayerRange::parse("a-b").is_err());
        assert!(LayerRange::parse("-3").is_err());
    }

    #[test]
    fn a_model_split_in_three_gives_the_whole_models_logits_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = model(dir.path());
        let whole = ChatModel::load(&path, &candle_core::Device::Cpu).unwrap();
        let local = Local::new(vec![
            StageModel::load(&path, range(1, 3), 1024).unwrap(),
            StageModel::load(&path, range(3, 4), 1024).unwrap(),
        ]);
        let downstream: Arc<dyn Downstream> = local.clone();
        let head = ChatModel::load_head(&path, range(0, 1), downstream).unwrap();
        assert!(head.batch_invariant());
        assert_eq!(head.head_range(), Some(range(0, 1)));

        let prompts: [&[u32]; 2] = [&[1, 5, 9, 200, 3], &[7, 7, 300]];
        let mut w: Vec<_> = prompts.iter().map(|_| whole.new_sequence()).collect();
        let mut h: Vec<_> = prompts.iter().map(|_| head.new_sequence()).collect();
        let mut want = whole
            .forward_batch(&mut w.iter_mut().collect::<Vec<_>>(), &prompts)
            .unwrap();
        let mut got = head
            .forward_batch(&mut h.iter_mut().collect::<Vec<_>>(), &prompts)
            .unwrap();
        assert_eq!(got, want);
        let argmax =
            |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
        for step in 0..6 {
            let next: Vec<[u32; 1]> = want.iter().map(|l| [argmax(l)]).collect();
            let rows: Vec<&[u32]> = next.iter().map(|n| &n[..]).collect();
            if step == 3 {
                // Every downstream cache lost: rebuilt from the head's hidden states.
                local.forget();
            }
            want = whole
                .forward_batch(&mut w.iter_mut().collect::<Vec<_>>(), &rows)
                .unwrap();
            got = head
                .forward_batch(&mut h.iter_mut().collect::<Vec<_>>(), &rows)
                .unwrap();
            assert_eq!(got, want, "step {step}");
        }

        // A copy continues on its own (a new sequence downstream), as does a truncated one.
        let mut copy = h[0].clone();
        assert!(copy.truncate(4));
        let mut whole_copy = w[0].clone();
        assert!(whole_copy.truncate(4));
        assert_eq!(
            copy.forward(&[42, 43]).unwrap(),
            whole_copy.forward(&[42, 43]).unwrap()
        );
        let copy_id = match &copy.state {
            super::super::SeqState::Head { link, .. } => link.id,
            _ => unreachable!(),
        };
        drop(copy);
        assert!(local.released.lock().unwrap().contains(&copy_id));
    }

    #[test]
    fn stages_refuse_what_they_do_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = model(dir.path());
        assert!(StageModel::load(&path, range(0, 2), 1024).is_err());
        assert!(StageModel::load(&path, range(2, 5), 1024).is_err());
        let tail = StageModel::load(&path, range(2, 4), 1024).unwrap();
        assert_eq!(tail.info().total_layers, 4);
        let mut cache = tail.new_cache();
        // Not whole rows of the hidden size.
        let err = tail.forward(&mut [&mut cache], &[&[0.5; 100]]);
        assert!(err.is_err());
        assert_eq!(cache.len(), 0);
        let out = tail.forward(&mut [&mut cache], &[&[0.01; 512]]).unwrap();
        assert!(matches!(out, StageOutput::Logits(ref l) if l.len() == 1 && l[0].len() == 512));
        assert_eq!(cache.len(), 2);
        let downstream: Arc<dyn Downstream> = Local::new(vec![tail]);
        assert!(ChatModel::load_head(&path, range(0, 4), downstream.clone()).is_err());
        assert!(ChatModel::load_head(&path, range(1, 2), downstream).is_err());
    }
}
