//! The fetching side of `/pod/blob/1.0.0`: one file downloaded from several providers at
//! once into a partial file, resumed from the chunks of an earlier attempt that verify.
//!
//! The missing chunks wait in a [`queue::Queue`]; each provider gets
//! [`STREAMS_PER_PROVIDER`] workers ([`worker::Worker`]), each taking runs of consecutive
//! chunks and fetching them from its [`source::ChunkSource`]. A run that fails goes back in
//! the queue for any worker; a provider whose chunks fail verification [`MAX_STRIKES`] times
//! is dropped.

mod queue;
mod source;
mod worker;
mod writeback;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::AsyncReadExt;
use libp2p::PeerId;
use serde::Serialize;
use sha2::{Digest, Sha256};

use self::queue::Queue;
use self::source::{ChunkSource, StreamSource};
use self::worker::Worker;
use self::writeback::Writeback;
use super::protocol::{BlobReply, BlobRequest, MAX_JSON_FRAME, PROTOCOL};
use super::{BlobStats, Manifest};
use crate::wire::{read_frame, write_frame};

/// Bad chunks after which a provider is dropped from a download.
pub const MAX_STRIKES: u32 = 2;

/// Streams (or bulk connections) each provider is asked over at once; a serving pod takes up
/// to 8 per peer. While one stream's chunk is being verified and written, the others keep data
/// flowing.
const STREAMS_PER_PROVIDER: usize = 4;

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

/// ` (peer X: why; ...)` for the providers that answered a manifest request with no manifest.
fn refusals(why: &[(PeerId, String)]) -> String {
    if why.is_empty() {
        return String::new();
    }
    let each: Vec<String> = why.iter().map(|(p, w)| format!("peer {p}: {w}")).collect();
    format!(" ({})", each.join("; "))
}

