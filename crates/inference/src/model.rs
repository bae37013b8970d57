//! Chat models loaded from GGUF, one interface over every supported architecture.
//!
//! A [`ChatModel`] holds the weights once; each sequence being generated gets a [`Sequence`]
//! with its own KV cache. Weights are reference-counted, so starting a sequence copies no
//! tensor data.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_phi3, quantized_qwen3};

pub(crate) mod cpu_decoder;
mod gemma3;
mod linear;
mod llama;
mod qembed;
pub mod stage;
mod weights;

use self::cpu_decoder::{CpuDecoder, KvCache};
use self::stage::{Downstream, Head, LayerRange, Link};
use crate::decoder::{BatchDecoder, DecoderCache};
use crate::engine::EngineConfig;
use crate::error::{ForwardError, LoadError};
use crate::gguf::GgufFile;
use crate::gpu::decoder::{Demand, GpuLoadError};
use crate::gpu::runtime::any::AnyRuntime;
use crate::gpu::{GpuCache, GpuDecoder};
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::PodTokenizer;

#[derive(Debug, Clone)]
enum Weights {
    /// The llama family and Gemma 3 on pod's own CPU path (see [`cpu_decoder`]), batched and
    /// batch-invariant.
    CpuDecoder(Arc<CpuDecoder>),
    /// The llama family and Gemma 3 on a GPU (or the kernel emulator), batch-invariant too.
    Gpu(Arc<GpuDecoder<AnyRuntime>>),
    /// The first blocks on pod's CPU decoder, the rest on pipeline stages of other pods.
    Head(Arc<Head>),
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
    Qwen3(quantized_qwen3::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::CpuDecoder(_) | Weights::Gpu(_) | Weights::Head(_) => {
                candle_core::bail!("pod's decoders keep their own caches")
            }
            Weights::Llama(m) => {
                let ids: Vec<u32> = x.flatten_all()?.to_vec1()?;
                m.forward(&ids, pos)
            }
            Weights::Gemma3(m) => m.forward(x, pos),
            Weights::Qwen3(m) => m.forward(x, pos),
            Weights::Phi3(m) => m.forward(x, pos),
        }
    }
}

/// Facts about a loaded chat model, for listings and capability announcements.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatModelInfo {
    /// `general.architecture` of the GGUF file.
    pub architecture: String,
    /// Dominant tensor type, e.g. `Q4_1`.
    pub quantization: String,
    /// Tokens of context this build can attend to.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// A chat model ready to generate: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct ChatModel {
    weights: Weights,
    tokenizer: Arc<PodTokenizer>,
    template: Arc<ChatTemplate>,
    info: ChatModelInfo,
    device: Device,
}

/// Attention caches of one sequence plus the position of its next token.
#[derive(Debug, Clone)]
pub struct Sequence {
    state: SeqState,
    pos: usize,
    device: Device,
}

#[derive(Debug, Clone)]
enum SeqState {
    CpuDecoder {
        model: Arc<CpuDecoder>,
        cache: KvCache,
    },
    Gpu {
        model: Arc<GpuDecoder<AnyRuntime>>,
        cache: GpuCache<AnyRuntime>,
    },
    Head {
        model: Arc<Head>,
        cache: KvCache,
        link: Link,
    },
    /// candle's models keep the caches inside their own copy of the (shared) weights.
    Candle(Weights),
}

/// The architectures pod's own decoders run: the CPU decoder's (on any CPU), then the GPU
/// decoder's (the same, mixtures of experts included). Other
/// architectures, and these where a decoder cannot take the model, run on candle's kernels
/// where candle has them.
pub fn decoder_architectures() -> (&'static [&'static str], Vec<&'static str>) {
    let cpu = &cpu_decoder::ARCHITECTURES[..];
    (cpu, cpu.to_vec())
}

