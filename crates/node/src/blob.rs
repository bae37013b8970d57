//! `/pod/blob/1.0.0`: pods share the model files they hold.
//!
//! A file is named by the SHA-256 of its content and described by a [`Manifest`]: its size and,
//! for every [`CHUNK_SIZE`] chunk, SHA-256's chaining value after that chunk (the last one is
//! the file's SHA-256 itself). A chunk is checked alone by running SHA-256's compression over
//! it from the value before it, so checking every chunk is checking the whole file against its
//! pinned SHA-256, with one pass of hashing. A requester asks a provider for the manifest, then
//! for ranges of chunks, verifies each chunk before writing it, and spreads the ranges over
//! several providers and several streams per provider. A chunk that fails verification is
//! fetched again elsewhere and its provider is dropped after [`MAX_STRIKES`] bad chunks. The
//! partial file keeps its name between attempts, so an interrupted download resumes from the
//! chunks that verify.
//!
//! Frames: a 4-byte big-endian length and JSON for requests and replies; chunk data follows a
//! `Chunks` reply as raw length-prefixed frames. Requests name files only by hash, so a peer can
//! never reach a path: the server looks the hash up in its own index of verified store files.
//!
//! Bulk connections: a server may also listen on a plain TCP port (by default the mesh port
//! plus one). A peer asks for a [`BlobRequest::Bulk`] ticket over the mesh, where the peer is
//! authenticated and the stream encrypted; the ticket is 32 random bytes, good for one
//! connection within [`TICKET_TTL`]. The peer opens a TCP connection to that port at the IP
//! address its mesh connection reaches, sends the ticket, and then makes the same requests
//! as on a mesh stream, one after another, on that connection, counted as one of its streams
//! under the same limits. The data skips Noise and Yamux, which is where most of a pull's CPU
//! went: its integrity does not rest on the transport, since every chunk is checked against
//! the manifest, whose last value is the catalogue's pinned SHA-256. What is lost is only
//! secrecy: an observer of the network sees which public model file is fetched. A pod that
//! wants none of that serves and pulls over the mesh alone (`--no-bulk`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU16;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use pod_api::node::FileView;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalogue::CATALOGUE;
use crate::store::ModelStore;
use crate::wire::{read_frame, write_frame};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/blob/1.0.0");

/// Bytes per chunk.
pub const CHUNK_SIZE: u64 = 1024 * 1024;

/// Most chunks one request may ask for.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 16;

/// Streams a server takes from one peer at once by default: twice what a requester opens
/// ([`STREAMS_PER_PROVIDER`]), so a stream that is closing never gets a new one refused.
pub const MAX_STREAMS_PER_PEER: usize = 8;

/// Bad chunks after which a provider is dropped from a download.
pub const MAX_STRIKES: u32 = 2;

/// How long a bulk ticket may wait for its connection.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Bytes in a bulk ticket.
pub const TICKET_LEN: usize = 32;

/// Bulk connections that may wait at once for their ticket; more are closed at once.
const MAX_UNTICKETED: usize = 64;

/// Bulk connections from one IP address that may wait at once for their ticket.
const MAX_UNTICKETED_PER_IP: usize = 8;

/// How long a bulk connection may take to send its ticket.
const TICKET_WAIT: Duration = Duration::from_secs(2);

/// How long a bulk connection may stay idle between requests.
const BULK_IDLE: Duration = Duration::from_secs(30);

/// Distinct peers counted per served file (`peers_served`); beyond it the count stops.
pub const MAX_PEERS_COUNTED: usize = 10_000;

/// Largest JSON frame (a manifest of a 64 GiB file is about 4.5 MB).
const MAX_JSON_FRAME: usize = 8 * 1024 * 1024;

/// What a file is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u64,
    /// SHA-256 of each chunk, lowercase hex.
    pub chunks: Vec<String>,
}

impl Manifest {
    /// Hashes a file into a manifest.
    pub fn of_file(path: &Path) -> std::io::Result<Manifest> {
        use std::io::Read;
        let mut file = File::open(path)?;
        let size = file.metadata()?.len();
        let count = size.div_ceil(CHUNK_SIZE) as usize;
        let mut chunks = Vec::with_capacity(count);
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut state = SHA256_IV;
        for index in 0..count {
            let len = CHUNK_SIZE.min(size - index as u64 * CHUNK_SIZE) as usize;
            file.read_exact(&mut buf[..len])?;
            state = if index + 1 == count {
                sha256_finish(&state, &buf[..len], size)
            } else {
                sha256_chain(&state, &buf[..len])
            };
            chunks.push(state_hex(&state));
        }
        Ok(Manifest {
            sha256: chunks
                .last()
                .cloned()
                .unwrap_or_else(|| hex::encode(Sha256::digest([]))),
            size,
            chunk_size: CHUNK_SIZE,
            chunks,
        })
    }

    /// Whether the manifest is consistent with a file of `sha256` and `size`: if it is, a file
    /// whose every chunk verifies hashes to `sha256`.
    fn matches(&self, sha256: &str, size: u64) -> bool {
        self.sha256 == sha256
            && self.size == size
            && self.chunk_size == CHUNK_SIZE
            && self.chunks.len() as u64 == size.div_ceil(CHUNK_SIZE)
            && self
                .chunks
                .last()
                .map_or(hex::encode(Sha256::digest([])) == sha256, |last| {
                    last == sha256
                })
    }

    /// Whether `data` is chunk `index` of the file: SHA-256 run over it from the chaining value
    /// before it gives the one after it.
    pub fn verify_chunk(&self, index: usize, data: &[u8]) -> bool {
        if index >= self.chunks.len() || data.len() as u64 != self.chunk_len(index) {
            return false;
        }
        let before = match index {
            0 => SHA256_IV,
            _ => match parse_state(&self.chunks[index - 1]) {
                Some(s) => s,
                None => return false,
            },
        };
        let after = if index + 1 == self.chunks.len() {
            sha256_finish(&before, data, self.size)
        } else {
            sha256_chain(&before, data)
        };
        state_hex(&after) == self.chunks[index]
    }

    fn chunk_len(&self, index: usize) -> u64 {
        let start = index as u64 * self.chunk_size;
        self.chunk_size.min(self.size.saturating_sub(start))
    }
}

