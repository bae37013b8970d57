//! `pod start`: load the models, serve the API, stop gracefully on ctrl-c or SIGTERM.

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
    /// Address the API binds.
    pub api_host: IpAddr,
    /// Port the API binds (0: any free port).
    pub api_port: u16,
    /// Accepted API keys.
    pub api_keys: ApiKeys,
    /// Allow binding a non-loopback address without keys.
    pub public_api: bool,
    /// Compute device.
    pub device: DeviceSpec,
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
}

/// The node could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unsafe or contradictory.
    #[error("{0}")]
    Refused(String),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
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
}

/// What `daemon.json` in the state directory says about the running node, for `pod status`,
/// `pod peers` and `pod stop`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonFile {
    /// Process id.
    pub pid: u32,
    /// Base URL of the API, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// The node's PeerId.
    pub peer_id: String,
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

    fn remove_if_ours(home: &Path) {
        if DaemonFile::read(home).is_some_and(|d| d.pid == std::process::id()) {
            let _ = std::fs::remove_file(Self::path(home));
        }
    }
}

/// Runs the node until ctrl-c or SIGTERM.
pub async fn run(store: ModelStore, opts: StartOptions) -> Result<(), DaemonError> {
    if !opts.api_host.is_loopback() && opts.api_keys.is_empty() && !opts.public_api {
        return Err(DaemonError::Refused(format!(
            "refusing to serve the API on {} without API keys; pass --api-key-file, or --public-api to serve it open",
            opts.api_host
        )));
    }
    let addr = SocketAddr::new(opts.api_host, opts.api_port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(DaemonError::Serve)?;

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
    let backend = NodeBackend::new(
        local_backend.clone(),
        mesh.clone(),
        opts.profile,
        ledger,
        opts.route,
    );
    let announcer = tokio::spawn(announce(
        mesh.clone(),
        engine.clone(),
        local_backend.clone(),
        opts.profile,
        opts.device,
    ));

    let state = AppState::new(
        backend.clone(),
        ApiConfig {
            keys: opts.api_keys.clone(),
            node_name: peer_id.clone(),
            ..ApiConfig::default()
        },
    );
    let app = pod_api::router(Arc::clone(&state));
    let daemon_file = DaemonFile {
        pid: std::process::id(),
        api: format!("http://{}", client_addr(local)),
        peer_id: peer_id.clone(),
    };
    if let Err(e) = daemon_file.write(&opts.home) {
        tracing::warn!(error = %e, "cannot write daemon.json; `pod status` will not find this node");
    }
    tracing::info!(
        api = %format!("http://{local}"),
        peer_id = %peer_id,
        profile = %opts.profile,
        auth = if opts.api_keys.is_empty() { "none" } else { "api-key" },
        "API listening; loading models"
    );

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
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

/// Keeps the node's capability announcement current: models, load, API readiness.
async fn announce(
    mesh: mesh::Client,
    engine: EngineHandle,
    api: LocalBackend,
    profile: Profile,
    device: DeviceSpec,
) {
    use pod_api::Backend as _;
    let hardware = Hardware {
        device: device.to_string(),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: total_memory_bytes().unwrap_or(0),
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
            api: Some(ApiInfo {
                version: "openai/v1".into(),
                ready: api.is_ready(),
            }),
            addrs: Vec::new(),
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

/// Installed memory, from `/proc/meminfo`.
fn total_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
