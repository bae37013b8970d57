//! The kernels, run in the emulator at warp widths 32 and 64, against the CPU backend: the
//! fused kernels of `crate::kernels` and the definitions the CPU model (`model/fast.rs`)
//! computes, written out here where that code keeps them private.

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::gpu::kernels::{
    source, Activations, Param, Platform, WeightFormat, Q8K_BLOCK_BYTES, Q8_BLOCK_BYTES,
};
use crate::kernels::testutil::{random_input, random_matrix};
use crate::kernels::{QMatrix, QuantFormat, QuantizedRows};

const WARPS: [u32; 2] = [32, 64];
/// The block formats compared with the CPU kernels here (the float formats have tests of
/// their own below).
const BLOCK_FORMATS: [QuantFormat; 10] = [
    QuantFormat::Q4_0,
    QuantFormat::Q4_1,
    QuantFormat::Q5_0,
    QuantFormat::Q5_1,
    QuantFormat::Q8_0,
    QuantFormat::Q2K,
    QuantFormat::Q3K,
    QuantFormat::Q4K,
    QuantFormat::Q5K,
    QuantFormat::Q6K,
];
const EPS: f32 = f32::EPSILON;

fn emulator(warp: u32) -> &'static Emulator {
    static W32: OnceLock<Emulator> = OnceLock::new();
    static W64: OnceLock<Emulator> = OnceLock::new();
    let cell = if warp == 32 { &W32 } else { &W64 };
    // Next to the test binary, so that the test processes of one build compile it once.
    let exe = std::env::current_exe().unwrap();
    let cache = exe.parent().unwrap().join("gpu-emulator");
    cell.get_or_init(|| Emulator::compile_cached(warp, &cache).unwrap())
}

fn run(warp: u32, name: &str, grid: [u32; 2], block: u32, shared: u32, args: &[KernelArg]) {
    // SAFETY: every caller sizes its buffers for the kernel's arguments as KERNELS documents
    // and passes outputs through `Emulator::arg_mut`.
    unsafe { emulator(warp).launch(name, [grid[0], grid[1], 1], [block, 1, 1], shared, args) }
        .unwrap();
}

fn i32_arg(v: usize) -> KernelArg {
    KernelArg::I32(i32::try_from(v).unwrap())
}

