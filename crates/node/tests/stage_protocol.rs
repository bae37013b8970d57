//! `/pod/stage/1.0.0` between real libp2p swarms on 127.0.0.1, with a small model of random
//! weights split in two: a head's passes through a remote stage give the whole model's
//! logits bit for bit, a sequence the head drops is freed on the stage, which signs a receipt
//! for its work that the head keeps, and a stage sent garbage, oversized or mismatched frames
//! answers with an error and keeps serving.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use pod_inference::gpu::synthetic::{self, shapes};
use pod_inference::model::stage::{LayerRange, StageModel};
use pod_inference::{ChatModel, Device};
use pod_node::mesh::capability::{HardwareSummary, Load};
use pod_node::mesh::{Capabilities, Client};
use pod_node::receipts::{Ledger, ReceiptError, Role};
use pod_node::stage::client::MeshDownstream;
use pod_node::stage::server::StageHost;
use pod_node::stage::{
    read_payload, write_payload, SeqRows, StageAnnouncement, StageReply, StageRequest, PROTOCOL,
};
use pod_node::wire::{read_frame, write_frame};

const WAIT: Duration = Duration::from_secs(60);
const HIDDEN: usize = 256;
const VOCAB: usize = 512;

async fn node(bootstrap: Vec<Multiaddr>) -> (Client, Multiaddr) {
    common::mesh_node(Keypair::generate_ed25519(), bootstrap).await
}

/// A four-block llama with random weights, in a directory kept for the test's life.
fn model() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut shape = shapes::shape("tiny", "q8_0").unwrap();
    let layer = shape.layer_formats[0];
    shape.layer_formats = vec![layer; 4];
    let path = dir.path().join("four.gguf");
    synthetic::write_chat_model(&path, 11, &shape).unwrap();
    let sha = pod_node::store::sha256_file(&path).unwrap();
    (dir, path, sha)
}

fn blocks(start: usize, end: usize) -> LayerRange {
    LayerRange { start, end }
}

