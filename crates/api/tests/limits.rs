//! What one client can make the API hold: stop lists, metric label sets, slow connections and
//! the number of connections.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use pod_api::{ApiConfig, ServerLimits};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{call, default_app, post_json};

fn assert_stop_error(reply: &common::Reply) {
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["error"]["param"], "stop", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
}

#[tokio::test]
async fn stop_lists_are_capped_at_four_sequences_of_256_bytes() {
    let app = default_app();
    let chat = |stop: serde_json::Value| {
        post_json(
            "/v1/chat/completions",
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": stop}),
        )
    };
    let text = |stop: serde_json::Value| {
        post_json(
            "/v1/completions",
            &json!({"model": "m", "prompt": "hi", "stop": stop}),
        )
    };
    let five = json!(["a", "b", "c", "d", "e"]);
    let long = json!("x".repeat(257));
    let long_in_list = json!(["a", "é".repeat(129)]);
    for make in [&chat as &dyn Fn(_) -> _, &text] {
        for stop in [&five, &long, &long_in_list] {
            assert_stop_error(&call(&app, make(stop.clone())).await);
        }
        // At the caps the request is valid; the backend without models then answers 503.
        let at_caps = json!(["x".repeat(256), "b", "c", "d"]);
        let reply = call(&app, make(at_caps)).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.body
        );
    }
}

fn random_name(len: usize) -> String {
    let mut state = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'A' + (state % 26) as u8)
        })
        .collect()
}

#[tokio::test]
async fn metrics_label_sets_stay_bounded_whatever_the_method_and_path() {
    let app = default_app();
    let scrape = || Request::get("/metrics").body(Body::empty()).unwrap();
    // A first request of each kind, so later ones can only reuse label sets.
    call(&app, scrape()).await;
    let before = call(&app, scrape()).await.body;
    for i in 0..3 {
        let method = Method::from_bytes(random_name(100_000 + i).as_bytes()).unwrap();
        let reply = call(
            &app,
            Request::builder()
                .method(method)
                .uri("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
        let path = format!("/{}", random_name(1000 + i));
        let reply = call(&app, Request::get(&path).body(Body::empty()).unwrap()).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    }
    let after = call(&app, scrape()).await.body;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("pod_http_requests_total{"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        after.len() < before.len() + 1000,
        "metrics grew by {} bytes",
        after.len() - before.len()
    );
    let new: Vec<_> = series(&after)
        .into_iter()
        .filter(|s| !series(&before).contains(s))
        .collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(
        new.iter().any(|s| s.contains(r#"route="/health""#)
            && s.contains(r#"method="other""#)
            && s.contains(r#"status="405""#)),
        "{new:?}"
    );
    assert!(
        new.iter().any(|s| s.contains(r#"route="other""#)
            && s.contains(r#"method="GET""#)
            && s.contains(r#"status="404""#)),
        "{new:?}"
    );
}

/// Serves the router over no models on a `127.0.0.1:0` socket with these limits.
async fn serve(limits: ServerLimits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = common::app(ApiConfig::default());
    tokio::spawn(pod_api::serve(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    addr
}

/// Reads until the server closes the connection; the bytes read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    out
}

#[tokio::test]
async fn a_client_sending_headers_byte_by_byte_is_cut_off() {
    let addr = serve(ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 16,
    })
    .await;
    let request = format!(
        "GET /health HTTP/1.1\r\nhost: {addr}\r\n{}\r\n",
        "x-pad: y\r\n".repeat(20)
    );
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let writing = tokio::spawn(async move {
        // 50 ms a byte: the whole request would take over 10 s.
        for byte in request.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    });
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), reader.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the server still holds the connection after 8 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off only after {:?}",
        started.elapsed()
    );
    writing.abort();
    let reply = String::from_utf8_lossy(&rest);
    assert!(!reply.contains("200 OK"), "{reply}");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let timeout = Duration::from_millis(800);
    let addr = serve(ServerLimits {
        header_read_timeout: timeout,
        max_connections: 2,
    })
    .await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the server time to take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(
            format!("GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut third))
        .await
        .expect("the third connection is never answered");
    let waited = started.elapsed();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        waited >= timeout - Duration::from_millis(100),
        "answered after {waited:?}, before the idle connections were cut off"
    );
    for mut stream in idle {
        assert!(read_to_close(&mut stream).await.is_empty());
    }
}
