//! `pod start`: load the models, serve the API, stop gracefully on ctrl-c or SIGTERM; and
//! `daemon.json`, through which `pod status`, `pod stop` and `pod peers` find the running node.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pod_api::{ApiConfig, ApiKeys, AppState, LocalBackend};
use pod_inference::{DeviceSpec, Engine, EngineConfig, EngineHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::{NodeBackend, Route, ANNOUNCE_REFRESH};
use crate::blob::{self, BlobServer, BlobStats};
use crate::catalogue;
use crate::identity::Identity;
use crate::infer::server::{InferServer, ServerConfig};
use crate::loader::{self, ResolveError};
use crate::mesh::capability::{ApiInfo, Hardware, Load};
use crate::mesh::{self, Capabilities, MeshConfig, MeshError};
use crate::profile::Profile;
use crate::receipts::Ledger;
use crate::store::ModelStore;

/// How to run a node.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// The node's identity; its PeerId names the node in responses.
    pub identity: Identity,
    /// Capabilities.
    pub profile: Profile,
    /// Models to load instead of the profile's defaults (empty: the defaults).
    pub models: Vec<String>,
    /// Serve the HTTP API (false: mesh and serving peers only).
    pub api: bool,
    /// Address the API binds.
    pub api_host: IpAddr,
    /// Port the API binds (0: any free port).
    pub api_port: u16,
    /// Accepted API keys.
    pub api_keys: ApiKeys,
    /// Allow binding a non-loopback address without keys.
    pub public_api: bool,
    /// Web origins whose pages may call the API from a browser (`*`: any); empty: none.
    pub cors_origins: Vec<String>,
    /// Compute device.
    pub device: DeviceSpec,
    /// The device `device` opened, e.g. `cpu` or `cuda:0`, for announcements and `pod status`.
    pub device_name: String,
    /// Engine limits.
    pub engine: EngineConfig,
    /// Pull missing catalogued models.
    pub pull: bool,
    /// How long in-flight requests may run after a stop signal.
    pub grace: Duration,
    /// The mesh's addresses, bootstrap peers and limits.
    pub mesh: MeshConfig,
    /// State directory; the running daemon's address is written to `daemon.json` there.
    pub home: PathBuf,
    /// Serve this node's models to peers (false: only to its own API).
    pub serve_mesh: bool,
    /// Where API requests go: local models, peers, or both.
    pub route: Route,
    /// Bytes per second each peer may pull model files at (0: no limit).
    pub serve_rate: u64,
    /// Where to listen for bulk connections when serving files (see [`blob`]'s
    /// documentation): the IPs, and the port of the first (0: any free one). Empty: none.
    pub bulk_listen: Vec<std::net::SocketAddr>,
    /// Pull from peers over their bulk connections where offered.
    pub pull_bulk: bool,
}

/// The node could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unsafe or contradictory.
    #[error("{0}")]
    Refused(String),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}{}", bind_hint(source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A model could not be pulled or loaded.
    #[error("cannot load model `{model}`: {source}")]
    Load {
        /// The model.
        model: String,
        /// Why.
        source: Box<ResolveError>,
    },
    /// Serving failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
    /// The mesh could not start.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// Another node runs with the same state directory (and so the same identity).
    #[error("a pod is already running with the state directory {} (pid {pid}{}); stop it with `pod stop` or use another --home", home.display(), api.as_deref().map(|a| format!(", {a}")).unwrap_or_default())]
    AlreadyRunning {
        /// The state directory.
        home: PathBuf,
        /// The running node's process.
        pid: u32,
        /// Its API.
        api: Option<String>,
    },
}

fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another program, perhaps another pod, has the port; choose another with --api-port)"
        }
        std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        std::io::ErrorKind::AddrNotAvailable => " (no interface of this machine has that address)",
        _ => "",
    }
}

impl StartOptions {
    /// Refuses unsafe or contradictory settings.
    pub fn check(&self) -> Result<(), DaemonError> {
        check_api_exposure(self.api, self.api_host, &self.api_keys, self.public_api)?;
        self.api_config(String::new())
            .check()
            .map_err(|e| DaemonError::Refused(e.to_string()))
    }

    /// The API's settings, naming the node `node_name`.
    fn api_config(&self, node_name: String) -> ApiConfig {
        ApiConfig {
            keys: self.api_keys.clone(),
            node_name,
            cors_origins: self.cors_origins.clone(),
            ..ApiConfig::default()
        }
    }
}

