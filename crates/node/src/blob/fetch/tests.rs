//! The queue, retries, hand-backs and strikes of a download, with providers that are stand-ins
//! for real ones: no network, no processes.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use super::queue::CHUNKS_PER_RUN;
use super::source::SourceError;
use super::worker::RUN_RETRIES;
use super::*;

/// Small chunks (a multiple of SHA-256's block) keep the files of these tests small.
const CHUNK: u64 = 256;

fn data(chunks: u64) -> Arc<Vec<u8>> {
    Arc::new((0..chunks * CHUNK).map(|i| (i * 7 % 251) as u8).collect())
}

fn manifest_of(data: &[u8]) -> Arc<Manifest> {
    Arc::new(Manifest::of_reader(data, data.len() as u64, CHUNK).unwrap())
}

/// What a stand-in provider does.
#[derive(Clone, Default)]
struct Behaviour {
    /// Requests that fail before any chunk (then they succeed).
    failing_requests: usize,
    /// How long each request takes to be answered.
    delay: Duration,
    /// The first chunk of every run comes corrupt.
    corrupt_first_of_run: bool,
    /// The worker dies (its task panics) when asked for a chunk.
    panic: bool,
}

/// What a stand-in provider saw, shared by its sources.
#[derive(Default)]
struct Seen {
    /// Requests made, failed ones included.
    requests: AtomicUsize,
    /// Runs asked for, as (first, count).
    runs: Mutex<Vec<(u32, u32)>>,
}

/// A provider that serves `data` from memory, as `behaviour` says.
struct Fake {
    data: Arc<Vec<u8>>,
    behaviour: Behaviour,
    seen: Arc<Seen>,
    /// The next chunk to send, and the end of the run asked for.
    next: u32,
    end: u32,
}

impl Fake {
    fn new(data: &Arc<Vec<u8>>, behaviour: Behaviour, seen: &Arc<Seen>) -> Self {
        Self {
            data: Arc::clone(data),
            behaviour,
            seen: Arc::clone(seen),
            next: 0,
            end: 0,
        }
    }
}

impl ChunkSource for Fake {
    async fn request(&mut self, first: u32, count: u32) -> Result<(), SourceError> {
        let made = self.seen.requests.fetch_add(1, Ordering::SeqCst);
        self.seen.runs.lock().unwrap().push((first, count));
        if !self.behaviour.delay.is_zero() {
            tokio::time::sleep(self.behaviour.delay).await;
        }
        if made < self.behaviour.failing_requests {
            return Err(SourceError::Broken("connection reset".into()));
        }
        (self.next, self.end) = (first, first + count);
        Ok(())
    }

    async fn next_chunk(&mut self, mut buf: Vec<u8>, len: usize) -> Result<Vec<u8>, SourceError> {
        assert!(!self.behaviour.panic, "a worker dies");
        assert!(self.next < self.end, "a chunk beyond the run asked for");
        let start = self.next as usize * CHUNK as usize;
        buf.clear();
        buf.extend_from_slice(&self.data[start..start + len]);
        if self.behaviour.corrupt_first_of_run
            && self.seen.runs.lock().unwrap().last().map(|r| r.0) == Some(self.next)
        {
            buf[0] ^= 1;
        }
        self.next += 1;
        Ok(buf)
    }

    fn finish(&mut self, _complete: bool) {
        (self.next, self.end) = (0, 0);
    }
}

/// A provider with `streams` sources behaving alike.
fn provider(
    data: &Arc<Vec<u8>>,
    streams: usize,
    behaviour: Behaviour,
) -> (PeerId, Vec<Fake>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let sources = (0..streams)
        .map(|_| Fake::new(data, behaviour.clone(), &seen))
        .collect();
    (PeerId::random(), sources, seen)
}