/// A download could not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No provider gave a usable manifest.
    #[error("no peer has a manifest for {sha256}{}", refusals(.why))]
    NoManifest {
        /// The file.
        sha256: String,
        /// Why each provider asked gave none, by provider.
        why: Vec<(PeerId, String)>,
        /// Whether some provider could not be reached at all (rather than refusing or
        /// sending a wrong manifest): asking again later may succeed.
        unreached: bool,
    },
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
    let (offers, why, refused, unreached) =
        gather_manifests(&control, providers, sha256, size).await;
    let candidates = candidates(&offers);
    if candidates.is_empty() {
        return Err(FetchError::NoManifest {
            sha256: sha256.to_owned(),
            why,
            unreached: unreached > 0,
        });
    }
    // Providers that refused the manifest would refuse the chunks too.
    let providers: Vec<PeerId> = providers
        .iter()
        .copied()
        .filter(|p| !refused.contains(p))
        .collect();
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        manifests = candidates.len(),
        "manifests received"
    );
    if candidates.len() > 1 {
        tracing::warn!(
            file = sha256,
            manifests = candidates.len(),
            "providers disagree on the manifest; trying each until one holds"
        );
    }
    let mut bulk_ips = Vec::with_capacity(providers.len());
    for peer in providers.iter().copied() {
        // A bulk connection goes to the IP the mesh reaches the provider at directly.
        bulk_ips.push(if opts.bulk {
            mesh.direct_ips(peer).await.unwrap_or_default()
        } else {
            Vec::new()
        });
    }
    let agreed = candidates.len() == 1;
    // Providers dropped in an attempt for chunks that failed the manifest they sent themselves.
    let mut struck: Vec<PeerId> = Vec::new();
    let mut last = None;
    for manifest in candidates {
        let mut sources = Vec::new();
        for (peer, ips) in providers.iter().copied().zip(&bulk_ips) {
            if struck.contains(&peer) {
                continue;
            }
            let bulk_off = Arc::new(AtomicBool::new(false));
            let streams = (0..STREAMS_PER_PROVIDER)
                .map(|_| {
                    StreamSource::new(
                        control.clone(),
                        peer,
                        sha256,
                        ips.clone(),
                        Arc::clone(&bulk_off),
                    )
                })
                .collect();
            // A provider that sent another manifest is not to blame for chunks that fail this
            // one: either it or this manifest's source lies, and the chunks cannot tell which.
            let vouches = agreed || offered(&offers, peer) == Some(&manifest);
            sources.push(Provider {
                peer,
                vouches,
                sources: streams,
            });
        }
        let attempt = attempt(
            Arc::clone(&manifest),
            partial,
            sources,
            opts.stats.clone(),
            started,
        )
        .await;
        for peer in &attempt.report.bad_providers {
            if !struck.contains(peer) {
                struck.push(*peer);
            }
        }
        match attempt.outcome {
            Ok(()) => {
                // Every chunk verified against this manifest and its last value is the pinned
                // SHA-256: it is the file's. Whoever sent another one lied.
                let mut report = attempt.report;
                report.bad_providers = struck;
                for (peer, offer) in &offers {
                    if offer.as_ref().is_some_and(|m| **m != *manifest)
                        && !report.bad_providers.contains(peer)
                    {
                        tracing::warn!(%peer, "struck a provider that sent a false manifest");
                        report.bad_providers.push(*peer);
                    }
                }
                return Ok(report);
            }
            Err(e) => {
                if !attempt.disagreed.is_empty() {
                    // Chunks from providers that sent another manifest failed this one and it
                    // could not be completed: its sources are struck, not the chunk senders.
                    for (peer, offer) in &offers {
                        if offer.as_ref() == Some(&manifest) && !struck.contains(peer) {
                            tracing::warn!(%peer, "struck a provider whose manifest failed other providers' chunks");
                            struck.push(*peer);
                        }
                    }
                    tracing::warn!(
                        disagreeing = attempt.disagreed.len(),
                        error = %e,
                        "chunks of other providers failed a manifest; trying the next one"
                    );
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| FetchError::NoManifest {
        sha256: sha256.to_owned(),
        why: Vec::new(),
        unreached: false,
    }))
}

/// Asks every provider for its manifest of `sha256` at once: `None` for those that sent none,
/// or one that cannot describe a file of that hash and size. Also returns why each gave none,
/// those that refused, and how many could not be reached.
async fn gather_manifests(
    control: &libp2p_stream::Control,
    providers: &[PeerId],
    sha256: &str,
    size: u64,
) -> (Offers, Vec<(PeerId, String)>, Vec<PeerId>, usize) {
    let asks = providers.iter().copied().map(|peer| async move {
        let (offer, why, refused) = match request_manifest(control.clone(), peer, sha256).await {
            Ok(m) if m.matches(sha256, size) => (Some(Arc::new(m)), None, Some(false)),
            Ok(_) => {
                tracing::warn!(%peer, "peer sent a manifest that does not match the file");
                (
                    None,
                    Some("sent a manifest that does not match the file".to_owned()),
                    Some(false),
                )
            }
            Err(ManifestError::Refused(e)) => {
                tracing::info!(%peer, reason = %e, "peer refused to send the file");
                (None, Some(e), Some(true))
            }
            Err(ManifestError::Failed(e)) => {
                tracing::debug!(%peer, error = %e, "no manifest from peer");
                (None, Some(e), None)
            }
        };
        (peer, offer, why, refused)
    });
    let mut offers = Vec::new();
    let mut why = Vec::new();
    let mut refused = Vec::new();
    let mut unreached = 0;
    for (peer, offer, reason, refusal) in futures::future::join_all(asks).await {
        offers.push((peer, offer));
        why.extend(reason.map(|r| (peer, r)));
        match refusal {
            Some(true) => refused.push(peer),
            Some(false) => {}
            None => unreached += 1,
        }
    }
    (offers, why, refused, unreached)
}

/// Each provider asked, with the manifest it offered if it sent one that fits the file.
type Offers = Vec<(PeerId, Option<Arc<Manifest>>)>;

/// The different manifests offered, those sent by more providers first (then in the order of
/// the providers).
fn candidates(offers: &[(PeerId, Option<Arc<Manifest>>)]) -> Vec<Arc<Manifest>> {
    let mut counted: Vec<(Arc<Manifest>, usize)> = Vec::new();
    for m in offers.iter().filter_map(|(_, m)| m.as_ref()) {
        match counted.iter_mut().find(|(c, _)| **c == **m) {
            Some((_, n)) => *n += 1,
            None => counted.push((Arc::clone(m), 1)),
        }
    }
    // A stable sort keeps the providers' order among equals.
    counted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    counted.into_iter().map(|(m, _)| m).collect()
}

/// The manifest `peer` sent, if any.
fn offered(offers: &[(PeerId, Option<Arc<Manifest>>)], peer: PeerId) -> Option<&Arc<Manifest>> {
    offers
        .iter()
        .find(|(p, _)| *p == peer)
        .and_then(|(_, m)| m.as_ref())
}

/// One provider of an attempt and its sources (one per worker).
struct Provider<S> {
    peer: PeerId,
    /// It sent this attempt's manifest (or every provider sent the same): its chunks that fail
    /// the manifest are its own fault, and strike it.
    vouches: bool,
    sources: Vec<S>,
}

/// How one download attempt against one manifest went.
struct Attempt {
    /// What was fetched; `bad_providers`: providers struck for chunks that failed the manifest
    /// they vouched for.
    report: FetchReport,
    /// Providers that did not vouch for the manifest and sent chunks that failed it.
    disagreed: Vec<PeerId>,
    outcome: Result<(), FetchError>,
}

/// Downloads the file `manifest` describes into `partial` from `providers`, each with its
/// sources (one per worker), every provider vouching for the manifest.
#[cfg(test)]
async fn download<S: ChunkSource>(
    manifest: Arc<Manifest>,
    partial: &Path,
    providers: Vec<(PeerId, Vec<S>)>,
    stats: Option<Arc<BlobStats>>,
    started: Instant,
) -> Result<FetchReport, FetchError> {
    let providers = providers
        .into_iter()
        .map(|(peer, sources)| Provider {
            peer,
            vouches: true,
            sources,
        })
        .collect();
    let attempt = attempt(manifest, partial, providers, stats, started).await;
    attempt.outcome.map(|()| attempt.report)
}

/// Downloads the file `manifest` describes into `partial` from `providers`.
async fn attempt<S: ChunkSource>(
    manifest: Arc<Manifest>,
    partial: &Path,
    providers: Vec<Provider<S>>,
    stats: Option<Arc<BlobStats>>,
    started: Instant,
) -> Attempt {
    let mut report = FetchReport {
        manifest: Some(Arc::clone(&manifest)),
        ..FetchReport::default()
    };
    let mut disagreed = Vec::new();
    let outcome = run_attempt(
        manifest,
        partial,
        providers,
        stats,
        started,
        &mut report,
        &mut disagreed,
    )
    .await;
    Attempt {
        report,
        disagreed,
        outcome,
    }
}

async fn run_attempt<S: ChunkSource>(
    manifest: Arc<Manifest>,
    partial: &Path,
    providers: Vec<Provider<S>>,
    stats: Option<Arc<BlobStats>>,
    started: Instant,
    report: &mut FetchReport,
    disagreed: &mut Vec<PeerId>,
) -> Result<(), FetchError> {
    let size = manifest.size;

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
    report.chunks_reused = manifest.chunks.len() - missing.len();

    let queue = Arc::new(Queue::new(missing));
    let writeback = Arc::new(Writeback::new(Arc::clone(&file)));
    let mut workers = Vec::new();
    for Provider {
        peer,
        vouches,
        sources,
    } in providers
    {
        let strikes = Arc::new(AtomicU32::new(0));
        let disagrees = Arc::new(AtomicBool::new(false));
        for source in sources {
            let job = Worker {
                peer,
                source,
                manifest: Arc::clone(&manifest),
                file: Arc::clone(&file),
                writeback: Arc::clone(&writeback),
                queue: Arc::clone(&queue),
                stats: stats.clone(),
                strikes: Arc::clone(&strikes),
                vouches,
                disagrees: Arc::clone(&disagrees),
                spare: Vec::new(),
            };
            workers.push((
                peer,
                Arc::clone(&strikes),
                Arc::clone(&disagrees),
                tokio::spawn(job.run()),
            ));
        }
    }
    let mut reasons = Vec::new();
    for (peer, strikes, disagrees, w) in workers {
        let joined = w.await;
        if disagrees.load(Ordering::Relaxed) && !disagreed.contains(&peer) {
            disagreed.push(peer);
        }
        match joined {
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
    if manifest.chunks.is_empty() && hex::encode(Sha256::digest([])) != manifest.sha256 {
        return Err(FetchError::Mismatch);
    }
    let synced = Instant::now();
    file.sync_all()?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        fsync_seconds = synced.elapsed().as_secs_f64(),
        "file complete"
    );
    Ok(())
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

/// Why a provider sent no manifest.
enum ManifestError {
    /// It answered with a refusal (no such file, not trusted, limits).
    Refused(String),
    /// The stream failed or the answer was not a manifest.
    Failed(String),
}

async fn request_manifest(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    sha256: &str,
) -> Result<Manifest, ManifestError> {
    let work = async {
        let stream = control
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| ManifestError::Failed(e.to_string()))?;
        let (mut rd, mut wr) = stream.split();
        write_frame(
            &mut wr,
            &BlobRequest::Manifest {
                sha256: sha256.to_owned(),
            },
        )
        .await
        .map_err(|e| ManifestError::Failed(e.to_string()))?;
        match read_frame::<_, BlobReply>(&mut rd, MAX_JSON_FRAME).await {
            Ok(BlobReply::Manifest(m)) => Ok(m),
            // The peer's words: printable, and short enough for one log or error line.
            Ok(BlobReply::Error(e)) => Err(ManifestError::Refused(
                e.chars().filter(|c| !c.is_control()).take(200).collect(),
            )),
            Ok(_) => Err(ManifestError::Failed("unexpected reply".into())),
            Err(e) => Err(ManifestError::Failed(e.to_string())),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| ManifestError::Failed("timed out".to_owned()))?
}
