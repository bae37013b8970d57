//! Rotary position embeddings: the cosine and sine tables of each position, and the scaling a
//! GGUF declares for contexts beyond the one a model was first trained at, read as llama.cpp
//! reads it: linear interpolation (`rope.scaling.factor`), YaRN (`rope.scaling.type = yarn`,
//! with its blend of interpolated and extrapolated frequencies and its attention temperature),
//! per-frequency divisors (Llama 3's `rope_freqs.weight`, Phi 3's `rope_factors_long/short`)
//! and a multiplier of every cosine and sine (`rope.scaling.attn_factor`).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Result};

/// YaRN's defaults for the frequencies counted fully extrapolated (rotating at least this many
/// times over the original context) and fully interpolated (at most this many): the values
/// llama.cpp uses for every architecture pod runs.
const YARN_BETA_FAST: f32 = 32.0;
const YARN_BETA_SLOW: f32 = 1.0;

/// How rotation angles are derived from positions, beyond plain RoPE.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeScaling {
    /// Angles are multiplied by this (1 / the scaling factor; 1 for none).
    freq_scale: f32,
    /// YaRN: the first and last frequency index of the ramp from extrapolated (below) to
    /// interpolated (above) angles.
    yarn: Option<[f32; 2]>,
    /// Every cosine and sine is multiplied by this, so attention scores by its square.
    mscale: f32,
    /// Divisors of each frequency (`head_dim / 2` of them).
    factors: Option<Vec<f32>>,
}

impl Default for RopeScaling {
    fn default() -> Self {
        Self {
            freq_scale: 1.0,
            yarn: None,
            mscale: 1.0,
            factors: None,
        }
    }
}

/// A GGUF tensor of one value per frequency, as f32.
fn factors<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    name: &str,
    half: usize,
) -> Result<Option<Vec<f32>>> {
    if !ct.tensor_infos.contains_key(name) {
        return Ok(None);
    }
    let v: Vec<f32> = ct
        .tensor(r, name, &Device::Cpu)?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    if v.len() != half {
        candle_core::bail!("{name}: {} values, not one per frequency ({half})", v.len());
    }
    Ok(Some(v))
}

/// YaRN's frequency index at which a rotation makes `rotations` turns over `context`
/// positions.
fn yarn_dim(dims: usize, context: usize, rotations: f32, base: f32) -> f32 {
    dims as f32 * (context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
        / (2.0 * base.ln())
}

impl RopeScaling {
    /// The scaling of architecture `arch`'s RoPE of `head_dim` and base `base`, for sequences
    /// of up to `max_len` positions (which picks Phi 3's long or short factors).
    pub(crate) fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        arch: &str,
        head_dim: usize,
        base: f32,
        max_len: usize,
    ) -> Result<Self> {
        let md = |k: &str| ct.metadata.get(&format!("{arch}.{k}"));
        let f32_of = |k: &str| md(k).and_then(|v| v.to_f32().ok());
        let kind = match md("rope.scaling.type") {
            Some(v) => v.to_string()?.clone(),
            None => "linear".to_owned(),
        };
        let factor = f32_of("rope.scaling.factor")
            .or_else(|| f32_of("rope.scale_linear"))
            .unwrap_or(0.0);
        let mut freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
        let attn_factor = f32_of("rope.scaling.attn_factor").unwrap_or(1.0);
        let trained = md("context_length")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(0);
        let original = md("rope.scaling.original_context_length")
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(trained) as usize;
        let half = head_dim / 2;
        let mut yarn = None;
        let mut mscale = attn_factor;
        let longrope = match kind.as_str() {
            "none" => {
                freq_scale = 1.0;
                false
            }
            "linear" => false,
            "longrope" => true,
            "yarn" => {
                if original == 0 {
                    candle_core::bail!("YaRN scaling without an original context length");
                }
                let low = yarn_dim(head_dim, original, YARN_BETA_FAST, base).floor();
                let high = yarn_dim(head_dim, original, YARN_BETA_SLOW, base).ceil();
                yarn = Some([low.max(0.0), high.min(head_dim as f32 - 1.0)]);
                // llama.cpp divides its attention factor by the temperature that each cosine
                // and sine are then multiplied by, which leaves the temperature only for
                // factors above 1.
                let factor = 1.0 / freq_scale;
                let temperature = 1.0 + 0.1 * (1.0 / freq_scale).ln();
                let kept = if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                };
                mscale = kept * (1.0 / (1.0 + 0.1 * factor.ln())) * attn_factor * temperature;
                false
            }
            other => candle_core::bail!("unknown rope scaling type `{other}`"),
        };
        // Phi 3 always has long and short factors; llama has them with longrope, and else
        // may have Llama 3's frequency divisors.
        let factors = if arch == "phi3" || longrope {
            let name = if max_len > original {
                "rope_factors_long.weight"
            } else {
                "rope_factors_short.weight"
            };
            factors(ct, r, name, half)?
        } else if matches!(arch, "llama" | "mistral") {
            factors(ct, r, "rope_freqs.weight", half)?
        } else {
            None
        };
        Ok(Self {
            freq_scale,
            yarn,
            mscale,
            factors,
        })
    }

    /// Whether this changes anything from plain RoPE.
    pub(crate) fn is_plain(&self) -> bool {
        *self == Self::default()
    }
}

