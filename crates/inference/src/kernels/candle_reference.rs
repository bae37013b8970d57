//! The fused quantised kernels against candle's dequantise-then-matmul, on random blocks of
//! every supported format.
//!
//! Two references:
//! - candle's f32 result `x · dequantize(W)ᵀ`. The fused kernels quantise each block of
//!   activations to 8 bits first (as llama.cpp does), which moves every activation by at most
//!   half a step, `amax_block / 254`; so each output may differ from the f32 result by at most
//!   `Σ_blocks amax_block / 254 · Σ_block |w|`, a bound computed here per output (plus f32
//!   rounding). In practice the errors are random and stay below a fifth of it.
//! - the same product with the activations quantised and dequantised the way the kernels
//!   quantise them ("dequantise both", as llama.cpp's reference path computes it). The kernels
//!   then differ only by f32 rounding: within 1e-6 of `Σ |w x|` (observed: below 2e-7).

use std::borrow::Cow;
use std::sync::Arc;

use super::testutil::{random_input, random_matrix};
use super::{matmul_many, QMatrix, QuantFormat, QuantizedRows};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

/// The activations after the kernels' 8-bit round trip: per block, `d = amax / 127`,
/// `q = round_half_even(x / d)`.
/// Float weights read the activations as they are.
fn round_trip(x: &[f32], block: usize) -> Vec<f32> {
    if block == 1 {
        return x.to_vec();
    }
    let mut out = Vec::with_capacity(x.len());
    for xs in x.chunks_exact(block) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(xs.iter().map(|v| d * (v * id).round_ties_even()));
    }
    out
}

fn candle_weights(format: QuantFormat, rows: usize, cols: usize, data: &[u8]) -> Tensor {
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, format.ggml()).unwrap();
    QTensor::new(storage, (rows, cols))
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

/// Rows of `x · wᵀ` in f64 from f32 rows.
fn reference(x: &[f32], w: &[Vec<f32>]) -> Vec<f64> {
    let k = w[0].len();
    x.chunks_exact(k)
        .flat_map(|xs| {
            w.iter().map(move |row| {
                row.iter()
                    .zip(xs)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
            })
        })
        .collect()
}

struct Case {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    m: usize,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for format in QuantFormat::ALL {
        let cols = match format.block_values() {
            256 => 768,
            32 => 576,
            // Float rows: a width that leaves a run of 8 and a tail of 4 past the paired runs.
            _ => 588,
        };
        for m in [1, 6] {
            v.push(Case {
                format,
                rows: 37,
                cols,
                m,
            });
        }
    }
    v
}

#[test]
fn dequantisation_matches_candle_exactly() {
    let mut seeds = 700u64..;
    for format in QuantFormat::ALL {
        let (rows, cols) = (5, 512);
        let data = random_matrix(format, rows, cols, seeds.next().unwrap());
        let theirs: Vec<Vec<f32>> = candle_weights(format, rows, cols, &data).to_vec2().unwrap();
        let w = QMatrix::new(format, rows, cols, Arc::from(data)).unwrap();
        let mut ours = vec![0.0; cols];
        for (j, want) in theirs.iter().enumerate() {
            w.dequantize_row(j, &mut ours);
            assert_eq!(&ours, want, "{format:?} row {j}");
        }
    }
}

#[test]
fn fused_kernels_match_candle_dequantise_then_matmul() {
    let mut seeds = 800u64..;
    for Case {
        format,
        rows,
        cols,
        m,
    } in cases()
    {
        let data = random_matrix(format, rows, cols, seeds.next().unwrap());
        let x = random_input(m * cols, seeds.next().unwrap());
        let wt = candle_weights(format, rows, cols, &data);
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        let candle: Vec<f32> = xt
            .matmul(&wt.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w_rows: Vec<Vec<f32>> = wt.to_vec2().unwrap();

        let w = QMatrix::new(format, rows, cols, Arc::from(data)).unwrap();
        let mut q = QuantizedRows::new();
        q.quantize(&x, cols, [format]).unwrap();
        let mut ours = vec![0.0f32; m * rows];
        w.matmul(&q, &mut ours).unwrap();

        let block = format.block_values();
        let both = reference(&round_trip(&x, block), &w_rows);
        let (mut worst_ratio, mut worst_both) = (0.0f64, 0.0f64);
        for r in 0..m {
            let xs = &x[r * cols..(r + 1) * cols];
            for (j, wr) in w_rows.iter().enumerate() {
                let i = r * rows + j;
                let mag: f64 = wr
                    .iter()
                    .zip(xs)
                    .map(|(&a, &b)| f64::from((a * b).abs()))
                    .sum();
                // Largest possible effect of the 8-bit activations.
                let bound: f64 = wr
                    .chunks_exact(block)
                    .zip(xs.chunks_exact(block))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let wsum: f64 = wb.iter().map(|v| f64::from(v.abs())).sum();
                        f64::from(amax) / 254.0 * wsum
                    })
                    .sum();
                let err = (f64::from(ours[i]) - f64::from(candle[i])).abs();
                assert!(
                    err <= bound + 1e-5 * mag,
                    "{format:?} m={m} [{r},{j}]: fused {} vs candle {} (bound {bound})",
                    ours[i],
                    candle[i]
                );
                worst_ratio = worst_ratio.max(err / (bound + 1e-5 * mag));
                let err_both = (f64::from(ours[i]) - both[i]).abs();
                worst_both = worst_both.max(err_both / mag);
                assert!(
                    err_both <= 1e-6 * mag,
                    "{format:?} m={m} [{r},{j}]: fused {} vs dequantise-both {} (Σ|wx| {mag})",
                    ours[i],
                    both[i]
                );
            }
        }
        eprintln!(
            "{format:?} m={m}: worst error {worst_ratio:.3} of the bound; \
             vs dequantise-both {worst_both:.1e} of Σ|wx|"
        );
    }
}

#[test]
fn one_pass_over_several_matrices_equals_separate_passes() {
    let mut seeds = 900u64..;
    let cols = 512;
    let formats = [QuantFormat::Q5_0, QuantFormat::Q8_0, QuantFormat::Q4K];
    let ws: Vec<QMatrix> = formats
        .iter()
        .zip([64, 17, 40])
        .map(|(&f, rows)| {
            let data = random_matrix(f, rows, cols, seeds.next().unwrap());
            QMatrix::new(f, rows, cols, Arc::from(data)).unwrap()
        })
        .collect();
    let x = random_input(3 * cols, seeds.next().unwrap());
    let mut q = QuantizedRows::new();
    q.quantize(&x, cols, formats).unwrap();
    let mut together: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; 3 * w.rows()]).collect();
    {
        let mut outs: Vec<&mut [f32]> = together.iter_mut().map(|v| &mut v[..]).collect();
        let refs: Vec<&QMatrix> = ws.iter().collect();
        matmul_many(&refs, &q, &mut outs).unwrap();
    }
    for (w, got) in ws.iter().zip(&together) {
        let mut alone = vec![0.0; 3 * w.rows()];
        w.matmul(&q, &mut alone).unwrap();
        assert_eq!(&alone, got);
    }
}
