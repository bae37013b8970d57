//! AVX2 and AVX-512 VNNI kernels for weights interleaved eight rows at a time
//! ([`crate::kernels::interleave`]): a tile of 8 weight rows by up to 8 tokens in registers.
//!
//! The parent module's rules hold here: safe Rust inside `#[target_feature]` functions, and
//! `unsafe` only to enter them once per tile after [`super::level`] saw the features.

use std::arch::x86_64::*;

use super::*;

/// Fewest activation rows for which AVX-512 takes two groups of rows at once
/// ([`super::paired`]). On fewer the 256-bit kernels are faster (`format_bench 9 B` on one
/// 1B layer, 2 threads: at 2 rows 0.73-0.80 against 0.89-1.14 ms, at 4 about even), and from
/// 6 the pairs are (1.33 against 1.63 ms for `Q4_0` at 6 rows; about 1.6x at 16 or 32).
const PAIRED_TILE: usize = 6;

/// Defines `$name`: the portable kernel `$portable` of [`crate::kernels::interleave`] at
/// `level` (AVX-512 VNNI, two groups at once from [`PAIRED_TILE`] rows, or AVX2); `false`
/// (nothing written) above [`level`] or without either.
macro_rules! tile_at_level {
    ($name:ident, $portable:literal, $block:ty, $avx2:ident, $vnni:ident, $paired:ident) => {
        #[doc = concat!("[`crate::kernels::interleave::", $portable, "`] at `level`; `false`")]
        /// (nothing written) above [`level`] or without AVX2.
        pub(in crate::kernels) fn $name<const T: usize>(
            level: Level,
            w: &[u8],
            nb: usize,
            xs: [&[$block]; T],
            outs: &mut [&mut [f32]],
        ) -> bool {
            // SAFETY: `level()` saw the CPU features each function is compiled for.
            unsafe {
                match level.min(self::level()) {
                    Level::Portable => return false,
                    Level::Avx2 => $avx2::<T>(w, nb, xs, outs),
                    Level::Avx512Vnni if T >= PAIRED_TILE => {
                        super::paired::$paired::<T>(w, nb, xs, outs)
                    }
                    Level::Avx512Vnni => $vnni::<T>(w, nb, xs, outs),
                }
            }
            true
        }
    };
}

tile_at_level!(
    tile_x8_q4_0,
    "tile_q4_0",
    Q8Block,
    x8_q4_0_avx2,
    x8_q4_0_vnni,
    x16_q4_0
);
tile_at_level!(
    tile_x8_q8_0,
    "tile_q8_0",
    Q8Block,
    x8_q8_0_avx2,
    x8_q8_0_vnni,
    x16_q8_0
);
tile_at_level!(
    tile_x8_q4k,
    "tile_q4k",
    Q8KBlock,
    x8_q4k_avx2,
    x8_q4k_vnni,
    x16_q4k
);
tile_at_level!(
    tile_x8_q6k,
    "tile_q6k",
    Q8KBlock,
    x8_q6k_avx2,
    x8_q6k_vnni,
    x16_q6k
);

/// `acc` plus, in each 32-bit lane, the dot product of its four unsigned bytes of `q` (each
/// at most 63) with the four signed bytes of `y`. The 16-bit pair sums cannot saturate
/// (2 · 63 · 128 < 2¹⁵), so this equals VNNI's [`dot4_acc_vnni`] exactly.
#[target_feature(enable = "avx2")]
#[inline]
fn dot4_acc_avx2(acc: __m256i, q: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(acc, dot_u8_i8(q, y))
}

/// [`dot4_acc_avx2`] in one instruction.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni")]
#[inline]
fn dot4_acc_vnni(acc: __m256i, q: __m256i, y: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, q, y)
}

/// `Q8_0`'s signed weight bytes as AVX2 multiplies them: unchanged ([`dot4_signed_avx2`] takes
/// their signs).
#[target_feature(enable = "avx2")]
#[inline]
fn signed_avx2(q: __m256i) -> __m256i {
    q
}

/// `acc` plus, in each 32-bit lane, the dot product of its four signed bytes of `q` with the
/// four of `y`: `|q|` against `y` with `q`'s signs. The 16-bit pair sums cannot saturate
/// (2 · 128 · 127 < 2¹⁵: quantised activations lie in -127..=127).
#[target_feature(enable = "avx2")]
#[inline]
fn dot4_signed_avx2(acc: __m256i, q: __m256i, y: __m256i) -> __m256i {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)),
            _mm256_set1_epi16(1),
        ),
    )
}

/// Where the signed sums of [`dot4_signed_avx2`] start: at zero.
#[target_feature(enable = "avx2")]
#[inline]
fn signed_start_avx2(_y_sum: i32) -> __m256i {
    _mm256_setzero_si256()
}

