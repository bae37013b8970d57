//! Times the fused kernels on the projection shapes of SmolLM2-135M (30 layers of q/k/v, o,
//! gate/up, down and a 49152-row `Q8_0` head), one token (matrix-vector) and a 128-token
//! batch (matrix-matrix, without the head).
//!
//! `cargo run --release -p pod-inference --example kernel_bench [FORMAT] [BATCH]`: FORMAT is
//! Q4_0, Q4_1 (default), Q5_0, Q5_1 or Q8_0; BATCH defaults to 1, then 128. Threads:
//! `RAYON_NUM_THREADS`, else one per physical core; `POD_CPU_KERNELS=avx2|portable` caps the
//! instruction set.

use std::sync::Arc;
use std::time::Instant;

use pod_inference::kernels::{matmul_many, QMatrix, QuantFormat, QuantizedRows};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn matrix(format: QuantFormat, rows: usize, cols: usize, rng: &mut StdRng) -> QMatrix {
    let blocks = rows * cols / format.block_values();
    let mut data = vec![0u8; blocks * format.block_bytes()];
    rng.fill(&mut data[..]);
    for b in data.chunks_exact_mut(format.block_bytes()) {
        // A small positive f16 scale (and min, for Q4_1) at the start of every block.
        b[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
    }
    QMatrix::new(format, rows, cols, Arc::from(data)).expect("consistent shape")
}

fn main() {
    let format = match std::env::args().nth(1).as_deref() {
        Some("Q4_0") => QuantFormat::Q4_0,
        Some("Q5_0") => QuantFormat::Q5_0,
        Some("Q5_1") => QuantFormat::Q5_1,
        Some("Q8_0") => QuantFormat::Q8_0,
        _ => QuantFormat::Q4_1,
    };
    let batches: Vec<usize> = match std::env::args().nth(2) {
        Some(m) => vec![m.parse().expect("a batch size")],
        None => vec![1, 128],
    };
    let (hidden, ffn, kv, vocab, layers) = (576, 1536, 192, 49152, 30);
    let mut rng = StdRng::seed_from_u64(1);
    let q = matrix(format, hidden, hidden, &mut rng);
    let k = matrix(format, kv, hidden, &mut rng);
    let v = matrix(format, kv, hidden, &mut rng);
    let o = matrix(format, hidden, hidden, &mut rng);
    let gate = matrix(format, ffn, hidden, &mut rng);
    let up = matrix(format, ffn, hidden, &mut rng);
    let down = matrix(format, hidden, ffn, &mut rng);
    let head = matrix(QuantFormat::Q8_0, vocab, hidden, &mut rng);
    let layer_macs = (2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden) as f64;

    for m in batches {
        let x: Vec<f32> = (0..m * ffn).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut qa = QuantizedRows::new();
        let mut qf = QuantizedRows::new();
        let mut outs: Vec<Vec<f32>> = [hidden, kv, kv, hidden, ffn, ffn, hidden, vocab]
            .iter()
            .map(|&n| vec![0.0; m * n])
            .collect();
        let reps = if m == 1 { 200 } else { 3 };
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                for _ in 0..layers {
                    let [oq, ok, ov, oo, og, ou, od, _] = &mut outs[..] else {
                        unreachable!("eight outputs")
                    };
                    qa.quantize(&x[..m * hidden], hidden, [format])
                        .expect("whole blocks");
                    matmul_many(&[&q, &k, &v], &qa, &mut [oq, ok, ov]).expect("shapes");
                    o.matmul(&qa, oo).expect("shapes");
                    matmul_many(&[&gate, &up], &qa, &mut [og, ou]).expect("shapes");
                    qf.quantize(&x[..m * ffn], ffn, [format])
                        .expect("whole blocks");
                    down.matmul(&qf, od).expect("shapes");
                }
                if m == 1 {
                    qa.quantize(&x[..hidden], hidden, [QuantFormat::Q8_0])
                        .expect("whole blocks");
                    head.matmul(&qa, &mut outs[7]).expect("shapes");
                }
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let macs = if m == 1 {
            layers as f64 * layer_macs + (vocab * hidden) as f64
        } else {
            layers as f64 * layer_macs * m as f64
        };
        println!(
            "{format:?} m={m}: {:.3} ms per pass, {:.1} GMAC/s, {:.0} tokens/s of projections",
            best * 1e3,
            macs / best / 1e9,
            m as f64 / best
        );
    }
}
