//! Decoders of the llama family, Qwen 2/3 (and Qwen 3's mixture of experts), Phi 3 and
//! Gemma 3 on the CPU without candle's tensor ops: plain f32 rows, pod's fused quantised
//! kernels for every projection, and attention computed row by row against a KV cache that
//! grows in place.
//!
//! Llama: RMSNorm → attention (interleaved RoPE, scaled as the GGUF declares; a sliding window
//! where it declares one) → residual; RMSNorm → SwiGLU → residual. Phi 3 is llama with NeoX
//! RoPE and fused q/k/v and gate/up matrices, split into their parts when loaded.
//! Gemma 3 adds: embeddings scaled by √hidden, RMSNorm on each query and key head, NeoX RoPE
//! with a local and a global base, a sliding window on local layers, RMSNorm after attention
//! and after the feed-forward, and tanh-approximated GELU. Qwen 3 MoE is Qwen 3 with a
//! mixture of experts in place of each feed-forward ([`moe`]).
//!
//! One forward call takes rows from any number of sequences (a prompt chunk of one, the next
//! token of several others): projections run over all rows at once (matrix-matrix), attention
//! runs per row against that row's own sequence. Every value of a row is computed by the same
//! code in the same order whatever else is in the batch and whether the row came from a
//! prompt or from decoding, so a sequence's logits are bit-identical alone, batched, prefilled
//! or replayed.

use std::sync::{Mutex, PoisonError};

use candle_core::Result;

use super::stage::LayerRange;
use crate::kernels::{QMatrix, QuantizedRows};

mod load;
mod moe;
mod ops;
mod rope;
mod view;

use moe::{Moe, MoeScratch};
use ops::{add, dot, exp, project, Activation, Norm};
use rope::RopeTable;

pub(crate) use load::ARCHITECTURES;
pub(crate) use view::{DecoderView, ExpertsView, FfnView, LayerView};

/// Fewest tokens of KV cache added when a sequence outgrows its cache (else half again what
/// it holds, so long sequences copy their cache a logarithmic number of times).
const KV_GROWTH: usize = 256;
/// Attention work (query rows × heads × cached positions) below which it runs on the calling
/// thread alone: waking the pool costs more.
const PARALLEL_ATTENTION: usize = 4 * 1024;

/// Biases added to the query, key and value projections (Qwen 2).
#[derive(Debug, Clone)]
pub(crate) struct Bias {
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// Adds `bias` to every row of `x`.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Norm,
    ffn_norm: Norm,
    /// Gemma 3: per-head norms of queries and keys, norms of the attention and feed-forward
    /// outputs.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    post_ffn_norm: Option<Norm>,
    /// Qwen 2: biases of the query, key and value projections.
    bias: Option<Bias>,
    /// Keys this far back or further are not attended to (local layers).
    window: Option<usize>,
    /// Index of this layer's table in [`CpuDecoder::ropes`].
    rope: usize,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn: Ffn,
}

/// A layer's feed-forward.
#[derive(Debug, Clone)]
enum Ffn {
    /// One gated feed-forward every row runs through.
    Dense {
        gate: QMatrix,
        up: QMatrix,
        down: QMatrix,
    },
    /// A router and experts, of which each row runs through a few (Qwen 3 MoE).
    Experts(Moe),
}

/// What one forward pass starts from: token ids (a decoder holding the first block, with the
/// embeddings) or the hidden states after the block before this decoder's first, one row of
/// `hidden` values per position (a later pipeline stage).
#[derive(Debug, Clone, Copy)]
pub(crate) enum StageInput<'a> {
    Tokens(&'a [&'a [u32]]),
    Hidden(&'a [&'a [f32]]),
}

/// What one forward pass ends with: each sequence's next-token logits (a decoder holding the
/// last block, with the output head) or, for every row fed, the hidden state after this
/// decoder's last block (positions × hidden values per sequence).
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Each sequence's next-token logits.
    Logits(Vec<Vec<f32>>),
    /// Each sequence's hidden states after the last block held, one row per position fed.
    Hidden(Vec<Vec<f32>>),
}

