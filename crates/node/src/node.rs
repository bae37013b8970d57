//! A running pod: the engine, the mesh, the servers that answer peers and the HTTP API, from
//! start to a graceful stop. `pod start` is [`Node::start`], then [`Node::run_until_stopped`].

mod announce;
mod error;
mod load;
mod options;
mod provide;
mod replace;
mod signals;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pod_api::{AppState, LocalBackend};
use pod_inference::{Engine, EngineHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::NodeError;
pub use options::{check_api_exposure, StartOptions};
pub use signals::shutdown_signal;

use crate::backend::NodeBackend;
use crate::blob::{self, BlobServer, BlobStats};
use crate::daemon_file::{DaemonFile, Liveness};
use crate::mesh;
use crate::receipts::Ledger;
use crate::remote::server::{InferServer, ServerConfig};
use crate::stage::server::StageHost;
use crate::store::ModelStore;
use load::{auto_settle, ModelLoad};
use signals::notify_systemd;

/// A started node: its API and mesh are up and its models are loading. Run it with
/// [`run_until_stopped`](Node::run_until_stopped); stop it with a signal or its
/// [`stop_token`](Node::stop_token). Dropping it stops its tasks and removes its `daemon.json`.
#[derive(Debug)]
pub struct Node {
    /// State directory, where `daemon.json` was written.
    home: PathBuf,
    /// How long in-flight requests may run after the stop.
    grace: Duration,
    /// When the models began loading, for the time to readiness.
    started: Instant,
    engine: EngineHandle,
    local: LocalBackend,
    backend: NodeBackend,
    /// Where the API listens; `None` without one.
    api_addr: Option<SocketAddr>,
    /// Cancelled to ask the node to stop.
    stop: CancellationToken,
    /// Cancelled to stop the API server gracefully, once the node stops taking requests.
    server_stop: CancellationToken,
    /// Serves the API (without one: only waits for `server_stop`).
    server: JoinHandle<std::io::Result<()>>,
    /// Pulls and loads the models.
    loading: JoinHandle<Result<(), NodeError>>,
    /// Extends systemd's start timeout while the models' downloads make progress.
    start_timeout: JoinHandle<()>,
    /// The mesh, the servers answering peers and the announcements: they run as long as the
    /// node and are aborted with it.
    background: Vec<JoinHandle<()>>,
}

impl Node {
    /// Checks the options, binds the API, starts the mesh and the servers that answer peers,
    /// writes `daemon.json`, and begins loading the models. Must be called within a tokio
    /// runtime.
    pub async fn start(store: ModelStore, opts: StartOptions) -> Result<Node, NodeError> {
        opts.check()?;
        if let Some(other) = DaemonFile::read(&opts.home) {
            if other.pid != std::process::id() && other.liveness() == Liveness::Running {
                return Err(NodeError::AlreadyRunning {
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
                .map_err(|source| NodeError::Bind { addr, source })?;
            Some(listener)
        } else {
            None
        };
        let api_addr = listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
            .map_err(NodeError::Serve)?;

        let engine = Engine::start(opts.engine.clone());
        let peer_id = opts.identity.peer_id().to_string();
        let local = LocalBackend::new(engine.clone(), peer_id.clone());

        let (mesh, event_loop) = mesh::new(opts.identity.keypair().clone(), opts.mesh.clone())?;
        let mut background = vec![tokio::spawn(event_loop.run())];
        let ledger = match Ledger::open(&opts.home) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the receipt ledger; receipts are not kept");
                None
            }
        };
        let stages = StageHost::with_receipts(opts.identity.keypair().clone(), ledger.clone());
        let infer = InferServer::with_stages(
            engine.clone(),
            opts.identity.keypair().clone(),
            ledger.clone(),
            ServerConfig {
                serve_mesh: opts.serve_mesh,
                access: opts.access.clone(),
                ..ServerConfig::default()
            },
            Arc::clone(&stages),
        );
        background.push(tokio::spawn(infer.run(mesh.streams())));
        background.push(tokio::spawn(Arc::clone(&stages).run(mesh.streams())));
        if opts.access.serve_to == crate::access::ServeTo::Trusted {
            tracing::info!(
                trusted = opts.access.trusted.len(),
                "serving trusted peers only: others are refused inference and model files"
            );
        }
        // Storage and full profiles serve their verified model files to peers.
        let blobs = opts.profile.serves_files().then(|| {
            let server =
                BlobServer::with_limits(&store, blob::MAX_STREAMS_PER_PEER, opts.serve_rate);
            server.set_access(opts.access.clone());
            server
        });
        let blob_stats = blobs
            .as_ref()
            .map_or_else(|| Arc::new(BlobStats::default()), |b| Arc::clone(b.stats()));
        if let Some(blobs) = &blobs {
            background.extend(provide::serve_files(&opts, &mesh, blobs).await);
        }
        let backend = NodeBackend::new(
            local.clone(),
            mesh.clone(),
            opts.profile,
            ledger,
            opts.route,
        )
        .with_stages(Arc::clone(&stages))
        .with_blobs(Arc::clone(&blob_stats), blobs.clone())
        .with_device(opts.device_name.clone(), opts.placement.fallback.clone());
        background.push(tokio::spawn(announce::announce(
            mesh.clone(),
            engine.clone(),
            local.clone(),
            opts.profile,
            (opts.device_name.clone(), opts.api),
            (blobs.clone(), Arc::clone(&stages)),
            opts.access.clone(),
        )));

        let state = AppState::new(backend.clone(), opts.api_config(peer_id.clone()));
        let app = pod_api::router(Arc::clone(&state));
        let daemon_file = DaemonFile::for_this_process(
            api_addr.map(|l| format!("http://{}", client_addr(l))),
            peer_id.clone(),
            opts.profile.to_string(),
            opts.device_name.clone(),
        );
        if let Err(e) = daemon_file.write(&opts.home) {
            tracing::warn!(error = %e, "cannot write daemon.json; `pod status` will not find this node");
        }
        match api_addr {
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

        let server_stop = CancellationToken::new();
        let stopped = server_stop.clone().cancelled_owned();
        // Without an API the "server" only waits for the stop, so the life cycle is the same.
        let server = tokio::spawn(async move {
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

        let started = Instant::now();
        let downloads = Arc::clone(&blob_stats);
        let start_timeout = tokio::spawn(signals::extend_start_timeout(move || {
            crate::progress::bytes_moved()
                + downloads
                    .bytes_fetched
                    .load(std::sync::atomic::Ordering::Relaxed)
        }));
        let models = if opts.models.is_empty() {
            opts.profile
                .default_models()
                .into_iter()
                .map(str::to_owned)
                .collect()
        } else {
            opts.models.clone()
        };
        let loading = tokio::spawn(
            ModelLoad {
                store,
                models,
                engine: engine.clone(),
                placement: opts.placement.clone(),
                pull: opts.pull,
                mesh,
                pull_opts: blob::PullOptions {
                    stats: Some(blob_stats),
                    bulk: opts.pull_bulk,
                },
                blobs,
                layers: opts.layers,
                max_memory: opts.max_memory,
                settle: auto_settle(opts.mesh.announce_interval),
                announce_interval: opts.mesh.announce_interval,
                stages,
            }
            .run(),
        );

        Ok(Node {
            home: opts.home,
            grace: opts.grace,
            started,
            engine,
            local,
            backend,
            api_addr,
            stop: CancellationToken::new(),
            server_stop,
            server,
            loading,
            start_timeout,
            background,
        })
    }

    /// Where the HTTP API listens; `None` without one.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// What the API serves from: the local engine, the mesh and its peers.
    pub fn backend(&self) -> &NodeBackend {
        &self.backend
    }

    /// Cancelling this token stops the node as ctrl-c or SIGTERM would.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for the models to load, then serves until ctrl-c, SIGTERM or the
    /// [`stop_token`](Node::stop_token), then lets in-flight requests finish for the grace
    /// period. A stop while loading stops at once.
    pub async fn run_until_stopped(self) -> Result<(), NodeError> {
        self.run_until(shutdown_signal()).await
    }

    /// [`run_until_stopped`](Node::run_until_stopped), with `signal` in place of ctrl-c and
    /// SIGTERM (e.g. `std::future::pending()` where only the token stops the node).
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<(), NodeError> {
        let token = self.stop.clone();
        let stop = async move {
            tokio::select! {
                () = signal => {}
                () = token.cancelled() => {}
            }
        };
        tokio::pin!(stop);

        let loaded = tokio::select! {
            loaded = &mut self.loading => loaded,
            () = &mut stop => {
                tracing::info!("stop requested while loading");
                self.server_stop.cancel();
                return Ok(());
            }
        };
        let loaded = loaded.map_err(NodeError::LoadPanicked).and_then(|r| r);
        if let Err(e) = loaded {
            self.server_stop.cancel();
            return Err(e);
        }
        self.start_timeout.abort();
        self.local.set_ready(true);
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!(
                "serving {} models",
                self.engine.models().len()
            )),
        ]);
        tracing::info!(
            models = self.engine.models().len(),
            seconds = self.started.elapsed().as_secs_f64(),
            "ready"
        );

        tokio::select! {
            result = &mut self.server => {
                return match result {
                    Ok(r) => r.map_err(NodeError::Serve),
                    Err(e) => Err(NodeError::ServerTask(e)),
                };
            }
            () = &mut stop => {}
        }
        tracing::info!(
            grace_seconds = self.grace.as_secs(),
            "stopping: finishing in-flight requests"
        );
        self.local.set_ready(false);
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
        self.server_stop.cancel();
        match tokio::time::timeout(self.grace, &mut self.server).await {
            Ok(_) => tracing::info!("stopped"),
            Err(_) => {
                self.server.abort();
                tracing::warn!("grace period over: cancelled the remaining requests");
            }
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A stop while loading leaves the load behind; a model already being read into memory
        // finishes on the blocking pool, unused.
        self.loading.abort();
        self.start_timeout.abort();
        for task in &self.background {
            task.abort();
        }
        self.server_stop.cancel();
        DaemonFile::remove_if_ours(&self.home);
    }
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

#[cfg(test)]
mod tests {
    use pod_api::ApiKeys;
    use pod_inference::{EngineConfig, Placement};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::backend::Route;
    use crate::identity::Identity;
    use crate::mesh::MeshConfig;
    use crate::profile::Profile;

    /// A relay node (no models) with its API and mesh on loopback ports the system picks.
    fn relay_options(home: &std::path::Path) -> StartOptions {
        StartOptions {
            identity: Identity::generate(),
            profile: Profile::Relay,
            models: Vec::new(),
            api: true,
            api_host: IpAddr::from([127, 0, 0, 1]),
            api_port: 0,
            api_keys: ApiKeys::default(),
            public_api: false,
            cors_origins: Vec::new(),
            placement: Placement::cpu(),
            device_name: "none".to_owned(),
            layers: None,
            max_memory: None,
            engine: EngineConfig::default(),
            pull: false,
            grace: Duration::from_secs(5),
            mesh: MeshConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                listen_optional: Vec::new(),
                mdns: false,
                ..MeshConfig::default()
            },
            home: home.to_path_buf(),
            serve_mesh: true,
            route: Route::Auto,
            serve_rate: 0,
            bulk_listen: Vec::new(),
            pull_bulk: false,
            access: crate::access::Access::default(),
        }
    }

    /// The status line of `GET /health`, or `None` when nothing answers.
    async fn health(addr: SocketAddr) -> Option<String> {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"GET /health HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply).await.ok()?;
        reply.lines().next().map(str::to_owned)
    }

    #[tokio::test]
    async fn a_started_node_becomes_ready_and_stops_on_its_token() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open_dir(&home.path().join("models")).unwrap();
        let node = Node::start(store, relay_options(home.path()))
            .await
            .unwrap();
        let addr = node.api_addr().unwrap();
        let recorded = DaemonFile::read(home.path()).unwrap();
        assert_eq!(recorded.pid, std::process::id());
        assert_eq!(recorded.api, Some(format!("http://{addr}")));
        assert_eq!(recorded.profile, "relay");

        let stop = node.stop_token();
        let running = tokio::spawn(node.run_until(std::future::pending()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = health(addr).await;
            if status.as_deref().is_some_and(|s| s.contains(" 200 ")) {
                break;
            }
            assert!(Instant::now() < deadline, "never ready: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        stop.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(3), running)
            .await
            .expect("the node did not stop within 3 s of its token");
        stopped.unwrap().unwrap();
        assert_eq!(DaemonFile::read(home.path()), None);
        assert_eq!(health(addr).await, None, "the API still answers");
    }

    #[tokio::test]
    async fn an_exposed_api_without_keys_is_refused_before_anything_starts() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open_dir(&home.path().join("models")).unwrap();
        let opts = StartOptions {
            api_host: IpAddr::from([0, 0, 0, 0]),
            ..relay_options(home.path())
        };
        let err = Node::start(store.clone(), opts.clone()).await.unwrap_err();
        assert!(matches!(err, NodeError::Refused(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("refusing to serve the API on 0.0.0.0"),
            "{msg}"
        );
        assert!(msg.contains("--public-api"), "{msg}");
        assert_eq!(DaemonFile::read(home.path()), None);

        // Keys, or saying it is public on purpose, let it start.
        let keyed = StartOptions {
            api_keys: ApiKeys::parse("sk-test\n"),
            ..opts.clone()
        };
        assert!(keyed.check().is_ok());
        let public = StartOptions {
            public_api: true,
            cors_origins: Vec::new(),
            ..opts
        };
        assert!(public.check().is_ok());
    }

    #[tokio::test]
    async fn a_second_node_on_the_same_home_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = ModelStore::open_dir(&home.path().join("models")).unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Another process's pid, with no start time to tell a reused pid by.
        let running = DaemonFile {
            pid: other.id(),
            process_start: None,
            ..DaemonFile::for_this_process(
                Some("http://127.0.0.1:1".to_owned()),
                String::new(),
                "relay".to_owned(),
                "none".to_owned(),
            )
        };
        running.write(home.path()).unwrap();
        let err = Node::start(store, relay_options(home.path()))
            .await
            .unwrap_err();
        other.kill().unwrap();
        other.wait().unwrap();
        match err {
            NodeError::AlreadyRunning { pid, api, .. } => {
                assert_eq!(pid, running.pid);
                assert_eq!(api.as_deref(), Some("http://127.0.0.1:1"));
            }
            e => panic!("expected AlreadyRunning, got {e:?}"),
        }
        // The other node's file stays.
        assert_eq!(DaemonFile::read(home.path()), Some(running));
    }
}
