//! One model split across pods (pipeline stages), with real `pod` processes on 127.0.0.1 and
//! the real SmolLM2 weights: answers through the stages equal a whole-model pod's byte for
//! byte, a stage killed mid-answer is replaced without the client seeing it, a client that
//! hangs up frees its sequence on every stage, and an auto-placed stage moves where no pod
//! serves the blocks.

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::process::{wait_until, PodProcess};
use pod_node::receipts::{LedgerEntry, Role};
use serde_json::{json, Value};

const CHAT: &str = "smollm2-135m-instruct";

/// How long the mesh may take to see a model through its stages.
const MESH_TIMEOUT: Duration = Duration::from_secs(60);

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// A pod on loopback announcing every second, with `extra` flags.
fn pod(extra: &[&str]) -> PodProcess {
    let mut args = vec![
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--announce-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    PodProcess::start(&args)
}

/// A pod serving blocks `layers` of the chat model, joining through `bootstrap`.
fn stage(layers: &str, bootstrap: Option<&str>) -> PodProcess {
    let mut args = vec![
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--layers",
        layers,
    ];
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b]);
    }
    pod(&args)
}

fn body(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": true,
        "top_logprobs": 2,
        "stream": stream,
    })
}

/// POSTs a chat completion; returns the status, the `x-pod-served-by` header and the body.
fn chat(pod: &PodProcess, body: &Value) -> (u16, String, Value) {
    let mut res = agent()
        .post(&format!("{}/v1/chat/completions", pod.api))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request sent");
    let served = header(&res, "x-pod-served-by");
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, served, json)
}

fn header(res: &ureq::http::Response<ureq::Body>, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The answer's text and its tokens' log-probabilities, from a non-streamed reply.
fn answer(reply: &Value) -> (String, Value) {
    let choice = &reply["choices"][0];
    (
        choice["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("no content in {reply}"))
            .to_owned(),
        choice["logprobs"].clone(),
    )
}

/// Streams a chat completion: the served-by header, the text, the log-probabilities of every
/// chunk, whether `[DONE]` ended it, and any error event. `on_chunk` runs after each chunk
/// with the number of chunks so far.
fn stream(
    pod: &PodProcess,
    body: &Value,
    mut on_chunk: impl FnMut(usize, &str),
) -> (String, String, Vec<Value>, bool, Option<Value>) {
    let mut res = agent()
        .post(&format!("{}/v1/chat/completions", pod.api))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request sent");
    assert_eq!(res.status().as_u16(), 200);
    let served = header(&res, "x-pod-served-by");
    let reader = BufReader::new(res.body_mut().as_reader());
    let (mut text, mut logprobs, mut error, mut chunks) = (String::new(), Vec::new(), None, 0);
    for line in reader.lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return (served, text, logprobs, true, error);
        }
        let event: Value = serde_json::from_str(data).expect("event json");
        if event.get("error").is_some() {
            error = Some(event);
            continue;
        }
        let choice = &event["choices"][0];
        text.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
        if let Some(c) = choice["logprobs"]["content"].as_array() {
            logprobs.extend(c.iter().cloned());
        }
        chunks += 1;
        on_chunk(chunks, &served);
    }
    (served, text, logprobs, false, error)
}

/// Waits until `pod` lists the chat model (served through the mesh or itself).
fn wait_for_model(pod: &PodProcess) {
    wait_until(MESH_TIMEOUT, "the model is listed", || {
        let models = pod.get("/v1/models");
        models["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == CHAT)
            .then_some(())
    });
}

/// Waits until `head` sees a pod announcing blocks `layers`.
fn wait_for_stage(head: &PodProcess, peer: &str, layers: &str) {
    wait_until(MESH_TIMEOUT, "the stage is announced", || {
        let peers = head.get("/pod/v1/peers");
        peers["data"]
            .as_array()?
            .iter()
            .any(|p| {
                p["peer_id"] == peer
                    && p["stages"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["layers"] == layers))
            })
            .then_some(())
    });
}