async fn run(
    manifest: &Arc<Manifest>,
    partial: &Path,
    providers: Vec<(PeerId, Vec<Fake>)>,
) -> (Result<FetchReport, FetchError>, Arc<BlobStats>) {
    let stats = Arc::new(BlobStats::default());
    let downloading = download(
        Arc::clone(manifest),
        partial,
        providers,
        Some(Arc::clone(&stats)),
        Instant::now(),
    );
    // A download that waits for chunks nobody will hand back fails here instead of hanging.
    let result = tokio::time::timeout(Duration::from_secs(20), downloading)
        .await
        .expect("the download ends");
    (result, stats)
}

#[tokio::test]
async fn chunks_spread_over_providers_and_the_file_is_whole() {
    let data = data(40);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let (a, a_sources, _) = provider(&data, 4, Behaviour::default());
    let (b, b_sources, _) = provider(&data, 4, Behaviour::default());
    let (result, stats) = run(&manifest, &partial, vec![(a, a_sources), (b, b_sources)]).await;
    let report = result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    assert_eq!(report.chunks_fetched, 40);
    assert_eq!(report.chunks_reused, 0);
    let total: u64 = report.bytes_from.iter().map(|(_, b)| b).sum();
    assert_eq!(total, data.len() as u64);
    assert_eq!(
        stats.bytes_fetched.load(Ordering::Relaxed),
        data.len() as u64
    );
    assert!(report.bad_providers.is_empty());
    assert!(report.bulk_from.is_empty());
}

