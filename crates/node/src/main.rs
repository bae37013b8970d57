//! `pod`: a peer-to-peer AI node. This file parses the command line, layers `config.toml` and
//! the environment under the flags, and runs the command.
#![deny(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use libp2p::Multiaddr;
use pod_inference::{
    ChatMessage, DeviceSpec, Engine, EngineConfig, GenerateEvent, GenerateRequest, Prompt, Role,
    SamplingParams,
};
use pod_node::backend::{NodeBackend, Route};
use pod_node::catalogue::{self, CATALOGUE, DEFAULT_CHAT_MODEL};
use pod_node::config::{self, FileConfig, LogFormat};
use pod_node::daemon::{self, DaemonFile, Liveness, StartOptions};
use pod_node::home::default_home;
use pod_node::identity::Identity;
use pod_node::loader::{self, ResolveError};
use pod_node::mesh::MeshConfig;
use pod_node::profile::{self, Hardware, Profile};
use pod_node::store::{ModelFormat, ModelStore};

/// A peer-to-peer AI node: local LLM and embedding inference behind an OpenAI-compatible API,
/// shared over a libp2p mesh.
#[derive(Debug, Parser)]
#[command(name = "pod", version, about, long_about = None)]
struct Cli {
    /// State directory (models, identity, config, ledger). Default: $POD_HOME, else
    /// ~/.local/share/pod.
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Model store. Default: the `models` folder of the state directory.
    #[arg(long, global = true, value_name = "DIR", env = "POD_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Settings file of `pod start`. Default: config.toml in the state directory (read when it
    /// exists); a file named here must exist.
    #[arg(long, global = true, value_name = "FILE", env = "POD_CONFIG")]
    config: Option<PathBuf>,
    /// CPU threads for inference (default: one per physical core; RAYON_NUM_THREADS also works).
    #[arg(long, global = true, value_name = "N", env = "POD_THREADS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    threads: Option<usize>,
    /// Log filter, e.g. `info`, `debug`, `pod_inference=trace` (RUST_LOG, when set, wins).
    #[arg(
        long,
        global = true,
        default_value = "info",
        value_name = "FILTER",
        env = "POD_LOG"
    )]
    log: String,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "POD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

const START_HELP: &str = "\
Every setting can also come from a POD_* variable (shown as [env: ...]) or from config.toml in the \
state directory (--config FILE for another), under the flag's name with `_` for `-` (`--no-x` \
flags are `x = false`); flags win over variables, variables over the file. deploy/config.example.toml \
documents the keys. `pod start --dry-run` shows the resulting models and services without starting.";