/// Memory for blocks 15-29 of the chat model as `--layers auto` sizes them (from the sizes a
/// dry run reports), with a little to spare: not enough for the whole model.
fn memory_for_the_last_15_blocks() -> u64 {
    let home = tempfile::tempdir().expect("temp home");
    let out = common::process::pod_command(home.path())
        .args([
            "start",
            "--dry-run",
            "--json",
            "--model",
            CHAT,
            "--layers",
            "auto",
        ])
        .args(["--max-memory", "64GiB"])
        .output()
        .expect("pod start --dry-run");
    let plan: Value =
        serde_json::from_str(&common::process::stdout_of_success(&out)).expect("dry-run json");
    let auto = &plan["auto_layers"];
    assert_eq!(auto["decided"], "at start", "{plan}");
    assert_eq!(auto["max_memory"], 64u64 << 30);
    let sizes = &auto["sizes"];
    let n = |v: &Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("not a number in {sizes}"))
    };
    let blocks: Vec<u64> = sizes["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(n)
        .collect();
    assert_eq!(blocks.len(), 30);
    let head = n(&sizes["output_norm"])
        + sizes["output"]
            .as_u64()
            .unwrap_or_else(|| n(&sizes["embeddings"]));
    let cache = n(&sizes["kv_per_position"]) * n(&sizes["kv_positions"]);
    let tail: u64 = blocks[15..].iter().map(|b| b + cache).sum::<u64>() + head;
    // A block of spare is not a block more.
    tail + blocks[14] / 2
}

/// The pipeline stage receipts in the ledger of the pod whose home is `home`, read as a
/// client of the file would (the pod keeps writing it).
fn stage_receipts(home: &std::path::Path) -> Vec<LedgerEntry> {
    let path = home.join("receipts").join("ledger.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<LedgerEntry>(l).ok())
        .filter(|e| e.signed.receipt.stage.is_some())
        .collect()
}

#[test]
fn two_stages_one_placed_by_layers_auto_behind_a_front_door_answer_like_one_whole_pod() {
    // The reference: a whole-model pod on a mesh of its own.
    let whole = pod(&["--profile", "inference", "--model", CHAT]);
    let head = stage("0-14", None);
    // The second stage chooses its blocks: the ones no pod serves, as many as fit.
    let memory = memory_for_the_last_15_blocks().to_string();
    let tail = pod(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--layers",
        "auto",
        "--max-memory",
        &memory,
        "--bootstrap",
        &head.tcp_addr(),
    ]);
    let front = pod(&["--profile", "relay", "--bootstrap", &tail.tcp_addr()]);
    wait_for_stage(&head, &tail.peer_id, "15-29");
    assert!(
        tail.log()
            .contains("--layers auto chose blocks 15-29 of 30"),
        "{}",
        tail.log()
    );
    wait_for_model(&front);

    // The front door, which holds no block, lists the model with the pods serving its
    // blocks, and that they chain over all of them.
    let listed = wait_until(MESH_TIMEOUT, "the model's stages are listed", || {
        let models = front.get("/v1/models");
        let model = models["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == CHAT)?
            .clone();
        (model["pipeline"]["complete"] == true).then_some(model)
    });
    assert_eq!(listed["pipeline"]["total_layers"], 30, "{listed}");
    let stages: Vec<(&str, &str)> = listed["pipeline"]["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| (s["peer"].as_str().unwrap(), s["layers"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stages,
        [
            (head.peer_id.as_str(), "0-14"),
            (tail.peer_id.as_str(), "15-29")
        ]
    );
    // A whole-model pod's listing has no pipeline.
    let whole_models = whole.get("/v1/models");
    assert!(
        whole_models["data"][0].get("pipeline").is_none(),
        "{whole_models}"
    );

    let prompt = "Write one sentence about the sea.";
    let (status, _, want) = chat(&whole, &body(prompt, 24, false));
    assert_eq!(status, 200, "{want}");
    let (want_text, want_logprobs) = answer(&want);
    assert!(!want_text.is_empty());

    // Through the front door: served by the head, which names its stages to the front door
    // as to its own API.
    let (status, served, got) = chat(&front, &body(prompt, 24, false));
    assert_eq!(status, 200, "{got}\n{}", head.log());
    assert_eq!(served, format!("{}, {}", head.peer_id, tail.peer_id));
    let (text, logprobs) = answer(&got);
    assert_eq!(text, want_text);
    assert_eq!(logprobs, want_logprobs);
    assert_eq!(got["usage"], want["usage"]);

    let (status, served, direct) = chat(&head, &body(prompt, 24, false));
    assert_eq!(status, 200, "{direct}");
    assert_eq!(served, format!("{}, {}", head.peer_id, tail.peer_id));
    assert_eq!(answer(&direct).0, want_text);

    // Streamed, the same text and log-probabilities.
    let (_, want_stream, want_lp, done, err) = stream(&whole, &body(prompt, 24, true), |_, _| {});
    assert!(done && err.is_none());
    assert_eq!(want_stream, want_text);
    let (_, text, lp, done, err) = stream(&front, &body(prompt, 24, true), |_, _| {});
    assert!(done, "{err:?}");
    assert_eq!(text, want_text);
    assert_eq!(lp, want_lp);

    // Several requests at once share the stages' passes and still answer exactly.
    let prompts = ["Name a fruit.", "Count to five.", "Say hello in French."];
    let wants: Vec<String> = prompts
        .iter()
        .map(|p| answer(&chat(&whole, &body(p, 16, false)).2).0)
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| answer(&chat(&head, &body(p, 16, false)).2).0))
            .collect();
        for (h, want) in handles.into_iter().zip(&wants) {
            assert_eq!(&h.join().unwrap(), want);
        }
    });

    // Each says what it serves, and the head which chain its answers took.
    let stages = &tail.get("/pod/v1/node")["stages"];
    assert_eq!(stages[0]["role"], "stage", "{stages}");
    assert_eq!(stages[0]["layers"], "15-29");
    let stages = &head.get("/pod/v1/node")["stages"];
    assert_eq!(stages[0]["role"], "head", "{stages}");
    assert_eq!(stages[0]["layers"], "0-14");
    assert_eq!(
        stages[0]["chain"][0],
        format!("blocks 15-29 on {}", tail.peer_id).as_str()
    );
    let peers = common::process::pod_command(&head.home)
        .args(["peers", "--api", &head.api])
        .output()
        .expect("pod peers");
    let listing = common::process::stdout_of_success(&peers);
    assert!(
        listing.contains(&format!("{CHAT} (blocks 15-29 of 30)")),
        "{listing}"
    );
}

