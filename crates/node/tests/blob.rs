//! `/pod/blob/1.0.0` between in-process nodes on 127.0.0.1, with the real default chat model
//! as the shared file: a verified pull, resuming, a lying provider, refused requests, and
//! providers found through the DHT alone.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use pod_node::blob::{self, BlobReply, BlobRequest, BlobServer, PROTOCOL};
use pod_node::catalogue::{self, DEFAULT_CHAT_MODEL};
use pod_node::infer::{read_frame, write_frame};
use pod_node::mesh::{self, Client, MeshConfig};
use pod_node::store::ModelStore;

const WAIT: Duration = Duration::from_secs(20);

async fn node(bootstrap: Vec<Multiaddr>) -> (Client, Multiaddr) {
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        listen_optional: vec![],
        bootstrap,
        mdns: false,
        ..MeshConfig::default()
    };
    let (client, event_loop) = mesh::new(Keypair::generate_ed25519(), config).unwrap();
    tokio::spawn(event_loop.run());
    let deadline = Instant::now() + WAIT;
    loop {
        let info = client.node_info().await.unwrap();
        if let Some(a) = info.listen_addrs.first() {
            return (
                client,
                a.clone()
                    .with(libp2p::multiaddr::Protocol::P2p(info.peer_id)),
            );
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A storage node serving the shared test store (which holds the default models).
async fn provider(bytes_per_sec: u64) -> (Client, Multiaddr, Arc<BlobServer>) {
    provider_via(vec![], bytes_per_sec).await
}

/// A storage node that joins the mesh through `bootstrap`.
async fn provider_via(
    bootstrap: Vec<Multiaddr>,
    bytes_per_sec: u64,
) -> (Client, Multiaddr, Arc<BlobServer>) {
    common::model_path(DEFAULT_CHAT_MODEL);
    let (client, addr) = node(bootstrap).await;
    let server =
        BlobServer::with_limits(&common::store(), blob::MAX_STREAMS_PER_PEER, bytes_per_sec);
    tokio::spawn(Arc::clone(&server).run(client.streams()));
    (client, addr, server)
}

/// A node that answers manifests honestly but flips a byte in every chunk it sends.
async fn corrupting_provider() -> (PeerId, Multiaddr) {
    let honest = BlobServer::new(&common::store());
    let (client, addr) = node(vec![]).await;
    let mut incoming = client.streams().accept(PROTOCOL).unwrap();
    let store_dir = common::store().model_dir(DEFAULT_CHAT_MODEL);
    let id = client.peer_id();
    tokio::spawn(async move {
        let _keep = (client, honest);
        while let Some((_, stream)) = incoming.next().await {
            let dir = store_dir.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = stream.split();
                let Ok(req) = read_frame::<_, BlobRequest>(&mut rd, 4096).await else {
                    return;
                };
                let path = dir.join("model.gguf");
                match req {
                    BlobRequest::Manifest { .. } => {
                        let m = blob::Manifest::of_file(&path).unwrap();
                        let _ = write_frame(&mut wr, &BlobReply::Manifest(m)).await;
                    }
                    BlobRequest::Chunks { first, count, .. } => {
                        let _ = write_frame(&mut wr, &BlobReply::Chunks).await;
                        let data = std::fs::read(&path).unwrap();
                        for i in first..first + count {
                            let start = i as usize * blob::CHUNK_SIZE as usize;
                            let end = (start + blob::CHUNK_SIZE as usize).min(data.len());
                            let mut chunk = data[start..end].to_vec();
                            chunk[0] ^= 0xff;
                            let _ = wr.write_all(&(chunk.len() as u32).to_be_bytes()).await;
                            let _ = wr.write_all(&chunk).await;
                        }
                    }
                }
                let _ = wr.close().await;
            });
        }
    });
    (id, addr)
}