const CHAT_HELP: &str = "\
Type a message and press enter; the answer streams back, and the conversation so far goes with \
each message. /reset forgets it (keeping --system), /exit or ctrl-d ends. With stdin not a \
terminal, each line is one message, and each answer goes to stdout followed by a newline.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the node: load the profile's models, join the mesh, serve the OpenAI-compatible
    /// API. Settings come from flags, then POD_* variables, then config.toml.
    #[command(after_help = START_HELP)]
    Start(StartArgs),
    /// Show the running node: uptime, profile, models, peers, requests, device.
    Status(StatusArgs),
    /// Stop the running node (SIGTERM: in-flight requests finish first).
    Stop(StopArgs),
    /// Chat with a model through the running node (any model of the mesh), streaming answers.
    #[command(after_help = CHAT_HELP)]
    Chat(ChatArgs),
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
    /// Show pod's version and what this binary was built with (target, GPU backends).
    Version {
        /// Print JSON.
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

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
struct StopArgs {
    /// Seconds to wait for the node to exit (it first lets in-flight requests finish, for its
    /// --shutdown-grace).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    timeout: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How commands reach the running node.
#[derive(Debug, Args)]
struct DaemonArgs {
    /// Base URL of a node's API. Default: the address the node running with this state
    /// directory recorded in its daemon.json.
    #[arg(long, value_name = "URL", env = "POD_API")]
    api: Option<String>,
    /// API key, if the node requires one.
    #[arg(long, value_name = "KEY", env = "POD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    /// Model to talk to. Default: the default chat model if the node offers it, else the first
    /// chat model it lists.
    #[arg(long, short)]
    model: Option<String>,
    /// A system message that opens the conversation (kept across /reset).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: the server's.
    #[arg(long)]
    temperature: Option<f32>,
    /// Random seed, for answers that repeat.
    #[arg(long)]
    seed: Option<u64>,
    /// Talk to a peer of the mesh directly, joining it with a throwaway identity, instead of
    /// through the local node's API (which reaches the mesh by itself).
    #[arg(long, conflicts_with_all = ["api", "api_key"])]
    p2p: bool,
    /// With --p2p: a peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(long, value_name = "MULTIADDR", requires = "p2p")]
    bootstrap: Vec<Multiaddr>,
    /// With --p2p: seconds to wait for a peer that serves the model.
    #[arg(long, default_value_t = 15, value_name = "SECONDS", requires = "p2p")]
    wait: u64,
    #[command(flatten)]
    daemon: DaemonArgs,
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

/// The flags of `pod start` (see START_HELP for where else each can come from).
#[derive(Debug, Args)]
struct StartArgs {
    /// Capabilities: auto (picks relay, inference or full from memory and GPU, and logs why),
    /// full, inference (chat models), embedding, relay (no local models), storage.
    #[arg(long, default_value = "auto", env = "POD_PROFILE")]
    profile: Profile,
    /// Model to load instead of the profile's defaults (repeatable): a catalogue name or a path.
    #[arg(
        long = "model",
        short = 'm',
        value_name = "NAME",
        env = "POD_MODELS",
        value_delimiter = ','
    )]
    models: Vec<String>,
    /// Print the models and services this would run, bind nothing and exit.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: print JSON.
    #[arg(long, requires = "dry_run")]
    json: bool,
    /// Run without the HTTP API: the node joins the mesh and serves its models to peers only.
    #[arg(long, env = "POD_NO_API")]
    no_api: bool,
    /// Address the API listens on. Anything but loopback needs --api-key-file or --public-api.
    #[arg(long, default_value = "127.0.0.1", env = "POD_API_HOST")]
    api_host: IpAddr,
    /// Port of the API (0: any free port).
    #[arg(long, default_value_t = 8080, env = "POD_API_PORT")]
    api_port: u16,
    /// File of accepted API keys, one per line; clients send `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE", env = "POD_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve the API on a non-loopback address without keys (anyone who can reach it can use it).
    #[arg(long, env = "POD_PUBLIC_API")]
    public_api: bool,
    /// Web origin whose pages may call the API from a browser (repeatable), e.g.
    /// https://app.example; `*` allows any page and is refused with API keys. Default: none.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        env = "POD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Compute device: auto, cpu, cuda[:N], rocm[:N]. For AMD GPUs the HIP runtime does not
    /// list (e.g. gfx906, MI50), set HSA_OVERRIDE_GFX_VERSION (e.g. 9.0.6).
    #[arg(long, default_value = "auto", env = "POD_DEVICE")]
    device: DeviceSpec,
    /// Sequences generated at once; further requests queue.
    #[arg(long, default_value_t = 8, env = "POD_MAX_BATCH",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_batch: usize,
    /// Longest prompt plus completion per request, in tokens (default: each model's own
    /// context length, at most 8192). Bounds the memory each sequence's cache can take.
    #[arg(long, value_name = "TOKENS", env = "POD_CTX_SIZE",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..))]
    ctx_size: Option<usize>,
    /// Memory for the prompt prefix cache, in MiB: finished requests' attention caches kept so
    /// that requests starting the same way (system prompts, conversations) skip that work.
    #[arg(
        long,
        default_value_t = 256,
        value_name = "MIB",
        env = "POD_PREFIX_CACHE"
    )]
    prefix_cache: usize,
    /// Requests allowed to queue before new ones get 429.
    #[arg(long, default_value_t = 256, env = "POD_MAX_QUEUE")]
    max_queue: usize,
    /// Seconds in-flight requests may run after ctrl-c or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10, env = "POD_SHUTDOWN_GRACE")]
    shutdown_grace: u64,
    /// Do not download missing catalogued models; fail instead.
    #[arg(long, env = "POD_NO_PULL")]
    no_pull: bool,
    /// Mesh port: TCP and UDP (QUIC) on every interface. Ignored when --listen is given.
    #[arg(long, default_value_t = pod_node::mesh::DEFAULT_P2P_PORT, value_name = "PORT",
          env = "POD_P2P_PORT")]
    p2p_port: u16,
    /// Mesh listen address instead of the --p2p-port defaults (repeatable), e.g.
    /// /ip4/192.168.1.5/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<Multiaddr>,
    /// Address peers can reach this node at, when it is behind port forwarding (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_EXTERNAL_ADDR",
        value_delimiter = ','
    )]
    external_addr: Vec<Multiaddr>,
    /// Peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_BOOTSTRAP",
        value_delimiter = ','
    )]
    bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long, env = "POD_NO_MDNS")]
    no_mdns: bool,
    /// Do not run requests for peers; this node's models serve only its own API.
    #[arg(long, env = "POD_NO_SERVE_MESH")]
    no_serve_mesh: bool,
    /// Where API requests go: `auto` (local models here, others on the best peer), `local`
    /// (this node's models only), `mesh` (always a peer, even for models held here).
    #[arg(long, default_value = "auto", value_parser = config::parse_route, env = "POD_ROUTE")]
    route: Route,
    /// Seconds between capability announcements when nothing changes; peers forget a silent
    /// node after three of these.
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600), env = "POD_ANNOUNCE_INTERVAL")]
    announce_interval: u64,
    /// Bytes per second each peer may pull model files at from this node, over all of its
    /// streams (storage and full profiles); 0: no limit.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "BYTES",
        env = "POD_SERVE_RATE"
    )]
    serve_rate: u64,
    /// Serve and pull model files over the mesh's encrypted streams only. By default storage
    /// pods also offer plain TCP bulk connections, opened with a one-time ticket given over the
    /// mesh: about half the CPU per byte; every chunk is still verified against the pinned
    /// SHA-256, only secrecy is given up.
    #[arg(long, env = "POD_NO_BULK")]
    no_bulk: bool,
    /// TCP port for bulk connections, on the mesh's listen IPs; default: the mesh port plus one
    /// (4002), any free port when the mesh port is 0.
    #[arg(long, value_name = "PORT", env = "POD_BULK_PORT")]
    bulk_port: Option<u16>,
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
    /// Show the catalogue, which models are downloaded and, when the node running with this
    /// state directory serves model files (storage and full profiles), which ones it serves
    /// and to how many peers.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download models (verified against their pinned SHA-256): from pods of the mesh that
    /// serve them (storage and full profiles) first, else from the catalogue's sources.
    Pull {
        /// Catalogue names; see `pod models list`.
        #[arg(required = true)]
        names: Vec<String>,
        /// Only the catalogue's sources; do not ask peers.
        #[arg(long)]
        no_peers: bool,
        /// A pod to join the mesh through, ending in /p2p/<PeerId> (repeatable). The node
        /// running with this state directory, if any, is used too; without either, mDNS.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<Multiaddr>,
        /// Seconds to wait for peers that serve the model's files.
        #[arg(long, default_value_t = 3, value_name = "SECONDS")]
        peer_wait: u64,
        /// Only peers: fail, keeping what was fetched for the next pull to resume, rather than
        /// download from the catalogue's sources.
        #[arg(long, conflicts_with = "no_peers")]
        no_sources: bool,
        /// Fetch over mesh streams only (Noise-encrypted), never over the plain TCP bulk
        /// connections storage pods offer for speed (chunks are verified either way).
        #[arg(long)]
        no_bulk: bool,
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
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return usage_error(e),
    };
    set_threads(cli.threads);
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Fixes the inference thread count once, before any pool starts: the kernels' pool and candle
/// read it from the environment (and would otherwise probe the CPU list on every operation).
fn set_threads(threads: Option<usize>) {
    const VARS: [&str; 2] = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"];
    let n = threads
        .or_else(|| {
            VARS.iter()
                .find_map(|v| std::env::var(v).ok()?.parse().ok())
                .filter(|&n: &usize| n > 0)
        })
        .unwrap_or_else(pod_inference::default_threads);
    for var in VARS {
        std::env::set_var(var, n.to_string());
    }
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    // Library errors may carry backtraces (RUST_BACKTRACE) after the message.
    msg.lines().next().unwrap_or_default().to_owned()
}

/// Prints a command-line error as one line (help and version are printed as clap does).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let mut line = String::new();
    for part in text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    eprintln!("{line}");
    ExitCode::from(2)
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
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<()> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    if let Command::Start(args) = cli.command {
        let sub = matches
            .subcommand_matches("start")
            .context("clap lost the `start` arguments")?;
        let global = Global {
            models_dir: cli.models_dir,
            config: cli.config,
            log: cli.log,
            log_format: cli.log_format,
            threads: cli.threads,
        };
        return start(&home, global, args, sub);
    }
    // A conversation at a terminal is no place for the mesh's info lines.
    let quiet = matches!(cli.command, Command::Chat(_)) && given(matches, "log").is_none();
    init_tracing(if quiet { "warn" } else { &cli.log }, cli.log_format);
    let open_store = || -> Result<ModelStore> {
        match &cli.models_dir {
            Some(dir) => ModelStore::open_dir(dir),
            None => ModelStore::open(&home),
        }
        .with_context(|| format!("cannot open the model store under {}", home.display()))
    };
    match cli.command {
        Command::Start(_) => Ok(()),
        Command::Status(args) => status(&home, args),
        Command::Stop(args) => stop(&home, args),
        Command::Chat(args) => chat(&home, args),
        Command::Models(cmd) => models(&home, &open_store()?, cmd),
        Command::Infer(args) => infer(&home, &open_store()?, args),
        Command::Bench(args) => bench(&open_store()?, args),
        Command::Identity(cmd) => identity(&home, cmd),
        Command::Peers(args) => peers(&home, args),
        Command::Receipts { json } => receipts(&home, json),
        Command::Version { json } => version(json),
    }
}

/// The global flags `pod start` layers over `config.toml`.
#[derive(Debug)]
struct Global {
    models_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    log: String,
    log_format: LogFormat,
    threads: Option<usize>,
}

/// Where each effective `pod start` setting came from: `flag`, `env`, `config` or `default`.
type Sources = BTreeMap<&'static str, &'static str>;

