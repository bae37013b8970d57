//! AVX-512 kernels for the interleaved layout ([`crate::kernels::interleave`]) that take two
//! groups of eight rows at once: group `2p` in the low half of each 512-bit register and
//! group `2p + 1` in the high half, so that one `vpdpbusd` serves 16 weight rows and the
//! activations are broadcast once per 16 rows instead of once per 8.
//!
//! Each lane does exactly what the 256-bit kernels of [`super::interleaved`] do for its row
//! (the same integer sums, the same float operations in the same order), so every output has
//! the same bits whichever of them ran; the odd group of a run is left to those kernels.
//! The parent module's rules hold here: safe Rust inside `#[target_feature]` functions.

use std::arch::x86_64::*;

use super::*;
use crate::kernels::interleave::ROWS;

/// Group `a`'s 32 bytes at `at` in the low half, group `b`'s in the high half.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair32(a: &[u8], b: &[u8], at: usize) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(load32(a, at)), load32(b, at), 1)
}

/// Eight bytes of `a` at `at`, then eight of `b`.
#[target_feature(enable = "avx2")]
#[inline]
fn pair8(a: &[u8], b: &[u8], at: usize) -> __m128i {
    _mm_unpacklo_epi64(interleaved::load8(a, at), interleaved::load8(b, at))
}

/// The 16 bytes `(x[r], y[r])`, `r` in `0..8`, of rows' byte fields at `at` and `at2`.
#[target_feature(enable = "avx2")]
#[inline]
fn zip8(g: &[u8], at: usize, at2: usize) -> __m128i {
    _mm_unpacklo_epi8(interleaved::load8(g, at), interleaved::load8(g, at2))
}

/// The eight f16 of `a` at `at` then the eight of `b`, widened.
#[target_feature(enable = "avx512f")]
#[inline]
fn f16_pair(a: &[u8], b: &[u8], at: usize) -> __m512 {
    _mm512_cvtph_ps(_mm256_set_m128i(load16(b, at), load16(a, at)))
}

/// Activation bytes `at..at + 4` in every 32-bit lane.
#[target_feature(enable = "avx512f")]
#[inline]
fn bcast4(qs: &[i8], at: usize) -> __m512i {
    let b: [i8; 4] = qs[at..at + 4].try_into().unwrap_or([0; 4]);
    _mm512_set1_epi32(i32::from_le_bytes(b.map(|v| v as u8)))
}

/// Stores the 16 lanes of `v` at `out[at..at + 16]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn store16(out: &mut [f32], at: usize, v: __m512) {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    interleaved::store8(out, at, lo);
    interleaved::store8(out, at + ROWS, hi);
}

/// The output rows after the first `skip`, for the kernel that takes the odd group.
fn skip_rows<'o, const T: usize>(outs: &'o mut [&mut [f32]], skip: usize) -> [&'o mut [f32]; T] {
    let mut it = outs.iter_mut();
    std::array::from_fn(|_| it.next().map_or(Default::default(), |o| &mut o[skip..]))
}

/// Runs `pairs` over whole pairs of groups of `bytes` bytes each and `single` over the odd
/// group left at the end, with the outputs moved on past the pairs' rows.
macro_rules! pairs_then_single {
    ($w:ident, $bytes:expr, $outs:ident, |$pair:ident, $at:ident| $body:block, $single:expr) => {{
        let bytes = $bytes;
        let pairs = $w.len() / bytes / 2;
        let (paired, rest) = $w.split_at(pairs * 2 * bytes);
        for (p, $pair) in paired.chunks_exact(2 * bytes).enumerate() {
            let $at = 2 * ROWS * p;
            $body
        }
        if !rest.is_empty() {
            let mut tail = skip_rows::<T>($outs, 2 * ROWS * pairs);
            $single(rest, &mut tail[..]);
        }
    }};
}