#[test]
fn a_stage_killed_mid_answer_is_replaced_and_the_text_is_unchanged() {
    let whole = pod(&["--profile", "inference", "--model", CHAT]);
    let first = stage("15-29", None);
    let bootstrap = first.tcp_addr();
    let mut tails = vec![first, stage("15-29", Some(&bootstrap))];
    let head = stage("0-14", Some(&bootstrap));
    for t in &tails {
        wait_for_stage(&head, &t.peer_id, "15-29");
    }

    let prompt = "Tell me a short story about a robot.";
    let (status, _, want) = chat(&whole, &body(prompt, 48, false));
    assert_eq!(status, 200);
    let (want_text, _) = answer(&want);

    // Kill the stage the answer runs on after a few chunks.
    let mut killed = None;
    let (served, text, _, done, err) = stream(&head, &body(prompt, 48, true), |n, served| {
        if n == 6 && killed.is_none() {
            let used = served.split(", ").nth(1).unwrap_or_default();
            let i = tails
                .iter()
                .position(|t| t.peer_id == used)
                .unwrap_or_else(|| panic!("{served} names no stage"));
            tails[i].child.kill().unwrap();
            tails[i].child.wait().unwrap();
            killed = Some(tails.remove(i).peer_id.clone());
        }
    });
    let killed = killed.expect("the answer was long enough to kill a stage");
    assert!(served.contains(&killed));
    assert!(done, "{err:?}\n{}", head.log());
    assert_eq!(text, want_text, "\n{}", head.log());
    assert!(
        head.log().contains("pipeline stage failed"),
        "{}",
        head.log()
    );

    // The spare serves the next answer; the head names it.
    let (status, served, again) = chat(&head, &body(prompt, 48, false));
    assert_eq!(status, 200, "{again}");
    assert_eq!(served, format!("{}, {}", head.peer_id, tails[0].peer_id));
    assert_eq!(answer(&again).0, want_text);

    // No stage left for blocks 15-29: a clear error, not a silent stop.
    drop(tails);
    let (status, _, reply) = chat(&head, &body(prompt, 8, false));
    assert_ne!(status, 200, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("block 15"), "{reply}");
}