/// Refuses an API open to the network without keys unless `public` says so; `pod start
/// --dry-run` runs the same check.
pub fn check_api_exposure(
    api: bool,
    host: IpAddr,
    keys: &ApiKeys,
    public: bool,
) -> Result<(), DaemonError> {
    if api && !host.is_loopback() && keys.is_empty() && !public {
        return Err(DaemonError::Refused(format!(
            "refusing to serve the API on {host} without API keys; pass --api-key-file, or --public-api to serve it open"
        )));
    }
    Ok(())
}

/// What `daemon.json` in the state directory says about the running node, for `pod status`,
/// `pod peers` and `pod stop`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonFile {
    /// Process id.
    pub pid: u32,
    /// Base URL of the API, e.g. `http://127.0.0.1:8080`; `None` with `--no-api`.
    pub api: Option<String>,
    /// The node's PeerId.
    pub peer_id: String,
    /// When the node started, Unix seconds.
    #[serde(default)]
    pub started_at: u64,
    /// The process's start time in clock ticks after boot (Linux), which tells the node apart
    /// from a later process that got the same pid.
    #[serde(default)]
    pub process_start: Option<u64>,
    /// The profile that runs (`auto` resolved).
    #[serde(default)]
    pub profile: String,
    /// The compute device models were loaded on, e.g. `cpu` or `cuda:0`.
    #[serde(default)]
    pub device: String,
    /// pod's version.
    #[serde(default)]
    pub version: String,
}

/// Whether the process a `daemon.json` names still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs.
    Running,
    /// It exited (or is a zombie waiting for its parent); the file is stale.
    Exited,
    /// A different process has the pid now; the file is stale.
    Replaced,
}

impl DaemonFile {
    /// Where the file lives.
    pub fn path(home: &Path) -> PathBuf {
        home.join("daemon.json")
    }

    /// Reads it, if a daemon wrote one.
    pub fn read(home: &Path) -> Option<DaemonFile> {
        let text = std::fs::read_to_string(Self::path(home)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self, home: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(home)?;
        let tmp = tempfile::NamedTempFile::new_in(home)?;
        serde_json::to_writer_pretty(tmp.as_file(), self)?;
        tmp.persist(Self::path(home)).map_err(|e| e.error)?;
        Ok(())
    }

    /// Whether the process still runs.
    pub fn liveness(&self) -> Liveness {
        match process_state(self.pid) {
            None => Liveness::Exited,
            Some(p) if p.zombie => Liveness::Exited,
            Some(p) => match (self.process_start, p.start_ticks) {
                (Some(recorded), Some(now)) if recorded != now => Liveness::Replaced,
                _ => Liveness::Running,
            },
        }
    }

    /// Asks the node to stop, as systemd would: SIGTERM.
    pub fn terminate(&self) -> std::io::Result<()> {
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| std::io::Error::other(format!("bad pid {}", self.pid)))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(std::io::Error::from)
    }

    /// Removes the file when it is stale.
    pub fn remove_stale(home: &Path) {
        if DaemonFile::read(home).is_some_and(|d| d.liveness() != Liveness::Running) {
            let _ = std::fs::remove_file(Self::path(home));
        }
    }

    fn remove_if_ours(home: &Path) {
        if DaemonFile::read(home).is_some_and(|d| d.pid == std::process::id()) {
            let _ = std::fs::remove_file(Self::path(home));
        }
    }
}