/// SHA-256's initial chaining value (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256's compression over whole 64-byte blocks of `data` from `state`.
fn sha256_chain(state: &[u32; 8], data: &[u8]) -> [u32; 8] {
    let mut s = *state;
    for block in data.chunks_exact(64) {
        sha2::compress256(
            &mut s,
            std::slice::from_ref(sha2::digest::generic_array::GenericArray::from_slice(block)),
        );
    }
    s
}

/// The end of SHA-256: the last bytes of the message from `state`, then the padding with the
/// message's length `total` in bytes. The result, written big-endian, is the digest.
fn sha256_finish(state: &[u32; 8], data: &[u8], total: u64) -> [u32; 8] {
    let whole = data.len() / 64 * 64;
    let state = sha256_chain(state, &data[..whole]);
    let rest = &data[whole..];
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let end = if rest.len() + 9 <= 64 { 64 } else { 128 };
    tail[end - 8..end].copy_from_slice(&total.wrapping_mul(8).to_be_bytes());
    sha256_chain(&state, &tail[..end])
}

/// A chaining value as 64 lowercase hex digits (the digest's form).
fn state_hex(state: &[u32; 8]) -> String {
    hex::encode(
        state
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect::<Vec<u8>>(),
    )
}

fn parse_state(text: &str) -> Option<[u32; 8]> {
    let bytes = hex::decode(text).ok()?;
    if bytes.len() != 32 {
        return None;
    }
    let mut state = [0u32; 8];
    for (w, b) in state.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    }
    Some(state)
}

/// A request for file data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobRequest {
    /// The manifest of a file.
    Manifest {
        /// The file's SHA-256.
        sha256: String,
    },
    /// Chunks `first..first + count` of a file.
    Chunks {
        /// The file's SHA-256.
        sha256: String,
        /// First chunk index.
        first: u32,
        /// How many.
        count: u32,
    },
    /// A ticket for a bulk connection (see the module's documentation). Only over the mesh.
    Bulk,
}

/// The answer to a [`BlobRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobReply {
    /// The manifest.
    Manifest(Manifest),
    /// The chunks follow as raw frames.
    Chunks,
    /// A bulk ticket: connect to `port` at this server's IP address and send `ticket`.
    Bulk {
        /// The server's bulk TCP port.
        port: u16,
        /// The ticket, lowercase hex of [`TICKET_LEN`] bytes.
        ticket: String,
    },
    /// Refused.
    Error(String),
}