/// Whether the user set argument `id` (on the command line or through its variable). Global
/// arguments are in the subcommand's matches too, wherever they were given.
fn given(matches: &ArgMatches, id: &str) -> Option<&'static str> {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => Some("flag"),
        Some(ValueSource::EnvVariable) => Some("env"),
        _ => None,
    }
}

/// Flags and variables win; else the file's value replaces the built-in default in `value`.
fn layer<T>(
    sources: &mut Sources,
    matches: &ArgMatches,
    id: &str,
    key: &'static str,
    value: &mut T,
    file: Option<T>,
) {
    let source = given(matches, id)
        .or_else(|| {
            file.map(|v| {
                *value = v;
                "config"
            })
        })
        .unwrap_or("default");
    sources.insert(key, source);
}

/// Applies `config.toml` under the flags and variables; returns where each setting came from.
fn apply_config(
    args: &mut StartArgs,
    global: &mut Global,
    file: FileConfig,
    m: &ArgMatches,
) -> Sources {
    let mut s = Sources::new();
    layer(
        &mut s,
        m,
        "profile",
        "profile",
        &mut args.profile,
        file.profile,
    );
    layer(&mut s, m, "models", "models", &mut args.models, file.models);
    let mut models_dir = global.models_dir.take();
    layer(
        &mut s,
        m,
        "models_dir",
        "models_dir",
        &mut models_dir,
        file.models_dir.map(Some),
    );
    global.models_dir = models_dir;
    layer(
        &mut s,
        m,
        "no_pull",
        "pull",
        &mut args.no_pull,
        file.pull.map(|b| !b),
    );
    layer(&mut s, m, "device", "device", &mut args.device, file.device);
    layer(
        &mut s,
        m,
        "max_batch",
        "max_batch",
        &mut args.max_batch,
        file.max_batch,
    );
    layer(
        &mut s,
        m,
        "max_queue",
        "max_queue",
        &mut args.max_queue,
        file.max_queue,
    );
    layer(
        &mut s,
        m,
        "no_api",
        "api",
        &mut args.no_api,
        file.api.map(|b| !b),
    );
    layer(
        &mut s,
        m,
        "api_host",
        "api_host",
        &mut args.api_host,
        file.api_host,
    );
    layer(
        &mut s,
        m,
        "api_port",
        "api_port",
        &mut args.api_port,
        file.api_port,
    );
    layer(
        &mut s,
        m,
        "api_key_file",
        "api_key_file",
        &mut args.api_key_file,
        file.api_key_file.map(Some),
    );
    layer(
        &mut s,
        m,
        "public_api",
        "public_api",
        &mut args.public_api,
        file.public_api,
    );
    layer(
        &mut s,
        m,
        "shutdown_grace",
        "shutdown_grace",
        &mut args.shutdown_grace,
        file.shutdown_grace,
    );
    layer(
        &mut s,
        m,
        "p2p_port",
        "p2p_port",
        &mut args.p2p_port,
        file.p2p_port,
    );
    layer(&mut s, m, "listen", "listen", &mut args.listen, file.listen);
    layer(
        &mut s,
        m,
        "external_addr",
        "external_addr",
        &mut args.external_addr,
        file.external_addr,
    );
    layer(
        &mut s,
        m,
        "bootstrap",
        "bootstrap",
        &mut args.bootstrap,
        file.bootstrap,
    );
    layer(
        &mut s,
        m,
        "no_mdns",
        "mdns",
        &mut args.no_mdns,
        file.mdns.map(|b| !b),
    );
    layer(
        &mut s,
        m,
        "no_serve_mesh",
        "serve_mesh",
        &mut args.no_serve_mesh,
        file.serve_mesh.map(|b| !b),
    );
    layer(&mut s, m, "route", "route", &mut args.route, file.route);
    layer(
        &mut s,
        m,
        "announce_interval",
        "announce_interval",
        &mut args.announce_interval,
        file.announce_interval,
    );
    layer(
        &mut s,
        m,
        "serve_rate",
        "serve_rate",
        &mut args.serve_rate,
        file.serve_rate,
    );
    layer(
        &mut s,
        m,
        "no_bulk",
        "bulk",
        &mut args.no_bulk,
        file.bulk.map(|b| !b),
    );
    layer(
        &mut s,
        m,
        "bulk_port",
        "bulk_port",
        &mut args.bulk_port,
        file.bulk_port.map(Some),
    );
    layer(
        &mut s,
        m,
        "threads",
        "threads",
        &mut global.threads,
        file.threads.map(Some),
    );
    layer(
        &mut s,
        m,
        "ctx_size",
        "ctx_size",
        &mut args.ctx_size,
        file.ctx_size.map(Some),
    );
    layer(
        &mut s,
        m,
        "prefix_cache",
        "prefix_cache",
        &mut args.prefix_cache,
        file.prefix_cache,
    );
    layer(&mut s, m, "log", "log", &mut global.log, file.log);
    layer(
        &mut s,
        m,
        "log_format",
        "log_format",
        &mut global.log_format,
        file.log_format,
    );
    s
}

/// What `pod start` would run, from the layered settings: everything but the bound sockets.
#[derive(Debug)]
struct Plan {
    profile: profile::Choice,
    models: Vec<PlannedModel>,
    device_name: String,
    api_keys: pod_api::ApiKeys,
    mesh: MeshConfig,
}

/// A model `pod start` would load.
#[derive(Debug, serde::Serialize)]
struct PlannedModel {
    /// As given: catalogue name or path.
    name: String,
    /// `chat` or `embedding`.
    kind: &'static str,
    /// Bytes on disk (or to download), when known.
    size: Option<u64>,
    /// Whether it is on disk already.
    downloaded: bool,
}