impl ChatModel {
    /// Loads a GGUF chat model onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let text = TextSide::read(&file)?;
        let arch = text.arch.clone();
        let context_length = text.context_length;
        let GgufFile {
            mut content,
            mut reader,
            path,
        } = file;
        // The tokenizer is built: its vocabulary arrays (large for 256k-token models) need not
        // stay in memory while the weights load.
        content
            .metadata
            .retain(|key, _| !key.starts_with("tokenizer.ggml."));
        let model_err = |source| LoadError::Model {
            path: path.clone(),
            source,
        };
        let decoder = CpuDecoder::supported(&content, &arch, device);
        match &decoder {
            // qwen2 and qwen3moe have no other path: their errors below say why.
            Err(_) if arch == "qwen2" || arch == "qwen3moe" => {}
            // A tensor type alone keeps the model off the decoder: a loss worth a warning.
            Err(why) if why.starts_with("tensor ") => {
                tracing::warn!(architecture = %arch, "on candle's kernels: {why}");
            }
            Err(why) => tracing::info!(architecture = %arch, "not on pod's CPU decoder: {why}"),
            Ok(()) => tracing::info!(
                architecture = %arch,
                kernels = %crate::kernels::cpu_level(),
                "on pod's CPU decoder"
            ),
        }
        let weights = match arch.as_str() {
            _ if decoder.is_ok() => Weights::CpuDecoder(Arc::new(
                CpuDecoder::from_gguf(&content, &mut reader, &arch, context_length)
                    .map_err(model_err)?,
            )),
            "llama" | "mistral" => Weights::Llama(
                llama::Llama::from_gguf(content, &mut reader, &arch, context_length, device)
                    .map_err(model_err)?,
            ),
            "gemma3" => Weights::Gemma3(
                gemma3::Gemma3::from_gguf(content, &mut reader, context_length, device)
                    .map_err(model_err)?,
            ),
            "qwen2" => {
                let why = decoder.err().unwrap_or_default();
                return Err(LoadError::Device(format!(
                    "qwen2 models need pod's CPU decoder or a GPU: {why}"
                )));
            }
            "qwen3moe" => {
                let why = decoder.err().unwrap_or_default();
                return Err(LoadError::Device(format!(
                    "qwen3moe models need pod's CPU decoder: {why}"
                )));
            }
            "qwen3" => Weights::Qwen3(
                quantized_qwen3::ModelWeights::from_gguf(content, &mut reader, device)
                    .map_err(model_err)?,
            ),
            "phi3" => Weights::Phi3(
                quantized_phi3::ModelWeights::from_gguf(false, content, &mut reader, device)
                    .map_err(model_err)?,
            ),
            other => return Err(LoadError::UnsupportedArchitecture(other.to_owned())),
        };
        tracing::debug!(architecture = %arch, context_length, quantization = %text.quantization, "chat model loaded");
        Ok(text.into_model(weights, device.clone()))
    }

    /// Loads a GGUF chat model of an architecture the GPU decoder runs onto a GPU runtime, for
    /// the sequences, pass sizes and context that `engine` will ask of it. Fails, having left
    /// nothing on the device, when the device has too little free memory for that, saying how
    /// much is needed and what to lower.
    pub fn load_gpu(
        path: &Path,
        runtime: Arc<AnyRuntime>,
        engine: &EngineConfig,
    ) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let text = TextSide::read(&file)?;
        let asked = engine.max_context.map_or(text.context_length, |cap| {
            text.context_length.min(cap.max(1))
        });
        // The GPU serves the whole context, as the CPU does; the engine cuts it to what the KV
        // memory budget holds for one sequence.
        let context = asked;
        let demand = Demand {
            sequences: engine.max_active.max(1),
            rows_per_pass: engine.prefill_chunk.max(engine.max_active),
            prefix_cache_bytes: engine.prefix_cache_bytes,
            kv_budget_bytes: engine.kv_memory_bytes,
            fit_context: engine.max_context.is_none(),
        };
        let GgufFile {
            content,
            mut reader,
            path,
        } = file;
        let device = runtime.describe();
        let (decoder, need) = GpuDecoder::load_within(
            runtime,
            &content,
            &mut reader,
            &text.arch,
            context,
            demand,
        )
        .map_err(|e| match e {
            GpuLoadError::File(e) => e,
            GpuLoadError::Architecture(arch) => LoadError::Device(format!(
                "{device}: pod's GPU decoder does not run architecture `{arch}` (it runs llama, mistral, gemma3, qwen2, qwen3, qwen3moe and phi3); run it with --device cpu"
            )),
            GpuLoadError::Weights(source) => LoadError::Model { path, source },
            other => LoadError::Device(format!("{device}: {other}")),
        })?;
        tracing::info!(device = %device, need = %need, "chat model uploaded to the GPU");
        let mut text = text;
        // The device may hold less than the context asked for (cut when none was set).
        text.context_length = context.min(need.context);
        Ok(text.into_model(Weights::Gpu(Arc::new(decoder)), Device::Cpu))
    }

    /// Loads blocks `range` (from block 0 on, not to the last) of a GGUF chat model as the
    /// head of a pipeline: the embeddings and those blocks on pod's CPU decoder, the
    /// remaining blocks run by `downstream`.
    pub fn load_head(
        path: &Path,
        range: LayerRange,
        downstream: Arc<dyn Downstream>,
    ) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let text = TextSide::read(&file)?;
        drop(file);
        if range.start != 0 {
            return Err(LoadError::Device(format!(
                "blocks {range} do not start the model: only a stage holding block 0 is a head"
            )));
        }
        let (decoder, _, total) = stage::load_decoder(path, range, text.context_length)?;
        if range.end >= total {
            return Err(LoadError::Device(format!(
                "blocks {range} are the whole model: load it as one"
            )));
        }
        tracing::debug!(blocks = %range, total, "pipeline head loaded");
        let head = Head {
            decoder,
            downstream,
        };
        Ok(text.into_model(Weights::Head(Arc::new(head)), Device::Cpu))
    }

    /// The blocks this model runs itself, where it is a pipeline head.
    pub fn head_range(&self) -> Option<LayerRange> {
        match &self.weights {
            Weights::Head(h) => Some(h.decoder.range()),
            _ => None,
        }
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<PodTokenizer> {
        &self.tokenizer
    }

    /// The model's chat template.
    pub fn template(&self) -> &Arc<ChatTemplate> {
        &self.template
    }

    /// Architecture, quantisation, context length.
    pub fn info(&self) -> &ChatModelInfo {
        &self.info
    }

    /// A new, empty sequence (its own KV cache; weights shared).
    pub fn new_sequence(&self) -> Sequence {
        let state = match &self.weights {
            Weights::CpuDecoder(m) => SeqState::CpuDecoder {
                model: Arc::clone(m),
                cache: m.new_cache(),
            },
            Weights::Gpu(m) => SeqState::Gpu {
                model: Arc::clone(m),
                cache: m.new_cache(),
            },
            Weights::Head(m) => SeqState::Head {
                model: Arc::clone(m),
                cache: m.decoder.new_cache(),
                link: Link::new(&m.downstream),
            },
            other => SeqState::Candle(other.clone()),
        };
        Sequence {
            state,
            pos: 0,
            device: self.device.clone(),
        }
    }

    /// Whether this model computes every token's logits the same way alone or batched, in a
    /// prompt or decoded one by one (bit for bit): then [`forward_batch`](Self::forward_batch)
    /// runs all sequences in one pass, many resumed tokens can be fed at once, and a cached
    /// prompt prefix can stand in for recomputing it.
    pub fn batch_invariant(&self) -> bool {
        matches!(
            self.weights,
            Weights::CpuDecoder(_) | Weights::Gpu(_) | Weights::Head(_)
        )
    }

    /// Bytes a sequence's attention cache grows by per token (0 for candle's models, whose
    /// caches pod does not see).
    pub fn kv_bytes_per_token(&self) -> usize {
        match &self.weights {
            Weights::CpuDecoder(m) => m.kv_bytes_per_token(),
            Weights::Gpu(m) => m.kv_bytes_per_token(),
            // The head's blocks' keys and values, plus the hidden state kept per position
            // for the stages.
            Weights::Head(h) => {
                h.decoder.kv_bytes_per_token()
                    + h.decoder.hidden_size() * std::mem::size_of::<f32>()
            }
            _ => 0,
        }
    }

    /// Where the model runs: `cpu` (pod's CPU decoder), `candle`, or the GPU's name.
    pub fn runs_on(&self) -> String {
        match &self.weights {
            Weights::CpuDecoder(_) => "cpu".to_owned(),
            Weights::Gpu(m) => m.runtime().spec(),
            Weights::Head(h) => format!(
                "cpu (blocks {}), then {}",
                h.decoder.range(),
                h.downstream.describe()
            ),
            _ => format!("candle ({})", device_name(&self.device)),
        }
    }

    /// Feeds `tokens[i]` to `seqs[i]` for every `i` and returns each sequence's next-token
    /// logits. Batch-invariant models do this in one pass; others one sequence after the
    /// other. On error the sequences are left as they were.
    pub fn forward_batch(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[&[u32]],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if seqs.len() != tokens.len() {
            candle_core::bail!("{} sequences for {} token lists", seqs.len(), tokens.len());
        }
        if let Weights::Head(model) = &self.weights {
            return forward_heads(model, seqs, tokens)
                .map_err(|e| candle_core::Error::Msg(e.to_string()));
        }
        if let Weights::Gpu(model) = &self.weights {
            let mut caches = Vec::with_capacity(seqs.len());
            for s in seqs.iter_mut() {
                match &mut s.state {
                    SeqState::Gpu { cache, .. } => caches.push(cache),
                    _ => candle_core::bail!("sequence of another model"),
                }
            }
            let out = model
                .forward_rows(&mut caches, tokens)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            for (s, t) in seqs.iter_mut().zip(tokens) {
                s.pos += t.len();
            }
            return Ok(out);
        }
        let Weights::CpuDecoder(model) = &self.weights else {
            return seqs
                .iter_mut()
                .zip(tokens)
                .map(|(s, t)| s.forward(t))
                .collect();
        };
        let mut caches = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            match &mut s.state {
                SeqState::CpuDecoder { cache, .. } => caches.push(cache),
                _ => candle_core::bail!("sequence of another model"),
            }
        }
        let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let out = model.forward_batch(&mut caches, tokens);
        if out.is_err() {
            for (c, len) in caches.iter_mut().zip(lens) {
                c.truncate(len);
            }
            return out;
        }
        for (s, t) in seqs.iter_mut().zip(tokens) {
            s.pos += t.len();
        }
        out
    }
}

