//! A quantised weight matrix in its GGUF blocks, and the parallel driver that multiplies
//! quantised activation rows by one or several such matrices.
//!
//! Work is cut into items of (a run of weight rows) × (up to [`tile_rows`] activation rows), and
//! runs of items are shared out over candle's CPU worker pool (one thread per physical core,
//! the calling thread included; `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` override), whose
//! workers spin briefly between calls, which matters at a hundred calls per decoded token.
//! Every output element comes from the same per-row kernel whatever the item shape, so results
//! do not depend on the batch size or the thread count.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use super::dot::{self, fmt as f};
use super::format::{ActivationForm, QuantFormat};
use super::interleave::{self, ROWS};
use super::quantize::QuantizedRows;
use super::KernelError;

/// Most activation rows dotted with each weight block while it is unpacked.
const MAX_TILE: usize = 8;

/// Activation rows dotted with each weight block while it is unpacked: 8 where the CPU has 32
/// vector registers to hold their sums (AVX-512), else 4.
fn tile_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::x86::level() >= super::x86::Level::Avx512Vnni {
        return MAX_TILE;
    }
    4
}
/// Fewest weight rows per work item: enough to amortise taking an item. Items hold whole
/// groups of interleaved rows.
const MIN_CHUNK: usize = 2 * ROWS;
/// Work items per matrix to aim for.
const ITEMS_PER_MATRIX: usize = 64;
/// Runs of consecutive items per thread, taken one at a time.
const RUNS_PER_THREAD: usize = 4;

/// A `[rows, cols]` weight matrix stored as GGUF blocks, row after row, or with runs of eight
/// rows interleaved block by block ([`QMatrix::interleaved`]); cheap to clone (the bytes are
/// shared). It may be a run of rows of a larger buffer (one expert's slice of a
/// mixture-of-experts tensor), read in place.
#[derive(Clone)]
pub struct QMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    /// Bytes of one row in GGUF's layout.
    row_bytes: usize,
    /// Where this matrix's first row starts in `data`.
    offset: usize,
    /// Bytes of one interleaved group of eight rows; `None` in GGUF's layout.
    group_bytes: Option<usize>,
    data: Arc<Vec<u8>>,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("interleaved", &self.group_bytes.is_some())
            .finish_non_exhaustive()
    }
}

