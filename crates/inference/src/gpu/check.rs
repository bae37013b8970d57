//! A self-check of a GPU runtime: for each weight format the GPU decoder reads, a tiny random
//! model runs on the CPU decoder and on [`GpuDecoder`], and their logits and greedy tokens are
//! compared. This is what someone with a new card runs first, and what a bug report quotes.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType};
use serde::Serialize;

use crate::decoder::BatchDecoder;
use crate::gpu::decoder::GpuDecoder;
use crate::gpu::runtime::DeviceRuntime;
use crate::gpu::synthetic::{self, Family, ModelShape, RopeScaling};
use crate::model::cpu_decoder::CpuDecoder;

/// The weight formats checked, each in every projection and the output head of its model.
pub const CHECKED_FORMATS: [GgmlDType; 12] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::F16,
    GgmlDType::BF16,
];

/// The prompt every check feeds first, in one pass.
const PROMPT: [u32; 7] = [1, 17, 200, 45, 45, 3, 255];
/// Context length of the checked models: the prompt and the decode steps fit well within it.
const MAX_LEN: usize = 64;

/// How much each check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Greedy decode steps after the prompt, one token each.
    pub decode_steps: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { decode_steps: 3 }
    }
}

/// The outcome of every check, in [`CHECKED_FORMATS`] order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    /// One row per weight format.
    pub checks: Vec<CheckRow>,
}

impl CheckReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// One weight format's check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    /// The format, as GGUF names it (`Q4_0`, `Q6_K`, ...).
    pub format: String,
    /// The largest difference between a GPU and a CPU logit, over all steps.
    pub max_abs_error: f32,
    /// The mean difference between GPU and CPU logits, over all steps.
    pub mean_abs_error: f32,
    /// The tightest per-logit bound: each logit is held to its own bound, at least this.
    pub bound: f32,
    /// The largest ratio of a logit's difference to its own bound; at most 1 to pass.
    pub worst_ratio: f32,
    /// Whether the GPU's greedy token equalled the CPU's at every step.
    pub greedy_equal: bool,
    /// Within bound at every logit, the same greedy tokens, and no error.
    pub passed: bool,
    /// Tokens fed to the GPU decoder per second of its forward passes.
    pub tokens_per_second: f64,
    /// Why the check could not run to its end; `None` when it did.
    pub error: Option<String>,
}

/// The name GGUF and llama.cpp give `dtype`.
pub fn format_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The model each check writes: one llama layer, as small as the 256-value super-block
/// formats allow, with `dtype` in every projection and the output head.
pub fn check_shape(dtype: GgmlDType) -> ModelShape {
    ModelShape {
        family: Family::Llama,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        ffn: 256,
        vocab: 256,
        context: MAX_LEN,
        embedding: GgmlDType::Q8_0,
        output: Some(dtype),
        layer_formats: vec![[dtype; 7]],
        rope: RopeScaling::None,
        sliding_window: None,
        head_width: None,
        experts: None,
    }
}

/// Runs one check per format in [`CHECKED_FORMATS`] on `runtime`. A check that cannot run
/// (the device fails, the model does not load) is a failed row carrying the reason, so the
/// report always has every row.
pub fn run_checks<R: DeviceRuntime>(runtime: Arc<R>, options: CheckOptions) -> CheckReport {
    let checks = CHECKED_FORMATS
        .iter()
        .enumerate()
        .map(|(i, &dtype)| {
            let name = format_name(dtype).to_owned();
            check_format(&runtime, dtype, 7 + i as u64, options)
                .unwrap_or_else(|e| failed_row(name, e))
        })
        .collect();
    CheckReport { checks }
}

/// Runs the check on the model at `path` (any architecture and formats the GPU decoder
/// reads: a real model, or a synthetic one at a realistic shape): one row, named by the
/// file's architecture and dominant format.
pub fn check_model<R: DeviceRuntime>(
    runtime: Arc<R>,
    path: &Path,
    options: CheckOptions,
) -> CheckReport {
    let name = match crate::gguf::GgufFile::open(path) {
        Ok(file) => format!(
            "{} {}",
            file.architecture().unwrap_or_else(|_| "model".into()),
            file.quantization()
        ),
        Err(e) => {
            return CheckReport {
                checks: vec![failed_row(path.display().to_string(), e.to_string())],
            }
        }
    };
    let row =
        check_file(&runtime, path, name.clone(), options).unwrap_or_else(|e| failed_row(name, e));
    CheckReport { checks: vec![row] }
}

/// A check that could not run, with the reason.
fn failed_row(format: String, error: String) -> CheckRow {
    CheckRow {
        format,
        max_abs_error: f32::NAN,
        mean_abs_error: f32::NAN,
        bound: f32::NAN,
        worst_ratio: f32::NAN,
        greedy_equal: false,
        passed: false,
        tokens_per_second: 0.0,
        error: Some(error),
    }
}

fn check_format<R: DeviceRuntime>(
    runtime: &Arc<R>,
    dtype: GgmlDType,
    seed: u64,
    options: CheckOptions,
) -> Result<CheckRow, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("creating a temporary directory: {e}"))?;
    let path = dir.path().join("check.gguf");
    synthetic::write_model(&path, seed, &check_shape(dtype)).map_err(|e| e.to_string())?;
    check_file(runtime, &path, format_name(dtype).to_owned(), options)
}

