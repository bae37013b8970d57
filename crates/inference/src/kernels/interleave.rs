//! Weight matrices stored eight rows at a time, block by block, for the formats that weigh
//! most in the models people run (`Q4_0`, `Q8_0`, and `Q4_K` and `Q6_K`, which make up
//! `Q4_K_M`).
//!
//! In GGUF's layout a kernel dots one weight row at a time and ends each block with a
//! horizontal sum. Here the same block of eight consecutive rows lies together, its values
//! arranged so that one 32-byte register holds four values of each of the eight rows: a
//! broadcast of four activation bytes against it gives the eight rows' partial dot products in
//! the eight 32-bit lanes. The block's integer sums then come out one row per lane, are scaled
//! by the eight rows' scales in one vector operation, and a tile of (8 weight rows) × (up to 8
//! activation rows) stays in registers while the weights are unpacked once.
//!
//! Each output is still one row dotted with one activation row, block after block, in a single
//! f32 accumulator per output (`acc = fma(d_w · d_x, integer_sum, acc)`), whatever the number of
//! activation rows in the tile; the portable kernels here do the same operations in the same
//! order, so every instruction set gives the same bits, alone or batched.
//!
//! The layout replaces GGUF's in memory: `Q4_0`, `Q8_0` and `Q6_K` take exactly the same bytes,
//! `Q4_K` 32 more per 8 rows of 256 values (its 6-bit scales and mins unpacked to bytes, 2.8%). The GGUF
//! blocks of any row can be rebuilt bit for bit ([`gguf_block`]), for the GPU upload and for
//! reading a row back.

use super::format::{f16_at, q4k_scales_mins, q6k_values, QuantFormat, QK, QK_K};
use super::quantize::{Q8Block, Q8KBlock};

/// Weight rows interleaved together.
pub(crate) const ROWS: usize = 8;

/// Bytes of one interleaved `Q4_0` block: eight f16 scales, then four 32-byte runs of nibbles.
pub(crate) const Q4_0_BYTES: usize = 2 * ROWS + ROWS * QK / 2;

/// Bytes of one interleaved `Q8_0` block: eight f16 scales, then eight 32-byte runs of
/// values, run `j` holding values `4 * j..4 * j + 4` of each row.
pub(crate) const Q8_0_BYTES: usize = 2 * ROWS + ROWS * QK;

/// Bytes of one interleaved `Q4_K` super-block: eight f16 scales, eight f16 mins, the eight
/// sub-block scales and mins of each row as bytes (`[sub-block][row]`), then 32 runs of 32
/// bytes of nibbles.
pub(crate) const Q4K_BYTES: usize = 4 * ROWS + 2 * 8 * ROWS + ROWS * QK_K / 2;

/// Bytes of one interleaved `Q6_K` super-block: eight f16 scales, the sixteen 16-value scales
/// of each row (`[group][row]`), 32 runs of 32 bytes of low nibbles (as `Q4_K`'s), then 16
/// runs of the top two bits: byte `4 * r + v` of run `8 * h + j` holds, at bits `2k..2k + 2`,
/// those of value `4 * j + v` of sub-block `4 * h + k` of row `r`.
pub(crate) const Q6K_BYTES: usize = 2 * ROWS + 16 * ROWS + ROWS * QK_K / 2 + ROWS * QK_K / 4;

/// Offsets inside an interleaved `Q6_K` super-block.
pub(crate) const Q6K_SCALES: usize = 2 * ROWS;
pub(crate) const Q6K_LOW: usize = Q6K_SCALES + 16 * ROWS;
pub(crate) const Q6K_HIGH: usize = Q6K_LOW + ROWS * QK_K / 2;

/// Offsets inside an interleaved `Q4_K` super-block.
const Q4K_DMIN: usize = 2 * ROWS;
const Q4K_SCALES: usize = 4 * ROWS;
const Q4K_MINS: usize = Q4K_SCALES + 8 * ROWS;
const Q4K_QS: usize = Q4K_MINS + 8 * ROWS;

