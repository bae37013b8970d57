//! `/pod/blob/1.0.0` between in-process nodes on 127.0.0.1, with the real default chat model
//! as the shared file: a verified pull over bulk connections and over mesh streams alone,
//! resuming, a lying provider, refused requests and tickets, and providers found through the
//! DHT alone.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use pod_node::blob::{self, BlobReply, BlobRequest, BlobServer, PullOptions, PROTOCOL};
use pod_node::catalogue::{self, DEFAULT_CHAT_MODEL};
use pod_node::mesh::{self, Client, MeshConfig};
use pod_node::store::ModelStore;
use pod_node::wire::{read_frame, write_frame};

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

/// A storage node serving the shared test store (which holds the default models), with a
/// bulk port on 127.0.0.1 when `bulk`.
async fn provider(bytes_per_sec: u64, bulk: bool) -> (Client, Multiaddr, Arc<BlobServer>) {
    provider_via(vec![], bytes_per_sec, bulk).await
}

/// A storage node that joins the mesh through `bootstrap`.
async fn provider_via(
    bootstrap: Vec<Multiaddr>,
    bytes_per_sec: u64,
    bulk: bool,
) -> (Client, Multiaddr, Arc<BlobServer>) {
    common::model_path(DEFAULT_CHAT_MODEL);
    let (client, addr) = node(bootstrap).await;
    let server =
        BlobServer::with_limits(&common::store(), blob::MAX_STREAMS_PER_PEER, bytes_per_sec);
    if bulk {
        server
            .listen_bulk(&["127.0.0.1:0".parse().unwrap()], &client)
            .await
            .unwrap();
    }
    tokio::spawn(Arc::clone(&server).run(client.streams()));
    (client, addr, server)
}

/// The file as the test store holds it.
fn original() -> Vec<u8> {
    std::fs::read(common::model_path(DEFAULT_CHAT_MODEL)).unwrap()
}

/// The file as `store` holds it after a pull.
fn pulled_file(store: &ModelStore) -> Vec<u8> {
    std::fs::read(store.model_dir(DEFAULT_CHAT_MODEL).join("model.gguf")).unwrap()
}

/// A node that answers manifests honestly but flips a byte in every chunk it sends.
async fn corrupting_provider() -> (PeerId, Multiaddr) {
    rogue_provider(|m| m, true).await
}