/// The rotary frequencies of one RoPE base, with its scaling. Cosines and sines are computed
/// for the positions of each forward pass rather than tabulated for the whole context up
/// front: a table costs `context × head_dim` values per base (128 MiB for a 128k context at
/// head_dim 128, two bases), while a pass needs `rows × head_dim` of them, a few microseconds
/// of work per token.
#[derive(Debug, Clone)]
pub(super) struct RopeTable {
    /// `base^(-2i / head_dim)` for each rotated pair `i`.
    inv: Vec<f32>,
    /// Extrapolated share of each frequency's angle (YaRN's ramp; 0 without YaRN).
    ramp: Vec<f32>,
    scaling: RopeScaling,
}

impl RopeTable {
    /// Plain RoPE.
    pub(super) fn new(head_dim: usize, base: f32) -> Self {
        Self::scaled(head_dim, base, &RopeScaling::default())
    }

    /// RoPE with `scaling`: plain RoPE's angle of position `p` and frequency `i` is
    /// `p · base^(-2i / head_dim)`; it is divided by the frequency's factor, then multiplied by
    /// `freq_scale` (interpolated) or, with YaRN, blended between that and the unscaled
    /// (extrapolated) angle by a ramp over the frequency index.
    pub(super) fn scaled(head_dim: usize, base: f32, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let ramp: Vec<f32> = (0..half)
            .map(|i| match scaling.yarn {
                Some([low, high]) => {
                    let y = (i as f32 - low) / (high - low).max(0.001);
                    1.0 - y.clamp(0.0, 1.0)
                }
                None => 0.0,
            })
            .collect();
        Self {
            inv,
            ramp,
            scaling: scaling.clone(),
        }
    }

    /// Writes the cosines and sines of position `pos` (`head_dim / 2` each).
    pub(super) fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let scaling = &self.scaling;
        for (i, (f, (c, s))) in self
            .inv
            .iter()
            .zip(cos.iter_mut().zip(sin.iter_mut()))
            .enumerate()
        {
            let mut extrapolated = pos as f32 * f;
            if let Some(factors) = &scaling.factors {
                extrapolated /= factors[i];
            }
            let interpolated = scaling.freq_scale * extrapolated;
            let angle = if scaling.yarn.is_some() {
                interpolated * (1.0 - self.ramp[i]) + extrapolated * self.ramp[i]
            } else {
                interpolated
            };
            *c = angle.cos() * scaling.mscale;
            *s = angle.sin() * scaling.mscale;
        }
    }

    /// Cosine and sine tables `[len, head_dim / 2]`, for backends that look them up (the GPU
    /// decoder uploads them for the context it serves).
    pub(super) fn tables(&self, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv.len().max(1);
        let (mut cos, mut sin) = (vec![0.0; len * half], vec![0.0; len * half]);
        for (p, (c, s)) in cos
            .chunks_exact_mut(half)
            .zip(sin.chunks_exact_mut(half))
            .enumerate()
        {
            self.angles(p, c, s);
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_rope_is_unscaled_and_linear_scaling_divides_angles() {
        let (plain, _) = RopeTable::new(8, 10_000.0).tables(16);
        let p = 5;
        assert_eq!(plain[p * 4], (p as f32).cos());
        let linear = RopeScaling {
            freq_scale: 0.25,
            ..RopeScaling::default()
        };
        let (cos, _) = RopeTable::scaled(8, 10_000.0, &linear).tables(16);
        for i in 0..4 {
            let want = (p as f32 * 0.25 / 10_000f32.powf(i as f32 / 4.0)).cos();
            assert!((cos[p * 4 + i] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn yarn_extrapolates_fast_frequencies_interpolates_slow_ones_and_scales_magnitude() {
        let yarn = RopeScaling {
            freq_scale: 0.25,
            yarn: Some([1.0, 3.0]),
            mscale: 1.5,
            factors: None,
        };
        let (cos, sin) = RopeTable::scaled(8, 10_000.0, &yarn).tables(16);
        let p = 7usize;
        let angle = |i: usize| p as f32 / 10_000f32.powf(i as f32 / 4.0);
        // Frequency 0 is below the ramp (extrapolated), 3 above it (interpolated), 2 halfway.
        let want = [angle(0), angle(1), angle(2) * 0.625, angle(3) * 0.25];
        for (i, a) in want.iter().enumerate() {
            let (c, s) = (cos[p * 4 + i], sin[p * 4 + i]);
            assert!((c - a.cos() * 1.5).abs() < 1e-5, "cos {i}: {c}");
            assert!((s - a.sin() * 1.5).abs() < 1e-5, "sin {i}: {s}");
        }
    }
}
