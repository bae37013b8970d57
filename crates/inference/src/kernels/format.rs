//! The GGUF block formats the fused kernels read, their byte layouts and a reference
//! dequantiser for each.
//!
//! Layouts (little-endian, `f16` scales), as ggml defines them:
//! - `Q4_0`, 18 bytes per 32 values: `d`, 16 bytes of nibbles; value `j` is the low nibble of
//!   byte `j`, value `j + 16` its high nibble; `x = d * (q - 8)`.
//! - `Q4_1`, 20 bytes: `d`, `m`, nibbles as `Q4_0`; `x = d * q + m`.
//! - `Q5_0`, 22 bytes: `d`, 4 bytes of fifth bits (bit `j` belongs to value `j`), nibbles as
//!   `Q4_0`; `x = d * (q - 16)`.
//! - `Q5_1`, 24 bytes: `d`, `m`, fifth bits as `Q5_0`, nibbles as `Q4_0`; `x = d * q + m`.
//! - `Q8_0`, 34 bytes: `d`, 32 signed bytes; `x = d * q`.
//! - `Q4_K`, 144 bytes per 256 values: `d`, `dmin`, 12 bytes packing eight 6-bit scales and
//!   eight 6-bit mins, 128 bytes of nibbles (each 32-byte run holds two 32-value sub-blocks: low
//!   nibbles first); `x = d * scale * q - dmin * min`.
//! - `Q2_K`, 84 bytes per 256 values: sixteen bytes of 4-bit scale (low nibble) and 4-bit
//!   min (high nibble), one per 16 values; 64 bytes of 2-bit values; `d`, `dmin`;
//!   `x = d * scale * q - dmin * min`. Value `32 * r + i` (`r < 8`, `i < 32`) sits at bits
//!   `2 * (r % 4)` of byte `32 * (r / 4) + i`.
//! - `Q3_K`, 110 bytes per 256 values: 32 bytes of high bits (bit `r` of byte `i` belongs to
//!   value `32 * r + i`), 64 bytes of low bit pairs laid out as `Q2_K`'s, 12 bytes packing
//!   sixteen 6-bit scales, `d`; `x = d * (scale - 32) * (q - 4)` with `q` the 3-bit value.
//! - `Q5_K`, 176 bytes per 256 values: `d`, `dmin`, 12 bytes of scales and mins packed as
//!   `Q4_K`'s, 32 bytes of fifth bits (bit `s` of byte `l` belongs to value `l` of sub-block
//!   `s`), 128 bytes of nibbles as `Q4_K`'s; `x = d * scale * q - dmin * min`.
//! - `Q6_K`, 210 bytes per 256 values: 128 bytes of low nibbles, 64 bytes of high bit pairs,
//!   sixteen signed 8-bit scales (one per 16 values), `d`; `x = d * scale * (q - 32)`.
//! - `F16`, `BF16` and `F32`: one value per 2, 2 or 4 bytes, no scale. Their products run in
//!   f32 against unquantised activations.

use candle_core::quantized::GgmlDType;

/// Values per block of the 32-value formats.
pub(crate) const QK: usize = 32;
/// Values per super-block of the K-quant formats.
pub(crate) const QK_K: usize = 256;

/// A GGUF quantisation format that has a fused kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 4-bit values with one scale per 32.
    Q4_0,
    /// 4-bit values with one scale and one offset per 32.
    Q4_1,
    /// 5-bit values with one scale per 32.
    Q5_0,
    /// 5-bit values with one scale and one offset per 32.
    Q5_1,
    /// 8-bit values with one scale per 32.
    Q8_0,
    /// 2-bit values in super-blocks of 256 with 4-bit sub-block scales and mins.
    Q2K,
    /// 3-bit values in super-blocks of 256 with 6-bit sub-block scales.
    Q3K,
    /// 4-bit values in super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
    /// 5-bit values in super-blocks of 256 with 6-bit sub-block scales and mins.
    Q5K,
    /// 6-bit values in super-blocks of 256 with 8-bit sub-block scales.
    Q6K,
    /// IEEE half-precision floats.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// 32-bit floats.
    F32,
}

/// Which 8-bit form the activations take for a weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActivationForm {
    /// Blocks of 32 with an f32 scale and the sum of the quantised values.
    Q8,
    /// Super-blocks of 256 with an f32 scale and sums of each run of 16.
    Q8K,
    /// The f32 values themselves (float weights).
    F32,
}

