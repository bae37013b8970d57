//! Sentence embeddings from BERT-family models (safetensors weights + `tokenizer.json`).
//!
//! Texts are tokenized, truncated at the model's limit, run through the encoder in padded
//! batches, mean-pooled over the attention mask and L2-normalised, as sentence-transformers
//! does for all-MiniLM-L6-v2.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::LoadError;

/// Texts per forward pass: the engine embeds this many between generation steps.
pub const EMBED_BATCH: usize = 32;

/// One embedded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The unit-length vector.
    pub vector: Vec<f32>,
    /// Tokens the model saw (after truncation, special tokens included).
    pub tokens: usize,
}

/// A loaded sentence-embedding model.
pub struct EmbeddingModel {
    model: BertModel,
    tokenizer: Tokenizer,
    max_tokens: usize,
    dimension: usize,
    device: Device,
}

impl fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("max_tokens", &self.max_tokens)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })
}

fn config_err(path: &Path, reason: impl fmt::Display) -> LoadError {
    LoadError::Config {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl EmbeddingModel {
    /// Loads a model directory holding `config.json`, `tokenizer.json`, `model.safetensors` and
    /// optionally sentence-transformers' `sentence_bert_config.json` (for the token limit).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let config_path = dir.join("config.json");
        let config: Config =
            serde_json::from_str(&read(&config_path)?).map_err(|e| config_err(&config_path, e))?;
        let st_path = dir.join("sentence_bert_config.json");
        let max_tokens = if st_path.exists() {
            let v: serde_json::Value =
                serde_json::from_str(&read(&st_path)?).map_err(|e| config_err(&st_path, e))?;
            v.get("max_seq_length")
                .and_then(serde_json::Value::as_u64)
                .map_or(config.max_position_embeddings, |n| n as usize)
        } else {
            config.max_position_embeddings
        }
        .min(config.max_position_embeddings);

        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| LoadError::Tokenizer(e.to_string()))?;

        let weights_path: PathBuf = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|source| {
            LoadError::Model {
                path: weights_path.clone(),
                source,
            }
        })?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = BertModel::load(vb, &config).map_err(|source| LoadError::Model {
            path: weights_path,
            source,
        })?;
        Ok(Self {
            model,
            tokenizer,
            max_tokens,
            dimension: config.hidden_size,
            device: device.clone(),
        })
    }

    /// Length of the vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Tokens beyond this are cut off.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Embeds each text; the result has one entry per input, in order.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Embedding>, String> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(EMBED_BATCH) {
            out.extend(self.embed_batch(chunk)?);
        }
        Ok(out)
    }

    /// Embeds texts in one forward pass (padded to the longest); callers keep batches to
    /// about [`EMBED_BATCH`] texts.
    pub fn embed_batch(&self, texts: &[String]) -> Result<Vec<Embedding>, String> {
        self.forward_batch(texts).map_err(|e| e.to_string())
    }

    fn forward_batch(
        &self,
        texts: &[String],
    ) -> Result<Vec<Embedding>, Box<dyn std::error::Error + Send + Sync>> {
        let encodings = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_str(), true))
            .collect::<Result<Vec<_>, _>>()?;
        let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let n = encodings.len();
        let mut ids = vec![0u32; n * longest];
        let mut mask = vec![0u32; n * longest];
        for (row, enc) in encodings.iter().enumerate() {
            for (col, id) in enc.get_ids().iter().enumerate() {
                ids[row * longest + col] = *id;
                mask[row * longest + col] = 1;
            }
        }
        let ids = Tensor::from_vec(ids, (n, longest), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, longest), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?;
        let counts = maskf.sum(1)?.clamp(1.0, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let vectors: Vec<Vec<f32>> = mean.broadcast_div(&norm)?.to_vec2()?;
        Ok(vectors
            .into_iter()
            .zip(&encodings)
            .map(|(vector, enc)| Embedding {
                vector,
                tokens: enc.len(),
            })
            .collect())
    }
}
