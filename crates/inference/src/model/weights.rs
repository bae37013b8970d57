//! Loading pieces every GGUF decoder shares: the embedding/output head, per-layer tensors and
//! rotary tables.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::qembed::QEmbedding;

/// Token embeddings, final norm and output projection (tied to the embeddings when the file
/// has no `output.weight`).
pub(super) struct Head {
    pub(super) embed: QEmbedding,
    pub(super) norm: RmsNorm,
    pub(super) output: QMatMul,
}

pub(super) fn head<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    eps: f64,
    dev: &Device,
) -> Result<Head> {
    let embed_q = Arc::new(ct.tensor(r, "token_embd.weight", dev)?);
    let embed = QEmbedding::new(Arc::clone(&embed_q), dev)?;
    let output = match ct.tensor(r, "output.weight", dev) {
        Ok(t) => QMatMul::from_qtensor(t)?,
        Err(_) => QMatMul::from_arc(embed_q)?,
    };
    let norm = RmsNorm::from_qtensor(ct.tensor(r, "output_norm.weight", dev)?, eps)?;
    Ok(Head {
        embed,
        norm,
        output,
    })
}

/// Tensors of block `layer`, named as in GGUF (`blk.N.<name>.weight`).
pub(super) struct Block<'a, R> {
    pub(super) ct: &'a gguf_file::Content,
    pub(super) r: &'a mut R,
    pub(super) dev: &'a Device,
    pub(super) layer: usize,
    pub(super) eps: f64,
}

impl<R: Read + Seek> Block<'_, R> {
    pub(super) fn matmul(&mut self, name: &str) -> Result<QMatMul> {
        let t = self.ct.tensor(
            self.r,
            &format!("blk.{}.{name}.weight", self.layer),
            self.dev,
        )?;
        QMatMul::from_qtensor(t)
    }

    pub(super) fn norm(&mut self, name: &str) -> Result<RmsNorm> {
        let t = self.ct.tensor(
            self.r,
            &format!("blk.{}.{name}.weight", self.layer),
            self.dev,
        )?;
        RmsNorm::from_qtensor(t, self.eps)
    }
}

/// Cosine and sine tables `[max_len, dim / 2]` for rotary embeddings with frequency `base`.
pub(super) fn rope_tables(
    dim: usize,
    base: f32,
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), dev)?.reshape((1, dim / 2))?;
    let freqs = Tensor::arange(0, max_len as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((max_len, 1))?
        .matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
