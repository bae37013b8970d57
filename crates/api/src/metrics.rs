//! Prometheus metrics: requests by route and status, tokens, latency histograms, load, and
//! the model-file transfers of `/pod/blob/1.0.0`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::stats::Throughput;
use crate::{AppState, Backend};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The API's metrics registry.
pub struct Metrics {
    registry: Registry,
    http: Family<HttpLabels, Counter>,
    prompt_tokens: Family<ModelLabels, Counter>,
    cached_prompt_tokens: Family<ModelLabels, Counter>,
    completion_tokens: Family<ModelLabels, Counter>,
    ttft: Histogram,
    per_token: Histogram,
    queued: Gauge,
    active: Gauge,
    models: Gauge,
    blob: Arc<BlobCollector>,
    recent: Throughput,
}

/// Totals of the model-file transfers (`/pod/blob/1.0.0`) since the node started, as the
/// backend counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobTotals {
    /// Bytes of chunks sent to peers.
    pub bytes_served: u64,
    /// Bytes of verified chunks received from peers.
    pub bytes_fetched: u64,
    /// Requests of peers that were refused (unknown file, bad range, malformed, limits).
    pub requests_refused: u64,
    /// Chunks received from peers that failed verification.
    pub chunks_corrupt: u64,
}

/// The blob totals as last read from the backend; encoded as counters on each scrape. The
/// backend owns the real counters, so these are copies, never incremented here.
#[derive(Debug, Default)]
struct BlobCollector {
    bytes_served: AtomicU64,
    bytes_fetched: AtomicU64,
    requests_refused: AtomicU64,
    chunks_corrupt: AtomicU64,
}

impl Collector for BlobCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = [
            (
                "blob_bytes_served",
                "Bytes of model-file chunks sent to peers",
                &self.bytes_served,
            ),
            (
                "blob_bytes_fetched",
                "Bytes of verified model-file chunks received from peers",
                &self.bytes_fetched,
            ),
            (
                "blob_requests_refused",
                "Model-file requests of peers refused: unknown file, bad range, malformed, limits",
                &self.requests_refused,
            ),
            (
                "blob_chunks_corrupt",
                "Model-file chunks received from peers that failed verification",
                &self.chunks_corrupt,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every pod metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pod");
        let http = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http.clone(),
        );
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let cached_prompt_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens taken from the prefix cache instead of being computed",
            cached_prompt_tokens.clone(),
        );
        let completion_tokens = Family::<ModelLabels, Counter>::default();
        registry.register(
            "completion_tokens",
            "Tokens generated",
            completion_tokens.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to first generated token",
            ttft.clone(),
        );
        let per_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "time_per_output_token_seconds",
            "Time between generated tokens",
            per_token.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for the engine",
            queued.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "active_sequences",
            "Sequences being generated",
            active.clone(),
        );
        let models = Gauge::default();
        registry.register(
            "models_loaded",
            "Models loaded on this node",
            models.clone(),
        );
        let blob = Arc::new(BlobCollector::default());
        registry.register_collector(Box::new(Arc::clone(&blob)));
        Self {
            registry,
            http,
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
            ttft,
            per_token,
            queued,
            active,
            models,
            blob,
            recent: Throughput::new(),
        }
    }

    /// Takes the backend's blob transfer totals, exposed as `pod_blob_*_total` counters.
    pub fn blob_totals(&self, totals: BlobTotals) {
        let b = &self.blob;
        b.bytes_served.store(totals.bytes_served, Ordering::Relaxed);
        b.bytes_fetched
            .store(totals.bytes_fetched, Ordering::Relaxed);
        b.requests_refused
            .store(totals.requests_refused, Ordering::Relaxed);
        b.chunks_corrupt
            .store(totals.chunks_corrupt, Ordering::Relaxed);
    }

    /// Records a finished completion's token counts.
    pub fn tokens(&self, model: &str, prompt: usize, completion: usize) {
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        self.prompt_tokens
            .get_or_create(&labels)
            .inc_by(prompt as u64);
        self.completion_tokens
            .get_or_create(&labels)
            .inc_by(completion as u64);
        self.recent.finished(prompt);
    }

    /// Counts tokens as they are generated, for the recent throughput.
    pub fn generated(&self, tokens: usize) {
        self.recent.generated(tokens);
    }

    /// Recent throughput, in time buckets.
    pub fn recent(&self) -> &Throughput {
        &self.recent
    }

    /// Records prompt tokens a completion took from the prefix cache.
    pub fn cached_tokens(&self, model: &str, cached: usize) {
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        self.cached_prompt_tokens
            .get_or_create(&labels)
            .inc_by(cached as u64);
    }

    /// Records time to first token.
    pub fn first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
        self.recent.first_token(seconds);
    }

    /// Records the gap between two tokens.
    pub fn token_gap(&self, seconds: f64) {
        self.per_token.observe(seconds);
    }

    /// Prometheus text exposition, with load gauges read from the backend now.
    pub fn render(&self, queued: usize, active: usize, models: usize) -> String {
        self.queued.set(queued as i64);
        self.active.set(active as i64);
        self.models.set(models as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The label of methods and paths outside the known ones.
const OTHER: &str = "other";

/// The methods of HTTP/1.1 and PATCH, labelled by name; any other as [`OTHER`].
const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

fn method_label(method: &Method) -> &'static str {
    METHODS
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or(OTHER)
}

/// Middleware counting every request by route template (`other` for unknown paths), method
/// and status.
pub async fn track<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    req: Request,
    next: Next,
) -> Response {
    // Labels come only from fixed sets: a label set per odd method or path a client makes up
    // would stay in the registry for ever.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| OTHER.to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method()).to_owned();
    let (queued, active) = state.backend.load();
    state.metrics.recent.load(queued, active);
    let res = next.run(req).await;
    state
        .metrics
        .http
        .get_or_create(&HttpLabels {
            route,
            method,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_totals_render_as_prefixed_counters() {
        let m = Metrics::new();
        let text = m.render(0, 0, 0);
        assert!(text.contains("pod_blob_bytes_served_total 0"), "{text}");
        m.blob_totals(BlobTotals {
            bytes_served: 7,
            bytes_fetched: 11,
            requests_refused: 2,
            chunks_corrupt: 3,
        });
        let text = m.render(0, 0, 0);
        for line in [
            "# TYPE pod_blob_bytes_served counter",
            "pod_blob_bytes_served_total 7",
            "pod_blob_bytes_fetched_total 11",
            "pod_blob_requests_refused_total 2",
            "pod_blob_chunks_corrupt_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
