//! Times the fused kernels per weight format on one layer of a Llama 3.2 1B shape (hidden
//! 2048, 512-wide keys and values, feed-forward 8192): one token (matrix-vector) and a batch
//! of 32, every format in turn, alternating rounds so that a busy machine slows them alike.
//!
//! The formats with an interleaved layout also run in it (`Q4_0x8`, `Q8_0x8`, `Q4Kx8`,
//! `Q6Kx8`), which is how the CPU decoder holds them. Each format also runs through candle's
//! quantised matmul on the same blocks (`Q4_0/candle`, ...), activations quantised by candle
//! as its models do, for the comparison that decides which kernels a model uses.
//! `POD_CPU_KERNELS=portable` times pod's portable kernels, as a CPU without AVX2 runs them.
//!
//! `cargo run --release -p pod-inference --example format_bench [ROUNDS [BATCH [FORMAT...]]]`
//! (batch sizes 1 and 32 by default; FORMAT as printed, e.g. `Q4K Q4Kx8`, to time only
//! those). Threads: `RAYON_NUM_THREADS`, else one per physical core.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use pod_inference::kernels::{matmul_many, QMatrix, QuantFormat, QuantizedRows};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A matrix of plausible blocks: random bytes with every f16 scale field set small.
fn matrix(format: QuantFormat, rows: usize, cols: usize, rng: &mut StdRng) -> QMatrix {
    let blocks = rows * cols / format.block_values();
    let mut data = vec![0u8; blocks * format.block_bytes()];
    rng.fill(&mut data[..]);
    if format.block_values() == 1 {
        // Float weights: small values, not random bit patterns (NaNs would not be timed fairly).
        for (i, b) in data.chunks_exact_mut(format.block_bytes()).enumerate() {
            b[0] = 0;
            b[1] = if i % 2 == 0 { 0x3c } else { 0xbc };
        }
    }
    QMatrix::new(format, rows, cols, Arc::from(data)).expect("consistent shape")
}

/// The same matrices as candle's quantised matmuls.
fn candle_layer(ms: &[QMatrix]) -> Vec<QMatMul> {
    ms.iter()
        .map(|w| {
            let storage = QStorage::from_data(
                std::borrow::Cow::Borrowed(w.bytes()),
                &Device::Cpu,
                w.format().ggml(),
            )
            .expect("candle reads the format");
            let t = QTensor::new(storage, (w.rows(), w.cols())).expect("consistent shape");
            QMatMul::from_qtensor(t).expect("a matmul")
        })
        .collect()
}

/// One layer's products through candle: q, k, v, o, gate, up from `x`, down from `xf`.
fn run_candle(cs: &[QMatMul], x: &Tensor, xf: &Tensor) {
    for c in &cs[..6] {
        c.forward(x).expect("shapes");
    }
    cs[6].forward(xf).expect("shapes");
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(3, |r| r.parse().expect("a round count"));
    let batches: Vec<usize> = match std::env::args().nth(2) {
        Some(m) => vec![m.parse().expect("a batch size")],
        None => vec![1, 32],
    };
    let only: Vec<String> = std::env::args().skip(3).collect();
    println!("pod's kernels: {}", pod_inference::kernels::cpu_level());
    let (hidden, kv, ffn) = (2048, 512, 8192);
    let shapes = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (ffn, hidden),
        (ffn, hidden),
        (hidden, ffn),
    ];
    let mut rng = StdRng::seed_from_u64(1);
    let mut layers: Vec<(String, QuantFormat, Vec<QMatrix>)> = Vec::new();
    for f in QuantFormat::ALL {
        let ms: Vec<QMatrix> = shapes
            .iter()
            .map(|&(r, c)| matrix(f, r, c, &mut rng))
            .collect();
        let interleaved: Vec<QMatrix> = ms.iter().map(QMatrix::interleaved).collect();
        if interleaved.iter().all(QMatrix::is_interleaved) {
            layers.push((format!("{f:?}x8"), f, interleaved));
        }
        layers.push((format!("{f:?}"), f, ms));
    }
    layers.retain(|(name, _, _)| only.is_empty() || only.contains(name));
    let mut candles: Vec<(String, Vec<QMatMul>, usize)> = Vec::new();
    for f in QuantFormat::ALL {
        let name = format!("{f:?}/candle");
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        let ms: Vec<QMatrix> = shapes
            .iter()
            .map(|&(r, c)| matrix(f, r, c, &mut rng))
            .collect();
        let bytes = ms.iter().map(|w| w.bytes().len()).sum();
        candles.push((name, candle_layer(&ms), bytes));
    }
    for m in batches {
        let x: Vec<f32> = (0..m * ffn).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut best = vec![f64::INFINITY; layers.len()];
        let mut best_candle = vec![f64::INFINITY; candles.len()];
        let xt = Tensor::from_slice(&x[..m * hidden], (m, hidden), &Device::Cpu).expect("x");
        let xft = Tensor::from_slice(&x[..m * ffn], (m, ffn), &Device::Cpu).expect("x");
        let reps = if m == 1 { 20 } else { 2 };
        for _ in 0..rounds {
            for (ci, (_, cs, _)) in candles.iter().enumerate() {
                let start = Instant::now();
                for _ in 0..reps {
                    run_candle(cs, &xt, &xft);
                }
                let s = start.elapsed().as_secs_f64() / reps as f64;
                best_candle[ci] = best_candle[ci].min(s);
            }
            for (li, (_, format, ms)) in layers.iter().enumerate() {
                let mut qa = QuantizedRows::new();
                let mut qf = QuantizedRows::new();
                let mut outs: Vec<Vec<f32>> = ms.iter().map(|w| vec![0.0; m * w.rows()]).collect();
                let start = Instant::now();
                for _ in 0..reps {
                    qa.quantize(&x[..m * hidden], hidden, [*format])
                        .expect("rows");
                    let (qkv, rest) = outs.split_at_mut(3);
                    let [q, k, v] = qkv else { unreachable!() };
                    matmul_many(&ms[..3].iter().collect::<Vec<_>>(), &qa, &mut [q, k, v])
                        .expect("shapes");
                    let (o, rest) = rest.split_at_mut(1);
                    ms[3].matmul(&qa, &mut o[0]).expect("shapes");
                    let (gu, down) = rest.split_at_mut(2);
                    let [g, u] = gu else { unreachable!() };
                    matmul_many(&[&ms[4], &ms[5]], &qa, &mut [g, u]).expect("shapes");
                    qf.quantize(&x[..m * ffn], ffn, [*format]).expect("rows");
                    ms[6].matmul(&qf, &mut down[0]).expect("shapes");
                }
                let s = start.elapsed().as_secs_f64() / reps as f64;
                best[li] = best[li].min(s);
            }
        }
        let ops: usize = 2 * m * shapes.iter().map(|&(r, c)| r * c).sum::<usize>();
        let rows = layers
            .iter()
            .zip(&best)
            .map(|((name, _, ms), s)| (name, ms.iter().map(|w| w.bytes().len()).sum(), *s))
            .chain(
                candles
                    .iter()
                    .zip(&best_candle)
                    .map(|((name, _, bytes), s)| (name, *bytes, *s)),
            );
        for (name, bytes, s) in rows {
            println!(
                "{name} batch {m}: {:.2} ms per layer, {:.1} GB/s of weights, {:.1} Gop/s",
                s * 1e3,
                bytes as f64 / s / 1e9,
                ops as f64 / s / 1e9
            );
        }
    }
}