/// `x` quantised on the emulated GPU in `form`.
fn gpu_quantize(warp: u32, form: Activations, x: &[f32]) -> Vec<u8> {
    let (name, bytes) = form.quantize_kernel().unwrap();
    let blocks = x.len() / form.values();
    let mut out = vec![0u8; blocks * bytes];
    let threads = 64;
    let grid = (blocks * 32).div_ceil(threads) as u32;
    run(
        warp,
        name,
        [grid, 1],
        threads as u32,
        0,
        &[
            Emulator::arg(x),
            Emulator::arg_mut(&mut out),
            i32_arg(blocks),
        ],
    );
    out
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn activations_quantise_exactly_as_on_the_cpu() {
    let cols = 512;
    let x = random_input(3 * cols, 1);
    let mut cpu = QuantizedRows::new();
    cpu.quantize(&x, cols, [QuantFormat::Q4_0, QuantFormat::Q6K])
        .unwrap();
    for warp in WARPS {
        let q8 = gpu_quantize(warp, Activations::Q8, &x);
        let q8k = gpu_quantize(warp, Activations::Q8K, &x);
        for r in 0..3 {
            let row = cpu.q8_row(r).unwrap();
            for (i, b) in row.iter().enumerate() {
                let g = &q8[(r * row.len() + i) * Q8_BLOCK_BYTES..][..Q8_BLOCK_BYTES];
                assert_eq!(f32_at(g, 0).to_bits(), b.d.to_bits(), "warp {warp} d");
                assert_eq!(f32_at(g, 4).to_bits(), b.s.to_bits(), "warp {warp} s");
                let qs: Vec<i8> = g[8..].iter().map(|&v| v as i8).collect();
                assert_eq!(qs, b.qs, "warp {warp} row {r} block {i}");
            }
            let row = cpu.q8k_row(r).unwrap();
            for (i, b) in row.iter().enumerate() {
                let g = &q8k[(r * row.len() + i) * Q8K_BLOCK_BYTES..][..Q8K_BLOCK_BYTES];
                assert_eq!(f32_at(g, 0).to_bits(), b.d.to_bits(), "warp {warp} d");
                let qs: Vec<i8> = g[4..260].iter().map(|&v| v as i8).collect();
                assert_eq!(qs, b.qs, "warp {warp} row {r} block {i}");
                let sums: Vec<i16> = g[260..]
                    .chunks_exact(2)
                    .map(|s| i16::from_ne_bytes([s[0], s[1]]))
                    .collect();
                assert_eq!(sums, b.bsums, "warp {warp} row {r} block {i}");
            }
        }
    }
}

/// `y[t * rows + r]` for the rows of `x` times `rows` × `cols` weights `w`, quantised (where
/// the format asks) and multiplied on the emulated GPU with blocks of `threads`.
fn gpu_matvec(
    warp: u32,
    format: WeightFormat,
    w: &[u8],
    (rows, cols): (usize, usize),
    x: &[f32],
    threads: u32,
) -> Vec<f32> {
    let batch = x.len() / cols;
    let xq = match format.activations() {
        Activations::F32 => bytemuck::cast_slice(x).to_vec(),
        form => gpu_quantize(warp, form, x),
    };
    let mut y = vec![f32::NAN; batch * rows];
    run(
        warp,
        format.matvec_kernel(),
        [rows as u32, 1],
        threads,
        0,
        &[
            Emulator::arg(w),
            Emulator::arg(&xq),
            Emulator::arg_mut(&mut y),
            i32_arg(rows),
            i32_arg(cols),
            i32_arg(batch),
        ],
    );
    y
}

/// `x` in the form `format`'s products read, quantised on the emulated GPU where it asks.
fn gpu_activations(warp: u32, format: WeightFormat, x: &[f32]) -> Vec<u8> {
    match format.activations() {
        Activations::F32 => bytemuck::cast_slice(x).to_vec(),
        form => gpu_quantize(warp, form, x),
    }
}

/// `kernel` (a `matvec_*` or `matmul_*`) over `batch` activation rows `xq`, on a grid of
/// `rows` × `grid_y` blocks of `threads`.
#[allow(clippy::too_many_arguments)]
fn gpu_product(
    warp: u32,
    kernel: &str,
    w: &[u8],
    (rows, cols): (usize, usize),
    xq: &[u8],
    batch: usize,
    (grid_y, threads): (usize, u32),
) -> Vec<f32> {
    let mut y = vec![f32::NAN; batch * rows];
    run(
        warp,
        kernel,
        [rows as u32, grid_y as u32],
        threads,
        0,
        &[
            Emulator::arg(w),
            Emulator::arg(xq),
            Emulator::arg_mut(&mut y),
            i32_arg(rows),
            i32_arg(cols),
            i32_arg(batch),
        ],
    );
    y
}

#[test]
fn tiled_products_have_the_bits_of_one_row_at_a_time() {
    use crate::gpu::kernels::MATMUL_TILE;
    let (rows, cols, most) = (5, 512, 2 * MATMUL_TILE + 3);
    for (fi, format) in WeightFormat::ALL.into_iter().enumerate() {
        let seed = 600 + fi as u64;
        let w = random_matrix(format.quant(), rows, cols, seed);
        let x = random_input(most * cols, seed + 50);
        let mut per_warp = Vec::new();
        for warp in WARPS {
            let xq = gpu_activations(warp, format, &x);
            let row_bytes = xq.len() / most;
            for threads in [32, 128] {
                // Each activation row alone, as a decode step of one sequence computes it.
                let alone: Vec<f32> = xq
                    .chunks_exact(row_bytes)
                    .flat_map(|xr| {
                        let kernel = format.matvec_kernel();
                        gpu_product(warp, kernel, &w, (rows, cols), xr, 1, (1, threads))
                    })
                    .collect();
                for batch in [2, 3, MATMUL_TILE, MATMUL_TILE + 1, most] {
                    let grid_y = batch.div_ceil(MATMUL_TILE);
                    let tiled = gpu_product(
                        warp,
                        format.matmul_kernel(),
                        &w,
                        (rows, cols),
                        &xq[..batch * row_bytes],
                        batch,
                        (grid_y, threads),
                    );
                    assert_eq!(
                        bits(&tiled),
                        bits(&alone[..batch * rows]),
                        "{format:?} warp {warp} threads {threads} batch {batch}"
                    );
                }
                let looped = gpu_product(
                    warp,
                    format.matvec_kernel(),
                    &w,
                    (rows, cols),
                    &xq,
                    most,
                    (1, threads),
                );
                assert_eq!(bits(&looped), bits(&alone), "{format:?} warp {warp}");
                per_warp.push(alone);
            }
        }
        // Reductions run in 32-lane groups in a fixed order: the wave width changes nothing.
        assert_eq!(per_warp[0], per_warp[2], "{format:?} threads 32");
        assert_eq!(per_warp[1], per_warp[3], "{format:?} threads 128");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// `rows` × `cols` weights of a GGUF type, dequantised by candle.
fn candle_dequantize(dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, dtype).unwrap();
    QTensor::new(storage, (rows, cols))
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn matrix_vector_products_match_the_cpu_kernels() {
    let (rows, cols) = (21, 512);
    for (fi, format) in BLOCK_FORMATS.into_iter().enumerate() {
        let seed = 10 + fi as u64;
        let m = QMatrix::new(
            format,
            rows,
            cols,
            random_matrix(format, rows, cols, seed).into(),
        )
        .unwrap();
        for batch in [1, 3, 8] {
            let x = random_input(batch * cols, seed + 100 * batch as u64);
            let mut qa = QuantizedRows::new();
            qa.quantize(&x, cols, [format]).unwrap();
            let mut want = vec![0.0f32; batch * rows];
            m.matmul(&qa, &mut want).unwrap();
            let per_warp: Vec<Vec<f32>> = WARPS
                .iter()
                .map(|&w| {
                    let f = WeightFormat::of(format).unwrap();
                    gpu_matvec(w, f, m.data(), (rows, cols), &x, [64, 128, 32][batch % 3])
                })
                .collect();
            // Reductions run in 32-lane groups in a fixed order: the wave width changes nothing.
            assert_eq!(per_warp[0], per_warp[1], "{format:?} batch {batch}");
            let got = &per_warp[0];
            let mut wrow = vec![0.0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut wrow);
                for t in 0..batch {
                    let xs = &x[t * cols..(t + 1) * cols];
                    // Both sides add the same per-block terms, each exact up to its one or two
                    // f32 roundings (the integer dots are exact), only in another order. A sum
                    // of n terms reordered moves by at most n·ε·Σ|term|; there are at most two
                    // terms per 32 values (the scaled dot and the offset), and each is at most
                    // 16 × Σ|w|·amax(x) over its block (an offset format's parts exceed the
                    // value they encode by at most the 4- or 5-bit range).
                    let mag: f32 = wrow
                        .chunks_exact(32)
                        .zip(xs.chunks_exact(32))
                        .map(|(w, x)| {
                            let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                            w.iter().map(|v| v.abs()).sum::<f32>() * amax
                        })
                        .sum();
                    let n = 2 * cols / 32;
                    let bound = n as f32 * EPS * 16.0 * mag;
                    let (g, c) = (got[t * rows + r], want[t * rows + r]);
                    assert!(
                        (g - c).abs() <= bound,
                        "{format:?} batch {batch} row {r} t {t}: gpu {g} cpu {c} bound {bound}"
                    );
                }
            }
        }
    }
}

/// Random blocks of `format` whose scales and offsets are powers of two and whose sub-block
/// scales are small, so that every product and sum of a row's dot product with activations
/// quantised from multiples of 2^-7 is exact in f32: each is an integer under 2^24 times a
/// power of two.
fn power_of_two_matrix(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut data = random_matrix(format, rows, cols, seed);
    let put = |b: &mut [u8], at: usize, v: f32| {
        b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    };
    for (i, b) in data.chunks_exact_mut(format.block_bytes()).enumerate() {
        let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
        match format {
            QuantFormat::Q4_0 | QuantFormat::Q5_0 | QuantFormat::Q8_0 => put(b, 0, sign / 256.0),
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => {
                put(b, 0, 1.0 / 256.0);
                put(b, 2, sign / 32.0);
            }
            QuantFormat::Q4K | QuantFormat::Q5K => {
                put(b, 0, 1.0 / 256.0);
                put(b, 2, 1.0 / 512.0);
                // Scales and mins of 0..=3, top bits clear.
                for v in &mut b[4..16] {
                    *v &= 0x03;
                }
            }
            QuantFormat::Q2K => {
                put(b, 80, 1.0 / 256.0);
                put(b, 82, 1.0 / 512.0);
            }
            QuantFormat::Q3K => {
                put(b, 108, sign / 256.0);
                // Scales of -32..=-29 and 0..=3 (low nibbles of 0..=3, top bits 0 or 2).
                for v in &mut b[96..104] {
                    *v &= 0x33;
                }
                for v in &mut b[104..108] {
                    *v &= 0xaa;
                }
            }
            QuantFormat::Q6K => {
                put(b, 208, sign / 256.0);
                for v in &mut b[192..208] {
                    *v = ((*v % 7) as i8 - 3) as u8;
                }
            }
            other => panic!("no power-of-two blocks for {other:?}"),
        }
    }
    data
}

/// Multiples of 2^-7 in [-127/128, 127/128], every 32 values including one of magnitude
/// 127/128, so that quantisation maps them to exactly their integers with d = 2^-7.
fn power_of_two_input(len: usize, seed: u64) -> Vec<f32> {
    random_input(len, seed)
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let q = if i % 32 == 5 {
                127.0f32.copysign(v)
            } else {
                (v.clamp(-1.0, 1.0) * 127.0).round()
            };
            q / 128.0
        })
        .collect()
}

