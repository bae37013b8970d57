//! Why a node could not start or stopped with a failure.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::task::JoinError;

use crate::loader::ResolveError;
use crate::mesh::MeshError;

/// The node could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    /// Pulling or loading the models panicked.
    #[error("model loading panicked: {0}")]
    LoadPanicked(JoinError),
    /// Serving failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
    /// The task serving the API panicked or was cancelled.
    #[error("API server task failed: {0}")]
    ServerTask(JoinError),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_errors_say_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let source = std::net::TcpListener::bind(addr).unwrap_err();
        let msg = NodeError::Bind { addr, source }.to_string();
        assert!(msg.contains("--api-port"), "{msg}");
    }
}