fn start(home: &Path, mut global: Global, mut args: StartArgs, m: &ArgMatches) -> Result<()> {
    let config_path = global
        .config
        .clone()
        .unwrap_or_else(|| config::default_path(home));
    let file = FileConfig::load(&config_path, global.config.is_some())?;
    let config_found = file.is_some();
    let sources = apply_config(&mut args, &mut global, file.unwrap_or_default(), m);
    // The file may set the thread count; nothing has started a thread pool yet.
    set_threads(global.threads);
    init_tracing(&global.log, global.log_format);
    let store = match &global.models_dir {
        Some(dir) => ModelStore::open_dir(dir),
        None => ModelStore::open(home),
    }
    .with_context(|| format!("cannot open the model store under {}", home.display()))?;

    let plan = plan(&store, &args)?;
    if args.profile == Profile::Auto {
        tracing::info!(
            profile = %plan.profile.profile,
            reason = %plan.profile.reason,
            "profile auto picked {}",
            plan.profile.profile
        );
    }
    if args.dry_run {
        let config_file = serde_json::json!({
            "path": config_path,
            "found": config_found,
        });
        return print_plan(&args, &plan, config_file, &sources);
    }

    let (identity, _) = Identity::load_or_create(home)?;
    let bulk_listen = bulk_listen(&args, &plan.mesh, plan.profile.profile);
    let opts = StartOptions {
        identity,
        profile: plan.profile.profile,
        models: plan.models.iter().map(|m| m.name.clone()).collect(),
        api: !args.no_api,
        api_host: args.api_host,
        api_port: args.api_port,
        api_keys: plan.api_keys,
        public_api: args.public_api,
        cors_origins: args.cors_origins.clone(),
        device: args.device,
        device_name: plan.device_name,
        engine: EngineConfig {
            max_active: args.max_batch.max(1),
            max_queue: args.max_queue,
            max_context: args.ctx_size,
            prefix_cache_bytes: args.prefix_cache << 20,
            ..EngineConfig::default()
        },
        pull: !args.no_pull,
        grace: Duration::from_secs(args.shutdown_grace),
        mesh: plan.mesh,
        home: home.to_path_buf(),
        serve_mesh: !args.no_serve_mesh,
        route: args.route,
        serve_rate: args.serve_rate,
        bulk_listen,
        pull_bulk: !args.no_bulk,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result = runtime.block_on(daemon::run(store, opts));
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}

/// Resolves the profile, models, device and keys, and checks them as `pod start` would.
fn plan(store: &ModelStore, args: &StartArgs) -> Result<Plan> {
    let hardware = Hardware::detect(args.device);
    let choice = args.profile.choose(&hardware);
    let names: Vec<String> = if args.models.is_empty() {
        choice
            .profile
            .default_models()
            .into_iter()
            .map(str::to_owned)
            .collect()
    } else {
        args.models.clone()
    };
    let mut models = Vec::new();
    for name in names {
        models.push(plan_model(store, &name, !args.no_pull)?);
    }
    let device_name = if models.is_empty() {
        "none".to_owned()
    } else {
        open_device(args.device)?
    };
    let api_keys = match &args.api_key_file {
        Some(path) if !args.no_api => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read API key file {}", path.display()))?;
            let keys = pod_api::ApiKeys::parse(&text);
            if keys.is_empty() {
                bail!("API key file {} holds no keys", path.display());
            }
            keys
        }
        _ => pod_api::ApiKeys::default(),
    };
    daemon::check_api_exposure(!args.no_api, args.api_host, &api_keys, args.public_api)?;
    Ok(Plan {
        mesh: mesh_config(args, choice.profile),
        profile: choice,
        models,
        device_name,
        api_keys,
    })
}

fn plan_model(store: &ModelStore, name: &str, pull: bool) -> Result<PlannedModel> {
    let kind = |f: ModelFormat| match f {
        ModelFormat::Gguf => "chat",
        ModelFormat::SentenceTransformers => "embedding",
    };
    match loader::resolve(store, name, false) {
        Ok(resolved) => Ok(PlannedModel {
            name: name.to_owned(),
            kind: kind(resolved.format),
            size: catalogue::find(name)
                .map(|e| e.size())
                .or_else(|| std::fs::metadata(&resolved.path).ok().map(|m| m.len())),
            downloaded: true,
        }),
        Err(ResolveError::NotPulled(_)) if pull => {
            let entry = catalogue::find(name).context("a catalogued model left the catalogue")?;
            Ok(PlannedModel {
                name: name.to_owned(),
                kind: kind(entry.format),
                size: Some(entry.size()),
                downloaded: false,
            })
        }
        Err(e) => Err(anyhow!("cannot load model `{name}`: {e}")),
    }
}

/// Opens the device once to say which it is (`auto` resolved) and to fail before binding
/// anything when its backend is missing.
fn open_device(spec: DeviceSpec) -> Result<String> {
    if let DeviceSpec::Rocm(_) = spec {
        // The HIP runtime reads it itself; pod passes the environment through untouched.
        if let Some(v) = std::env::var_os("HSA_OVERRIDE_GFX_VERSION") {
            tracing::info!(
                hsa_override_gfx_version = %v.to_string_lossy(),
                "ROCm: HSA_OVERRIDE_GFX_VERSION is set; the HIP runtime will treat the GPU as that gfx version"
            );
        }
    }
    let device = spec.open().map_err(|e| anyhow!("--device {spec}: {e}"))?;
    Ok(match spec {
        _ if device.is_cpu() => "cpu".to_owned(),
        // `auto` opens the first GPU.
        DeviceSpec::Auto => DeviceSpec::Cuda(0).to_string(),
        other => other.to_string(),
    })
}

fn mesh_config(args: &StartArgs, profile: Profile) -> MeshConfig {
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
        relay_server: profile.relays(),
        announce_interval,
        peer_expiry: announce_interval * 3,
        ..MeshConfig::default()
    }
}

