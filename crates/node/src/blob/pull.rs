//! Pulling a model's files from peers: which pods provide each file (their capability
//! announcements first, then provider records in the DHT), and installing what was fetched.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;

use super::manifest::save_manifest;
use super::{fetch, FetchError, FetchReport, PullOptions};
use crate::store::ModelStore;

/// One file of a model pulled from peers.
#[derive(Debug, Clone, Serialize)]
pub struct PulledFile {
    /// The file's name in the model directory.
    pub file: String,
    /// Where its bytes came from.
    pub report: FetchReport,
}

/// Pulls the missing files of a catalogued model from `providers` (best first), verified chunk
/// by chunk and as a whole against the catalogue's pinned SHA-256, and installs them in the
/// store. Files already present are skipped.
pub async fn pull_missing_files(
    store: &ModelStore,
    entry: &crate::catalogue::CatalogueEntry,
    mesh: &crate::mesh::Client,
    providers: &[PeerId],
    opts: &PullOptions,
) -> Result<Vec<PulledFile>, FetchError> {
    let mut out = Vec::new();
    for file in entry.files {
        if store.file_present(entry, file) {
            continue;
        }
        out.push(pull_file(store, entry, file, mesh, providers, opts).await?);
    }
    Ok(out)
}

/// Fetches one file of `entry` from `providers` into its partial file and installs it in the
/// store once it matches the pinned SHA-256. The model's pull lock is held throughout, so a
/// concurrent pull of the model (from peers or its sources) neither writes the same partial
/// file nor installs the file twice; one that installed it meanwhile leaves nothing to fetch.
async fn pull_file(
    store: &ModelStore,
    entry: &crate::catalogue::CatalogueEntry,
    file: &crate::catalogue::FileSpec,
    mesh: &crate::mesh::Client,
    providers: &[PeerId],
    opts: &PullOptions,
) -> Result<PulledFile, FetchError> {
    let store_error =
        |e: crate::store::StoreError| FetchError::Io(std::io::Error::other(e.to_string()));
    let lock = {
        let (store, name) = (store.clone(), entry.name);
        tokio::task::spawn_blocking(move || store.lock_model(name))
            .await
            .map_err(|e| FetchError::Io(std::io::Error::other(e)))?
            .map_err(store_error)?
    };
    if store.file_present(entry, file) {
        tracing::info!(
            model = entry.name,
            file = file.name,
            "installed by another pull meanwhile"
        );
        return Ok(PulledFile {
            file: file.name.to_owned(),
            report: FetchReport::default(),
        });
    }
    let partial = store.partial_path(file.sha256);
    let report = fetch(mesh, providers, file.sha256, file.size, &partial, opts).await?;
    store
        .install_verified(&lock, entry, file, &partial)
        .map_err(store_error)?;
    drop(lock);
    // Every chunk checked against it: serving the file later needs no hashing.
    if let Some(m) = &report.manifest {
        save_manifest(
            &store.manifest_dir().join(format!("{}.json", file.sha256)),
            m,
        );
    }
    tracing::info!(
        model = entry.name,
        file = file.name,
        peers = report.bytes_from.len(),
        bulk = report.bulk_from.len(),
        resumed_chunks = report.chunks_reused,
        "pulled from peers"
    );
    Ok(PulledFile {
        file: file.name.to_owned(),
        report,
    })
}

/// Pods in `peers` that announce the file `sha256` and serve `local` (this node), connected
/// ones first, then by ping time.
pub fn providers_of(
    peers: &[crate::mesh::PeerSnapshot],
    sha256: &str,
    local: &PeerId,
) -> Vec<PeerId> {
    let mut found: Vec<(bool, Duration, PeerId)> = peers
        .iter()
        .filter(|p| {
            p.capabilities
                .as_ref()
                .is_some_and(|c| c.serves(local) && c.files.iter().any(|f| f == sha256))
        })
        .map(|p| (!p.connected, p.rtt.unwrap_or(Duration::MAX), p.peer_id))
        .collect();
    found.sort();
    found.into_iter().map(|(_, _, p)| p).collect()
}

/// The DHT key of a file: its SHA-256, as 32 bytes. Pods that serve a file put a provider
/// record under it.
pub fn dht_key(sha256: &str) -> Vec<u8> {
    hex::decode(sha256).unwrap_or_else(|_| sha256.as_bytes().to_vec())
}

/// Shortest gap between two DHT lookups of the same file while waiting for providers.
const DHT_RETRY: Duration = Duration::from_secs(1);

/// Pulls a catalogued model from the pods of the mesh that serve its files, waiting up to
/// `wait` for them to be heard of: through their capability announcements, or, for files no
/// announcement names, through provider records in the DHT. `Ok(None)` when no pod serves
/// every missing file, so the caller falls back to the catalogue's sources.
pub async fn pull_via_mesh(
    store: &ModelStore,
    entry: &crate::catalogue::CatalogueEntry,
    mesh: &crate::mesh::Client,
    wait: Duration,
    opts: &PullOptions,
) -> Result<Option<Vec<PulledFile>>, FetchError> {
    let missing: Vec<_> = entry
        .files
        .iter()
        .filter(|f| !store.file_present(entry, f))
        .collect();
    if missing.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let deadline = Instant::now() + wait;
    let mut providers: Vec<Vec<PeerId>> = vec![Vec::new(); missing.len()];
    let mut asked_dht: Vec<Option<Instant>> = vec![None; missing.len()];
    loop {
        let peers = mesh.peers().await.unwrap_or_default();
        for (file, found) in missing.iter().zip(providers.iter_mut()) {
            if found.is_empty() {
                *found = providers_of(&peers, file.sha256, &mesh.peer_id());
            }
        }
        for ((file, found), asked) in missing.iter().zip(providers.iter_mut()).zip(&mut asked_dht) {
            if !found.is_empty() || asked.is_some_and(|t| t.elapsed() < DHT_RETRY) {
                continue;
            }
            *asked = Some(Instant::now());
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(peers)) =
                tokio::time::timeout(left, mesh.providers(dht_key(file.sha256))).await
            {
                if !peers.is_empty() {
                    tracing::debug!(
                        file = file.name,
                        providers = peers.len(),
                        "providers found in the DHT"
                    );
                }
                *found = peers;
            }
        }
        if providers.iter().all(|p| !p.is_empty()) {
            break;
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut pulled = Vec::new();
    for (file, mut peers) in missing.into_iter().zip(providers) {
        loop {
            match pull_file(store, entry, file, mesh, &peers, opts).await {
                // No provider could be reached yet: one found in the DHT may be reachable only
                // at the relayed addresses its announcements carry, which arrive within the
                // announcement interval. Ask again while the wait lasts.
                Err(FetchError::NoManifest {
                    unreached: true, ..
                }) if Instant::now() + UNREACHED_RETRY < deadline => {
                    tokio::time::sleep(UNREACHED_RETRY).await;
                    let known = mesh.peers().await.unwrap_or_default();
                    for p in providers_of(&known, file.sha256, &mesh.peer_id()) {
                        if !peers.contains(&p) {
                            peers.push(p);
                        }
                    }
                    tracing::debug!(
                        file = file.name,
                        providers = peers.len(),
                        "asking the providers again"
                    );
                }
                done => {
                    pulled.push(done?);
                    break;
                }
            }
        }
    }
    Ok(Some(pulled))
}

/// How long a pull waits before asking again when no provider it found could be reached.
const UNREACHED_RETRY: Duration = Duration::from_secs(2);