/// A node that sends its manifest through `lie` and the file's chunks, each with its first
/// byte flipped when `corrupt`.
async fn rogue_provider(
    lie: fn(blob::Manifest) -> blob::Manifest,
    corrupt: bool,
) -> (PeerId, Multiaddr) {
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
                        let m = lie(blob::Manifest::of_file(&path).unwrap());
                        let _ = write_frame(&mut wr, &BlobReply::Manifest(m)).await;
                    }
                    BlobRequest::Bulk => {
                        let _ = write_frame(&mut wr, &BlobReply::Error("no".into())).await;
                    }
                    BlobRequest::Chunks { first, count, .. } => {
                        let _ = write_frame(&mut wr, &BlobReply::Chunks).await;
                        let data = std::fs::read(&path).unwrap();
                        for i in first..first + count {
                            let start = i as usize * blob::CHUNK_SIZE as usize;
                            let end = (start + blob::CHUNK_SIZE as usize).min(data.len());
                            let mut chunk = data[start..end].to_vec();
                            if corrupt {
                                chunk[0] ^= 0xff;
                            }
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

/// The file's manifest with false chaining values after chunks 5 and 6: still ending at the
/// pinned SHA-256, so it passes for the file's until chunks are checked against it.
fn poisoned(mut m: blob::Manifest) -> blob::Manifest {
    for i in [5, 6] {
        m.chunks[i] = "ab".repeat(32);
    }
    m
}

fn entry() -> &'static catalogue::CatalogueEntry {
    catalogue::find(DEFAULT_CHAT_MODEL).unwrap()
}

/// Pulls the default model from `a` into a fresh store; returns the store's directory and
/// the report.
async fn pull_once(
    b: &Client,
    a: PeerId,
    opts: &PullOptions,
) -> (tempfile::TempDir, blob::FetchReport) {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = blob::pull_missing_files(&store, entry(), b, &[a], opts)
        .await
        .unwrap();
    assert_eq!(pulled.len(), 1);
    assert!(store.is_present(entry()));
    assert!(pulled_file(&store) == original(), "the pulled file differs");
    (dir, pulled[0].report.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_peer_is_byte_identical_and_verified() {
    let (a, a_addr, server) = provider(0, true).await;
    let (b, _) = node(vec![a_addr]).await;
    let size = entry().files[0].size;

    // Where the provider offers bulk connections, the chunks come over them.
    let (dir, report) = pull_once(&b, a.peer_id(), &PullOptions::default()).await;
    assert_eq!(report.bytes_from, vec![(a.peer_id(), size)]);
    assert_eq!(report.bulk_from, vec![a.peer_id()]);
    assert_eq!(report.chunks_reused, 0);
    assert_eq!(server.stats().bytes_served.load(Ordering::Relaxed), size);
    // The provider saved the manifest it made, for its next start.
    let saved = common::store()
        .manifest_dir()
        .join(format!("{}.json", entry().files[0].sha256));
    let saved: blob::Manifest = serde_json::from_slice(&std::fs::read(saved).unwrap()).unwrap();
    assert_eq!(saved.sha256, entry().files[0].sha256);
    // And the puller saved the one it checked the chunks against, for when it serves the file.
    let pulled = ModelStore::open(dir.path())
        .unwrap()
        .manifest_dir()
        .join(format!("{}.json", entry().files[0].sha256));
    let pulled: blob::Manifest = serde_json::from_slice(&std::fs::read(pulled).unwrap()).unwrap();
    assert_eq!(pulled, saved);

    // A puller that refuses them gets the same file over mesh streams alone.
    let mesh_only = PullOptions {
        bulk: false,
        ..PullOptions::default()
    };
    let (_dir, report) = pull_once(&b, a.peer_id(), &mesh_only).await;
    assert_eq!(report.bytes_from, vec![(a.peer_id(), size)]);
    assert!(report.bulk_from.is_empty(), "{report:?}");
    assert_eq!(
        server.stats().bytes_served.load(Ordering::Relaxed),
        2 * size
    );
    assert_eq!(server.stats().refused.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_a_bulk_port_serves_over_the_mesh() {
    let (a, a_addr, server) = provider(0, false).await;
    let (b, _) = node(vec![a_addr]).await;
    let (_dir, report) = pull_once(&b, a.peer_id(), &PullOptions::default()).await;
    assert_eq!(
        report.bytes_from,
        vec![(a.peer_id(), entry().files[0].size)]
    );
    assert!(report.bulk_from.is_empty(), "{report:?}");
    // The streams that asked for a ticket before the first refusal came back were refused
    // too; none asked again.
    let refused = server.stats().refused.load(Ordering::Relaxed);
    assert!((1..=4).contains(&refused), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_pull_resumes_without_refetching_verified_chunks() {
    // 20 MB/s per stream: the 98 MB file takes seconds, so it can be cut halfway.
    let (a, a_addr, _) = provider(20_000_000, true).await;
    let (b, _) = node(vec![a_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let opts = PullOptions::default();
    let cut = tokio::time::timeout(
        Duration::from_secs(2),
        blob::pull_missing_files(&store, entry(), &b, &[a.peer_id()], &opts),
    )
    .await;
    assert!(
        cut.is_err(),
        "the pull finished before it could be interrupted"
    );
    assert!(!store.is_present(entry()));

    let pulled = blob::pull_missing_files(&store, entry(), &b, &[a.peer_id()], &opts)
        .await
        .unwrap();
    let report = &pulled[0].report;
    assert_eq!(report.bulk_from, vec![a.peer_id()]);
    let total = entry().files[0].size.div_ceil(blob::CHUNK_SIZE) as usize;
    assert!(report.chunks_reused > 0, "{report:?}");
    assert_eq!(
        report.chunks_reused + report.chunks_fetched,
        total,
        "{report:?}"
    );
    assert!(
        pulled_file(&store) == original(),
        "the resumed file differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_of_corrupt_chunks_is_dropped_and_the_file_is_still_right() {
    let (bad, bad_addr) = corrupting_provider().await;
    let (good, good_addr, _) = provider(0, true).await;
    let (b, _) = node(vec![bad_addr, good_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = blob::pull_missing_files(
        &store,
        entry(),
        &b,
        &[bad, good.peer_id()],
        &PullOptions::default(),
    )
    .await
    .unwrap();
    let report = &pulled[0].report;
    assert_eq!(report.bad_providers, vec![bad]);
    assert!(
        report.bytes_from.iter().all(|(p, _)| *p == good.peer_id()),
        "{report:?}"
    );
    assert!(pulled_file(&store) == original());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_of_a_false_manifest_is_struck_not_the_honest_one() {
    // The liar comes first, so its manifest is the one tried first; it sends the true chunks,
    // which fail its own manifest just as the honest provider's do.
    let (liar, liar_addr) = rogue_provider(poisoned, false).await;
    let (good, good_addr, _) = provider(0, true).await;
    let (b, _) = node(vec![liar_addr, good_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = tokio::time::timeout(
        Duration::from_secs(120),
        blob::pull_missing_files(
            &store,
            entry(),
            &b,
            &[liar, good.peer_id()],
            &PullOptions::default(),
        ),
    )
    .await
    .expect("the pull ends")
    .expect("the pull completes");
    let report = &pulled[0].report;
    assert_eq!(report.bad_providers, vec![liar], "{report:?}");
    assert!(pulled_file(&store) == original());
    // The manifest kept for serving the file is the true one.
    let kept = report.manifest.as_deref().unwrap();
    let truth = blob::Manifest::of_file(&common::model_path(DEFAULT_CHAT_MODEL)).unwrap();
    assert_eq!(*kept, truth);

    // Asked second, the liar is found out all the same: the file completed against another
    // manifest, so the one it sent was false.
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let pulled = tokio::time::timeout(
        Duration::from_secs(120),
        blob::pull_missing_files(
            &store,
            entry(),
            &b,
            &[good.peer_id(), liar],
            &PullOptions::default(),
        ),
    )
    .await
    .expect("the pull ends")
    .expect("the pull completes");
    assert_eq!(pulled[0].report.bad_providers, vec![liar]);
    assert!(pulled_file(&store) == original());
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
    let (a, a_addr, server) = provider(0, false).await;
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
        // This one has no bulk port.
        (r#""bulk""#.into(), "no bulk connections"),
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
    let (a, _, _) = provider_via(vec![b_addr.clone()], 0, false).await;
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
    let pulled = blob::pull_via_mesh(&store, entry(), &c, WAIT, &PullOptions::default())
        .await
        .unwrap()
        .expect("providers found");
    assert_eq!(
        pulled[0].report.bytes_from,
        vec![(a.peer_id(), entry().files[0].size)]
    );
    assert!(pulled_file(&store) == original(), "the pulled file differs");
    drop(b);
}

/// Opens a bulk connection to `port` on 127.0.0.1 and sends `ticket`.
async fn bulk_connection(port: u16, ticket: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket.write_all(ticket).await.unwrap();
    socket
}

/// Sends a request on a bulk connection; the reply, or `None` when the server closed it.
async fn ask_bulk(socket: &mut tokio::net::TcpStream, request: &[u8]) -> Option<BlobReply> {
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (rd, mut wr) = socket.split();
    // The server may have closed already: then the write or the read fails.
    let mut frame = (request.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(request);
    tokio::io::AsyncWriteExt::write_all(&mut wr, &frame)
        .await
        .ok()?;
    tokio::time::timeout(WAIT, read_frame::<_, BlobReply>(&mut rd.compat(), 1 << 20))
        .await
        .expect("an answer or a close in time")
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_connections_need_a_fresh_ticket_from_the_mesh() {
    let (a, a_addr, server) = provider(0, true).await;
    let (b, _) = node(vec![a_addr]).await;
    let port = server.bulk_port().unwrap();
    let sha = entry().files[0].sha256;
    let manifest = format!(r#"{{"manifest":{{"sha256":"{sha}"}}}}"#);

    let BlobReply::Bulk {
        port: offered,
        ticket,
    } = ask(&b, a.peer_id(), br#""bulk""#).await
    else {
        panic!("no ticket")
    };
    assert_eq!(offered, port);
    let ticket = hex::decode(ticket).unwrap();
    assert_eq!(ticket.len(), blob::TICKET_LEN);

    // A made-up ticket gets nothing: the connection is closed unanswered.
    let mut forged = ticket.clone();
    forged[0] ^= 1;
    let mut socket = bulk_connection(port, &forged).await;
    assert_eq!(ask_bulk(&mut socket, manifest.as_bytes()).await, None);
    // Nor does a short one.
    let mut socket = bulk_connection(port, &ticket[..16]).await;
    tokio::io::AsyncWriteExt::shutdown(&mut socket)
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut socket, &mut rest),
    )
    .await
    .expect("closed in time");
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");

    // The real one serves request after request on one connection...
    let mut socket = bulk_connection(port, &ticket).await;
    for _ in 0..2 {
        let reply = ask_bulk(&mut socket, manifest.as_bytes()).await;
        assert!(
            matches!(&reply, Some(BlobReply::Manifest(m)) if m.sha256 == sha),
            "{reply:?}"
        );
    }
    // ...but hands out no tickets there, and closes after a refusal.
    let reply = ask_bulk(&mut socket, br#""bulk""#).await;
    assert!(
        matches!(&reply, Some(BlobReply::Error(e)) if e.contains("over the mesh")),
        "{reply:?}"
    );
    assert_eq!(ask_bulk(&mut socket, manifest.as_bytes()).await, None);
    // A ticket opens one connection only.
    let mut again = bulk_connection(port, &ticket).await;
    assert_eq!(ask_bulk(&mut again, manifest.as_bytes()).await, None);
    // Forged, short, refused request, reused.
    assert_eq!(server.stats().refused.load(Ordering::Relaxed), 4);

    // Connections that send nothing hold their place for 2 s at most, and one address gets
    // at most 8 places: the 9th is closed at once, even with a good ticket.
    let ticket = |reply: BlobReply| match reply {
        BlobReply::Bulk { ticket, .. } => hex::decode(ticket).unwrap(),
        other => panic!("{other:?}"),
    };
    let good = ticket(ask(&b, a.peer_id(), br#""bulk""#).await);
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(bulk_connection(port, &[]).await);
    }
    let mut crowded = bulk_connection(port, &good).await;
    assert_eq!(ask_bulk(&mut crowded, manifest.as_bytes()).await, None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let good = ticket(ask(&b, a.peer_id(), br#""bulk""#).await);
    let mut socket = bulk_connection(port, &good).await;
    let reply = ask_bulk(&mut socket, manifest.as_bytes()).await;
    assert!(matches!(&reply, Some(BlobReply::Manifest(_))), "{reply:?}");
    drop(idle);

    // Unused tickets per peer are limited like its streams (one is out already: the crowded
    // connection was closed before it could use it).
    for _ in 1..blob::MAX_STREAMS_PER_PEER {
        assert!(matches!(
            ask(&b, a.peer_id(), br#""bulk""#).await,
            BlobReply::Bulk { .. }
        ));
    }
    let reply = ask(&b, a.peer_id(), br#""bulk""#).await;
    assert!(
        matches!(&reply, BlobReply::Error(e) if e.contains("too many")),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_model_fetch_and_install_it_once() {
    let (a, a_addr, server) = provider(0, true).await;
    let (b, _) = node(vec![a_addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let opts = PullOptions::default();
    let file = &entry().files[0];
    let providers = [a.peer_id()];
    // Both start before either has the file: they would share one partial file, and the
    // second would write into the file the first installed, or fail to install it again.
    let (first, second) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(
            blob::pull_missing_files(&store, entry(), &b, &providers, &opts),
            blob::pull_missing_files(&store, entry(), &b, &providers, &opts),
        )
    })
    .await
    .expect("the pulls end");
    let (first, second) = (first.expect("first pull"), second.expect("second pull"));
    let fetched: usize = first
        .iter()
        .chain(&second)
        .map(|f| f.report.chunks_fetched)
        .sum();
    assert_eq!(fetched as u64, file.size.div_ceil(blob::CHUNK_SIZE));
    assert_eq!(
        server.stats().bytes_served.load(Ordering::Relaxed),
        file.size
    );
    assert!(store.is_present(entry()));
    assert!(pulled_file(&store) == original());
    assert!(!store.partial_path(file.sha256).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_ticket_is_good_only_from_the_address_that_asked_for_it() {
    let (a, a_addr, server) = provider(0, true).await;
    let (b, _) = node(vec![a_addr]).await;
    let port = server.bulk_port().unwrap();
    let sha = entry().files[0].sha256;
    let manifest = format!(r#"{{"manifest":{{"sha256":"{sha}"}}}}"#);
    let ticket = |reply: BlobReply| match reply {
        BlobReply::Bulk { ticket, .. } => hex::decode(ticket).unwrap(),
        other => panic!("{other:?}"),
    };

    // B's mesh connection comes from 127.0.0.1; its ticket, presented from 127.0.0.2, opens
    // nothing, and is spent.
    let stolen = ticket(ask(&b, a.peer_id(), br#""bulk""#).await);
    let elsewhere = tokio::net::TcpSocket::new_v4().unwrap();
    elsewhere.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut socket = elsewhere
        .connect(([127, 0, 0, 1], port).into())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut socket, &stolen)
        .await
        .unwrap();
    assert_eq!(ask_bulk(&mut socket, manifest.as_bytes()).await, None);
    assert_eq!(server.stats().refused.load(Ordering::Relaxed), 1);
    let mut again = bulk_connection(port, &stolen).await;
    assert_eq!(ask_bulk(&mut again, manifest.as_bytes()).await, None);

    // From the address B's mesh connection comes from, a ticket works.
    let good = ticket(ask(&b, a.peer_id(), br#""bulk""#).await);
    let mut socket = bulk_connection(port, &good).await;
    let reply = ask_bulk(&mut socket, manifest.as_bytes()).await;
    assert!(
        matches!(&reply, Some(BlobReply::Manifest(m)) if m.sha256 == sha),
        "{reply:?}"
    );
}
