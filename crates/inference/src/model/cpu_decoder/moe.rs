//! The mixture-of-experts feed-forward (Qwen 3 MoE): a router scores every expert for each
//! row, the softmax of those scores picks the row's `used` best experts, their
//! probabilities are renormalised to sum to one (and scaled where the GGUF says so), and the
//! row's output is the weighted sum of those experts' SwiGLU feed-forwards.
//!
//! Each expert is a run of rows of the GGUF's 3-D `ffn_{gate,up,down}_exps` tensors, read in
//! place. Rows of a pass are grouped by expert, so a chosen expert's weights are read once
//! per pass and an expert no row chose is not read at all. A row's output does not depend on
//! the batch: its routing is its own, every projection of it is the kernels' per-row
//! product, and its experts are summed in the order of their rank.

use std::ops::Range;

use candle_core::Result;

use super::ops::{exp, project, Activation};
use crate::kernels::{self, QMatrix, QuantizedRows};

/// llama.cpp's floor on the sum of the chosen probabilities before dividing by it (the
/// smallest normal f16), which keeps a row whose chosen experts all score zero finite.
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// One expert's feed-forward: views into the layer's stacked expert tensors.
#[derive(Debug, Clone)]
pub(super) struct Expert {
    pub(super) gate: QMatrix,
    pub(super) up: QMatrix,
    pub(super) down: QMatrix,
}

/// A layer's router and experts.
#[derive(Debug, Clone)]
pub(super) struct Moe {
    /// `[experts, hidden]`: one score per expert for each row.
    pub(super) router: QMatrix,
    pub(super) experts: Vec<Expert>,
    /// Experts each row runs through.
    pub(super) used: usize,
    /// Multiplier of the renormalised weights (`{arch}.expert_weights_scale`), where the
    /// GGUF gives one other than 0 or 1.
    pub(super) scale: Option<f32>,
}

/// Working buffers of [`Moe::forward`], kept between passes.
#[derive(Debug, Default)]
pub(super) struct MoeScratch {
    logits: Vec<f32>,
    probs: Vec<f32>,
    order: Vec<usize>,
    /// Per row, its experts in rank order with their weights.
    chosen: Vec<(usize, f32)>,
    /// Per row and rank, where that pair sits among the rows grouped by expert.
    slots: Vec<usize>,
    /// Per expert, the first grouped row, then (while grouping) the next free one.
    starts: Vec<usize>,
    fill: Vec<usize>,
    grouped: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    y: Vec<f32>,
}

/// The `used` best experts of one row's router `logits`, in rank order, with their softmax
/// probabilities renormalised over the chosen ones and scaled by `scale`. Ties go to the
/// lower expert index.
fn route(
    logits: &[f32],
    used: usize,
    scale: Option<f32>,
    probs: &mut Vec<f32>,
    order: &mut Vec<usize>,
    chosen: &mut Vec<(usize, f32)>,
) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    probs.clear();
    probs.extend(logits.iter().map(|&l| exp(l - max)));
    let sum: f32 = probs.iter().sum();
    for p in probs.iter_mut() {
        *p /= sum;
    }
    order.clear();
    order.extend(0..probs.len());
    let by_rank = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    if used < order.len() {
        order.select_nth_unstable_by(used, by_rank);
        order.truncate(used);
    }
    order.sort_unstable_by(by_rank);
    let total = order
        .iter()
        .map(|&e| probs[e])
        .sum::<f32>()
        .max(MIN_WEIGHT_SUM);
    for &e in order.iter() {
        let w = probs[e] / total;
        chosen.push((e, scale.map_or(w, |s| w * s)));
    }
}

/// `v` cut into consecutive mutable pieces of `lens[i] * width` values.
fn pieces<'a>(mut v: &'a mut [f32], lens: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (head, rest) = std::mem::take(&mut v).split_at_mut(n * width);
        out.push(head);
        v = rest;
    }
    out
}

