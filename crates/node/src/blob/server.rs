//! The serving side of `/pod/blob/1.0.0`: the index of files served, their manifests, the
//! per-peer limits, and requests served over mesh streams and bulk connections alike.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;

use super::bulk::{ChunkSink, Ticket};
use super::manifest::saved_manifest;
use super::protocol::{
    check_hash, read_frame_at, send_frame, BlobReply, BlobRequest, MAX_CHUNKS_PER_REQUEST,
    MAX_STREAMS_PER_PEER, PROTOCOL, REPLY_WAIT, TICKET_LEN,
};
use super::Manifest;
use crate::access::{Access, NOT_TRUSTED};
use crate::catalogue::CATALOGUE;
use crate::store::ModelStore;
use crate::wire::read_frame;

/// Distinct peers counted per served file (`peers_served`); beyond it the count stops.
pub const MAX_PEERS_COUNTED: usize = 10_000;

/// How long a bulk connection may stay idle between requests.
pub(super) const BULK_IDLE: Duration = Duration::from_secs(30);

/// A file this node serves.
#[derive(Debug, Clone)]
pub(super) struct Served {
    model: &'static str,
    file: &'static str,
    path: PathBuf,
    manifest: Option<Arc<Manifest>>,
    /// Peers that were sent chunks of it, up to [`MAX_PEERS_COUNTED`].
    served_to: HashSet<PeerId>,
    bytes_served: u64,
}

/// Counters of blob serving and fetching.
#[derive(Debug, Default)]
pub struct BlobStats {
    /// Bytes of chunks sent to peers.
    pub bytes_served: AtomicU64,
    /// Bytes of verified chunks received from peers.
    pub bytes_fetched: AtomicU64,
    /// Requests refused (unknown file, bad range, limits).
    pub refused: AtomicU64,
    /// Chunks received that failed verification.
    pub chunks_corrupt: AtomicU64,
    /// Streams being served now.
    pub active: AtomicU64,
}

/// What one peer is doing with this server: open streams, and when its next byte may go out
/// under the bandwidth limit.
#[derive(Debug)]
struct PeerUse {
    streams: usize,
    next_send: Instant,
}

/// Serves the verified files of a model store to peers, read-only.
#[derive(Debug)]
pub struct BlobServer {
    files: Mutex<HashMap<String, Served>>,
    per_peer: Mutex<HashMap<PeerId, PeerUse>>,
    pub(super) max_streams_per_peer: usize,
    bytes_per_sec_per_peer: u64,
    pub(super) stats: Arc<BlobStats>,
    /// The bulk TCP port; 0 while there is none.
    pub(super) bulk_port: AtomicU16,
    /// Bulk tickets not yet used.
    pub(super) tickets: Mutex<HashMap<[u8; TICKET_LEN], Ticket>>,
    /// Where the IPs a peer's bulk ticket is bound to are found; set when bulk connections
    /// are listened for.
    pub(super) bulk_mesh: std::sync::OnceLock<crate::mesh::Client>,
    /// Bulk connections waiting for their ticket, by host (an IPv4 address or IPv6 /64).
    pub(super) unticketed: Mutex<HashMap<IpAddr, usize>>,
    /// Where manifests are saved between runs.
    manifests: PathBuf,
    /// Held while a file is hashed for its manifest.
    hashing: tokio::sync::Mutex<()>,
    /// Which peers may pull files; others are refused on their first request.
    access: std::sync::RwLock<Access>,
}

/// One file a [`BlobServer`] serves, and how much of it went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFile {
    /// The catalogue model the file belongs to.
    pub model: String,
    /// The file's name in the model's directory.
    pub file: String,
    /// SHA-256 of the file, lowercase hex: its name on the mesh.
    pub sha256: String,
    /// Size in bytes (0 when the file cannot be read).
    pub size: u64,
    /// Distinct peers sent chunks of it since the server started, up to
    /// [`MAX_PEERS_COUNTED`].
    pub peers_served: usize,
    /// Bytes of it sent to peers since the server started.
    pub bytes_served: u64,
}

impl BlobServer {
    /// A server for every verified file of the catalogued models in `store`, with at most
    /// [`MAX_STREAMS_PER_PEER`] streams per peer and no bandwidth cap.
    pub fn new(store: &ModelStore) -> Arc<Self> {
        Self::with_limits(store, MAX_STREAMS_PER_PEER, 0)
    }