/// Where a pod that serves files listens for bulk connections: every IP its mesh listens on,
/// at `--bulk-port`, else the first mesh port plus one (any free port when that is 0 or
/// 65535). Empty with `--no-bulk` and for profiles that serve no files.
fn bulk_listen(args: &StartArgs, mesh: &MeshConfig, profile: Profile) -> Vec<SocketAddr> {
    use libp2p::multiaddr::Protocol;
    if args.no_bulk || !profile.serves_files() {
        return Vec::new();
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in mesh.listen.iter().chain(&mesh.listen_optional) {
        let (mut ip, mut port) = (None, None);
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
                Protocol::Tcp(p) | Protocol::Udp(p) => port = Some(p),
                _ => {}
            }
        }
        let (Some(ip), Some(port)) = (ip, port) else {
            continue;
        };
        if out.iter().all(|a| a.ip() != ip) {
            let port = args.bulk_port.unwrap_or_else(|| {
                if port == 0 {
                    0
                } else {
                    port.checked_add(1).unwrap_or(0)
                }
            });
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

fn print_plan(
    args: &StartArgs,
    plan: &Plan,
    config_file: serde_json::Value,
    sources: &Sources,
) -> Result<()> {
    let strings = |v: &[Multiaddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let serve_mesh = !args.no_serve_mesh && !plan.models.is_empty();
    let api_url = format!(
        "http://{}",
        std::net::SocketAddr::new(args.api_host, args.api_port)
    );
    let auth = if plan.api_keys.is_empty() {
        "none"
    } else {
        "api-key"
    };
    let json = serde_json::json!({
        "profile": plan.profile.profile.as_str(),
        "requested_profile": args.profile.as_str(),
        "reason": (!plan.profile.reason.is_empty()).then_some(&plan.profile.reason),
        "models": plan.models,
        "device": { "requested": args.device.to_string(), "resolved": plan.device_name },
        "api": {
            "enabled": !args.no_api,
            "url": (!args.no_api).then_some(&api_url),
            "host": args.api_host,
            "port": args.api_port,
            "auth": auth,
        },
        "mesh": {
            "listen": strings(&plan.mesh.listen),
            "listen_optional": strings(&plan.mesh.listen_optional),
            "external": strings(&plan.mesh.external),
            "bootstrap": strings(&plan.mesh.bootstrap),
            "mdns": plan.mesh.mdns,
            "relay_server": plan.mesh.relay_server,
            "serve_mesh": serve_mesh,
            "announce_interval_seconds": args.announce_interval,
        },
        "storage": plan.profile.profile.serves_files(),
        "serve_rate_bytes_per_second": args.serve_rate,
        "bulk_listen": bulk_listen(args, &plan.mesh, plan.profile.profile)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        "pull_bulk": !args.no_bulk,
        "route": config::route_name(args.route),
        "engine": {
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
            "ctx_size": args.ctx_size,
            "prefix_cache_mib": args.prefix_cache,
        },
        "shutdown_grace_seconds": args.shutdown_grace,
        "config_file": config_file,
        "sources": sources,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    let p = plan.profile.profile;
    if args.profile == Profile::Auto {
        println!("profile   {p} (auto: {})", plan.profile.reason);
    } else {
        println!("profile   {p}: {}", p.summary());
    }
    if plan.models.is_empty() {
        println!("models    none");
    }
    for (i, model) in plan.models.iter().enumerate() {
        println!(
            "{:<10}{:<28} {:<10} {:>9}  {}",
            if i == 0 { "models" } else { "" },
            model.name,
            model.kind,
            model
                .size
                .map_or("-".to_owned(), |s| format!("{} MB", s / 1_000_000)),
            if model.downloaded {
                "downloaded"
            } else {
                "to download"
            }
        );
    }
    println!("device    {} (--device {})", plan.device_name, args.device);
    if args.no_api {
        println!("API       none (--no-api)");
    } else {
        println!(
            "API       {api_url}/v1 and /health, /metrics, /pod/v1/*; API keys: {}",
            if plan.api_keys.is_empty() {
                "none".to_owned()
            } else {
                format!("{} accepted", plan.api_keys.len())
            }
        );
    }
    if args.listen.is_empty() {
        println!(
            "mesh      TCP and UDP (QUIC) port {} on every interface",
            args.p2p_port
        );
    } else {
        println!("mesh      {}", strings(&plan.mesh.listen).join(", "));
    }
    if !plan.mesh.external.is_empty() {
        println!("external  {}", strings(&plan.mesh.external).join(", "));
    }
    if !plan.mesh.bootstrap.is_empty() {
        println!("bootstrap {}", strings(&plan.mesh.bootstrap).join(", "));
    }
    println!("mDNS      {}", if plan.mesh.mdns { "on" } else { "off" });
    println!(
        "relay     {} (circuit relay server for pods behind NAT)",
        yes(plan.mesh.relay_server)
    );
    println!(
        "serving   {} (this node's models to peers)",
        yes(serve_mesh)
    );
    println!("storage   {} (model files to peers)", yes(p.serves_files()));
    let bulk = bulk_listen(args, &plan.mesh, p);
    if let Some(first) = bulk.first() {
        println!(
            "bulk      TCP {} (plain connections for model files, opened with tickets from the mesh)",
            match first.port() {
                0 => format!("any free port on {}", first.ip()),
                port => format!("port {port} on {}", first.ip()),
            }
        );
    }
    println!("routing   {}", config::route_name(args.route));
    println!(
        "config    {} ({})",
        config_file["path"].as_str().unwrap_or("?"),
        if config_file["found"] == true {
            "read"
        } else {
            "not found"
        }
    );
    let changed: Vec<String> = sources
        .iter()
        .filter(|(_, s)| **s != "default")
        .map(|(k, s)| format!("{k} ({s})"))
        .collect();
    if !changed.is_empty() {
        println!("set by    {}", changed.join(", "));
    }
    Ok(())
}

/// A client of a node's HTTP API.
#[derive(Debug)]
struct Api {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn new(base: &str, key: Option<String>) -> Api {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build(),
        );
        Api {
            base: base.trim_end_matches('/').to_owned(),
            key,
            agent,
        }
    }

    /// GET `path`: the status and the body.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut res = req
            .call()
            .map_err(|e| anyhow!("no pod answers at {} ({e})", self.base))?;
        let text = res
            .body_mut()
            .read_to_string()
            .with_context(|| format!("cannot read the answer of {}{path}", self.base))?;
        Ok((res.status().as_u16(), text))
    }

    /// GET `path` as JSON; a non-2xx status is an error carrying the API's message.
    fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, text) = self.get(path)?;
        let url = format!("{}{path}", self.base);
        let body: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
        if !(200..300).contains(&status) {
            let msg = body["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            bail!("{url}: {status} {msg}");
        }
        Ok(body)
    }
}

/// The node this state directory's `daemon.json` names, or the one `--api` names.
#[derive(Debug)]
struct Located {
    /// Its API; `None` for a node running with `--no-api`.
    api: Option<Api>,
    /// Its `daemon.json`, when it is the node running with this state directory.
    daemon: Option<DaemonFile>,
}

fn locate(home: &Path, args: &DaemonArgs) -> Result<Located> {
    let recorded = DaemonFile::read(home).filter(|d| d.liveness() == Liveness::Running);
    if let Some(url) = &args.api {
        let same = |d: &DaemonFile| {
            d.api
                .as_deref()
                .is_some_and(|a| a.trim_end_matches('/') == url.trim_end_matches('/'))
        };
        return Ok(Located {
            api: Some(Api::new(url, args.api_key.clone())),
            daemon: recorded.filter(same),
        });
    }
    let d = running_daemon(home)?;
    Ok(Located {
        api: d.api.as_deref().map(|a| Api::new(a, args.api_key.clone())),
        daemon: Some(d),
    })
}

/// The `daemon.json` of the node running with this state directory; "no pod is running"
/// when there is none or it is stale.
fn running_daemon(home: &Path) -> Result<DaemonFile> {
    let path = DaemonFile::path(home);
    let Some(d) = DaemonFile::read(home) else {
        bail!(
            "no pod is running (no {}); start one with `pod start`, or pass --api URL for a pod elsewhere",
            path.display()
        );
    };
    match d.liveness() {
        Liveness::Running => Ok(d),
        Liveness::Exited | Liveness::Replaced => bail!(
            "no pod is running (process {} recorded in {} has exited)",
            d.pid,
            path.display()
        ),
    }
}

/// The node's API, or an error saying it has none.
fn require_api(located: &Located) -> Result<&Api> {
    located.api.as_ref().ok_or_else(|| {
        anyhow!(
            "the pod running here (pid {}) has no HTTP API (--no-api)",
            located.daemon.as_ref().map_or(0, |d| d.pid)
        )
    })
}

/// Sums the samples of metric `name` whose labels pass `keep`, in Prometheus text format.
fn metric_sum(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && keep(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>() as u64
}

fn status(home: &Path, args: StatusArgs) -> Result<()> {
    let located = locate(home, &args.daemon)?;
    let daemon = located.daemon.as_ref();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = serde_json::json!({
        "running": true,
        "pid": daemon.map(|d| d.pid),
        "api": located.api.as_ref().map(|a| &a.base),
        "device": daemon.map(|d| &d.device).filter(|d| !d.is_empty()),
    });
    match &located.api {
        None => {
            let d = daemon.context("a pod without an API has a daemon.json")?;
            out["peer_id"] = d.peer_id.clone().into();
            out["version"] = format!("pod/{}", d.version).into();
            out["profile"] = d.profile.clone().into();
            out["uptime_seconds"] = now.saturating_sub(d.started_at).into();
        }
        Some(api) => {
            let (health, _) = api.get(pod_api::paths::HEALTH)?;
            let node = api.get_json(pod_api::paths::NODE)?;
            let models = api.get_json(pod_api::paths::MODELS)?;
            let (_, metrics) = api.get(pod_api::paths::METRICS)?;
            let peer_id = node["peer_id"].as_str().unwrap_or_default();
            if daemon.is_some_and(|d| d.peer_id != peer_id) {
                out["pid"] = serde_json::Value::Null;
                out["device"] = serde_json::Value::Null;
            }
            let models: Vec<serde_json::Value> = models["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    serde_json::json!({
                        "name": m["id"],
                        "kind": m["kind"],
                        "local": m["owned_by"] == peer_id,
                        "providers": m["providers"],
                    })
                })
                .collect();
            let generation = |labels: &str| {
                ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
                    .iter()
                    .any(|r| labels.contains(&format!("route=\"{r}\"")))
                    && labels.contains("status=\"2")
            };
            out["ready"] = (health == 200).into();
            out["peer_id"] = node["peer_id"].clone();
            out["version"] = node["agent"].clone();
            out["profile"] = node["profile"].clone();
            out["uptime_seconds"] = node["uptime_seconds"].clone();
            out["models"] = models.into();
            out["peers"] = serde_json::json!({
                "connected": node["connected_peers"],
                "known": node["known_peers"],
            });
            out["requests"] = serde_json::json!({
                "queued": metric_sum(&metrics, "pod_queue_depth", |_| true),
                "active": metric_sum(&metrics, "pod_active_sequences", |_| true),
                "served": metric_sum(&metrics, "pod_http_requests_total", generation),
            });
            out["tokens"] = serde_json::json!({
                "prompt": metric_sum(&metrics, "pod_prompt_tokens_total", |_| true),
                "completion": metric_sum(&metrics, "pod_completion_tokens_total", |_| true),
            });
            out["nat_status"] = node["nat_status"].clone();
            out["listen_addrs"] = node["listen_addrs"].clone();
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "pod       {}{}, {}, up {}",
        s(&out["peer_id"]),
        out["pid"]
            .as_u64()
            .map_or(String::new(), |p| format!(" (pid {p})")),
        match out["ready"].as_bool() {
            Some(true) => "ready",
            Some(false) => "loading models",
            None => "running",
        },
        human_duration(n(&out["uptime_seconds"]))
    );
    println!("version   {}", s(&out["version"]));
    println!(
        "api       {}",
        out["api"].as_str().unwrap_or("none (--no-api)")
    );
    println!("profile   {}", s(&out["profile"]));
    println!("device    {}", s(&out["device"]));
    if let Some(models) = out["models"].as_array() {
        let list: Vec<String> = models
            .iter()
            .map(|m| {
                let place = if m["local"] == true {
                    "here".to_owned()
                } else {
                    match n(&m["providers"]) {
                        1 => "1 peer".to_owned(),
                        p => format!("{p} peers"),
                    }
                };
                format!("{} ({}, {place})", s(&m["name"]), s(&m["kind"]))
            })
            .collect();
        println!(
            "models    {}",
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(", ")
            }
        );
        println!(
            "peers     {} connected, {} known",
            n(&out["peers"]["connected"]),
            n(&out["peers"]["known"])
        );
        println!(
            "requests  {} queued, {} active, {} served",
            n(&out["requests"]["queued"]),
            n(&out["requests"]["active"]),
            n(&out["requests"]["served"])
        );
    }
    Ok(())
}