#[test]
fn integer_dot_products_are_exact() {
    let (rows, cols) = (19, 512);
    for (fi, format) in BLOCK_FORMATS.into_iter().enumerate() {
        let data = power_of_two_matrix(format, rows, cols, 200 + fi as u64);
        let m = QMatrix::new(format, rows, cols, data.into()).unwrap();
        let batch = 3;
        let x = power_of_two_input(batch * cols, 300 + fi as u64);
        let mut qa = QuantizedRows::new();
        qa.quantize(&x, cols, [format]).unwrap();
        let mut want = vec![0.0f32; batch * rows];
        m.matmul(&qa, &mut want).unwrap();
        assert!(
            want.iter().all(|v| v.abs() > 0.0),
            "{format:?}: a degenerate case"
        );
        for warp in WARPS {
            let got = gpu_matvec(
                warp,
                WeightFormat::of(format).unwrap(),
                m.data(),
                (rows, cols),
                &x,
                64,
            );
            // Every rounding is exact here, so any difference is a wrong integer.
            assert_eq!(got, want, "{format:?} warp {warp}");
        }
    }
}

/// Random `Q5_K` blocks with power-of-two `d` and `dmin` and scales and mins of 0..=3.
fn power_of_two_q5k(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; rows * cols / 256 * 176];
    rng.fill(&mut data[..]);
    for b in data.chunks_exact_mut(176) {
        b[0..2].copy_from_slice(&half::f16::from_f32(1.0 / 256.0).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(1.0 / 256.0).to_le_bytes());
        for v in &mut b[4..16] {
            *v &= 0x03;
        }
    }
    data
}

