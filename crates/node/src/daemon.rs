//! `pod start`: load the models, serve the API, stop gracefully on ctrl-c or SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pod_api::{ApiConfig, ApiKeys, AppState, LocalBackend};
use pod_inference::{DeviceSpec, Engine, EngineConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::loader::{self, ResolveError};
use crate::profile::Profile;
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
    let backend = LocalBackend::new(engine.clone(), peer_id.clone());
    let state = AppState::new(
        backend.clone(),
        ApiConfig {
            keys: opts.api_keys.clone(),
            node_name: peer_id.clone(),
            ..ApiConfig::default()
        },
    );
    let app = pod_api::router(Arc::clone(&state));
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
    let load = {
        let store = store.clone();
        let engine = engine.clone();
        let device = opts.device;
        let pull = opts.pull;
        tokio::task::spawn_blocking(move || -> Result<(), DaemonError> {
            for name in models {
                let resolved =
                    loader::resolve(&store, &name, pull).map_err(|source| DaemonError::Load {
                        model: name.clone(),
                        source: Box::new(source),
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
    backend.set_ready(true);
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
    backend.set_ready(false);
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
