//! `pod bench`: prompt-processing and generation speed of a chat model.

use anyhow::{bail, Result};
use clap::Args;
use pod_node::catalogue::DEFAULT_CHAT_MODEL;
use pod_node::loader;
use pod_node::store::{ModelFormat, ModelStore};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Catalogue name or path to a GGUF file.
    #[arg(long, short, default_value = DEFAULT_CHAT_MODEL)]
    model: String,
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

pub(crate) fn exec(store: &ModelStore, args: BenchArgs) -> Result<()> {
    let resolved = loader::resolve(store, &args.model, true)?;
    if resolved.format != ModelFormat::Gguf {
        bail!("`{}` is not a chat model", args.model);
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens and --reps must be at least 1");
    }
    let report = pod_node::bench::run(
        &resolved.path,
        args.prompt_tokens,
        args.gen_tokens,
        args.reps,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        use pod_node::bench::median;
        println!("model: {}", report.model);
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