impl QuantFormat {
    /// Every supported format.
    pub const ALL: [QuantFormat; 13] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q8_0,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
        QuantFormat::F16,
        QuantFormat::BF16,
        QuantFormat::F32,
    ];

    /// The format of a GGUF tensor type, or `None` when no fused kernel reads it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::F16 => Self::F16,
            GgmlDType::BF16 => Self::BF16,
            GgmlDType::F32 => Self::F32,
            _ => return None,
        })
    }

    /// candle's name for the same format.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::F32 => GgmlDType::F32,
        }
    }

    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => QK,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            Self::F16 | Self::BF16 | Self::F32 => 1,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
        }
    }

    pub(crate) const fn activation(self) -> ActivationForm {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => ActivationForm::Q8,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => ActivationForm::Q8K,
            Self::F16 | Self::BF16 | Self::F32 => ActivationForm::F32,
        }
    }

    /// Expands one row of blocks (`bytes`) into `out`, which holds `block_values()` values per
    /// block. This is the definition the fused kernels are tested against.
    ///
    /// # Panics
    /// When `bytes` and `out` do not hold the same whole number of blocks.
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        let (bb, bv) = (self.block_bytes(), self.block_values());
        assert!(
            bytes.len().is_multiple_of(bb) && out.len() == bytes.len() / bb * bv,
            "{self:?}: {} bytes do not expand to {} values",
            bytes.len(),
            out.len()
        );
        for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
            match self {
                Self::Q4_0 => {
                    let d = f16_at(b, 0);
                    for j in 0..16 {
                        y[j] = d * (f32::from(b[2 + j] & 0x0F) - 8.0);
                        y[j + 16] = d * (f32::from(b[2 + j] >> 4) - 8.0);
                    }
                }
                Self::Q4_1 => {
                    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                    for j in 0..16 {
                        y[j] = d * f32::from(b[4 + j] & 0x0F) + m;
                        y[j + 16] = d * f32::from(b[4 + j] >> 4) + m;
                    }
                }
                Self::Q5_0 => {
                    let d = f16_at(b, 0);
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    for j in 0..16 {
                        let lo = (b[6 + j] & 0x0F) | (((qh >> j) & 1) as u8) << 4;
                        let hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
                        y[j] = d * (f32::from(lo) - 16.0);
                        y[j + 16] = d * (f32::from(hi) - 16.0);
                    }
                }
                Self::Q5_1 => {
                    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                    for j in 0..16 {
                        let lo = (b[8 + j] & 0x0F) | (((qh >> j) & 1) as u8) << 4;
                        let hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
                        y[j] = d * f32::from(lo) + m;
                        y[j + 16] = d * f32::from(hi) + m;
                    }
                }
                Self::Q8_0 => {
                    let d = f16_at(b, 0);
                    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                        *v = d * f32::from(q as i8);
                    }
                }
                Self::Q4K => {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let (scales, mins) = q4k_scales_mins(&b[4..16]);
                    for (c, q) in b[16..144].chunks_exact(32).enumerate() {
                        for (half, shift) in [(0, 0), (1, 4)] {
                            let s = 2 * c + half;
                            let (ds, ms) = (d * f32::from(scales[s]), dmin * f32::from(mins[s]));
                            for (l, &byte) in q.iter().enumerate() {
                                y[32 * s + l] = ds * f32::from((byte >> shift) & 0x0F) - ms;
                            }
                        }
                    }
                }
                Self::Q5K => {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let (scales, mins) = q4k_scales_mins(&b[4..16]);
                    let mut q = [0u8; QK_K];
                    q5k_values(b, &mut q);
                    for (s, ys) in y.chunks_exact_mut(32).enumerate() {
                        let (ds, ms) = (d * f32::from(scales[s]), dmin * f32::from(mins[s]));
                        for (v, &qv) in ys.iter_mut().zip(&q[32 * s..32 * s + 32]) {
                            *v = ds * f32::from(qv) - ms;
                        }
                    }
                }
                Self::Q2K => {
                    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                    let mut q = [0u8; QK_K];
                    q2k_values(&b[16..80], &mut q);
                    for (g, ys) in y.chunks_exact_mut(16).enumerate() {
                        let ds = d * f32::from(b[g] & 0x0F);
                        let ms = dmin * f32::from(b[g] >> 4);
                        for (v, &qv) in ys.iter_mut().zip(&q[16 * g..16 * g + 16]) {
                            *v = ds * f32::from(qv) - ms;
                        }
                    }
                }
                Self::Q3K => {
                    let d = f16_at(b, 108);
                    let mut q = [0u8; QK_K];
                    q3k_values(b, &mut q);
                    let scales = q3k_scales(&b[96..108]);
                    for (g, ys) in y.chunks_exact_mut(16).enumerate() {
                        let ds = d * f32::from(scales[g]);
                        for (v, &qv) in ys.iter_mut().zip(&q[16 * g..16 * g + 16]) {
                            *v = ds * (f32::from(qv) - 4.0);
                        }
                    }
                }
                Self::F16 => y[0] = f16_at(b, 0),
                Self::BF16 => y[0] = bf16_at(b, 0),
                Self::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Self::Q6K => {
                    let d = f16_at(b, 208);
                    let mut q = [0u8; QK_K];
                    q6k_values(b, &mut q);
                    for (i, v) in y.iter_mut().enumerate() {
                        let scale = f32::from(b[192 + i / 16] as i8);
                        *v = d * scale * (f32::from(q[i]) - 32.0);
                    }
                }
            }
        }
    }
}