/// [`interleaved`]'s `Q4_0` tile on pairs of groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn x16_q4_0<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) {
    use crate::kernels::interleave::Q4_0_BYTES;
    let m4 = _mm512_set1_epi8(0x0F);
    let xs = xs.map(|x| &x[..nb]);
    pairs_then_single!(
        w,
        nb * Q4_0_BYTES,
        outs,
        |pair, at| {
            let (ga, gb) = pair.split_at(pair.len() / 2);
            let mut acc = [_mm512_setzero_ps(); T];
            let blocks = ga.chunks_exact(Q4_0_BYTES).zip(gb.chunks_exact(Q4_0_BYTES));
            for (i, (a, b)) in blocks.enumerate() {
                let d = f16_pair(a, b, 0);
                let mut q = [_mm512_setzero_si512(); 8];
                for j in 0..4 {
                    let raw = pair32(a, b, 2 * ROWS + 32 * j);
                    q[j] = _mm512_and_si512(raw, m4);
                    q[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                }
                for t in 0..T {
                    let y = &xs[t][i];
                    let mut isum = _mm512_set1_epi32(-8 * y.sum);
                    for (k, &qk) in q.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, qk, bcast4(&y.qs, 4 * k));
                    }
                    let dy = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
                    acc[t] = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(isum), acc[t]);
                }
            }
            for t in 0..T {
                store16(outs[t], at, acc[t]);
            }
        },
        |rest, tail: &mut [&mut [f32]]| interleaved::x8_q4_0_vnni::<T>(rest, nb, xs, tail)
    );
}

/// [`interleaved`]'s `Q8_0` tile on pairs of groups: the weights as `q + 128`, unsigned, the
/// sums started at `-128 · Σ y`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn x16_q8_0<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) {
    use crate::kernels::interleave::Q8_0_BYTES;
    let flip = _mm512_set1_epi8(i8::MIN);
    let xs = xs.map(|x| &x[..nb]);
    pairs_then_single!(
        w,
        nb * Q8_0_BYTES,
        outs,
        |pair, at| {
            let (ga, gb) = pair.split_at(pair.len() / 2);
            let mut acc = [_mm512_setzero_ps(); T];
            let blocks = ga.chunks_exact(Q8_0_BYTES).zip(gb.chunks_exact(Q8_0_BYTES));
            for (i, (a, b)) in blocks.enumerate() {
                let d = f16_pair(a, b, 0);
                let q: [__m512i; 8] = std::array::from_fn(|k| {
                    _mm512_xor_si512(pair32(a, b, 2 * ROWS + 32 * k), flip)
                });
                for t in 0..T {
                    let y = &xs[t][i];
                    let mut isum = _mm512_set1_epi32(-128 * y.sum);
                    for (k, &qk) in q.iter().enumerate() {
                        isum = _mm512_dpbusd_epi32(isum, qk, bcast4(&y.qs, 4 * k));
                    }
                    let dy = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
                    acc[t] = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(isum), acc[t]);
                }
            }
            for t in 0..T {
                store16(outs[t], at, acc[t]);
            }
        },
        |rest, tail: &mut [&mut [f32]]| interleaved::x8_q8_0_vnni::<T>(rest, nb, xs, tail)
    );
}

