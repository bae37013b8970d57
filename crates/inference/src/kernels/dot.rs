//! Portable fused dot products: one weight row (GGUF blocks) against `T` quantised activation
//! rows at once, so that each weight block is unpacked once per `T` rows. Plain safe Rust over
//! fixed-size arrays, which the compiler vectorises; the x86 module has hand-written versions
//! of the same functions, and these are its reference.
//!
//! Each row's result is computed by the same sequence of operations whatever `T` is, so a
//! row's output does not depend on the rows it was batched with.

use super::format::{
    bf16_at, f16_at, q2k_values, q3k_scales, q3k_values, q4k_scales_mins, q5k_values, q6k_values,
    QuantFormat, QK, QK_K,
};
use super::quantize::{Q8Block, Q8KBlock};

#[inline(always)]
fn idot<const N: usize>(a: &[i8; N], b: &[i8; N]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// A 32-value block format, read as small integers `q` with `x = scale * q + offset`.
pub(crate) trait Block32 {
    /// The format.
    const FORMAT: QuantFormat;
    /// Bytes per block.
    const BYTES: usize = Self::FORMAT.block_bytes();
    /// `(scale, offset, q)` of one block.
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]);
}

/// Marker types selecting a 32-value format at compile time.
pub(crate) mod fmt {
    /// `Q4_0`.
    #[derive(Debug)]
    pub(crate) struct Q4_0;
    /// `Q4_1`.
    #[derive(Debug)]
    pub(crate) struct Q4_1;
    /// `Q5_0`.
    #[derive(Debug)]
    pub(crate) struct Q5_0;
    /// `Q5_1`.
    #[derive(Debug)]
    pub(crate) struct Q5_1;
    /// `Q8_0`.
    #[derive(Debug)]
    pub(crate) struct Q8_0;
}

#[inline(always)]
fn nibbles(qs: &[u8]) -> [i8; QK] {
    let mut q = [0i8; QK];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) as i8;
        q[j + 16] = (qs[j] >> 4) as i8;
    }
    q
}

impl Block32 for fmt::Q4_0 {
    const FORMAT: QuantFormat = QuantFormat::Q4_0;
    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let d = f16_at(b, 0);
        (d, -8.0 * d, nibbles(&b[2..18]))
    }
}

impl Block32 for fmt::Q4_1 {
    const FORMAT: QuantFormat = QuantFormat::Q4_1;
    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        (f16_at(b, 0), f16_at(b, 2), nibbles(&b[4..20]))
    }
}

/// The 32 unsigned 5-bit values of nibbles `qs` and fifth bits `qh` (bit `j` for value `j`).
#[inline(always)]
fn five_bits(qh: &[u8], qs: &[u8]) -> [i8; QK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = nibbles(qs);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) << 4) as i8;
    }
    q
}

impl Block32 for fmt::Q5_0 {
    const FORMAT: QuantFormat = QuantFormat::Q5_0;
    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let d = f16_at(b, 0);
        (d, -16.0 * d, five_bits(&b[2..6], &b[6..22]))
    }
}

impl Block32 for fmt::Q5_1 {
    const FORMAT: QuantFormat = QuantFormat::Q5_1;
    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        (f16_at(b, 0), f16_at(b, 2), five_bits(&b[4..8], &b[8..24]))
    }
}

impl Block32 for fmt::Q8_0 {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;
    #[inline(always)]
    fn unpack(b: &[u8]) -> (f32, f32, [i8; QK]) {
        let mut q = [0i8; QK];
        for (v, &byte) in q.iter_mut().zip(&b[2..34]) {
            *v = byte as i8;
        }
        (f16_at(b, 0), 0.0, q)
    }
}

/// Dots one row of a 32-value format with `T` activation rows.
#[inline(always)]
pub(crate) fn rows_q8<B: Block32, const T: usize>(w: &[u8], xs: [&[Q8Block]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    let mut off = [0.0f32; T];
    for (i, b) in w.chunks_exact(B::BYTES).enumerate() {
        let (d, m, q) = B::unpack(b);
        for t in 0..T {
            let y = &xs[t][i];
            acc[t] += (d * y.d) * idot(&q, &y.qs) as f32;
            off[t] += m * y.s;
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = acc[t] + off[t];
    }
    out
}

/// `rows_q8` over consecutive weight rows of `row_bytes`: `outs[t][j]` gets weight row `j`
/// dotted with activation row `t`.
pub(crate) fn tile_q8<B: Block32, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) {
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let r = rows_q8::<B, T>(row, xs);
        for t in 0..T {
            outs[t][j] = r[t];
        }
    }
}

/// `rows_q2k`, `rows_q3k`, `rows_q4k`, `rows_q5k` or `rows_q6k` over consecutive weight
/// rows, as [`tile_q8`].
pub(crate) fn tile_q8k<const T: usize>(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let r = match format {
            QuantFormat::Q2K => rows_q2k::<T>(row, xs),
            QuantFormat::Q3K => rows_q3k::<T>(row, xs),
            QuantFormat::Q4K => rows_q4k::<T>(row, xs),
            QuantFormat::Q5K => rows_q5k::<T>(row, xs),
            _ => rows_q6k::<T>(row, xs),
        };
        for t in 0..T {
            outs[t][j] = r[t];
        }
    }
}