/// The prompt and `options.decode_steps` greedy steps of the model at `path` on the CPU
/// decoder and on `runtime`, compared logit by logit.
fn check_file<R: DeviceRuntime>(
    runtime: &Arc<R>,
    path: &Path,
    name: String,
    options: CheckOptions,
) -> Result<CheckRow, String> {
    let cpu = cpu_decoder(path).map_err(|e| format!("loading on the CPU: {e}"))?;
    let gpu = GpuDecoder::load(Arc::clone(runtime), path, MAX_LEN)
        .map_err(|e| format!("loading on the device: {e}"))?;
    let bounds = logit_bounds(&cpu);
    let (mut cpu_cache, mut gpu_cache) = (cpu.new_cache(), gpu.new_cache());
    let (mut max_err, mut sum_err, mut count) = (0.0f32, 0.0f64, 0usize);
    let mut worst_ratio = 0.0f32;
    let mut greedy_equal = true;
    let (mut gpu_time, mut fed) = (Duration::ZERO, 0usize);
    let mut input = PROMPT.to_vec();
    for step in 0..=options.decode_steps {
        let want = cpu
            .forward_batch(&mut [&mut cpu_cache], &[&input])
            .map_err(|e| format!("CPU step {step}: {e}"))?
            .pop()
            .ok_or("the CPU decoder returned no logits")?;
        let start = Instant::now();
        let got = gpu
            .forward_rows(&mut [&mut gpu_cache], &[&input])
            .map_err(|e| format!("device step {step}: {e}"))?
            .pop()
            .ok_or("the GPU decoder returned no logits")?;
        gpu_time += start.elapsed();
        fed += input.len();
        for ((&g, &c), &b) in got.iter().zip(&want).zip(&bounds) {
            // NaN must fail, so it is never compared with `<=` alone.
            let err = if g.is_finite() {
                (g - c).abs()
            } else {
                f32::INFINITY
            };
            max_err = max_err.max(err);
            sum_err += f64::from(err);
            count += 1;
            worst_ratio = worst_ratio.max(err / b);
        }
        let next = argmax(&want);
        greedy_equal &= argmax(&got) == next;
        // Both decoders continue from the CPU's token, so one divergence does not hide the
        // steps after it.
        input = vec![next];
    }
    let bound = bounds.iter().copied().fold(f32::INFINITY, f32::min);
    let within = worst_ratio <= 1.0;
    Ok(CheckRow {
        format: name,
        max_abs_error: max_err,
        mean_abs_error: (sum_err / count.max(1) as f64) as f32,
        bound,
        worst_ratio,
        greedy_equal,
        passed: within && greedy_equal,
        tokens_per_second: fed as f64 / gpu_time.as_secs_f64().max(1e-9),
        error: None,
    })
}

/// The model at `path` on the CPU decoder.
fn cpu_decoder(path: &Path) -> candle_core::Result<CpuDecoder> {
    let mut r = BufReader::new(File::open(path)?);
    let ct = gguf_file::Content::read(&mut r)?;
    let arch = ct
        .metadata
        .get("general.architecture")
        .map(|v| v.to_string().cloned())
        .transpose()?
        .unwrap_or_else(|| "llama".to_owned());
    CpuDecoder::from_gguf(&ct, &mut r, &arch, MAX_LEN)
}

/// The index of the largest value, the first of equals.
pub(crate) fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// How far each logit may move between the decoders. Both quantise the same activations to
/// the same integers and multiply them exactly (the kernels are checked against each other);
/// what differs is the order of f32 sums, in norms, attention and products, each moving its
/// sum by a few ε of its terms' magnitudes. The layers' differences stay that small and
/// rescale the final quantised activations by ε-sized factors, so the output head's product
/// bounds the whole: as in the kernel tests, at most n·ε·16·Σ|w|·amax(x) over its n = 2 ×
/// cols / 32 block terms, where an RMS-normalised row has no entry beyond √hidden times the
/// largest norm weight. Twice that covers the rescaling.
pub(crate) fn logit_bounds(cpu: &CpuDecoder) -> Vec<f32> {
    let Some(view) = cpu.view() else {
        return Vec::new();
    };
    let hidden = view.norm.len();
    let norm_max = view.norm.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let amax = (hidden as f32).sqrt() * norm_max;
    let n = 2 * hidden / 32;
    let mut row = vec![0.0f32; hidden];
    (0..view.output.rows())
        .map(|v| {
            view.output.dequantize_row(v, &mut row);
            let mag: f32 = row.iter().map(|w| w.abs()).sum::<f32>() * amax;
            2.0 * n as f32 * f32::EPSILON * 16.0 * mag
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::gpu::emulator::Emulator;

    #[test]
    fn every_format_passes_on_the_emulator_and_the_report_serializes() {
        let exe = std::env::current_exe().unwrap();
        let cache = exe.parent().unwrap().join("gpu-emulator");
        let emu = Arc::new(Emulator::compile_cached(64, &cache).unwrap());
        let report = run_checks(emu, CheckOptions { decode_steps: 2 });
        let names: Vec<&str> = report.checks.iter().map(|c| c.format.as_str()).collect();
        assert_eq!(
            names,
            [
                "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                "F16", "BF16"
            ]
        );
        for row in &report.checks {
            assert_eq!(row.error, None, "{}", row.format);
            assert!(row.passed, "{row:?}");
            assert!(row.worst_ratio <= 1.0, "{row:?}");
            assert!(row.mean_abs_error <= row.max_abs_error, "{row:?}");
            assert!(row.tokens_per_second > 0.0, "{row:?}");
        }
        assert!(report.passed());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][9]["format"], "Q6_K");
        assert_eq!(json["checks"][0]["passed"], true);
    }
}