/// The CPU decoder's weights, shared by every sequence: all of a model's blocks, or a
/// contiguous range of them for a pipeline stage.
#[derive(Debug)]
pub(crate) struct CpuDecoder {
    /// Token embeddings: on the decoder holding block 0 only.
    embed: Option<QMatrix>,
    /// Multiplier of the embeddings (Gemma: √hidden).
    embed_scale: Option<f32>,
    layers: Vec<Layer>,
    /// Final norm and output projection: on the decoder holding the last block only.
    head: Option<(Norm, QMatrix)>,
    /// The blocks held, of the model's.
    range: LayerRange,
    ropes: Vec<RopeTable>,
    max_len: usize,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// NeoX-style (halves) rotation instead of interleaved pairs.
    neox: bool,
    activation: Activation,
    /// Working buffers of the forward pass, kept between calls so that steady-state decoding
    /// allocates nothing but the logits it returns.
    scratch: Mutex<Scratch>,
}

#[derive(Debug, Default)]
struct Scratch {
    rows: Vec<(usize, usize)>,
    ids: Vec<u32>,
    last_rows: Vec<usize>,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    last: Vec<f32>,
    logits: Vec<f32>,
    /// Per RoPE base and row: the cosines, then the sines, of the row's position.
    angles: Vec<f32>,
    qa: QuantizedRows,
    moe: MoeScratch,
}

/// `v` holding `n` values (whatever they are: every user overwrites them).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut Vec<f32> {
    v.resize(n, 0.0);
    v
}

/// One sequence's keys and values: per layer, `[position][kv head][head_dim]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    /// Values per position and layer (KV heads × head_dim).
    width: usize,
}

