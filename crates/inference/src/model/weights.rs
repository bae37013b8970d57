//! Loading pieces every GGUF decoder shares: the embedding/output head, per-layer tensors and
//! rotary tables.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::linear::{Linear, RawTensor};
use super::qembed::QEmbedding;

/// The blocks of the 2-D tensor `name`, as stored in the file.
pub(super) fn raw<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    name: &str,
) -> Result<RawTensor> {
    let Some(info) = ct.tensor_infos.get(name) else {
        candle_core::bail!("cannot find tensor info for {name}");
    };
    let (rows, cols) = info.shape.dims2()?;
    read_rows(ct, r, name, rows, cols)
}

/// The blocks of the 3-D tensor `name` (one `[rows, cols]` matrix per expert, as the
/// experts of a mixture are stored), as one matrix of every expert's rows in turn, and the
/// number of experts.
pub(super) fn raw_stacked<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    name: &str,
) -> Result<(RawTensor, usize)> {
    let Some(info) = ct.tensor_infos.get(name) else {
        candle_core::bail!("cannot find tensor info for {name}");
    };
    let (experts, rows, cols) = info.shape.dims3()?;
    let Some(all) = experts.checked_mul(rows) else {
        candle_core::bail!("{name}: {experts} experts of {rows} rows are too many");
    };
    Ok((read_rows(ct, r, name, all, cols)?, experts))
}

fn read_rows<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<RawTensor> {
    let Some(info) = ct.tensor_infos.get(name) else {
        candle_core::bail!("cannot find tensor info for {name}");
    };
    let (bs, ts) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
    if !cols.is_multiple_of(bs) {
        candle_core::bail!(
            "{name}: rows of {cols} values are not whole {:?} blocks",
            info.ggml_dtype
        );
    }
    let Some(len) = rows.checked_mul(cols / bs).and_then(|n| n.checked_mul(ts)) else {
        candle_core::bail!("{name}: {rows} rows of {cols} values are too many bytes");
    };
    let start = ct.tensor_data_offset.saturating_add(info.offset);
    let file_len = r.seek(SeekFrom::End(0))?;
    if file_len.saturating_sub(start) < len as u64 {
        candle_core::bail!("{name}: {len} bytes at offset {start} run past the end of the file");
    }
    r.seek(SeekFrom::Start(start))?;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(RawTensor {
        dtype: info.ggml_dtype,
        rows,
        cols,
        data: data.into(),
    })
}

/// Token embeddings, final norm and output projection (tied to the embeddings when the file
/// has no `output.weight`).
pub(super) struct Head {
    pub(super) embed: QEmbedding,
    pub(super) norm: RmsNorm,
    pub(super) output: Linear,
}

pub(super) fn head<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    eps: f64,
    dev: &Device,
) -> Result<Head> {
    let embed_t = raw(ct, r, "token_embd.weight")?;
    let embed = QEmbedding::new(&embed_t, dev)?;
    // Tied heads share the embedding's bytes.
    let output = if ct.tensor_infos.contains_key("output.weight") {
        Linear::new(&raw(ct, r, "output.weight")?, dev)?
    } else {
        Linear::new(&embed_t, dev)?
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
    ct: &'a gguf_file::Content,
    r: &'a mut R,
    dev: &'a Device,
    pub(super) layer: usize,
    eps: f64,
}

impl<R: Read + Seek> Block<'_, R> {
    pub(super) fn matmul(&mut self, name: &str) -> Result<Linear> {
        let t = raw(
            self.ct,
            self.r,
            &format!("blk.{}.{name}.weight", self.layer),
        )?;
        Linear::new(&t, self.dev)
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

/// The seven projections of a llama-style block: attention and SwiGLU/GeGLU feed-forward.
#[derive(Debug, Clone)]
pub(super) struct Projections {
    pub(super) wq: Linear,
    pub(super) wk: Linear,
    pub(super) wv: Linear,
    pub(super) wo: Linear,
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
}

/// Loads `blocks` layers in file order: each block's projections, then `build` makes the
/// layer from them and the block (whose norms differ between architectures).
pub(super) fn layers<R: Read + Seek, L>(
    ct: &gguf_file::Content,
    r: &mut R,
    dev: &Device,
    blocks: usize,
    eps: f64,
    mut build: impl FnMut(Projections, &mut Block<'_, R>) -> Result<L>,
) -> Result<Vec<L>> {
    let mut layers = Vec::with_capacity(blocks);
    for layer in 0..blocks {
        let mut blk = Block {
            ct,
            r: &mut *r,
            dev,
            layer,
            eps,
        };
        let projections = Projections {
            wq: blk.matmul("attn_q")?,
            wk: blk.matmul("attn_k")?,
            wv: blk.matmul("attn_v")?,
            wo: blk.matmul("attn_output")?,
            gate: blk.matmul("ffn_gate")?,
            up: blk.matmul("ffn_up")?,
            down: blk.matmul("ffn_down")?,
        };
        layers.push(build(projections, &mut blk)?);
    }
    Ok(layers)
}

/// Cosine and sine tables `[max_len, dim / 2]` for rotary embeddings with frequency `base`,
/// every angle multiplied by `freq_scale` (linear scaling: 1 / its factor; 1 for none).
pub(super) fn rope_tables(
    dim: usize,
    base: f32,
    freq_scale: f32,
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| freq_scale / base.powf(i as f32 / dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), dev)?.reshape((1, dim / 2))?;
    let freqs = Tensor::arange(0, max_len as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((max_len, 1))?
        .matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
