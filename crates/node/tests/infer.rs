//! `/pod/infer/1.0.0` between in-process nodes on 127.0.0.1 with the real chat model: honest
//! serving, and peers that send garbage, lie in their receipts, never answer, or hang up.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use pod_inference::{EngineError, GenerateEvent, GenerateRequest, Usage};
use pod_node::access::Access;
use pod_node::catalogue::DEFAULT_CHAT_MODEL;
use pod_node::mesh::Client;
use pod_node::receipts::{Ledger, Receipt, SignedReceipt};
use pod_node::remote::client::{ClientConfig, InferClient};
use pod_node::remote::server::{InferServer, ServerConfig};
use pod_node::remote::{Frame, Request, PROTOCOL};
use pod_node::wire::{read_frame, write_frame};

const WAIT: Duration = Duration::from_secs(20);

async fn node(key: Keypair, bootstrap: Vec<Multiaddr>) -> (Client, Multiaddr) {
    common::mesh_node(key, bootstrap).await
}

/// An honest node serving the real engine.
async fn honest(server_config: ServerConfig) -> (Client, Multiaddr, Arc<InferServer>) {
    let key = Keypair::generate_ed25519();
    let (client, addr) = node(key.clone(), vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    std::mem::forget(dir);
    let server = InferServer::new(common::engine(), key, Some(ledger), server_config);
    tokio::spawn(Arc::clone(&server).run(client.streams()));
    (client, addr, server)
}

/// A requester connected to `peers`, asking them in the given order.
async fn requester(peers: &[(PeerId, Multiaddr)]) -> (Client, InferClient, Arc<Ledger>) {
    requester_as(Keypair::generate_ed25519(), peers).await
}

/// [`requester`] with the identity `key`.
async fn requester_as(
    key: Keypair,
    peers: &[(PeerId, Multiaddr)],
) -> (Client, InferClient, Arc<Ledger>) {
    let (client, _) = node(key, peers.iter().map(|p| p.1.clone()).collect()).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let known = client.peers().await.unwrap();
        if peers
            .iter()
            .all(|(id, _)| known.iter().any(|p| p.peer_id == *id && p.connected))
        {
            break;
        }
        assert!(Instant::now() < deadline, "requester did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    std::mem::forget(dir);
    let order: Vec<PeerId> = peers.iter().map(|p| p.0).collect();
    let infer = InferClient::new(
        client.streams(),
        client.peer_id(),
        Some(Arc::clone(&ledger)),
        ClientConfig {
            open_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(2),
            token_timeout: Duration::from_secs(10),
        },
        Arc::new(move |_model: &str, exclude: &[PeerId]| {
            order
                .iter()
                .filter(|p| !exclude.contains(p))
                .copied()
                .collect()
        }),
    );
    (client, infer, ledger)
}

fn greedy(max_tokens: usize) -> GenerateRequest {
    common::greedy("Count to five.", max_tokens)
}

/// Drains events into (text, done usage, error).
async fn drain(
    mut events: tokio::sync::mpsc::Receiver<GenerateEvent>,
) -> (String, Option<Usage>, Option<EngineError>) {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("events in time")
        {
            Some(GenerateEvent::Delta { text: t, .. }) => text.push_str(&t),
            Some(GenerateEvent::Done { usage, .. }) => return (text, Some(usage), None),
            Some(GenerateEvent::Error(e)) => return (text, None, Some(e)),
            None => return (text, None, None),
        }
    }
}

/// The answer of the local engine, for comparison.
async fn local_answer(max_tokens: usize) -> String {
    drain(common::engine().generate(greedy(max_tokens)).unwrap())
        .await
        .0
}

/// A node that accepts `/pod/infer` streams and answers with `behave(request, writer)`.
async fn rogue<F, Fut>(behave: F) -> (PeerId, Multiaddr, Keypair)
where
    F: Fn(Request, futures::io::WriteHalf<libp2p::Stream>, Keypair) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let key = Keypair::generate_ed25519();
    let (client, addr) = node(key.clone(), vec![]).await;
    let mut incoming = client.streams().accept(PROTOCOL).unwrap();
    let behave = Arc::new(behave);
    let k = key.clone();
    tokio::spawn(async move {
        let _keep = client;
        while let Some((_, stream)) = incoming.next().await {
            let (mut rd, wr) = stream.split();
            let Ok(req) = read_frame::<_, Request>(&mut rd, 1 << 22).await else {
                continue;
            };
            let behave = Arc::clone(&behave);
            let k = k.clone();
            tokio::spawn(async move {
                let _rd = rd;
                behave(req, wr, k).await;
            });
        }
    });
    (key.public().to_peer_id(), addr, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_ends_on_a_stop_token_is_receipted_on_both_sides() {
    // The stop token is generated and signed for but never sent: the requester must still
    // accept the receipt.
    let (h, h_addr, _server) = honest(ServerConfig::default()).await;
    let (_r, infer, ledger) = requester(&[(h.peer_id(), h_addr)]).await;
    let (_, events) = infer.generate(greedy(200)).await.unwrap();
    let (text, usage, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    let usage = usage.unwrap();
    assert!(usage.completion_tokens < 200, "no stop token in {text:?}");
    assert_eq!(infer.stats().receipts_rejected.load(Ordering::Relaxed), 0);
    let read = ledger.entries().unwrap();
    assert_eq!(read.entries.len(), 1);
    assert_eq!(
        read.entries[0].signed.receipt.completion_tokens,
        usage.completion_tokens as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answers_like_the_local_engine_and_both_keep_receipts() {
    let (h, h_addr, server) = honest(ServerConfig::default()).await;
    let (_r, infer, ledger) = requester(&[(h.peer_id(), h_addr)]).await;
    let (peer, events) = infer.generate(greedy(24)).await.unwrap();
    assert_eq!(peer, h.peer_id());
    let (text, usage, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(24).await);
    assert_eq!(usage.unwrap().completion_tokens, 24);
    let read = ledger.entries().unwrap();
    assert_eq!(read.entries.len(), 1);
    assert_eq!(read.entries[0].signed.receipt.completion_tokens, 24);
    assert_eq!(
        read.entries[0].signed.receipt.server,
        h.peer_id().to_string()
    );
    assert_eq!(server.stats().accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_fail_over_to_an_honest_peer() {
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        let _ = wr
            .write_all(&[0, 0, 0, 5, b'{', b'{', b'{', b'{', b'{'])
            .await;
        let _ = wr.flush().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (h, h_addr, _) = honest(ServerConfig::default()).await;
    let (_r, infer, _) = requester(&[(g, g_addr), (h.peer_id(), h_addr)]).await;
    let (first, events) = infer.generate(greedy(16)).await.unwrap();
    assert_eq!(first, g, "the rogue is asked first");
    let (text, usage, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(16).await);
    assert_eq!(usage.unwrap().completion_tokens, 16);
    assert_eq!(infer.stats().failovers.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_names_its_stages_and_one_naming_garbage_is_passed_over() {
    // A head naming its stages: they come back with the serving peer.
    let stage = PeerId::random();
    let (head, head_addr, _) = rogue(move |_req, mut wr, _k| async move {
        let peers = vec![stage.to_string()];
        let _ = write_frame(&mut wr, &Frame::Stages { peers }).await;
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (_r, infer, _) = requester(&[(head, head_addr)]).await;
    let (peer, stages, events) = infer.generate_staged(greedy(4)).await.unwrap();
    assert_eq!((peer, stages), (head, vec![stage]));
    drop(events);

    // Names that are not peer ids: the request goes to another pod.
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let peers = vec!["not a peer".to_owned()];
        let _ = write_frame(&mut wr, &Frame::Stages { peers }).await;
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let (h, h_addr, _) = honest(ServerConfig::default()).await;
    let (_r, infer, _) = requester(&[(g, g_addr), (h.peer_id(), h_addr)]).await;
    let (peer, stages, events) = infer.generate_staged(greedy(8)).await.unwrap();
    assert_eq!(peer, h.peer_id());
    assert!(stages.is_empty());
    let (text, _, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_that_lies_about_token_counts_is_rejected() {
    let (l, l_addr, _) = rogue(|req, mut wr, key| async move {
        let Request::Generate { id, .. } = req else {
            return;
        };
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        let delta = Frame::Delta {
            text: "hi".into(),
            tokens: vec![1, 2],
            logprobs: vec![],
        };
        let _ = write_frame(&mut wr, &delta).await;
        let receipt = SignedReceipt::sign(
            Receipt {
                request_id: id,
                model: DEFAULT_CHAT_MODEL.into(),
                prompt_tokens: 10,
                completion_tokens: 100,
                requester: String::new(),
                server: key.public().to_peer_id().to_string(),
                started_at_ms: 0,
                finished_at_ms: 0,
                partial: false,
                stage: None,
            },
            &key,
        )
        .ok();
        let done = Frame::Done {
            finish_reason: pod_inference::FinishReason::Length,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cached_tokens: 0,
            },
            receipt,
        };
        let _ = write_frame(&mut wr, &done).await;
    })
    .await;
    let (_r, infer, ledger) = requester(&[(l, l_addr)]).await;
    let (_, events) = infer.generate(greedy(4)).await.unwrap();
    let (text, usage, _) = drain(events).await;
    assert_eq!(text, "hi");
    assert_eq!(usage.unwrap().completion_tokens, 2);
    assert_eq!(infer.stats().receipts_rejected.load(Ordering::Relaxed), 1);
    assert!(
        ledger.entries().unwrap().entries.is_empty(),
        "a lying receipt is never kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_is_given_up_in_bounded_time() {
    let (s, s_addr, _) = rogue(|_req, _wr, _k| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let (_r, infer, _) = requester(&[(s, s_addr.clone())]).await;
    let started = Instant::now();
    let err = infer.generate(greedy(4)).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // With an honest peer behind it, the request still succeeds.
    let (h, h_addr, _) = honest(ServerConfig::default()).await;
    let (_r, infer, _) = requester(&[(s, s_addr), (h.peer_id(), h_addr)]).await;
    let (peer, events) = infer.generate(greedy(8)).await.unwrap();
    assert_eq!(peer, h.peer_id());
    assert_eq!(drain(events).await.0, local_answer(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_garbage_and_unknown_models_and_keeps_serving() {
    let (h, h_addr, server) = honest(ServerConfig::default()).await;
    let (r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let mut control = r.streams();

    // Not a frame at all.
    let stream = control.open_stream(h.peer_id(), PROTOCOL).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    wr.write_all(b"\x00\x00\x00\x03abc").await.unwrap();
    wr.flush().await.unwrap();
    let answer: Frame = read_frame(&mut rd, 1 << 20).await.unwrap();
    assert!(
        matches!(answer, Frame::Error(EngineError::InvalidRequest(_))),
        "{answer:?}"
    );

    // A frame that claims to be 4 GiB.
    let stream = control.open_stream(h.peer_id(), PROTOCOL).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    wr.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    wr.flush().await.unwrap();
    let answer: Frame = read_frame(&mut rd, 1 << 20).await.unwrap();
    assert!(
        matches!(answer, Frame::Error(EngineError::InvalidRequest(_))),
        "{answer:?}"
    );
    assert_eq!(server.stats().malformed.load(Ordering::Relaxed), 2);

    // A model it does not serve.
    let mut req = greedy(4);
    req.model = "not-here".into();
    let err = infer.generate(req).await.unwrap_err();
    assert!(matches!(err, EngineError::UnknownModel(_)), "{err:?}");
    assert!(server.stats().refused.load(Ordering::Relaxed) >= 1);

    // Still serving.
    let (_, events) = infer.generate(greedy(8)).await.unwrap();
    assert_eq!(drain(events).await.0, local_answer(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_up_cancels_the_remote_generation() {
    let (h, h_addr, server) = honest(ServerConfig::default()).await;
    let (_r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let (_, mut events) = infer.generate(greedy(400)).await.unwrap();
    // Wait for the first text, then go away.
    let first = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert!(
        matches!(first, Some(GenerateEvent::Delta { .. })),
        "{first:?}"
    );
    drop(events);
    let deadline = Instant::now() + WAIT;
    while server.stats().cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the server never noticed the hang-up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_serves_only_itself_refuses_peers() {
    let (h, h_addr, _) = honest(ServerConfig {
        serve_mesh: false,
        ..ServerConfig::default()
    })
    .await;
    let (_r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let err = infer.generate(greedy(4)).await.unwrap_err();
    assert!(err.to_string().contains("does not serve the mesh"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_serving_trusted_peers_only_refuses_strangers_who_fail_over() {
    let friend = Keypair::generate_ed25519();
    let (closed, closed_addr, closed_server) = honest(ServerConfig {
        access: Access::trusted_only([friend.public().to_peer_id()]),
        ..ServerConfig::default()
    })
    .await;
    let (open, open_addr, open_server) = honest(ServerConfig::default()).await;
    let closed_at = (closed.peer_id(), closed_addr);

    // A stranger asking the closed pod first is refused at once and served by the open one.
    let (_s, stranger, _) = requester(&[closed_at.clone(), (open.peer_id(), open_addr)]).await;
    let started = Instant::now();
    let (peer, events) = stranger.generate(greedy(8)).await.unwrap();
    assert_eq!(peer, open.peer_id(), "the refusal moved the request on");
    let (text, usage, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(8).await);
    assert_eq!(usage.unwrap().completion_tokens, 8);
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    assert_eq!(closed_server.stats().untrusted.load(Ordering::Relaxed), 1);
    assert_eq!(closed_server.stats().accepted.load(Ordering::Relaxed), 0);
    assert_eq!(open_server.stats().accepted.load(Ordering::Relaxed), 1);

    // With nobody else to ask, the refusal is the stranger's error, with its reason.
    let (_s, alone, _) = requester(std::slice::from_ref(&closed_at)).await;
    let err = alone.generate(greedy(4)).await.unwrap_err();
    assert!(err.to_string().contains("trusted peers only"), "{err}");
    assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");

    // The trusted peer is served by the closed pod.
    let (_f, trusted, _) = requester_as(friend, &[closed_at]).await;
    let (peer, events) = trusted.generate(greedy(8)).await.unwrap();
    assert_eq!(peer, closed.peer_id());
    let (text, _, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(8).await);
    assert_eq!(closed_server.stats().accepted.load(Ordering::Relaxed), 1);
    assert_eq!(closed_server.stats().untrusted.load(Ordering::Relaxed), 2);
}

/// Two rogue-then-honest requests: the rogue's bad first frame is refused whole, so the answer
/// is the honest peer's own.
async fn fails_over_from(rogue_peer: PeerId, rogue_addr: Multiaddr, max_tokens: usize) {
    let (h, h_addr, _) = honest(ServerConfig::default()).await;
    let (_r, infer, _) = requester(&[(rogue_peer, rogue_addr), (h.peer_id(), h_addr)]).await;
    let started = Instant::now();
    let (first, events) = infer.generate(greedy(max_tokens)).await.unwrap();
    assert_eq!(first, rogue_peer, "the rogue is asked first");
    let (text, usage, err) = drain(events).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, local_answer(max_tokens).await);
    assert_eq!(usage.unwrap().completion_tokens, max_tokens);
    assert_eq!(infer.stats().failovers.load(Ordering::Relaxed), 1);
    assert_eq!(infer.stats().misbehaved.load(Ordering::Relaxed), 1);
    assert!(
        started.elapsed() < WAIT,
        "given up in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_streams_more_tokens_than_asked_is_failed_over() {
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        // Five tokens in one delta for a request of four, then more forever.
        loop {
            let delta = Frame::Delta {
                text: "x".into(),
                tokens: vec![1; 5],
                logprobs: vec![],
            };
            if write_frame(&mut wr, &delta).await.is_err() {
                return;
            }
        }
    })
    .await;
    fails_over_from(g, g_addr, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_streams_more_text_than_its_tokens_can_hold_is_failed_over() {
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        // One token carrying 512 KiB of text.
        let delta = Frame::Delta {
            text: "x".repeat(512 * 1024),
            tokens: vec![1],
            logprobs: vec![],
        };
        let _ = write_frame(&mut wr, &delta).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    fails_over_from(g, g_addr, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_only_heartbeats_is_failed_over() {
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        while write_frame(&mut wr, &Frame::Heartbeat).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    fails_over_from(g, g_addr, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_floods_heartbeats_is_failed_over_at_once() {
    let (g, g_addr, _) = rogue(|_req, mut wr, _k| async move {
        let _ = write_frame(&mut wr, &Frame::Accepted).await;
        while write_frame(&mut wr, &Frame::Heartbeat).await.is_ok() {}
    })
    .await;
    fails_over_from(g, g_addr, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_oversized_peer_strings_and_keeps_serving() {
    let (h, h_addr, server) = honest(ServerConfig::default()).await;
    let (r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let mut control = r.streams();
    let long_id = "x".repeat(4096);
    let long_model = "m".repeat(4096);
    for (id, model) in [
        (long_id.as_str(), DEFAULT_CHAT_MODEL),
        ("a\nforged log line", DEFAULT_CHAT_MODEL),
        ("fine-id", long_model.as_str()),
    ] {
        let mut request = greedy(4);
        request.model = model.into();
        let stream = control.open_stream(h.peer_id(), PROTOCOL).await.unwrap();
        let (mut rd, mut wr) = stream.split();
        let req = Request::Generate {
            id: id.into(),
            request,
        };
        write_frame(&mut wr, &req).await.unwrap();
        let answer: Frame = read_frame(&mut rd, 1 << 20).await.unwrap();
        assert!(
            matches!(&answer, Frame::Error(EngineError::InvalidRequest(m)) if m.contains(if model.len() > 256 { "model name" } else { "request id" })),
            "{answer:?}"
        );
    }
    assert_eq!(server.stats().refused.load(Ordering::Relaxed), 3);
    assert_eq!(server.stats().accepted.load(Ordering::Relaxed), 0);

    let (_, events) = infer.generate(greedy(8)).await.unwrap();
    assert_eq!(drain(events).await.0, local_answer(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_applies_the_engine_limits_to_peers() {
    let (h, h_addr, _server) = honest(ServerConfig::default()).await;
    let (r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let mut control = r.streams();
    let mut stops = greedy(4);
    stops.stop = vec!["never".into(); 5];
    let mut logprobs = greedy(4);
    logprobs.logprobs = Some(100_000);
    let megabyte = "word ".repeat(200_000);
    let requests = [
        Request::Generate {
            id: "five-stops".into(),
            request: stops,
        },
        Request::Generate {
            id: "all-logprobs".into(),
            request: logprobs,
        },
        Request::Embed {
            id: "three-megabytes".into(),
            model: pod_node::catalogue::DEFAULT_EMBEDDING_MODEL.into(),
            input: vec![megabyte.clone(), megabyte.clone(), megabyte],
        },
    ];
    for req in requests {
        let stream = control.open_stream(h.peer_id(), PROTOCOL).await.unwrap();
        let (mut rd, mut wr) = stream.split();
        write_frame(&mut wr, &req).await.unwrap();
        let answer = loop {
            let frame: Frame = tokio::time::timeout(WAIT, read_frame(&mut rd, 16 << 20))
                .await
                .expect("an answer in time")
                .unwrap();
            if !matches!(frame, Frame::Accepted | Frame::Heartbeat) {
                break frame;
            }
        };
        assert!(
            matches!(&answer, Frame::Error(EngineError::InvalidRequest(_))),
            "{}: {answer:?}",
            req.id()
        );
    }

    // Still serving.
    let (_, events) = infer.generate(greedy(8)).await.unwrap();
    assert_eq!(drain(events).await.0, local_answer(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_stops_reading_is_cancelled_and_frees_its_slot() {
    let (h, h_addr, server) = honest(ServerConfig {
        max_concurrent_per_peer: 1,
        write_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    })
    .await;
    let (r, infer, _) = requester(&[(h.peer_id(), h_addr)]).await;
    let engine = common::engine();
    let mut control = r.streams();

    // A long completion with every token's top alternatives: about a kilobyte a token, so the
    // stream's window fills after a few hundred tokens. The requester never reads, nor closes.
    let stream = control.open_stream(h.peer_id(), PROTOCOL).await.unwrap();
    let (_rd, mut wr) = stream.split();
    let request = Request::Generate {
        id: "never-reads".into(),
        request: GenerateRequest {
            max_tokens: Some(4000),
            logprobs: Some(20),
            ..GenerateRequest::new(
                DEFAULT_CHAT_MODEL,
                pod_inference::Prompt::Text("1, 2, 3, 4, 5, 6,".into()),
            )
        },
    };
    write_frame(&mut wr, &request).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    while server.stats().cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the server kept writing to a requester that does not read ({} tokens generated)",
            engine.stats().completion_tokens.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The engine dropped the sequence instead of generating its 4000 tokens.
    let deadline = Instant::now() + WAIT;
    while engine.stats().active.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the sequence is still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = engine.stats().completion_tokens.load(Ordering::Relaxed);
    eprintln!("cancelled after {generated} tokens");
    assert!(engine.stats().cancelled.load(Ordering::Relaxed) >= 1);
    assert!(generated < 4000, "{generated} tokens: it ran to the end");

    // The peer's only slot is free again: its next request is served.
    let (_, events) = infer.generate(greedy(8)).await.unwrap();
    assert_eq!(drain(events).await.0, local_answer(8).await);
    drop(wr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_forgets_peers_whose_window_has_passed() {
    let window = Duration::from_secs(3);
    let (h, h_addr, server) = honest(ServerConfig {
        rate_window: window,
        ..ServerConfig::default()
    })
    .await;
    // Peers come, are served and go: each is a new identity, as anyone's can be.
    let ask = || async {
        let (_r, infer, _) = requester(&[(h.peer_id(), h_addr.clone())]).await;
        let (_, events) = infer.generate(greedy(2)).await.unwrap();
        assert!(drain(events).await.1.is_some());
    };
    for _ in 0..4 {
        ask().await;
    }
    tokio::time::sleep(window + Duration::from_millis(500)).await;
    // The next request finds the others' windows passed: only its own peer is left.
    ask().await;
    assert_eq!(server.tracked_peers(), 1);
}
