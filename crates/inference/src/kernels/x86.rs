//! AVX2 and AVX-512 VNNI versions of the fused dot products in `dot.rs`, chosen at run time.
//!
//! Why intrinsics: the heart of every kernel is an unsigned-by-signed 8-bit multiply whose
//! pairwise sums stay 16-bit (`vpmaddubsw`, or VNNI's `vpdpbusd` straight into 32 bits), which
//! the compiler never emits from plain Rust; the auto-vectorised `dot.rs` widens to 16 bits
//! first and runs at about 60% of this speed (SmolLM2 `Q4_1` rows, one core). Everything here
//! is safe Rust inside `#[target_feature]` functions, with loads done by `bytemuck` casts of
//! fixed-size arrays; the only `unsafe` is entering those functions, once per tile, after the
//! CPU was seen to have the features. Without them the portable kernels run instead.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::dot::{fmt, Block32};
use super::format::{f16_at, q3k_scales, q4k_scales_mins, QuantFormat, QK, QK_K};
use super::quantize::{Q8Block, Q8KBlock};

mod interleaved;
mod paired;
pub(super) use interleaved::{tile_x8_q4_0, tile_x8_q4k, tile_x8_q6k, tile_x8_q8_0};

/// The best instruction set both the CPU and the `POD_CPU_KERNELS` cap allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Level {
    /// None of ours: the portable kernels run.
    Portable,
    /// AVX2, FMA and F16C (x86-64 CPUs since 2013-2015).
    Avx2,
    /// AVX2 plus AVX-512 VNNI's 8-bit dot product on 256-bit registers (Ice Lake, Zen 4 on).
    Avx512Vnni,
}

/// The level the kernels use, detected once. `POD_CPU_KERNELS=portable` or `=avx2` caps it,
/// to compare paths or to avoid one (`portable` runs what a CPU without AVX2 runs).
pub(super) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("POD_CPU_KERNELS").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512Vnni,
        };
        let cpu = if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            Level::Portable
        } else if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            Level::Avx512Vnni
        } else {
            Level::Avx2
        };
        cpu.min(cap)
    })
}

/// [`super::dot::tile_q8`] with the best instruction set; `false` (nothing written) when the
/// CPU has none of them.
pub(super) fn tile_q8<const T: usize>(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) -> bool {
    tile_q8_at::<T>(level(), format, w, row_bytes, xs, outs)
}

/// [`tile_q8`] at a given level; `false` (nothing written) above [`level`].
pub(super) fn tile_q8_at<const T: usize>(
    level: Level,
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) -> bool {
    if level > self::level() {
        return false;
    }
    let rb = row_bytes;
    // SAFETY: `level()` saw the CPU features each function is compiled for.
    unsafe {
        match (level, format) {
            (Level::Portable, _)
            | (
                _,
                QuantFormat::Q2K
                | QuantFormat::Q3K
                | QuantFormat::Q4K
                | QuantFormat::Q5K
                | QuantFormat::Q6K
                | QuantFormat::F16
                | QuantFormat::BF16
                | QuantFormat::F32,
            ) => return false,
            (Level::Avx2, QuantFormat::Q4_0) => tile32_avx2::<fmt::Q4_0, T>(w, rb, xs, outs),
            (Level::Avx2, QuantFormat::Q4_1) => tile32_avx2::<fmt::Q4_1, T>(w, rb, xs, outs),
            (Level::Avx2, QuantFormat::Q5_0) => tile32_avx2::<fmt::Q5_0, T>(w, rb, xs, outs),
            (Level::Avx2, QuantFormat::Q5_1) => tile32_avx2::<fmt::Q5_1, T>(w, rb, xs, outs),
            (Level::Avx2, QuantFormat::Q8_0) => tile32_avx2::<fmt::Q8_0, T>(w, rb, xs, outs),
            (Level::Avx512Vnni, QuantFormat::Q4_0) => tile32_vnni::<fmt::Q4_0, T>(w, rb, xs, outs),
            (Level::Avx512Vnni, QuantFormat::Q4_1) => tile32_vnni::<fmt::Q4_1, T>(w, rb, xs, outs),
            (Level::Avx512Vnni, QuantFormat::Q5_0) => tile32_vnni::<fmt::Q5_0, T>(w, rb, xs, outs),
            (Level::Avx512Vnni, QuantFormat::Q5_1) => tile32_vnni::<fmt::Q5_1, T>(w, rb, xs, outs),
            (Level::Avx512Vnni, QuantFormat::Q8_0) => tile32_vnni::<fmt::Q8_0, T>(w, rb, xs, outs),
        }
    }
    true
}

