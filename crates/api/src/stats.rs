//! Recent throughput for `/pod/v1/stats`: the API's own counters in fixed time buckets (a ring
//! that keeps the last few minutes), so a dashboard can chart tokens per second, requests,
//! queue depth and time to first token without scraping and differencing `/metrics`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Width of one bucket.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Buckets kept: five minutes.
pub const BUCKETS: usize = 150;

/// Counters of one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    /// Interval number since the ring started.
    index: u64,
    completion_tokens: u64,
    prompt_tokens: u64,
    requests: u64,
    ttft_sum: f64,
    ttft_count: u64,
    queued_max: usize,
    active_max: usize,
}

/// The ring of recent buckets. Only intervals in which something happened are stored; the
/// view fills the gaps with zeros.
#[derive(Debug)]
pub struct Throughput {
    started: Instant,
    ring: Mutex<VecDeque<Bucket>>,
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new()
    }
}

impl Throughput {
    /// An empty ring whose first interval starts now.
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Self {
        Self {
            started,
            ring: Mutex::new(VecDeque::with_capacity(BUCKETS)),
        }
    }

    fn index(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.started).as_millis() / INTERVAL.as_millis()) as u64
    }

    /// Runs `f` on the bucket of `at`, creating it (and dropping buckets older than the
    /// window) when needed.
    fn with_bucket(&self, at: Instant, f: impl FnOnce(&mut Bucket)) {
        let index = self.index(at);
        // A poisoned lock only means another recorder panicked mid-update; the counters are
        // still plain numbers, so keep counting.
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.back().is_none_or(|b| b.index < index) {
            ring.push_back(Bucket {
                index,
                ..Bucket::default()
            });
        }
        let oldest = index.saturating_sub(BUCKETS as u64 - 1);
        while ring.front().is_some_and(|b| b.index < oldest) {
            ring.pop_front();
        }
        // Events arrive in time order but from many tasks; one that lost a race by a few
        // microseconds across a boundary lands in the bucket it belongs to, if still kept.
        if let Some(bucket) = ring.iter_mut().rev().find(|b| b.index == index) {
            f(bucket);
        }
    }

    /// Counts tokens generated now.
    pub fn generated(&self, tokens: usize) {
        self.with_bucket(Instant::now(), |b| b.completion_tokens += tokens as u64);
    }

    /// Counts a finished request and its prompt tokens.
    pub fn finished(&self, prompt_tokens: usize) {
        self.with_bucket(Instant::now(), |b| {
            b.requests += 1;
            b.prompt_tokens += prompt_tokens as u64;
        });
    }

    /// Records a time to first token.
    pub fn first_token(&self, seconds: f64) {
        self.with_bucket(Instant::now(), |b| {
            b.ttft_sum += seconds;
            b.ttft_count += 1;
        });
    }

    /// Records the engine's load as seen now; a bucket keeps the highest.
    pub fn load(&self, queued: usize, active: usize) {
        self.load_at(Instant::now(), queued, active);
    }

    fn load_at(&self, at: Instant, queued: usize, active: usize) {
        self.with_bucket(at, |b| {
            b.queued_max = b.queued_max.max(queued);
            b.active_max = b.active_max.max(active);
        });
    }

    /// The window up to now, oldest first, one sample per interval (empty ones included), with
    /// the current load.
    pub fn view(&self, queued: usize, active: usize) -> StatsView {
        self.view_at(Instant::now(), queued, active)
    }

    fn view_at(&self, now: Instant, queued: usize, active: usize) -> StatsView {
        self.load_at(now, queued, active);
        let current = self.index(now);
        let first = current.saturating_sub(BUCKETS as u64 - 1);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut stored = ring.iter().filter(|b| b.index >= first).peekable();
        let mut samples = Vec::with_capacity((current - first + 1) as usize);
        let interval_ms = INTERVAL.as_millis() as u64;
        let elapsed_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        for index in first..=current {
            let bucket = match stored.peek() {
                Some(b) if b.index == index => stored.next().copied(),
                _ => None,
            }
            .unwrap_or(Bucket {
                index,
                ..Bucket::default()
            });
            // The current interval has only run part of its length.
            let covered_ms = (elapsed_ms - index * interval_ms).clamp(1, interval_ms);
            let seconds = covered_ms as f64 / 1000.0;
            samples.push(StatsSample {
                ago_seconds: (elapsed_ms - index * interval_ms) as f64 / 1000.0,
                seconds,
                completion_tokens: bucket.completion_tokens,
                prompt_tokens: bucket.prompt_tokens,
                requests: bucket.requests,
                tokens_per_second: bucket.completion_tokens as f64 / seconds,
                ttft_ms: (bucket.ttft_count > 0)
                    .then(|| bucket.ttft_sum / bucket.ttft_count as f64 * 1000.0),
                queued: bucket.queued_max,
                active: bucket.active_max,
            });
        }
        StatsView {
            object: "stats".into(),
            now_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            interval_seconds: INTERVAL.as_secs_f64(),
            queued,
            active,
            samples,
        }
    }
}