/// Bytes of one interleaved block of [`ROWS`] rows, for the formats that have the layout.
pub(crate) fn group_block_bytes(format: QuantFormat) -> Option<usize> {
    match format {
        QuantFormat::Q4_0 => Some(Q4_0_BYTES),
        QuantFormat::Q8_0 => Some(Q8_0_BYTES),
        QuantFormat::Q4K => Some(Q4K_BYTES),
        QuantFormat::Q6K => Some(Q6K_BYTES),
        _ => None,
    }
}

/// `data` (`rows` rows of `cols` values in GGUF blocks) in the interleaved layout: for each run
/// of [`ROWS`] rows, its blocks in order. `None` when the format has no such layout or `rows`
/// is not a multiple of [`ROWS`].
pub(crate) fn interleave(
    format: QuantFormat,
    data: &[u8],
    rows: usize,
    cols: usize,
) -> Option<Vec<u8>> {
    let gb = group_block_bytes(format)?;
    if !rows.is_multiple_of(ROWS) {
        return None;
    }
    let (nb, bb) = (cols / format.block_values(), format.block_bytes());
    let rb = nb * bb;
    if data.len() != rows * rb {
        return None;
    }
    let mut out = vec![0u8; rows / ROWS * nb * gb];
    for (g, dst) in out.chunks_exact_mut(nb * gb).enumerate() {
        for (i, dst) in dst.chunks_exact_mut(gb).enumerate() {
            let src: [&[u8]; ROWS] =
                std::array::from_fn(|r| &data[(ROWS * g + r) * rb + i * bb..][..bb]);
            match format {
                QuantFormat::Q4_0 => pack_q4_0(src, dst),
                QuantFormat::Q8_0 => pack_q8_0(src, dst),
                QuantFormat::Q4K => pack_q4k(src, dst),
                _ => pack_q6k(src, dst),
            }
        }
    }
    Some(out)
}