/// [`super::dot::tile_q8k`] with AVX2 (VNNI gains nothing on the K-quants' scaled sums);
/// `false` (nothing written) when the CPU lacks it.
pub(super) fn tile_q8k<const T: usize>(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) -> bool {
    if level() < Level::Avx2 {
        return false;
    }
    // SAFETY: `level()` saw the CPU features these functions are compiled for.
    unsafe {
        match format {
            QuantFormat::Q2K => tile_q2k::<T>(w, row_bytes, xs, outs),
            QuantFormat::Q3K => tile_q3k::<T>(w, row_bytes, xs, outs),
            QuantFormat::Q4K => tile_q4k::<T>(w, row_bytes, xs, outs),
            QuantFormat::Q5K => tile_q5k::<T>(w, row_bytes, xs, outs),
            QuantFormat::Q6K => tile_q6k::<T>(w, row_bytes, xs, outs),
            _ => return false,
        }
    }
    true
}

/// [`super::dot::tile_float`] with AVX2, FMA and F16C, in the same order of operations;
/// `false` (nothing written) when the CPU lacks them.
pub(super) fn tile_float<const T: usize>(
    format: QuantFormat,
    w: &[u8],
    row_bytes: usize,
    xs: [&[f32]; T],
    outs: &mut [&mut [f32]],
) -> bool {
    if level() < Level::Avx2 {
        return false;
    }
    // SAFETY: `level()` saw the CPU features these functions are compiled for.
    unsafe {
        match format {
            QuantFormat::F16 => tile_float_avx2::<T, F16>(w, row_bytes, xs, outs),
            QuantFormat::BF16 => tile_float_avx2::<T, BF16>(w, row_bytes, xs, outs),
            QuantFormat::F32 => tile_float_avx2::<T, F32>(w, row_bytes, xs, outs),
            _ => return false,
        }
    }
    true
}

/// The 32 bytes of `s` starting at `at`.
#[target_feature(enable = "avx2")]
#[inline]
fn load32(s: &[u8], at: usize) -> __m256i {
    let a: [u8; 32] = s[at..at + 32].try_into().unwrap_or([0; 32]);
    bytemuck::cast(a)
}

/// The 16 bytes of `s` starting at `at`.
#[target_feature(enable = "avx2")]
#[inline]
fn load16(s: &[u8], at: usize) -> __m128i {
    let a: [u8; 16] = s[at..at + 16].try_into().unwrap_or([0; 16]);
    bytemuck::cast(a)
}

/// 16 bytes of nibbles as 32 values: low nibbles first, then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
fn nibbles(b: &[u8], at: usize) -> __m256i {
    let q = load16(b, at);
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// `(scale, offset, values)` of a 32-value block, with `x = scale * value + offset`; the
/// values are signed for `Q8_0` and small unsigned numbers otherwise.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn load_block<B: Block32>(b: &[u8]) -> (f32, f32, __m256i) {
    let d = f16_at(b, 0);
    match B::FORMAT {
        QuantFormat::Q4_0 => (d, -8.0 * d, nibbles(b, 2)),
        QuantFormat::Q4_1 => (d, f16_at(b, 2), nibbles(b, 4)),
        QuantFormat::Q5_0 => {
            let qh = i32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            (d, -16.0 * d, with_fifth_bits(nibbles(b, 6), qh))
        }
        QuantFormat::Q5_1 => {
            let qh = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            (d, f16_at(b, 2), with_fifth_bits(nibbles(b, 8), qh))
        }
        _ => (d, 0.0, load32(b, 2)),
    }
}