/// [`interleaved`]'s `Q4_K` tile on pairs of groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn x16_q4k<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    use crate::kernels::interleave::Q4K_BYTES;
    const DMIN: usize = 2 * ROWS;
    const SCALES: usize = 4 * ROWS;
    const MINS: usize = SCALES + 8 * ROWS;
    const QS: usize = MINS + 8 * ROWS;
    let m4 = _mm512_set1_epi8(0x0F);
    let xs = xs.map(|x| &x[..nb]);
    pairs_then_single!(
        w,
        nb * Q4K_BYTES,
        outs,
        |pair, at| {
            let (ga, gb) = pair.split_at(pair.len() / 2);
            let mut acc = [_mm512_setzero_ps(); T];
            let mut off = [_mm512_setzero_ps(); T];
            let blocks = ga.chunks_exact(Q4K_BYTES).zip(gb.chunks_exact(Q4K_BYTES));
            for (i, (a, b)) in blocks.enumerate() {
                let mut sumi = [_mm512_setzero_si512(); T];
                for c in 0..4 {
                    let sc0 = _mm512_cvtepu8_epi32(pair8(a, b, SCALES + ROWS * 2 * c));
                    let sc1 = _mm512_cvtepu8_epi32(pair8(a, b, SCALES + ROWS * (2 * c + 1)));
                    let mut q = [_mm512_setzero_si512(); 16];
                    for j in 0..8 {
                        let raw = pair32(a, b, QS + 32 * (8 * c + j));
                        q[j] = _mm512_and_si512(raw, m4);
                        q[j + 8] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                    }
                    for t in 0..T {
                        let ys = &xs[t][i].qs;
                        let mut lo = _mm512_setzero_si512();
                        let mut hi = _mm512_setzero_si512();
                        for j in 0..8 {
                            lo = _mm512_dpbusd_epi32(lo, q[j], bcast4(ys, 64 * c + 4 * j));
                            hi = _mm512_dpbusd_epi32(hi, q[j + 8], bcast4(ys, 64 * c + 32 + 4 * j));
                        }
                        let scaled = _mm512_add_epi32(
                            _mm512_mullo_epi32(lo, sc0),
                            _mm512_mullo_epi32(hi, sc1),
                        );
                        sumi[t] = _mm512_add_epi32(sumi[t], scaled);
                    }
                }
                // Lane r: the mins of sub-blocks 2p and 2p + 1 of row r, as two i16.
                let mins: [__m512i; 4] = std::array::from_fn(|p| {
                    let (m0, m1) = (MINS + ROWS * 2 * p, MINS + ROWS * (2 * p + 1));
                    _mm512_cvtepu8_epi16(_mm256_set_m128i(zip8(b, m0, m1), zip8(a, m0, m1)))
                });
                let d = f16_pair(a, b, 0);
                let dmin = f16_pair(a, b, DMIN);
                for t in 0..T {
                    let y = &xs[t][i];
                    let bs = &y.bsums;
                    let mut summ = _mm512_setzero_si512();
                    for (p, &mp) in mins.iter().enumerate() {
                        let y0 = bs[4 * p].wrapping_add(bs[4 * p + 1]);
                        let y1 = bs[4 * p + 2].wrapping_add(bs[4 * p + 3]);
                        let pair = i32::from(y0 as u16) | (i32::from(y1 as u16) << 16);
                        summ =
                            _mm512_add_epi32(summ, _mm512_madd_epi16(mp, _mm512_set1_epi32(pair)));
                    }
                    let yd = _mm512_set1_ps(y.d);
                    let dy = _mm512_mul_ps(d, yd);
                    acc[t] = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(sumi[t]), acc[t]);
                    let my = _mm512_mul_ps(dmin, yd);
                    off[t] = _mm512_fmadd_ps(my, _mm512_cvtepi32_ps(summ), off[t]);
                }
            }
            for t in 0..T {
                store16(outs[t], at, _mm512_sub_ps(acc[t], off[t]));
            }
        },
        |rest, tail: &mut [&mut [f32]]| interleaved::x8_q4k_vnni::<T>(rest, nb, xs, tail)
    );
}

