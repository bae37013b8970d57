//! The OpenAI-compatible API over the real engine and models, through real sockets on
//! 127.0.0.1: request validation, error shapes, auth, streaming, disconnects and metrics.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use pod_api::{ApiConfig, ApiKeys, AppState, LocalBackend};
use serde_json::{json, Value};

const CHAT: &str = "smollm2-135m-instruct";
const EMBED: &str = "all-minilm-l6-v2";

/// Serves the API over the shared engine on an ephemeral port.
fn serve(keys: &str, ready: bool) -> (String, LocalBackend) {
    let backend = LocalBackend::new(common::engine(), "local");
    backend.set_ready(ready);
    (serve_backend(backend.clone(), keys), backend)
}

/// Serves the API over `backend` from a background runtime; returns the base URL.
fn serve_backend(backend: LocalBackend, keys: &str) -> String {
    let state = AppState::new(
        backend,
        ApiConfig {
            keys: ApiKeys::parse(keys),
            max_body_bytes: 1024 * 1024,
            ..ApiConfig::default()
        },
    );
    let app = pod_api::router(Arc::clone(&state));
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    format!("http://{addr}")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an OpenAI-shaped error with this status.
    fn assert_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        v
    }
}

fn send(method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> Reply {
    let agent = agent();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let result = match body {
        Some(b) => agent.run(
            req.header("content-type", "application/json")
                .body(b.to_owned())
                .unwrap(),
        ),
        None => agent.run(req.body(()).unwrap()),
    };
    let mut res = result.expect("request sent");
    let headers = res
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let status = res.status().as_u16();
    let body = res.body_mut().read_to_string().unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

/// Declares a JSON body of `len` bytes, sends only its first bytes, and returns the raw reply.
fn oversized_request(base: &str, len: usize) -> String {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{{\"model\": "
    )
    .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

fn post(base: &str, path: &str, body: &Value) -> Reply {
    send(
        "POST",
        &format!("{base}{path}"),
        Some(&body.to_string()),
        None,
    )
}

fn chat_body(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": CHAT, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens})
}

/// Reads an SSE response; returns the JSON payloads and whether `[DONE]` ended it.
fn sse(base: &str, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let mut res = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let reader = BufReader::new(res.body_mut().as_reader());
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return (events, true);
            }
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, false)
}

#[test]
fn chat_stream_equals_non_stream_and_follows_openai_chunk_order() {
    let (base, _) = serve("", true);
    let whole = post(
        &base,
        "/v1/chat/completions",
        &chat_body("Name three colours.", 24),
    );
    assert_eq!(whole.status, 200, "{}", whole.body);
    assert_eq!(whole.header("x-pod-served-by"), Some("local"));
    assert!(whole.header("x-request-id").is_some());
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let mut body = chat_body("Name three colours.", 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (events, done) = sse(&base, "/v1/chat/completions", &body);
    assert!(done, "stream must end with [DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let mut streamed = String::new();
    let mut finish = None;
    for e in &events[1..events.len() - 1] {
        assert_eq!(e["object"], "chat.completion.chunk");
        if let Some(t) = e["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
        if let Some(f) = e["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(streamed, text);
    assert_eq!(finish.as_deref(), Some("length"));
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 24);
}

#[test]
fn completions_embeddings_and_models() {
    let (base, _) = serve("", true);
    let r = post(
        &base,
        "/v1/completions",
        &json!({"model": CHAT, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("The capital of France is"));
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        5
    );

    let r = post(
        &base,
        "/v1/embeddings",
        &json!({"model": EMBED, "input": ["hello", "world"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let floats: Vec<f32> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats.len(), 384);
    let r = post(
        &base,
        "/v1/embeddings",
        &json!({"model": EMBED, "input": "hello", "encoding_format": "base64"}),
    );
    let v = r.json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, floats);

    let v = send("GET", &format!("{base}/v1/models"), None, None).json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&CHAT) && ids.contains(&EMBED), "{ids:?}");
    let m = send("GET", &format!("{base}/v1/models/{CHAT}"), None, None);
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["context_length"], 8192);
    send("GET", &format!("{base}/v1/models/nope"), None, None).assert_error(404);
    let doc = send("GET", &format!("{base}/openapi.json"), None, None).json();
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
    assert!(doc["components"]["schemas"]["ChatCompletionRequest"].is_object());
}

#[test]
fn json_mode_output_parses() {
    let (base, _) = serve("", true);
    let mut body = chat_body(
        "Describe a cat as a JSON object with the keys name and age.",
        400,
    );
    body["response_format"] = json!({"type": "json_object"});
    let r = post(&base, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(parsed.is_object());
}

#[test]
fn bad_requests_get_openai_errors() {
    let (base, _) = serve("", true);
    let url = format!("{base}/v1/chat/completions");
    send("POST", &url, Some("{not json"), None).assert_error(400);
    send(
        "POST",
        &url,
        Some(r#"{"model": "x", "messages": "hi"}"#),
        None,
    )
    .assert_error(400);
    send("POST", &url, Some(r#"{"model": 5, "messages": []}"#), None).assert_error(400);
    // A body over the limit is refused from its declared length, before it is read. (Sending
    // the whole body would race the server's early answer against the client's writes.)
    let raw = oversized_request(&base, 2 * 1024 * 1024);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("\"request_too_large\""), "{raw}");

    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"model": CHAT, "messages": []}), 400, "messages"),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000}),
            400,
            "messages",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
            400,
            "temperature",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "n": 100}),
            400,
            "n",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            "messages[0].content[0]",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}),
            400,
            "response_format",
        ),
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model",
        ),
        (
            json!({"model": EMBED, "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "model",
        ),
        (
            json!({"model": CHAT, "messages": [{"role": "user", "content": "word ".repeat(10000)}]}),
            400,
            "messages",
        ),
    ];
    for (body, status, param) in cases {
        let v = post(&base, "/v1/chat/completions", &body).assert_error(status);
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let v = post(
        &base,
        "/v1/embeddings",
        &json!({"model": EMBED, "input": []}),
    )
    .assert_error(400);
    assert_eq!(v["error"]["param"], "input");
    let v = post(
        &base,
        "/v1/embeddings",
        &json!({"model": EMBED, "input": "x", "encoding_format": "hex"}),
    )
    .assert_error(400);
    assert_eq!(v["error"]["param"], "encoding_format");
    send("GET", &format!("{base}/v1/nothing"), None, None).assert_error(404);
    send("GET", &url, None, None).assert_error(405);
    assert_eq!(
        send("GET", &format!("{base}/health"), None, None).status,
        200
    );
}

#[test]
fn api_keys_are_required_when_configured() {
    let (base, _) = serve("sk-right\n", true);
    let body = chat_body("hi", 2).to_string();
    let url = format!("{base}/v1/chat/completions");
    send("POST", &url, Some(&body), None).assert_error(401);
    send("POST", &url, Some(&body), Some("sk-wrong")).assert_error(401);
    assert_eq!(
        send("POST", &url, Some(&body), Some("sk-right")).status,
        200
    );
    send("GET", &format!("{base}/v1/models"), None, None).assert_error(401);
    assert_eq!(
        send("GET", &format!("{base}/health"), None, None).status,
        200
    );
}

#[test]
fn not_ready_means_503_with_retry_after() {
    let (base, backend) = serve("", false);
    let r = send("GET", &format!("{base}/health"), None, None);
    assert_eq!(r.status, 503);
    let r = post(&base, "/v1/chat/completions", &chat_body("hi", 2));
    r.assert_error(503);
    assert!(r.header("retry-after").is_some());
    backend.set_ready(true);
    assert_eq!(
        send("GET", &format!("{base}/health"), None, None).status,
        200
    );
}

/// The API over an engine of its own with `config`, the chat model loaded; its base URL.
fn serve_chat_engine(config: pod_inference::EngineConfig) -> String {
    let engine = pod_inference::Engine::start(config);
    let model = pod_node::loader::resolve(&common::store(), CHAT, true).unwrap();
    pod_node::loader::load_into(&engine, &model, &pod_inference::Placement::cpu()).unwrap();
    let backend = LocalBackend::new(engine, "local");
    backend.set_ready(true);
    serve_backend(backend, "")
}

#[test]
fn full_queue_means_429_with_retry_after() {
    let base = serve_chat_engine(pod_inference::EngineConfig {
        max_queue: 0,
        ..Default::default()
    });
    let r = post(&base, "/v1/chat/completions", &chat_body("hi", 2));
    let v = r.assert_error(429);
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(r.header("retry-after"), Some("1"));
}

#[test]
fn the_kv_memory_budget_cuts_the_context_refuses_what_never_fits_and_queues_the_rest() {
    // SmolLM2-135M: 30 layers × 3 KV heads × 64 values, keys and values in f32.
    const PER_TOKEN: usize = 2 * 30 * 3 * 64 * 4;
    let budget = 64 << 20;
    let base = serve_chat_engine(pod_inference::EngineConfig {
        kv_memory_bytes: Some(budget),
        ..Default::default()
    });
    let fits = budget / PER_TOKEN;
    let m = send("GET", &format!("{base}/v1/models/{CHAT}"), None, None);
    assert_eq!(m.json()["context_length"], fits);
    let v = post(&base, "/v1/chat/completions", &chat_body("hi", fits as u32)).assert_error(400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Two requests that each fit but not together: both complete (the engine tests check
    // that the second waits for the first).
    let half = (fits / 2 + 10) as u32;
    let other = {
        let base = base.clone();
        thread::spawn(move || post(&base, "/v1/chat/completions", &chat_body("hello", half)))
    };
    let r = post(&base, "/v1/chat/completions", &chat_body("hi", half));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = other.join().unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn thirty_two_streams_half_disconnecting_leave_the_server_healthy() {
    let (base, backend) = serve("", true);
    let engine = backend.engine().clone();
    let cancelled_before = engine
        .stats()
        .cancelled
        .load(std::sync::atomic::Ordering::Relaxed);
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let base = base.clone();
            thread::spawn(move || {
                let mut body = chat_body(
                    "Write a long story about the sea.",
                    if i % 2 == 0 { 8 } else { 400 },
                );
                body["stream"] = json!(true);
                let mut res = agent()
                    .post(&format!("{base}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .unwrap();
                assert_eq!(res.status().as_u16(), 200);
                let mut reader = BufReader::new(res.body_mut().as_reader());
                if i % 2 == 1 {
                    // Read the first event, then hang up.
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    assert!(line.starts_with("data: "));
                    return false;
                }
                let mut all = String::new();
                reader.read_to_string(&mut all).unwrap();
                assert!(all.contains("\"finish_reason\":\"length\""), "{all}");
                all.trim_end().ends_with("data: [DONE]")
            })
        })
        .collect();
    let finished = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|d| *d)
        .count();
    assert_eq!(finished, 16);
    // The abandoned streams are cancelled, not run to 400 tokens.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cancelled = engine
            .stats()
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            - cancelled_before;
        let active = engine
            .stats()
            .active
            .load(std::sync::atomic::Ordering::Relaxed);
        let queued = engine
            .stats()
            .queued
            .load(std::sync::atomic::Ordering::Relaxed);
        if cancelled >= 16 && active == 0 && queued == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cancelled {cancelled}, active {active}, queued {queued}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        send("GET", &format!("{base}/health"), None, None).status,
        200
    );
    let ok = post(&base, "/v1/chat/completions", &chat_body("hi", 3));
    assert_eq!(ok.status, 200);
    let text = send("GET", &format!("{base}/metrics"), None, None).body;
    assert_eq!(
        metric(
            &text,
            "pod_http_requests_total",
            &["route=\"/v1/chat/completions\"", "status=\"200\""]
        ),
        33.0,
        "{text}"
    );
    assert!(metric(&text, "pod_completion_tokens_total", &[CHAT]) >= 16.0 * 8.0 + 3.0);
    assert!(
        metric(&text, "pod_time_to_first_token_seconds_count", &[]) >= 17.0,
        "{text}"
    );
    assert_eq!(metric(&text, "pod_queue_depth", &[]), 0.0);
}

#[test]
fn repeated_prompt_reports_cached_tokens_in_usage_and_metrics() {
    let (base, _backend) = serve("", true);
    let body = json!({
        "model": CHAT,
        "messages": [
            {"role": "system", "content": "You are a terse assistant on a home server. Reply in five words or fewer."},
            {"role": "user", "content": "Name a planet."}
        ],
        "temperature": 0,
        "max_tokens": 8
    });
    let first: Value =
        serde_json::from_str(&post(&base, "/v1/chat/completions", &body).body).unwrap();
    assert!(
        first["usage"].get("prompt_tokens_details").is_none(),
        "{first}"
    );
    let second: Value =
        serde_json::from_str(&post(&base, "/v1/chat/completions", &body).body).unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(cached, prompt - 1, "{second}");
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    // Streams report it in their usage chunk too.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (events, done) = sse(&base, "/v1/chat/completions", &streamed);
    assert!(done);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        json!(prompt - 1),
        "{usage}"
    );
    let text = send("GET", &format!("{base}/metrics"), None, None).body;
    assert_eq!(
        metric(&text, "pod_cached_prompt_tokens_total", &[CHAT]),
        2.0 * (prompt - 1) as f64,
        "{text}"
    );
}

/// Rendering and tokenizing a prompt happens off the runtime's threads: on a runtime with one
/// thread, a task spawned before the request runs while the request is admitted (with the
/// work done inline it could only run after).
#[tokio::test(flavor = "current_thread")]
async fn admission_leaves_the_runtime_thread_free() {
    use pod_api::Backend as _;
    use std::sync::atomic::{AtomicBool, Ordering};

    let backend = LocalBackend::new(common::engine(), "local");
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
    let prompt = "Tell me about the sea. ".repeat(200);
    let generation = backend.generate(common::greedy(&prompt, 1)).await.unwrap();
    assert!(
        ran.load(Ordering::SeqCst),
        "the runtime thread was busy admitting the request"
    );
    drop(generation);
    other.await.unwrap();
}