/// Runs the node until ctrl-c or SIGTERM.
pub async fn run(store: ModelStore, opts: StartOptions) -> Result<(), DaemonError> {
    opts.check()?;
    if let Some(other) = DaemonFile::read(&opts.home) {
        if other.pid != std::process::id() && other.liveness() == Liveness::Running {
            return Err(DaemonError::AlreadyRunning {
                home: opts.home.clone(),
                pid: other.pid,
                api: other.api,
            });
        }
    }
    let listener = if opts.api {
        let addr = SocketAddr::new(opts.api_host, opts.api_port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        Some(listener)
    } else {
        None
    };
    let local = listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .map_err(DaemonError::Serve)?;

    let engine = Engine::start(opts.engine.clone());
    let peer_id = opts.identity.peer_id().to_string();
    let local_backend = LocalBackend::new(engine.clone(), peer_id.clone());

    let (mesh, event_loop) = mesh::new(opts.identity.keypair().clone(), opts.mesh.clone())?;
    tokio::spawn(event_loop.run());
    let ledger = match Ledger::open(&opts.home) {
        Ok(l) => Some(Arc::new(l)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the receipt ledger; receipts are not kept");
            None
        }
    };
    let server = InferServer::new(
        engine.clone(),
        opts.identity.keypair().clone(),
        ledger.clone(),
        ServerConfig {
            serve_mesh: opts.serve_mesh,
            ..ServerConfig::default()
        },
    );
    tokio::spawn(server.run(mesh.streams()));
    // Storage and full profiles serve their verified model files to peers.
    let blobs = opts
        .profile
        .serves_files()
        .then(|| BlobServer::with_limits(&store, blob::MAX_STREAMS_PER_PEER, opts.serve_rate));
    let blob_stats = blobs
        .as_ref()
        .map_or_else(|| Arc::new(BlobStats::default()), |b| Arc::clone(b.stats()));
    if let Some(blobs) = &blobs {
        let bulk = if opts.bulk_listen.is_empty() {
            None
        } else {
            match blobs.listen_bulk(&opts.bulk_listen).await {
                Ok(port) => Some(port),
                Err(e) => {
                    tracing::warn!(
                        addr = %opts.bulk_listen[0],
                        error = %e,
                        "cannot listen for bulk connections (pick another port with --bulk-port); serving over the mesh only"
                    );
                    None
                }
            }
        };
        tracing::info!(
            files = blobs.files().len(),
            bulk_port = bulk.map_or_else(|| "none".to_owned(), |p| p.to_string()),
            "serving model files to peers"
        );
        tokio::spawn(Arc::clone(blobs).run(mesh.streams()));
        let preparing = Arc::clone(blobs);
        tokio::spawn(async move { preparing.prepare_manifests().await });
        tokio::spawn(provide_files(mesh.clone(), Arc::clone(blobs)));
    }
    let backend = NodeBackend::new(
        local_backend.clone(),
        mesh.clone(),
        opts.profile,
        ledger,
        opts.route,
    )
    .with_blobs(Arc::clone(&blob_stats), blobs.clone());
    let announcer = tokio::spawn(announce(
        mesh.clone(),
        engine.clone(),
        local_backend.clone(),
        opts.profile,
        (opts.device_name.clone(), opts.api),
        blobs.clone(),
    ));

    let state = AppState::new(backend.clone(), opts.api_config(peer_id.clone()));
    let app = pod_api::router(Arc::clone(&state));
    let daemon_file = DaemonFile {
        pid: std::process::id(),
        api: local.map(|l| format!("http://{}", client_addr(l))),
        peer_id: peer_id.clone(),
        started_at: unix_now(),
        process_start: process_state(std::process::id()).and_then(|p| p.start_ticks),
        profile: opts.profile.to_string(),
        device: opts.device_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    if let Err(e) = daemon_file.write(&opts.home) {
        tracing::warn!(error = %e, "cannot write daemon.json; `pod status` will not find this node");
    }
    match local {
        Some(local) => tracing::info!(
            api = %format!("http://{local}"),
            peer_id = %peer_id,
            profile = %opts.profile,
            auth = if opts.api_keys.is_empty() { "none" } else { "api-key" },
            "API listening; loading models"
        ),
        None => tracing::info!(
            peer_id = %peer_id,
            profile = %opts.profile,
            "no HTTP API (--no-api); loading models"
        ),
    }

    let (stop_tx, mut stop_rx) = watch::channel(false);
    // Without an API the "server" only waits for the stop, so the life cycle below is the same.
    let mut server = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        match listener {
            Some(listener) => {
                pod_api::serve(listener, app, pod_api::ServerLimits::default(), stopped).await
            }
            None => {
                stopped.await;
                Ok(())
            }
        }
    });

    let result: Result<(), DaemonError> = async {
        let models: Vec<String> = if opts.models.is_empty() {
            opts.profile
                .default_models()
                .into_iter()
                .map(str::to_owned)
                .collect()
        } else {
            opts.models.clone()
        };
        let started = Instant::now();
        // Under systemd (Type=notify), a first start may spend minutes downloading models:
        // keep extending the start timeout while loading.
        let extender = tokio::spawn(async {
            let mut tick = tokio::time::interval(Duration::from_secs(20));
            loop {
                tick.tick().await;
                notify_systemd(&[sd_notify::NotifyState::ExtendTimeoutUsec(60_000_000)]);
            }
        });
        let load = {
            let store = store.clone();
            let engine = engine.clone();
            let device = opts.device;
            let pull = opts.pull;
            let mesh = mesh.clone();
            let pull_opts = blob::PullOptions {
                stats: Some(Arc::clone(&blob_stats)),
                bulk: opts.pull_bulk,
            };
            let blobs = blobs.clone();
            async move {
                if pull {
                    pull_from_peers(&store, &models, &mesh, &pull_opts, blobs.as_ref()).await;
                }
                tokio::task::spawn_blocking(move || -> Result<(), DaemonError> {
                    for name in models {
                        let resolved = loader::resolve(&store, &name, pull).map_err(|source| {
                            DaemonError::Load {
                                model: name.clone(),
                                source: Box::new(source),
                            }
                        })?;
                        loader::load_into(&engine, &resolved, device).map_err(|source| {
                            DaemonError::Load {
                                model: name.clone(),
                                source: Box::new(source),
                            }
                        })?;
                    }
                    Ok(())
                })
                .await
            }
        };
        tokio::select! {
            loaded = load => {
                match loaded {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let _ = stop_tx.send(true);
                        return Err(e);
                    }
                    Err(join) => {
                        let _ = stop_tx.send(true);
                        return Err(DaemonError::Refused(format!("model loading panicked: {join}")));
                    }
                }
            }
            () = shutdown_signal() => {
                tracing::info!("stop requested while loading");
                let _ = stop_tx.send(true);
                return Ok(());
            }
        }
        extender.abort();
        local_backend.set_ready(true);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("serving {} models", engine.models().len())),
        ]);
        tracing::info!(
            models = engine.models().len(),
            seconds = started.elapsed().as_secs_f64(),
            "ready"
        );

        tokio::select! {
            result = &mut server => {
                return match result {
                    Ok(r) => r.map_err(DaemonError::Serve),
                    Err(e) => Err(DaemonError::Refused(format!("API server task failed: {e}"))),
                };
            }
            () = shutdown_signal() => {}
        }
        tracing::info!(
            grace_seconds = opts.grace.as_secs(),
            "stopping: finishing in-flight requests"
        );
        local_backend.set_ready(false);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        let _ = stop_tx.send(true);
        match tokio::time::timeout(opts.grace, &mut server).await {
            Ok(_) => tracing::info!("stopped"),
            Err(_) => {
                server.abort();
                tracing::warn!("grace period over: cancelled the remaining requests");
            }
        }
        Ok(())
    }
    .await;
    announcer.abort();
    DaemonFile::remove_if_ours(&opts.home);
    result
}