/// A file this node serves.
#[derive(Debug, Clone)]
struct Served {
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
    max_streams_per_peer: usize,
    bytes_per_sec_per_peer: u64,
    stats: Arc<BlobStats>,
    /// The bulk TCP port; 0 while there is none.
    bulk_port: AtomicU16,
    /// Bulk tickets not yet used: which peer each was given to, and until when it holds.
    tickets: Mutex<HashMap<[u8; TICKET_LEN], (PeerId, Instant)>>,
    /// Bulk connections waiting for their ticket.
    unticketed: Mutex<HashMap<IpAddr, usize>>,
    /// Where manifests are saved between runs.
    manifests: PathBuf,
    /// Held while a file is hashed for its manifest.
    hashing: tokio::sync::Mutex<()>,
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
            unticketed: Mutex::new(HashMap::new()),
            manifests: store.manifest_dir(),
            hashing: tokio::sync::Mutex::new(()),
        });
        server.add_present(store);
        server
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
    pub fn served(&self) -> Vec<FileView> {
        let Ok(files) = self.files.lock() else {
            return Vec::new();
        };
        let mut out: Vec<FileView> = files
            .iter()
            .map(|(sha, s)| FileView {
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

    /// The counters; share them with [`fetch`] to count both directions in one place.
    pub fn stats(&self) -> &Arc<BlobStats> {
        &self.stats
    }

    /// Records `bytes` of `sha256` sent to `peer`.
    fn record_sent(&self, peer: PeerId, sha256: &str, bytes: u64) {
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
    fn pace(&self, peer: PeerId, bytes: u64) -> Duration {
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

    /// Listens for bulk connections at `addrs` (their IPs; the port of the first, 0 for any
    /// free one, and the port it got for the others) until the process ends; returns the port.
    /// Fails only when the first address cannot be bound; the others are skipped.
    pub async fn listen_bulk(self: &Arc<Self>, addrs: &[SocketAddr]) -> std::io::Result<u16> {
        let Some(first) = addrs.first() else {
            return Err(std::io::Error::other("no address to listen on"));
        };
        let listener = bulk_listener(*first)?;
        let port = listener.local_addr()?.port();
        let mut listeners = vec![listener];
        for addr in &addrs[1..] {
            match bulk_listener(SocketAddr::new(addr.ip(), port)) {
                Ok(l) => listeners.push(l),
                // E.g. no IPv6 on this host.
                Err(e) => {
                    tracing::debug!(ip = %addr.ip(), port, error = %e, "cannot listen for bulk connections")
                }
            }
        }
        self.bulk_port.store(port, Ordering::Relaxed);
        for listener in listeners {
            let server = Arc::clone(self);
            tokio::spawn(async move { server.accept_bulk(listener).await });
        }
        Ok(port)
    }

    /// The bulk TCP port, if this server listens on one.
    pub fn bulk_port(&self) -> Option<u16> {
        Some(self.bulk_port.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Gives `peer` a ticket for one bulk connection.
    fn ticket(&self, peer: PeerId) -> Result<(u16, [u8; TICKET_LEN]), String> {
        let port = self.bulk_port().ok_or_else(|| NO_BULK.to_owned())?;
        let mut tickets = self
            .tickets
            .lock()
            .map_err(|_| "tickets poisoned".to_owned())?;
        let now = Instant::now();
        tickets.retain(|_, (_, until)| *until > now);
        if tickets.values().filter(|(p, _)| *p == peer).count() >= self.max_streams_per_peer {
            return Err("too many unused bulk tickets".into());
        }
        let ticket: [u8; TICKET_LEN] = rand::random();
        tickets.insert(ticket, (peer, now + TICKET_TTL));
        Ok((port, ticket))
    }

    /// Takes back a ticket: the peer it was given to, if it is valid.
    fn redeem(&self, ticket: &[u8; TICKET_LEN]) -> Option<PeerId> {
        let (peer, until) = self.tickets.lock().ok()?.remove(ticket)?;
        (until > Instant::now()).then_some(peer)
    }

    async fn accept_bulk(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (socket, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a bulk connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !self.await_ticket(from.ip()) {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Chunk frames go out as soon as they are written.
            let _ = socket.set_nodelay(true);
            let server = Arc::clone(&self);
            tokio::spawn(async move { server.bulk_connection(socket, from).await });
        }
    }

    /// Whether a new connection from `ip` may wait for its ticket: only while tickets are out,
    /// and within [`MAX_UNTICKETED`] waiting connections, [`MAX_UNTICKETED_PER_IP`] per
    /// address, so no single host can crowd out the others.
    fn await_ticket(&self, ip: IpAddr) -> bool {
        if self.tickets.lock().map_or(true, |t| t.is_empty()) {
            return false;
        }
        let Ok(mut waiting) = self.unticketed.lock() else {
            return false;
        };
        let total: usize = waiting.values().sum();
        let from_ip = waiting.entry(ip).or_insert(0);
        if total >= MAX_UNTICKETED || *from_ip >= MAX_UNTICKETED_PER_IP {
            if *from_ip == 0 {
                waiting.remove(&ip);
            }
            return false;
        }
        *from_ip += 1;
        true
    }

    /// A bulk connection: its ticket, then requests as on a stream of the peer it names.
    async fn bulk_connection(&self, socket: tokio::net::TcpStream, from: SocketAddr) {
        use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
        let (rd, wr) = socket.into_split();
        let (mut rd, mut wr) = (rd.compat(), wr.compat_write());
        let mut ticket = [0u8; TICKET_LEN];
        let read = tokio::time::timeout(TICKET_WAIT, rd.read_exact(&mut ticket)).await;
        if let Ok(mut waiting) = self.unticketed.lock() {
            if let Some(n) = waiting.get_mut(&from.ip()) {
                *n -= 1;
                if *n == 0 {
                    waiting.remove(&from.ip());
                }
            }
        }
        let peer = match read {
            Ok(Ok(())) => self.redeem(&ticket),
            _ => None,
        };
        let Some(peer) = peer else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "bulk connection without a valid ticket refused");
            return;
        };
        tracing::debug!(%peer, %from, "bulk connection");
        self.session(peer, &mut rd, &mut wr, true).await;
    }

    async fn handle(&self, peer: PeerId, stream: libp2p::Stream) {
        let (mut rd, mut wr) = stream.split();
        self.session(peer, &mut rd, &mut wr, false).await;
    }

    /// Serves one peer's stream, or bulk connection (`bulk`: request after request until it
    /// closes or idles), as one of that peer's streams under the limits.
    async fn session<R, W>(&self, peer: PeerId, rd: &mut R, wr: &mut W, bulk: bool)
    where
        R: AsyncRead + Unpin,
        W: ChunkSink,
    {
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
                let (port, ticket) = self.ticket(peer).map_err(Failure::Refused)?;
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
                    // A bulk connection: the kernel sends from the page cache, while the
                    // blocking pool asks it to read the next chunk ahead from disk.
                    let ahead = |index: u32| {
                        let file = Arc::clone(&file);
                        let len = manifest.chunk_len(index as usize);
                        let offset = index as u64 * manifest.chunk_size;
                        tokio::task::spawn_blocking(move || {
                            use rustix::fs::{fadvise, Advice};
                            let _ = fadvise(
                                &*file,
                                offset,
                                std::num::NonZeroU64::new(len),
                                Advice::WillNeed,
                            );
                        })
                    };
                    let _ = ahead(first).await;
                    for index in first..first + count {
                        if index + 1 < first + count {
                            drop(ahead(index + 1));
                        }
                        let len = manifest.chunk_len(index as usize);
                        let wait = self.pace(peer, len);
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        let offset = index as u64 * manifest.chunk_size;
                        tokio::time::timeout(BULK_IDLE, send_chunk(socket, &file, offset, len))
                            .await
                            .map_err(|_| Failure::Broken("the peer stopped reading".into()))?
                            .map_err(broken)?;
                        self.record_sent(peer, &sha256, len);
                    }
                    return Ok(());
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

/// A listening socket for bulk connections; an IPv6 one takes IPv6 only, so `::` and `0.0.0.0`
/// can both be bound on one port, as the mesh does.
fn bulk_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        let socket = tokio::net::TcpSocket::new_v6()?;
        rustix::net::sockopt::set_ipv6_v6only(&socket, true)?;
        socket
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Where a server's replies and chunks go.
trait ChunkSink: AsyncWrite + Unpin {
    /// The plain TCP socket under this writer, which chunks can be sent down with sendfile(2).
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

impl ChunkSink for futures::io::WriteHalf<libp2p::Stream> {}

impl ChunkSink for tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf> {
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        Some(self.get_ref().as_ref())
    }
}

/// Sends a chunk frame down a bulk connection's socket: its length, then `len` bytes of `file`
/// at `offset` with sendfile(2), from the page cache to the socket without passing through this
/// process. A chunk not in the page cache is read during the call (the caller has the next one
/// read ahead).
async fn send_chunk(
    socket: &tokio::net::TcpStream,
    file: &File,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let header = u32::try_from(len)
        .map_err(std::io::Error::other)?
        .to_be_bytes();
    let mut written = 0;
    while written < header.len() {
        socket.writable().await?;
        match socket.try_write(&header[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let (mut at, end) = (offset, offset + len);
    while at < end {
        socket.writable().await?;
        let left = (end - at) as usize;
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            rustix::fs::sendfile(socket, file, Some(&mut at), left).map_err(std::io::Error::from)
        }) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a reply may take to go out.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// Writes a reply frame, giving up after [`REPLY_WAIT`] (a peer that stops reading).
async fn send_frame<W: AsyncWrite + Unpin, T: Serialize>(
    wr: &mut W,
    frame: &T,
) -> Result<(), String> {
    tokio::time::timeout(REPLY_WAIT, write_frame(wr, frame))
        .await
        .map_err(|_| "the peer stopped reading".to_owned())?
        .map_err(|e| e.to_string())
}

/// Why a request was not served.
#[derive(Debug)]
enum Failure {
    /// Refused before the reply began: the requester is told why.
    Refused(String),
    /// The stream broke while the reply went out.
    Broken(String),
}

/// The manifest of `file`, which should hash to `sha256`: the one saved at `saved` when it
/// describes a file of this size and hash, else made by hashing the file and saved there
/// (written whole, then renamed into place). The last chaining value of a saved manifest must be
/// `sha256`; a manifest damaged elsewhere would only make chunks fail their check at the
/// requester, which drops this provider.
fn saved_manifest(saved: &Path, file: &Path, sha256: &str) -> std::io::Result<Manifest> {
    let size = std::fs::metadata(file)?.len();
    if let Ok(text) = std::fs::read(saved) {
        match serde_json::from_slice::<Manifest>(&text) {
            Ok(m) if m.matches(sha256, size) => return Ok(m),
            _ => tracing::warn!(path = %saved.display(), "ignoring a damaged saved manifest"),
        }
    }
    let manifest = Manifest::of_file(file)?;
    if manifest.sha256 == sha256 {
        save_manifest(saved, &manifest);
    }
    Ok(manifest)
}

/// Saves a manifest at `saved`, written whole and then renamed into place; a failure is only
/// logged (the manifest can be made again).
fn save_manifest(saved: &Path, manifest: &Manifest) {
    let write = || -> std::io::Result<()> {
        let dir = saved.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, manifest)?;
        tmp.as_file().sync_all()?;
        tmp.persist(saved).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(path = %saved.display(), error = %e, "cannot save a manifest");
    }
}

fn check_hash(sha256: &str) -> Result<(), String> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err("files are named by a lowercase hex SHA-256".into())
    }
}

/// Reads `len` bytes at `offset` into `buf` as a chunk frame: their length (4 bytes, big-endian)
/// then the bytes. `buf` is reused; it is only zeroed where it grows.
fn read_frame_at(file: &File, offset: u64, len: u64, mut buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let header = u32::try_from(len).map_err(std::io::Error::other)?;
    buf.resize(4 + len as usize, 0);
    buf[..4].copy_from_slice(&header.to_be_bytes());
    file.read_exact_at(&mut buf[4..], offset)?;
    Ok(buf)
}

/// Where the bytes of a download came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FetchReport {
    /// Verified bytes per provider.
    pub bytes_from: Vec<(PeerId, u64)>,
    /// Chunks already present and verified in the partial file (resumed).
    pub chunks_reused: usize,
    /// Chunks fetched in this attempt.
    pub chunks_fetched: usize,
    /// Providers dropped for sending chunks that failed verification.
    pub bad_providers: Vec<PeerId>,
    /// Providers that sent chunks over bulk connections (the others used mesh streams only).
    pub bulk_from: Vec<PeerId>,
    /// The manifest every chunk was checked against.
    #[serde(skip)]
    pub manifest: Option<Arc<Manifest>>,
}

/// How a pull goes about it.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Where to count the bytes fetched and the corrupt chunks.
    pub stats: Option<Arc<BlobStats>>,
    /// Fetch over bulk connections where providers offer them (see the module's
    /// documentation); false: mesh streams only.
    pub bulk: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            stats: None,
            bulk: true,
        }
    }
}

/// A download could not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No provider gave a usable manifest.
    #[error("no peer has a manifest for {0}")]
    NoManifest(String),
    /// Every provider failed before the file was complete.
    #[error("peers failed with {missing} chunks missing: {reasons}")]
    Incomplete {
        /// Chunks not fetched.
        missing: usize,
        /// Why the providers failed.
        reasons: String,
    },
    /// The finished file does not hash to the pinned value.
    #[error("the assembled file does not match its SHA-256")]
    Mismatch,
    /// Local I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Downloads a file from peers into `partial` (kept between attempts for resuming). On success
/// the file at `partial` is complete and matches `sha256`.
pub async fn fetch(
    mesh: &crate::mesh::Client,
    providers: &[PeerId],
    sha256: &str,
    size: u64,
    partial: &Path,
    opts: &PullOptions,
) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let control = mesh.streams();
    let mut manifest = None;
    for peer in providers {
        match request_manifest(control.clone(), *peer, sha256).await {
            Ok(m) if m.matches(sha256, size) => {
                manifest = Some(m);
                break;
            }
            Ok(_) => tracing::warn!(%peer, "peer sent a manifest that does not match the file"),
            Err(e) => tracing::debug!(%peer, error = %e, "no manifest from peer"),
        }
    }
    let manifest = Arc::new(manifest.ok_or_else(|| FetchError::NoManifest(sha256.to_owned()))?);
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        chunks = manifest.chunks.len(),
        "manifest received"
    );

    // Resume: keep the chunks of an earlier attempt that verify. A new partial file has none.
    if let Some(dir) = partial.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let fresh = !partial.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(partial)?;
    file.set_len(size)?;
    let file = Arc::new(file);
    let verified = if fresh {
        vec![false; manifest.chunks.len()]
    } else {
        let file = Arc::clone(&file);
        let manifest = Arc::clone(&manifest);
        tokio::task::spawn_blocking(move || present_chunks(&file, &manifest))
            .await
            .map_err(|e| FetchError::Io(std::io::Error::other(e)))??
    };
    let missing: VecDeque<usize> = (0..manifest.chunks.len())
        .filter(|i| !verified[*i])
        .collect();
    let mut report = FetchReport {
        chunks_reused: manifest.chunks.len() - missing.len(),
        manifest: Some(Arc::clone(&manifest)),
        ..FetchReport::default()
    };

    let queue = Arc::new(Queue::new(missing));
    let writeback = Arc::new(Writeback::new(Arc::clone(&file)));
    let mut workers = Vec::new();
    for peer in providers.iter().copied() {
        let strikes = Arc::new(AtomicU32::new(0));
        let bulk_off = Arc::new(AtomicBool::new(false));
        // A bulk connection goes to the IP the mesh reaches the provider at directly.
        let bulk_ips = if opts.bulk {
            mesh.direct_ips(peer).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        for _ in 0..STREAMS_PER_PROVIDER {
            let job = Worker {
                control: control.clone(),
                peer,
                sha256: sha256.to_owned(),
                manifest: Arc::clone(&manifest),
                file: Arc::clone(&file),
                writeback: Arc::clone(&writeback),
                queue: Arc::clone(&queue),
                stats: opts.stats.clone(),
                strikes: Arc::clone(&strikes),
                spare: Vec::new(),
                bulk_ips: bulk_ips.clone(),
                bulk: None,
                bulk_failures: 0,
                bulk_off: Arc::clone(&bulk_off),
            };
            workers.push((peer, Arc::clone(&strikes), tokio::spawn(job.run())));
        }
    }
    let mut reasons = Vec::new();
    for (peer, strikes, w) in workers {
        match w.await {
            Ok(outcome) => {
                report.chunks_fetched += outcome.chunks;
                if outcome.bytes > 0 {
                    match report.bytes_from.iter_mut().find(|(p, _)| *p == peer) {
                        Some((_, bytes)) => *bytes += outcome.bytes,
                        None => report.bytes_from.push((peer, outcome.bytes)),
                    }
                }
                if outcome.bulk && !report.bulk_from.contains(&peer) {
                    report.bulk_from.push(peer);
                }
                if strikes.load(Ordering::Relaxed) >= MAX_STRIKES
                    && !report.bad_providers.contains(&peer)
                {
                    report.bad_providers.push(peer);
                }
                if let Some(r) = outcome.failure {
                    let reason = format!("{peer}: {r}");
                    if !reasons.contains(&reason) {
                        reasons.push(reason);
                    }
                }
            }
            Err(e) => reasons.push(format!("{peer}: {e}")),
        }
    }
    let left = queue.left();
    if left > 0 {
        return Err(FetchError::Incomplete {
            missing: left,
            reasons: reasons.join("; "),
        });
    }
    // Every chunk verified against a manifest whose last value is the pinned SHA-256: the file
    // hashes to it.
    if manifest.chunks.is_empty() && hex::encode(Sha256::digest([])) != sha256 {
        return Err(FetchError::Mismatch);
    }
    let synced = Instant::now();
    file.sync_all()?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        fsync_seconds = synced.elapsed().as_secs_f64(),
        "file complete"
    );
    Ok(report)
}

/// Which chunks of the partial file already match the manifest.
fn present_chunks(file: &File, manifest: &Manifest) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; manifest.chunk_size as usize];
    let mut out = Vec::with_capacity(manifest.chunks.len());
    for i in 0..manifest.chunks.len() {
        let len = manifest.chunk_len(i) as usize;
        file.read_exact_at(&mut buf[..len], i as u64 * manifest.chunk_size)?;
        out.push(manifest.verify_chunk(i, &buf[..len]));
    }
    Ok(out)
}