#[test]
fn q5_k_products_are_exact_and_rows_dequantise_as_candle_does() {
    let (rows, cols) = (13, 512);
    let data = power_of_two_q5k(rows, cols, 400);
    let w = candle_dequantize(GgmlDType::Q5K, &data, rows, cols);
    let x = power_of_two_input(2 * cols, 401);
    // The inputs quantise to themselves, and every step is exact: the f64 product is the
    // answer to the last bit.
    let want: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|xs| {
            w.chunks_exact(cols).map(move |row| {
                row.iter()
                    .zip(xs)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>() as f32
            })
        })
        .collect();
    assert!(want.iter().all(|v| v.abs() > 0.0));
    let ids = [12i32, 0, 5];
    for warp in WARPS {
        let got = gpu_matvec(warp, WeightFormat::Q5K, &data, (rows, cols), &x, 64);
        assert_eq!(got, want, "warp {warp}");
        let rows_out = gpu_embed(warp, WeightFormat::Q5K, &data, &ids, (cols, 1.0));
        for (&id, got) in ids.iter().zip(rows_out.chunks_exact(cols)) {
            let id = id as usize;
            assert_eq!(got, &w[id * cols..(id + 1) * cols], "warp {warp} row {id}");
        }
    }
}

#[test]
fn float_products_and_rows_match_their_values() {
    let (rows, cols, batch) = (9, 320, 3);
    let values = random_input(rows * cols, 500);
    let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    let brains: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let x = random_input(batch * cols, 501);
    let ids = [8i32, 1, 1];
    for format in [WeightFormat::F16, WeightFormat::BF16, WeightFormat::F32] {
        let (w, bytes): (Vec<f32>, Vec<u8>) = match format {
            WeightFormat::F16 => (
                halves.iter().map(|h| h.to_f32()).collect(),
                halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
            ),
            WeightFormat::BF16 => (
                brains.iter().map(|h| h.to_f32()).collect(),
                brains.iter().flat_map(|h| h.to_le_bytes()).collect(),
            ),
            _ => (values.clone(), bytemuck::cast_slice(&values).to_vec()),
        };
        for warp in WARPS {
            let got = gpu_matvec(warp, format, &bytes, (rows, cols), &x, 64);
            for t in 0..batch {
                for r in 0..rows {
                    let (wr, xs) = (&w[r * cols..][..cols], &x[t * cols..][..cols]);
                    let exact: f64 = wr
                        .iter()
                        .zip(xs)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(xs)
                        .map(|(&a, &b)| f64::from(a * b).abs())
                        .sum();
                    // cols products, each rounded once, summed in some order: at most
                    // (cols + 1)·ε·Σ|w·x| from the exact value.
                    let bound = (cols as f64 + 1.0) * f64::from(EPS) * mag;
                    let g = f64::from(got[t * rows + r]);
                    assert!(
                        (g - exact).abs() <= bound,
                        "{format:?} warp {warp}: {g} vs {exact}"
                    );
                }
            }
            let out = gpu_embed(warp, format, &bytes, &ids, (cols, 1.0));
            for (&id, got) in ids.iter().zip(out.chunks_exact(cols)) {
                assert_eq!(
                    got,
                    &w[id as usize * cols..][..cols],
                    "{format:?} warp {warp}"
                );
            }
        }
    }
}

