//! Chat models loaded from GGUF, one interface over every supported architecture.
//!
//! A [`ChatModel`] holds the weights once; each sequence being generated gets a [`Sequence`]
//! with its own KV cache. Weights are reference-counted, so starting a sequence copies no
//! tensor data.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_phi3, quantized_qwen3};

mod gemma3;
mod llama;
mod qembed;
mod weights;

use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::template::{ChatTemplate, CHATML_TEMPLATE};
use crate::tokenizer::PodTokenizer;

/// Longest context served: rotary tables and worst-case KV caches grow with it, and the small
/// models pod ships default to are not useful beyond it.
const MAX_CONTEXT: usize = 8192;

#[derive(Debug, Clone)]
enum Weights {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
    Qwen3(quantized_qwen3::ModelWeights),
    Phi3(quantized_phi3::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
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
#[derive(Debug)]
pub struct Sequence {
    weights: Weights,
    pos: usize,
    device: Device,
}

impl ChatModel {
    /// Loads a GGUF chat model onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, LoadError> {
        let file = GgufFile::open(path)?;
        let arch = file.architecture()?;
        let tokenizer = PodTokenizer::from_gguf(&file)?;
        let template_src = file
            .string("tokenizer.chat_template")
            .unwrap_or(CHATML_TEMPLATE)
            .to_owned();
        let template =
            ChatTemplate::new(&template_src, tokenizer.bos_text(), tokenizer.eos_text())?;
        let trained_ctx = file.context_length().unwrap_or(2048);
        // candle's llama implementation precomputes rotary tables for a fixed window.
        let context_length = match arch.as_str() {
            "llama" | "mistral" | "gemma3" => trained_ctx.min(MAX_CONTEXT),
            _ => trained_ctx,
        };
        let quantization = file.quantization();
        let GgufFile {
            content,
            mut reader,
            path,
        } = file;
        let model_err = |source| LoadError::Model {
            path: path.clone(),
            source,
        };
        let weights = match arch.as_str() {
            "llama" | "mistral" => Weights::Llama(
                llama::Llama::from_gguf(content, &mut reader, &arch, context_length, device)
                    .map_err(model_err)?,
            ),
            "gemma3" => Weights::Gemma3(
                gemma3::Gemma3::from_gguf(content, &mut reader, context_length, device)
                    .map_err(model_err)?,
            ),
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
        tracing::debug!(architecture = %arch, context_length, %quantization, "chat model loaded");
        Ok(Self {
            weights,
            info: ChatModelInfo {
                architecture: arch,
                quantization,
                context_length,
                vocab_size: tokenizer.vocab_size(),
            },
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            device: device.clone(),
        })
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
        Sequence {
            weights: self.weights.clone(),
            pos: 0,
            device: self.device.clone(),
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
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let out = self.weights.forward(&input, self.pos)?;
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
}