impl Moe {
    /// Runs the rows of `x` (each `hidden` values, already normalised) through the mixture,
    /// writing each row's output to `out`.
    pub(super) fn forward(
        &self,
        qa: &mut QuantizedRows,
        x: &[f32],
        out: &mut Vec<f32>,
        activation: Activation,
        s: &mut MoeScratch,
    ) -> Result<()> {
        let d = self.router.cols();
        let n_expert = self.experts.len();
        let m = x.len() / d;
        let k = self.used;
        let err = |e: kernels::KernelError| candle_core::Error::Msg(e.to_string());
        project(qa, x, &[&self.router], &mut [&mut s.logits])?;

        s.chosen.clear();
        for row in s.logits.chunks_exact(n_expert) {
            route(
                row,
                k,
                self.scale,
                &mut s.probs,
                &mut s.order,
                &mut s.chosen,
            );
        }
        // Group the (row, rank) pairs by expert, rows in order within each expert.
        s.starts.clear();
        s.starts.resize(n_expert + 1, 0);
        for &(e, _) in &s.chosen {
            s.starts[e + 1] += 1;
        }
        for e in 0..n_expert {
            s.starts[e + 1] += s.starts[e];
        }
        s.fill.clear();
        s.fill.extend_from_slice(&s.starts[..n_expert]);
        s.slots.clear();
        s.grouped.resize(m * k * d, 0.0);
        for (pair, &(e, _)) in s.chosen.iter().enumerate() {
            let slot = s.fill[e];
            s.fill[e] += 1;
            s.slots.push(slot);
            let r = pair / k;
            s.grouped[slot * d..(slot + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
        }
        let active: Vec<usize> = (0..n_expert)
            .filter(|&e| s.starts[e + 1] > s.starts[e])
            .collect();
        let ranges: Vec<Range<usize>> = active
            .iter()
            .map(|&e| s.starts[e]..s.starts[e + 1])
            .collect();
        let lens: Vec<usize> = ranges.iter().map(Range::len).collect();

        // Gate and up of every chosen expert over its rows, in one pass.
        let ffn = self.experts.first().map_or(0, |e| e.gate.rows());
        let mut ws: Vec<&QMatrix> = active.iter().map(|&e| &self.experts[e].gate).collect();
        ws.extend(active.iter().map(|&e| &self.experts[e].up));
        qa.quantize(&s.grouped, d, ws.iter().map(|w| w.format()))
            .map_err(err)?;
        s.g.resize(m * k * ffn, 0.0);
        s.u.resize(m * k * ffn, 0.0);
        let mut outs = pieces(&mut s.g, &lens, ffn);
        outs.extend(pieces(&mut s.u, &lens, ffn));
        let both: Vec<Range<usize>> = ranges.iter().chain(&ranges).cloned().collect();
        kernels::matmul_ranges(&ws, qa, &both, &mut outs).map_err(err)?;
        activation.gate(&mut s.g, &s.u);

        // Down of every chosen expert over its rows.
        let ws: Vec<&QMatrix> = active.iter().map(|&e| &self.experts[e].down).collect();
        qa.quantize(&s.g, ffn, ws.iter().map(|w| w.format()))
            .map_err(err)?;
        s.y.resize(m * k * d, 0.0);
        let mut outs = pieces(&mut s.y, &lens, d);
        kernels::matmul_ranges(&ws, qa, &ranges, &mut outs).map_err(err)?;

        // Each row: its experts' outputs, weighted, summed in rank order.
        out.resize(m * d, 0.0);
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            for j in 0..k {
                let (_, w) = s.chosen[r * k + j];
                let slot = s.slots[r * k + j];
                let y = &s.y[slot * d..(slot + 1) * d];
                if j == 0 {
                    for (ov, &yv) in o.iter_mut().zip(y) {
                        *ov = w * yv;
                    }
                } else {
                    for (ov, &yv) in o.iter_mut().zip(y) {
                        *ov += w * yv;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{random_input, random_matrix};
    use crate::kernels::QuantFormat;
    use std::sync::Arc;

    fn stacked(
        format: QuantFormat,
        experts: usize,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> QMatrix {
        let data = random_matrix(format, experts * rows, cols, seed);
        QMatrix::new(format, experts * rows, cols, Arc::new(data)).unwrap()
    }

    fn mixture(format: QuantFormat) -> Moe {
        let (n, d, ffn) = (8, 256, 256);
        let gate = stacked(format, n, ffn, d, 1);
        let up = stacked(format, n, ffn, d, 2);
        let down = stacked(format, n, d, ffn, 3);
        let experts = (0..n)
            .map(|e| Expert {
                gate: gate.rows_view(e * ffn, ffn).unwrap(),
                up: up.rows_view(e * ffn, ffn).unwrap(),
                down: down.rows_view(e * d, d).unwrap(),
            })
            .collect();
        let router = random_matrix(QuantFormat::F32, n, d, 4);
        Moe {
            router: QMatrix::new(QuantFormat::F32, n, d, Arc::new(router)).unwrap(),
            experts,
            used: 2,
            scale: None,
        }
    }

    /// A row's output is the same bits alone or among other rows that route elsewhere.
    #[test]
    fn a_rows_output_does_not_depend_on_the_batch() {
        let d = 256;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4K, QuantFormat::F16] {
            let moe = mixture(format);
            let rows = 11;
            let x = random_input(rows * d, 5);
            let mut qa = QuantizedRows::new();
            let mut s = MoeScratch::default();
            let mut all = Vec::new();
            moe.forward(&mut qa, &x, &mut all, Activation::Silu, &mut s)
                .unwrap();
            let mut used = std::collections::BTreeSet::new();
            for &(e, _) in &s.chosen {
                used.insert(e);
            }
            assert!(used.len() > 2, "{format:?}: the rows all chose {used:?}");
            for r in 0..rows {
                let mut one = Vec::new();
                let xr = &x[r * d..(r + 1) * d];
                moe.forward(&mut qa, xr, &mut one, Activation::Silu, &mut s)
                    .unwrap();
                assert_eq!(&all[r * d..(r + 1) * d], &one[..], "{format:?} row {r}");
                assert!(one.iter().any(|v| *v != 0.0));
            }
            // A batch of three, in another order, gives the same rows again.
            let pick = [7usize, 2, 9];
            let xs: Vec<f32> = pick
                .iter()
                .flat_map(|&r| x[r * d..(r + 1) * d].to_vec())
                .collect();
            let mut three = Vec::new();
            moe.forward(&mut qa, &xs, &mut three, Activation::Silu, &mut s)
                .unwrap();
            for (i, &r) in pick.iter().enumerate() {
                assert_eq!(&three[i * d..(i + 1) * d], &all[r * d..(r + 1) * d]);
            }
        }
    }

    /// An expert no row chose is not read: with its weights replaced by NaN, rows routed
    /// elsewhere give the same bits as before (a NaN read and weighted by zero would still
    /// poison them).
    #[test]
    fn experts_no_row_chose_are_not_read() {
        let (d, ffn) = (256, 256);
        let moe = mixture(QuantFormat::F16);
        let x = random_input(16 * d, 11);
        let mut qa = QuantizedRows::new();
        let mut s = MoeScratch::default();
        let mut logits = Vec::new();
        project(&mut qa, &x, &[&moe.router], &mut [&mut logits]).unwrap();
        let chooses = |r: usize, e: usize| {
            let row = &logits[r * 8..(r + 1) * 8];
            row.iter().filter(|&&l| l > row[e]).count() < 2
        };
        // An expert some rows choose and most do not.
        let unread = (0..8)
            .min_by_key(|&e| {
                let n = (0..16).filter(|&r| chooses(r, e)).count();
                if n == 0 {
                    usize::MAX
                } else {
                    n
                }
            })
            .unwrap();
        let keep: Vec<usize> = (0..16).filter(|&r| !chooses(r, unread)).collect();
        assert!(keep.len() >= 4, "{keep:?}");
        let xs: Vec<f32> = keep
            .iter()
            .flat_map(|&r| x[r * d..(r + 1) * d].to_vec())
            .collect();
        let mut want = Vec::new();
        moe.forward(&mut qa, &xs, &mut want, Activation::Silu, &mut s)
            .unwrap();
        let nan = half::f16::NAN.to_le_bytes();
        let poison = |m: &QMatrix| {
            let bytes: Vec<u8> = (0..m.rows() * m.cols()).flat_map(|_| nan).collect();
            QMatrix::new(QuantFormat::F16, m.rows(), m.cols(), Arc::new(bytes)).unwrap()
        };
        let mut poisoned = moe.clone();
        let e = &moe.experts[unread];
        poisoned.experts[unread] = Expert {
            gate: poison(&e.gate),
            up: poison(&e.up),
            down: poison(&e.down),
        };
        assert_eq!((e.gate.rows(), e.down.rows()), (ffn, d));
        let mut got = Vec::new();
        poisoned
            .forward(&mut qa, &xs, &mut got, Activation::Silu, &mut s)
            .unwrap();
        assert_eq!(got, want);
        assert!(got.iter().all(|v| v.is_finite()));
        // A row that does choose it is poisoned: the test would see a read.
        let chooser = (0..16).find(|r| !keep.contains(r)).unwrap();
        let mut bad = Vec::new();
        poisoned
            .forward(
                &mut qa,
                &x[chooser * d..(chooser + 1) * d],
                &mut bad,
                Activation::Silu,
                &mut s,
            )
            .unwrap();
        assert!(bad.iter().any(|v| v.is_nan()));
    }

    /// The output is the renormalised weighted sum of the two best experts' feed-forwards,
    /// each computed on its own.
    #[test]
    fn output_is_the_weighted_sum_of_the_best_experts() {
        let d = 256;
        let moe = mixture(QuantFormat::Q8_0);
        let x = random_input(d, 9);
        let mut qa = QuantizedRows::new();
        let mut s = MoeScratch::default();
        let mut out = Vec::new();
        moe.forward(&mut qa, &x, &mut out, Activation::Silu, &mut s)
            .unwrap();
        let mut logits = Vec::new();
        project(&mut qa, &x, &[&moe.router], &mut [&mut logits]).unwrap();
        let mut idx: Vec<usize> = (0..8).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let (a, b) = (idx[0], idx[1]);
        assert_eq!(s.chosen.iter().map(|c| c.0).collect::<Vec<_>>(), [a, b]);
        let pa = 1.0 / (1.0 + (logits[b] - logits[a]).exp());
        let mut want = vec![0.0f32; d];
        // Σ |w y|: the size of the terms, which the rounding of the sum scales with.
        let mut size = vec![0.0f32; d];
        for (e, w) in [(a, pa), (b, 1.0 - pa)] {
            let ex = &moe.experts[e];
            let (mut g, mut u, mut y) = (Vec::new(), Vec::new(), Vec::new());
            project(&mut qa, &x, &[&ex.gate, &ex.up], &mut [&mut g, &mut u]).unwrap();
            Activation::Silu.gate(&mut g, &u);
            project(&mut qa, &g, &[&ex.down], &mut [&mut y]).unwrap();
            for ((o, m), v) in want.iter_mut().zip(size.iter_mut()).zip(&y) {
                *o += w * v;
                *m += (w * v).abs();
            }
        }
        for ((got, want), size) in out.iter().zip(&want).zip(&size) {
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + size),
                "{got} vs {want} ({size})"
            );
        }
    }
}