/// `Q8_0`'s signed weight bytes as VNNI multiplies them: `q + 128`, unsigned.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn signed_vnni(q: __m256i) -> __m256i {
    _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN))
}

/// Where the sums of `q + 128` against `y` start so that they come out as those of `q`:
/// `-128 · Σ y`.
#[target_feature(enable = "avx2")]
#[inline]
fn signed_start_vnni(y_sum: i32) -> __m256i {
    _mm256_set1_epi32(-128 * y_sum)
}

/// Defines an interleaved `Q8_0` tile for one instruction set, as the `Q4_0` one of
/// [`tile_x8`]: `$prep` turns the weight bytes into what `$dot` multiplies, and `$start` gives
/// the sum each block starts from.
macro_rules! tile_x8_q8 {
    ($name:ident, $features:literal, $prep:ident, $dot:ident, $start:ident) => {
        #[target_feature(enable = $features)]
        pub(super) fn $name<const T: usize>(
            w: &[u8],
            nb: usize,
            xs: [&[Q8Block]; T],
            outs: &mut [&mut [f32]],
        ) {
            use crate::kernels::interleave::{Q8_0_BYTES, ROWS};
            let xs = xs.map(|x| &x[..nb]);
            for (g, group) in w.chunks_exact(nb * Q8_0_BYTES).enumerate() {
                let mut acc = [_mm256_setzero_ps(); T];
                for (i, b) in group.chunks_exact(Q8_0_BYTES).enumerate() {
                    let d = _mm256_cvtph_ps(load16(b, 0));
                    // Run k holds values 4k..4k + 4 of each row.
                    let q: [__m256i; 8] =
                        std::array::from_fn(|k| $prep(load32(b, 2 * ROWS + 32 * k)));
                    for t in 0..T {
                        let y = &xs[t][i];
                        let mut isum = $start(y.sum);
                        for (k, &qk) in q.iter().enumerate() {
                            isum = $dot(isum, qk, bcast4(&y.qs, 4 * k));
                        }
                        let dy = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                        acc[t] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(isum), acc[t]);
                    }
                }
                for t in 0..T {
                    store8(outs[t], ROWS * g, acc[t]);
                }
            }
        }
    };
}

tile_x8_q8!(
    x8_q8_0_avx2,
    "avx2,fma,f16c",
    signed_avx2,
    dot4_signed_avx2,
    signed_start_avx2
);
tile_x8_q8!(
    x8_q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    signed_vnni,
    dot4_acc_vnni,
    signed_start_vnni
);

/// Activation bytes `at..at + 4` in every 32-bit lane.
#[target_feature(enable = "avx2")]
#[inline]
fn bcast4(qs: &[i8], at: usize) -> __m256i {
    let b: [i8; 4] = qs[at..at + 4].try_into().unwrap_or([0; 4]);
    _mm256_set1_epi32(i32::from_le_bytes(b.map(|v| v as u8)))
}

/// The eight bytes of `s` at `at`, in the low half.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn load8(s: &[u8], at: usize) -> __m128i {
    let a: [u8; 8] = s[at..at + 8].try_into().unwrap_or([0; 8]);
    _mm_set_epi64x(0, i64::from_le_bytes(a))
}

/// Stores the eight lanes of `v` at `out[at..at + 8]`.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn store8(out: &mut [f32], at: usize, v: __m256) {
    let l: [f32; 8] = bytemuck::cast(v);
    out[at..at + 8].copy_from_slice(&l);
}

