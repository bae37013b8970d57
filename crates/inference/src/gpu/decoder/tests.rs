//! The GPU decoder on the emulator, at warp widths 32 and 64, against the CPU decoder on a
//! tiny llama-shaped model written as GGUF here, with a different block format for each
//! projection.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::decoder::DecoderCache;
use crate::gpu::emulator::Emulator;
use crate::model::cpu_decoder::KvCache;

const WARPS: [u32; 2] = [32, 64];
const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 512;
const VOCAB: usize = 256;
const MAX_LEN: usize = 64;

fn emulator(warp: u32) -> Arc<Emulator> {
    static W32: OnceLock<Arc<Emulator>> = OnceLock::new();
    static W64: OnceLock<Arc<Emulator>> = OnceLock::new();
    let cell = if warp == 32 { &W32 } else { &W64 };
    // Next to the test binary, so that the test processes of one build compile it once.
    let exe = std::env::current_exe().unwrap();
    let cache = exe.parent().unwrap().join("gpu-emulator");
    Arc::clone(cell.get_or_init(|| Arc::new(Emulator::compile_cached(warp, &cache).unwrap())))
}

/// A `rows` × `cols` matrix of random values around ±1/√cols, quantised to `dtype`.
fn matrix(rng: &mut StdRng, rows: usize, cols: usize, dtype: GgmlDType, scale: f32) -> QTensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0f32) * scale)
        .collect();
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn norm(rng: &mut StdRng) -> QTensor {
    let v: Vec<f32> = (0..HIDDEN)
        .map(|_| 1.0 + rng.random_range(-0.2..0.2f32))
        .collect();
    QTensor::quantize(&Tensor::new(v, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
}

/// Writes a two-layer llama model to `path`: every format the CPU decoder reads appears in
/// some projection, and q/k/v and gate/up mix 32-value and 256-value formats, so that one
/// input is quantised both ways. `tied` leaves out `output.weight`.
fn write_llama(path: &Path, seed: u64, tied: bool) {
    use GgmlDType::{Q4K, Q4_0, Q4_1, Q5_0, Q6K, Q8_0};
    let mut rng = StdRng::seed_from_u64(seed);
    let (q_w, kv_w) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let formats = [
        [Q4_0, Q8_0, Q4K, Q6K, Q4_1, Q4K, Q5_0],
        [Q6K, Q4_1, Q5_0, Q8_0, Q8_0, Q6K, Q4K],
    ];
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            matrix(&mut rng, VOCAB, HIDDEN, Q8_0, 1.0),
        ),
        ("output_norm.weight".into(), norm(&mut rng)),
    ];
    if !tied {
        let w = matrix(&mut rng, VOCAB, HIDDEN, Q6K, 2.0 / (HIDDEN as f32).sqrt());
        tensors.push(("output.weight".into(), w));
    }
    for (i, f) in formats.iter().enumerate() {
        let shapes = [
            ("attn_q", q_w, HIDDEN),
            ("attn_k", kv_w, HIDDEN),
            ("attn_v", kv_w, HIDDEN),
            ("attn_output", HIDDEN, q_w),
            ("ffn_gate", FFN, HIDDEN),
            ("ffn_up", FFN, HIDDEN),
            ("ffn_down", HIDDEN, FFN),
        ];
        for ((name, rows, cols), &dtype) in shapes.into_iter().zip(f) {
            let scale = 1.7 / (cols as f32).sqrt();
            let w = matrix(&mut rng, rows, cols, dtype, scale);
            tensors.push((format!("blk.{i}.{name}.weight"), w));
        }
        tensors.push((format!("blk.{i}.attn_norm.weight"), norm(&mut rng)));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), norm(&mut rng)));
    }
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(2)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", Value::U32(MAX_LEN as u32)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// The model at `path` on the CPU decoder.
fn cpu_decoder(path: &Path) -> CpuDecoder {
    let mut r = BufReader::new(File::open(path).unwrap());
    let ct = gguf_file::Content::read(&mut r).unwrap();
    CpuDecoder::from_gguf(&ct, &mut r, "llama", MAX_LEN).unwrap()
}

struct Model {
    _dir: tempfile::TempDir,
    cpu: CpuDecoder,
    gpu: Vec<GpuDecoder<Emulator>>,
}

fn model(seed: u64, tied: bool) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_llama(&path, seed, tied);
    let gpu = WARPS
        .iter()
        .map(|&w| GpuDecoder::load(emulator(w), &path, 4096).unwrap())
        .collect();
    Model {
        cpu: cpu_decoder(&path),
        gpu,
        _dir: dir,
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// One sequence's logits, fed `tokens` in passes of the given lengths.
fn feed(gpu: &GpuDecoder<Emulator>, cache: &mut GpuCache<Emulator>, tokens: &[u32]) -> Vec<f32> {
    gpu.forward_rows(&mut [cache], &[tokens])
        .unwrap()
        .pop()
        .unwrap()
}

const PROMPT: [u32; 7] = [1, 17, 200, 45, 45, 3, 255];

#[test]
fn prompt_and_greedy_decoding_match_the_cpu_decoder() {
    for tied in [false, true] {
        let m = model(7, tied);
        let mut cpu_cache: KvCache = m.cpu.new_cache();
        let mut gpu_caches: Vec<_> = m.gpu.iter().map(|g| g.new_cache()).collect();
        let mut input = PROMPT.to_vec();
        for step in 0..5 {
            let want = m
                .cpu
                .forward_batch(&mut [&mut cpu_cache], &[&input])
                .unwrap()
                .pop()
                .unwrap();
            let got: Vec<Vec<f32>> = m
                .gpu
                .iter()
                .zip(&mut gpu_caches)
                .map(|(g, c)| feed(g, c, &input))
                .collect();
            // Reductions run in 32-lane groups in a fixed order: the wave width changes
            // nothing.
            assert_eq!(bits(&got[0]), bits(&got[1]), "tied {tied} step {step}");
            let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let worst = got[0]
                .iter()
                .zip(&want)
                .fold(0.0f32, |a, (g, c)| a.max((g - c).abs()));
            eprintln!("tied {tied} step {step}: worst {worst} of {scale}");
            assert!(
                worst <= 1e-3 * scale,
                "tied {tied} step {step}: {worst} of {scale}"
            );
            let next = argmax(&want);
            assert_eq!(argmax(&got[0]), next, "tied {tied} step {step}");
            input = vec![next];
        }
        assert_eq!(gpu_caches[0].len(), PROMPT.len() + 4);
        assert_eq!(gpu_caches[0].len(), cpu_cache.len());
        assert_eq!(gpu_caches[0].bytes(), cpu_cache.bytes());
    }
}