#[test]
fn three_stages_behind_their_head_and_a_whole_pod_that_joins_is_preferred() {
    let whole = pod(&["--profile", "inference", "--model", CHAT]);
    let tail = stage("20-29", None);
    let mid = stage("10-19", Some(&tail.tcp_addr()));
    // The head is also the front door: requests come to its own API. Without a prefix cache
    // it frees each sequence as its answer ends, so the stages sign their receipts at once.
    let head = pod(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--layers",
        "0-9",
        "--prefix-cache",
        "0",
        "--bootstrap",
        &tail.tcp_addr(),
    ]);
    wait_for_stage(&head, &mid.peer_id, "10-19");
    wait_for_stage(&head, &tail.peer_id, "20-29");

    let prompt = "What is the capital of France?";
    let (status, _, want) = chat(&whole, &body(prompt, 20, false));
    assert_eq!(status, 200);
    let (status, served, got) = chat(&head, &body(prompt, 20, false));
    assert_eq!(status, 200, "{got}\n{}", head.log());
    assert_eq!(
        served,
        format!("{}, {}, {}", head.peer_id, mid.peer_id, tail.peer_id)
    );
    assert_eq!(answer(&got), answer(&want));

    // Each stage signed a receipt for its blocks of that answer, which the head keeps in its
    // ledger and counts in /pod/v1/receipts; each stage keeps its own copy.
    let kept = wait_until(MESH_TIMEOUT, "the head keeps both stages' receipts", || {
        let stages = stage_receipts(&head.home);
        (stages.len() == 2).then_some(stages)
    });
    let mut named: Vec<(String, u64, u64)> = kept
        .iter()
        .map(|e| {
            e.signed.verify().expect("a stage receipt verifies");
            assert_eq!(e.role, Role::Consumed);
            let r = &e.signed.receipt;
            assert_eq!(r.requester, head.peer_id);
            assert_eq!(r.model, CHAT);
            let work = r.stage.as_ref().expect("stage work");
            // The prompt, then one row for each token sampled after the first but the last.
            let completion = got["usage"]["completion_tokens"].as_u64().unwrap();
            let prompt = got["usage"]["prompt_tokens"].as_u64().unwrap();
            assert_eq!(work.rows, prompt + completion - 1, "{r:?}");
            assert_eq!(work.passes, completion, "{r:?}");
            (r.server.clone(), work.first_block, work.last_block)
        })
        .collect();
    named.sort_by_key(|n| n.1);
    assert_eq!(
        named,
        [
            (mid.peer_id.clone(), 10, 19),
            (tail.peer_id.clone(), 20, 29)
        ]
    );
    let mut forged = kept[0].signed.clone();
    forged.receipt.prompt_tokens += 1;
    assert!(forged.verify().is_err(), "a tampered receipt verifies");
    let totals = head.get("/pod/v1/receipts");
    for stage in [&mid, &tail] {
        let row = totals["data"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["peer"] == stage.peer_id.as_str()))
            .unwrap_or_else(|| panic!("{totals}"));
        assert_eq!(row["consumed"]["requests"], 1, "{totals}");
        let own = wait_until(MESH_TIMEOUT, "the stage keeps its receipt", || {
            let own = stage_receipts(&stage.home);
            (!own.is_empty()).then_some(own)
        });
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].role, Role::Served);
        assert_eq!(
            own[0].signed,
            kept.iter()
                .find(|e| e.signed.receipt.server == stage.peer_id)
                .unwrap()
                .signed
        );
    }

    // A pod holding the whole model joins: the head sends the next request there.
    let joined = pod(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--bootstrap",
        &tail.tcp_addr(),
    ]);
    wait_until(MESH_TIMEOUT, "the head sees the whole pod", || {
        let peers = head.get("/pod/v1/peers");
        peers["data"]
            .as_array()?
            .iter()
            .any(|p| {
                p["peer_id"] == joined.peer_id.as_str()
                    && p["connected"] == true
                    && p["api_ready"] == true
                    && p["models"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["name"] == CHAT))
            })
            .then_some(())
    });
    // Routing reads a copy of the peer table refreshed a few times a second.
    std::thread::sleep(Duration::from_secs(1));
    let (status, served, again) = chat(&head, &body(prompt, 20, false));
    assert_eq!(status, 200, "{again}");
    assert_eq!(served, joined.peer_id, "{}", head.log());
    assert_eq!(answer(&again).0, answer(&want).0);
}