/// Writes row `r`'s GGUF block (`out`, the format's block bytes) from interleaved block `src`.
pub(crate) fn gguf_block(format: QuantFormat, src: &[u8], r: usize, out: &mut [u8]) {
    match format {
        QuantFormat::Q4_0 => {
            out[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
            for j in 0..4 {
                for v in 0..4 {
                    out[2 + 4 * j + v] = src[2 * ROWS + 32 * j + 4 * r + v];
                }
            }
        }
        QuantFormat::Q8_0 => {
            out[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
            for j in 0..8 {
                out[2 + 4 * j..6 + 4 * j].copy_from_slice(&src[2 * ROWS + 32 * j + 4 * r..][..4]);
            }
        }
        QuantFormat::Q6K => {
            out[208..210].copy_from_slice(&src[2 * r..2 * r + 2]);
            for g in 0..16 {
                out[192 + g] = src[Q6K_SCALES + ROWS * g + r];
            }
            let q = q6k_row_values(src, r);
            // GGUF's bits, as `q6k_values` reads them.
            out[..192].fill(0);
            for half in 0..2 {
                for c in 0..4 {
                    for l in 0..32 {
                        let v = q[128 * half + 32 * c + l];
                        let low = 64 * half + l + 32 * (c % 2);
                        out[low] |= (v & 0x0F) << (4 * (c / 2));
                        out[128 + 32 * half + l] |= (v >> 4) << (2 * c);
                    }
                }
            }
        }
        _ => {
            out[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
            out[2..4].copy_from_slice(&src[Q4K_DMIN + 2 * r..Q4K_DMIN + 2 * r + 2]);
            let sc: [u8; 8] = std::array::from_fn(|s| src[Q4K_SCALES + ROWS * s + r]);
            let mn: [u8; 8] = std::array::from_fn(|s| src[Q4K_MINS + ROWS * s + r]);
            // GGUF's 12-byte packing of eight 6-bit scales and mins (the inverse of
            // `q4k_scales_mins`): all 96 bits are used, so the bytes come back exactly.
            for j in 0..4 {
                out[4 + j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                out[8 + j] = mn[j] | ((mn[j + 4] >> 4) << 6);
                out[12 + j] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
            }
            for c in 0..4 {
                for j in 0..8 {
                    for v in 0..4 {
                        out[16 + 32 * c + 4 * j + v] = src[Q4K_QS + 32 * (8 * c + j) + 4 * r + v];
                    }
                }
            }
        }
    }
}

/// Byte `4 * r + v` of nibble run `j` is byte `4 * j + v` of row `r`'s 16 nibble bytes: its
/// low nibble is value `4 * j + v`, its high nibble value `16 + 4 * j + v`.
fn pack_q4_0(src: [&[u8]; ROWS], dst: &mut [u8]) {
    for (r, b) in src.iter().enumerate() {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
        for j in 0..4 {
            for v in 0..4 {
                dst[2 * ROWS + 32 * j + 4 * r + v] = b[2 + 4 * j + v];
            }
        }
    }
}

/// Byte `4 * r + v` of run `j` is value `4 * j + v` of row `r`.
fn pack_q8_0(src: [&[u8]; ROWS], dst: &mut [u8]) {
    for (r, b) in src.iter().enumerate() {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
        for j in 0..8 {
            dst[2 * ROWS + 32 * j + 4 * r..][..4].copy_from_slice(&b[2 + 4 * j..6 + 4 * j]);
        }
    }
}

/// As [`pack_q4_0`] for each 64-value chunk `c` of GGUF's nibbles: byte `4 * r + v` of run
/// `8 * c + j` is byte `32 * c + 4 * j + v` of row `r`'s, whose low nibble is value
/// `64 * c + 4 * j + v` (sub-block `2 * c`) and high nibble value `64 * c + 32 + 4 * j + v`
/// (sub-block `2 * c + 1`).
fn pack_q4k(src: [&[u8]; ROWS], dst: &mut [u8]) {
    for (r, b) in src.iter().enumerate() {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
        dst[Q4K_DMIN + 2 * r..Q4K_DMIN + 2 * r + 2].copy_from_slice(&b[2..4]);
        let (sc, mn) = q4k_scales_mins(&b[4..16]);
        for s in 0..8 {
            dst[Q4K_SCALES + ROWS * s + r] = sc[s];
            dst[Q4K_MINS + ROWS * s + r] = mn[s];
        }
        for c in 0..4 {
            for j in 0..8 {
                for v in 0..4 {
                    dst[Q4K_QS + 32 * (8 * c + j) + 4 * r + v] = b[16 + 32 * c + 4 * j + v];
                }
            }
        }
    }
}

/// Writes the 256 values (0..64) `q` of row `r` into the runs of interleaved `Q6_K` block
/// `dst`.
fn q6k_pack_values(r: usize, q: &[u8; QK_K], dst: &mut [u8]) {
    for c in 0..4 {
        for j in 0..8 {
            for v in 0..4 {
                let lo = q[64 * c + 4 * j + v] & 0x0F;
                let hi = q[64 * c + 32 + 4 * j + v] & 0x0F;
                dst[Q6K_LOW + 32 * (8 * c + j) + 4 * r + v] = lo | (hi << 4);
            }
        }
    }
    for h in 0..2 {
        for j in 0..8 {
            for v in 0..4 {
                let mut byte = 0u8;
                for k in 0..4 {
                    byte |= (q[QK * (4 * h + k) + 4 * j + v] >> 4) << (2 * k);
                }
                dst[Q6K_HIGH + 32 * (8 * h + j) + 4 * r + v] = byte;
            }
        }
    }
}

/// The 256 values (0..64) of row `r` of an interleaved `Q6_K` super-block, in order.
fn q6k_row_values(src: &[u8], r: usize) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for j in 0..8 {
            for v in 0..4 {
                let byte = src[Q6K_LOW + 32 * (8 * c + j) + 4 * r + v];
                q[64 * c + 4 * j + v] = byte & 0x0F;
                q[64 * c + 32 + 4 * j + v] = byte >> 4;
            }
        }
    }
    for h in 0..2 {
        for j in 0..8 {
            for v in 0..4 {
                let byte = src[Q6K_HIGH + 32 * (8 * h + j) + 4 * r + v];
                for k in 0..4 {
                    q[QK * (4 * h + k) + 4 * j + v] |= ((byte >> (2 * k)) & 3) << 4;
                }
            }
        }
    }
    q
}

fn pack_q6k(src: [&[u8]; ROWS], dst: &mut [u8]) {
    for (r, b) in src.iter().enumerate() {
        dst[2 * r..2 * r + 2].copy_from_slice(&b[208..210]);
        for g in 0..16 {
            dst[Q6K_SCALES + ROWS * g + r] = b[192 + g];
        }
        let mut q = [0u8; QK_K];
        q6k_values(b, &mut q);
        q6k_pack_values(r, &q, dst);
    }
}

/// `Σ a_i b_i` over fixed-size runs: widening products the compiler turns into SIMD
/// multiply-adds (SSE2's `pmaddwd`, NEON's `smlal`) with no bounds checks.
#[inline(always)]
fn idot<const N: usize>(a: &[i8; N], b: &[i8; N]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// Row `r`'s 32 values from eight consecutive runs `first..first + 8` of a block, `words`
/// being the block's runs as 4-byte words (word `8 * k + r` is row `r`'s four bytes of run
/// `k`): each byte shifted right by `shift` and masked with `mask` (a byte repeated), four at a
/// time in a 32-bit word.
#[inline(always)]
fn gather(words: &[[u8; 4]], first: usize, r: usize, shift: u32, mask: u32) -> [i8; QK] {
    let mut q = [0i8; QK];
    for (j, out) in q.as_chunks_mut::<4>().0.iter_mut().enumerate() {
        let w = (u32::from_le_bytes(words[8 * (first + j) + r]) >> shift) & mask;
        *out = w.to_le_bytes().map(|b| b as i8);
    }
    q
}

/// Lanes of one 32-byte run: lane `4 * r + v` holds value `v` of a four-value step of row `r`.
const LANES: usize = 32;

/// Four activations spread over the eight rows' lanes of a run (lane `l` gets `y[l % 4]`), so
/// that a run multiplies its lanes with them elementwise.
#[inline(always)]
fn spread(y: &[i8; 4]) -> [i16; LANES] {
    std::array::from_fn(|l| i16::from(y[l % 4]))
}

/// Row `r`'s sum: lanes `4 * r..4 * r + 4`.
#[inline(always)]
fn row_sums(p: &[i16; LANES]) -> [i32; ROWS] {
    std::array::from_fn(|r| {
        i32::from(p[4 * r])
            + i32::from(p[4 * r + 1])
            + i32::from(p[4 * r + 2])
            + i32::from(p[4 * r + 3])
    })
}

/// `p[l] += q[l] * y[l]` over a run's lanes, in 16 bits: [`tile_q6k`] adds at most four runs
/// of 6-bit values into one `p` (|q·y| ≤ 63·128, four of them 32256 < 2^15).
#[inline(always)]
fn mul_acc(p: &mut [i16; LANES], q: &[i16; LANES], y: &[i16; LANES]) {
    for l in 0..LANES {
        p[l] += q[l] * y[l];
    }
}

/// Interleaved `Q4_0` groups (`nb` blocks each) against `T` activation rows: `outs[t][j]`
/// gets weight row `j` of the run dotted with activation row `t`.
pub(crate) fn tile_q4_0<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) {
    for (g, group) in w.chunks_exact(nb * Q4_0_BYTES).enumerate() {
        let mut acc = [[0.0f32; ROWS]; T];
        for (i, b) in group.as_chunks::<Q4_0_BYTES>().0.iter().enumerate() {
            let d: [f32; ROWS] = std::array::from_fn(|r| f16_at(b, 2 * r));
            // Row `r`'s 16 GGUF nibble bytes are its word in each of the four runs: low
            // nibbles values 0..16, high nibbles 16..32.
            let words = b[2 * ROWS..].as_chunks::<4>().0;
            let q: [[i8; QK]; ROWS] = std::array::from_fn(|r| {
                let mut q = [0i8; QK];
                let (lo, hi) = q.split_at_mut(16);
                for j in 0..4 {
                    let w = u32::from_le_bytes(words[8 * j + r]);
                    let (l, h) = (w & 0x0F0F_0F0F, (w >> 4) & 0x0F0F_0F0F);
                    lo[4 * j..4 * j + 4].copy_from_slice(&l.to_le_bytes().map(|b| b as i8));
                    hi[4 * j..4 * j + 4].copy_from_slice(&h.to_le_bytes().map(|b| b as i8));
                }
                q
            });
            for t in 0..T {
                let y = &xs[t][i];
                for r in 0..ROWS {
                    let isum = idot(&q[r], &y.qs) - 8 * y.sum;
                    acc[t][r] = (d[r] * y.d).mul_add(isum as f32, acc[t][r]);
                }
            }
        }
        for t in 0..T {
            outs[t][ROWS * g..ROWS * (g + 1)].copy_from_slice(&acc[t]);
        }
    }
}

/// Interleaved `Q8_0` groups (`nb` blocks each) against `T` activation rows, as [`tile_q4_0`].
pub(crate) fn tile_q8_0<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8Block]; T],
    outs: &mut [&mut [f32]],
) {
    for (g, group) in w.chunks_exact(nb * Q8_0_BYTES).enumerate() {
        let mut acc = [[0.0f32; ROWS]; T];
        for (i, b) in group.chunks_exact(Q8_0_BYTES).enumerate() {
            let d: [f32; ROWS] = std::array::from_fn(|r| f16_at(b, 2 * r));
            let mut q = [[0i8; QK]; ROWS];
            for j in 0..8 {
                for (r, row) in q.iter_mut().enumerate() {
                    for v in 0..4 {
                        row[4 * j + v] = b[2 * ROWS + 32 * j + 4 * r + v] as i8;
                    }
                }
            }
            for t in 0..T {
                let y = &xs[t][i];
                for r in 0..ROWS {
                    let isum: i32 = q[r]
                        .iter()
                        .zip(&y.qs)
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                    acc[t][r] = (d[r] * y.d).mul_add(isum as f32, acc[t][r]);
                }
            }
        }
        for t in 0..T {
            outs[t][ROWS * g..ROWS * (g + 1)].copy_from_slice(&acc[t]);
        }
    }
}

