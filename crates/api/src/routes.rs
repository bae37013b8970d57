//! Route table and the OpenAPI document.

mod chat;
mod completions;
mod embeddings;
mod generation;
mod models;
mod node;
mod system;
mod ui;

use std::sync::Arc;

use axum::extract::FromRequest;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::openai;
use crate::{AppState, Backend};

/// Route paths.
pub mod paths {
    /// Chat completions.
    pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
    /// Legacy text completions.
    pub const COMPLETIONS: &str = "/v1/completions";
    /// Embeddings.
    pub const EMBEDDINGS: &str = "/v1/embeddings";
    /// Model list.
    pub const MODELS: &str = "/v1/models";
    /// One model.
    pub const MODEL: &str = "/v1/models/{id}";
    /// Readiness.
    pub const HEALTH: &str = "/health";
    /// Prometheus metrics.
    pub const METRICS: &str = "/metrics";
    /// This API's OpenAPI document.
    pub const OPENAPI: &str = "/openapi.json";
    /// This node: PeerId, addresses, NAT status.
    pub const NODE: &str = "/pod/v1/node";
    /// The peers this node knows.
    pub const PEERS: &str = "/pod/v1/peers";
    /// Work exchanged with peers, from signed receipts.
    pub const RECEIPTS: &str = "/pod/v1/receipts";
    /// The model files this node serves to peers.
    pub const FILES: &str = "/pod/v1/files";
    /// Recent throughput of this node's API.
    pub const STATS: &str = "/pod/v1/stats";
    /// The dashboard's page.
    pub const DASHBOARD: &str = "/";
    /// The dashboard's scripts, styles and images.
    pub const DASHBOARD_ASSET: &str = "/ui/{*path}";
}

/// JSON body extractor whose rejections are OpenAI-shaped errors.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// The OpenAPI document of the API, generated from the handlers' types.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "pod", description = "OpenAI-compatible API of a pod node"),
    paths(
        chat::chat_completions,
        completions::completions,
        embeddings::embeddings,
        models::list_models,
        models::get_model,
        system::health,
        system::metrics,
        node::node,
        node::peers,
        node::receipts,
        node::files,
        node::stats,
    ),
    components(schemas(
        openai::GenerationParams,
        openai::ChatCompletionRequest,
        openai::ChatCompletion,
        openai::ChatCompletionChunk,
        openai::CompletionRequest,
        openai::Completion,
        openai::EmbeddingRequest,
        openai::EmbeddingResponse,
        openai::ModelList,
        openai::ModelObject,
        openai::ModelPipeline,
        openai::ModelStage,
        openai::ErrorBody,
        crate::node::NodeView,
        crate::node::PeerList,
        crate::node::PeerView,
        crate::node::PeerLoad,
        crate::node::StageView,
        crate::node::ServedStageView,
        crate::node::ReceiptsView,
        crate::node::PeerWork,
        crate::node::WorkTotals,
        crate::node::FileList,
        crate::node::FileView,
        crate::stats::StatsView,
        crate::stats::StatsSample,
    ))
)]
pub struct ApiDoc;

pub(crate) fn routes<B: Backend>(state: Arc<AppState<B>>) -> Router {
    Router::new()
        .route(paths::CHAT_COMPLETIONS, post(chat::chat_completions::<B>))
        .route(paths::COMPLETIONS, post(completions::completions::<B>))
        .route(paths::EMBEDDINGS, post(embeddings::embeddings::<B>))
        .route(paths::MODELS, get(models::list_models::<B>))
        .route(paths::MODEL, get(models::get_model::<B>))
        .route(paths::HEALTH, get(system::health::<B>))
        .route(paths::METRICS, get(system::metrics::<B>))
        .route(paths::OPENAPI, get(system::openapi))
        .route(paths::NODE, get(node::node::<B>))
        .route(paths::PEERS, get(node::peers::<B>))
        .route(paths::RECEIPTS, get(node::receipts::<B>))
        .route(paths::FILES, get(node::files::<B>))
        .route(paths::STATS, get(node::stats::<B>))
        .route(paths::DASHBOARD, get(ui::index))
        .route(paths::DASHBOARD_ASSET, get(ui::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