/// A pipeline head's pass over `seqs` (see [`stage::head_forward`]).
fn forward_heads(
    model: &Head,
    seqs: &mut [&mut Sequence],
    tokens: &[&[u32]],
) -> Result<Vec<Vec<f32>>, ForwardError> {
    let mut caches = Vec::with_capacity(seqs.len());
    let mut links = Vec::with_capacity(seqs.len());
    for s in seqs.iter_mut() {
        match &mut s.state {
            SeqState::Head { cache, link, .. } => {
                caches.push(cache);
                links.push(link);
            }
            _ => {
                return Err(ForwardError::InvalidBatch(
                    "sequence of another model".into(),
                ))
            }
        }
    }
    let out = stage::head_forward(model, &mut caches, &mut links, tokens)?;
    for (s, t) in seqs.iter_mut().zip(tokens) {
        s.pos += t.len();
    }
    Ok(out)
}

/// candle's name of a device.
fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// What a chat model needs besides its weights: tokenizer, template and facts, read from the
/// GGUF metadata.
struct TextSide {
    arch: String,
    tokenizer: PodTokenizer,
    template: ChatTemplate,
    context_length: usize,
    quantization: String,
}

impl TextSide {
    fn read(file: &GgufFile) -> Result<Self, LoadError> {
        let arch = file.architecture()?;
        let tokenizer = PodTokenizer::from_gguf(file)?;
        let template_src = file
            .string("tokenizer.chat_template")
            .unwrap_or(CHATML_TEMPLATE)
            .to_owned();
        let template =
            ChatTemplate::new(&template_src, tokenizer.bos_text(), tokenizer.eos_text())?;
        let context_length = file.servable_context();
        Ok(Self {
            quantization: file.quantization(),
            arch,
            tokenizer,
            template,
            context_length,
        })
    }