/// `GET /pod/v1/stats`: the work that went through this node's API over the last minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsView {
    /// Always `stats`.
    pub object: String,
    /// When the view was taken, Unix milliseconds.
    pub now_unix_ms: u64,
    /// Length of one sample in seconds.
    pub interval_seconds: f64,
    /// Requests waiting for the engine now.
    pub queued: usize,
    /// Sequences being generated now.
    pub active: usize,
    /// One sample per interval, oldest first; the last is the interval running now.
    pub samples: Vec<StatsSample>,
}

/// The counters of one interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsSample {
    /// Seconds between the start of the interval and the view.
    pub ago_seconds: f64,
    /// Seconds the interval covers (less than the interval for the current one).
    pub seconds: f64,
    /// Tokens generated in the interval (completions, streamed or not, local or on peers).
    pub completion_tokens: u64,
    /// Prompt tokens of requests that finished in the interval.
    pub prompt_tokens: u64,
    /// Completion and embedding requests that finished in the interval.
    pub requests: u64,
    /// `completion_tokens / seconds`.
    pub tokens_per_second: f64,
    /// Mean time to first token of requests whose first token came in the interval; `null`
    /// when none did.
    pub ttft_ms: Option<f64>,
    /// Most requests seen waiting for the engine in the interval.
    pub queued: usize,
    /// Most sequences seen being generated in the interval.
    pub active: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn buckets_by_interval_and_fills_gaps() {
        let start = Instant::now();
        let t = Throughput::starting_at(start);
        t.with_bucket(at(start, 100), |b| b.completion_tokens += 10);
        t.with_bucket(at(start, 1900), |b| b.completion_tokens += 6);
        t.with_bucket(at(start, 6500), |b| {
            b.completion_tokens += 3;
            b.requests += 1;
        });
        t.with_bucket(at(start, 6600), |b| {
            b.ttft_sum += 0.5;
            b.ttft_count += 2;
        });
        let view = t.view_at(at(start, 7000), 2, 1);
        assert_eq!(view.samples.len(), 4);
        let tokens: Vec<u64> = view.samples.iter().map(|s| s.completion_tokens).collect();
        assert_eq!(tokens, [16, 0, 0, 3]);
        assert_eq!(view.samples[0].tokens_per_second, 8.0);
        // The current interval has run 1 s of its 2.
        assert_eq!(view.samples[3].seconds, 1.0);
        assert_eq!(view.samples[3].tokens_per_second, 3.0);
        assert_eq!(view.samples[3].requests, 1);
        assert_eq!(view.samples[3].ttft_ms, Some(250.0));
        assert_eq!(view.samples[1].ttft_ms, None);
        assert_eq!((view.samples[3].queued, view.samples[3].active), (2, 1));
        assert_eq!((view.queued, view.active), (2, 1));
        assert_eq!(view.samples[0].ago_seconds, 7.0);
    }

    #[test]
    fn keeps_only_the_window() {
        let start = Instant::now();
        let t = Throughput::starting_at(start);
        let step = INTERVAL.as_millis() as u64;
        for i in 0..(BUCKETS as u64 + 20) {
            t.with_bucket(at(start, i * step), |b| b.completion_tokens += i);
        }
        assert_eq!(
            t.ring.lock().unwrap().len(),
            BUCKETS,
            "old buckets are dropped"
        );
        let view = t.view_at(at(start, (BUCKETS as u64 + 19) * step), 0, 0);
        assert_eq!(view.samples.len(), BUCKETS);
        assert_eq!(view.samples[0].completion_tokens, 20);
        assert_eq!(
            view.samples[BUCKETS - 1].completion_tokens,
            BUCKETS as u64 + 19
        );
    }

    #[test]
    fn load_keeps_the_highest_of_an_interval() {
        let start = Instant::now();
        let t = Throughput::starting_at(start);
        t.load_at(at(start, 10), 5, 2);
        t.load_at(at(start, 20), 1, 3);
        let view = t.view_at(at(start, 30), 0, 0);
        assert_eq!((view.samples[0].queued, view.samples[0].active), (5, 3));
        assert_eq!((view.queued, view.active), (0, 0));
    }
}
