//! `/pod/v1/node`, `/pod/v1/peers`, `/pod/v1/receipts`, `/pod/v1/files` and `/pod/v1/stats`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::error::ApiError;
use crate::node::{FileList, NodeView, PeerList, ReceiptsView};
use crate::stats::StatsView;
use crate::{AppState, Backend};

/// This node: PeerId, listen and external addresses, NAT status, profile.
#[utoipa::path(get, path = "/pod/v1/node", responses(
    (status = 200, body = NodeView),
    (status = 404, description = "This node runs without a mesh"),
))]
pub(crate) async fn node<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
) -> Result<Json<NodeView>, ApiError> {
    state
        .backend
        .node()
        .await
        .map(Json)
        .ok_or_else(ApiError::no_mesh)
}

/// The peers this node knows: addresses, round-trip time, models, load, last seen.
#[utoipa::path(get, path = "/pod/v1/peers", responses(
    (status = 200, body = PeerList),
    (status = 404, description = "This node runs without a mesh"),
))]
pub(crate) async fn peers<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
) -> Result<Json<PeerList>, ApiError> {
    let data = state.backend.peers().await.ok_or_else(ApiError::no_mesh)?;
    Ok(Json(PeerList {
        object: "list".into(),
        data,
    }))
}

/// Work this node did for each peer and each peer did for it, from the signed receipts.
#[utoipa::path(get, path = "/pod/v1/receipts", responses(
    (status = 200, body = ReceiptsView),
    (status = 404, description = "This node runs without a mesh"),
))]
pub(crate) async fn receipts<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
) -> Result<Json<ReceiptsView>, ApiError> {
    state
        .backend
        .receipts()
        .await
        .map(Json)
        .ok_or_else(ApiError::no_mesh)
}

/// The model files this node serves to peers, with how many peers each was sent to.
#[utoipa::path(get, path = "/pod/v1/files", responses(
    (status = 200, body = FileList),
    (status = 404, description = "This node runs without a mesh"),
))]
pub(crate) async fn files<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
) -> Result<Json<FileList>, ApiError> {
    state
        .backend
        .files()
        .await
        .map(Json)
        .ok_or_else(ApiError::no_mesh)
}

/// Work that went through this node's API over the last five minutes, in two-second samples:
/// tokens per second, requests, time to first token, queue depth.
#[utoipa::path(get, path = "/pod/v1/stats", responses((status = 200, body = StatsView)))]
pub(crate) async fn stats<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Json<StatsView> {
    let (queued, active) = state.backend.load();
    Json(state.metrics.recent().view(queued, active))
}