/// What the system says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessState {
    zombie: bool,
    /// Start time in clock ticks after boot; `None` off Linux.
    start_ticks: Option<u64>,
}

/// `None` when no process has the pid.
fn process_state(pid: u32) -> Option<ProcessState> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // After the command name in parentheses (which may hold spaces): the state is the
        // first field, the start time the twentieth (field 22 of proc(5)).
        Ok(stat) => {
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(ProcessState {
                zombie: matches!(fields.first(), Some(&"Z") | Some(&"X")),
                start_ticks: fields.get(19).and_then(|s| s.parse().ok()),
            })
        }
        Err(_) if Path::new("/proc/self/stat").exists() => None,
        // No procfs: signal 0 tests for existence.
        Err(_) => {
            let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
            match rustix::process::test_kill_process(pid) {
                Ok(()) | Err(rustix::io::Errno::PERM) => Some(ProcessState {
                    zombie: false,
                    start_ticks: None,
                }),
                Err(_) => None,
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The address clients should use for a listener: loopback when it listens on every interface.
fn client_addr(local: SocketAddr) -> SocketAddr {
    match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), local.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), local.port())
        }
        _ => local,
    }
}

/// How long a starting node waits to hear of pods serving the files of a missing model before
/// it downloads the model from its sources.
const PEER_PULL_WAIT: Duration = Duration::from_secs(3);

/// Pulls the missing catalogued models among `models` from pods of the mesh that serve them;
/// what cannot be had from peers is left for the catalogue's sources. Pulled files are served
/// on by `blobs`.
async fn pull_from_peers(
    store: &ModelStore,
    models: &[String],
    mesh: &mesh::Client,
    opts: &blob::PullOptions,
    blobs: Option<&Arc<BlobServer>>,
) {
    for name in models {
        let Some(entry) = catalogue::find(name) else {
            continue;
        };
        if store.is_present(entry) {
            continue;
        }
        match blob::pull_via_mesh(store, entry, mesh, PEER_PULL_WAIT, opts).await {
            // Each file pulled was logged as it was installed.
            Ok(Some(_)) => {
                if let Some(blobs) = blobs {
                    blobs.add_present(store);
                    let preparing = Arc::clone(blobs);
                    tokio::spawn(async move { preparing.prepare_manifests().await });
                }
            }
            Ok(None) => tracing::info!(model = %name, "no peer serves it; using its sources"),
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "pulling from peers failed; using its sources");
            }
        }
    }
}

/// How often the provider records of served files are renewed in the DHT.
const REPROVIDE_INTERVAL: Duration = Duration::from_secs(600);

