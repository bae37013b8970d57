//! Which web pages may call the API from a browser.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use pod_api::{ApiConfig, ApiKeys, ConfigError};

use common::{app, call, default_app};

const ALLOW_ORIGIN: &str = "access-control-allow-origin";

fn from_origin(method: &str, path: &str, origin: &str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("origin", origin);
    if method == "OPTIONS" {
        req = req
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization");
    }
    req.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn by_default_no_page_of_another_origin_may_read_the_api() {
    let app = default_app();
    for path in ["/pod/v1/node", "/v1/models", "/health"] {
        let reply = call(&app, from_origin("GET", path, "https://evil.example")).await;
        assert!(
            reply.headers.get(ALLOW_ORIGIN).is_none(),
            "{path}: {:?}",
            reply.headers
        );
        let reply = call(&app, from_origin("OPTIONS", path, "https://evil.example")).await;
        assert!(
            reply.headers.get(ALLOW_ORIGIN).is_none(),
            "{path}: {:?}",
            reply.headers
        );
    }
}

#[tokio::test]
async fn listed_origins_may_and_others_may_not() {
    let app = app(ApiConfig {
        cors_origins: vec!["https://app.example".into(), "http://localhost:3000".into()],
        ..ApiConfig::default()
    });
    for origin in ["https://app.example", "http://localhost:3000"] {
        let reply = call(&app, from_origin("GET", "/v1/models", origin)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers[ALLOW_ORIGIN], origin);
        let exposed = reply.headers["access-control-expose-headers"]
            .to_str()
            .unwrap();
        assert!(
            exposed.contains("x-request-id") && exposed.contains("x-pod-served-by"),
            "{exposed}"
        );
        let reply = call(&app, from_origin("OPTIONS", "/v1/models", origin)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.headers[ALLOW_ORIGIN], origin);
    }
    let reply = call(
        &app,
        from_origin("GET", "/v1/models", "https://evil.example"),
    )
    .await;
    assert!(
        reply.headers.get(ALLOW_ORIGIN).is_none(),
        "{:?}",
        reply.headers
    );
}

#[tokio::test]
async fn any_origin_is_allowed_only_without_keys() {
    let open = ApiConfig {
        cors_origins: vec!["*".into()],
        ..ApiConfig::default()
    };
    assert!(open.check().is_ok());
    let reply = call(
        &app(open),
        from_origin("GET", "/health", "https://any.example"),
    )
    .await;
    assert_eq!(reply.headers[ALLOW_ORIGIN], "*");

    let keyed = ApiConfig {
        cors_origins: vec!["https://app.example".into(), "*".into()],
        keys: ApiKeys::parse("sk-one"),
        ..ApiConfig::default()
    };
    let err = keyed.check().unwrap_err();
    assert!(matches!(err, ConfigError::AnyOriginWithKeys), "{err}");
    assert!(err.to_string().contains("API keys"), "{err}");
    let listed = ApiConfig {
        cors_origins: vec!["https://app.example".into()],
        ..keyed
    };
    assert!(listed.check().is_ok());
}

#[test]
fn malformed_origins_are_refused() {
    for origin in ["app.example", "https://app.example/path", "", "https://a b"] {
        let config = ApiConfig {
            cors_origins: vec![origin.into()],
            ..ApiConfig::default()
        };
        assert!(
            matches!(config.check(), Err(ConfigError::BadOrigin(ref o)) if o == origin),
            "{origin:?}"
        );
    }
}
