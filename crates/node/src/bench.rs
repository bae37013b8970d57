//! `pod bench`: prompt-processing and generation speed of a chat model, measured the way
//! llama.cpp's `llama-bench` does (a prompt of N tokens in one batch; then N tokens decoded
//! one at a time), so the two can be compared on the same file.

use std::path::Path;
use std::time::Instant;

use pod_inference::sampling::argmax;
use pod_inference::{EngineConfig, LoadError, Placement};
use serde::Serialize;

/// Speeds measured over several repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Model file.
    pub model: String,
    /// Where it ran: `cpu`, `rocm:0`, `cuda:0`, `emulator`, or `candle (…)`.
    pub device: String,
    /// Prompt tokens per repetition.
    pub prompt_tokens: usize,
    /// Generated tokens per repetition.
    pub gen_tokens: usize,
    /// Prompt processing, tokens per second, one value per repetition.
    pub pp_tps: Vec<f64>,
    /// Generation, tokens per second, one value per repetition.
    pub tg_tps: Vec<f64>,
    /// Seconds to load the model.
    pub load_seconds: f64,
}

/// Median of a non-empty list (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the benchmark; a warm-up repetition is done first and not counted.
pub fn run(
    path: &Path,
    placement: &Placement,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    // One sequence at a time, with room for the prompt and the generated tokens.
    let engine = EngineConfig {
        max_active: 1,
        prefill_chunk: prompt_tokens.max(1),
        prefix_cache_bytes: 0,
        max_context: Some(prompt_tokens.max(gen_tokens) + 1),
        ..EngineConfig::default()
    };
    let model = crate::loader::load_chat(path, placement, &engine)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let vocab = model.info().vocab_size.max(2) as u32;
    // Deterministic pseudo-random prompt, as llama-bench uses random tokens.
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % (vocab - 1) + 1)
        .collect();
    let mut pp_tps = Vec::new();
    let mut tg_tps = Vec::new();
    for rep in 0..=reps {
        let mut seq = model.new_sequence();
        let t = Instant::now();
        seq.forward(&prompt)
            .map_err(|e| BenchError::Forward(e.to_string()))?;
        let pp = prompt_tokens as f64 / t.elapsed().as_secs_f64();
        // Generation starts from an empty context, as llama-bench's tg test does.
        let mut seq = model.new_sequence();
        let mut next = prompt.first().copied().unwrap_or(1);
        let t = Instant::now();
        for _ in 0..gen_tokens {
            let logits = seq
                .forward(&[next])
                .map_err(|e| BenchError::Forward(e.to_string()))?;
            next = argmax(&logits);
        }
        let tg = gen_tokens as f64 / t.elapsed().as_secs_f64();
        if rep > 0 {
            pp_tps.push(pp);
            tg_tps.push(tg);
        }
    }
    Ok(BenchReport {
        model: path.display().to_string(),
        device: model.runs_on(),
        prompt_tokens,
        gen_tokens,
        pp_tps,
        tg_tps,
        load_seconds,
    })
}

/// Writes a synthetic chat model (random weights from `seed`, generated tokenizer) of the
/// named `shape` in `format` to `path`, through a temporary file beside it, so that an
/// interrupted run leaves no partial model.
pub fn write_synthetic(
    path: &Path,
    shape: &str,
    format: &str,
    seed: u64,
) -> Result<(), BenchError> {
    use pod_inference::gpu::synthetic::{self, shapes};
    let model = shapes::shape(shape, format).map_err(BenchError::Synthetic)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |e: std::io::Error| BenchError::Synthetic(format!("writing {}: {e}", path.display()));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    synthetic::write_chat_model(tmp.path(), seed, &model)
        .map_err(|e| BenchError::Synthetic(e.to_string()))?;
    // Readable as any downloaded model is, not private as temporary files are made.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The synthetic model could not be written.
    #[error("{0}")]
    Synthetic(String),
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The forward pass failed.
    #[error("forward pass failed: {0}")]
    Forward(String),
}