    fn into_model(self, weights: Weights, device: Device) -> ChatModel {
        ChatModel {
            weights,
            info: ChatModelInfo {
                architecture: self.arch,
                quantization: self.quantization,
                context_length: self.context_length,
                vocab_size: self.tokenizer.vocab_size(),
            },
            tokenizer: Arc::new(self.tokenizer),
            template: Arc::new(self.template),
            device,
        }
    }
}

impl Sequence {
    /// Runs `tokens` through the model after everything fed so far and returns the logits of
    /// the next token.
    pub fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        if tokens.is_empty() {
            candle_core::bail!("forward called with no tokens");
        }
        let weights = match &mut self.state {
            SeqState::CpuDecoder { model, cache } => {
                let len = cache.len();
                let out = model.forward_batch(&mut [&mut *cache], &[tokens]);
                return match out {
                    Ok(mut logits) => {
                        self.pos += tokens.len();
                        logits
                            .pop()
                            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
                    }
                    Err(e) => {
                        cache.truncate(len);
                        Err(e)
                    }
                };
            }
            SeqState::Gpu { model, cache } => {
                let logits = model
                    .forward_rows(&mut [&mut *cache], &[tokens])
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                self.pos += tokens.len();
                return logits
                    .into_iter()
                    .next()
                    .ok_or_else(|| candle_core::Error::Msg("no logits".into()));
            }
            SeqState::Head { model, .. } => {
                let model = Arc::clone(model);
                let mut logits = forward_heads(&model, &mut [self], &[tokens])
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                return logits
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("no logits".into()));
            }
            SeqState::Candle(w) => w,
        };
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let out = weights.forward(&input, self.pos)?;
        self.pos += tokens.len();
        let vocab = out.dims().last().copied().unwrap_or(0);
        let flat = out.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let n = flat.elem_count();
        flat.narrow(0, n - vocab, vocab)?.to_vec1()
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Bytes of attention cache this sequence holds (0 where the model does not say).
    pub fn cache_bytes(&self) -> usize {
        match &self.state {
            SeqState::CpuDecoder { cache, .. } => cache.bytes(),
            SeqState::Gpu { cache, .. } => cache.bytes(),
            SeqState::Head { cache, link, .. } => {
                cache.bytes() + link.history.len() * std::mem::size_of::<f32>()
            }
            SeqState::Candle(_) => 0,
        }
    }

    /// Gives back cache memory reserved for tokens not fed yet (for a sequence that is kept
    /// but will not grow soon).
    pub fn shrink_to_fit(&mut self) {
        match &mut self.state {
            SeqState::CpuDecoder { cache, .. } => cache.shrink_to_fit(),
            SeqState::Gpu { cache, .. } => cache.shrink_to_fit(),
            SeqState::Head { cache, link, .. } => {
                cache.shrink_to_fit();
                link.history.shrink_to_fit();
            }
            SeqState::Candle(_) => {}
        }
    }

    /// Keeps only the first `len` tokens fed, so that a copy of a sequence can continue from a
    /// shared prefix. Only batch-invariant models can; returns whether it was done.
    pub fn truncate(&mut self, len: usize) -> bool {
        match &mut self.state {
            SeqState::CpuDecoder { cache, .. } if len <= self.pos => {
                cache.truncate(len);
                self.pos = len;
                true
            }
            SeqState::Gpu { cache, .. } if len <= self.pos => {
                cache.truncate(len);
                self.pos = len;
                true
            }
            SeqState::Head { model, cache, link } if len <= self.pos => {
                cache.truncate(len);
                link.history.truncate(len * model.decoder.hidden_size());
                self.pos = len;
                true
            }
            _ => false,
        }
    }
}