async fn request_manifest(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    sha256: &str,
) -> Result<Manifest, String> {
    let work = async {
        let stream = control
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| e.to_string())?;
        let (mut rd, mut wr) = stream.split();
        write_frame(
            &mut wr,
            &BlobRequest::Manifest {
                sha256: sha256.to_owned(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        match read_frame::<_, BlobReply>(&mut rd, MAX_JSON_FRAME).await {
            Ok(BlobReply::Manifest(m)) => Ok(m),
            Ok(BlobReply::Error(e)) => Err(e),
            Ok(_) => Err("unexpected reply".into()),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Streams (or bulk connections) each provider is asked over at once; a serving pod takes up
/// to 8 per peer. While one stream's chunk is being verified and written, the others keep data
/// flowing.
const STREAMS_PER_PROVIDER: usize = 4;

/// Chunks asked for in one request: enough to amortise the request, few enough that the last
/// requests of a file spread over every stream.
const CHUNKS_PER_RUN: usize = 8;

/// Times a stream retries a run after a transport error before giving its provider up.
const RUN_RETRIES: u32 = 2;

/// Bytes written to a partial file after which they are flushed to disk in the background.
const WRITEBACK_BYTES: u64 = 16 * 1024 * 1024;

/// Flushes a partial file to disk while its download goes on, every [`WRITEBACK_BYTES`], so
/// that the disk writes in parallel with the transfer and the final `fsync` only waits for the
/// last few chunks instead of the whole file.
#[derive(Debug)]
struct Writeback {
    file: Arc<File>,
    /// Bytes written since the last flush started.
    unflushed: AtomicU64,
    /// A flush is running: at most one at a time.
    flushing: Arc<AtomicBool>,
}

impl Writeback {
    fn new(file: Arc<File>) -> Self {
        Self {
            file,
            unflushed: AtomicU64::new(0),
            flushing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts `bytes` written; starts a flush on the blocking pool when enough are waiting
    /// and none runs. A failed flush is left to the final `fsync` to report.
    fn landed(&self, bytes: u64) {
        let waiting = self.unflushed.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if waiting < WRITEBACK_BYTES || self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.unflushed.fetch_sub(waiting, Ordering::Relaxed);
        let file = Arc::clone(&self.file);
        let flushing = Arc::clone(&self.flushing);
        tokio::task::spawn_blocking(move || {
            let _ = file.sync_data();
            flushing.store(false, Ordering::Release);
        });
    }
}

/// The chunks of a download still to fetch, shared by its workers.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when taken chunks are done with, some perhaps back in the queue.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<usize>,
    /// Chunks taken by workers and not yet done with.
    taken: usize,
}

impl Queue {
    fn new(chunks: VecDeque<usize>) -> Self {
        Self {
            state: Mutex::new(QueueState {
                waiting: chunks,
                taken: 0,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Takes a run of up to [`CHUNKS_PER_RUN`] consecutive chunks. When none is waiting but
    /// other workers hold some, waits: what fails with them comes back. `None` when the
    /// download needs nothing more.
    async fn take(queue: &Arc<Self>) -> Option<Taken> {
        let run = queue.take_run().await?;
        Some(Taken {
            queue: Arc::clone(queue),
            run,
            settled: false,
        })
    }

    async fn take_run(&self) -> Option<Vec<usize>> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.state.lock().ok()?;
                if let Some(first) = state.waiting.pop_front() {
                    let mut run = vec![first];
                    while run.len() < CHUNKS_PER_RUN
                        && state.waiting.front() == Some(&(first + run.len()))
                    {
                        state.waiting.pop_front();
                        run.push(first + run.len());
                    }
                    state.taken += run.len();
                    return Some(run);
                }
                if state.taken == 0 {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// Ends a run of `taken` chunks; `again` go back at the end of the queue, for another
    /// stream or provider to take next.
    fn done(&self, taken: usize, again: &[usize]) {
        if let Ok(mut state) = self.state.lock() {
            state.waiting.extend(again.iter().copied());
            state.taken = state.taken.saturating_sub(taken);
        }
        self.changed.notify_waiters();
    }

    /// Chunks not fetched yet.
    fn left(&self) -> usize {
        self.state
            .lock()
            .map_or(usize::MAX, |s| s.waiting.len() + s.taken)
    }
}

/// A run taken from a [`Queue`]; given back whole if dropped before [`Taken::done`] (a worker
/// that panicked), so the others do not wait for it forever.
#[derive(Debug)]
struct Taken {
    queue: Arc<Queue>,
    run: Vec<usize>,
    settled: bool,
}

impl Taken {
    /// Ends the run; `again` go back in the queue.
    fn done(mut self, again: &[usize]) {
        self.settled = true;
        self.queue.done(self.run.len(), again);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.settled {
            self.queue.done(self.run.len(), &self.run);
        }
    }
}

/// One stream's worth of a download from one provider.
struct Worker {
    control: libp2p_stream::Control,
    peer: PeerId,
    sha256: String,
    manifest: Arc<Manifest>,
    file: Arc<File>,
    writeback: Arc<Writeback>,
    queue: Arc<Queue>,
    stats: Option<Arc<BlobStats>>,
    /// Bad chunks from this provider, shared by its streams.
    strikes: Arc<AtomicU32>,
    /// Chunk buffers back from the blocking pool, to read the next chunks into.
    spare: Vec<Vec<u8>>,
    /// The provider's IPs to open a bulk connection to; empty: mesh streams only.
    bulk_ips: Vec<IpAddr>,
    /// The bulk connection, once open.
    bulk: Option<BulkConnection>,
    /// Bulk connections that could not be opened.
    bulk_failures: u32,
    /// The provider's bulk port is of no use: shared by its streams.
    bulk_off: Arc<AtomicBool>,
}

/// The two halves of a bulk connection.
type BulkConnection = (
    tokio_util::compat::Compat<tokio::net::tcp::OwnedReadHalf>,
    tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf>,
);

/// What a server without a bulk port answers a ticket request with.
const NO_BULK: &str = "no bulk connections here";

/// Attempts at a bulk connection per stream before it keeps to mesh streams.
const BULK_TRIES: u32 = 3;

/// How long connecting to a bulk port may take: one that cannot be reached is often
/// filtered rather than refused.
const BULK_CONNECT: Duration = Duration::from_secs(2);

/// Why no bulk connection opened.
#[derive(Debug)]
struct BulkError {
    why: String,
    /// Trying again cannot help: the provider has no bulk port, or it cannot be reached.
    last: bool,
}

impl BulkError {
    fn again(why: impl ToString) -> Self {
        Self {
            why: why.to_string(),
            last: false,
        }
    }

    fn last(why: impl ToString) -> Self {
        Self {
            why: why.to_string(),
            last: true,
        }
    }
}

/// How long a bulk connection may take to open, ticket included.
const BULK_OPEN: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Outcome {
    chunks: usize,
    bytes: u64,
    failure: Option<String>,
    /// Chunks came over a bulk connection.
    bulk: bool,
}

/// What became of one chunk read from a stream; either way its buffer comes back.
enum Landed {
    Written(Vec<u8>),
    Corrupt(Vec<u8>),
}

impl Worker {
    /// Takes runs of consecutive missing chunks from the shared queue until it is empty or this
    /// provider fails.
    async fn run(mut self) -> Outcome {
        let mut out = Outcome::default();
        let mut retries = 0;
        loop {
            if self.strikes.load(Ordering::Relaxed) >= MAX_STRIKES {
                tracing::warn!(peer = %self.peer, "dropping a provider that sent chunks failing verification");
                out.failure = Some("sent chunks that failed verification".into());
                return out;
            }
            let Some(taken) = Queue::take(&self.queue).await else {
                return out;
            };
            match self.fetch_run(&taken.run, &mut out).await {
                Ok(rejected) => {
                    retries = 0;
                    taken.done(&rejected);
                }
                Err((unfetched, e)) => {
                    taken.done(&unfetched);
                    if retries < RUN_RETRIES {
                        // At once the first time (a stream can go down with its connection
                        // just after the pods connect), then after a pause.
                        tracing::debug!(peer = %self.peer, error = %e, "retrying a run");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(retries))).await;
                        retries += 1;
                        continue;
                    }
                    out.failure = Some(e);
                    return out;
                }
            }
        }
    }

    /// Verifies a chunk and writes it in place, on the blocking pool.
    fn land(
        &self,
        index: usize,
        data: Vec<u8>,
    ) -> tokio::task::JoinHandle<std::io::Result<Landed>> {
        let file = Arc::clone(&self.file);
        let offset = index as u64 * self.manifest.chunk_size;
        let manifest = Arc::clone(&self.manifest);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            if !manifest.verify_chunk(index, &data) {
                return Ok(Landed::Corrupt(data));
            }
            file.write_all_at(&data, offset)?;
            Ok(Landed::Written(data))
        })
    }

    /// Counts a landed chunk; `Err` when it could not be written.
    async fn landed(
        &mut self,
        index: usize,
        landing: tokio::task::JoinHandle<std::io::Result<Landed>>,
        out: &mut Outcome,
        rejected: &mut Vec<usize>,
    ) -> Result<(), String> {
        match landing.await {
            Ok(Ok(Landed::Written(data))) => {
                let len = data.len() as u64;
                self.spare.push(data);
                self.writeback.landed(len);
                out.chunks += 1;
                out.bytes += len;
                if let Some(s) = &self.stats {
                    s.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                }
                Ok(())
            }
            Ok(Ok(Landed::Corrupt(data))) => {
                self.spare.push(data);
                if let Some(s) = &self.stats {
                    s.chunks_corrupt.fetch_add(1, Ordering::Relaxed);
                }
                self.strikes.fetch_add(1, Ordering::Relaxed);
                rejected.push(index);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Asks the provider for a bulk ticket over the mesh and opens the connection with it.
    async fn open_bulk(&self) -> Result<BulkConnection, BulkError> {
        use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
        let ask = async {
            let stream = self
                .control
                .clone()
                .open_stream(self.peer, PROTOCOL)
                .await
                .map_err(BulkError::again)?;
            let (mut rd, mut wr) = stream.split();
            write_frame(&mut wr, &BlobRequest::Bulk)
                .await
                .map_err(BulkError::again)?;
            let reply = read_frame::<_, BlobReply>(&mut rd, 4096)
                .await
                .map_err(BulkError::again)?;
            let _ = wr.close().await;
            match reply {
                BlobReply::Bulk { port, ticket } => hex::decode(&ticket)
                    .ok()
                    .filter(|t| t.len() == TICKET_LEN)
                    .map(|t| (port, t))
                    .ok_or_else(|| BulkError::last("malformed ticket")),
                BlobReply::Error(e) if e == NO_BULK => Err(BulkError::last(e)),
                // Busy: too many streams or tickets for now.
                BlobReply::Error(e) => Err(BulkError::again(e)),
                _ => Err(BulkError::last("unexpected reply")),
            }
        };
        let (port, ticket) = tokio::time::timeout(BULK_OPEN, ask)
            .await
            .map_err(|_| BulkError::again("no ticket in time"))??;
        let mut why = String::from("no address");
        for ip in &self.bulk_ips {
            let connecting = tokio::net::TcpStream::connect((*ip, port));
            match tokio::time::timeout(BULK_CONNECT, connecting).await {
                Ok(Ok(socket)) => {
                    let _ = socket.set_nodelay(true);
                    let (rd, wr) = socket.into_split();
                    let (rd, mut wr) = (rd.compat(), wr.compat_write());
                    tokio::time::timeout(BULK_CONNECT, wr.write_all(&ticket))
                        .await
                        .map_err(|_| BulkError::again("ticket not sent in time"))?
                        .map_err(BulkError::again)?;
                    return Ok((rd, wr));
                }
                Ok(Err(e)) => why = format!("{ip} port {port}: {e}"),
                Err(_) => why = format!("{ip} port {port}: no answer"),
            }
        }
        Err(BulkError::last(why))
    }

    /// Fetches one run, over the bulk connection when there is one (opening it first if the
    /// provider may offer one), else over a new mesh stream. Returns the chunks that failed
    /// verification, or the unfetched ones and why the provider failed.
    async fn fetch_run(
        &mut self,
        run: &[usize],
        out: &mut Outcome,
    ) -> Result<Vec<usize>, (Vec<usize>, String)> {
        while self.bulk.is_none()
            && !self.bulk_ips.is_empty()
            && !self.bulk_off.load(Ordering::Relaxed)
        {
            match self.open_bulk().await {
                Ok(connection) => self.bulk = Some(connection),
                Err(e) => {
                    // A provider without a reachable bulk port is not asked again by any of
                    // its streams. Anything else (a busy provider, or the mesh connection the
                    // ticket went over closing) is tried again at once, up to 3 times in all;
                    // then mesh streams only.
                    self.bulk_failures += 1;
                    if e.last {
                        self.bulk_off.store(true, Ordering::Relaxed);
                    }
                    if e.last || self.bulk_failures >= BULK_TRIES {
                        self.bulk_ips.clear();
                    }
                    tracing::debug!(peer = %self.peer, error = %e.why, "no bulk connection");
                }
            }
        }
        if let Some((mut rd, mut wr)) = self.bulk.take() {
            let result = self.exchange(&mut rd, &mut wr, run, out).await;
            if result.is_ok() {
                out.bulk = true;
                self.bulk = Some((rd, wr));
            } else {
                // Where the connection stands is unknown: the rest goes over the mesh.
                self.bulk_ips.clear();
            }
            return result;
        }
        let fail = |e: String| (run.to_vec(), e);
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            self.control.open_stream(self.peer, PROTOCOL),
        )
        .await
        .map_err(|_| fail("stream open timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        let (mut rd, mut wr) = stream.split();
        self.exchange(&mut rd, &mut wr, run, out).await
    }

    /// One run's request and its chunks. Each chunk is verified and written while the next one
    /// is read.
    async fn exchange<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        run: &[usize],
        out: &mut Outcome,
    ) -> Result<Vec<usize>, (Vec<usize>, String)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let fail = |from: usize, e: String| (run[from..].to_vec(), e);
        let request = BlobRequest::Chunks {
            sha256: self.sha256.clone(),
            first: run[0] as u32,
            count: run.len() as u32,
        };
        write_frame(wr, &request)
            .await
            .map_err(|e| fail(0, e.to_string()))?;
        match tokio::time::timeout(
            Duration::from_secs(30),
            read_frame::<_, BlobReply>(rd, MAX_JSON_FRAME),
        )
        .await
        {
            Ok(Ok(BlobReply::Chunks)) => {}
            Ok(Ok(BlobReply::Error(e))) => return Err(fail(0, e)),
            Ok(Ok(_)) => return Err(fail(0, "unexpected reply".into())),
            Ok(Err(e)) => return Err(fail(0, e.to_string())),
            Err(_) => return Err(fail(0, "no reply in time".into())),
        }
        let mut rejected = Vec::new();
        // Chunks not landed from `from` on, and those that failed verification: to fetch again.
        let unlanded = |from: usize, rejected: &[usize]| {
            let mut again = run[from..].to_vec();
            again.extend_from_slice(rejected);
            again
        };
        let mut landing: Option<(usize, usize, tokio::task::JoinHandle<_>)> = None;
        for (k, &index) in run.iter().enumerate() {
            let want = self.manifest.chunk_len(index) as usize;
            // Only the part of a reused buffer that grows is zeroed.
            let mut data = self.spare.pop().unwrap_or_default();
            let read = async {
                let mut len = [0u8; 4];
                rd.read_exact(&mut len).await?;
                let len = u32::from_be_bytes(len) as usize;
                if len != want {
                    return Err(std::io::Error::other(format!(
                        "chunk of {len} bytes, expected {want}"
                    )));
                }
                data.resize(len, 0);
                rd.read_exact(&mut data).await?;
                Ok(data)
            };
            let data = tokio::time::timeout(Duration::from_secs(30), read).await;
            if let Some((k0, i0, h)) = landing.take() {
                if let Err(e) = self.landed(i0, h, out, &mut rejected).await {
                    return Err((unlanded(k0, &rejected), e));
                }
            }
            let data = match data {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return Err((unlanded(k, &rejected), e.to_string())),
                Err(_) => {
                    return Err((unlanded(k, &rejected), "chunk not received in time".into()))
                }
            };
            landing = Some((k, index, self.land(index, data)));
        }
        if let Some((k0, i0, h)) = landing {
            if let Err(e) = self.landed(i0, h, out, &mut rejected).await {
                return Err((unlanded(k0, &rejected), e));
            }
        }
        Ok(rejected)
    }
}

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
pub async fn pull_from_peers(
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
/// store once it matches the pinned SHA-256.
async fn pull_file(
    store: &ModelStore,
    entry: &crate::catalogue::CatalogueEntry,
    file: &crate::catalogue::FileSpec,
    mesh: &crate::mesh::Client,
    providers: &[PeerId],
    opts: &PullOptions,
) -> Result<PulledFile, FetchError> {
    let partial = store.partial_path(file.sha256);
    let report = fetch(mesh, providers, file.sha256, file.size, &partial, opts).await?;
    store
        .install_verified(entry, file, &partial)
        .map_err(|e| FetchError::Io(std::io::Error::other(e.to_string())))?;
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

/// Pods in `peers` that announce the file `sha256`, connected ones first, then by ping time.
pub fn providers_of(peers: &[crate::mesh::PeerSnapshot], sha256: &str) -> Vec<PeerId> {
    let mut found: Vec<(bool, Duration, PeerId)> = peers
        .iter()
        .filter(|p| {
            p.capabilities
                .as_ref()
                .is_some_and(|c| c.files.iter().any(|f| f == sha256))
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
                *found = providers_of(&peers, file.sha256);
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
    for (file, peers) in missing.into_iter().zip(providers) {
        pulled.push(pull_file(store, entry, file, mesh, &peers, opts).await?);
    }
    Ok(Some(pulled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_describe_files_chunk_by_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let m = Manifest::of_file(&path).unwrap();
        assert_eq!(m.size, data.len() as u64);
        assert_eq!(m.chunks.len(), 3);
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(m.chunks[2], m.sha256);
        assert!(m.matches(&m.sha256.clone(), m.size));
        assert!(!m.matches(&m.sha256.clone(), m.size + 1));
        assert_eq!(m.chunk_len(2), 10);
        let chunk = |i: usize| {
            let start = i * CHUNK_SIZE as usize;
            &data[start..(start + CHUNK_SIZE as usize).min(data.len())]
        };
        for i in 0..3 {
            assert!(m.verify_chunk(i, chunk(i)), "chunk {i}");
            let mut bad = chunk(i).to_vec();
            bad[5] ^= 1;
            assert!(!m.verify_chunk(i, &bad), "corrupt chunk {i}");
        }
        // A chunk in another place, or cut short, does not verify.
        assert!(!m.verify_chunk(1, chunk(0)));
        assert!(!m.verify_chunk(2, &chunk(2)[..9]));
        assert!(!m.verify_chunk(3, chunk(2)));
    }

    #[test]
    fn chunked_sha256_equals_sha256_at_every_padding_boundary() {
        // Around the block (64) and padding (56) boundaries, and files of whole chunks.
        let sizes = [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            CHUNK_SIZE as usize - 1,
            CHUNK_SIZE as usize,
            CHUNK_SIZE as usize + 1,
            2 * CHUNK_SIZE as usize,
            2 * CHUNK_SIZE as usize + 56,
        ];
        let dir = tempfile::tempdir().unwrap();
        for size in sizes {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            std::fs::write(&path, &data).unwrap();
            let m = Manifest::of_file(&path).unwrap();
            let want = hex::encode(Sha256::digest(&data));
            assert_eq!(m.sha256, want, "size {size}");
            assert!(m.matches(&want, size as u64), "size {size}");
        }
    }

    #[test]
    fn a_forged_manifest_cannot_vouch_for_other_data() {
        // A manifest for other data, relabelled with the real file's hash: its chunks never
        // chain up to that hash, so the data it describes does not verify to the end.
        let dir = tempfile::tempdir().unwrap();
        let real: Vec<u8> = (0..CHUNK_SIZE as usize + 100).map(|i| i as u8).collect();
        let fake: Vec<u8> = real.iter().map(|b| b ^ 0x55).collect();
        std::fs::write(dir.path().join("real"), &real).unwrap();
        std::fs::write(dir.path().join("fake"), &fake).unwrap();
        let real_m = Manifest::of_file(&dir.path().join("real")).unwrap();
        let mut forged = Manifest::of_file(&dir.path().join("fake")).unwrap();
        assert!(!forged.matches(&real_m.sha256, real_m.size));
        forged.sha256.clone_from(&real_m.sha256);
        let last = forged.chunks.len() - 1;
        forged.chunks[last].clone_from(&real_m.sha256);
        assert!(forged.matches(&real_m.sha256, real_m.size));
        assert!(forged.verify_chunk(0, &fake[..CHUNK_SIZE as usize]));
        assert!(!forged.verify_chunk(last, &fake[CHUNK_SIZE as usize..]));
    }

    #[test]
    fn manifests_are_saved_and_a_damaged_one_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 7))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let file = dir.path().join("f");
        std::fs::write(&file, &data).unwrap();
        let sha = hex::encode(Sha256::digest(&data));
        let saved = dir.path().join("m").join(format!("{sha}.json"));

        let made = saved_manifest(&saved, &file, &sha).unwrap();
        assert_eq!(made.sha256, sha);
        let on_disk: Manifest = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
        assert_eq!(on_disk, made);
        // A saved manifest is used as it is: the file is not read again.
        let mut marked = made.clone();
        marked.chunks[0] = "0".repeat(64);
        std::fs::write(&saved, serde_json::to_vec(&marked).unwrap()).unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), marked);
        // One that does not end in the file's hash is made again, and saved again.
        let mut damaged = made.clone();
        damaged.chunks.pop();
        std::fs::write(&saved, serde_json::to_vec(&damaged).unwrap()).unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), made);
        std::fs::write(&saved, b"{ not json").unwrap();
        assert_eq!(saved_manifest(&saved, &file, &sha).unwrap(), made);
        let on_disk: Manifest = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
        assert_eq!(on_disk, made);
        // A file that is not what its name says gets its real manifest, which is not saved.
        std::fs::remove_file(&saved).unwrap();
        let wrong = "1".repeat(64);
        let real = saved_manifest(&saved, &file, &wrong).unwrap();
        assert_eq!(real.sha256, sha);
        assert!(!saved.exists());
    }

    #[test]
    fn only_lowercase_hashes_name_files() {
        assert!(check_hash(&"a".repeat(64)).is_ok());
        for bad in [
            "../../etc/passwd",
            "",
            &"A".repeat(64),
            &"g".repeat(64),
            &"a".repeat(65),
        ] {
            assert!(check_hash(bad).is_err(), "{bad}");
        }
    }
}