fn human_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn stop(home: &Path, args: StopArgs) -> Result<()> {
    let d = DaemonFile::read(home).ok_or_else(|| {
        anyhow!(
            "no pod is running (no {})",
            DaemonFile::path(home).display()
        )
    })?;
    if d.liveness() != Liveness::Running {
        DaemonFile::remove_stale(home);
        bail!(
            "no pod is running (process {} recorded in {} has exited)",
            d.pid,
            DaemonFile::path(home).display()
        );
    }
    // Make sure the pid is that node before signalling it: its API must answer with the
    // recorded PeerId. Without an API (or when it does not answer), the process start time in
    // daemon.json must match, which rules out a reused pid.
    let api_check = d.api.as_deref().map(|url| {
        let api = Api::new(url, std::env::var("POD_API_KEY").ok());
        match api.get(pod_api::paths::NODE) {
            Ok((200, text)) => {
                let node: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if node["peer_id"] == d.peer_id.as_str() {
                    Ok(())
                } else {
                    Err(format!(
                        "{url} answers as {}, not as {} recorded in daemon.json",
                        node["peer_id"], d.peer_id
                    ))
                }
            }
            Ok((status, _)) => Err(format!("{url} answers {status}")),
            Err(e) => Err(e.to_string()),
        }
    });
    match api_check {
        Some(Ok(())) => {}
        _ if d.process_start.is_some() => {}
        Some(Err(e)) => bail!("not stopping pid {}: {e}", d.pid),
        None => bail!(
            "not stopping pid {}: it has no API to confirm it is the pod of {}",
            d.pid,
            home.display()
        ),
    }
    let started = Instant::now();
    d.terminate().map_err(|e| {
        anyhow!(
            "cannot signal pid {}: {e}{}",
            d.pid,
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (it runs as another user: use sudo, or `systemctl stop pod` for the service)"
            } else {
                ""
            }
        )
    })?;
    let deadline = started + Duration::from_secs(args.timeout);
    while d.liveness() == Liveness::Running {
        if Instant::now() >= deadline {
            bail!(
                "pod (pid {}) did not stop within {} s; it may still be finishing requests",
                d.pid,
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "stopped": true,
                "pid": d.pid,
                "peer_id": d.peer_id,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "stopped pod {} (pid {}) in {seconds:.1} s",
            d.peer_id, d.pid
        );
    }
    Ok(())
}