#[tokio::test]
async fn a_provider_of_corrupt_chunks_is_struck_off_after_max_strikes() {
    // Alone, so what it is asked for is known: the first chunk of each of its runs is corrupt,
    // one strike per run.
    let data = data(5 * CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let bad = Behaviour {
        corrupt_first_of_run: true,
        ..Behaviour::default()
    };
    let (peer, sources, seen) = provider(&data, 1, bad);
    let (result, stats) = run(&manifest, &partial, vec![(peer, sources)]).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), MAX_STRIKES as usize);
    assert_eq!(
        stats.chunks_corrupt.load(Ordering::Relaxed),
        u64::from(MAX_STRIKES)
    );
    let fetched = MAX_STRIKES as usize * (CHUNKS_PER_RUN - 1);
    match result {
        Err(FetchError::Incomplete { missing, reasons }) => {
            assert_eq!(missing, data.len() / CHUNK as usize - fetched);
            assert!(reasons.contains("failed verification"), "{reasons}");
            assert!(reasons.contains(&peer.to_string()), "{reasons}");
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
}

#[tokio::test]
async fn chunks_a_struck_provider_sent_corrupt_come_from_another() {
    let data = data(3 * CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let bad = Behaviour {
        corrupt_first_of_run: true,
        ..Behaviour::default()
    };
    let (bad_peer, bad_sources, _) = provider(&data, 2, bad);
    let (good_peer, good_sources, _) = provider(&data, 2, Behaviour::default());
    let (result, _) = run(
        &manifest,
        &partial,
        vec![(bad_peer, bad_sources), (good_peer, good_sources)],
    )
    .await;
    let report = result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    assert_eq!(report.bad_providers, vec![bad_peer]);
    assert_eq!(report.chunks_fetched, 3 * CHUNKS_PER_RUN);
}

#[tokio::test]
async fn a_failed_run_is_retried_run_retries_times_then_the_provider_is_given_up() {
    let data = data(CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let failing = Behaviour {
        failing_requests: usize::MAX,
        ..Behaviour::default()
    };
    let (peer, sources, seen) = provider(&data, 1, failing);
    let (result, _) = run(&manifest, &partial, vec![(peer, sources)]).await;
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        1 + RUN_RETRIES as usize
    );
    match result {
        Err(FetchError::Incomplete { missing, reasons }) => {
            assert_eq!(missing, CHUNKS_PER_RUN);
            assert!(reasons.contains("connection reset"), "{reasons}");
        }
        other => panic!("expected Incomplete, got {other:?}"),
    }
}

#[tokio::test]
async fn a_run_that_fails_fewer_times_than_the_retries_completes() {
    let data = data(2 * CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let flaky = Behaviour {
        failing_requests: RUN_RETRIES as usize,
        ..Behaviour::default()
    };
    let (peer, sources, seen) = provider(&data, 1, flaky);
    let (result, _) = run(&manifest, &partial, vec![(peer, sources)]).await;
    result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    // The failed requests, then one per run.
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        RUN_RETRIES as usize + 2
    );
}

#[tokio::test]
async fn a_run_taken_by_a_worker_that_dies_is_handed_back_and_fetched_by_another() {
    let data = data(2 * CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    // It dies a while after taking its run, when the other worker has fetched the rest and
    // waits for that run.
    let dying = Behaviour {
        panic: true,
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    // The dying worker is spawned first, so on this one-thread runtime it takes the first run.
    let (dead, dead_sources, dead_seen) = provider(&data, 1, dying);
    let (live, live_sources, live_seen) = provider(&data, 1, Behaviour::default());
    let (result, _) = run(
        &manifest,
        &partial,
        vec![(dead, dead_sources), (live, live_sources)],
    )
    .await;
    assert_eq!(
        *dead_seen.runs.lock().unwrap(),
        vec![(0, CHUNKS_PER_RUN as u32)]
    );
    let report = result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    assert_eq!(report.bytes_from, vec![(live, data.len() as u64)]);
    assert_eq!(
        *live_seen.runs.lock().unwrap(),
        vec![
            (CHUNKS_PER_RUN as u32, CHUNKS_PER_RUN as u32),
            (0, CHUNKS_PER_RUN as u32)
        ]
    );
}

#[tokio::test]
async fn idle_workers_wait_for_chunks_others_may_hand_back() {
    // One run, taken by a provider whose requests all fail, slowly. The other provider finds
    // the queue empty but waits: the run comes back, and it fetches it.
    let data = data(CHUNKS_PER_RUN as u64);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    let slow_failing = Behaviour {
        failing_requests: usize::MAX,
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    let (failing, failing_sources, failing_seen) = provider(&data, 1, slow_failing);
    let (waiting, waiting_sources, waiting_seen) = provider(&data, 1, Behaviour::default());
    let (result, _) = run(
        &manifest,
        &partial,
        vec![(failing, failing_sources), (waiting, waiting_sources)],
    )
    .await;
    assert!(failing_seen.requests.load(Ordering::SeqCst) >= 1);
    let report = result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    assert_eq!(report.bytes_from, vec![(waiting, data.len() as u64)]);
    assert_eq!(
        *waiting_seen.runs.lock().unwrap(),
        vec![(0, CHUNKS_PER_RUN as u32)]
    );
}

#[tokio::test]
async fn resuming_fetches_only_the_chunks_that_do_not_verify() {
    let chunks = 3 * CHUNKS_PER_RUN as u64;
    let data = data(chunks);
    let manifest = manifest_of(&data);
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("f.partial");
    // An earlier attempt left every third chunk, and one damaged chunk among them.
    let mut earlier = vec![0u8; data.len()];
    let kept: Vec<u64> = (0..chunks).filter(|i| i % 3 == 0).collect();
    for &i in &kept {
        let at = (i * CHUNK) as usize..((i + 1) * CHUNK) as usize;
        earlier[at.clone()].copy_from_slice(&data[at]);
    }
    earlier[(3 * CHUNK) as usize] ^= 1;
    std::fs::write(&partial, &earlier).unwrap();
    let present: Vec<u64> = kept.into_iter().filter(|i| *i != 3).collect();

    let (peer, sources, seen) = provider(&data, 1, Behaviour::default());
    let (result, _) = run(&manifest, &partial, vec![(peer, sources)]).await;
    let report = result.unwrap();
    assert_eq!(std::fs::read(&partial).unwrap(), *data);
    assert_eq!(report.chunks_reused, present.len());
    assert_eq!(report.chunks_fetched, (chunks as usize) - present.len());
    let asked: Vec<u64> = seen
        .runs
        .lock()
        .unwrap()
        .iter()
        .flat_map(|&(first, count)| u64::from(first)..u64::from(first + count))
        .collect();
    let missing: Vec<u64> = (0..chunks).filter(|i| !present.contains(i)).collect();
    assert_eq!(asked, missing);
}
