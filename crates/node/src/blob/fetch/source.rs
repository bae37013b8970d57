//! Where a download's workers get chunks from: a provider behind [`ChunkSource`], so the queue,
//! retries and strikes are the same whatever carries the bytes, and are tested with no network.
//! [`StreamSource`] is the real one: runs over a bulk connection when the provider offers one,
//! else over a new mesh stream per run.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::PeerId;

use crate::blob::bulk::{open_bulk, BulkConnection, BULK_TRIES};
use crate::blob::protocol::{read_chunk, BlobReply, BlobRequest, MAX_JSON_FRAME, PROTOCOL};
use crate::wire::{read_frame, write_frame};

/// Why a run of chunks could not be had from a provider. The messages are what a failed
/// download reports of the provider.
#[derive(Debug, thiserror::Error)]
pub(super) enum SourceError {
    /// No stream or connection to the provider could be opened.
    #[error("{0}")]
    Unreachable(String),
    /// The provider refused the request, or answered something else than chunks.
    #[error("{0}")]
    Refused(String),
    /// The stream broke, or the provider went silent, during the run.
    #[error("{0}")]
    Broken(String),
}

/// One provider of a file, as one worker sees it: runs of chunks asked for one after another.
pub(super) trait ChunkSource: Send + 'static {
    /// Asks the provider for chunks `first..first + count`; they are then read in order with
    /// [`ChunkSource::next_chunk`].
    fn request(
        &mut self,
        first: u32,
        count: u32,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// The next chunk of the run asked for, read into `buf` (reused: only what grows of it
    /// need be zeroed); it must be `len` bytes. Unverified: the worker checks it.
    fn next_chunk(
        &mut self,
        buf: Vec<u8>,
        len: usize,
    ) -> impl Future<Output = Result<Vec<u8>, SourceError>> + Send;

    /// Ends the run asked for; `complete`: every chunk of it was read and landed.
    fn finish(&mut self, complete: bool);

    /// Whether the run asked for goes over a bulk connection.
    fn bulk(&self) -> bool {
        false
    }
}

/// How long a provider may take to answer a request, and to send each chunk.
const PROVIDER_WAIT: Duration = Duration::from_secs(30);

/// How long opening a mesh stream may take.
const STREAM_OPEN: Duration = Duration::from_secs(10);

/// What a run is going over.
enum Transport {
    /// A bulk connection, kept for the next run when this one completes.
    Bulk(BulkConnection),
    /// A mesh stream of its own.
    Mesh(ReadHalf<libp2p::Stream>, WriteHalf<libp2p::Stream>),
}

/// A provider over the mesh: a bulk connection when it offers one, else a mesh stream per run.
pub(super) struct StreamSource {
    control: libp2p_stream::Control,
    peer: PeerId,
    sha256: String,
    /// The provider's IPs to open a bulk connection to; empty: mesh streams only.
    bulk_ips: Vec<IpAddr>,
    /// The bulk connection, once open, between runs.
    bulk: Option<BulkConnection>,
    /// Bulk connections that could not be opened.
    bulk_failures: u32,
    /// The provider's bulk port is of no use: shared by the sources of its streams.
    bulk_off: Arc<AtomicBool>,
    /// The run under way.
    run: Option<Transport>,
}

impl StreamSource {
    /// A source of `sha256` from `peer`, over bulk connections to `bulk_ips` when there are
    /// any; `bulk_off` is shared by the sources of one provider.
    pub(super) fn new(
        control: libp2p_stream::Control,
        peer: PeerId,
        sha256: &str,
        bulk_ips: Vec<IpAddr>,
        bulk_off: Arc<AtomicBool>,
    ) -> Self {
        Self {
            control,
            peer,
            sha256: sha256.to_owned(),
            bulk_ips,
            bulk: None,
            bulk_failures: 0,
            bulk_off,
            run: None,
        }
    }

    /// Opens a bulk connection if the provider may offer one and none is open.
    async fn try_bulk(&mut self) {
        while self.bulk.is_none()
            && !self.bulk_ips.is_empty()
            && !self.bulk_off.load(Ordering::Relaxed)
        {
            match open_bulk(&self.control, self.peer, &self.bulk_ips).await {
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
    }
}

/// Sends a request for chunks and reads the reply that announces them.
async fn ask<R, W>(rd: &mut R, wr: &mut W, request: &BlobRequest) -> Result<(), SourceError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write_frame(wr, request)
        .await
        .map_err(|e| SourceError::Broken(e.to_string()))?;
    match tokio::time::timeout(
        PROVIDER_WAIT,
        read_frame::<_, BlobReply>(rd, MAX_JSON_FRAME),
    )
    .await
    {
        Ok(Ok(BlobReply::Chunks)) => Ok(()),
        Ok(Ok(BlobReply::Error(e))) => Err(SourceError::Refused(e)),
        Ok(Ok(_)) => Err(SourceError::Refused("unexpected reply".into())),
        Ok(Err(e)) => Err(SourceError::Broken(e.to_string())),
        Err(_) => Err(SourceError::Broken("no reply in time".into())),
    }
}

impl ChunkSource for StreamSource {
    async fn request(&mut self, first: u32, count: u32) -> Result<(), SourceError> {
        self.try_bulk().await;
        let request = BlobRequest::Chunks {
            sha256: self.sha256.clone(),
            first,
            count,
        };
        let transport = match self.bulk.take() {
            Some(connection) => self.run.insert(Transport::Bulk(connection)),
            None => {
                let stream = tokio::time::timeout(
                    STREAM_OPEN,
                    self.control.open_stream(self.peer, PROTOCOL),
                )
                .await
                .map_err(|_| SourceError::Unreachable("stream open timed out".into()))?
                .map_err(|e| SourceError::Unreachable(e.to_string()))?;
                let (rd, wr) = stream.split();
                self.run.insert(Transport::Mesh(rd, wr))
            }
        };
        match transport {
            Transport::Bulk((rd, wr)) => ask(rd, wr, &request).await,
            Transport::Mesh(rd, wr) => ask(rd, wr, &request).await,
        }
    }

    async fn next_chunk(&mut self, buf: Vec<u8>, len: usize) -> Result<Vec<u8>, SourceError> {
        let read = match &mut self.run {
            Some(Transport::Bulk((rd, _))) => {
                tokio::time::timeout(PROVIDER_WAIT, read_chunk(rd, buf, len)).await
            }
            Some(Transport::Mesh(rd, _)) => {
                tokio::time::timeout(PROVIDER_WAIT, read_chunk(rd, buf, len)).await
            }
            None => return Err(SourceError::Broken("no run asked for".into())),
        };
        match read {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(e)) => Err(SourceError::Broken(e.to_string())),
            Err(_) => Err(SourceError::Broken("chunk not received in time".into())),
        }
    }

    fn finish(&mut self, complete: bool) {
        match self.run.take() {
            Some(Transport::Bulk(connection)) if complete => self.bulk = Some(connection),
            // Where the connection stands is unknown: the rest goes over the mesh.
            Some(Transport::Bulk(_)) => self.bulk_ips.clear(),
            Some(Transport::Mesh(..)) | None => {}
        }
    }

    fn bulk(&self) -> bool {
        matches!(self.run, Some(Transport::Bulk(_)))
    }
}