/// Interleaved `Q4_K` groups (`nb` super-blocks each) against `T` activation rows, as
/// [`tile_q4_0`].
pub(crate) fn tile_q4k<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    for (g, group) in w.chunks_exact(nb * Q4K_BYTES).enumerate() {
        let mut acc = [[0.0f32; ROWS]; T];
        let mut off = [[0.0f32; ROWS]; T];
        for (i, b) in group.as_chunks::<Q4K_BYTES>().0.iter().enumerate() {
            let d: [f32; ROWS] = std::array::from_fn(|r| f16_at(b, 2 * r));
            let dmin: [f32; ROWS] = std::array::from_fn(|r| f16_at(b, Q4K_DMIN + 2 * r));
            // Sub-block `s` of row `r`: the low (even `s`) or high nibbles of its words in
            // runs `8 * (s / 2)..8 * (s / 2) + 8`.
            let words = b[Q4K_QS..].as_chunks::<4>().0;
            let q: [[[i8; QK]; 8]; ROWS] = std::array::from_fn(|r| {
                std::array::from_fn(|s| {
                    gather(words, 8 * (s / 2), r, 4 * (s as u32 % 2), 0x0F0F_0F0F)
                })
            });
            for t in 0..T {
                let y = &xs[t][i];
                let ys = y.qs.as_chunks::<QK>().0;
                for r in 0..ROWS {
                    let mut sumi = 0i32;
                    let mut summ = 0i32;
                    for s in 0..8 {
                        let isum = idot(&q[r][s], &ys[s]);
                        sumi += i32::from(b[Q4K_SCALES + ROWS * s + r]) * isum;
                        let ysum = i32::from(y.bsums[2 * s]) + i32::from(y.bsums[2 * s + 1]);
                        summ += i32::from(b[Q4K_MINS + ROWS * s + r]) * ysum;
                    }
                    acc[t][r] = (d[r] * y.d).mul_add(sumi as f32, acc[t][r]);
                    off[t][r] = (dmin[r] * y.d).mul_add(summ as f32, off[t][r]);
                }
            }
        }
        for t in 0..T {
            for r in 0..ROWS {
                outs[t][ROWS * g + r] = acc[t][r] - off[t][r];
            }
        }
    }
}