impl QMatrix {
    /// Wraps `data`, `rows` rows of `cols` values in `format`'s blocks (GGUF's layout).
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: Arc<Vec<u8>>,
    ) -> Result<Self, KernelError> {
        if cols == 0 || !cols.is_multiple_of(format.block_values()) {
            return Err(KernelError::PartialBlock { format, cols });
        }
        let row_bytes = cols / format.block_values() * format.block_bytes();
        if data.len() != rows * row_bytes {
            return Err(KernelError::DataSize {
                format,
                rows,
                cols,
                len: data.len(),
            });
        }
        Ok(Self {
            format,
            rows,
            cols,
            row_bytes,
            offset: 0,
            group_bytes: None,
            data,
        })
    }

    /// Rows in one interleaved group ([`QMatrix::interleaved`]): views of an interleaved
    /// matrix start and end on multiples of it.
    pub const GROUP_ROWS: usize = ROWS;

    /// Rows `start..start + rows` of this matrix as a matrix of their own, sharing its bytes
    /// (no copy).
    pub fn rows_view(&self, start: usize, rows: usize) -> Result<Self, KernelError> {
        if start.checked_add(rows).is_none_or(|end| end > self.rows) {
            return Err(KernelError::RowRange {
                start,
                rows,
                available: self.rows,
            });
        }
        let offset = match self.group_bytes {
            // Interleaved groups of eight rows are cut only whole.
            Some(gb) if start.is_multiple_of(ROWS) && rows.is_multiple_of(ROWS) => {
                self.offset + start / ROWS * gb
            }
            Some(_) => {
                return Err(KernelError::RowRange {
                    start,
                    rows,
                    available: self.rows,
                })
            }
            None => self.offset + start * self.row_bytes,
        };
        Ok(Self {
            rows,
            offset,
            ..self.clone()
        })
    }

    /// The same matrix with runs of eight rows interleaved block by block, the layout the
    /// `Q4_0`, `Q8_0`, `Q4_K` and `Q6_K` kernels multiply fastest (one copy of the weights,
    /// made once at load; `Q4_0`, `Q8_0` and `Q6_K` keep their size, `Q4_K` grows by 2.8%).
    /// Other formats, matrices whose rows are not a multiple of eight, and matrices already
    /// interleaved come back as they are.
    /// Results are the same bits whatever the instruction set, but not the same bits as in
    /// GGUF's layout: all the matrices a decoder runs should be in one layout or the other for
    /// its whole life.
    pub fn interleaved(&self) -> Self {
        if self.group_bytes.is_some() {
            return self.clone();
        }
        let Some(data) = interleave::interleave(self.format, self.bytes(), self.rows, self.cols)
        else {
            return self.clone();
        };
        let group_bytes = interleave::group_block_bytes(self.format)
            .map(|gb| gb * self.cols / self.format.block_values());
        Self {
            group_bytes,
            offset: 0,
            data: Arc::new(data),
            ..self.clone()
        }
    }

    /// Whether runs of eight rows are interleaved ([`QMatrix::interleaved`]).
    pub fn is_interleaved(&self) -> bool {
        self.group_bytes.is_some()
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output features (rows of the matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (values per row).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The buffer holding the stored bytes (of this matrix alone, or of the larger tensor a
    /// [`rows_view`](Self::rows_view) was cut from): GGUF's blocks row after row, unless
    /// [interleaved](Self::interleaved). Two matrices share weights when they share it.
    pub fn data(&self) -> &Arc<Vec<u8>> {
        &self.data
    }

    /// This matrix's stored bytes: its GGUF blocks row after row, or its interleaved groups.
    pub fn bytes(&self) -> &[u8] {
        let len = match self.group_bytes {
            Some(gb) => self.rows / ROWS * gb,
            None => self.rows * self.row_bytes,
        };
        &self.data[self.offset..self.offset + len]
    }

    /// The blocks in GGUF's layout, row after row: the stored bytes, or a copy rebuilt from
    /// the interleaved layout.
    pub fn gguf_blocks(&self) -> Cow<'_, [u8]> {
        if self.group_bytes.is_none() {
            return Cow::Borrowed(self.bytes());
        }
        let mut out = vec![0u8; self.rows * self.row_bytes];
        for (i, row) in out.chunks_exact_mut(self.row_bytes).enumerate() {
            self.gguf_row(i, row);
        }
        Cow::Owned(out)
    }

    /// Writes row `i`'s GGUF blocks into `out` (`row_bytes` long).
    fn gguf_row(&self, i: usize, out: &mut [u8]) {
        let Some(gbytes) = self.group_bytes else {
            out.copy_from_slice(&self.bytes()[i * self.row_bytes..(i + 1) * self.row_bytes]);
            return;
        };
        let nb = self.cols / self.format.block_values();
        let gb = gbytes / nb;
        let group = &self.bytes()[i / ROWS * gbytes..(i / ROWS + 1) * gbytes];
        for (src, dst) in group
            .chunks_exact(gb)
            .zip(out.chunks_exact_mut(self.format.block_bytes()))
        {
            interleave::gguf_block(self.format, src, i % ROWS, dst);
        }
    }

    /// Row `i` expanded to f32 (`out` holds `cols` values).
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        if self.group_bytes.is_none() {
            let bytes = &self.bytes()[i * self.row_bytes..(i + 1) * self.row_bytes];
            self.format.dequantize_row(bytes, out);
        } else {
            let mut bytes = vec![0u8; self.row_bytes];
            self.gguf_row(i, &mut bytes);
            self.format.dequantize_row(&bytes, out);
        }
    }

    /// `out[r * rows + j] = x_r · row_j` for every quantised activation row `r` of `x`.
    pub fn matmul(&self, x: &QuantizedRows, out: &mut [f32]) -> Result<(), KernelError> {
        matmul_many(&[self], x, &mut [out])
    }
}