/// [`interleaved`]'s `Q6_K` tile on pairs of groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn x16_q6k<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    use crate::kernels::interleave::{Q6K_BYTES, Q6K_HIGH, Q6K_LOW, Q6K_SCALES};
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let xs = xs.map(|x| &x[..nb]);
    // Bits 2k..2k + 2 of each byte of `h`, as bits 4-5.
    let top = |h: __m512i, k: usize| -> __m512i {
        let v = match k {
            0 => _mm512_slli_epi16(h, 4),
            1 => _mm512_slli_epi16(h, 2),
            2 => h,
            _ => _mm512_srli_epi16(h, 2),
        };
        _mm512_and_si512(v, m30)
    };
    pairs_then_single!(
        w,
        nb * Q6K_BYTES,
        outs,
        |pair, at| {
            let (ga, gb) = pair.split_at(pair.len() / 2);
            let mut acc = [_mm512_setzero_ps(); T];
            let blocks = ga.chunks_exact(Q6K_BYTES).zip(gb.chunks_exact(Q6K_BYTES));
            for (i, (a, b)) in blocks.enumerate() {
                let mut total = [_mm512_setzero_si512(); T];
                for c in 0..4 {
                    // Sub-blocks 2c (runs 0..8) and 2c + 1 (runs 8..16).
                    let (s0, s1) = (2 * c, 2 * c + 1);
                    let sc: [__m512i; 4] = std::array::from_fn(|p| {
                        _mm512_cvtepi8_epi32(pair8(a, b, Q6K_SCALES + ROWS * (4 * c + p)))
                    });
                    let mut q = [_mm512_setzero_si512(); 16];
                    for j in 0..8 {
                        let raw = pair32(a, b, Q6K_LOW + 32 * (8 * c + j));
                        let h0 = pair32(a, b, Q6K_HIGH + 32 * (8 * (s0 / 4) + j));
                        let h1 = pair32(a, b, Q6K_HIGH + 32 * (8 * (s1 / 4) + j));
                        q[j] = _mm512_or_si512(_mm512_and_si512(raw, m4), top(h0, s0 % 4));
                        q[j + 8] = _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4),
                            top(h1, s1 % 4),
                        );
                    }
                    for t in 0..T {
                        let ys = &xs[t][i].qs;
                        // 16-value sums: sub-block 2c's two halves, then 2c + 1's.
                        let mut part = [_mm512_setzero_si512(); 4];
                        for j in 0..8 {
                            let h = j / 4;
                            part[h] =
                                _mm512_dpbusd_epi32(part[h], q[j], bcast4(ys, 64 * c + 4 * j));
                            part[2 + h] = _mm512_dpbusd_epi32(
                                part[2 + h],
                                q[j + 8],
                                bcast4(ys, 64 * c + 32 + 4 * j),
                            );
                        }
                        let mut sum = total[t];
                        for (p, &v) in part.iter().enumerate() {
                            sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(v, sc[p]));
                        }
                        total[t] = sum;
                    }
                }
                // Lane r: the scales of 16-value groups 2p and 2p + 1 of row r, as two i16.
                let pairs: [__m512i; 8] = std::array::from_fn(|p| {
                    let (s0, s1) = (Q6K_SCALES + ROWS * 2 * p, Q6K_SCALES + ROWS * (2 * p + 1));
                    _mm512_cvtepi8_epi16(_mm256_set_m128i(zip8(b, s0, s1), zip8(a, s0, s1)))
                });
                let d = f16_pair(a, b, 0);
                for t in 0..T {
                    let y = &xs[t][i];
                    let bs = &y.bsums;
                    let mut so = _mm512_setzero_si512();
                    for (p, &sp) in pairs.iter().enumerate() {
                        let pair =
                            i32::from(bs[2 * p] as u16) | (i32::from(bs[2 * p + 1] as u16) << 16);
                        so = _mm512_add_epi32(so, _mm512_madd_epi16(sp, _mm512_set1_epi32(pair)));
                    }
                    let sum = _mm512_sub_epi32(total[t], _mm512_slli_epi32(so, 5));
                    let dy = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
                    acc[t] = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(sum), acc[t]);
                }
            }
            for t in 0..T {
                store16(outs[t], at, acc[t]);
            }
        },
        |rest, tail: &mut [&mut [f32]]| interleaved::x8_q6k_vnni::<T>(rest, nb, xs, tail)
    );
}