/// Sets bit 4 of byte `j` of `q` where bit `j` of `qh` is set.
#[target_feature(enable = "avx2")]
#[inline]
fn with_fifth_bits(q: __m256i, qh: i32) -> __m256i {
    // Byte j takes byte j / 8 of qh (both 128-bit lanes hold all four bytes)...
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // ...and keeps bit j % 8 of it.
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

/// Eight i32 partial sums of `q · y` for 32 unsigned (at most 127) values `q`.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_u8_i8(q: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), _mm256_set1_epi16(1))
}

/// [`dot_u8_i8`] in one instruction (`vpdpbusd`), with no 16-bit intermediate.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
#[inline]
fn dot_u8_i8_vnni(q: __m256i, y: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, y)
}

/// The sum of the eight lanes, in a fixed order.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2")]
#[inline]
fn load_y(qs: &[i8; QK]) -> __m256i {
    bytemuck::cast(*qs)
}

/// Defines a `tile32` (products of each weight row with `T` activation rows, 32-value
/// formats) for one instruction set: `$dot` multiplies 32 unsigned by 32 signed bytes into
/// eight i32 sums. Even and odd blocks go to separate accumulators, so that consecutive
/// blocks' multiply-adds do not wait on each other.
macro_rules! tile32 {
    ($name:ident, $features:literal, $dot:ident) => {
        #[target_feature(enable = $features)]
        fn $name<B: Block32, const T: usize>(
            w: &[u8],
            row_bytes: usize,
            xs: [&[Q8Block]; T],
            outs: &mut [&mut [f32]],
        ) {
            let nb = row_bytes / B::BYTES;
            // Rows as long as the weight rows, so that indexing them needs no checks.
            let xs = xs.map(|x| &x[..nb]);
            for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                let mut off = [[0.0f32; 2]; T];
                let mut step = |b: &[u8], i: usize, lane: usize| {
                    let (d, m, q) = load_block::<B>(b);
                    for t in 0..T {
                        let y = &xs[t][i];
                        let yv = load_y(&y.qs);
                        let p = if B::FORMAT == QuantFormat::Q8_0 {
                            // |q| times y with q's sign: the unsigned operand must be ≥ 0.
                            $dot(_mm256_sign_epi8(q, q), _mm256_sign_epi8(yv, q))
                        } else {
                            $dot(q, yv)
                        };
                        let a = &mut acc[t][lane];
                        *a = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(p), *a);
                        if B::FORMAT != QuantFormat::Q8_0 {
                            off[t][lane] += m * y.s;
                        }
                    }
                };
                let pairs = row.chunks_exact(2 * B::BYTES);
                let last = pairs.remainder();
                for (p, pair) in pairs.enumerate() {
                    let (b0, b1) = pair.split_at(B::BYTES);
                    step(b0, 2 * p, 0);
                    step(b1, 2 * p + 1, 1);
                }
                if !last.is_empty() {
                    step(last, nb - 1, 0);
                }
                for t in 0..T {
                    let [a0, a1] = acc[t];
                    outs[t][j] = hsum(_mm256_add_ps(a0, a1)) + (off[t][0] + off[t][1]);
                }
            }
        }
    };
}

tile32!(tile32_avx2, "avx2,fma,f16c", dot_u8_i8);
tile32!(
    tile32_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    dot_u8_i8_vnni
);

