//! `pod infer`: one prompt through a local model, or a peer's (`--p2p`), streamed to stdout.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use pod_inference::{
    ChatMessage, DeviceSpec, Engine, EngineConfig, GenerateEvent, GenerateRequest, Prompt, Role,
    SamplingParams,
};
use pod_node::catalogue::DEFAULT_CHAT_MODEL;
use pod_node::loader;
use pod_node::store::{ModelFormat, ModelStore};

use super::mesh_join::{join_mesh, MeshInfer, MeshKeyArg};

#[derive(Debug, Args)]
pub(crate) struct InferArgs {
    /// Catalogue name or path to a GGUF file. Catalogued models are pulled if missing.
    #[arg(long, short, default_value = DEFAULT_CHAT_MODEL)]
    model: String,
    /// The user message (or the raw text with --raw).
    #[arg(long, short)]
    prompt: String,
    /// A system message placed before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as raw text instead of rendering it with the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens less likely than this fraction of the best one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens seen in the last 64 (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed; the same seed and settings give the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute device: auto (the first GPU that opens, else the CPU), cpu, rocm[:N],
    /// cuda[:N], or emulator (pod's GPU kernels run on the CPU; slow, for diagnosis).
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Do not download a missing catalogued model; fail instead.
    #[arg(long)]
    no_pull: bool,
    /// Run the prompt on a peer of the mesh instead of this machine. The mesh is joined through
    /// --bootstrap peers, the running local node (if any) and mDNS.
    #[arg(long, conflicts_with = "local")]
    p2p: bool,
    /// Run the prompt on this machine (the default).
    #[arg(long)]
    local: bool,
    /// With --p2p: a peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(long, value_name = "MULTIADDR", requires = "p2p")]
    bootstrap: Vec<Multiaddr>,
    /// With --p2p: seconds to wait for a peer that serves the model.
    #[arg(long, default_value_t = 15, value_name = "SECONDS", requires = "p2p")]
    wait: u64,
    #[command(flatten)]
    mesh_key: MeshKeyArg,
}

pub(crate) fn exec(home: &Path, store: &ModelStore, args: InferArgs) -> Result<()> {
    let prompt = if args.raw {
        Prompt::Text(args.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new(Role::System, system));
        }
        messages.push(ChatMessage::new(Role::User, args.prompt));
        Prompt::Chat(messages)
    };
    let mut request = GenerateRequest {
        model: args.model.clone(),
        prompt,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            seed: args.seed,
            ..Default::default()
        },
        max_tokens: Some(args.max_tokens),
        stop: args.stop,
        logprobs: None,
        json: false,
        resume: None,
    };
    if args.p2p {
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let (_peers, served_by, mut events) = runtime.block_on(async {
            let peers = MeshInfer::new(join_mesh(home, &args.bootstrap, &args.mesh_key).await?);
            peers.wait_for_model(&request.model, args.wait).await?;
            let (served_by, events) = peers.generate(request).await?;
            anyhow::Ok((peers, served_by, events))
        })?;
        eprintln!("[served by {served_by}]");
        return print_completion(|| runtime.block_on(events.recv()));
    }
    let resolved = loader::resolve(store, &args.model, !args.no_pull)?;
    if resolved.format != ModelFormat::Gguf {
        bail!(
            "`{}` is an embedding model; `pod infer` needs a chat model",
            args.model
        );
    }
    request.model = resolved.name.clone();
    let engine = Engine::start(EngineConfig::default());
    let placement = args
        .device
        .place(&home.join("kernels"))
        .map_err(|e| anyhow::anyhow!("--device {}: {e}", args.device))?;
    loader::load_into(&engine, &resolved, &placement)?;
    let mut events = engine.generate(request)?;
    print_completion(|| events.blocking_recv())
}

/// Streams a completion to stdout and its statistics to stderr.
fn print_completion(mut next: impl FnMut() -> Option<GenerateEvent>) -> Result<()> {
    let started = Instant::now();
    let mut first_token = None;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = next() {
        match event {
            GenerateEvent::Delta { text, .. } => {
                first_token.get_or_insert_with(Instant::now);
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            GenerateEvent::Done {
                finish_reason,
                usage,
            } => {
                writeln!(stdout)?;
                let total = started.elapsed().as_secs_f64();
                let decode = first_token.map_or(total, |t| t.elapsed().as_secs_f64());
                eprintln!(
                    "[{} prompt tokens, {} completion tokens, finish: {}, {:.1} tokens/s]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    finish_reason.as_str(),
                    usage.completion_tokens.saturating_sub(1) as f64 / decode.max(1e-9)
                );
                return Ok(());
            }
            GenerateEvent::Error(e) => bail!(e),
        }
    }
    bail!("the engine stopped before finishing")
}
