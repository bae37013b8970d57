//! The device buffers of a forward pass, kept from one pass to the next and grown when a pass
//! carries more rows or sequences than any before it.

use std::sync::{MutexGuard, PoisonError};

use super::launch::activation_row_bytes;
use super::GpuDecoder;
use crate::gpu::kernels::Activations;
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, DeviceSlice, RuntimeError};

/// The buffers a pass uses, each sized for the largest pass so far.
pub(super) struct Buffers<R: DeviceRuntime> {
    pub(super) rows: Option<Workspace<R>>,
    pub(super) outputs: Option<Outputs<R>>,
}

/// Per-sequence buffers of a pass: which row is each sequence's last, that row, normed, and
/// the logits.
pub(super) struct Outputs<R: DeviceRuntime> {
    /// Sequences they hold.
    pub(super) seqs: usize,
    pub(super) last: DeviceBuffer<R>,
    pub(super) gathered: DeviceBuffer<R>,
    pub(super) normed: DeviceBuffer<R>,
    pub(super) logits: DeviceBuffer<R>,
}

/// Rows a new workspace holds: at least `m`, rounded up so that growing passes reallocate
/// a logarithmic number of times.
pub(super) fn capacity(m: usize) -> usize {
    m.max(16).next_power_of_two()
}

/// Device buffers of passes over up to `rows` rows.
pub(super) struct Workspace<R: DeviceRuntime> {
    /// Rows every buffer holds.
    pub(super) rows: usize,
    pub(super) x: DeviceBuffer<R>,
    pub(super) h: DeviceBuffer<R>,
    pub(super) q: DeviceBuffer<R>,
    pub(super) k: DeviceBuffer<R>,
    pub(super) v: DeviceBuffer<R>,
    pub(super) att: DeviceBuffer<R>,
    /// Norm outputs before they replace their input (Gemma).
    pub(super) tmp: DeviceBuffer<R>,
    /// Gate and up outputs: `ffn` values per inner row, one inner row per row (per row and
    /// chosen expert in a mixture).
    pub(super) g: DeviceBuffer<R>,
    pub(super) u: DeviceBuffer<R>,
    /// A mixture's routing and expert outputs (`None` for dense models).
    pub(super) moe: Option<MoeBuffers<R>>,
    /// Activations quantised for 32-value and 256-value formats.
    pub(super) q8: DeviceBuffer<R>,
    pub(super) q8k: DeviceBuffer<R>,
    pub(super) ids: DeviceBuffer<R>,
    pub(super) pos: DeviceBuffer<R>,
    pub(super) zeros: DeviceBuffer<R>,
}

/// The buffers of a mixture's routing, for passes of up to `rows` rows.
pub(super) struct MoeBuffers<R: DeviceRuntime> {
    /// Router scores, `[rows, experts]`.
    pub(super) logits: DeviceBuffer<R>,
    /// Each row's chosen experts in rank order (i32), `[rows, used]`.
    pub(super) chosen: DeviceBuffer<R>,
    /// Their weights, `[rows, used]`.
    pub(super) weights: DeviceBuffer<R>,
    /// Each (row, rank)'s expert output, `[rows × used, hidden]`.
    pub(super) out: DeviceBuffer<R>,
}

/// Bytes of `n` f32s.
pub(super) fn f32_bytes(n: usize) -> usize {
    n * 4
}

/// The first `n` f32s of `b`.
pub(super) fn first<R: DeviceRuntime>(
    b: &DeviceBuffer<R>,
    n: usize,
) -> Result<DeviceSlice, RuntimeError> {
    b.slice(0, f32_bytes(n))
}

/// Rows `start..start + n` of `width` f32s.
pub(super) fn rows<R: DeviceRuntime>(
    b: &DeviceBuffer<R>,
    start: usize,
    n: usize,
    width: usize,
) -> Result<DeviceSlice, RuntimeError> {
    b.slice(f32_bytes(start * width), f32_bytes(n * width))
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    fn workspace(&self, m: usize) -> Result<Workspace<R>, RuntimeError> {
        let s = &self.shape;
        let rt = &self.runtime;
        let inner = s.ffn * s.ffn_per_row;
        let widest = s.hidden.max(s.q_w()).max(inner);
        let buf = |n: usize| DeviceBuffer::new(rt, f32_bytes(n));
        let moe = if s.experts > 0 {
            let pairs = m * s.ffn_per_row;
            Some(MoeBuffers {
                logits: buf(m * s.experts)?,
                chosen: DeviceBuffer::new(rt, pairs * 4)?,
                weights: buf(pairs)?,
                out: buf(pairs * s.hidden)?,
            })
        } else {
            None
        };
        Ok(Workspace {
            rows: m,
            x: buf(m * s.hidden)?,
            h: buf(m * s.hidden)?,
            q: buf(m * s.q_w())?,
            k: buf(m * s.kv_w())?,
            v: buf(m * s.kv_w())?,
            att: buf(m * s.q_w())?,
            tmp: buf(m * s.hidden.max(s.q_w()))?,
            g: buf(m * inner)?,
            u: buf(m * inner)?,
            moe,
            q8: DeviceBuffer::new(rt, m * activation_row_bytes(Activations::Q8, widest))?,
            q8k: DeviceBuffer::new(
                rt,
                m * activation_row_bytes(Activations::Q8K, widest.next_multiple_of(256)),
            )?,
            ids: DeviceBuffer::new(rt, m * 4)?,
            pos: DeviceBuffer::new(rt, m * 4)?,
            zeros: DeviceBuffer::from_slice(rt, &vec![0i32; m])?,
        })
    }

    fn outputs(&self, b: usize) -> Result<Outputs<R>, RuntimeError> {
        let (rt, s) = (&self.runtime, &self.shape);
        Ok(Outputs {
            seqs: b,
            last: DeviceBuffer::new(rt, b * 4)?,
            gathered: DeviceBuffer::new(rt, f32_bytes(b * s.hidden))?,
            normed: DeviceBuffer::new(rt, f32_bytes(b * s.hidden))?,
            logits: DeviceBuffer::new(rt, f32_bytes(b * s.vocab))?,
        })
    }

    /// The kept buffers, grown to hold a pass of `m` rows over `b` sequences. A buffer too
    /// small is freed before its replacement is allocated.
    pub(super) fn buffers(
        &self,
        m: usize,
        b: usize,
    ) -> Result<MutexGuard<'_, Buffers<R>>, RuntimeError> {
        let mut held = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        if held.rows.as_ref().is_none_or(|w| w.rows < m) {
            held.rows = None;
            held.rows = Some(self.workspace(capacity(m))?);
        }
        if held.outputs.as_ref().is_none_or(|o| o.seqs < b) {
            held.outputs = None;
            held.outputs = Some(self.outputs(capacity(b))?);
        }
        Ok(held)
    }
}
