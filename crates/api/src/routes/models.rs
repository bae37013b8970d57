//! `/v1/models`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use crate::backend::ModelEntry;
use crate::error::ApiError;
use crate::openai::{ModelList, ModelObject};
use crate::{AppState, Backend};

fn object<B>(state: &AppState<B>, m: ModelEntry) -> ModelObject {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(state.started.elapsed().as_secs());
    ModelObject {
        id: m.info.name,
        object: "model".into(),
        created,
        owned_by: m.owned_by,
        kind: match m.info.kind {
            pod_inference::ModelKind::Chat => "chat".into(),
            pod_inference::ModelKind::Embedding => "embedding".into(),
        },
        architecture: m.info.architecture,
        quantization: m.info.quantization,
        context_length: m.info.context_length,
        providers: m.providers,
        pipeline: m.pipeline,
    }
}

/// Every model this node can answer for.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub(crate) async fn list_models<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
) -> Json<ModelList> {
    let data = state
        .backend
        .models()
        .into_iter()
        .map(|m| object(&state, m))
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{id}", params(("id" = String, Path, description = "Model name")),
    responses((status = 200, body = ModelObject), (status = 404, body = crate::openai::ErrorBody)))]
pub(crate) async fn get_model<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    state
        .backend
        .models()
        .into_iter()
        .find(|m| m.info.name == id)
        .map(|m| Json(object(&state, m)))
        .ok_or_else(|| ApiError::model_not_found(&id))
}