/// Puts a provider record in the DHT for every file `blobs` serves: at once, for files added
/// later, every [`REPROVIDE_INTERVAL`], and again when a peer connects and the last records
/// are older than 30 s (the newcomer may be closer to the files' keys than any earlier peer).
async fn provide_files(mesh: mesh::Client, blobs: Arc<BlobServer>) {
    use std::collections::HashMap;
    use tokio::sync::broadcast::error::RecvError;
    let mut events = mesh.events();
    let mut provided: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        for (sha, _) in blobs.files() {
            if provided
                .get(&sha)
                .is_some_and(|t| t.elapsed() < REPROVIDE_INTERVAL)
            {
                continue;
            }
            match mesh.provide(blob::dht_key(&sha)).await {
                Ok(()) => {
                    tracing::debug!(file = %sha, "provider record published");
                    provided.insert(sha, Instant::now());
                }
                Err(MeshError::Stopped) => return,
                Err(e) => tracing::warn!(file = %sha, error = %e, "cannot publish provider record"),
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            event = events.recv() => match event {
                Ok(mesh::MeshEvent::Connected(_)) => {
                    provided.retain(|_, t| t.elapsed() < Duration::from_secs(30));
                }
                Err(RecvError::Closed) => return,
                _ => {}
            },
        }
    }
}

/// Keeps the node's capability announcement current: models, load, API readiness, and the
/// files it serves.
async fn announce(
    mesh: mesh::Client,
    engine: EngineHandle,
    api: LocalBackend,
    profile: Profile,
    (device, http_api): (String, bool),
    blobs: Option<Arc<BlobServer>>,
) {
    use pod_api::Backend as _;
    let hardware = Hardware {
        device,
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: crate::profile::memory_bytes().unwrap_or(0),
    };
    let mut tick = tokio::time::interval(ANNOUNCE_REFRESH);
    loop {
        tick.tick().await;
        let stats = engine.stats();
        let caps = Capabilities {
            agent: mesh::agent_version(),
            profile: profile.to_string(),
            models: engine.models(),
            load: Load {
                queued: stats.queued.load(Ordering::Relaxed),
                active: stats.active.load(Ordering::Relaxed),
                max_active: engine.config().max_active,
            },
            hardware: hardware.clone(),
            // Peers route to nodes whose `api.ready` is set, over the mesh, whether or not the
            // node has an HTTP API; `version: none` says it has none.
            api: Some(ApiInfo {
                version: if http_api { "openai/v1" } else { "none" }.into(),
                ready: api.is_ready(),
            }),
            addrs: Vec::new(),
            files: blobs
                .as_ref()
                .map(|b| b.files().into_iter().map(|(sha, _)| sha).collect())
                .unwrap_or_default(),
            seq: 0,
        };
        if mesh.announce(caps).await.is_err() {
            break;
        }
    }
}

/// Tells systemd about the service's state; a no-op outside a `Type=notify` unit.
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pid: u32, process_start: Option<u64>) -> DaemonFile {
        DaemonFile {
            pid,
            api: None,
            peer_id: String::new(),
            started_at: 0,
            process_start,
            profile: String::new(),
            device: String::new(),
            version: String::new(),
        }
    }

    #[test]
    fn tells_running_exited_and_reused_pids_apart() {
        let me = std::process::id();
        let start = process_state(me).and_then(|p| p.start_ticks);
        assert_eq!(file(me, start).liveness(), Liveness::Running);
        // Above the kernel's pid_max (at most 2^22).
        assert_eq!(file(1 << 23, None).liveness(), Liveness::Exited);
        if let Some(start) = start {
            assert_eq!(file(me, Some(start + 1)).liveness(), Liveness::Replaced);
        }
    }

    #[test]
    fn a_zombie_has_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie until `wait`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while file(pid, None).liveness() == Liveness::Running {
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(file(pid, None).liveness(), Liveness::Exited);
        child.wait().unwrap();
    }

    #[test]
    fn old_daemon_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            DaemonFile::path(dir.path()),
            r#"{"pid": 7, "api": "http://127.0.0.1:8080", "peer_id": "12D3KooW"}"#,
        )
        .unwrap();
        let d = DaemonFile::read(dir.path()).unwrap();
        assert_eq!(d.api.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(d.process_start, None);
    }

    #[test]
    fn bind_errors_say_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let source = std::net::TcpListener::bind(addr).unwrap_err();
        let msg = DaemonError::Bind { addr, source }.to_string();
        assert!(msg.contains("--api-port"), "{msg}");
    }
}