/// [`QMatrix::matmul`] of the same activations by several matrices in one pass over the
/// thread pool (the q/k/v or gate/up projections of a layer): `outs[g]` receives `x · ws[g]ᵀ`.
pub fn matmul_many(
    ws: &[&QMatrix],
    x: &QuantizedRows,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    let all = vec![0..x.rows(); ws.len()];
    matmul_ranges(ws, x, &all, outs)
}

/// Several matrices, each against its own run of activation rows, in one pass over the
/// thread pool (the experts of a mixture, each against the rows routed to it): `outs[g]`
/// receives rows `ranges[g]` of `x` times `ws[g]ᵀ`, one output row per activation row. Each
/// output value is what [`QMatrix::matmul`] gives for that row alone.
pub fn matmul_ranges(
    ws: &[&QMatrix],
    x: &QuantizedRows,
    ranges: &[std::ops::Range<usize>],
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    if ws.len() != outs.len() || ws.len() != ranges.len() {
        return Err(KernelError::OutputCount {
            matrices: ws.len(),
            outputs: outs.len().min(ranges.len()),
        });
    }
    for range in ranges {
        if range.start > range.end || range.end > x.rows() {
            return Err(KernelError::RowRange {
                start: range.start,
                rows: range.len(),
                available: x.rows(),
            });
        }
    }
    for ((w, out), range) in ws.iter().zip(outs.iter()).zip(ranges) {
        let m = range.len();
        if w.cols != x.cols() {
            return Err(KernelError::InputWidth {
                expected: w.cols,
                got: x.cols(),
            });
        }
        if !x.has(w.format.activation()) {
            return Err(KernelError::NotQuantizedFor(w.format));
        }
        if out.len() != m * w.rows {
            return Err(KernelError::OutputSize {
                expected: m * w.rows,
                got: out.len(),
            });
        }
    }
    if ranges.iter().all(|r| r.is_empty()) {
        return Ok(());
    }
    let mut items = work_items(ws, ranges, outs);
    let pool = candle_core::utils::barrier_pool();
    // A few runs of items per thread: a thread slowed down by other processes hands the rest
    // of its share to the others.
    let per_run = items
        .len()
        .div_ceil((pool.n_workers() + 1) * RUNS_PER_THREAD);
    let runs: Vec<Mutex<&mut [Item<'_>]>> = items.chunks_mut(per_run).map(Mutex::new).collect();
    pool.execute_chunked(runs.len(), |range| {
        for r in range {
            let mut run = runs[r].lock().unwrap_or_else(PoisonError::into_inner);
            for item in run.iter_mut() {
                run_item(ws[item.matrix], x, item);
            }
        }
    });
    Ok(())
}

/// Weight rows `c0..c1` of matrix `matrix` against activation rows `i0..i0 + n`; `segs[t]`
/// is output row `i0 + t`, columns `c0..c1`.
#[derive(Debug)]
struct Item<'a> {
    matrix: usize,
    c0: usize,
    c1: usize,
    i0: usize,
    n: usize,
    segs: [&'a mut [f32]; MAX_TILE],
}

/// Cuts the outputs into items, weight-row run major, so that consecutive items (taken by the
/// same thread) reuse the weight rows from cache across activation tiles.
fn work_items<'a>(
    ws: &[&QMatrix],
    ranges: &[std::ops::Range<usize>],
    outs: &'a mut [&mut [f32]],
) -> Vec<Item<'a>> {
    let tile = tile_rows();
    let chunk_of = |w: &QMatrix, tiles: usize| {
        let per_tile = ITEMS_PER_MATRIX.div_ceil(tiles.max(1));
        w.rows
            .div_ceil(per_tile)
            .max(MIN_CHUNK)
            .next_multiple_of(ROWS)
    };
    let total: usize = ws
        .iter()
        .zip(ranges)
        .map(|(w, r)| {
            let tiles = r.len().div_ceil(tile);
            w.rows.div_ceil(chunk_of(w, tiles)) * tiles
        })
        .sum();
    let mut items = Vec::with_capacity(total);
    for (g, ((w, out), range)) in ws.iter().zip(outs.iter_mut()).zip(ranges).enumerate() {
        let (m, first) = (range.len(), range.start);
        if m == 0 {
            continue;
        }
        let tiles = m.div_ceil(tile);
        let chunk = chunk_of(w, tiles);
        let base = items.len();
        for c0 in (0..w.rows).step_by(chunk) {
            for i0 in (first..range.end).step_by(tile) {
                items.push(Item {
                    matrix: g,
                    c0,
                    c1: w.rows.min(c0 + chunk),
                    i0,
                    n: tile.min(range.end - i0),
                    segs: Default::default(),
                });
            }
        }
        for (i, row) in out.chunks_mut(w.rows).enumerate() {
            for (c, seg) in row.chunks_mut(chunk).enumerate() {
                items[base + c * tiles + i / tile].segs[i % tile] = seg;
            }
        }
    }
    items
}

