//! pod's OpenAI-compatible HTTP API.
//!
//! [`router`] builds the axum `Router` over any [`Backend`]: the local engine
//! ([`LocalBackend`]) or, in the node, a backend that also routes to peers. Handlers validate
//! requests, turn them into engine requests and stream the engine's events back as JSON or
//! server-sent events; they never touch tensors.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod backend;
pub mod error;
pub mod metrics;
pub mod node;
pub mod openai;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::Router;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

pub use auth::ApiKeys;
pub use backend::{Backend, Embeddings, Generation, LocalBackend, ModelEntry};
pub use error::ApiError;
pub use metrics::{BlobTotals, Metrics};
pub use routes::paths;
pub use routes::ApiDoc;

/// Header carrying the request id (generated when the client sends none).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header naming the peer that produced a response.
pub const SERVED_BY_HEADER: &str = "x-pod-served-by";

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Accepted API keys; empty means no authentication.
    pub keys: ApiKeys,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Name of this node in `x-pod-served-by` and `owned_by`.
    pub node_name: String,
    /// Most choices (`n`) per request.
    pub max_choices: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: ApiKeys::default(),
            max_body_bytes: 4 * 1024 * 1024,
            node_name: "pod".into(),
            max_choices: 8,
        }
    }
}

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState<B> {
    /// Who answers requests.
    pub backend: B,
    /// API settings.
    pub config: ApiConfig,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// When the API started, for model `created` stamps.
    pub started: Instant,
}

impl<B> AppState<B> {
    /// State for a backend with the given settings.
    pub fn new(backend: B, config: ApiConfig) -> Arc<Self> {
        Arc::new(Self {
            backend,
            config,
            metrics: Metrics::new(),
            started: Instant::now(),
        })
    }
}

/// The API's routes and middleware.
pub fn router<B: Backend>(state: Arc<AppState<B>>) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request<_>| {
            let id = req
                .extensions()
                .get::<RequestId>()
                .and_then(|id| id.header_value().to_str().ok())
                .unwrap_or("-")
                .to_owned();
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        })
        .on_request(())
        // Status codes are in the response log line; a 503 while loading is not an error.
        .on_failure(())
        .on_response(
            |res: &axum::http::Response<_>, latency: Duration, _span: &tracing::Span| {
                tracing::info!(status = res.status().as_u16(), ms = latency.as_millis() as u64, "request");
            },
        );
    routes::routes(Arc::clone(&state))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            metrics::track::<B>,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_key::<B>,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            reject_declared_oversize::<B>,
        ))
        .layer(CorsLayer::permissive().expose_headers([
            HeaderName::from_static(REQUEST_ID_HEADER),
            HeaderName::from_static(SERVED_BY_HEADER),
        ]))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(trace)
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Answers 413 from the declared `Content-Length` alone, before reading a byte of an oversized
/// body; bodies without a length are still cut off at the limit while being read.
async fn reject_declared_oversize<B: Backend>(
    axum::extract::State(state): axum::extract::State<Arc<AppState<B>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.config.max_body_bytes as u64) {
        return axum::response::IntoResponse::into_response(ApiError::payload_too_large());
    }
    next.run(req).await
}