impl BatchDecoder for ChatModel {
    type Cache = Sequence;

    fn new_cache(&self) -> Sequence {
        self.new_sequence()
    }

    fn batch_invariant(&self) -> bool {
        ChatModel::batch_invariant(self)
    }

    fn kv_bytes_per_token(&self) -> usize {
        ChatModel::kv_bytes_per_token(self)
    }

    fn forward_rows(
        &self,
        caches: &mut [&mut Sequence],
        rows: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        if caches.len() != rows.len() {
            return Err(ForwardError::InvalidBatch(format!(
                "{} sequences for {} rows",
                caches.len(),
                rows.len()
            )));
        }
        if let Weights::Head(model) = &self.weights {
            // Errors of the stages keep their kind (unreachable stages are not a bug).
            return forward_heads(model, caches, rows);
        }
        if let [cache] = caches {
            // One sequence: its own pass, whatever the model.
            return Ok(vec![cache.forward(rows[0])?]);
        }
        Ok(self.forward_batch(caches, rows)?)
    }
}

impl DecoderCache for Sequence {
    fn len(&self) -> usize {
        Sequence::len(self)
    }

    fn truncate(&mut self, len: usize) -> bool {
        Sequence::truncate(self, len)
    }

    fn bytes(&self) -> usize {
        self.cache_bytes()
    }

    fn shrink_to_fit(&mut self) {
        Sequence::shrink_to_fit(self)
    }
}