/// Interleaved `Q6_K` groups (`nb` super-blocks each) against `T` activation rows, as
/// [`tile_q4_0`]: each row's 16-value sums scaled by their scales, less 32 times the scaled
/// activation sums, in integers, then one multiply-add per super-block.
pub(crate) fn tile_q6k<const T: usize>(
    w: &[u8],
    nb: usize,
    xs: [&[Q8KBlock]; T],
    outs: &mut [&mut [f32]],
) {
    for (g, group) in w.chunks_exact(nb * Q6K_BYTES).enumerate() {
        let mut acc = [[0.0f32; ROWS]; T];
        for (i, b) in group.as_chunks::<Q6K_BYTES>().0.iter().enumerate() {
            let d: [f32; ROWS] = std::array::from_fn(|r| f16_at(b, 2 * r));
            // Values `4 * j + v` of sub-block `s` of the eight rows, lane `4 * r + v` of
            // `q[s][j]`: the low nibble from run `8 * (s / 2) + j` (high nibble for odd `s`),
            // the top two bits from bits `2 * (s % 4)` of high run `8 * (s / 4) + j`.
            let low = b[Q6K_LOW..Q6K_HIGH].as_chunks::<LANES>().0;
            let high = b[Q6K_HIGH..].as_chunks::<LANES>().0;
            let q: [[[i16; LANES]; 8]; 8] = std::array::from_fn(|s| {
                std::array::from_fn(|j| {
                    let (l, h) = (&low[8 * (s / 2) + j], &high[8 * (s / 4) + j]);
                    let (ls, hs) = (4 * (s % 2), 2 * (s % 4));
                    std::array::from_fn(|k| {
                        i16::from(((l[k] >> ls) & 0x0F) | (((h[k] >> hs) & 3) << 4))
                    })
                })
            });
            for t in 0..T {
                let y = &xs[t][i];
                let ys = y.qs.as_chunks::<4>().0;
                let mut total = [0i32; ROWS];
                for (s, qs) in q.iter().enumerate() {
                    for half in 0..2 {
                        let mut p = [0i16; LANES];
                        for j in 4 * half..4 * half + 4 {
                            mul_acc(&mut p, &qs[j], &spread(&ys[8 * s + j]));
                        }
                        let k = 2 * s + half;
                        let isums = row_sums(&p);
                        for r in 0..ROWS {
                            let sc = i32::from(b[Q6K_SCALES + ROWS * k + r] as i8);
                            total[r] += sc * isums[r] - 32 * sc * i32::from(y.bsums[k]);
                        }
                    }
                }
                for r in 0..ROWS {
                    acc[t][r] = (d[r] * y.d).mul_add(total[r] as f32, acc[t][r]);
                }
            }
        }
        for t in 0..T {
            outs[t][ROWS * g..ROWS * (g + 1)].copy_from_slice(&acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::random_matrix;
    use super::*;

    #[test]
    fn gguf_blocks_come_back_bit_for_bit() {
        for format in [
            QuantFormat::Q4_0,
            QuantFormat::Q8_0,
            QuantFormat::Q4K,
            QuantFormat::Q6K,
        ] {
            let (rows, cols) = (16, 512);
            let data = random_matrix(format, rows, cols, 7);
            let packed = interleave(format, &data, rows, cols).unwrap();
            let gb = group_block_bytes(format).unwrap();
            let (nb, bb) = (cols / format.block_values(), format.block_bytes());
            let mut back = vec![0u8; data.len()];
            for row in 0..rows {
                for i in 0..nb {
                    let src = &packed[((row / ROWS) * nb + i) * gb..][..gb];
                    let out = &mut back[row * nb * bb + i * bb..][..bb];
                    gguf_block(format, src, row % ROWS, out);
                }
            }
            assert_eq!(back, data, "{format:?}");
        }
    }

    #[test]
    fn only_whole_groups_of_the_formats_with_the_layout_interleave() {
        let data = random_matrix(QuantFormat::Q4_0, 12, 64, 1);
        assert!(interleave(QuantFormat::Q4_0, &data, 12, 64).is_none());
        let data = random_matrix(QuantFormat::Q4_1, 8, 64, 1);
        assert!(interleave(QuantFormat::Q4_1, &data, 8, 64).is_none());
    }
}