    /// A server with limits: streams per peer, and bytes per second per peer over all of its
    /// streams (0: none).
    pub fn with_limits(
        store: &ModelStore,
        streams_per_peer: usize,
        bytes_per_sec: u64,
    ) -> Arc<Self> {
        let server = Arc::new(Self {
            files: Mutex::new(HashMap::new()),
            per_peer: Mutex::new(HashMap::new()),
            max_streams_per_peer: streams_per_peer,
            bytes_per_sec_per_peer: bytes_per_sec,
            stats: Arc::new(BlobStats::default()),
            bulk_port: AtomicU16::new(0),
            tickets: Mutex::new(HashMap::new()),
            bulk_mesh: std::sync::OnceLock::new(),
            unticketed: Mutex::new(HashMap::new()),
            manifests: store.manifest_dir(),
            hashing: tokio::sync::Mutex::new(()),
            access: std::sync::RwLock::new(Access::default()),
        });
        server.add_present(store);
        server
    }

    /// Serves files only to the peers `access` allows (by default: any peer).
    pub fn set_access(&self, access: Access) {
        if let Ok(mut a) = self.access.write() {
            *a = access;
        }
    }

    /// Starts serving the verified files of catalogued models that arrived in `store` since
    /// (a model pulled while the node runs); returns how many files were added.
    pub fn add_present(&self, store: &ModelStore) -> usize {
        let Ok(mut files) = self.files.lock() else {
            return 0;
        };
        let mut added = 0;
        for entry in CATALOGUE {
            if !store.is_present(entry) {
                continue;
            }
            for f in entry.files {
                files.entry(f.sha256.to_owned()).or_insert_with(|| {
                    added += 1;
                    Served {
                        model: entry.name,
                        file: f.name,
                        path: store.model_dir(entry.name).join(f.name),
                        manifest: None,
                        served_to: HashSet::new(),
                        bytes_served: 0,
                    }
                });
            }
        }
        added
    }

    /// SHA-256 and size of every file served.
    pub fn files(&self) -> Vec<(String, u64)> {
        let Ok(files) = self.files.lock() else {
            return Vec::new();
        };
        files
            .iter()
            .filter_map(|(sha, s)| Some((sha.clone(), std::fs::metadata(&s.path).ok()?.len())))
            .collect()
    }

    /// Every file served with how much of it went to how many peers, by model and file name.
    pub fn served(&self) -> Vec<ServedFile> {
        let Ok(files) = self.files.lock() else {
            return Vec::new();
        };
        let mut out: Vec<ServedFile> = files
            .iter()
            .map(|(sha, s)| ServedFile {
                model: s.model.to_owned(),
                file: s.file.to_owned(),
                sha256: sha.clone(),
                size: std::fs::metadata(&s.path).map_or(0, |m| m.len()),
                peers_served: s.served_to.len(),
                bytes_served: s.bytes_served,
            })
            .collect();
        out.sort_by(|a, b| (&a.model, &a.file).cmp(&(&b.model, &b.file)));
        out
    }

    /// The counters; share them with [`super::fetch()`] to count both directions in one place.
    pub fn stats(&self) -> &Arc<BlobStats> {
        &self.stats
    }

    /// Records `bytes` of `sha256` sent to `peer`.
    pub(super) fn record_sent(&self, peer: PeerId, sha256: &str, bytes: u64) {
        self.stats.bytes_served.fetch_add(bytes, Ordering::Relaxed);
        if let Ok(mut files) = self.files.lock() {
            if let Some(s) = files.get_mut(sha256) {
                // Past the cap the count stays put rather than the set growing without end.
                if s.served_to.len() < MAX_PEERS_COUNTED {
                    s.served_to.insert(peer);
                }
                s.bytes_served += bytes;
            }
        }
    }