fn version(json: bool) -> Result<()> {
    let target = format!(
        "{}-{}{}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        if cfg!(target_env = "gnu") {
            "-gnu"
        } else if cfg!(target_env = "musl") {
            "-musl"
        } else {
            ""
        }
    );
    let cpu_features: Vec<&str> = [
        ("avx2", cfg!(target_feature = "avx2")),
        ("fma", cfg!(target_feature = "fma")),
        ("f16c", cfg!(target_feature = "f16c")),
        ("avx512f", cfg!(target_feature = "avx512f")),
        ("neon", cfg!(target_feature = "neon")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let cuda = cfg!(feature = "cuda");
    let info = serde_json::json!({
        "name": "pod",
        "version": env!("CARGO_PKG_VERSION"),
        "agent": pod_node::mesh::agent_version(),
        "target": target,
        "debug_build": cfg!(debug_assertions),
        "features": { "cuda": cuda, "rocm": false },
        "cpu_features": cpu_features,
        "protocols": {
            "infer": pod_node::infer::PROTOCOL.to_string(),
            "kad": pod_node::mesh::KAD_PROTOCOL.to_string(),
            "capabilities_topic": pod_node::mesh::capability::CAPABILITY_TOPIC,
            "api": "openai/v1",
        },
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let on = |b: bool| if b { "on" } else { "off" };
    println!("pod {}", env!("CARGO_PKG_VERSION"));
    println!(
        "target    {target}{}",
        if cfg!(debug_assertions) {
            " (debug build)"
        } else {
            ""
        }
    );
    println!("cuda      {}", on(cuda));
    println!("rocm      off (not available in this version)");
    println!(
        "cpu       {}",
        if cpu_features.is_empty() {
            "baseline".to_owned()
        } else {
            cpu_features.join(", ")
        }
    );
    println!(
        "protocols {}, {}, {}",
        pod_node::infer::PROTOCOL,
        pod_node::mesh::KAD_PROTOCOL,
        pod_node::mesh::capability::CAPABILITY_TOPIC
    );
    Ok(())
}

/// Where `pod chat` sends the conversation.
enum ChatVia {
    /// The local node's API, which routes to the mesh by itself.
    Api { api: Api, agent: ureq::Agent },
    /// A peer of the mesh, joined in this process.
    Mesh(Box<MeshChat>),
}

/// A mesh client living in this process for the length of a conversation.
struct MeshChat {
    runtime: tokio::runtime::Runtime,
    backend: NodeBackend,
}

/// How an answer ended.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    text: String,
    /// `stop`, `length`...
    finish_reason: String,
}

fn chat(home: &Path, args: ChatArgs) -> Result<()> {
    let (via, model) = if args.p2p {
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_CHAT_MODEL.to_owned());
        let backend = runtime.block_on(async {
            let (backend, peers) = join_mesh(home, &args.bootstrap).await?;
            wait_for_model(&backend, &model, args.wait, peers.is_empty()).await?;
            anyhow::Ok(backend)
        })?;
        (
            ChatVia::Mesh(Box::new(MeshChat { runtime, backend })),
            model,
        )
    } else {
        let located = locate(home, &args.daemon)?;
        let api = require_api(&located)?;
        let api = Api::new(&api.base, api.key.clone());
        let model = chat_model(&api, args.model.as_deref())?;
        // No overall timeout: an answer streams for as long as it takes; the server sends
        // keep-alive comments, so a silent minute means the node is gone.
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(300)))
                .timeout_per_read(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build(),
        );
        (ChatVia::Api { api, agent }, model)
    };

    let interactive = std::io::stdin().is_terminal();
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new(Role::System, s.clone()))
        .collect();
    let mut history = opening.clone();
    if interactive {
        eprintln!(
            "chatting with {model}{}; /reset starts over, /exit or ctrl-d ends",
            match &via {
                ChatVia::Api { api, .. } => format!(" through {}", api.base),
                ChatVia::Mesh(_) => " on the mesh".to_owned(),
            }
        );
    }
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            if interactive {
                eprintln!();
            }
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.clone_from(&opening);
                if interactive {
                    eprintln!("(conversation reset)");
                }
                continue;
            }
            "/help" => {
                eprintln!("/reset forgets the conversation; /exit or ctrl-d ends");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new(Role::User, text));
        let mut out = Tally {
            out: std::io::stdout().lock(),
            bytes: 0,
        };
        let answer = match &via {
            ChatVia::Api { api, agent } => {
                chat_over_api(api, agent, &model, &history, &args, &mut out)
            }
            ChatVia::Mesh(mesh) => mesh.runtime.block_on(chat_on_mesh(
                &mesh.backend,
                &model,
                &history,
                &args,
                &mut out,
            )),
        };
        if answer.is_ok() || out.bytes > 0 {
            writeln!(out.out)?;
            out.out.flush()?;
        }
        match answer {
            Ok(answer) => {
                if answer.finish_reason == "length" {
                    eprintln!("[cut at --max-tokens {}]", args.max_tokens);
                }
                history.push(ChatMessage::new(Role::Assistant, answer.text));
            }
            // At a terminal, one failed answer does not end the conversation.
            Err(e) if interactive => {
                eprintln!("error: {e:#}");
                history.pop();
            }
            Err(e) => return Err(e),
        }
    }
}

/// A writer that counts what passes through.
struct Tally<W> {
    out: W,
    bytes: usize,
}

impl<W: Write> Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `wanted` if the node or its mesh offers it as a chat model; with none wanted, the default
/// chat model if offered, else the first chat model listed.
fn chat_model(api: &Api, wanted: Option<&str>) -> Result<String> {
    let models = api.get_json(pod_api::paths::MODELS)?;
    let chat: Vec<&str> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["kind"] == "chat")
        .filter_map(|m| m["id"].as_str())
        .collect();
    if let Some(wanted) = wanted {
        if chat.contains(&wanted) {
            return Ok(wanted.to_owned());
        }
        bail!(
            "no chat model `{wanted}` on the pod at {} or its peers (chat models: {})",
            api.base,
            if chat.is_empty() {
                "none".to_owned()
            } else {
                chat.join(", ")
            }
        );
    }
    chat.iter()
        .find(|m| **m == DEFAULT_CHAT_MODEL)
        .or(chat.first())
        .map(|m| (*m).to_owned())
        .ok_or_else(|| {
            anyhow!(
                "the pod at {} has no chat model, and no peer offers one",
                api.base
            )
        })
}

/// One answer through `/v1/chat/completions` with `stream: true`, written to `out` as it comes.
fn chat_over_api(
    api: &Api,
    agent: &ureq::Agent,
    model: &str,
    history: &[ChatMessage],
    args: &ChatArgs,
    out: &mut impl Write,
) -> Result<Answer> {
    let mut body = serde_json::json!({
        "model": model,
        "messages": history,
        "stream": true,
        "max_tokens": args.max_tokens,
    });
    if let Some(t) = args.temperature {
        body["temperature"] = t.into();
    }
    if let Some(s) = args.seed {
        body["seed"] = s.into();
    }
    let url = format!("{}{}", api.base, pod_api::paths::CHAT_COMPLETIONS);
    let mut req = agent.post(&url).header("Content-Type", "application/json");
    if let Some(key) = &api.key {
        req = req.header("Authorization", &format!("Bearer {key}"));
    }
    let res = req
        .send(body.to_string())
        .map_err(|e| anyhow!("no pod answers at {} ({e})", api.base))?;
    let status = res.status().as_u16();
    if !(200..300).contains(&status) {
        let text = res.into_body().read_to_string().unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        bail!(
            "{status} {}",
            body["error"]["message"].as_str().unwrap_or(&text)
        );
    }
    let reader = std::io::BufReader::new(res.into_body().into_reader());
    let mut answer = Answer {
        text: String::new(),
        finish_reason: String::new(),
    };
    for line in reader.lines() {
        let line = line.context("the answer stream broke")?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(answer);
        }
        let chunk: serde_json::Value =
            serde_json::from_str(data).context("the answer stream is not JSON")?;
        if let Some(msg) = chunk["error"]["message"].as_str() {
            bail!("{msg}");
        }
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            out.write_all(text.as_bytes())?;
            out.flush()?;
            answer.text.push_str(text);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            reason.clone_into(&mut answer.finish_reason);
        }
    }
    bail!("the answer stream ended early")
}

/// One answer from a peer of the mesh, written to `out` as it comes.
async fn chat_on_mesh(
    backend: &NodeBackend,
    model: &str,
    history: &[ChatMessage],
    args: &ChatArgs,
    out: &mut impl Write,
) -> Result<Answer> {
    use pod_api::Backend as _;
    let mut sampling = SamplingParams {
        seed: args.seed,
        ..Default::default()
    };
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    let request = GenerateRequest {
        model: model.to_owned(),
        prompt: Prompt::Chat(history.to_vec()),
        sampling,
        max_tokens: Some(args.max_tokens),
        stop: Vec::new(),
        logprobs: None,
        json: false,
        resume: None,
    };
    let mut generation = backend.generate(request).await?;
    let mut text = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerateEvent::Delta { text: delta, .. } => {
                out.write_all(delta.as_bytes())?;
                out.flush()?;
                text.push_str(&delta);
            }
            GenerateEvent::Done { finish_reason, .. } => {
                return Ok(Answer {
                    text,
                    finish_reason: finish_reason.as_str().to_owned(),
                })
            }
            GenerateEvent::Error(e) => bail!(e),
        }
    }
    bail!("the peer stopped before finishing")
}

