//! Health, metrics and the OpenAPI document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use super::ApiDoc;
use crate::{AppState, Backend};

/// Ready (200) once the models are loaded, else 503.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "Models are loading"),
))]
pub(crate) async fn health<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
    let models = state.backend.models().len();
    if state.backend.is_ready() {
        (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "models": models})),
        )
            .into_response()
    } else {
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "loading", "models": models})),
        )
            .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(2u32));
        res
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
pub(crate) async fn metrics<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
    let (queued, active) = state.backend.load();
    let models = state.backend.models().len();
    if let Some(totals) = state.backend.blob_totals() {
        state.metrics.blob_totals(totals);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(queued, active, models),
    )
        .into_response()
}

pub(crate) async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