/// The 8 runs of 32 unsigned weight values `q` of a 256-value block, dotted with the
/// activations `y` (as i16 products) and weighted by their runs' 16-bit scales `sc`: eight i32
/// sums. Shared by the K-quant formats, which differ only in how `q` and `sc` are unpacked.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_runs(q: &[__m256i; 8], sc: &[__m256i; 8], y: &[i8; QK_K]) -> __m256i {
    let (yq, _) = y.as_chunks::<QK>();
    let mut sumi = _mm256_setzero_si256();
    for r in 0..8 {
        let p = _mm256_maddubs_epi16(q[r], load_y(&yq[r]));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc[r]));
    }
    sumi
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q4k<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    let xs = xs.map(|x| &x[..row_bytes / QuantFormat::Q4K.block_bytes()]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0.0f32; T];
        for (i, b) in row.chunks_exact(QuantFormat::Q4K.block_bytes()).enumerate() {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, mins) = q4k_scales_mins(&b[4..16]);
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let raw = load32(b, 16 + 32 * c);
                q[2 * c] = _mm256_and_si256(raw, _mm256_set1_epi8(0x0F));
                q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0F));
                sc[2 * c] = _mm256_set1_epi16(i16::from(scales[2 * c]));
                sc[2 * c + 1] = _mm256_set1_epi16(i16::from(scales[2 * c + 1]));
            }
            for t in 0..T {
                let y = &xs[t][i];
                let sumi = scaled_runs(&q, &sc, &y.qs);
                let summ: i32 = mins
                    .iter()
                    .zip(y.bsums.chunks_exact(2))
                    .map(|(&m, b)| i32::from(m) * (i32::from(b[0]) + i32::from(b[1])))
                    .sum();
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                off[t] -= (dmin * y.d) * summ as f32;
            }
        }
        for t in 0..T {
            outs[t][j] = hsum(acc[t]) + off[t];
        }
    }
}

/// The eight runs of 32 two-bit values of the 64 bytes at `at` of a `Q2_K` or `Q3_K` block:
/// run `r` is bits `2 * (r % 4)` of bytes `32 * (r / 4)..` .
#[target_feature(enable = "avx2")]
#[inline]
fn two_bit_runs(b: &[u8], at: usize) -> [__m256i; 8] {
    let m2 = _mm256_set1_epi8(0x03);
    let mut q = [_mm256_setzero_si256(); 8];
    for half in 0..2 {
        let raw = load32(b, at + 32 * half);
        q[4 * half] = _mm256_and_si256(raw, m2);
        q[4 * half + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 2), m2);
        q[4 * half + 2] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m2);
        q[4 * half + 3] = _mm256_and_si256(_mm256_srli_epi16(raw, 6), m2);
    }
    q
}

