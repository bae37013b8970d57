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
mod tests;