fn entry() -> &'static catalogue::CatalogueEntry {
    catalogue::find(DEFAULT_CHAT_MODEL).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_peer_is_byte_identical_and_verified() {
    let (a, a_addr, server) = provider(0).await;
    let (b, _) = node(vec![a_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = blob::pull_from_peers(&store, entry(), b.streams(), &[a.peer_id()], None)
        .await
        .unwrap();
    assert_eq!(pulled.len(), 1);
    let report = &pulled[0].report;
    assert_eq!(
        report.bytes_from,
        vec![(a.peer_id(), entry().files[0].size)]
    );
    assert_eq!(report.chunks_reused, 0);
    assert!(store.is_present(entry()));
    let ours = std::fs::read(store.model_dir(DEFAULT_CHAT_MODEL).join("model.gguf")).unwrap();
    let theirs = std::fs::read(common::model_path(DEFAULT_CHAT_MODEL)).unwrap();
    assert!(ours == theirs, "the pulled file differs");
    assert_eq!(
        server.stats().bytes_served.load(Ordering::Relaxed),
        entry().files[0].size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_pull_resumes_without_refetching_verified_chunks() {
    // 20 MB/s per stream: the 98 MB file takes seconds, so it can be cut halfway.
    let (a, a_addr, _) = provider(20_000_000).await;
    let (b, _) = node(vec![a_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let cut = tokio::time::timeout(
        Duration::from_secs(2),
        blob::pull_from_peers(&store, entry(), b.streams(), &[a.peer_id()], None),
    )
    .await;
    assert!(
        cut.is_err(),
        "the pull finished before it could be interrupted"
    );
    assert!(!store.is_present(entry()));

    let pulled = blob::pull_from_peers(&store, entry(), b.streams(), &[a.peer_id()], None)
        .await
        .unwrap();
    let report = &pulled[0].report;
    let total = entry().files[0].size.div_ceil(blob::CHUNK_SIZE) as usize;
    assert!(report.chunks_reused > 0, "{report:?}");
    assert_eq!(
        report.chunks_reused + report.chunks_fetched,
        total,
        "{report:?}"
    );
    let ours = std::fs::read(store.model_dir(DEFAULT_CHAT_MODEL).join("model.gguf")).unwrap();
    let theirs = std::fs::read(common::model_path(DEFAULT_CHAT_MODEL)).unwrap();
    assert!(ours == theirs, "the resumed file differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_of_corrupt_chunks_is_dropped_and_the_file_is_still_right() {
    let (bad, bad_addr) = corrupting_provider().await;
    let (good, good_addr, _) = provider(0).await;
    let (b, _) = node(vec![bad_addr, good_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = blob::pull_from_peers(&store, entry(), b.streams(), &[bad, good.peer_id()], None)
        .await
        .unwrap();
    let report = &pulled[0].report;
    assert_eq!(report.bad_providers, vec![bad]);
    assert!(
        report.bytes_from.iter().all(|(p, _)| *p == good.peer_id()),
        "{report:?}"
    );
    let ours = std::fs::read(store.model_dir(DEFAULT_CHAT_MODEL).join("model.gguf")).unwrap();
    let theirs = std::fs::read(common::model_path(DEFAULT_CHAT_MODEL)).unwrap();
    assert!(ours == theirs);
}

/// Sends one raw request and returns the reply frame.
async fn ask(client: &Client, peer: PeerId, request: &[u8]) -> BlobReply {
    let mut control = client.streams();
    let stream = control.open_stream(peer, PROTOCOL).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    wr.write_all(&(request.len() as u32).to_be_bytes())
        .await
        .unwrap();
    wr.write_all(request).await.unwrap();
    wr.flush().await.unwrap();
    tokio::time::timeout(WAIT, read_frame::<_, BlobReply>(&mut rd, 1 << 20))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_unknown_files_huge_ranges_and_garbage_are_refused() {
    let (a, a_addr, server) = provider(0).await;
    let (b, _) = node(vec![a_addr]).await;
    let sha = entry().files[0].sha256;
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"manifest":{"sha256":"../../../../etc/passwd"}}"#.into(),
            "lowercase hex",
        ),
        (
            format!(r#"{{"manifest":{{"sha256":"{}"}}}}"#, "0".repeat(64)),
            "no such file",
        ),
        (
            format!(r#"{{"chunks":{{"sha256":"{sha}","first":0,"count":100000}}}}"#),
            "ask for 1 to",
        ),
        (
            format!(r#"{{"chunks":{{"sha256":"{sha}","first":4000000000,"count":1}}}}"#),
            "beyond the end",
        ),
        ("this is not json".into(), "malformed"),
    ];
    for (request, expect) in &cases {
        match ask(&b, a.peer_id(), request.as_bytes()).await {
            BlobReply::Error(e) => assert!(e.contains(expect), "{request}: {e}"),
            other => panic!("{request}: {other:?}"),
        }
    }
    assert_eq!(
        server.stats().refused.load(Ordering::Relaxed),
        cases.len() as u64
    );
    // A request that claims to be 4 GiB long is refused before it is read.
    let mut control = b.streams();
    let stream = control.open_stream(a.peer_id(), PROTOCOL).await.unwrap();
    let (mut rd, mut wr) = stream.split();
    wr.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    wr.flush().await.unwrap();
    let reply: BlobReply = read_frame(&mut rd, 1 << 20).await.unwrap();
    assert!(matches!(reply, BlobReply::Error(_)), "{reply:?}");
    // And the node still serves.
    let reply = ask(
        &b,
        a.peer_id(),
        format!(r#"{{"manifest":{{"sha256":"{sha}"}}}}"#).as_bytes(),
    )
    .await;
    assert!(matches!(reply, BlobReply::Manifest(m) if m.sha256 == sha));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_found_through_dht_provider_records_alone() {
    // B only relays DHT records; A serves the file and says so in the DHT, never in gossip
    // (nobody here announces capabilities); C knows only B.
    let (b, b_addr) = node(vec![]).await;
    let (a, _, _) = provider_via(vec![b_addr.clone()], 0).await;
    let sha = entry().files[0].sha256;
    tokio::time::timeout(WAIT, a.provide(blob::dht_key(sha)))
        .await
        .expect("provide in time")
        .unwrap();
    let (c, _) = node(vec![b_addr]).await;
    // C may already be connected to A (the DHT's own bootstrap walks to it), but nothing
    // told it what A serves.
    assert!(c
        .peers()
        .await
        .unwrap()
        .iter()
        .all(|p| p.capabilities.is_none()));

    let found = tokio::time::timeout(WAIT, c.providers(blob::dht_key(sha)))
        .await
        .expect("lookup in time")
        .unwrap();
    assert_eq!(found, vec![a.peer_id()]);
    // Nobody provides an unknown hash.
    let none = tokio::time::timeout(WAIT, c.providers(blob::dht_key(&"0".repeat(64))))
        .await
        .expect("lookup in time")
        .unwrap();
    assert!(none.is_empty(), "{none:?}");

    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = blob::pull_via_mesh(&store, entry(), &c, WAIT, None)
        .await
        .unwrap()
        .expect("providers found");
    assert_eq!(
        pulled[0].report.bytes_from,
        vec![(a.peer_id(), entry().files[0].size)]
    );
    let ours = std::fs::read(store.model_dir(DEFAULT_CHAT_MODEL).join("model.gguf")).unwrap();
    let theirs = std::fs::read(common::model_path(DEFAULT_CHAT_MODEL)).unwrap();
    assert!(ours == theirs, "the pulled file differs");
    drop(b);
}
