//! `pod`: a peer-to-peer AI node. This file only parses the command line and dispatches.
#![deny(clippy::unwrap_used)]

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use pod_inference::{
    ChatMessage, DeviceSpec, Engine, EngineConfig, GenerateEvent, GenerateRequest, Prompt, Role,
    SamplingParams,
};
use pod_node::backend::Route;
use pod_node::catalogue::{self, CATALOGUE, DEFAULT_CHAT_MODEL};
use pod_node::daemon::{self, DaemonFile, StartOptions};
use pod_node::home::default_home;
use pod_node::identity::Identity;
use pod_node::loader;
use pod_node::mesh::MeshConfig;
use pod_node::profile::Profile;
use pod_node::store::{ModelFormat, ModelStore};

/// A peer-to-peer AI node: local LLM and embedding inference behind an OpenAI-compatible API,
/// shared over a libp2p mesh.
#[derive(Debug, Parser)]
#[command(name = "pod", version, about, long_about = None)]
struct Cli {
    /// State directory (models, identity, config). Default: $POD_HOME, else ~/.local/share/pod.
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Model store. Default: the `models` folder of the state directory.
    #[arg(long, global = true, value_name = "DIR", env = "POD_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `pod_inference=trace` (also RUST_LOG).
    #[arg(long, global = true, default_value = "info", value_name = "FILTER")]
    log: String,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the node: load the profile's models and serve the OpenAI-compatible API.
    Start(StartArgs),
    /// List, download and delete models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Run one prompt through a local model and stream the answer to stdout.
    Infer(InferArgs),
    /// Measure prompt-processing and generation speed of a chat model (like llama-bench).
    Bench(BenchArgs),
    /// Show, export or import the node's identity (its ed25519 key and PeerId).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// List the peers the running node knows: addresses, round-trip time, models, load.
    Peers(PeersArgs),
    /// Work served to and consumed from each peer, from the signed receipt ledger.
    Receipts {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct PeersArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// How commands reach the running node.
#[derive(Debug, Args)]
struct DaemonArgs {
    /// Base URL of the node's API. Default: the address the node in the state directory
    /// recorded, else http://127.0.0.1:8080.
    #[arg(long, value_name = "URL", env = "POD_API")]
    api: Option<String>,
    /// API key, if the node requires one.
    #[arg(long, value_name = "KEY", env = "POD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Print the PeerId and public key (creating the identity on first use).
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the identity, secret key included, as JSON for `pod identity import`.
    Export {
        /// Write to this file (mode 0600) instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Install an identity exported by `pod identity export`.
    Import {
        /// The export file.
        file: PathBuf,
        /// Replace an existing, different identity (its PeerId is lost).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Capabilities: auto, full, inference (chat models), embedding, relay (no local models),
    /// storage.
    #[arg(long, default_value = "auto")]
    profile: Profile,
    /// Model to load instead of the profile's defaults (repeatable): a catalogue name or a path.
    #[arg(long = "model", short = 'm', value_name = "NAME")]
    models: Vec<String>,
    /// Address the API listens on. Anything but loopback needs --api-key-file or --public-api.
    #[arg(long, default_value = "127.0.0.1")]
    api_host: IpAddr,
    /// Port of the API.
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    /// File of accepted API keys, one per line; clients send `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve the API on a non-loopback address without keys (anyone who can reach it can use it).
    #[arg(long)]
    public_api: bool,
    /// Compute device: auto, cpu, cuda[:N], rocm[:N].
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Sequences generated at once; further requests queue.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests allowed to queue before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Seconds in-flight requests may run after ctrl-c or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Do not download missing catalogued models; fail instead.
    #[arg(long)]
    no_pull: bool,
    /// Mesh port: TCP and UDP (QUIC) on every interface. Ignored when --listen is given.
    #[arg(long, default_value_t = pod_node::mesh::DEFAULT_P2P_PORT, value_name = "PORT")]
    p2p_port: u16,
    /// Mesh listen address instead of the --p2p-port defaults (repeatable), e.g.
    /// /ip4/192.168.1.5/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<Multiaddr>,
    /// Address peers can reach this node at, when it is behind port forwarding (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    external_addr: Vec<Multiaddr>,
    /// Peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Do not run requests for peers; this node's models serve only its own API.
    #[arg(long)]
    no_serve_mesh: bool,
    /// Where API requests go: `auto` (local models here, others on the best peer), `local`
    /// (this node's models only), `mesh` (always a peer, even for models held here).
    #[arg(long, default_value = "auto", value_parser = parse_route)]
    route: Route,
    /// Seconds between capability announcements when nothing changes; peers forget a silent
    /// node after three of these.
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    announce_interval: u64,
}

#[derive(Debug, Args)]
struct BenchArgs {
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

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Show the catalogue and which models are downloaded.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download models (verified against their pinned SHA-256).
    Pull {
        /// Catalogue names; see `pod models list`.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete a downloaded model.
    Remove {
        /// Catalogue name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct InferArgs {
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
    /// Compute device: auto, cpu, cuda[:N], rocm[:N].
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            // One line: library errors may carry backtraces (RUST_BACKTRACE) after the message.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .compact()
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

fn run(cli: Cli) -> Result<()> {
    let home = cli.home.unwrap_or_else(default_home);
    let store = match &cli.models_dir {
        Some(dir) => ModelStore::open_dir(dir),
        None => ModelStore::open(&home),
    }
    .with_context(|| format!("cannot open the model store under {}", home.display()))?;
    match cli.command {
        Command::Models(cmd) => models(&store, cmd),
        Command::Start(args) => start(&home, store, args),
        Command::Infer(args) => infer(&home, &store, args),
        Command::Bench(args) => bench(&store, args),
        Command::Identity(cmd) => identity(&home, cmd),
        Command::Peers(args) => peers(&home, args),
        Command::Receipts { json } => receipts(&home, json),
    }
}

fn models(store: &ModelStore, cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List { json } => {
            let rows: Vec<serde_json::Value> = CATALOGUE
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "name": e.name,
                        "kind": match e.format {
                            ModelFormat::Gguf => "chat",
                            ModelFormat::SentenceTransformers => "embedding",
                        },
                        "size": e.size(),
                        "downloaded": store.is_present(e),
                        "path": store.model_dir(e.name),
                        "license": e.license,
                        "description": e.description,
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<10} {:>9}  {:<10} DESCRIPTION",
                    "NAME", "KIND", "SIZE", "STATUS"
                );
                for e in CATALOGUE {
                    println!(
                        "{:<24} {:<10} {:>7} MB  {:<10} {}",
                        e.name,
                        match e.format {
                            ModelFormat::Gguf => "chat",
                            ModelFormat::SentenceTransformers => "embedding",
                        },
                        e.size() / 1_000_000,
                        if store.is_present(e) { "pulled" } else { "-" },
                        e.description
                    );
                }
            }
            Ok(())
        }
        ModelsCommand::Pull { names } => {
            for name in &names {
                let entry = catalogue::find(name).with_context(|| {
                    format!(
                        "unknown model `{name}` (known: {})",
                        CATALOGUE
                            .iter()
                            .map(|e| e.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                let dir = store.pull(entry)?;
                println!("{name}: {}", dir.display());
            }
            Ok(())
        }
        ModelsCommand::Remove { name } => {
            if catalogue::find(&name).is_none() {
                bail!("unknown model `{name}`");
            }
            if store.remove(&name)? {
                println!("removed {name}");
                Ok(())
            } else {
                bail!("model `{name}` is not downloaded")
            }
        }
    }
}

fn infer(home: &std::path::Path, store: &ModelStore, args: InferArgs) -> Result<()> {
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
        let (served_by, mut events) =
            runtime.block_on(infer_on_peer(home, &args.bootstrap, args.wait, request))?;
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
    loader::load_into(&engine, &resolved, args.device)?;
    let mut events = engine.generate(request)?;
    print_completion(|| events.blocking_recv())
}

/// Joins the mesh with a throwaway identity and starts the request on the best peer.
async fn infer_on_peer(
    home: &std::path::Path,
    bootstrap: &[Multiaddr],
    wait: u64,
    request: GenerateRequest,
) -> Result<(String, tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>)> {
    use pod_api::Backend as _;
    let mut peers = bootstrap.to_vec();
    // The node running on this machine, if any, is the nearest way in.
    if let Some(d) = DaemonFile::read(home) {
        let node = daemon_get(
            home,
            &DaemonArgs {
                api: Some(d.api),
                api_key: None,
            },
            pod_api::paths::NODE,
        );
        if let Ok(node) = node {
            let id = node["peer_id"].as_str().unwrap_or_default();
            peers.extend(
                node["listen_addrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str())
                    .filter_map(|a| format!("{a}/p2p/{id}").parse::<Multiaddr>().ok()),
            );
        }
    }
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        listen_optional: Vec::new(),
        bootstrap: peers.clone(),
        mdns: peers.is_empty(),
        ..MeshConfig::default()
    };
    let key = libp2p::identity::Keypair::generate_ed25519();
    let (mesh, event_loop) = pod_node::mesh::new(key, config)?;
    tokio::spawn(event_loop.run());
    let engine = Engine::start(EngineConfig::default());
    let local = pod_api::LocalBackend::new(engine, mesh.peer_id().to_string());
    let backend =
        pod_node::backend::NodeBackend::new(local, mesh, Profile::Relay, None, Route::Mesh);
    let deadline = Instant::now() + Duration::from_secs(wait);
    while !backend
        .models()
        .iter()
        .any(|m| m.info.name == request.model)
    {
        if Instant::now() > deadline {
            bail!(
                "no peer serving `{}` found within {wait} s{}",
                request.model,
                if peers.is_empty() {
                    " (no --bootstrap peer and no local node; relying on mDNS)"
                } else {
                    ""
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let generation = backend.generate(request).await?;
    Ok((generation.served_by, generation.events))
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

fn bench(store: &ModelStore, args: BenchArgs) -> Result<()> {
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

fn start(home: &std::path::Path, store: ModelStore, args: StartArgs) -> Result<()> {
    let (identity, _) = Identity::load_or_create(home)?;
    let api_keys = match &args.api_key_file {
        None => pod_api::ApiKeys::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read API key file {}", path.display()))?;
            let keys = pod_api::ApiKeys::parse(&text);
            if keys.is_empty() {
                bail!("API key file {} holds no keys", path.display());
            }
            keys
        }
    };
    let mesh = mesh_config(&args);
    let opts = StartOptions {
        identity,
        profile: args.profile,
        models: args.models,
        api_host: args.api_host,
        api_port: args.api_port,
        api_keys,
        public_api: args.public_api,
        device: args.device,
        engine: EngineConfig {
            max_active: args.max_batch.max(1),
            max_queue: args.max_queue,
            ..EngineConfig::default()
        },
        pull: !args.no_pull,
        grace: Duration::from_secs(args.shutdown_grace),
        mesh,
        home: home.to_path_buf(),
        serve_mesh: !args.no_serve_mesh,
        route: args.route,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result = runtime.block_on(daemon::run(store, opts));
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}

fn parse_route(s: &str) -> std::result::Result<Route, String> {
    match s {
        "auto" => Ok(Route::Auto),
        "local" => Ok(Route::Local),
        "mesh" => Ok(Route::Mesh),
        other => Err(format!(
            "unknown route `{other}` (expected auto, local or mesh)"
        )),
    }
}

fn mesh_config(args: &StartArgs) -> MeshConfig {
    let (listen, listen_optional) = if args.listen.is_empty() {
        MeshConfig::listen_on_port(args.p2p_port)
    } else {
        (args.listen.clone(), Vec::new())
    };
    let announce_interval = Duration::from_secs(args.announce_interval);
    MeshConfig {
        listen,
        listen_optional,
        external: args.external_addr.clone(),
        bootstrap: args.bootstrap.clone(),
        mdns: !args.no_mdns,
        relay_server: args.profile.relays(),
        announce_interval,
        peer_expiry: announce_interval * 3,
        ..MeshConfig::default()
    }
}

/// A GET of the running node's API, with its JSON answer.
fn daemon_get(home: &std::path::Path, args: &DaemonArgs, path: &str) -> Result<serde_json::Value> {
    let base = args
        .api
        .clone()
        .or_else(|| DaemonFile::read(home).map(|d| d.api))
        .unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build(),
    );
    let mut req = agent.get(&url);
    if let Some(key) = &args.api_key {
        req = req.header("Authorization", &format!("Bearer {key}"));
    }
    let mut res = req
        .call()
        .map_err(|e| anyhow::anyhow!("no pod is running at {base} ({e})"))?;
    let status = res.status();
    let text = res
        .body_mut()
        .read_to_string()
        .with_context(|| format!("cannot read the answer of {url}"))?;
    let body: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        let msg = body["error"]["message"]
            .as_str()
            .unwrap_or("request failed");
        bail!("{url}: {} {msg}", status.as_u16());
    }
    Ok(body)
}

fn peers(home: &std::path::Path, args: PeersArgs) -> Result<()> {
    let body = daemon_get(home, &args.daemon, pod_api::paths::PEERS)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body["data"])?);
        return Ok(());
    }
    let rows = body["data"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no peers");
        return Ok(());
    }
    println!(
        "{:<52} {:<14} {:>8} {:>10} {:>9}  MODELS",
        "PEER", "AGENT", "RTT", "LOAD", "SEEN"
    );
    for p in rows {
        let models: Vec<&str> = p["models"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["name"].as_str()).collect())
            .unwrap_or_default();
        let rtt = p["rtt_ms"]
            .as_f64()
            .map_or("-".to_owned(), |ms| format!("{ms:.1}ms"));
        let load = if p["load"].is_object() {
            format!(
                "{}+{}q",
                p["load"]["active"].as_u64().unwrap_or(0),
                p["load"]["queued"].as_u64().unwrap_or(0)
            )
        } else {
            "-".to_owned()
        };
        let seen = format!(
            "{:.1}s ago",
            p["last_seen_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        println!(
            "{:<52} {:<14} {:>8} {:>10} {:>9}  {}",
            p["peer_id"].as_str().unwrap_or("?"),
            p["agent"].as_str().unwrap_or("-"),
            rtt,
            load,
            seen,
            if models.is_empty() {
                "-".to_owned()
            } else {
                models.join(", ")
            }
        );
    }
    Ok(())
}

fn receipts(home: &std::path::Path, json: bool) -> Result<()> {
    let ledger = pod_node::receipts::Ledger::open(home)?;
    let view = pod_node::backend::receipts_view(&ledger)
        .with_context(|| format!("cannot read {}", ledger.path().display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    if view.data.is_empty() {
        println!("no receipts yet");
    } else {
        println!(
            "{:<52} {:>8} {:>10} {:>10}   {:>8} {:>10} {:>10}",
            "PEER", "SERVED", "PROMPT", "COMPLETION", "CONSUMED", "PROMPT", "COMPLETION"
        );
        for p in &view.data {
            println!(
                "{:<52} {:>8} {:>10} {:>10}   {:>8} {:>10} {:>10}",
                p.peer,
                p.served.requests,
                p.served.prompt_tokens,
                p.served.completion_tokens,
                p.consumed.requests,
                p.consumed.prompt_tokens,
                p.consumed.completion_tokens
            );
        }
    }
    if view.invalid > 0 || view.torn > 0 {
        eprintln!(
            "skipped {} records with bad signatures and {} incomplete lines",
            view.invalid, view.torn
        );
    }
    Ok(())
}

fn identity(home: &std::path::Path, cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Show { json } => {
            let (id, _) = Identity::load_or_create(home)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "peer_id": id.peer_id().to_string(),
                        "public_key": id.public_key_base64(),
                        "type": "ed25519",
                    })
                );
            } else {
                println!("peer id:    {}", id.peer_id());
                println!(
                    "public key: {} (ed25519, protobuf, base64)",
                    id.public_key_base64()
                );
            }
        }
        IdentityCommand::Export { output } => {
            let (id, _) = Identity::load_or_create(home)?;
            let text = serde_json::to_string_pretty(&id.export()?)?;
            match output {
                None => println!("{text}"),
                Some(path) => {
                    write_private(&path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote {} (it holds the secret key; keep it private)",
                        path.display()
                    );
                }
            }
        }
        IdentityCommand::Import { file, force } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let id = Identity::import(home, &text, force)?;
            println!("imported identity {}", id.peer_id());
        }
    }
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}
