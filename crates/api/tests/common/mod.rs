//! What the API's tests share: a backend with no models, and one-shot requests to a router.
#![allow(dead_code, unreachable_pub)]

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use pod_api::{ApiConfig, AppState, Backend, Embeddings, Generation, ModelEntry};
use pod_inference::{EmbedRequest, EngineError, GenerateRequest};
use tower::ServiceExt;

/// A backend that is never ready: requests that pass validation get 503.
#[derive(Debug, Clone, Copy)]
pub struct NoModels;

impl Backend for NoModels {
    fn models(&self) -> Vec<ModelEntry> {
        Vec::new()
    }

    fn is_ready(&self) -> bool {
        false
    }

    fn load(&self) -> (usize, usize) {
        (0, 0)
    }

    async fn generate(&self, _req: GenerateRequest) -> Result<Generation, EngineError> {
        Err(EngineError::Stopped)
    }

    async fn embed(&self, _req: EmbedRequest) -> Result<Embeddings, EngineError> {
        Err(EngineError::Stopped)
    }
}

/// The router over [`NoModels`] with these settings.
pub fn app(config: ApiConfig) -> Router {
    pod_api::router(AppState::new(NoModels, config))
}

/// The router over [`NoModels`] with the default settings.
pub fn default_app() -> Router {
    app(ApiConfig::default())
}

/// A reply, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends one request to `app`, with no socket.
pub async fn call(app: &Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// A JSON POST.
pub fn post_json(path: &str, body: &serde_json::Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}
