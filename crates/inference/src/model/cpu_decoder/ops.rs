//! The numeric steps of the CPU decoder's forward pass that are not matrix products' kernels:
//! RMSNorm, the feed-forward gates, a vectorisable `exp`, RoPE tables, the fused projection
//! of one input through several matrices, residual adds and a fixed-order dot product. Each
//! computes a row the same way whatever else is in the batch, which batch invariance rests on.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Result};
use std::io::{Read, Seek};

use crate::kernels::{self, QMatrix, QuantizedRows};

#[derive(Debug, Clone)]
pub(super) struct Norm {
    pub(super) weight: Vec<f32>,
    pub(super) eps: f32,
}

impl Norm {
    pub(super) fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        name: &str,
        eps: f32,
    ) -> Result<Self> {
        let weight = ct
            .tensor(r, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self { weight, eps })
    }

    /// RMS-normalises each row of `x` into `out`.
    pub(super) fn apply(&self, x: &[f32], out: &mut [f32]) {
        let d = self.weight.len();
        for (xs, os) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let ss = dot(xs, xs);
            let scale = 1.0 / (ss / d as f32 + self.eps).sqrt();
            for ((o, &v), &w) in os.iter_mut().zip(xs).zip(&self.weight) {
                *o = v * scale * w;
            }
        }
    }
}

/// Feed-forward gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    Silu,
    /// The tanh approximation.
    Gelu,
}

impl Activation {
    /// `gate[i] = act(gate[i]) * up[i]`, in loops the compiler vectorises.
    pub(super) fn gate(self, gate: &mut [f32], up: &[f32]) {
        match self {
            Activation::Silu => {
                for (g, &u) in gate.iter_mut().zip(up) {
                    *g = *g / (1.0 + exp(-*g)) * u;
                }
            }
            Activation::Gelu => {
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                for (g, &u) in gate.iter_mut().zip(up) {
                    let x = *g;
                    let y = SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x);
                    // tanh(y) = 1 - 2 / (e^2y + 1)
                    let tanh = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
                    *g = 0.5 * x * (1.0 + tanh) * u;
                }
            }
        }
    }
}

/// e^x to within about two units in the last place, without a libm call, so that loops over
/// it vectorise: x = k ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7, times 2^k.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// The rotary frequencies of one RoPE base. Cosines and sines are computed for the positions
/// of each forward pass rather than tabulated for the whole context up front: a table costs
/// `context × head_dim` values per base (128 MiB for a 128k context at head_dim 128, two
/// bases), while a pass needs `rows × head_dim` of them, a few microseconds of work per token.
#[derive(Debug, Clone)]
pub(super) struct RopeTable {
    /// `1 / base^(2i / head_dim)` for each rotated pair `i`.
    inv: Vec<f32>,
}

impl RopeTable {
    pub(super) fn new(head_dim: usize, base: f32) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv }
    }

    /// Writes the cosines and sines of position `pos` (`head_dim / 2` each).
    pub(super) fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((f, c), s) in self.inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            let angle = pos as f32 * f;
            *c = angle.cos();
            *s = angle.sin();
        }
    }

    /// Cosine and sine tables `[len, head_dim / 2]`, for backends that look them up (the GPU
    /// decoder uploads them for the context it serves).
    pub(super) fn tables(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv.len();
        let (mut cos, mut sin) = (vec![0.0; len * half], vec![0.0; len * half]);
        for (p, (c, s)) in cos
            .chunks_exact_mut(half.max(1))
            .zip(sin.chunks_exact_mut(half.max(1)))
            .enumerate()
        {
            self.angles(p, c, s);
        }
        (cos, sin)
    }
}

/// `outs[i] = x · ws[i]ᵀ` with `x` quantised once.
pub(super) fn project(
    qa: &mut QuantizedRows,
    x: &[f32],
    ws: &[&QMatrix],
    outs: &mut [&mut Vec<f32>],
) -> Result<()> {
    let cols = ws.first().map_or(0, |w| w.cols());
    let err = |e: kernels::KernelError| candle_core::Error::Msg(e.to_string());
    qa.quantize(x, cols, ws.iter().map(|w| w.format()))
        .map_err(err)?;
    let m = x.len() / cols.max(1);
    let mut slices: Vec<&mut [f32]> = outs
        .iter_mut()
        .zip(ws)
        .map(|(o, w)| {
            o.resize(m * w.rows(), 0.0);
            &mut o[..]
        })
        .collect();
    kernels::matmul_many(ws, qa, &mut slices).map_err(err)
}

pub(super) fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// A dot product with eight running sums, a fixed order the compiler can vectorise.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}