/// Calls `f::<T>(args)` with the tile width `T` that `n` names (1 to 7, else [`MAX_TILE`]).
macro_rules! at_tile_width {
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<MAX_TILE>($($arg),*),
        }
    };
}

fn run_item(w: &QMatrix, x: &QuantizedRows, item: &mut Item<'_>) {
    let (i0, segs) = (item.i0, &mut item.segs[..]);
    if let Some(gb) = w.group_bytes {
        // Items start and end on whole groups (chunks are multiples of `ROWS`, and so are
        // the rows of an interleaved matrix).
        let groups = &w.bytes()[item.c0 / ROWS * gb..item.c1 / ROWS * gb];
        at_tile_width!(item.n, tile_interleaved(w, groups, x, i0, segs));
        return;
    }
    let rows = &w.bytes()[item.c0 * w.row_bytes..item.c1 * w.row_bytes];
    at_tile_width!(item.n, tile(w, rows, x, i0, segs));
}

/// Dots each row of `groups` (whole interleaved groups of `w`) with activation rows
/// `i0..i0 + T`.
fn tile_interleaved<const T: usize>(
    w: &QMatrix,
    groups: &[u8],
    x: &QuantizedRows,
    i0: usize,
    outs: &mut [&mut [f32]],
) {
    let nb = w.cols / w.format.block_values();
    if w.format == QuantFormat::Q4_0 {
        let xs = std::array::from_fn(|t| x.q8_row(i0 + t).unwrap_or_default());
        #[cfg(target_arch = "x86_64")]
        if super::x86::tile_x8_q4_0::<T>(super::x86::level(), groups, nb, xs, outs) {
            return;
        }
        interleave::tile_q4_0::<T>(groups, nb, xs, outs);
    } else if w.format == QuantFormat::Q8_0 {
        let xs = std::array::from_fn(|t| x.q8_row(i0 + t).unwrap_or_default());
        #[cfg(target_arch = "x86_64")]
        if super::x86::tile_x8_q8_0::<T>(super::x86::level(), groups, nb, xs, outs) {
            return;
        }
        interleave::tile_q8_0::<T>(groups, nb, xs, outs);
    } else if w.format == QuantFormat::Q4K {
        let xs = std::array::from_fn(|t| x.q8k_row(i0 + t).unwrap_or_default());
        #[cfg(target_arch = "x86_64")]
        if super::x86::tile_x8_q4k::<T>(super::x86::level(), groups, nb, xs, outs) {
            return;
        }
        interleave::tile_q4k::<T>(groups, nb, xs, outs);
    } else {
        let xs = std::array::from_fn(|t| x.q8k_row(i0 + t).unwrap_or_default());
        #[cfg(target_arch = "x86_64")]
        if super::x86::tile_x8_q6k::<T>(super::x86::level(), groups, nb, xs, outs) {
            return;
        }
        interleave::tile_q6k::<T>(groups, nb, xs, outs);
    }
}

