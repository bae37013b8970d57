//! Providing the node's model files to peers: the blob server's tasks, and provider records in
//! the DHT so that pulling pods find the node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::StartOptions;
use crate::blob::{self, BlobServer};
use crate::mesh::{self, MeshError};

/// How often the provider records of served files are renewed in the DHT.
const REPROVIDE_INTERVAL: Duration = Duration::from_secs(600);

/// Puts a provider record in the DHT for every file `blobs` serves: at once, for files added
/// later, every [`REPROVIDE_INTERVAL`], and again when a peer connects and the last records
/// are older than 30 s (the newcomer may be closer to the files' keys than any earlier peer).
pub(super) async fn provide_files(mesh: mesh::Client, blobs: Arc<BlobServer>) {
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

/// Starts serving the node's model files to peers: over the mesh, over bulk connections when
/// `opts` says where to listen, with manifests prepared and provider records in the DHT.
/// Returns the tasks it spawned.
pub(super) async fn serve_files(
    opts: &StartOptions,
    mesh: &mesh::Client,
    blobs: &Arc<BlobServer>,
) -> Vec<JoinHandle<()>> {
    let bulk = if opts.bulk_listen.is_empty() {
        None
    } else {
        match blobs.listen_bulk(&opts.bulk_listen, mesh).await {
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
    let preparing = Arc::clone(blobs);
    vec![
        tokio::spawn(Arc::clone(blobs).run(mesh.streams())),
        tokio::spawn(async move { preparing.prepare_manifests().await }),
        tokio::spawn(provide_files(mesh.clone(), Arc::clone(blobs))),
    ]
}