/// Per-run scale vectors for formats with one scale per 16 values: the low 128 bits of run
/// `r` take scale `2 * r`, the high ones scale `2 * r + 1`.
#[target_feature(enable = "avx2")]
#[inline]
fn scales_per_16(scales: &[i16; 16]) -> [__m256i; 8] {
    std::array::from_fn(|r| {
        _mm256_set_m128i(
            _mm_set1_epi16(scales[2 * r + 1]),
            _mm_set1_epi16(scales[2 * r]),
        )
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q2k<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    const BYTES: usize = QuantFormat::Q2K.block_bytes();
    let xs = xs.map(|x| &x[..row_bytes / BYTES]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0.0f32; T];
        for (i, b) in row.chunks_exact(BYTES).enumerate() {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            let q = two_bit_runs(b, 16);
            let sc = scales_per_16(&std::array::from_fn(|g| i16::from(b[g] & 0x0F)));
            for t in 0..T {
                let y = &xs[t][i];
                let sumi = scaled_runs(&q, &sc, &y.qs);
                let summ: i32 = b[..16]
                    .iter()
                    .zip(&y.bsums)
                    .map(|(&m, &s)| i32::from(m >> 4) * i32::from(s))
                    .sum();
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                off[t] -= (dmin * y.d) * summ as f32;
            }
        }
        for t in 0..T {
            outs[t][j] = hsum(acc[t]) + off[t];
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q3k<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    const BYTES: usize = QuantFormat::Q3K.block_bytes();
    let third = _mm256_set1_epi8(0x04);
    let xs = xs.map(|x| &x[..row_bytes / BYTES]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0.0f32; T];
        for (i, b) in row.chunks_exact(BYTES).enumerate() {
            let d = f16_at(b, 108);
            let scales = q3k_scales(&b[96..108]);
            let hm = load32(b, 0);
            let mut q = two_bit_runs(b, 32);
            for (r, v) in q.iter_mut().enumerate() {
                // Bit r of each high-bit byte, as bit 2 of the value.
                let bit = _mm256_set1_epi8((1u8 << r) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                *v = _mm256_or_si256(*v, _mm256_and_si256(set, third));
            }
            let sc = scales_per_16(&scales.map(i16::from));
            for t in 0..T {
                let y = &xs[t][i];
                let sumi = scaled_runs(&q, &sc, &y.qs);
                let so: i32 = scales
                    .iter()
                    .zip(&y.bsums)
                    .map(|(&s, &b)| i32::from(s) * i32::from(b))
                    .sum();
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                off[t] -= (d * y.d) * (4 * so) as f32;
            }
        }
        for t in 0..T {
            outs[t][j] = hsum(acc[t]) + off[t];
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q5k<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    const BYTES: usize = QuantFormat::Q5K.block_bytes();
    let m4 = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    let xs = xs.map(|x| &x[..row_bytes / BYTES]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0.0f32; T];
        for (i, b) in row.chunks_exact(BYTES).enumerate() {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, mins) = q4k_scales_mins(&b[4..16]);
            let qh = load32(b, 16);
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for s in 0..8 {
                // Bit s of each high-bit byte, as bit 4 of the value.
                let bit = _mm256_set1_epi8((1u8 << s) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                let raw = load32(b, 48 + 32 * (s / 2));
                let lo = if s % 2 == 0 {
                    raw
                } else {
                    _mm256_srli_epi16(raw, 4)
                };
                q[s] = _mm256_or_si256(_mm256_and_si256(lo, m4), _mm256_and_si256(set, fifth));
                sc[s] = _mm256_set1_epi16(i16::from(scales[s]));
            }
            for t in 0..T {
                let y = &xs[t][i];
                let sumi = scaled_runs(&q, &sc, &y.qs);
                let summ: i32 = mins
                    .iter()
                    .zip(y.bsums.chunks_exact(2))
                    .map(|(&m, b)| i32::from(m) * (i32::from(b[0]) + i32::from(b[1])))
                    .sum();
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                off[t] -= (dmin * y.d) * summ as f32;
            }
        }
        for t in 0..T {
            outs[t][j] = hsum(acc[t]) + off[t];
        }
    }
}

/// Float weight kinds for [`tile_float_avx2`].
const F16: u8 = 0;
const BF16: u8 = 1;
const F32: u8 = 2;

/// Eight float weights of kind `K` starting at value `at` of `row`, widened to f32.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn widen8<const K: u8>(row: &[u8], at: usize) -> __m256 {
    match K {
        F16 => _mm256_cvtph_ps(load16(row, 2 * at)),
        BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(load16(row, 2 * at)),
            16,
        )),
        _ => _mm256_castsi256_ps(load32(row, 4 * at)),
    }
}

/// Eight activations starting at `at`.
#[target_feature(enable = "avx2")]
#[inline]
fn load_x8(x: &[f32], at: usize) -> __m256 {
    let a: [f32; 8] = x[at..at + 8].try_into().unwrap_or([0.0; 8]);
    bytemuck::cast(a)
}

/// The eight lanes of `v`.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes(v: __m256) -> [f32; 8] {
    bytemuck::cast(v)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_float_avx2<const T: usize, const K: u8>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[f32]; T],
    outs: &mut [&mut [f32]],
) {
    use super::dot::{lane_sum, LANES};
    let width = if K == F32 { 4 } else { 2 };
    let cols = row_bytes / width;
    let runs = cols / LANES;
    let xs = xs.map(|x| &x[..cols]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        // Runs of 8 alternate between two sums, so that consecutive runs' multiply-adds do
        // not wait on each other.
        for p in 0..runs / 2 {
            let (r0, r1) = (2 * LANES * p, 2 * LANES * p + LANES);
            let (w0, w1) = (widen8::<K>(row, r0), widen8::<K>(row, r1));
            for t in 0..T {
                let [a0, a1] = &mut acc[t];
                *a0 = _mm256_fmadd_ps(w0, load_x8(xs[t], r0), *a0);
                *a1 = _mm256_fmadd_ps(w1, load_x8(xs[t], r1), *a1);
            }
        }
        if runs % 2 == 1 {
            let r = LANES * (runs - 1);
            let wv = widen8::<K>(row, r);
            for t in 0..T {
                acc[t][0] = _mm256_fmadd_ps(wv, load_x8(xs[t], r), acc[t][0]);
            }
        }
        for t in 0..T {
            let [a0, a1] = acc[t];
            let mut sum = lane_sum(lanes(_mm256_add_ps(a0, a1)));
            for i in LANES * runs..cols {
                let v = match K {
                    F16 => f16_at(row, 2 * i),
                    BF16 => super::format::bf16_at(row, 2 * i),
                    _ => f32::from_le_bytes([
                        row[4 * i],
                        row[4 * i + 1],
                        row[4 * i + 2],
                        row[4 * i + 3],
                    ]),
                };
                sum = v.mul_add(xs[t][i], sum);
            }
            outs[t][j] = sum;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q6k<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let xs = xs.map(|x| &x[..row_bytes / QuantFormat::Q6K.block_bytes()]);
    for (j, row) in w.chunks_exact(row_bytes).enumerate() {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [0.0f32; T];
        for (i, b) in row.chunks_exact(QuantFormat::Q6K.block_bytes()).enumerate() {
            let d = f16_at(b, 208);
            let scales: [i8; 16] = std::array::from_fn(|g| b[192 + g] as i8);
            // Runs of 32 values in order; run r = 4 * half + c.
            let mut q = [_mm256_setzero_si256(); 8];
            let mut sc = [_mm256_setzero_si256(); 8];
            for half in 0..2 {
                let l0 = load32(b, 64 * half);
                let l1 = load32(b, 64 * half + 32);
                let h = load32(b, 128 + 32 * half);
                let hi = |shift: i32| -> __m256i {
                    // Bits shift..shift+2 of each high byte, moved to bits 4-5.
                    let v = match shift {
                        0 => h,
                        2 => _mm256_srli_epi16(h, 2),
                        4 => _mm256_srli_epi16(h, 4),
                        _ => _mm256_srli_epi16(h, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
                };
                let r = 4 * half;
                q[r] = _mm256_or_si256(_mm256_and_si256(l0, m4), hi(0));
                q[r + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), hi(2));
                q[r + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), hi(4));
                q[r + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), hi(6));
                for c in 0..4 {
                    let g = 2 * (r + c);
                    sc[r + c] = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(scales[g + 1])),
                        _mm_set1_epi16(i16::from(scales[g])),
                    );
                }
            }
            for t in 0..T {
                let y = &xs[t][i];
                let sumi = scaled_runs(&q, &sc, &y.qs);
                let so: i32 = scales
                    .iter()
                    .zip(&y.bsums)
                    .map(|(&sc, &b)| i32::from(sc) * i32::from(b))
                    .sum();
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[t]);
                off[t] -= (d * y.d) * (32 * so) as f32;
            }
        }
        for t in 0..T {
            outs[t][j] = hsum(acc[t]) + off[t];
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn detection_is_stable() {
        assert_eq!(super::level(), super::level());
    }
}
