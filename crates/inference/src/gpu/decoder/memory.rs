//! How much device memory a model needs before it is uploaded: its weights, the KV caches of
//! as many sequences as the engine runs at once (each up to the context length) plus the
//! prefix cache's budget, and the workspace of the largest pass.

use std::fmt;

use super::launch::activation_row_bytes;
use crate::gpu::kernels::Activations;
use crate::model::cpu_decoder::{DecoderView, FfnView};

/// Device memory left free beyond the estimate, for the runtime's own allocations, the
/// temporary copy while a KV cache grows, and fragmentation.
pub const HEADROOM: usize = 256 << 20;

/// What the engine will ask of a decoder at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Sequences generated at once, each with its own KV cache.
    pub sequences: usize,
    /// Tokens fed in one forward pass over all sequences.
    pub rows_per_pass: usize,
    /// Bytes of KV cache the prefix cache may keep beyond the running sequences'.
    pub prefix_cache_bytes: usize,
    /// Bytes of KV cache the engine lets all sequences and the prefix cache hold together
    /// (`None`: no bound but the sequences' count and context). Caches grow as sequences do,
    /// so this, not `sequences × context`, is what they can take.
    pub kv_budget_bytes: Option<usize>,
    /// Whether the context may be cut to what the device holds (no context was asked for
    /// explicitly), rather than the load failing.
    pub fit_context: bool,
}

/// The least context a model is cut to for want of device memory; below it the load fails.
pub(super) const MIN_FITTED_CONTEXT: usize = 2048;

/// Device memory a model needs, by what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeed {
    /// Weight matrices in their GGUF blocks, norms, RoPE tables.
    pub weights: usize,
    /// KV caches of every running sequence at the full context, plus the prefix cache, or
    /// the engine's KV budget where that is less.
    pub kv_caches: usize,
    /// Buffers of the largest forward pass.
    pub workspace: usize,
    /// The context length each cache is sized for.
    pub context: usize,
    /// Sequences at once.
    pub sequences: usize,
    /// Whether the engine's KV budget, not the sequences at the full context, sets
    /// `kv_caches`.
    pub kv_budgeted: bool,
}

impl MemoryNeed {
    /// Everything, with [`HEADROOM`].
    pub fn total(&self) -> usize {
        self.weights + self.kv_caches + self.workspace + HEADROOM
    }

    /// Computes the need of `m` under `demand`.
    pub(crate) fn of(m: &DecoderView<'_>, demand: Demand) -> Self {
        const F32: usize = 4;
        let norms = |l: &crate::model::cpu_decoder::LayerView<'_>| {
            [l.q_norm, l.k_norm, l.post_attn_norm, l.post_ffn_norm]
                .iter()
                .flatten()
                .map(|n| n.len())
                .sum::<usize>()
                + l.attn_norm.len()
                + l.ffn_norm.len()
        };
        let mut weights = m.embed.bytes().len() + m.norm.len() * F32;
        if !std::sync::Arc::ptr_eq(m.output.data(), m.embed.data()) {
            weights += m.output.bytes().len();
        }
        for l in &m.layers {
            // A mixture's router and every expert, as stacked on the device.
            weights += [l.wq, l.wk, l.wv, l.wo]
                .into_iter()
                .chain(l.ffn.matrices())
                .map(|w| w.bytes().len())
                .sum::<usize>();
            weights += norms(l) * F32;
        }
        weights += m
            .ropes
            .iter()
            .map(|(c, s)| (c.len() + s.len()) * F32)
            .sum::<usize>();

        let kv_w = m.n_kv_head * m.head_dim;
        let per_sequence = 2 * m.layers.len() * m.max_len * kv_w * F32;
        let full = demand.sequences.max(1) * per_sequence + demand.prefix_cache_bytes;
        let kv_caches = full.min(demand.kv_budget_bytes.unwrap_or(usize::MAX));

        let q_w = m.n_head * m.head_dim;
        // A mixture's inner rows: each row's chosen experts', `used` of them.
        let width = m.layers.iter().map(|l| l.ffn.width()).max().unwrap_or(0);
        let per_row = m.layers.iter().map(|l| l.ffn.per_row()).max().unwrap_or(1);
        let ffn = width * per_row;
        let widest = m.hidden.max(q_w).max(ffn);
        let rows = super::workspace::capacity(demand.rows_per_pass.max(demand.sequences));
        let mut f32_row = 2 * m.hidden + 2 * q_w + 2 * kv_w + m.hidden.max(q_w) + 2 * ffn;
        if let Some(e) = m.layers.iter().find_map(|l| match &l.ffn {
            FfnView::Experts(e) => Some(e),
            FfnView::Dense { .. } => None,
        }) {
            // Router scores, chosen experts and their weights, the experts' outputs.
            f32_row += e.gate.len() + 2 * e.used + e.used * m.hidden;
        }
        let quant_row = activation_row_bytes(Activations::Q8, widest)
            + activation_row_bytes(Activations::Q8K, widest.next_multiple_of(256));
        let logits = super::workspace::capacity(demand.sequences)
            * (m.output.rows() + 2 * m.hidden + 1)
            * F32;
        let workspace = rows * (f32_row * F32 + quant_row + 3 * 4) + logits;
        MemoryNeed {
            weights,
            kv_caches,
            workspace,
            context: m.max_len,
            sequences: demand.sequences.max(1),
            kv_budgeted: kv_caches < full,
        }
    }
}

impl MemoryNeed {
    /// The longest context, at most `need.context`, at which `need` fits in `free` bytes:
    /// the KV caches shrink with the context, the rest does not. `None` when not even
    /// [`MIN_FITTED_CONTEXT`] (or the whole context, if shorter) fits.
    pub(crate) fn context_within(
        &self,
        free: usize,
        kv_bytes_per_token: usize,
        demand: Demand,
    ) -> Option<usize> {
        let fixed = self.weights + self.workspace + HEADROOM + demand.prefix_cache_bytes;
        let room = free.checked_sub(fixed)?;
        let per_position = self.sequences * kv_bytes_per_token.max(1);
        let fits = (room / per_position).min(self.context);
        (fits >= MIN_FITTED_CONTEXT.min(self.context)).then_some(fits)
    }
}

/// Bytes as GiB with two decimals.
pub(crate) fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

impl fmt::Display for MemoryNeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = if self.kv_budgeted {
            " (the KV memory budget)"
        } else {
            ""
        };
        write!(
            f,
            "{} (weights {}, KV caches {}{limit} for {} sequence(s) of {} tokens, workspace {}, headroom {})",
            gib(self.total()),
            gib(self.weights),
            gib(self.kv_caches),
            self.sequences,
            self.context,
            gib(self.workspace),
            gib(HEADROOM)
        )
    }
}