    /// How long to wait before sending `bytes` more to `peer` under the per-peer bandwidth
    /// limit; reserves the slot.
    pub(super) fn pace(&self, peer: PeerId, bytes: u64) -> Duration {
        if self.bytes_per_sec_per_peer == 0 {
            return Duration::ZERO;
        }
        let Ok(mut per_peer) = self.per_peer.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let Some(p) = per_peer.get_mut(&peer) else {
            return Duration::ZERO;
        };
        let start = p.next_send.max(now);
        p.next_send =
            start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec_per_peer as f64);
        start - now
    }

    /// The manifest of a served file, computed on first use.
    async fn manifest(&self, sha256: &str) -> Result<(PathBuf, Arc<Manifest>), String> {
        let served = |files: &Mutex<HashMap<String, Served>>| {
            let files = files.lock().map_err(|_| "index poisoned".to_owned())?;
            files
                .get(sha256)
                .map(|s| (s.path.clone(), s.manifest.clone()))
                .ok_or_else(|| "no such file here".to_owned())
        };
        if let (path, Some(m)) = served(&self.files)? {
            return Ok((path, m));
        }
        // One file is hashed at a time; whoever waited may find it done.
        let _hashing = self.hashing.lock().await;
        let (path, known) = served(&self.files)?;
        if let Some(m) = known {
            return Ok((path, m));
        }
        let saved = self.manifests.join(format!("{sha256}.json"));
        // (A file pulled from peers has the manifest it was checked against saved there.)
        let (file, sha) = (path.clone(), sha256.to_owned());
        let manifest = tokio::task::spawn_blocking(move || saved_manifest(&saved, &file, &sha))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let manifest = Arc::new(manifest);
        if manifest.sha256 != sha256 {
            return Err("the stored file no longer matches its hash".into());
        }
        if let Ok(mut files) = self.files.lock() {
            if let Some(s) = files.get_mut(sha256) {
                s.manifest = Some(Arc::clone(&manifest));
            }
        }
        Ok((path, manifest))
    }

    /// Makes the manifests of every served file that has none yet, one after another, so the
    /// first requests do not wait for a whole file to be hashed. Loaded from the store's
    /// `.manifests` directory when saved there before.
    pub async fn prepare_manifests(&self) {
        let missing: Vec<String> = self.files.lock().map_or_else(
            |_| Vec::new(),
            |files| {
                files
                    .iter()
                    .filter(|(_, s)| s.manifest.is_none())
                    .map(|(sha, _)| sha.clone())
                    .collect()
            },
        );
        for sha256 in missing {
            let started = Instant::now();
            match self.manifest(&sha256).await {
                Ok((path, m)) => tracing::debug!(
                    file = %path.display(),
                    chunks = m.chunks.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "manifest ready"
                ),
                Err(e) => tracing::warn!(sha256, error = %e, "cannot make a manifest"),
            }
        }
    }

    /// Accepts streams until the mesh stops.
    pub async fn run(self: Arc<Self>, control: libp2p_stream::Control) {
        crate::mesh::serve_streams(control, PROTOCOL, move |peer, stream| {
            let server = Arc::clone(&self);
            async move { server.handle(peer, stream).await }
        })
        .await;
    }

    async fn handle(&self, peer: PeerId, stream: libp2p::Stream) {
        let (mut rd, mut wr) = stream.split();
        self.session(peer, &mut rd, &mut wr, false).await;
    }

    /// Serves one peer's stream, or bulk connection (`bulk`: request after request until it
    /// closes or idles), as one of that peer's streams under the limits.
    pub(super) async fn session<R, W>(&self, peer: PeerId, rd: &mut R, wr: &mut W, bulk: bool)
    where
        R: AsyncRead + Unpin,
        W: ChunkSink,
    {
        // Mesh streams and bulk connections alike (a bulk ticket is only given over a stream
        // that passed this check, and the connection counts as the ticket holder's).
        let allowed = self
            .access
            .read()
            .map_or(Err(NOT_TRUSTED), |a| a.check(&peer));
        if let Err(why) = allowed {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, bulk, reason = why, "refused a peer's file request: not trusted");
            let _ = send_frame(wr, &BlobReply::Error(why.to_owned())).await;
            let _ = tokio::time::timeout(REPLY_WAIT, wr.close()).await;
            return;
        }
        let admitted = self.per_peer.lock().is_ok_and(|mut m| {
            let now = Instant::now();
            // Forget idle peers whose pacing no longer holds anything back.
            m.retain(|_, p| p.streams > 0 || p.next_send > now);
            let p = m.entry(peer).or_insert(PeerUse {
                streams: 0,
                next_send: now,
            });
            if p.streams >= self.max_streams_per_peer {
                false
            } else {
                p.streams += 1;
                true
            }
        });
        if !admitted {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = send_frame(wr, &BlobReply::Error("too many streams".into())).await;
            let _ = tokio::time::timeout(REPLY_WAIT, wr.close()).await;
            return;
        }
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        loop {
            let request = if bulk {
                match tokio::time::timeout(BULK_IDLE, read_frame(rd, 4096)).await {
                    // Closed or idle between requests: the peer is done.
                    Err(_) | Ok(Err(crate::wire::FrameError::Io(_))) => break,
                    Ok(r) => r.map_err(|e| e.to_string()),
                }
            } else {
                match tokio::time::timeout(Duration::from_secs(10), read_frame(rd, 4096)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("no request in time".to_owned()),
                }
            };
            let served = match request {
                Ok(request) => self.serve(peer, request, wr, bulk).await,
                Err(e) => Err(Failure::Refused(e)),
            };
            match served {
                Ok(()) if bulk => continue,
                Ok(()) => break,
                Err(Failure::Refused(e)) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, bulk, "blob request refused");
                    let _ = send_frame(wr, &BlobReply::Error(e)).await;
                    break;
                }
                // The reply was under way: nothing more can be said on this stream.
                Err(Failure::Broken(e)) => {
                    tracing::debug!(%peer, error = %e, bulk, "blob stream broke");
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(REPLY_WAIT, wr.close()).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut m) = self.per_peer.lock() {
            if let Some(p) = m.get_mut(&peer) {
                p.streams = p.streams.saturating_sub(1);
            }
        }
    }

    async fn serve<W>(
        &self,
        peer: PeerId,
        request: BlobRequest,
        wr: &mut W,
        bulk: bool,
    ) -> Result<(), Failure>
    where
        W: ChunkSink,
    {
        match request {
            BlobRequest::Bulk if bulk => Err(Failure::Refused(
                "ask for bulk tickets over the mesh".into(),
            )),
            BlobRequest::Bulk => {
                let (port, ticket) = self.ticket(peer).await.map_err(Failure::Refused)?;
                let reply = BlobReply::Bulk {
                    port,
                    ticket: hex::encode(ticket),
                };
                send_frame(wr, &reply).await.map_err(Failure::Broken)
            }
            BlobRequest::Manifest { sha256 } => {
                check_hash(&sha256).map_err(Failure::Refused)?;
                let (_, manifest) = self.manifest(&sha256).await.map_err(Failure::Refused)?;
                send_frame(wr, &BlobReply::Manifest((*manifest).clone()))
                    .await
                    .map_err(Failure::Broken)
            }
            BlobRequest::Chunks {
                sha256,
                first,
                count,
            } => {
                check_hash(&sha256).map_err(Failure::Refused)?;
                if count == 0 || count > MAX_CHUNKS_PER_REQUEST {
                    return Err(Failure::Refused(format!(
                        "ask for 1 to {MAX_CHUNKS_PER_REQUEST} chunks"
                    )));
                }
                let (path, manifest) = self.manifest(&sha256).await.map_err(Failure::Refused)?;
                let end = first as u64 + count as u64;
                if end > manifest.chunks.len() as u64 {
                    return Err(Failure::Refused("range beyond the end of the file".into()));
                }
                let file = File::open(&path).map_err(|e| Failure::Refused(e.to_string()))?;
                let file = Arc::new(file);
                send_frame(wr, &BlobReply::Chunks)
                    .await
                    .map_err(Failure::Broken)?;
                let broken = |e: std::io::Error| Failure::Broken(e.to_string());
                if let Some(socket) = wr.socket() {
                    return self
                        .send_chunks_direct(socket, peer, &sha256, &manifest, &file, first, count)
                        .await;
                }
                // Reads chunk `index` into `buf` on the blocking pool, as one frame.
                let read = |index: u32, buf: Vec<u8>| {
                    let file = Arc::clone(&file);
                    let len = manifest.chunk_len(index as usize);
                    let offset = index as u64 * manifest.chunk_size;
                    tokio::task::spawn_blocking(move || read_frame_at(&file, offset, len, buf))
                };
                // One chunk is read from disk while the one before goes out; the two buffers
                // take turns, so no chunk costs a fresh allocation.
                let mut spare = Vec::new();
                let mut next = Some(read(first, Vec::new()));
                for index in first..first + count {
                    let Some(reading) = next.take() else { break };
                    let frame = reading
                        .await
                        .map_err(|e| Failure::Broken(e.to_string()))?
                        .map_err(broken)?;
                    if index + 1 < first + count {
                        next = Some(read(index + 1, std::mem::take(&mut spare)));
                    }
                    let len = (frame.len() - 4) as u64;
                    let wait = self.pace(peer, len);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    wr.write_all(&frame).await.map_err(broken)?;
                    self.record_sent(peer, &sha256, len);
                    spare = frame;
                }
                wr.flush().await.map_err(broken)
            }
        }
    }
}

/// Why a request was not served.
#[derive(Debug)]
pub(super) enum Failure {
    /// Refused before the reply began: the requester is told why.
    Refused(String),
    /// The stream broke while the reply went out.
    Broken(String),
}