/// A pod serving blocks 2-3 of the model over the mesh, announcing them, signing receipts
/// with its node key.
async fn stage_pod(path: &std::path::Path, sha: &str) -> (Client, Multiaddr, Arc<StageHost>) {
    let key = Keypair::generate_ed25519();
    let (client, addr) = common::mesh_node(key.clone(), vec![]).await;
    let host = StageHost::with_receipts(key, None);
    let announcement = StageAnnouncement {
        model: "four".into(),
        sha256: sha.to_owned(),
        layers: blocks(2, 4),
        total_layers: 4,
    };
    host.serve(
        StageModel::load(path, blocks(2, 4), 1024).unwrap(),
        announcement,
    )
    .unwrap();
    tokio::spawn(Arc::clone(&host).run(client.streams()));
    client
        .announce(Capabilities {
            agent: "pod/test".into(),
            profile: "inference".into(),
            models: vec![],
            load: Load::default(),
            hardware: HardwareSummary::default(),
            api: None,
            addrs: vec![],
            files: vec![],
            stages: host.announcements(),
            serve_to: Default::default(),
            trusted: vec![],
            seq: 0,
        })
        .await
        .unwrap();
    (client, addr, host)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn forward(sha: &str, seqs: Vec<SeqRows>) -> StageRequest {
    StageRequest::Forward {
        sha256: sha.to_owned(),
        layers: blocks(2, 4),
        seqs,
    }
}

fn rows(id: u64, start: usize, count: usize) -> SeqRows {
    SeqRows {
        id,
        start,
        count,
        fork: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_through_a_remote_stage_gives_the_whole_models_logits_and_frees_what_it_drops() {
    let (_dir, path, sha) = model();
    let (stage, stage_addr, host) = stage_pod(&path, &sha).await;
    let (head_mesh, _) = node(vec![stage_addr]).await;
    let watched = head_mesh.clone();
    let stage_id = stage.peer_id();
    let deadline = Instant::now() + WAIT;
    loop {
        let peers = watched.peers().await.unwrap();
        let announced = peers.iter().any(|p| {
            p.peer_id == stage_id
                && p.capabilities
                    .as_ref()
                    .is_some_and(|c| !c.stages.is_empty())
        });
        if announced {
            break;
        }
        assert!(Instant::now() < deadline, "the stage was never announced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let head_id = head_mesh.peer_id();
    let head_home = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(head_home.path()).unwrap());
    let downstream = Arc::new(
        MeshDownstream::new(
            "four".into(),
            sha.clone(),
            2,
            4,
            head_mesh,
            tokio::runtime::Handle::current(),
        )
        .with_ledger(Some(Arc::clone(&ledger))),
    );
    let d = Arc::clone(&downstream);
    let p = path.clone();
    // The engine thread's view: blocking calls, off the runtime's threads.
    let (got, want) = tokio::task::spawn_blocking(move || {
        let whole = ChatModel::load(&p, &Device::Cpu).unwrap();
        let head = ChatModel::load_head(&p, blocks(0, 2), d as _).unwrap();
        let mut w = [whole.new_sequence(), whole.new_sequence()];
        let mut h = [head.new_sequence(), head.new_sequence()];
        let prompts: [&[u32]; 2] = [&[3, 1, 4, 1, 5], &[9, 2, 6]];
        let mut got = Vec::new();
        let mut want = Vec::new();
        let [w0, w1] = &mut w;
        let [h0, h1] = &mut h;
        want.push(whole.forward_batch(&mut [w0, w1], &prompts).unwrap());
        got.push(head.forward_batch(&mut [h0, h1], &prompts).unwrap());
        for step in 0..4u32 {
            let next: [&[u32]; 2] = [&[10 + step], &[20 + step]];
            want.push(whole.forward_batch(&mut [w0, w1], &next).unwrap());
            got.push(head.forward_batch(&mut [h0, h1], &next).unwrap());
        }
        (got, want)
    })
    .await
    .unwrap();
    assert_eq!(got, want);
    assert_eq!(downstream.chain().len(), 1);
    assert_eq!(downstream.chain()[0].peer, stage.peer_id());
    // The head's sequences were dropped with the blocking task: the stage frees them.
    wait_until("the stage frees the dropped sequences", || {
        host.sequences() == 0
    })
    .await;

    // The stage signed a receipt for each sequence, which the head keeps: its prompt and
    // four decode steps, in five passes.
    wait_until("the head keeps the stage's receipts", || {
        ledger.counts().records == 2
    })
    .await;
    let mut kept = ledger.entries().unwrap().entries;
    assert_eq!((ledger.counts().invalid, ledger.counts().torn), (0, 0));
    kept.sort_by_key(|e| e.signed.receipt.prompt_tokens);
    let mut rows_seen = Vec::new();
    for entry in &kept {
        assert_eq!(entry.role, Role::Consumed);
        let r = &entry.signed.receipt;
        entry.signed.verify().unwrap();
        assert_eq!(r.server, stage_id.to_string());
        assert_eq!(r.requester, head_id.to_string());
        assert_eq!(r.model, "four");
        let work = r.stage.as_ref().expect("a stage receipt");
        assert_eq!(work.sha256, sha);
        assert_eq!((work.first_block, work.last_block), (2, 3));
        assert_eq!(work.passes, 5);
        assert_eq!(r.prompt_tokens, work.rows);
        rows_seen.push(work.rows);
    }
    assert_eq!(rows_seen, [3 + 4, 5 + 4]);
    // Tampered with, it no longer verifies.
    let mut forged = kept[0].signed.clone();
    if let Some(work) = forged.receipt.stage.as_mut() {
        work.rows += 100;
    }
    assert!(matches!(
        forged.verify(),
        Err(ReceiptError::BadSignature { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_answers_bad_frames_with_errors_and_keeps_serving() {
    let (_dir, path, sha) = model();
    let (stage, stage_addr, host) = stage_pod(&path, &sha).await;
    let (requester, _) = node(vec![stage_addr]).await;
    let control = requester.streams();
    let peer: PeerId = stage.peer_id();
    let open = |mut control: libp2p_stream::Control| async move {
        let deadline = Instant::now() + WAIT;
        loop {
            match control.open_stream(peer, PROTOCOL).await {
                Ok(s) => return s,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Not JSON.
    let mut s = open(control.clone()).await;
    s.write_all(b"\x00\x00\x00\x03abc").await.unwrap();
    s.flush().await.unwrap();
    let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
    assert!(matches!(reply, StageReply::Error { .. }), "{reply:?}");

    // A frame that claims 4 GiB.
    let mut s = open(control.clone()).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
    assert!(matches!(reply, StageReply::Error { .. }), "{reply:?}");

    // On one stream: refusals, each followed by a request that is served.
    let mut s = open(control.clone()).await;
    let ok = |reply: &StageReply| matches!(reply, StageReply::Logits { vocab } if *vocab == VOCAB);
    let cases: Vec<(StageRequest, usize, &str)> = vec![
        (
            forward(&"0".repeat(64), vec![rows(1, 0, 2)]),
            2 * HIDDEN,
            "another file",
        ),
        (
            StageRequest::Forward {
                sha256: sha.clone(),
                layers: blocks(1, 4),
                seqs: vec![rows(1, 0, 2)],
            },
            2 * HIDDEN,
            "other blocks",
        ),
        (
            forward(&sha, vec![rows(1, 0, 2)]),
            3 * HIDDEN,
            "a payload of the wrong size",
        ),
        (
            forward(&sha, vec![rows(1, 0, 1), rows(1, 0, 1)]),
            2 * HIDDEN,
            "a sequence twice",
        ),
        (forward(&sha, vec![rows(1, 0, 0)]), 0, "no rows"),
        (
            forward(&sha, vec![rows(1, 0, 2000)]),
            2000 * HIDDEN,
            "past the context",
        ),
    ];
    let mut served = 0;
    for (i, (bad, values, what)) in cases.into_iter().enumerate() {
        write_frame(&mut s, &bad).await.unwrap();
        write_payload(&mut s, &vec![0.01; values]).await.unwrap();
        let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
        assert!(
            matches!(reply, StageReply::Error { .. }),
            "{what}: {reply:?}"
        );
        let id = 100 + i as u64;
        write_frame(&mut s, &forward(&sha, vec![rows(id, 0, 2)]))
            .await
            .unwrap();
        write_payload(&mut s, &[0.01; 2 * HIDDEN]).await.unwrap();
        let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
        assert!(ok(&reply), "after {what}: {reply:?}");
        assert_eq!(read_payload(&mut s, VOCAB).await.unwrap().len(), VOCAB);
        served += 1;
    }
    wait_until("the stage holds the served sequences", || {
        host.sequences() == served
    })
    .await;

    // A sequence it does not hold up to the start asked: resend from 0.
    write_frame(&mut s, &forward(&sha, vec![rows(7, 3, 1)]))
        .await
        .unwrap();
    write_payload(&mut s, &[0.01; HIDDEN]).await.unwrap();
    let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
    assert_eq!(reply, StageReply::Missing { seqs: vec![7] });

    write_frame(
        &mut s,
        &StageRequest::Release {
            seqs: (100..100 + served as u64).collect(),
        },
    )
    .await
    .unwrap();
    let reply: StageReply = read_frame(&mut s, 1 << 16).await.unwrap();
    let StageReply::Released { receipts } = reply else {
        panic!("{reply:?}");
    };
    // One signed receipt per sequence served: two rows in one pass each.
    assert_eq!(receipts.len(), served);
    for r in &receipts {
        r.verify().unwrap();
        assert_eq!(r.receipt.server, peer.to_string());
        assert_eq!(r.receipt.requester, requester.peer_id().to_string());
        let work = r.receipt.stage.as_ref().expect("a stage receipt");
        assert_eq!((work.rows, work.passes), (2, 1));
    }
    wait_until("released sequences are freed", || host.sequences() == 0).await;
}