/// Defines the interleaved `Q4_0` and `Q4_K` kernels for one instruction set; `$dot` is
/// [`dot4_acc_avx2`] or [`dot4_acc_vnni`]. Each block of eight weight rows is unpacked once
/// into registers and dotted with the `T` activation rows, each row's sums one lane.
macro_rules! tile_x8 {
    ($q4_0:ident, $q4k:ident, $q6k:ident, $features:literal, $dot:ident) => {
        #[target_feature(enable = $features)]
        pub(super) fn $q6k<const T: usize>(
            w: &[u8],
            nb: usize,
            xs: [&[Q8KBlock]; T],
            outs: &mut [&mut [f32]],
        ) {
            use crate::kernels::interleave::{Q6K_BYTES, Q6K_HIGH, Q6K_LOW, Q6K_SCALES, ROWS};
            let m4 = _mm256_set1_epi8(0x0F);
            let m30 = _mm256_set1_epi8(0x30);
            let xs = xs.map(|x| &x[..nb]);
            // Bits 2k..2k + 2 of each byte of `h`, as bits 4-5.
            let top = |h: __m256i, k: usize| -> __m256i {
                let v = match k {
                    0 => _mm256_slli_epi16(h, 4),
                    1 => _mm256_slli_epi16(h, 2),
                    2 => h,
                    _ => _mm256_srli_epi16(h, 2),
                };
                _mm256_and_si256(v, m30)
            };
            for (g, group) in w.chunks_exact(nb * Q6K_BYTES).enumerate() {
                let mut acc = [_mm256_setzero_ps(); T];
                for (i, b) in group.chunks_exact(Q6K_BYTES).enumerate() {
                    let mut total = [_mm256_setzero_si256(); T];
                    for c in 0..4 {
                        // Sub-blocks 2c (runs 0..8) and 2c + 1 (runs 8..16).
                        let (s0, s1) = (2 * c, 2 * c + 1);
                        let sc: [__m256i; 4] = std::array::from_fn(|p| {
                            _mm256_cvtepi8_epi32(load8(b, Q6K_SCALES + ROWS * (4 * c + p)))
                        });
                        let mut q = [_mm256_setzero_si256(); 16];
                        for j in 0..8 {
                            let raw = load32(b, Q6K_LOW + 32 * (8 * c + j));
                            let h0 = load32(b, Q6K_HIGH + 32 * (8 * (s0 / 4) + j));
                            let h1 = load32(b, Q6K_HIGH + 32 * (8 * (s1 / 4) + j));
                            q[j] = _mm256_or_si256(_mm256_and_si256(raw, m4), top(h0, s0 % 4));
                            q[j + 8] = _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
                                top(h1, s1 % 4),
                            );
                        }
                        for t in 0..T {
                            let ys = &xs[t][i].qs;
                            // 16-value sums: sub-block 2c's two halves, then 2c + 1's.
                            let mut part = [_mm256_setzero_si256(); 4];
                            for j in 0..8 {
                                let h = j / 4;
                                part[h] = $dot(part[h], q[j], bcast4(ys, 64 * c + 4 * j));
                                part[2 + h] =
                                    $dot(part[2 + h], q[j + 8], bcast4(ys, 64 * c + 32 + 4 * j));
                            }
                            let mut sum = total[t];
                            for (p, &v) in part.iter().enumerate() {
                                sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(v, sc[p]));
                            }
                            total[t] = sum;
                        }
                    }
                    // Lane r: the scales of 16-value groups 2p and 2p + 1 of row r, as two i16.
                    let pairs: [__m256i; 8] = std::array::from_fn(|p| {
                        let a = load8(b, Q6K_SCALES + ROWS * 2 * p);
                        let c = load8(b, Q6K_SCALES + ROWS * (2 * p + 1));
                        _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, c))
                    });
                    let d = _mm256_cvtph_ps(load16(b, 0));
                    for t in 0..T {
                        let y = &xs[t][i];
                        let bs = &y.bsums;
                        let mut so = _mm256_setzero_si256();
                        for (p, &sp) in pairs.iter().enumerate() {
                            let pair = i32::from(bs[2 * p] as u16)
                                | (i32::from(bs[2 * p + 1] as u16) << 16);
                            so = _mm256_add_epi32(
                                so,
                                _mm256_madd_epi16(sp, _mm256_set1_epi32(pair)),
                            );
                        }
                        let sum = _mm256_sub_epi32(total[t], _mm256_slli_epi32(so, 5));
                        let dy = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                        acc[t] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(sum), acc[t]);
                    }
                }
                for t in 0..T {
                    store8(outs[t], ROWS * g, acc[t]);
                }
            }
        }

        #[target_feature(enable = $features)]
        pub(super) fn $q4_0<const T: usize>(
            w: &[u8],
            nb: usize,
            xs: [&[Q8Block]; T],
            outs: &mut [&mut [f32]],
        ) {
            use crate::kernels::interleave::{Q4_0_BYTES, ROWS};
            let m4 = _mm256_set1_epi8(0x0F);
            let xs = xs.map(|x| &x[..nb]);
            for (g, group) in w.chunks_exact(nb * Q4_0_BYTES).enumerate() {
                let mut acc = [_mm256_setzero_ps(); T];
                for (i, b) in group.chunks_exact(Q4_0_BYTES).enumerate() {
                    let d = _mm256_cvtph_ps(load16(b, 0));
                    // Run k holds values 4k..4k + 4 of each row.
                    let mut q = [_mm256_setzero_si256(); 8];
                    for j in 0..4 {
                        let raw = load32(b, 2 * ROWS + 32 * j);
                        q[j] = _mm256_and_si256(raw, m4);
                        q[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    }
                    for t in 0..T {
                        let y = &xs[t][i];
                        // The `- 8` of every value, folded into the integer sum.
                        let mut isum = _mm256_set1_epi32(-8 * y.sum);
                        for (k, &qk) in q.iter().enumerate() {
                            isum = $dot(isum, qk, bcast4(&y.qs, 4 * k));
                        }
                        let dy = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                        acc[t] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(isum), acc[t]);
                    }
                }
                for t in 0..T {
                    store8(outs[t], ROWS * g, acc[t]);
                }
            }
        }

        #[target_feature(enable = $features)]
        pub(super) fn $q4k<const T: usize>(
            w: &[u8],
            nb: usize,
            xs: [&[Q8KBlock]; T],
            outs: &mut [&mut [f32]],
        ) {
            use crate::kernels::interleave::{Q4K_BYTES, ROWS};
            const DMIN: usize = 2 * ROWS;
            const SCALES: usize = 4 * ROWS;
            const MINS: usize = SCALES + 8 * ROWS;
            const QS: usize = MINS + 8 * ROWS;
            let m4 = _mm256_set1_epi8(0x0F);
            let xs = xs.map(|x| &x[..nb]);
            for (g, group) in w.chunks_exact(nb * Q4K_BYTES).enumerate() {
                let mut acc = [_mm256_setzero_ps(); T];
                let mut off = [_mm256_setzero_ps(); T];
                for (i, b) in group.chunks_exact(Q4K_BYTES).enumerate() {
                    let mut sumi = [_mm256_setzero_si256(); T];
                    for c in 0..4 {
                        let sc0 = _mm256_cvtepu8_epi32(load8(b, SCALES + ROWS * 2 * c));
                        let sc1 = _mm256_cvtepu8_epi32(load8(b, SCALES + ROWS * (2 * c + 1)));
                        // Runs 0..8: sub-block 2c; runs 8..16: sub-block 2c + 1; run j holds
                        // values 4j..4j + 4 of the sub-block of each row.
                        let mut q = [_mm256_setzero_si256(); 16];
                        for j in 0..8 {
                            let raw = load32(b, QS + 32 * (8 * c + j));
                            q[j] = _mm256_and_si256(raw, m4);
                            q[j + 8] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                        }
                        for t in 0..T {
                            let ys = &xs[t][i].qs;
                            let mut lo = _mm256_setzero_si256();
                            let mut hi = _mm256_setzero_si256();
                            for j in 0..8 {
                                lo = $dot(lo, q[j], bcast4(ys, 64 * c + 4 * j));
                                hi = $dot(hi, q[j + 8], bcast4(ys, 64 * c + 32 + 4 * j));
                            }
                            let scaled = _mm256_add_epi32(
                                _mm256_mullo_epi32(lo, sc0),
                                _mm256_mullo_epi32(hi, sc1),
                            );
                            sumi[t] = _mm256_add_epi32(sumi[t], scaled);
                        }
                    }
                    // Lane r: the mins of sub-blocks 2p and 2p + 1 of row r, as two i16.
                    let mins: [__m256i; 4] = std::array::from_fn(|p| {
                        let m0 = load8(b, MINS + ROWS * 2 * p);
                        let m1 = load8(b, MINS + ROWS * (2 * p + 1));
                        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m0, m1))
                    });
                    let d = _mm256_cvtph_ps(load16(b, 0));
                    let dmin = _mm256_cvtph_ps(load16(b, DMIN));
                    for t in 0..T {
                        let y = &xs[t][i];
                        let bs = &y.bsums;
                        let mut summ = _mm256_setzero_si256();
                        for (p, &mp) in mins.iter().enumerate() {
                            let y0 = bs[4 * p].wrapping_add(bs[4 * p + 1]);
                            let y1 = bs[4 * p + 2].wrapping_add(bs[4 * p + 3]);
                            let pair = i32::from(y0 as u16) | (i32::from(y1 as u16) << 16);
                            summ = _mm256_add_epi32(
                                summ,
                                _mm256_madd_epi16(mp, _mm256_set1_epi32(pair)),
                            );
                        }
                        let yd = _mm256_set1_ps(y.d);
                        let dy = _mm256_mul_ps(d, yd);
                        acc[t] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
                        let my = _mm256_mul_ps(dmin, yd);
                        off[t] = _mm256_fmadd_ps(my, _mm256_cvtepi32_ps(summ), off[t]);
                    }
                }
                for t in 0..T {
                    store8(outs[t], ROWS * g, _mm256_sub_ps(acc[t], off[t]));
                }
            }
        }
    };
}

tile_x8!(
    x8_q4_0_avx2,
    x8_q4k_avx2,
    x8_q6k_avx2,
    "avx2,fma,f16c",
    dot4_acc_avx2
);
tile_x8!(
    x8_q4_0_vnni,
    x8_q4k_vnni,
    x8_q6k_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    dot4_acc_vnni
);
