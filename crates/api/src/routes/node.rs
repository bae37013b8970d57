//! `/pod/v1/node`, `/pod/v1/peers`, `/pod/v1/receipts`, `/pod/v1/files` and `/pod/v1/stats`.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use crate::error::ApiError;
use crate::node::{FileList, NodeView, PeerList, ReceiptsPage, ReceiptsView};
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

/// Peers per page of `/pod/v1/receipts` when `limit` is not given.
pub(crate) const DEFAULT_RECEIPT_ROWS: usize = 100;

/// Most peers per page of `/pod/v1/receipts`.
pub(crate) const MAX_RECEIPT_ROWS: usize = 1000;

/// The query of `/pod/v1/receipts`, read as text so a bad value gets an OpenAI-shaped 400.
#[derive(Debug, Deserialize)]
pub(crate) struct ReceiptsQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// Work this node did for each peer and each peer did for it, from the signed receipts, a page
/// of peers at a time (sorted by PeerId; `has_more` says whether to ask again with `after`).
#[utoipa::path(get, path = "/pod/v1/receipts",
    params(
        ("limit" = Option<usize>, Query, description = "Most peers in the answer: 1 to 1000, default 100"),
        ("after" = Option<String>, Query, description = "Only peers after this PeerId: the last `peer` of the previous page"),
    ),
    responses(
        (status = 200, body = ReceiptsView),
        (status = 400, body = crate::openai::ErrorBody),
        (status = 404, description = "This node runs without a mesh"),
    ))]
pub(crate) async fn receipts<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    query: Result<Query<ReceiptsQuery>, QueryRejection>,
) -> Result<Json<ReceiptsView>, ApiError> {
    // A malformed query (a repeated field, say) is an OpenAI-shaped 400 like any bad value.
    let Query(query) = query
        .map_err(|e| ApiError::invalid("", format!("Invalid query string: {}", e.body_text())))?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_RECEIPT_ROWS,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_RECEIPT_ROWS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {MAX_RECEIPT_ROWS}"),
                )
            })?,
    };
    // PeerIds are about 52 characters; anything much longer cannot be one.
    if query.after.as_ref().is_some_and(|a| a.len() > 128) {
        return Err(ApiError::invalid("after", "`after` must be a PeerId"));
    }
    state
        .backend
        .receipts(ReceiptsPage {
            limit,
            after: query.after,
        })
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