/// The f16 at byte `at` of a block, widened.
#[inline(always)]
pub(crate) fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// The bf16 at byte `at` of a row, widened.
#[inline(always)]
pub(crate) fn bf16_at(row: &[u8], at: usize) -> f32 {
    half::bf16::from_le_bytes([row[at], row[at + 1]]).to_f32()
}

/// The eight 6-bit scales and eight 6-bit mins packed into a `Q4_K` block's 12 bytes: the
/// first four of each sit in the low six bits of bytes 0-3 (scales) and 4-7 (mins); the last
/// four take their low nibbles from bytes 8-11 and their top two bits from the spare high bits
/// of bytes 0-7.
#[inline(always)]
pub(crate) fn q4k_scales_mins(p: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = p[j] & 63;
        mins[j] = p[j + 4] & 63;
        scales[j + 4] = (p[j + 8] & 0x0F) | ((p[j] >> 6) << 4);
        mins[j + 4] = (p[j + 8] >> 4) | ((p[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// The 256 unsigned 6-bit values of a `Q6_K` block, in order. Each half of 128 values takes
/// 64 low-nibble bytes and 32 high-bit bytes: value `l + 32 * c` (`l < 32`, `c < 4`) has its
/// low nibble in byte `l` (c even) or `l + 32` (c odd), low half for c < 2, and its top two
/// bits at bit `2 * c` of high byte `l`.
#[inline(always)]
pub(crate) fn q6k_values(block: &[u8], out: &mut [u8; QK_K]) {
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 0x0F) | ((qh[l] & 0x03) << 4);
            y[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 0x03) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 0x03) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 0x03) << 4);
        }
    }
}

/// The 256 unsigned 5-bit values of a `Q5_K` block, in order: value `l` of sub-block `s`
/// (`l < 32`) takes its low four bits from byte `l` of nibble run `s / 2` (low nibble for even
/// `s`) and its fifth bit from bit `s` of high-bit byte `l`.
#[inline(always)]
pub(crate) fn q5k_values(block: &[u8], out: &mut [u8; QK_K]) {
    let qh = &block[16..48];
    for (c, qs) in block[48..176].chunks_exact(32).enumerate() {
        for l in 0..32 {
            let (lo, hi) = (2 * c, 2 * c + 1);
            out[32 * lo + l] = (qs[l] & 0x0F) | (((qh[l] >> lo) & 1) << 4);
            out[32 * hi + l] = (qs[l] >> 4) | (((qh[l] >> hi) & 1) << 4);
        }
    }
}

/// The 256 2-bit values packed in the 64 bytes `qs` of a `Q2_K` or `Q3_K` block, in order:
/// value `32 * r + i` at bits `2 * (r % 4)` of byte `32 * (r / 4) + i`.
#[inline(always)]
pub(crate) fn q2k_values(qs: &[u8], out: &mut [u8; QK_K]) {
    for (r, run) in out.chunks_exact_mut(32).enumerate() {
        let (bytes, shift) = (&qs[32 * (r / 4)..32 * (r / 4) + 32], 2 * (r % 4));
        for (v, &byte) in run.iter_mut().zip(bytes) {
            *v = (byte >> shift) & 3;
        }
    }
}

/// The 256 unsigned 3-bit values of a `Q3_K` block (the stored value plus 4), in order: the
/// low two bits as [`q2k_values`] reads them, the third from bit `r` of high-bit byte `i` for
/// value `32 * r + i`.
#[inline(always)]
pub(crate) fn q3k_values(block: &[u8], out: &mut [u8; QK_K]) {
    q2k_values(&block[32..96], out);
    for (r, run) in out.chunks_exact_mut(32).enumerate() {
        for (v, &h) in run.iter_mut().zip(&block[..32]) {
            *v |= ((h >> r) & 1) << 2;
        }
    }
}

/// The sixteen signed scales (6-bit, stored with an offset of 32) packed into a `Q3_K`
/// block's 12 bytes: scale `k` takes its low nibble from byte `k % 8` (low nibble for
/// `k < 8`, high for the rest) and its top two bits from bits `2 * (k / 4)` of byte
/// `8 + k % 4`.
#[inline(always)]
pub(crate) fn q3k_scales(p: &[u8]) -> [i8; 16] {
    std::array::from_fn(|k| {
        let low = if k < 8 { p[k] & 0x0F } else { p[k - 8] >> 4 };
        let high = (p[8 + k % 4] >> (2 * (k / 4))) & 3;
        ((low | (high << 4)) as i8) - 32
    })
}
