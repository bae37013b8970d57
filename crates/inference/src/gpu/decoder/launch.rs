//! Typed launches of each kernel the decoder uses, with the launch shapes it runs them in.
//!
//! Every block size depends only on the shape of the data (a matrix's width, a row's length),
//! never on how many rows a pass carries: the kernels reduce in an order fixed by the block
//! size, so this keeps a row's result independent of its batch.
//!
//! Unsafe code: the launches. Their invariants: each function checks that every buffer holds
//! what the kernel reads or writes for the dimensions given (see
//! [`KERNELS`](crate::gpu::kernels::KERNELS)); indices the kernels read from device memory
//! (token ids, positions, cache bases) are the decoder's: it checks them on the host before
//! uploading them, and passes their largest value as `max_id` or `max_pos`. A mixture's expert
//! indices alone are written on the device (by `moe_route`, every one below the expert
//! count); `matvec_ids_*` checks each against that count before reading an expert's rows.
#![allow(unsafe_code)]

use crate::gpu::kernels::{Activations, KernelArg, WeightFormat, MATMUL_TILE};
use crate::gpu::runtime::{DeviceRuntime, DeviceSlice, RuntimeError};

/// Threads of the element-wise kernels' blocks.
const ELEMENTWISE_THREADS: usize = 256;
/// Threads of the attention kernel's blocks.
const ATTENTION_THREADS: u32 = 64;
/// Bytes of an f32.
const F32: usize = 4;

/// The kernels of one runtime.
#[derive(Debug)]
pub(super) struct Kernels<'a, R>(pub(super) &'a R);

fn need(s: DeviceSlice, bytes: usize) -> Result<(), RuntimeError> {
    if s.len < bytes {
        return Err(RuntimeError::OutOfBounds {
            offset: 0,
            bytes,
            len: s.len,
        });
    }
    Ok(())
}

/// A size as a kernel's `int`.
fn int(v: usize) -> Result<KernelArg, RuntimeError> {
    i32::try_from(v)
        .map(KernelArg::I32)
        .map_err(|_| RuntimeError::Launch {
            kernel: String::new(),
            reason: format!("{v} does not fit a kernel's 32-bit size"),
        })
}

fn dim(v: usize) -> Result<u32, RuntimeError> {
    u32::try_from(v).map_err(|_| RuntimeError::Launch {
        kernel: String::new(),
        reason: format!("grid of {v} blocks"),
    })
}

/// Threads for a reduction over `items` per row: one per item up to 256, in whole 32-lane
/// groups.
fn reduction_threads(items: usize) -> u32 {
    items.next_multiple_of(32).clamp(32, 256) as u32
}

fn bad(kernel: &str, reason: String) -> RuntimeError {
    RuntimeError::Launch {
        kernel: kernel.to_owned(),
        reason,
    }
}

/// Bytes of one activation row of `cols` values in `form`.
pub(super) fn activation_row_bytes(form: Activations, cols: usize) -> usize {
    match form.quantize_kernel() {
        Some((_, bytes)) => cols / form.values() * bytes,
        None => cols * F32,
    }
}

/// Bytes of one weight row of `cols` values in `format`.
pub(super) fn weight_row_bytes(format: WeightFormat, cols: usize) -> usize {
    cols / format.block_values() * format.block_bytes()
}