/// Dots one `Q4_K` row with `T` activation rows.
#[inline(always)]
pub(crate) fn rows_q4k<const T: usize>(w: &[u8], xs: [&[Q8KBlock]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    for (i, b) in w
        .as_chunks::<{ QuantFormat::Q4K.block_bytes() }>()
        .0
        .iter()
        .enumerate()
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, mins) = q4k_scales_mins(&b[4..16]);
        // Sub-block `2 * c` is run `c`'s low nibbles, `2 * c + 1` its high ones.
        let runs = b[16..].as_chunks::<32>().0;
        let q: [[i8; 32]; 8] = std::array::from_fn(|s| {
            let shift = 4 * (s % 2);
            runs[s / 2].map(|byte| ((byte >> shift) & 0x0F) as i8)
        });
        for t in 0..T {
            let y = &xs[t][i];
            let ys = y.qs.as_chunks::<32>().0;
            let mut sumi = 0i32;
            let mut summ = 0i32;
            for s in 0..8 {
                let isum = idot(&q[s], &ys[s]);
                sumi += i32::from(scales[s]) * isum;
                let ysum = i32::from(y.bsums[2 * s]) + i32::from(y.bsums[2 * s + 1]);
                summ += i32::from(mins[s]) * ysum;
            }
            acc[t] += y.d * (d * sumi as f32 - dmin * summ as f32);
        }
    }
    acc
}

