//! The loaded model, borrowed piece by piece, for backends that run the same forward pass
//! elsewhere (the GPU decoder uploads it): the CPU decoder's loading is the one reading of
//! GGUF decoders.

use super::moe::Moe;
use super::{Activation, CpuDecoder, Ffn, Layer, Norm};
use crate::kernels::QMatrix;

/// A layer's feed-forward.
#[derive(Debug)]
pub(crate) enum FfnView<'a> {
    /// One gated feed-forward every row runs through.
    Dense {
        gate: &'a QMatrix,
        up: &'a QMatrix,
        down: &'a QMatrix,
    },
    /// A mixture of experts (Qwen 3 MoE).
    Experts(ExpertsView<'a>),
}

/// A mixture of experts: its router, and each expert's gate, up and down (views into the
/// layer's stacked tensors, in expert order).
#[derive(Debug)]
pub(crate) struct ExpertsView<'a> {
    /// `[experts, hidden]`, one score per expert for each row.
    pub(crate) router: &'a QMatrix,
    pub(crate) gate: Vec<&'a QMatrix>,
    pub(crate) up: Vec<&'a QMatrix>,
    pub(crate) down: Vec<&'a QMatrix>,
    /// Experts each row runs through.
    pub(crate) used: usize,
    /// Multiplier of the renormalised weights, where the GGUF gives one other than 0 or 1.
    pub(crate) scale: Option<f32>,
}

impl FfnView<'_> {
    /// Values of the feed-forward's inner rows (each expert's, for a mixture).
    pub(crate) fn width(&self) -> usize {
        match self {
            FfnView::Dense { gate, .. } => gate.rows(),
            FfnView::Experts(e) => e.gate.first().map_or(0, |g| g.rows()),
        }
    }

    /// Inner rows each input row runs through: 1, or the experts used by a mixture.
    pub(crate) fn per_row(&self) -> usize {
        match self {
            FfnView::Dense { .. } => 1,
            FfnView::Experts(e) => e.used,
        }
    }

    /// Every weight matrix: gate, up, down, or a mixture's router and experts.
    pub(crate) fn matrices(&self) -> Vec<&QMatrix> {
        match self {
            FfnView::Dense { gate, up, down } => vec![*gate, *up, *down],
            FfnView::Experts(e) => std::iter::once(e.router)
                .chain(e.gate.iter().copied())
                .chain(e.up.iter().copied())
                .chain(e.down.iter().copied())
                .collect(),
        }
    }
}

fn experts(m: &Moe) -> ExpertsView<'_> {
    ExpertsView {
        router: &m.router,
        gate: m.experts.iter().map(|e| &e.gate).collect(),
        up: m.experts.iter().map(|e| &e.up).collect(),
        down: m.experts.iter().map(|e| &e.down).collect(),
        used: m.used,
        scale: m.scale,
    }
}

/// One layer's weights and attention settings.
#[derive(Debug)]
pub(crate) struct LayerView<'a> {
    pub(crate) attn_norm: &'a [f32],
    pub(crate) ffn_norm: &'a [f32],
    /// Gemma 3: per-head norms of queries and keys, norms of the attention and feed-forward
    /// outputs.
    pub(crate) q_norm: Option<&'a [f32]>,
    pub(crate) k_norm: Option<&'a [f32]>,
    pub(crate) post_attn_norm: Option<&'a [f32]>,
    pub(crate) post_ffn_norm: Option<&'a [f32]>,
    /// Qwen 2: biases of the query, key and value projections.
    pub(crate) bias: Option<&'a super::Bias>,
    /// Keys this far back or further are not attended to.
    pub(crate) window: Option<usize>,
    /// Index of this layer's table in [`DecoderView::ropes`].
    pub(crate) rope: usize,
    pub(crate) wq: &'a QMatrix,
    pub(crate) wk: &'a QMatrix,
    pub(crate) wv: &'a QMatrix,
    pub(crate) wo: &'a QMatrix,
    pub(crate) ffn: FfnView<'a>,
}

/// A whole decoder's weights and shape.
#[derive(Debug)]
pub(crate) struct DecoderView<'a> {
    pub(crate) embed: &'a QMatrix,
    /// Multiplier of the embeddings (Gemma: √hidden).
    pub(crate) embed_scale: Option<f32>,
    pub(crate) layers: Vec<LayerView<'a>>,
    pub(crate) norm: &'a [f32],
    /// The epsilon of every RMSNorm.
    pub(crate) eps: f32,
    pub(crate) output: &'a QMatrix,
    /// Cosine and sine tables `[max_len, head_dim / 2]`, one per RoPE base (computed for the
    /// view: the CPU decoder itself keeps none).
    pub(crate) ropes: Vec<(Vec<f32>, Vec<f32>)>,
    pub(crate) max_len: usize,
    pub(crate) hidden: usize,
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) head_dim: usize,
    /// NeoX-style (halves) rotation instead of interleaved pairs.
    pub(crate) neox: bool,
    /// Tanh-approximated GELU gates the feed-forward instead of SiLU.
    pub(crate) gelu: bool,
}

fn norm(n: &Norm) -> &[f32] {
    &n.weight
}

impl CpuDecoder {
    /// The model's pieces, as the forward pass uses them (`None` for a decoder of only some
    /// of its blocks).
    pub(crate) fn view(&self) -> Option<DecoderView<'_>> {
        let (Some(embed), Some((out_norm, output))) = (&self.embed, &self.head) else {
            return None;
        };
        let layers = self
            .layers
            .iter()
            .map(|l: &Layer| LayerView {
                attn_norm: norm(&l.attn_norm),
                ffn_norm: norm(&l.ffn_norm),
                q_norm: l.q_norm.as_ref().map(norm),
                bias: l.bias.as_ref(),
                k_norm: l.k_norm.as_ref().map(norm),
                post_attn_norm: l.post_attn_norm.as_ref().map(norm),
                post_ffn_norm: l.post_ffn_norm.as_ref().map(norm),
                window: l.window,
                rope: l.rope,
                wq: &l.wq,
                wk: &l.wk,
                wv: &l.wv,
                wo: &l.wo,
                ffn: match &l.ffn {
                    Ffn::Dense { gate, up, down } => FfnView::Dense { gate, up, down },
                    Ffn::Experts(m) => FfnView::Experts(experts(m)),
                },
            })
            .collect();
        Some(DecoderView {
            embed,
            embed_scale: self.embed_scale,
            layers,
            norm: norm(out_norm),
            eps: out_norm.eps,
            output,
            ropes: self.ropes.iter().map(|t| t.tables(self.max_len)).collect(),
            max_len: self.max_len,
            hidden: self.hidden,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            neox: self.neox,
            gelu: self.activation == Activation::Gelu,
        })
    }
}