impl<R: DeviceRuntime> Kernels<'_, R> {
    fn launch(
        &self,
        name: &str,
        grid: [usize; 2],
        block: u32,
        shared: usize,
        args: &[KernelArg],
    ) -> Result<(), RuntimeError> {
        let grid = [dim(grid[0])?, dim(grid[1])?, 1];
        let shared = u32::try_from(shared)
            .map_err(|_| bad(name, format!("{shared} bytes of shared memory")))?;
        // SAFETY: every caller below checked its buffers against the kernel's reads and
        // writes for these dimensions, and the decoder checked the indices it uploaded.
        unsafe { self.0.launch(name, grid, [block, 1, 1], shared, args) }
    }

    /// `out` row `i` = table row `ids[i]` (each at most `max_id`) times `scale`, for `n` ids.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn embed(
        &self,
        format: WeightFormat,
        (table, table_rows): (DeviceSlice, usize),
        (ids, max_id): (DeviceSlice, usize),
        out: DeviceSlice,
        n: usize,
        cols: usize,
        scale: f32,
    ) -> Result<(), RuntimeError> {
        let name = format.embed_kernel();
        if max_id >= table_rows || !cols.is_multiple_of(format.block_values()) {
            return Err(bad(name, format!("row {max_id} of {table_rows}x{cols}")));
        }
        need(table, table_rows * weight_row_bytes(format, cols))?;
        need(ids, n * 4)?;
        need(out, n * cols * F32)?;
        let args = [
            table.arg(),
            ids.arg(),
            out.arg(),
            int(cols)?,
            KernelArg::F32(scale),
        ];
        self.launch(name, [n, 1], 128, 0, &args)
    }

    /// `x` (`rows` rows of `cols` values) quantised into `out` in `form`.
    pub(super) fn quantize(
        &self,
        form: Activations,
        x: DeviceSlice,
        out: DeviceSlice,
        rows: usize,
        cols: usize,
    ) -> Result<(), RuntimeError> {
        let Some((name, bytes)) = form.quantize_kernel() else {
            return Ok(());
        };
        if !cols.is_multiple_of(form.values()) {
            return Err(bad(name, format!("rows of {cols} values")));
        }
        let blocks = rows * cols / form.values();
        need(x, rows * cols * F32)?;
        need(out, blocks * bytes)?;
        let grid = (blocks * 32).div_ceil(ELEMENTWISE_THREADS);
        let args = [x.arg(), out.arg(), int(blocks)?];
        self.launch(name, [grid, 1], ELEMENTWISE_THREADS as u32, 0, &args)
    }

    /// `y[t * rows + r]` = weight row `r` · activation row `t`, for `batch` rows of `x`
    /// already in the form `format` reads.
    ///
    /// One row runs `matvec_*`; several run the tiled `matmul_*`, which reads and unpacks each
    /// weight block once per [`MATMUL_TILE`] rows rather than once per row. Both give every
    /// output the same bits (the emulator tests check it), so the choice leaves batch
    /// invariance whole. That the tiled kernel is faster for every pass of two rows or more
    /// has been reasoned, not measured: its speed, and the best tile, must be measured on a
    /// GPU.
    pub(super) fn matvec(
        &self,
        format: WeightFormat,
        (w, rows, cols): (DeviceSlice, usize, usize),
        x: DeviceSlice,
        y: DeviceSlice,
        batch: usize,
    ) -> Result<(), RuntimeError> {
        let name = format.matvec_kernel();
        let form = format.activations();
        if !cols.is_multiple_of(format.block_values()) || !cols.is_multiple_of(form.values()) {
            return Err(bad(name, format!("rows of {cols} values")));
        }
        need(w, rows * weight_row_bytes(format, cols))?;
        need(x, batch * activation_row_bytes(form, cols))?;
        need(y, batch * rows * F32)?;
        let args = [
            w.arg(),
            x.arg(),
            y.arg(),
            int(rows)?,
            int(cols)?,
            int(batch)?,
        ];
        let threads = reduction_threads(cols / 32);
        if batch > 1 {
            let grid = [rows, batch.div_ceil(MATMUL_TILE)];
            self.launch(format.matmul_kernel(), grid, threads, 0, &args)
        } else {
            self.launch(name, [rows, 1], threads, 0, &args)
        }
    }

    /// `y[p * rows + r]` = row `r` of expert `ids[p]` · activation row `p / x_div`, for the
    /// `pairs` (row, rank) pairs of a mixture's pass: `w` stacks `experts` matrices of `rows`
    /// × `cols` in `format`, `x` holds `pairs / x_div` activation rows in the form `format`
    /// reads. Indices come from [`moe_route`](Self::moe_route), which writes none at or above
    /// `experts`; the kernel reads no weights for one that is (it writes NaN).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matvec_ids(
        &self,
        format: WeightFormat,
        (w, rows, cols, experts): (DeviceSlice, usize, usize, usize),
        x: DeviceSlice,
        (ids, pairs, x_div): (DeviceSlice, usize, usize),
        y: DeviceSlice,
    ) -> Result<(), RuntimeError> {
        let name = format.matvec_ids_kernel();
        let form = format.activations();
        if !cols.is_multiple_of(format.block_values()) || !cols.is_multiple_of(form.values()) {
            return Err(bad(name, format!("rows of {cols} values")));
        }
        if x_div == 0 || !pairs.is_multiple_of(x_div) {
            return Err(bad(name, format!("{pairs} pairs over {x_div} per row")));
        }
        // The grid's y, at most 65535 blocks on CUDA.
        if rows > 65_535 {
            return Err(bad(name, format!("experts of {rows} rows")));
        }
        need(w, experts * rows * weight_row_bytes(format, cols))?;
        need(x, pairs / x_div * activation_row_bytes(form, cols))?;
        need(ids, pairs * 4)?;
        need(y, pairs * rows * F32)?;
        let args = [
            w.arg(),
            x.arg(),
            y.arg(),
            ids.arg(),
            int(rows)?,
            int(cols)?,
            int(experts)?,
            int(x_div)?,
        ];
        let threads = reduction_threads(cols / 32);
        self.launch(name, [pairs, rows], threads, 0, &args)
    }

    /// Routes `rows` rows by their router scores `logits` (`experts` per row): each row's
    /// `used` best experts into `chosen` (i32, rank order) and their renormalised weights,
    /// times `scale`, into `weights`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe_route(
        &self,
        logits: DeviceSlice,
        (chosen, weights): (DeviceSlice, DeviceSlice),
        rows: usize,
        experts: usize,
        used: usize,
        scale: f32,
    ) -> Result<(), RuntimeError> {
        if used == 0 || used > experts {
            return Err(bad(
                "moe_route",
                format!("{used} experts used of {experts}"),
            ));
        }
        need(logits, rows * experts * F32)?;
        need(chosen, rows * used * 4)?;
        need(weights, rows * used * F32)?;
        let args = [
            logits.arg(),
            chosen.arg(),
            weights.arg(),
            int(experts)?,
            int(used)?,
            KernelArg::F32(scale),
            int(rows)?,
        ];
        let grid = rows.div_ceil(ELEMENTWISE_THREADS);
        self.launch("moe_route", [grid, 1], ELEMENTWISE_THREADS as u32, 0, &args)
    }

    /// `out` row `r` (of `rows`, `cols` values each) = Σ over ranks `j` of
    /// `weights[r * used + j]` × `y` row `r * used + j`, in rank order.
    pub(super) fn moe_combine(
        &self,
        (y, weights): (DeviceSlice, DeviceSlice),
        out: DeviceSlice,
        rows: usize,
        cols: usize,
        used: usize,
    ) -> Result<(), RuntimeError> {
        if used == 0 {
            return Err(bad("moe_combine", "no experts used".into()));
        }
        let n = rows * cols;
        need(y, n * used * F32)?;
        need(weights, rows * used * F32)?;
        need(out, n * F32)?;
        let args = [
            y.arg(),
            weights.arg(),
            out.arg(),
            int(cols.max(1))?,
            int(used)?,
            int(n)?,
        ];
        let grid = n.div_ceil(ELEMENTWISE_THREADS);
        self.launch(
            "moe_combine",
            [grid, 1],
            ELEMENTWISE_THREADS as u32,
            0,
            &args,
        )
    }

    /// `y` row = `x` row · `w` / rms(`x` row), for `rows` rows of `cols` values.
    pub(super) fn rms_norm(
        &self,
        (x, y): (DeviceSlice, DeviceSlice),
        w: DeviceSlice,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<(), RuntimeError> {
        need(x, rows * cols * F32)?;
        need(y, rows * cols * F32)?;
        need(w, cols * F32)?;
        let args = [x.arg(), w.arg(), y.arg(), int(cols)?, KernelArg::F32(eps)];
        self.launch("rms_norm", [rows, 1], reduction_threads(cols), 0, &args)
    }

    /// Rotates each of `rows` rows of `width` values (heads of `head_dim`) in place to its
    /// position in `pos` (each at most `max_pos`), with tables `[positions, head_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope(
        &self,
        x: DeviceSlice,
        (rows, width, head_dim): (usize, usize, usize),
        (pos, max_pos): (DeviceSlice, usize),
        (cos, sin): (DeviceSlice, DeviceSlice),
        neox: bool,
    ) -> Result<(), RuntimeError> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !width.is_multiple_of(head_dim) {
            return Err(bad(
                "rope",
                format!("rows of {width} in heads of {head_dim}"),
            ));
        }
        need(x, rows * width * F32)?;
        need(pos, rows * 4)?;
        need(cos, (max_pos + 1) * head_dim / 2 * F32)?;
        need(sin, (max_pos + 1) * head_dim / 2 * F32)?;
        let args = [
            x.arg(),
            pos.arg(),
            cos.arg(),
            sin.arg(),
            int(width)?,
            int(head_dim)?,
            KernelArg::I32(i32::from(neox)),
        ];
        self.launch("rope", [rows, 1], 128, 0, &args)
    }

    /// `add`, `silu_mul` or `gelu_mul` over the first `n` values of `x` and `y`.
    pub(super) fn elementwise(
        &self,
        name: &'static str,
        x: DeviceSlice,
        y: DeviceSlice,
        n: usize,
    ) -> Result<(), RuntimeError> {
        need(x, n * F32)?;
        need(y, n * F32)?;
        let args = [x.arg(), y.arg(), int(n)?];
        let grid = n.div_ceil(ELEMENTWISE_THREADS);
        self.launch(name, [grid, 1], ELEMENTWISE_THREADS as u32, 0, &args)
    }

    /// Adds `bias` (`cols` values) to each of `rows` rows of `x`.
    pub(super) fn add_bias(
        &self,
        x: DeviceSlice,
        bias: DeviceSlice,
        rows: usize,
        cols: usize,
    ) -> Result<(), RuntimeError> {
        let n = rows * cols;
        need(x, n * F32)?;
        need(bias, cols * F32)?;
        let args = [x.arg(), bias.arg(), int(cols.max(1))?, int(n)?];
        let grid = n.div_ceil(ELEMENTWISE_THREADS);
        self.launch("add_bias", [grid, 1], ELEMENTWISE_THREADS as u32, 0, &args)
    }

    /// Writes row `r`'s keys and values (`rows` rows of `kv_w`) at position `pos[r]` (each at
    /// most `max_pos`) of caches that start at position 0 (`zeros` holds `rows` zeros).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kv_append(
        &self,
        (k, v): (DeviceSlice, DeviceSlice),
        (k_cache, v_cache): (DeviceSlice, DeviceSlice),
        zeros: DeviceSlice,
        (pos, max_pos): (DeviceSlice, usize),
        rows: usize,
        kv_w: usize,
    ) -> Result<(), RuntimeError> {
        need(k, rows * kv_w * F32)?;
        need(v, rows * kv_w * F32)?;
        need(k_cache, (max_pos + 1) * kv_w * F32)?;
        need(v_cache, (max_pos + 1) * kv_w * F32)?;
        need(zeros, rows * 4)?;
        need(pos, rows * 4)?;
        let args = [
            k.arg(),
            v.arg(),
            k_cache.arg(),
            v_cache.arg(),
            zeros.arg(),
            pos.arg(),
            int(kv_w)?,
        ];
        self.launch("kv_append", [rows, 1], 128, 0, &args)
    }

    /// Attention of `rows` query rows (heads of `head_dim`) at positions `pos` (each at most
    /// `max_pos`) against caches that start at position 0 (`zeros` holds `rows` zeros).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        (q, out): (DeviceSlice, DeviceSlice),
        (k_cache, v_cache): (DeviceSlice, DeviceSlice),
        zeros: DeviceSlice,
        (pos, max_pos): (DeviceSlice, usize),
        rows: usize,
        (n_head, n_kv_head, head_dim): (usize, usize, usize),
        (window, scale): (usize, f32),
    ) -> Result<(), RuntimeError> {
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(bad("attention", format!("{n_head} heads on {n_kv_head}")));
        }
        let kv_w = n_kv_head * head_dim;
        need(q, rows * n_head * head_dim * F32)?;
        need(out, rows * n_head * head_dim * F32)?;
        need(k_cache, (max_pos + 1) * kv_w * F32)?;
        need(v_cache, (max_pos + 1) * kv_w * F32)?;
        need(zeros, rows * 4)?;
        need(pos, rows * 4)?;
        let args = [
            q.arg(),
            k_cache.arg(),
            v_cache.arg(),
            out.arg(),
            zeros.arg(),
            pos.arg(),
            int(n_head)?,
            int(n_kv_head)?,
            int(head_dim)?,
            int(window)?,
            KernelArg::F32(scale),
        ];
        // A row's weighted sum of values; the scores take a fixed array of their own.
        let shared = head_dim * F32;
        self.launch(
            "attention",
            [rows, n_head],
            ATTENTION_THREADS,
            shared,
            &args,
        )
    }
}
