//! The flags of `pod start`, each of which `config.toml` may also set (see [`super::layer`]).

use std::path::PathBuf;

use bytesize::ByteSize;
use clap::Args;
use libp2p::{Multiaddr, PeerId};
use pod_inference::DeviceSpec;

use super::ApiHost;
use crate::access::ServeTo;
use crate::backend::Route;
use crate::profile::Profile;
use crate::stage::placement::StageLayers;

/// The flags of `pod start`; `pod start --help` says where else each can come from.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Capabilities: auto (picks relay, inference or full from memory and GPU, and logs why),
    /// full, inference (chat models), embedding, relay (no local models), storage.
    #[arg(long, default_value = "auto", env = "POD_PROFILE")]
    pub profile: Profile,
    /// Model to load instead of the profile's defaults (repeatable): a catalogue name or a path.
    #[arg(
        long = "model",
        short = 'm',
        value_name = "NAME",
        env = "POD_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Print the models and services this would run, bind nothing and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print JSON.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Run without the HTTP API: the node joins the mesh and serves its models to peers only.
    #[arg(long, env = "POD_NO_API")]
    pub no_api: bool,
    /// Address the API listens on: an IP address, or a host name resolved at start (localhost:
    /// 127.0.0.1). Anything but loopback needs --api-key-file or --public-api.
    #[arg(long, default_value = "127.0.0.1", env = "POD_API_HOST")]
    pub api_host: ApiHost,
    /// Port of the API (0: any free port).
    #[arg(long, default_value_t = 8080, env = "POD_API_PORT")]
    pub api_port: u16,
    /// File of accepted API keys, one per line; clients send `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE", env = "POD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve the API on a non-loopback address without keys (anyone who can reach it can use it).
    #[arg(long, env = "POD_PUBLIC_API")]
    pub public_api: bool,
    /// Web origin whose pages may call the API from a browser (repeatable), e.g.
    /// https://app.example; `*` allows any page and is refused with API keys. Default: none.
    #[arg(
        long = "cors-origin",
        value_name = "ORIGIN",
        env = "POD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Compute device for chat models: auto (the first GPU that opens, else the CPU, with a log
    /// line saying why), cpu, rocm[:N] (AMD, through ROCm's HIP runtime), cuda[:N] (NVIDIA), or
    /// emulator (pod's GPU kernels run on the CPU: slow, for diagnosis). A named GPU that
    /// cannot take a model (no runtime, no device, too little memory) fails the start. For
    /// AMD GPUs the HIP runtime does not list (e.g. gfx906, MI50), set
    /// HSA_OVERRIDE_GFX_VERSION (e.g. 9.0.6).
    #[arg(long, default_value = "auto", env = "POD_DEVICE")]
    pub device: DeviceSpec,
    /// Serve only these blocks of the model (a pipeline stage), e.g. 0-14 or 15-29 of a
    /// 30-block model: the pod loads just those blocks' weights (plus the embeddings on the
    /// first stage and the output head on the last) and announces them. The stage holding
    /// block 0 serves the model's API and runs the other blocks on the pods the mesh
    /// announces for them; it needs exactly one --model. Runs on the CPU. `auto`: at start,
    /// after a few seconds learning the mesh, the blocks its pods cover least, as many as fit
    /// in --max-memory (all of them: the whole model).
    #[arg(long, value_name = "FIRST-LAST|auto", env = "POD_LAYERS")]
    pub layers: Option<StageLayers>,
    /// Memory a stage with --layers auto may fill with weights and attention caches, e.g.
    /// 3GiB or 800MB (default: what the system has available at start, MemAvailable).
    #[arg(long, value_name = "BYTES", env = "POD_MAX_MEMORY")]
    pub max_memory: Option<ByteSize>,
    /// Sequences generated at once; further requests queue.
    #[arg(long, default_value_t = 8, env = "POD_MAX_BATCH",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_batch: usize,
    /// Longest prompt plus completion per request, in tokens (default: each model's own
    /// trained context length). Caches grow with their sequences, so a long context costs
    /// memory only when a request uses it; --kv-memory bounds what they take together.
    #[arg(long, value_name = "TOKENS", env = "POD_CTX_SIZE",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16..))]
    pub ctx_size: Option<usize>,
    /// Memory for attention (KV) caches, in MiB: running requests, each counted at what it
    /// may grow to (prompt plus max_tokens), and the prefix cache together. A request that
    /// does not fit waits until running ones finish; one that could never fit is refused.
    /// Default: a quarter of this machine's memory (4096 where unknown), which leaves the
    /// rest for the weights, the system and other programs.
    #[arg(long, value_name = "MIB", env = "POD_KV_MEMORY",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub kv_memory: Option<usize>,
    /// Memory for the prompt prefix cache, in MiB: finished requests' attention caches kept so
    /// that requests starting the same way (system prompts, conversations) skip that work.
    #[arg(
        long,
        default_value_t = 256,
        value_name = "MIB",
        env = "POD_PREFIX_CACHE"
    )]
    pub prefix_cache: usize,
    /// Requests allowed to queue before new ones get 429.
    #[arg(long, default_value_t = 256, env = "POD_MAX_QUEUE")]
    pub max_queue: usize,
    /// Seconds in-flight requests may run after ctrl-c or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10, env = "POD_SHUTDOWN_GRACE")]
    pub shutdown_grace: u64,
    /// Do not download missing catalogued models; fail instead.
    #[arg(long, env = "POD_NO_PULL")]
    pub no_pull: bool,
    /// Mesh port: TCP and UDP (QUIC) on every interface. Ignored when --listen is given.
    #[arg(long, default_value_t = crate::mesh::DEFAULT_P2P_PORT, value_name = "PORT",
          env = "POD_P2P_PORT")]
    pub p2p_port: u16,
    /// Mesh listen address instead of the --p2p-port defaults (repeatable), e.g.
    /// /ip4/192.168.1.5/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_LISTEN",
        value_delimiter = ','
    )]
    pub listen: Vec<Multiaddr>,
    /// Address peers can reach this node at, when it is behind port forwarding (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_EXTERNAL_ADDR",
        value_delimiter = ','
    )]
    pub external_addr: Vec<Multiaddr>,
    /// Peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        env = "POD_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<Multiaddr>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long, env = "POD_NO_MDNS")]
    pub no_mdns: bool,
    /// Let AutoNAT trust peers at private addresses: on a LAN or a test network of private
    /// addresses, pods then learn whether they are reachable (and reserve relay slots when
    /// they are not). Off by default, as on the internet only global addresses say anything.
    #[arg(long, env = "POD_NAT_TRUST_PRIVATE")]
    pub nat_trust_private: bool,
    /// As a relay (relay and full profiles): MiB one relayed circuit may carry, both
    /// directions together, before the relay closes it. The default leaves room for chat
    /// requests, not model files; a relay run for your own pods can allow pulls through it.
    #[arg(long, default_value_t = 8, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=65536), env = "POD_RELAY_CIRCUIT_MIB")]
    pub relay_circuit_mib: u64,
    /// Do not ask the home router (UPnP IGD) to forward the mesh port to this node.
    #[arg(long, env = "POD_NO_UPNP")]
    pub no_upnp: bool,
    /// Do not run requests for peers; this node's models serve only its own API.
    #[arg(long, env = "POD_NO_SERVE_MESH")]
    pub no_serve_mesh: bool,
    /// Where API requests go: `auto` (local models here, others on the best peer), `local`
    /// (this node's models only), `mesh` (always a peer, even for models held here).
    #[arg(long, default_value = "auto", value_parser = super::parse_route, env = "POD_ROUTE")]
    pub route: Route,
    /// Seconds between capability announcements when nothing changes; peers forget a silent
    /// node after three of these.
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600), env = "POD_ANNOUNCE_INTERVAL")]
    pub announce_interval: u64,
    /// Bytes per second each peer may pull model files at from this node, over all of its
    /// streams (storage and full profiles); 0: no limit.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "BYTES",
        env = "POD_SERVE_RATE"
    )]
    pub serve_rate: u64,
    /// Serve and pull model files over the mesh's encrypted streams only. By default storage
    /// pods also offer plain TCP bulk connections, opened with a one-time ticket given over the
    /// mesh: about half the CPU per byte; every chunk is still verified against the pinned
    /// SHA-256, only secrecy is given up.
    #[arg(long, env = "POD_NO_BULK")]
    pub no_bulk: bool,
    /// TCP port for bulk connections, on the mesh's listen IPs; default: the mesh port plus one
    /// (4002), any free port when the mesh port is 0.
    #[arg(long, value_name = "PORT", env = "POD_BULK_PORT")]
    pub bulk_port: Option<u16>,
    /// Pre-shared key file of a private mesh (make one with `pod mesh key new --out FILE`):
    /// only pods holding the same key can connect at all. It covers TCP only, so QUIC is off
    /// (not listened on, dialled or announced). Default: none, the open public mesh.
    #[arg(long, value_name = "FILE", env = "POD_MESH_KEY")]
    pub mesh_key: Option<PathBuf>,
    /// A peer that may run inference on this pod and pull its model files with --serve-to
    /// trusted (repeatable; at most 64).
    #[arg(
        long = "trust",
        value_name = "PEERID",
        env = "POD_TRUST",
        value_delimiter = ','
    )]
    pub trust: Vec<PeerId>,
    /// Who may run inference on this pod and pull its model files: `any` peer (the default,
    /// for the open mesh) or only the `trusted` ones (--trust); others are refused, and their
    /// pods ask another provider.
    #[arg(
        long,
        default_value = "any",
        value_name = "any|trusted",
        env = "POD_SERVE_TO"
    )]
    pub serve_to: ServeTo,
}