/// Table rows `ids` of `format`, dequantised on the emulated GPU.
fn gpu_embed(
    warp: u32,
    format: WeightFormat,
    table: &[u8],
    ids: &[i32],
    (cols, scale): (usize, f32),
) -> Vec<f32> {
    let mut out = vec![f32::NAN; ids.len() * cols];
    run(
        warp,
        format.embed_kernel(),
        [ids.len() as u32, 1],
        128,
        0,
        &[
            Emulator::arg(table),
            Emulator::arg(ids),
            Emulator::arg_mut(&mut out),
            i32_arg(cols),
            KernelArg::F32(scale),
        ],
    );
    out
}

#[test]
fn embedding_rows_dequantise_exactly_as_on_the_cpu() {
    let (rows, cols) = (11, 512);
    // Gemma's scale, sqrt(hidden), rounded to f32 as the CPU model keeps it.
    let gemma = (640.0f32).sqrt();
    for (fi, format) in BLOCK_FORMATS.into_iter().enumerate() {
        let table = random_matrix(format, rows, cols, 40 + fi as u64);
        let ids = [3i32, 0, 10, 3, 7];
        let row_bytes = cols / format.block_values() * format.block_bytes();
        for scale in [1.0, gemma] {
            let mut want = vec![0.0f32; ids.len() * cols];
            for (&id, out) in ids.iter().zip(want.chunks_exact_mut(cols)) {
                let id = id as usize;
                format.dequantize_row(&table[id * row_bytes..(id + 1) * row_bytes], out);
                for v in out.iter_mut() {
                    *v *= scale;
                }
            }
            for warp in WARPS {
                let f = WeightFormat::of(format).unwrap();
                let got = gpu_embed(warp, f, &table, &ids, (cols, scale));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{format:?} warp {warp} scale {scale}"
                );
            }
        }
    }
}

mod layers;
