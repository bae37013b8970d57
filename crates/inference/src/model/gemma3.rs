//! Gemma 3 from GGUF. candle-transformers ships a quantised Gemma 3, but its feed-forward uses
//! SiLU where Gemma uses tanh-approximated GELU, which shifts the next-token distribution far
//! from the reference; this implementation follows the architecture (and llama.cpp) exactly.
//!
//! Per layer: RMSNorm → attention (q/k RMSNorm, NeoX RoPE with a local or global base,
//! sliding-window mask on local layers) → RMSNorm → residual; RMSNorm → GELU-gated MLP →
//! RMSNorm → residual. Embeddings are scaled by √hidden; the output head is tied.

use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::linear::{forward_many, Linear};
use super::qembed::QEmbedding;
use super::weights;

/// Gemma 3 repeats five local (sliding-window) layers and one global layer.
const DEFAULT_SLIDING_WINDOW_PATTERN: usize = 6;
const DEFAULT_LOCAL_ROPE_BASE: f32 = 10_000.0;
const DEFAULT_GLOBAL_ROPE_BASE: f32 = 1_000_000.0;

#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = weights::rope_tables(head_dim, base, freq_scale, max_len, device)?;
        Ok(Self { cos, sin })
    }

    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    proj: weights::Projections,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    window: Option<usize>,
    rope: Rope,
    kv: Option<(Tensor, Tensor)>,
}

impl Layer {
    fn attention(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, seq_len, _) = x.dims3()?;
        let [q, k, v] = forward_many([&self.proj.wq, &self.proj.wk, &self.proj.wv], x)?;
        let q = q
            .reshape((b, seq_len, self.n_head, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self
            .rope
            .apply(&self.q_norm.forward(&q.contiguous()?)?, pos)?;
        let k = self
            .rope
            .apply(&self.k_norm.forward(&k.contiguous()?)?, pos)?;
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) if pos > 0 => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        let kv_len = k.dim(2)?;
        let rep = self.n_head / self.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = self.mask(seq_len, pos, kv_len, x.device())? {
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y =
            att.matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, seq_len, self.n_head * self.head_dim))?;
        self.proj.wo.forward(&y)
    }

    /// Additive mask: query i (at absolute position pos+i) sees key j when j <= pos+i and,
    /// on local layers, pos+i - j < window.
    fn mask(
        &self,
        seq_len: usize,
        pos: usize,
        kv_len: usize,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        let needs_window = self.window.is_some_and(|w| kv_len > w);
        if seq_len == 1 && !needs_window {
            return Ok(None);
        }
        let mut m = vec![0f32; seq_len * kv_len];
        for i in 0..seq_len {
            let qpos = pos + i;
            for j in 0..kv_len {
                let visible = j <= qpos && self.window.is_none_or(|w| qpos - j < w);
                if !visible {
                    m[i * kv_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (seq_len, kv_len), dev).map(Some)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = forward_many([&self.proj.gate, &self.proj.up], x)?;
        self.proj.down.forward(&(gate.gelu()? * up)?)
    }
}

/// Gemma 3 weights plus one sequence's KV cache.
#[derive(Debug, Clone)]
pub(crate) struct Gemma3 {
    embed: QEmbedding,
    hidden: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
}

impl Gemma3 {
    pub(crate) fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: gguf_file::Content,
        r: &mut R,
        max_len: usize,
        dev: &Device,
    ) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("gemma3.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing gemma3.{k}")))
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")?.to_u32()? as usize;
        let blocks = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = md("attention.key_length")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let window = md("attention.sliding_window")?.to_u32()? as usize;
        let pattern = md("attention.sliding_window_pattern")
            .or_else(|_| md("attention.sliding_window_type"))
            .and_then(|v| v.to_u32())
            .map_or(DEFAULT_SLIDING_WINDOW_PATTERN, |v| v as usize)
            .max(1);
        let global_base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(DEFAULT_GLOBAL_ROPE_BASE);
        let local_base = md("rope.freq_base_swa")
            .or_else(|_| md("rope.local_freq_base"))
            .and_then(|v| v.to_f32())
            .unwrap_or(DEFAULT_LOCAL_ROPE_BASE);
        // Gemma 3 declares only linear scaling (4B and larger: factor 8), and only its global
        // layers are scaled, as in llama.cpp.
        let global_scale = match md("rope.scaling.type").and_then(|v| v.to_string().cloned()) {
            Ok(kind) if kind != "linear" && kind != "none" => {
                candle_core::bail!("gemma3: rope scaling `{kind}` is not supported")
            }
            Ok(kind) if kind == "none" => 1.0,
            _ => md("rope.scaling.factor")
                .and_then(|v| v.to_f32())
                .ok()
                .filter(|&f| f != 0.0)
                .map_or(1.0, |f| 1.0 / f),
        };
        let local_rope = Rope::new(head_dim, local_base, 1.0, max_len, dev)?;
        let global_rope = Rope::new(head_dim, global_base, global_scale, max_len, dev)?;

        let head = weights::head(&ct, r, eps, dev)?;
        let layers = weights::layers(&ct, r, dev, blocks, eps, |p, blk| {
            let local = (blk.layer + 1) % pattern != 0;
            Ok(Layer {
                proj: p,
                q_norm: blk.norm("attn_q_norm")?,
                k_norm: blk.norm("attn_k_norm")?,
                attn_norm: blk.norm("attn_norm")?,
                post_attn_norm: blk.norm("post_attention_norm")?,
                ffn_norm: blk.norm("ffn_norm")?,
                post_ffn_norm: blk.norm("post_ffw_norm")?,
                n_head,
                n_kv_head,
                head_dim,
                window: local.then_some(window),
                rope: if local {
                    local_rope.clone()
                } else {
                    global_rope.clone()
                },
                kv: None,
            })
        })?;
        Ok(Self {
            embed: head.embed,
            hidden,
            layers,
            norm: head.norm,
            output: head.output,
        })
    }

    /// Logits of the token after `tokens` (shape `[1, vocab]`).
    pub(crate) fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, seq_len) = tokens.dims2()?;
        let ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
        let mut x = self
            .embed
            .lookup(&ids)?
            .reshape((b, seq_len, self.hidden))?;
        x = (x * (self.hidden as f64).sqrt())?;
        for layer in &mut self.layers {
            let h = layer.attn_norm.forward(&x)?;
            let h = layer.attention(&h, pos)?;
            x = (layer.post_attn_norm.forward(&h)? + x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let h = layer.mlp(&h)?;
            x = (layer.post_ffn_norm.forward(&h)? + x)?;
        }
        let last = x.i((.., seq_len - 1, ..))?.contiguous()?;
        let last = self.norm.forward(&last)?;
        self.output.forward(&last)
    }
}
