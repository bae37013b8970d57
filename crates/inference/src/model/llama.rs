//! The llama family (Llama 2/3, Mistral, SmolLM) from GGUF.
//!
//! Per layer: RMSNorm → attention (RoPE on q and k, grouped-query attention, causal mask) →
//! residual; RMSNorm → SwiGLU MLP → residual. Unlike candle-transformers' version this keeps
//! the token embeddings quantised and sizes rotary tables to the model's own context, and its
//! projections run on pod's fused kernels on the CPU, each layer's input quantised once for
//! q/k/v and once for gate/up.

use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::linear::{forward_many, Linear};
use super::qembed::QEmbedding;
use super::weights;

#[derive(Debug, Clone)]
struct Layer {
    proj: weights::Projections,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    kv: Option<(Tensor, Tensor)>,
}

/// Llama weights plus one sequence's KV cache.
#[derive(Debug, Clone)]
pub(crate) struct Llama {
    embed: QEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// NeoX-style (halves) rotation instead of interleaved pairs.
    neox: bool,
}

fn causal_mask(seq_len: usize, pos: usize, dev: &Device) -> Result<Tensor> {
    let kv_len = pos + seq_len;
    let m: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (seq_len, kv_len), dev)
}

impl Llama {
    pub(crate) fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: gguf_file::Content,
        r: &mut R,
        arch: &str,
        max_len: usize,
        dev: &Device,
    ) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing {arch}.{k}")))
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(n_head, |v| v as usize);
        let blocks = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = hidden / n_head;
        let rope_dim = md("rope.dimension_count")
            .and_then(|v| v.to_u32())
            .map_or(head_dim, |v| v as usize);
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);

        let (cos, sin) = weights::rope_tables(rope_dim, base, 1.0, max_len, dev)?;
        let head = weights::head(&ct, r, eps, dev)?;
        let layers = weights::layers(&ct, r, dev, blocks, eps, |p, blk| {
            Ok(Layer {
                proj: p,
                attn_norm: blk.norm("attn_norm")?,
                ffn_norm: blk.norm("ffn_norm")?,
                kv: None,
            })
        })?;
        Ok(Self {
            embed: head.embed,
            layers,
            norm: head.norm,
            output: head.output,
            cos,
            sin,
            n_head,
            n_kv_head,
            head_dim,
            neox: false,
        })
    }

    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        let x = x.contiguous()?;
        if self.neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }

    /// Logits of the token after `tokens` (shape `[1, vocab]`).
    pub(crate) fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let seq_len = tokens.len();
        let dev = self.cos.device().clone();
        let mut x = self.embed.lookup(tokens)?.unsqueeze(0)?;
        let mask = if seq_len > 1 {
            Some(causal_mask(seq_len, pos, &dev)?)
        } else {
            None
        };
        let (n_head, n_kv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        for li in 0..self.layers.len() {
            let layer = &self.layers[li];
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = forward_many([&layer.proj.wq, &layer.proj.wk, &layer.proj.wv], &h)?;
            let q = q.reshape((1, seq_len, n_head, hd))?.transpose(1, 2)?;
            let k = k.reshape((1, seq_len, n_kv, hd))?.transpose(1, 2)?;
            let v = v
                .reshape((1, seq_len, n_kv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = self.rope(&q, pos)?;
            let k = self.rope(&k, pos)?;
            let layer = &mut self.layers[li];
            let (k, v) = match layer.kv.take() {
                Some((pk, pv)) if pos > 0 => {
                    (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
                }
                _ => (k, v),
            };
            layer.kv = Some((k.clone(), v.clone()));
            let rep = n_head / n_kv;
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            if let Some(m) = &mask {
                att = att.broadcast_add(m)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, seq_len, n_head * hd))?;
            x = (layer.proj.wo.forward(&y)? + x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [g, u] = forward_many([&layer.proj.gate, &layer.proj.up], &h)?;
            x = (layer.proj.down.forward(&(candle_nn::ops::silu(&g)? * u)?)? + x)?;
        }
        let last = x.i((.., seq_len - 1, ..))?.contiguous()?;
        self.output.forward(&self.norm.forward(&last)?)
    }
}
