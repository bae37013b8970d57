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
pub mod server;
pub mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Request};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
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
pub use server::{serve, ServerLimits};

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
    /// Web origins (`https://app.example`) whose pages may call the API from a browser;
    /// `*` allows any. Empty: no CORS headers, so browsers keep other sites' pages out.
    pub cors_origins: Vec<String>,
}

impl ApiConfig {
    /// Refuses settings that are unsafe together or malformed, before anything is served.
    pub fn check(&self) -> Result<(), ConfigError> {
        for origin in &self.cors_origins {
            if origin == "*" {
                if !self.keys.is_empty() {
                    return Err(ConfigError::AnyOriginWithKeys);
                }
            } else if !is_origin(origin) {
                return Err(ConfigError::BadOrigin(origin.clone()));
            }
        }
        Ok(())
    }
}

/// Whether `s` is spelled as browsers send `Origin`: `scheme://host[:port]`, no path.
fn is_origin(s: &str) -> bool {
    let Some((scheme, host)) = s.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !host.is_empty()
        && host.chars().all(|c| c.is_ascii_graphic() && c != '/')
}

/// [`ApiConfig::check`] refused the settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Any web page could use the keys a browser holds for the API.
    #[error("CORS origin `*` cannot be combined with API keys: list the allowed origins instead")]
    AnyOriginWithKeys,
    /// A CORS origin is not of the form `scheme://host[:port]`.
    #[error(
        "CORS origin `{0}` is not an origin like `https://app.example` or `http://localhost:3000`"
    )]
    BadOrigin(String),
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: ApiKeys::default(),
            max_body_bytes: 4 * 1024 * 1024,
            node_name: "pod".into(),
            max_choices: 8,
            cors_origins: Vec::new(),
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
    let mut app = routes::routes(Arc::clone(&state))
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
        ));
    if let Some(cors) = cors(&state.config.cors_origins) {
        app = app.layer(cors);
    }
    app.layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(trace)
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// CORS for the allowed origins; none without any, so that browsers keep other sites' pages
/// from reading a keyless API on loopback. Origins [`ApiConfig::check`] would refuse are left
/// out.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    let allowed = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter(|o| is_origin(o))
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        if list.is_empty() {
            return None;
        }
        AllowOrigin::list(list)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers([
                HeaderName::from_static(REQUEST_ID_HEADER),
                HeaderName::from_static(SERVED_BY_HEADER),
            ]),
    )
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
