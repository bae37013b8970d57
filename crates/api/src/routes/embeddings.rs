//! `POST /v1/embeddings`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine as _;
use pod_inference::EmbedRequest;

use super::ApiJson;
use crate::error::ApiError;
use crate::openai::{
    EmbeddingData, EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector,
};
use crate::{AppState, Backend};

// The engine's limit, checked here too so the 400 names the `input` field.
use pod_inference::engine::limits::MAX_EMBED_INPUTS as MAX_INPUTS;

/// Sentence embeddings, as floats or base64.
#[utoipa::path(post, path = "/v1/embeddings", request_body = EmbeddingRequest,
    responses(
        (status = 200, body = EmbeddingResponse),
        (status = 400, body = crate::openai::ErrorBody),
        (status = 404, body = crate::openai::ErrorBody),
    ))]
pub(crate) async fn embeddings<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    ApiJson(req): ApiJson<EmbeddingRequest>,
) -> Result<axum::response::Response, ApiError> {
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "`model` is required"));
    }
    let input = match req.input {
        None => return Err(ApiError::invalid("input", "`input` is required")),
        Some(EmbeddingInput::Text(t)) => vec![t],
        Some(EmbeddingInput::Texts(ts)) => ts,
    };
    if input.is_empty() {
        return Err(ApiError::invalid("input", "`input` must not be empty"));
    }
    if input.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("at most {MAX_INPUTS} inputs per request"),
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
            ))
        }
    };
    if !state.backend.is_ready() {
        return Err(ApiError::loading());
    }
    let crate::Embeddings {
        response: out,
        served_by,
    } = state
        .backend
        .embed(EmbedRequest {
            model: req.model.clone(),
            input,
        })
        .await?;
    state.metrics.tokens(&req.model, out.prompt_tokens, 0);
    let data = out
        .data
        .into_iter()
        .enumerate()
        .map(|(index, e)| EmbeddingData {
            object: "embedding".into(),
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = e.vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(e.vector)
            },
        })
        .collect();
    let body = Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: req.model,
        usage: EmbeddingUsage {
            prompt_tokens: out.prompt_tokens,
            total_tokens: out.prompt_tokens,
        },
    });
    Ok(super::generation::with_served_by(
        body.into_response(),
        &served_by,
    ))
}
