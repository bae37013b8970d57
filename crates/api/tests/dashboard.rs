//! The dashboard's page and assets: content types, caching, the security policy, and that
//! they load without a key while the data they show does not.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use pod_api::{ApiConfig, ApiKeys};

use common::{app, call, default_app};

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn page_and_assets_have_their_content_types() {
    let app = default_app();
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/chat.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let reply = call(&app, get(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        assert_eq!(reply.headers["content-type"], content_type, "{path}");
        assert_eq!(reply.headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(reply.headers["cache-control"], "no-cache", "{path}");
        assert!(!reply.body.is_empty(), "{path}");
    }
    let page = call(&app, get("/")).await;
    assert!(page
        .body
        .contains(r#"<script type="module" src="/ui/app.js">"#));
}

#[tokio::test]
async fn every_module_the_page_imports_is_served() {
    let app = default_app();
    let app_js = call(&app, get("/ui/app.js")).await.body;
    let mut imports: Vec<String> = Vec::new();
    let mut pending = vec![app_js];
    while let Some(source) = pending.pop() {
        for line in source.lines() {
            let Some((_, rest)) = line.split_once(" from './") else {
                continue;
            };
            let name = rest.trim_end_matches(['\'', ';']).to_owned();
            if !imports.contains(&name) {
                let reply = call(&app, get(&format!("/ui/{name}"))).await;
                assert_eq!(
                    reply.status,
                    StatusCode::OK,
                    "{name} is imported but not served"
                );
                imports.push(name);
                pending.push(reply.body);
            }
        }
    }
    assert!(imports.len() >= 5, "{imports:?}");
}

#[tokio::test]
async fn the_policy_forbids_inline_and_foreign_scripts() {
    let app = default_app();
    let reply = call(&app, get("/")).await;
    let csp = reply.headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    // With no inline script allowed, the page must have none.
    assert!(
        !reply.body.contains("<script>"),
        "inline script in the page"
    );
    assert!(
        !has_event_attribute(&reply.body),
        "inline event handler in the page"
    );
    assert!(!reply.body.contains("style="), "inline style in the page");
}

/// Whether markup has an `on...=` attribute.
fn has_event_attribute(html: &str) -> bool {
    html.split(" on").skip(1).any(|rest| {
        let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
        !name.is_empty() && rest[name.len()..].starts_with('=')
    })
}

#[tokio::test]
async fn etags_revalidate() {
    let app = default_app();
    let first = call(&app, get("/ui/app.js")).await;
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = call(
        &app,
        Request::get("/ui/app.js")
            .header("if-none-match", &etag)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    let other = call(&app, get("/ui/style.css")).await;
    assert_ne!(other.headers["etag"], first.headers["etag"]);
    let stale = call(
        &app,
        Request::get("/ui/app.js")
            .header("if-none-match", "\"0000\"")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(stale.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_ui_paths_are_not_found() {
    let app = default_app();
    for path in [
        "/ui/",
        "/ui/nope.js",
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/src/lib.rs",
        "/ui/app.js/x",
        "/index.html",
    ] {
        let reply = call(&app, get(path)).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{path}: {}",
            reply.body
        );
        assert_eq!(reply.json()["error"]["code"], "unknown_url", "{path}");
    }
}

#[tokio::test]
async fn the_page_needs_no_key_but_its_data_does() {
    let app = app(ApiConfig {
        keys: ApiKeys::parse("sk-right\n"),
        ..ApiConfig::default()
    });
    for path in ["/", "/ui/app.js", "/ui/style.css"] {
        assert_eq!(call(&app, get(path)).await.status, StatusCode::OK, "{path}");
    }
    for path in ["/pod/v1/stats", "/v1/models", "/pod/v1/node", "/metrics"] {
        assert_eq!(
            call(&app, get(path)).await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let authed = call(
        &app,
        Request::get("/pod/v1/stats")
            .header("authorization", "Bearer sk-right")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(authed.status, StatusCode::OK, "{}", authed.body);
}

#[tokio::test]
async fn stats_cover_five_minutes_and_are_documented() {
    let app = default_app();
    let reply = call(&app, get("/pod/v1/stats")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let stats = reply.json();
    assert_eq!(stats["object"], "stats");
    assert_eq!(stats["interval_seconds"], 2.0);
    let samples = stats["samples"].as_array().unwrap();
    assert!(!samples.is_empty());
    let last = samples.last().unwrap();
    for field in [
        "tokens_per_second",
        "requests",
        "queued",
        "active",
        "completion_tokens",
    ] {
        assert!(last.get(field).is_some(), "{field} missing from {last}");
    }
    assert!(last["ttft_ms"].is_null());
    let doc = call(&app, get("/openapi.json")).await.json();
    assert!(doc["paths"]["/pod/v1/stats"]["get"].is_object());
    assert!(doc["components"]["schemas"]["StatsView"].is_object());
}