/// Dots each of `rows` (whole weight rows of `w`) with activation rows `i0..i0 + T`.
fn tile<const T: usize>(
    w: &QMatrix,
    rows: &[u8],
    x: &QuantizedRows,
    i0: usize,
    outs: &mut [&mut [f32]],
) {
    let rb = w.row_bytes;
    match w.format.activation() {
        ActivationForm::Q8 => {
            let xs = std::array::from_fn(|t| x.q8_row(i0 + t).unwrap_or_default());
            #[cfg(target_arch = "x86_64")]
            if super::x86::tile_q8::<T>(w.format, rows, rb, xs, outs) {
                return;
            }
            match w.format {
                QuantFormat::Q4_0 => dot::tile_q8::<f::Q4_0, T>(rows, rb, xs, outs),
                QuantFormat::Q4_1 => dot::tile_q8::<f::Q4_1, T>(rows, rb, xs, outs),
                QuantFormat::Q5_0 => dot::tile_q8::<f::Q5_0, T>(rows, rb, xs, outs),
                QuantFormat::Q5_1 => dot::tile_q8::<f::Q5_1, T>(rows, rb, xs, outs),
                _ => dot::tile_q8::<f::Q8_0, T>(rows, rb, xs, outs),
            }
        }
        ActivationForm::Q8K => {
            let xs = std::array::from_fn(|t| x.q8k_row(i0 + t).unwrap_or_default());
            #[cfg(target_arch = "x86_64")]
            if super::x86::tile_q8k::<T>(w.format, rows, rb, xs, outs) {
                return;
            }
            dot::tile_q8k::<T>(w.format, rows, rb, xs, outs);
        }
        ActivationForm::F32 => {
            let xs = std::array::from_fn(|t| x.f32_row(i0 + t).unwrap_or_default());
            #[cfg(target_arch = "x86_64")]
            if super::x86::tile_float::<T>(w.format, rows, rb, xs, outs) {
                return;
            }
            dot::tile_float::<T>(w.format, rows, rb, xs, outs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{random_input, random_matrix};
    use super::*;

    fn matrix(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let data = random_matrix(format, rows, cols, seed);
        QMatrix::new(format, rows, cols, data.into()).unwrap()
    }

    /// Σ |w_ij x_j| for each output, the scale of its rounding error.
    fn magnitudes(w: &QMatrix, x: &[f32]) -> Vec<f32> {
        let mut row = vec![0.0; w.cols];
        let mut out = Vec::new();
        for xs in x.chunks_exact(w.cols) {
            for j in 0..w.rows {
                w.dequantize_row(j, &mut row);
                out.push(row.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum());
            }
        }
        out
    }

    #[test]
    fn rows_do_not_depend_on_batch_or_grouping() {
        for format in QuantFormat::ALL {
            let k = 512;
            let a = matrix(format, 40, k, 1);
            let b = matrix(format, 24, k, 2);
            let m = 7;
            let x = random_input(m * k, 3);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let mut ya = vec![0.0; m * 40];
            let mut yb = vec![0.0; m * 24];
            matmul_many(&[&a, &b], &q, &mut [&mut ya, &mut yb]).unwrap();
            for r in 0..m {
                let mut q1 = QuantizedRows::new();
                q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
                let mut y1 = vec![0.0; 40];
                a.matmul(&q1, &mut y1).unwrap();
                assert_eq!(&ya[r * 40..(r + 1) * 40], &y1[..], "{format:?} row {r}");
                let mut y1 = vec![0.0; 24];
                b.matmul(&q1, &mut y1).unwrap();
                assert_eq!(&yb[r * 24..(r + 1) * 24], &y1[..], "{format:?} row {r}");
            }
        }
    }

    /// A run of rows of a matrix, read in place, against runs of activation rows in one
    /// pass: the same bits as a copy of those rows against each activation row alone.
    #[test]
    fn row_views_against_row_ranges_match_each_row_alone() {
        for format in QuantFormat::ALL {
            let k = 256;
            let whole = matrix(format, 48, k, 7);
            let views = [
                whole.rows_view(0, 16).unwrap(),
                whole.rows_view(32, 16).unwrap(),
            ];
            let bytes = views[1].bytes().to_vec();
            let copy = QMatrix::new(format, 16, k, bytes.into()).unwrap();
            let m = 9;
            let x = random_input(m * k, 8);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let ranges = [0..5, 3..9];
            let mut y0 = vec![0.0; 5 * 16];
            let mut y1 = vec![0.0; 6 * 16];
            let ws = [&views[0], &views[1]];
            matmul_ranges(&ws, &q, &ranges, &mut [&mut y0, &mut y1]).unwrap();
            for (g, (range, y)) in ranges.iter().zip([&y0, &y1]).enumerate() {
                for (i, r) in range.clone().enumerate() {
                    let mut q1 = QuantizedRows::new();
                    q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
                    let mut alone = vec![0.0; 16];
                    let w = if g == 0 { &views[0] } else { &copy };
                    w.matmul(&q1, &mut alone).unwrap();
                    assert_eq!(&y[i * 16..(i + 1) * 16], &alone[..], "{format:?} {g} {r}");
                }
            }
            assert!(whole.rows_view(40, 16).is_err());
            assert!(matmul_ranges(&ws, &q, &[0..5, 3..10], &mut [&mut y0, &mut y1]).is_err());
        }
    }

    /// A view of whole groups of an interleaved matrix multiplies as those rows of the whole
    /// matrix do; a view that would cut a group is refused.
    #[test]
    fn views_of_interleaved_matrices_cut_whole_groups_only() {
        for format in [QuantFormat::Q4_0, QuantFormat::Q4K] {
            let k = 256;
            let whole = matrix(format, 32, k, 5).interleaved();
            assert!(whole.is_interleaved());
            let view = whole.rows_view(8, 16).unwrap();
            assert!(view.is_interleaved());
            assert_eq!(view.bytes().len() * 2, whole.bytes().len());
            let x = random_input(3 * k, 6);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let (mut all, mut part) = (vec![0.0; 3 * 32], vec![0.0; 3 * 16]);
            whole.matmul(&q, &mut all).unwrap();
            view.matmul(&q, &mut part).unwrap();
            for t in 0..3 {
                assert_eq!(&part[t * 16..(t + 1) * 16], &all[t * 32 + 8..t * 32 + 24]);
            }
            let mut a = vec![0.0; k];
            let mut b = vec![0.0; k];
            view.dequantize_row(3, &mut a);
            whole.dequantize_row(11, &mut b);
            assert_eq!(a, b, "{format:?}");
            assert!(whole.rows_view(4, 8).is_err());
            assert!(whole.rows_view(8, 12).is_err());
        }
    }

    /// Each instruction set the CPU has against the portable kernels, over 1 to 4 rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_agree_with_portable() {
        use super::super::x86::{self, Level};
        for level in [Level::Avx2, Level::Avx512Vnni] {
            if level > x86::level() {
                continue;
            }
            for format in QuantFormat::ALL {
                let (n, k) = (9, 768);
                let w = matrix(format, n, k, 11);
                let x = random_input(4 * k, 12);
                let mag = magnitudes(&w, &x);
                let mut q = QuantizedRows::new();
                q.quantize(&x, k, [format]).unwrap();
                let (data, rb) = (&w.data[..], w.row_bytes);
                let mut fast = vec![vec![0.0f32; n]; 4];
                let mut slow = vec![vec![0.0f32; n]; 4];
                let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
                let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
                if format.activation() == ActivationForm::Q8 {
                    let xs: [_; 4] = std::array::from_fn(|t| q.q8_row(t).unwrap());
                    assert!(x86::tile_q8_at::<4>(level, format, data, rb, xs, &mut fo));
                    match format {
                        QuantFormat::Q4_0 => dot::tile_q8::<f::Q4_0, 4>(data, rb, xs, &mut so),
                        QuantFormat::Q4_1 => dot::tile_q8::<f::Q4_1, 4>(data, rb, xs, &mut so),
                        QuantFormat::Q5_0 => dot::tile_q8::<f::Q5_0, 4>(data, rb, xs, &mut so),
                        QuantFormat::Q5_1 => dot::tile_q8::<f::Q5_1, 4>(data, rb, xs, &mut so),
                        _ => dot::tile_q8::<f::Q8_0, 4>(data, rb, xs, &mut so),
                    }
                } else if format.activation() == ActivationForm::Q8K {
                    let xs: [_; 4] = std::array::from_fn(|t| q.q8k_row(t).unwrap());
                    assert!(x86::tile_q8k::<4>(format, data, rb, xs, &mut fo));
                    dot::tile_q8k::<4>(format, data, rb, xs, &mut so);
                } else {
                    let xs: [_; 4] = std::array::from_fn(|t| q.f32_row(t).unwrap());
                    assert!(x86::tile_float::<4>(format, data, rb, xs, &mut fo));
                    dot::tile_float::<4>(format, data, rb, xs, &mut so);
                }
                for t in 0..4 {
                    for j in 0..n {
                        let (a, b) = (fo[t][j], so[t][j]);
                        let tol = 1e-6 * mag[t * n + j];
                        assert!(
                            (a - b).abs() <= tol,
                            "{level:?} {format:?} [{t},{j}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The float kernels keep the portable kernels' order of operations, so they agree to the
    /// bit, at widths with and without an odd run of 8 and a tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn float_kernels_agree_with_portable_to_the_bit() {
        use super::super::x86::{self, Level};
        if x86::level() < Level::Avx2 {
            return;
        }
        for format in [QuantFormat::F16, QuantFormat::BF16, QuantFormat::F32] {
            for k in [8, 20, 100, 256, 588] {
                let n = 5;
                let w = matrix(format, n, k, 21);
                let x = random_input(3 * k, 22);
                let mut q = QuantizedRows::new();
                q.quantize(&x, k, [format]).unwrap();
                let mut fast = vec![vec![0.0f32; n]; 3];
                let mut slow = vec![vec![0.0f32; n]; 3];
                let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
                let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
                let xs: [_; 3] = std::array::from_fn(|t| q.f32_row(t).unwrap());
                assert!(x86::tile_float::<3>(
                    format,
                    &w.data,
                    w.row_bytes,
                    xs,
                    &mut fo
                ));
                dot::tile_float::<3>(format, &w.data, w.row_bytes, xs, &mut so);
                assert_eq!(fast, slow, "{format:?} k={k}");
                assert!(fast.iter().flatten().any(|v| *v != 0.0), "{format:?} k={k}");
            }
        }
    }

    /// The interleaved layout keeps every row's result independent of its batch and grouping,
    /// and within rounding of the GGUF layout's (the sums are the same, added in another order).
    #[test]
    fn interleaved_rows_do_not_depend_on_batch_and_match_gguf_layout() {
        for format in [
            QuantFormat::Q4_0,
            QuantFormat::Q8_0,
            QuantFormat::Q4K,
            QuantFormat::Q6K,
        ] {
            let (k, m) = (512, 11);
            let plain = [matrix(format, 40, k, 1), matrix(format, 24, k, 2)];
            let [a, b] = plain.clone().map(|w| w.interleaved());
            assert!(a.is_interleaved() && b.is_interleaved());
            let x = random_input(m * k, 3);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let mut ya = vec![0.0; m * 40];
            let mut yb = vec![0.0; m * 24];
            matmul_many(&[&a, &b], &q, &mut [&mut ya, &mut yb]).unwrap();
            for (w, y) in [(&a, &ya), (&b, &yb)] {
                let n = w.rows();
                for r in 0..m {
                    let mut q1 = QuantizedRows::new();
                    q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
                    let mut y1 = vec![0.0; n];
                    w.matmul(&q1, &mut y1).unwrap();
                    assert_eq!(&y[r * n..(r + 1) * n], &y1[..], "{format:?} row {r}");
                }
            }
            let mut yp = vec![0.0; m * 40];
            plain[0].matmul(&q, &mut yp).unwrap();
            let mag = magnitudes(&plain[0], &x);
            for (i, (&u, &v)) in ya.iter().zip(&yp).enumerate() {
                assert!(
                    (u - v).abs() <= 1e-5 * mag[i],
                    "{format:?} [{i}]: {u} vs {v}"
                );
            }
        }
    }

    #[test]
    fn interleaving_keeps_the_gguf_blocks_and_rows() {
        for format in QuantFormat::ALL {
            let w = matrix(format, 16, 512, 9);
            let v = w.interleaved();
            let expect = matches!(
                format,
                QuantFormat::Q4_0 | QuantFormat::Q8_0 | QuantFormat::Q4K | QuantFormat::Q6K
            );
            assert_eq!(v.is_interleaved(), expect, "{format:?}");
            assert_eq!(&v.gguf_blocks()[..], &w.data()[..], "{format:?}");
            let (mut a, mut b) = (vec![0.0; 512], vec![0.0; 512]);
            for i in 0..16 {
                w.dequantize_row(i, &mut a);
                v.dequantize_row(i, &mut b);
                assert_eq!(a, b, "{format:?} row {i}");
            }
        }
        assert!(!matrix(QuantFormat::Q4K, 12, 256, 1)
            .interleaved()
            .is_interleaved());
    }

    /// The interleaved kernels of each instruction set give the portable ones' bits, at a tile
    /// width of 3 and of 8, where AVX-512 takes two groups at once and leaves the odd one to
    /// the 256-bit kernel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleaved_simd_kernels_agree_with_portable_to_the_bit() {
        use super::super::x86::{self, Level};
        fn check<const T: usize>(level: Level, format: QuantFormat) {
            let (n, k) = (40, 768);
            let w = matrix(format, n, k, 13).interleaved();
            let nb = k / format.block_values();
            let x = random_input(T * k, 14);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let mut fast = vec![vec![0.0f32; n]; T];
            let mut slow = vec![vec![0.0f32; n]; T];
            let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
            let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
            let q8: [_; T] = std::array::from_fn(|t| q.q8_row(t).unwrap_or_default());
            let q8k: [_; T] = std::array::from_fn(|t| q.q8k_row(t).unwrap_or_default());
            let (data, out) = (w.data(), &mut fo);
            let ran = match format {
                QuantFormat::Q4_0 => x86::tile_x8_q4_0::<T>(level, data, nb, q8, out),
                QuantFormat::Q8_0 => x86::tile_x8_q8_0::<T>(level, data, nb, q8, out),
                QuantFormat::Q4K => x86::tile_x8_q4k::<T>(level, data, nb, q8k, out),
                _ => x86::tile_x8_q6k::<T>(level, data, nb, q8k, out),
            };
            assert!(ran, "{level:?} {format:?}");
            match format {
                QuantFormat::Q4_0 => interleave::tile_q4_0::<T>(data, nb, q8, &mut so),
                QuantFormat::Q8_0 => interleave::tile_q8_0::<T>(data, nb, q8, &mut so),
                QuantFormat::Q4K => interleave::tile_q4k::<T>(data, nb, q8k, &mut so),
                _ => interleave::tile_q6k::<T>(data, nb, q8k, &mut so),
            }
            assert_eq!(fast, slow, "{level:?} {format:?} T={T}");
            assert!(fast.iter().flatten().all(|v| *v != 0.0), "{format:?}");
        }
        for level in [Level::Avx2, Level::Avx512Vnni] {
            if level > x86::level() {
                continue;
            }
            for format in [
                QuantFormat::Q4_0,
                QuantFormat::Q8_0,
                QuantFormat::Q4K,
                QuantFormat::Q6K,
            ] {
                check::<3>(level, format);
                check::<8>(level, format);
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let w = matrix(QuantFormat::Q4_1, 8, 64, 5);
        let mut q = QuantizedRows::new();
        q.quantize(&random_input(64, 6), 64, [QuantFormat::Q4_1])
            .unwrap();
        let mut out = vec![0.0; 7];
        assert!(matches!(
            w.matmul(&q, &mut out),
            Err(KernelError::OutputSize { .. })
        ));
        let k = matrix(QuantFormat::Q6K, 8, 256, 5);
        let mut out = vec![0.0; 8];
        assert!(k.matmul(&q, &mut out).is_err());
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 32, vec![0; 67].into()).is_err());
        assert!(QMatrix::new(QuantFormat::Q8_0, 2, 48, vec![0; 0].into()).is_err());
    }
}
