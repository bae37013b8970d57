//! The command line: the global flags, one module per command (its clap arguments and its
//! `exec`), and the parts several commands share: the client of a running node and joining
//! the mesh.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgMatches, Parser, Subcommand};
use pod_node::config::{LogFormat, StartArgs, StartSettings};
use pod_node::home::default_home;
use pod_node::store::ModelStore;

mod bench;
mod chat;
mod device;
mod identity;
mod infer;
mod mesh;
mod mesh_join;
mod models;
mod node_client;
mod peers;
mod receipts;
mod start;
mod status;
mod stop;
mod terminal;
mod version;

use chat::CHAT_HELP;
use start::START_HELP;

/// A peer-to-peer AI node: local LLM and embedding inference behind an OpenAI-compatible API,
/// shared over a libp2p mesh.
#[derive(Debug, Parser)]
#[command(name = "pod", version, about, long_about = None)]
pub(crate) struct Cli {
    /// State directory (models, identity, config, ledger). Default: $POD_HOME, else
    /// ~/.local/share/pod.
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,
    /// Model store. Default: the `models` folder of the state directory.
    #[arg(long, global = true, value_name = "DIR", env = "POD_MODELS_DIR")]
    pub(crate) models_dir: Option<PathBuf>,
    /// Settings file of `pod start`. Default: config.toml in the state directory (read when it
    /// exists); a file named here must exist.
    #[arg(long, global = true, value_name = "FILE", env = "POD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// CPU threads for inference (default: one per physical core; RAYON_NUM_THREADS also works).
    #[arg(long, global = true, value_name = "N", env = "POD_THREADS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) threads: Option<usize>,
    /// Log filter, e.g. `info`, `debug`, `pod_inference=trace` (RUST_LOG, when set, wins).
    #[arg(
        long,
        global = true,
        default_value = "info",
        value_name = "FILTER",
        env = "POD_LOG"
    )]
    pub(crate) log: String,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "POD_LOG_FORMAT"
    )]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start the node: load the profile's models, join the mesh, serve the OpenAI-compatible
    /// API. Settings come from flags, then POD_* variables, then config.toml.
    #[command(after_help = START_HELP)]
    Start(StartArgs),
    /// Show the running node: uptime, profile, models, peers, requests, device.
    Status(status::StatusArgs),
    /// Stop the running node (SIGTERM: in-flight requests finish first).
    Stop(stop::StopArgs),
    /// Chat with a model through the running node (any model of the mesh), streaming answers.
    #[command(after_help = CHAT_HELP)]
    Chat(chat::ChatArgs),
    /// List, download and delete models.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Run one prompt through a local model and stream the answer to stdout.
    Infer(infer::InferArgs),
    /// Measure prompt-processing and generation speed of a chat model (like llama-bench).
    Bench(bench::BenchArgs),
    /// Show, export or import the node's identity (its ed25519 key and PeerId).
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// List the peers the running node knows: addresses, round-trip time, models, load.
    Peers(peers::PeersArgs),
    /// A private mesh: make or check the pre-shared key (`pod start --mesh-key FILE`).
    #[command(subcommand)]
    Mesh(mesh::MeshCommand),
    /// Work served to and consumed from each peer, from the signed receipt ledger.
    Receipts(receipts::ReceiptsArgs),
    /// Show pod's version and what this binary was built with (target, GPU backends).
    Version(version::VersionArgs),
    /// GPUs: list them (or why there are none), compile pod's kernels for an architecture.
    #[command(subcommand)]
    Device(device::DeviceCommand),
}

impl Command {
    /// Whether the command only prints a report and exits, with no sockets of its own beyond a
    /// request to the daemon: such commands may die of SIGPIPE like other Unix tools.
    pub(crate) fn prints_and_exits(&self) -> bool {
        match self {
            Command::Status(_)
            | Command::Stop(_)
            | Command::Identity(_)
            | Command::Peers(_)
            | Command::Mesh(_)
            | Command::Receipts(_)
            | Command::Version(_)
            | Command::Device(_) => true,
            Command::Models(m) => !matches!(m, models::ModelsCommand::Pull(_)),
            Command::Start(_) | Command::Chat(_) | Command::Infer(_) | Command::Bench(_) => false,
        }
    }
}

/// Runs the command `cli` holds; `matches` are the parsed arguments it came from.
pub(crate) fn exec(cli: Cli, matches: &ArgMatches) -> Result<()> {
    let home = cli.home.unwrap_or_else(default_home);
    let models_dir = cli.models_dir;
    let open_store = || open_store(&home, models_dir.as_deref());
    match cli.command {
        Command::Start(args) => {
            let sub = matches
                .subcommand_matches("start")
                .context("clap lost the `start` arguments")?;
            let settings = StartSettings {
                args,
                models_dir: models_dir.clone(),
                threads: cli.threads,
                log: cli.log,
                log_format: cli.log_format,
            };
            start::exec(&home, cli.config, settings, sub)
        }
        Command::Status(args) => status::exec(&home, args),
        Command::Stop(args) => stop::exec(&home, args),
        Command::Chat(args) => chat::exec(&home, args),
        Command::Models(cmd) => models::exec(&home, &open_store()?, cmd),
        Command::Infer(args) => infer::exec(&home, &open_store()?, args),
        Command::Bench(args) => bench::exec(&home, &open_store()?, args),
        Command::Identity(cmd) => identity::exec(&home, cmd),
        Command::Peers(args) => peers::exec(&home, args),
        Command::Mesh(cmd) => mesh::exec(cmd),
        Command::Receipts(args) => receipts::exec(&home, args),
        Command::Version(args) => version::exec(args),
        Command::Device(cmd) => device::exec(&home, cmd),
    }
}

/// The model store: `--models-dir` (or `models_dir` of `config.toml`), else the state
/// directory's.
fn open_store(home: &Path, models_dir: Option<&Path>) -> Result<ModelStore> {
    match models_dir {
        Some(dir) => ModelStore::open_dir(dir),
        None => ModelStore::open(home),
    }
    .with_context(|| format!("cannot open the model store under {}", home.display()))
}
