//! One stream's worth of a download from one provider: runs taken from the queue, fetched
//! from a [`ChunkSource`], each chunk verified and written in place; failed runs retried, and
//! the provider dropped after too many bad chunks.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use super::queue::Queue;
use super::source::ChunkSource;
use super::writeback::Writeback;
use super::MAX_STRIKES;
use crate::blob::{BlobStats, Manifest};

/// Times a stream retries a run after a transport error before giving its provider up.
pub(super) const RUN_RETRIES: u32 = 2;

/// One stream's worth of a download from one provider.
pub(super) struct Worker<S> {
    /// The provider, for the logs.
    pub(super) peer: PeerId,
    /// Where the chunks come from.
    pub(super) source: S,
    pub(super) manifest: Arc<Manifest>,
    pub(super) file: Arc<File>,
    pub(super) writeback: Arc<Writeback>,
    pub(super) queue: Arc<Queue>,
    pub(super) stats: Option<Arc<BlobStats>>,
    /// Bad chunks from this provider, shared by its streams.
    pub(super) strikes: Arc<AtomicU32>,
    /// The provider sent this manifest itself (or all providers sent the same one): a chunk
    /// of it that fails is a strike. Otherwise the chunk says the manifest may be the liar, and
    /// the provider is only set aside for this download.
    pub(super) vouches: bool,
    /// Set when a chunk of a provider that does not vouch for the manifest failed it; shared
    /// by its streams.
    pub(super) disagrees: Arc<AtomicBool>,
    /// Chunk buffers back from the blocking pool, to read the next chunks into.
    pub(super) spare: Vec<Vec<u8>>,
}

/// What one worker did.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Chunks fetched and written.
    pub(super) chunks: usize,
    /// Their bytes.
    pub(super) bytes: u64,
    /// Why the worker gave its provider up, if it did.
    pub(super) failure: Option<String>,
    /// Chunks came over a bulk connection.
    pub(super) bulk: bool,
}

/// What became of one chunk read from a stream; either way its buffer comes back.
enum Landed {
    Written(Vec<u8>),
    Corrupt(Vec<u8>),
}

impl<S: ChunkSource> Worker<S> {
    /// Takes runs of consecutive missing chunks from the shared queue until it is empty or this
    /// provider fails.
    pub(super) async fn run(mut self) -> Outcome {
        let mut out = Outcome::default();
        let mut retries = 0;
        loop {
            if self.strikes.load(Ordering::Relaxed) >= MAX_STRIKES {
                tracing::warn!(peer = %self.peer, "dropping a provider that sent chunks failing verification");
                out.failure = Some("sent chunks that failed verification".into());
                return out;
            }
            if self.disagrees.load(Ordering::Relaxed) {
                out.failure = Some("its chunks disagree with another provider's manifest".into());
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
                if self.vouches {
                    self.strikes.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.disagrees.store(true, Ordering::Relaxed);
                }
                rejected.push(index);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Fetches one run and ends it at the source. Returns the chunks that failed verification,
    /// or the unfetched ones and why the provider failed.
    async fn fetch_run(
        &mut self,
        run: &[usize],
        out: &mut Outcome,
    ) -> Result<Vec<usize>, (Vec<usize>, String)> {
        let result = self.exchange(run, out).await;
        if result.is_ok() && self.source.bulk() {
            out.bulk = true;
        }
        self.source.finish(result.is_ok());
        result
    }

    /// One run's request and its chunks. Each chunk is verified and written while the next one
    /// is read.
    async fn exchange(
        &mut self,
        run: &[usize],
        out: &mut Outcome,
    ) -> Result<Vec<usize>, (Vec<usize>, String)> {
        self.source
            .request(run[0] as u32, run.len() as u32)
            .await
            .map_err(|e| (run.to_vec(), e.to_string()))?;
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
            let buf = self.spare.pop().unwrap_or_default();
            let data = self.source.next_chunk(buf, want).await;
            if let Some((k0, i0, h)) = landing.take() {
                if let Err(e) = self.landed(i0, h, out, &mut rejected).await {
                    return Err((unlanded(k0, &rejected), e));
                }
            }
            let data = match data {
                Ok(d) => d,
                Err(e) => return Err((unlanded(k, &rejected), e.to_string())),
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