fn models(home: &Path, store: &ModelStore, cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List { json } => {
            let served = served_files(home);
            // Per model: whether the running node serves every file of it, and to how many
            // peers (the most of any one of its files).
            let serving = |e: &catalogue::CatalogueEntry| -> Option<u64> {
                let served = served.as_ref()?;
                e.files
                    .iter()
                    .map(|f| served.get(f.sha256).copied())
                    .try_fold(0, |most, peers| Some(most.max(peers?)))
            };
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
                        "serving": serving(e).is_some(),
                        "peers_served": serving(e).unwrap_or(0),
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
                    "{:<24} {:<10} {:>9}  {:<10} {:<14} DESCRIPTION",
                    "NAME", "KIND", "SIZE", "STATUS", "SERVED"
                );
                for e in CATALOGUE {
                    println!(
                        "{:<24} {:<10} {:>7} MB  {:<10} {:<14} {}",
                        e.name,
                        match e.format {
                            ModelFormat::Gguf => "chat",
                            ModelFormat::SentenceTransformers => "embedding",
                        },
                        e.size() / 1_000_000,
                        if store.is_present(e) { "pulled" } else { "-" },
                        match serving(e) {
                            Some(1) => "to 1 peer".to_owned(),
                            Some(n) => format!("to {n} peers"),
                            None => "-".to_owned(),
                        },
                        e.description
                    );
                }
            }
            Ok(())
        }
        ModelsCommand::Pull {
            names,
            no_peers,
            bootstrap,
            peer_wait,
            no_sources,
            no_bulk,
        } => {
            let mut mesh: Option<(tokio::runtime::Runtime, NodeBackend)> = None;
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
                if store.is_present(entry) {
                    println!("{name}: {} (already here)", store.model_dir(name).display());
                    continue;
                }
                if !no_peers {
                    if mesh.is_none() {
                        let runtime = tokio::runtime::Runtime::new()
                            .context("cannot start the async runtime")?;
                        let (backend, _) = runtime.block_on(join_mesh(home, &bootstrap))?;
                        mesh = Some((runtime, backend));
                    }
                    if let Some((runtime, backend)) = &mesh {
                        let wait = Duration::from_secs(peer_wait);
                        match runtime.block_on(pod_node::blob::pull_via_mesh(
                            store,
                            entry,
                            backend.mesh(),
                            wait,
                            &pod_node::blob::PullOptions {
                                stats: None,
                                bulk: !no_bulk,
                            },
                        )) {
                            Ok(Some(files)) => {
                                for f in &files {
                                    for (peer, bytes) in &f.report.bytes_from {
                                        let how = if f.report.bulk_from.contains(peer) {
                                            "a bulk connection"
                                        } else {
                                            "the mesh"
                                        };
                                        println!(
                                            "{name}/{}: {bytes} bytes from peer {peer} over {how}",
                                            f.file
                                        );
                                    }
                                    if f.report.chunks_reused > 0 {
                                        println!(
                                            "{name}/{}: {} chunks kept from an interrupted pull",
                                            f.file, f.report.chunks_reused
                                        );
                                    }
                                    for bad in &f.report.bad_providers {
                                        eprintln!("{name}/{}: dropped peer {bad}: it sent chunks that failed verification", f.file);
                                    }
                                }
                                println!("{name}: {} (from peers)", store.model_dir(name).display());
                                continue;
                            }
                            Ok(None) if no_sources => bail!("{name}: no peer serves it"),
                            Ok(None) => eprintln!(
                                "{name}: no peer serves it; downloading from its sources"
                            ),
                            Err(e) if no_sources => bail!(
                                "{name}: pulling from peers failed ({e}); run the pull again to resume"
                            ),
                            Err(e) => eprintln!(
                                "{name}: pulling from peers failed ({e}); downloading from its sources"
                            ),
                        }
                    }
                }
                let dir = store.pull(entry)?;
                println!("{name}: {} (from its sources)", dir.display());
            }
            if let Some((runtime, backend)) = mesh {
                drop(backend);
                runtime.shutdown_timeout(Duration::from_secs(1));
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

/// The files the node running with this state directory serves to peers, by SHA-256, with
/// the number of peers each was sent to; `None` when no node runs here, it has no API, or it
/// serves no files (not the `storage` or `full` profile).
fn served_files(home: &Path) -> Option<std::collections::HashMap<String, u64>> {
    let daemon = DaemonFile::read(home).filter(|d| d.liveness() == Liveness::Running)?;
    let key = std::env::var("POD_API_KEY").ok();
    let body = Api::new(daemon.api.as_deref()?, key)
        .get_json(pod_api::paths::FILES)
        .map_err(|e| tracing::debug!(error = %e, "cannot ask the running node what it serves"))
        .ok()?;
    if body["serving"] != serde_json::Value::Bool(true) {
        return None;
    }
    Some(
        body["data"]
            .as_array()?
            .iter()
            .filter_map(|f| {
                Some((
                    f["sha256"].as_str()?.to_owned(),
                    f["peers_served"].as_u64()?,
                ))
            })
            .collect(),
    )
}

fn infer(home: &Path, store: &ModelStore, args: InferArgs) -> Result<()> {
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
    home: &Path,
    bootstrap: &[Multiaddr],
    wait: u64,
    request: GenerateRequest,
) -> Result<(String, tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>)> {
    use pod_api::Backend as _;
    let (backend, peers) = join_mesh(home, bootstrap).await?;
    wait_for_model(&backend, &request.model, wait, peers.is_empty()).await?;
    let generation = backend.generate(request).await?;
    Ok((generation.served_by, generation.events))
}

/// Joins the mesh with a throwaway identity, through `bootstrap`, the node running with this
/// state directory (if any) and, failing both, mDNS. Returns a backend that sends every
/// request to a peer, and the peers it dialled.
async fn join_mesh(home: &Path, bootstrap: &[Multiaddr]) -> Result<(NodeBackend, Vec<Multiaddr>)> {
    let mut peers = bootstrap.to_vec();
    // The node running on this machine, if any, is the nearest way in.
    let local_api = DaemonFile::read(home)
        .filter(|d| d.liveness() == Liveness::Running)
        .and_then(|d| d.api);
    if let Some(api) = local_api {
        if let Ok(node) = Api::new(&api, None).get_json(pod_api::paths::NODE) {
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
    let backend = NodeBackend::new(local, mesh, Profile::Relay, None, Route::Mesh);
    Ok((backend, peers))
}

/// Waits until a peer announces `model`, for at most `wait` seconds.
async fn wait_for_model(
    backend: &NodeBackend,
    model: &str,
    wait: u64,
    only_mdns: bool,
) -> Result<()> {
    use pod_api::Backend as _;
    let deadline = Instant::now() + Duration::from_secs(wait);
    while !backend.models().iter().any(|m| m.info.name == model) {
        if Instant::now() > deadline {
            bail!(
                "no peer serving `{model}` found within {wait} s{}",
                if only_mdns {
                    " (no --bootstrap peer and no local node; relying on mDNS)"
                } else {
                    ""
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
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

fn peers(home: &Path, args: PeersArgs) -> Result<()> {
    let located = locate(home, &args.daemon)?;
    let body = require_api(&located)?.get_json(pod_api::paths::PEERS)?;
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

fn receipts(home: &Path, json: bool) -> Result<()> {
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

fn identity(home: &Path, cmd: IdentityCommand) -> Result<()> {
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

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}