impl KvCache {
    /// Positions cached.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets positions from `len` on (a prefix stays valid), including any a failed
    /// forward pass had begun to write.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(self.len * self.width);
        }
    }

    /// Gives back memory reserved for positions not yet written.
    pub(crate) fn shrink_to_fit(&mut self) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.shrink_to_fit();
        }
    }

    /// Bytes of keys and values held.
    pub(crate) fn bytes(&self) -> usize {
        self.len * self.width * (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

impl CpuDecoder {
    /// An empty cache for a new sequence.
    pub(crate) fn new_cache(&self) -> KvCache {
        KvCache {
            k: vec![Vec::new(); self.layers.len()],
            v: vec![Vec::new(); self.layers.len()],
            len: 0,
            width: self.n_kv_head * self.head_dim,
        }
    }

    /// Rotates every head of `x` by `angles`: the cosines, then the sines, of its position.
    fn rope(&self, x: &mut [f32], angles: &[f32]) {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        let (cos, sin) = angles.split_at(half);
        for head in x.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if self.neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// Feeds `tokens[s]` to sequence `caches[s]`, for every `s` at once, and returns the logits
    /// of the token after each sequence's last one. Only for a decoder of the whole model.
    pub(crate) fn forward_batch(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        match self.forward_stage(caches, StageInput::Tokens(tokens))? {
            StageOutput::Logits(logits) => Ok(logits),
            StageOutput::Hidden(_) => {
                candle_core::bail!("blocks {} do not end the model", self.range)
            }
        }
    }

    /// The blocks this decoder holds.
    pub(crate) fn range(&self) -> LayerRange {
        self.range
    }

    /// Values per hidden state.
    pub(crate) fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Bytes of keys and values a sequence's cache holds per position.
    pub(crate) fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.n_kv_head * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Lowers the positions a sequence may hold to `len` (never raises them). The rotary
    /// scaling chosen at load for the longer context is kept.
    pub(crate) fn limit_context(&mut self, len: usize) {
        self.max_len = self.max_len.min(len.max(1));
    }

    /// Positions a sequence may hold.
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// Feeds `input`'s rows for sequence `s` to `caches[s]`, for every `s` at once, through
    /// this decoder's blocks: the next-token logits of each sequence where it holds the last
    /// block, else the hidden state after its last block of every row fed.
    pub(crate) fn forward_stage(
        &self,
        caches: &mut [&mut KvCache],
        input: StageInput<'_>,
    ) -> Result<StageOutput> {
        let d = self.hidden;
        let counts: Vec<usize> = match input {
            StageInput::Tokens(tokens) => tokens.iter().map(|t| t.len()).collect(),
            StageInput::Hidden(rows) => {
                if rows.iter().any(|r| !r.len().is_multiple_of(d)) {
                    candle_core::bail!("hidden states are not whole rows of {d} values");
                }
                rows.iter().map(|r| r.len() / d).collect()
            }
        };
        if caches.len() != counts.len() {
            candle_core::bail!("{} caches for {} inputs", caches.len(), counts.len());
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        let Scratch {
            rows,
            ids,
            last_rows,
            x,
            h,
            q,
            k,
            v,
            att,
            tmp,
            g,
            u,
            last,
            logits,
            angles,
            qa,
            moe,
        } = &mut *scratch;
        // Row r: which sequence, at which position.
        rows.clear();
        ids.clear();
        last_rows.clear();
        for (s, (cache, &n)) in caches.iter().zip(&counts).enumerate() {
            if n == 0 {
                candle_core::bail!("forward called with no tokens");
            }
            if cache.len + n > self.max_len {
                candle_core::bail!(
                    "{} tokens exceed the context of {} tokens",
                    cache.len + n,
                    self.max_len
                );
            }
            rows.extend((0..n).map(|i| (s, cache.len + i)));
            last_rows.push(rows.len() - 1);
        }
        let m = rows.len();
        let hd = self.head_dim;
        let (q_w, kv_w) = (self.n_head * hd, self.n_kv_head * hd);

        let x = sized(x, m * d);
        match input {
            StageInput::Tokens(tokens) => {
                let Some(embed) = &self.embed else {
                    candle_core::bail!("blocks {} do not start the model", self.range);
                };
                for t in tokens {
                    ids.extend_from_slice(t);
                }
                for (&id, xs) in ids.iter().zip(x.chunks_exact_mut(d)) {
                    if id as usize >= embed.rows() {
                        candle_core::bail!(
                            "token id {id} is outside the embedding table of {} rows",
                            embed.rows()
                        );
                    }
                    embed.dequantize_row(id as usize, xs);
                    if let Some(scale) = self.embed_scale {
                        for v in xs.iter_mut() {
                            *v *= scale;
                        }
                    }
                }
            }
            StageInput::Hidden(hidden) => {
                if self.embed.is_some() {
                    candle_core::bail!("blocks {} start the model: they take tokens", self.range);
                }
                let mut at = 0;
                for r in hidden {
                    x[at..at + r.len()].copy_from_slice(r);
                    at += r.len();
                }
            }
        }
        for (cache, &n) in caches.iter_mut().zip(&counts) {
            let need = (cache.len + n) * kv_w;
            let grow = (cache.len / 2).max(KV_GROWTH) * kv_w;
            // Never room for more positions than a sequence may hold.
            let room = (need + grow).min(self.max_len * kv_w).max(need);
            for l in cache.k.iter_mut().chain(cache.v.iter_mut()) {
                if l.capacity() < need {
                    l.reserve_exact(room - l.len());
                }
            }
        }

        let h = sized(h, m * d);
        let att = sized(att, m * q_w);
        // Each row's rotation, once per pass rather than once per layer.
        let angles = sized(angles, self.ropes.len() * m * hd);
        for (table, rows_angles) in self.ropes.iter().zip(angles.chunks_exact_mut(m * hd)) {
            for (&(_, pos), a) in rows.iter().zip(rows_angles.chunks_exact_mut(hd)) {
                let (cos, sin) = a.split_at_mut(hd / 2);
                table.angles(pos, cos, sin);
            }
        }

        for (li, layer) in self.layers.iter().enumerate() {
            layer.attn_norm.apply(x, h);
            project(qa, h, &[&layer.wq, &layer.wk, &layer.wv], &mut [q, k, v])?;
            if let Some(b) = &layer.bias {
                add_bias(q, &b.q);
                add_bias(k, &b.k);
                add_bias(v, &b.v);
            }
            for (norm, xs) in [(&layer.q_norm, &mut *q), (&layer.k_norm, &mut *k)] {
                if let Some(norm) = norm {
                    tmp.resize(xs.len(), 0.0);
                    norm.apply(xs, tmp);
                    std::mem::swap(xs, tmp);
                }
            }
            let layer_angles = &angles[layer.rope * m * hd..(layer.rope + 1) * m * hd];
            for (r, &(s, _)) in rows.iter().enumerate() {
                let a = &layer_angles[r * hd..(r + 1) * hd];
                self.rope(&mut q[r * q_w..(r + 1) * q_w], a);
                self.rope(&mut k[r * kv_w..(r + 1) * kv_w], a);
                let cache = &mut caches[s];
                cache.k[li].extend_from_slice(&k[r * kv_w..(r + 1) * kv_w]);
                cache.v[li].extend_from_slice(&v[r * kv_w..(r + 1) * kv_w]);
            }
            self.attention(li, caches, rows, q, att);
            project(qa, att, &[&layer.wo], &mut [h])?;
            if let Some(norm) = &layer.post_attn_norm {
                tmp.resize(h.len(), 0.0);
                norm.apply(h, tmp);
                std::mem::swap(h, tmp);
            }
            add(x, h);
            layer.ffn_norm.apply(x, h);
            match &layer.ffn {
                Ffn::Dense { gate, up, down } => {
                    project(qa, h, &[gate, up], &mut [g, u])?;
                    self.activation.gate(g, u);
                    project(qa, g, &[down], &mut [h])?;
                }
                Ffn::Experts(experts) => {
                    experts.forward(qa, h, tmp, self.activation, moe)?;
                    std::mem::swap(h, tmp);
                }
            }
            if let Some(norm) = &layer.post_ffn_norm {
                tmp.resize(h.len(), 0.0);
                norm.apply(h, tmp);
                std::mem::swap(h, tmp);
            }
            add(x, h);
        }
        for (cache, &n) in caches.iter_mut().zip(&counts) {
            cache.len += n;
        }

        let Some((norm, output)) = &self.head else {
            let mut out = Vec::with_capacity(counts.len());
            let mut at = 0;
            for &n in &counts {
                out.push(x[at * d..(at + n) * d].to_vec());
                at += n;
            }
            return Ok(StageOutput::Hidden(out));
        };
        let b = last_rows.len();
        let last = sized(last, b * d);
        for (i, &r) in last_rows.iter().enumerate() {
            norm.apply(&x[r * d..(r + 1) * d], &mut last[i * d..(i + 1) * d]);
        }
        let vocab = output.rows();
        project(qa, last, &[output], &mut [logits])?;
        Ok(StageOutput::Logits(
            logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect(),
        ))
    }

    /// Causal attention of each row's query against its own sequence's cached keys and values
    /// up to and including the row's position.
    fn attention(
        &self,
        layer: usize,
        caches: &[&mut KvCache],
        rows: &[(usize, usize)],
        q: &[f32],
        out: &mut [f32],
    ) {
        let (hd, n_head) = (self.head_dim, self.n_head);
        let rep = n_head / self.n_kv_head;
        let kv_w = self.n_kv_head * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let window = self.layers[layer].window;
        let one = |r: usize, head: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let (s, pos) = rows[r];
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let (ks, vs) = (&caches[s].k[layer], &caches[s].v[layer]);
            let off = (head / rep) * hd;
            let qh = &q[r * n_head * hd + head * hd..][..hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in first..=pos {
                let sc = dot(qh, &ks[j * kv_w + off..][..hd]) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0.0f32;
            for sc in scores.iter_mut() {
                *sc = exp(*sc - max);
                sum += *sc;
            }
            o.fill(0.0);
            for (j, &w) in (first..).zip(scores.iter()) {
                let w = w / sum;
                for (ov, &vv) in o.iter_mut().zip(&vs[j * kv_w + off..][..hd]) {
                    *ov += w * vv;
                }
            }
        };
        let work: usize = rows.iter().map(|&(_, p)| (p + 1) * n_head).sum();
        if work < PARALLEL_ATTENTION {
            let mut scores = Vec::new();
            for (r, orow) in out.chunks_exact_mut(n_head * hd).enumerate() {
                for (head, o) in orow.chunks_exact_mut(hd).enumerate() {
                    one(r, head, o, &mut scores);
                }
            }
            return;
        }
        let cells: Vec<Mutex<&mut [f32]>> = out.chunks_exact_mut(hd).map(Mutex::new).collect();
        let pool = candle_core::utils::barrier_pool();
        pool.execute_chunked(cells.len(), |range| {
            let mut scores = Vec::new();
            for c in range {
                let mut o = cells[c].lock().unwrap_or_else(PoisonError::into_inner);
                one(c / n_head, c % n_head, &mut o, &mut scores);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 1e-37 && exp(-200.0) >= 0.0);
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let ones = vec![1.0; xs.len()];
        let mut silu = xs.clone();
        Activation::Silu.gate(&mut silu, &ones);
        let mut gelu = xs.clone();
        Activation::Gelu.gate(&mut gelu, &ones);
        for ((&x, &s), &g) in xs.iter().zip(&silu).zip(&gelu) {
            let want_s = x / (1.0 + (-x).exp());
            let y = 0.797_884_6 * x * (1.0 + 0.044_715 * x * x);
            let want_g = 0.5 * x * (1.0 + y.tanh());
            assert!(
                (s - want_s).abs() <= 1e-6 * (1.0 + want_s.abs()),
                "silu({x}) = {s}, not {want_s}"
            );
            assert!(
                (g - want_g).abs() <= 1e-6 * (1.0 + want_g.abs()),
                "gelu({x}) = {g}, not {want_g}"
            );
        }
    }
}
