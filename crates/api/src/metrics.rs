//! Prometheus metrics: requests by route and status, tokens, latency histograms, load.

use std::fmt;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    completion_tokens: Family<ModelLabels, Counter>,
    ttft: Histogram,
    per_token: Histogram,
    queued: Gauge,
    active: Gauge,
    models: Gauge,
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
        Self {
            registry,
            http,
            prompt_tokens,
            completion_tokens,
            ttft,
            per_token,
            queued,
            active,
            models,
        }
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
    }

    /// Records time to first token.
    pub fn first_token(&self, seconds: f64) {
        self.ttft.observe(seconds);
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

/// Middleware counting every request by matched route, method and status.
pub async fn track<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
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
