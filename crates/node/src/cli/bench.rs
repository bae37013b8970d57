//! `pod bench`: prompt-processing and generation speed of a chat model, on any device, of a
//! model file or a synthetic model at a named shape.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use pod_inference::gpu::synthetic::shapes;
use pod_inference::DeviceSpec;
use pod_node::catalogue::DEFAULT_CHAT_MODEL;
use pod_node::loader;
use pod_node::store::{ModelFormat, ModelStore};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Catalogue name or path to a GGUF file.
    #[arg(long, short, default_value = DEFAULT_CHAT_MODEL, conflicts_with = "shape")]
    model: String,
    /// Instead of a model file, a synthetic model (random weights) of this shape: tiny,
    /// llama-1b or llama-8b. Written once under the state directory's `synthetic/` and reused.
    #[arg(long)]
    shape: Option<String>,
    /// Weight format of the synthetic model: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k,
    /// q5_k, q6_k, f16, bf16, f32, q4_k_m or q5_k_m.
    #[arg(long, default_value = "q4_k_m", requires = "shape")]
    format: String,
    /// Compute device: auto, cpu, rocm[:N], cuda[:N] or emulator (see `pod start --help`).
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Prompt length in tokens (llama-bench's -p).
    #[arg(long, short = 'p', default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate (llama-bench's -n).
    #[arg(long, short = 'n', default_value_t = 128)]
    gen_tokens: usize,
    /// Measured repetitions, after one warm-up.
    #[arg(long, short = 'r', default_value_t = 3)]
    reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(home: &Path, store: &ModelStore, args: BenchArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens and --reps must be at least 1");
    }
    let path = match &args.shape {
        Some(shape) => synthetic_model(home, shape, &args.format)?,
        None => {
            let resolved = loader::resolve(store, &args.model, true)?;
            if resolved.format != ModelFormat::Gguf {
                bail!("`{}` is not a chat model", args.model);
            }
            resolved.path
        }
    };
    let placement = args
        .device
        .place(&home.join("kernels"))
        .map_err(|e| anyhow!("--device {}: {e}", args.device))?;
    let report = pod_node::bench::run(
        &path,
        &placement,
        args.prompt_tokens,
        args.gen_tokens,
        args.reps,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        use pod_node::bench::median;
        println!("model: {}", report.model);
        println!("device: {}", report.device);
        println!(
            "pp{}: {:.1} tokens/s (median of {})",
            report.prompt_tokens,
            median(&report.pp_tps),
            args.reps
        );
        println!(
            "tg{}: {:.1} tokens/s (median of {})",
            report.gen_tokens,
            median(&report.tg_tps),
            args.reps
        );
    }
    Ok(())
}

/// The synthetic model of `shape` in `format` under `<home>/synthetic/`, written first when it
/// is not there yet.
fn synthetic_model(home: &Path, shape: &str, format: &str) -> Result<PathBuf> {
    shapes::shape(shape, format).map_err(anyhow::Error::msg)?;
    let dir = home.join("synthetic");
    let path = dir.join(format!("{shape}-{}.gguf", format.to_ascii_lowercase()));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "writing a random-weight {shape} model in {format} to {}",
        path.display()
    );
    pod_node::bench::write_synthetic(&path, shape, format, 1)?;
    Ok(path)
}
