//! API errors as OpenAI-shaped JSON with the right status code.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pod_inference::EngineError;

use crate::openai::{ErrorBody, ErrorDetail};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Explanation sent to the client.
    pub message: String,
    /// OpenAI error type.
    pub kind: &'static str,
    /// Request field at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is invalid; `param` names the field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        if !param.is_empty() {
            e.param = Some(param.to_owned());
        }
        e
    }

    /// 404 for an unknown model.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or is not served by this mesh"),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 404 for an unknown route.
    pub fn route_not_found(path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {path}"),
        );
        e.code = Some("unknown_url");
        e
    }

    /// 404 for mesh routes on a node without a mesh.
    pub fn no_mesh() -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "This node runs without a mesh",
        );
        e.code = Some("no_mesh");
        e
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this URL",
        )
    }

    /// 401.
    pub fn unauthorized(message: &str) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 503 while models load.
    pub fn loading() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "Models are still loading; retry shortly",
        );
        e.code = Some("model_loading");
        e.retry_after = Some(2);
        e
    }

    /// 500 with a generic message; the cause is logged, not sent.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.into(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match &e {
            EngineError::UnknownModel(m) => ApiError::model_not_found(m),
            EngineError::WrongKind { .. } => ApiError::invalid("model", e.to_string()),
            EngineError::ContextLength { .. } => {
                let mut err = ApiError::invalid("messages", e.to_string());
                err.code = Some("context_length_exceeded");
                err
            }
            EngineError::InvalidRequest(m) => {
                // Engine messages name the field in backticks: `temperature` must be...
                let param = m
                    .split('`')
                    .nth(1)
                    .filter(|p| !p.contains(' '))
                    .unwrap_or("");
                ApiError::invalid(param, m.clone())
            }
            EngineError::QueueFull(_) => {
                let mut err = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "The server is at capacity; retry shortly",
                );
                err.code = Some("queue_full");
                err.retry_after = Some(1);
                err
            }
            EngineError::Stopped => {
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "The inference engine is shutting down",
                );
                err.retry_after = Some(5);
                err
            }
            EngineError::Internal(_) => ApiError::internal(&e),
            EngineError::Unavailable(m) => {
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m);
                err.code = Some("no_provider");
                err.retry_after = Some(2);
                err
            }
        }
    }
}

impl ApiError {
    /// 413.
    pub fn payload_too_large() -> Self {
        let mut e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "The request body is too large",
        );
        e.code = Some("request_too_large");
        e
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::payload_too_large();
        }
        ApiError::invalid("", format!("Invalid JSON body: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