/// Dots one `Q2_K` row with `T` activation rows: 2-bit values, a scale and a min per 16.
#[inline(always)]
pub(crate) fn rows_q2k<const T: usize>(w: &[u8], xs: [&[Q8KBlock]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    for (i, b) in w
        .as_chunks::<{ QuantFormat::Q2K.block_bytes() }>()
        .0
        .iter()
        .enumerate()
    {
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        let mut qu = [0u8; QK_K];
        q2k_values(&b[16..80], &mut qu);
        let q: [i8; QK_K] = qu.map(|v| v as i8);
        for t in 0..T {
            let y = &xs[t][i];
            let mut sumi = 0i32;
            let mut summ = 0i32;
            for (g, &sm) in b[..16].iter().enumerate() {
                let isum = idot(&q.as_chunks::<16>().0[g], &y.qs.as_chunks::<16>().0[g]);
                sumi += i32::from(sm & 0x0F) * isum;
                summ += i32::from(sm >> 4) * i32::from(y.bsums[g]);
            }
            acc[t] += y.d * (d * sumi as f32 - dmin * summ as f32);
        }
    }
    acc
}

/// Dots one `Q3_K` row with `T` activation rows: 3-bit values offset by 4, a signed scale per
/// 16.
#[inline(always)]
pub(crate) fn rows_q3k<const T: usize>(w: &[u8], xs: [&[Q8KBlock]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    for (i, b) in w
        .as_chunks::<{ QuantFormat::Q3K.block_bytes() }>()
        .0
        .iter()
        .enumerate()
    {
        let d = f16_at(b, 108);
        let scales = q3k_scales(&b[96..108]);
        let mut qu = [0u8; QK_K];
        q3k_values(b, &mut qu);
        let q: [i8; QK_K] = qu.map(|v| v as i8);
        for t in 0..T {
            let y = &xs[t][i];
            let mut sumi = 0i32;
            for (g, &sc) in scales.iter().enumerate() {
                let isum = idot(&q.as_chunks::<16>().0[g], &y.qs.as_chunks::<16>().0[g])
                    - 4 * i32::from(y.bsums[g]);
                sumi += i32::from(sc) * isum;
            }
            acc[t] += y.d * (d * sumi as f32);
        }
    }
    acc
}

/// Dots one `Q5_K` row with `T` activation rows: `Q4_K`'s sums over 5-bit values.
#[inline(always)]
pub(crate) fn rows_q5k<const T: usize>(w: &[u8], xs: [&[Q8KBlock]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    for (i, b) in w
        .as_chunks::<{ QuantFormat::Q5K.block_bytes() }>()
        .0
        .iter()
        .enumerate()
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, mins) = q4k_scales_mins(&b[4..16]);
        let mut qu = [0u8; QK_K];
        q5k_values(b, &mut qu);
        let q: [i8; QK_K] = qu.map(|v| v as i8);
        for t in 0..T {
            let y = &xs[t][i];
            let mut sumi = 0i32;
            let mut summ = 0i32;
            for s in 0..8 {
                let isum = idot(&q.as_chunks::<32>().0[s], &y.qs.as_chunks::<32>().0[s]);
                sumi += i32::from(scales[s]) * isum;
                let ysum = i32::from(y.bsums[2 * s]) + i32::from(y.bsums[2 * s + 1]);
                summ += i32::from(mins[s]) * ysum;
            }
            acc[t] += y.d * (d * sumi as f32 - dmin * summ as f32);
        }
    }
    acc
}

/// Dots one `Q6_K` row with `T` activation rows.
#[inline(always)]
pub(crate) fn rows_q6k<const T: usize>(w: &[u8], xs: [&[Q8KBlock]; T]) -> [f32; T] {
    let mut acc = [0.0f32; T];
    for (i, b) in w
        .as_chunks::<{ QuantFormat::Q6K.block_bytes() }>()
        .0
        .iter()
        .enumerate()
    {
        let d = f16_at(b, 208);
        let mut qu = [0u8; QK_K];
        q6k_values(b, &mut qu);
        let q: [i8; QK_K] = qu.map(|v| v as i8);
        for t in 0..T {
            let y = &xs[t][i];
            let mut sumi = 0i32;
            for g in 0..16 {
                let isum = idot(&q.as_chunks::<16>().0[g], &y.qs.as_chunks::<16>().0[g])
                    - 32 * i32::from(y.bsums[g]);
                sumi += i32::from(b[192 + g] as i8) * isum;
            }
            acc[t] += y.d * (d * sumi as f32);
        }
    }
    acc
}

/// Values per lane group of the float dot products: one 256-bit register of f32.
pub(crate) const LANES: usize = 8;

/// Float weights widened at a time: 32 runs of 8, a kilobyte of f32 on the stack.
const WIDEN_CHUNK: usize = 32 * LANES;

/// Float weights `at..at + out.len()` of `row`, widened to f32 in one pass (half's slice
/// conversion uses the CPU's conversion instructions where it has them).
#[inline(always)]
fn widen_into(format: QuantFormat, row: &[u8], at: usize, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = out.len();
    match format {
        QuantFormat::F16 => {
            let mut h = [half::f16::ZERO; WIDEN_CHUNK];
            for (v, b) in h
                .iter_mut()
                .zip(row[2 * at..2 * (at + n)].as_chunks::<2>().0)
            {
                *v = half::f16::from_le_bytes(*b);
            }
            h[..n].convert_to_f32_slice(out);
        }
        QuantFormat::BF16 => {
            let mut h = [half::bf16::ZERO; WIDEN_CHUNK];
            for (v, b) in h
                .iter_mut()
                .zip(row[2 * at..2 * (at + n)].as_chunks::<2>().0)
            {
                *v = half::bf16::from_le_bytes(*b);
            }
            h[..n].convert_to_f32_slice(out);
        }
        _ => {
            for (v, b) in out
                .iter_mut()
                .zip(row[4 * at..4 * (at + n)].as_chunks::<4>().0)
            {
                *v = f32::from_le_bytes(*b);
            }
        }
    }
}

/// Float weight `i` of `row`, widened to f32.
#[inline(always)]
fn widen(format: QuantFormat, row: &[u8], i: usize) -> f32 {
    match format {
        QuantFormat::F16 => f16_at(row, 2 * i),
        QuantFormat::BF16 => bf16_at(row, 2 * i),
        _ => {
            let b = &row[4 * i..4 * i + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }
}

/// The sum of eight lanes in the order the x86 kernels add them: halves, then pairs, then the
/// last two.
#[inline(always)]
pub(crate) fn lane_sum(v: [f32; LANES]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    let p = [h[0] + h[2], h[1] + h[3]];
    p[0] + p[1]
}

/// Float weight rows (`F16`, `BF16` or `F32`) dotted with `T` f32 activation rows: runs of 8
/// values go to two alternating sets of eight lane sums, as the x86 kernels keep them, and the
/// values past the last whole run are added one by one at the end.
pub(crate) fn tile_float<const T: usize>(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[f32]; T],
    outs: &mut [&mut [f32]],
) {
    let cols = row_bytes / format.block_bytes();
    let runs = cols / LANES;
    let mut wv = [0.0f32; WIDEN_CHUNK];
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [[[0.0f32; LANES]; 2]; T];
        for first in (0..runs).step_by(WIDEN_CHUNK / LANES) {
            let n = (runs - first).min(WIDEN_CHUNK / LANES);
            widen_into(format, row, LANES * first, &mut wv[..LANES * n]);
            for (k, wr) in wv[..LANES * n].as_chunks::<LANES>().0.iter().enumerate() {
                let r = first + k;
                for t in 0..T {
                    let x = &xs[t].as_chunks::<LANES>().0[r];
                    let a = &mut acc[t][r % 2];
                    for l in 0..LANES {
                        a[l] = wr[l].mul_add(x[l], a[l]);
                    }
                }
            }
        }
        for t in 0..T {
            let [a0, a1] = acc[t];
            let mut sum = lane_sum(std::array::from_fn(|l| a0[l] + a1[l]));
            for (i, &x) in xs[t].iter().enumerate().take(cols).skip(LANES * runs) {
                sum = widen(format, row, i).mul_add(x, sum);
            }
            outs[t][j] = sum;
        }
    }
}