/// The value of the gauge `name` in a pod's `/metrics`.
fn gauge(pod: &PodProcess, name: &str) -> Option<f64> {
    pod.get_text("/metrics").lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

#[test]
fn a_client_that_hangs_up_mid_stream_frees_the_sequence_on_every_stage() {
    let tail = stage("15-29", None);
    // Without a prefix cache the head keeps no finished sequence, so what the stage holds is
    // exactly what is running.
    let head = pod(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--layers",
        "0-14",
        "--prefix-cache",
        "0",
        "--bootstrap",
        &tail.tcp_addr(),
    ]);
    wait_for_stage(&head, &tail.peer_id, "15-29");
    let held = |pod: &PodProcess| pod.get("/pod/v1/node")["stages"][0]["sequences"].as_u64();

    let body = json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
        "temperature": 0,
        "max_tokens": 2000,
        "stream": true,
    });
    let mut res = agent()
        .post(&format!("{}/v1/chat/completions", head.api))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request sent");
    assert_eq!(res.status().as_u16(), 200);
    let mut reader = BufReader::new(res.body_mut().as_reader());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 5 {
        line.clear();
        let n = reader.read_line(&mut line).expect("stream line");
        assert!(
            n > 0,
            "the stream ended after {chunks} chunks\n{}",
            head.log()
        );
        if line.starts_with("data: {") {
            chunks += 1;
        }
    }
    // Mid-answer: the stage holds the sequence, the head's engine runs it.
    assert_eq!(held(&tail), Some(1), "{}", tail.log());
    assert_eq!(gauge(&head, "pod_active_sequences"), Some(1.0));

    // The client hangs up: the connection closes with the answer unread.
    drop(reader);
    drop(res);
    wait_until(
        Duration::from_secs(30),
        "the head's engine frees the sequence",
        || (gauge(&head, "pod_active_sequences") == Some(0.0)).then_some(()),
    );
    wait_until(
        Duration::from_secs(30),
        "the stage frees the sequence",
        || (held(&tail) == Some(0)).then_some(()),
    );
}

#[test]
fn an_auto_placed_stage_moves_to_the_blocks_no_pod_serves_when_their_pod_goes() {
    let mut first = stage("0-14", None);
    // Memory for 15 blocks: the last ones now, or the first ones (no larger).
    let memory = memory_for_the_last_15_blocks().to_string();
    let auto = pod(&[
        "--profile",
        "inference",
        "--model",
        CHAT,
        "--layers",
        "auto",
        "--max-memory",
        &memory,
        "--bootstrap",
        &first.tcp_addr(),
    ]);
    wait_for_stage(&first, &auto.peer_id, "15-29");
    // A second pod serves blocks 15-29: the auto-placed one stays while the head lives, as
    // moving would only trade one copy for another.
    let spare = stage("15-29", Some(&first.tcp_addr()));
    wait_for_stage(&auto, &spare.peer_id, "15-29");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!auto.log().contains("moves from"), "{}", auto.log());

    // The head goes: blocks 0-14 are held by no pod, 15-29 by two.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    wait_until(MESH_TIMEOUT, "the auto-placed stage moves", || {
        auto.log()
            .contains("--layers auto moves from blocks 15-29 to 0-14 of 30")
            .then_some(())
    });
    // It now heads the model, with the spare as its stage, and answers.
    let (status, served, reply) = wait_until(MESH_TIMEOUT, "the model answers again", || {
        let (status, served, reply) = chat(&auto, &body("Name a colour.", 8, false));
        (status == 200).then_some((status, served, reply))
    });
    assert_eq!(status, 200);
    assert_eq!(served, format!("{}, {}", auto.peer_id, spare.peer_id));
    assert!(!answer(&reply).0.is_empty());
    let stages = &auto.get("/pod/v1/node")["stages"];
    assert_eq!(stages[0]["role"], "head", "{stages}");
    assert_eq!(stages[0]["layers"], "0-14", "{stages}");
    assert_eq!(stages.as_array().map(Vec::len), Some(1), "{stages}");
}
