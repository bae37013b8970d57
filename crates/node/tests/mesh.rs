//! The mesh with several real swarms in one process, on 127.0.0.1: discovery through a
//! bootstrap peer, capability gossip, expiry, and peers that misbehave.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{gossipsub, noise, tcp, yamux, Multiaddr, PeerId};
use pod_inference::{ModelInfo, ModelKind};
use pod_node::mesh::capability::{HardwareSummary, Load, CAPABILITY_TOPIC};
use pod_node::mesh::{self, Capabilities, Client, MeshConfig};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(15);

fn loopback_config(bootstrap: Vec<Multiaddr>) -> MeshConfig {
    MeshConfig {
        announce_interval: Duration::from_secs(1),
        peer_expiry: Duration::from_secs(3),
        ping_interval: Duration::from_secs(1),
        ..common::loopback_mesh(bootstrap)
    }
}

fn caps(model: &str) -> Capabilities {
    Capabilities {
        agent: String::new(),
        profile: "inference".into(),
        models: vec![ModelInfo {
            name: model.into(),
            kind: ModelKind::Chat,
            architecture: "llama".into(),
            quantization: "Q4_1".into(),
            context_length: 8192,
            dimension: None,
        }],
        load: Load::default(),
        hardware: HardwareSummary::default(),
        api: None,
        addrs: vec![],
        files: vec![],
        stages: Vec::new(),
        serve_to: Default::default(),
        trusted: vec![],
        seq: 0,
    }
}

/// Starts a node and returns its client and its dialable address (with `/p2p/`).
async fn node(config: MeshConfig) -> (Client, Multiaddr) {
    let (client, event_loop) = mesh::new(Keypair::generate_ed25519(), config).expect("mesh");
    tokio::spawn(event_loop.run());
    let addr = wait_for(|| {
        let client = client.clone();
        async move {
            let info = client.node_info().await.ok()?;
            info.listen_addrs
                .first()
                .cloned()
                .map(|a| a.with(libp2p::multiaddr::Protocol::P2p(info.peer_id)))
        }
    })
    .await;
    (client, addr)
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
async fn wait_for<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The models `client` has heard `peer` announce.
async fn models_of(client: &Client, peer: PeerId) -> Option<Vec<String>> {
    let peers = client.peers().await.ok()?;
    let p = peers.into_iter().find(|p| p.peer_id == peer)?;
    Some(p.capabilities?.models.into_iter().map(|m| m.name).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_through_a_bootstrap_peer() {
    let (a, a_addr) = node(loopback_config(vec![])).await;
    let (b, _) = node(loopback_config(vec![a_addr.clone()])).await;
    let (c, _) = node(loopback_config(vec![a_addr])).await;
    for (client, model) in [(&a, "model-a"), (&b, "model-b"), (&c, "model-c")] {
        client.announce(caps(model)).await.unwrap();
    }
    let nodes = [(&a, "model-a"), (&b, "model-b"), (&c, "model-c")];
    for (viewer, _) in nodes {
        for (other, model) in nodes {
            if viewer.peer_id() == other.peer_id() {
                continue;
            }
            let models = wait_for(|| models_of(viewer, other.peer_id())).await;
            assert_eq!(models, vec![model.to_owned()]);
        }
    }
    // B and C only knew A, yet they end up connected to each other (DHT and gossip).
    wait_for(|| async {
        let peers = b.peers().await.ok()?;
        peers
            .iter()
            .any(|p| p.peer_id == c.peer_id() && p.connected && p.rtt.is_some())
            .then_some(())
    })
    .await;
    let snapshot = b.peers().await.unwrap();
    let c_row = snapshot.iter().find(|p| p.peer_id == c.peer_id()).unwrap();
    assert!(c_row.agent.as_deref().unwrap().starts_with("pod/"));
    assert!(!c_row.addrs.is_empty());
    assert!(a.stats().announcements_received.load(Ordering::Relaxed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_capabilities_spread_and_silent_peers_expire() {
    let (a, a_addr) = node(loopback_config(vec![])).await;
    let (b, _) = node(loopback_config(vec![a_addr])).await;
    a.announce(caps("m")).await.unwrap();
    b.announce(caps("m")).await.unwrap();
    wait_for(|| models_of(&a, b.peer_id())).await;

    let mut busy = caps("m");
    busy.load.active = 3;
    b.announce(busy).await.unwrap();
    wait_for(|| async {
        let peers = a.peers().await.ok()?;
        let row = peers.into_iter().find(|p| p.peer_id == b.peer_id())?;
        (row.capabilities?.load.active == 3).then_some(())
    })
    .await;

    // Dropping every client stops B's event loop and closes its connections.
    let b_id = b.peer_id();
    drop(b);
    let gone = Instant::now();
    wait_for(|| async {
        let peers = a.peers().await.ok()?;
        (!peers.iter().any(|p| p.peer_id == b_id)).then_some(())
    })
    .await;
    assert!(
        gone.elapsed() < Duration::from_secs(3 + 2),
        "{:?}",
        gone.elapsed()
    );
}

/// A raw libp2p node that speaks gossipsub on pods' topic, to misbehave with, dialing `addr`.
fn rogue(addr: Multiaddr) -> libp2p::Swarm<gossipsub::Behaviour> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(200))
                .build()
                .unwrap();
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)
                .unwrap()
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .behaviour_mut()
        .subscribe(&gossipsub::IdentTopic::new(CAPABILITY_TOPIC))
        .unwrap();
    swarm.dial(addr).unwrap();
    swarm
}

/// Drives `swarm` for `duration`, publishing `payload(i)` every `every`.
async fn publish_for(
    swarm: &mut libp2p::Swarm<gossipsub::Behaviour>,
    duration: Duration,
    every: Duration,
    payload: impl Fn(usize) -> Vec<u8>,
) -> usize {
    let topic = gossipsub::IdentTopic::new(CAPABILITY_TOPIC);
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(every);
    let mut sent = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => return sent,
            _ = tick.tick() => {
                if swarm.behaviour_mut().publish(topic.clone(), payload(sent)).is_ok() {
                    sent += 1;
                }
            }
            _ = swarm.select_next_some() => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_announcements_are_dropped_and_the_sender_blocked() {
    let mut config = loopback_config(vec![]);
    config.max_invalid_announcements = 5;
    let (a, a_addr) = node(config).await;
    let (b, _) = node(loopback_config(vec![a_addr.clone()])).await;
    b.announce(caps("honest")).await.unwrap();

    let mut rogue = rogue(a_addr);
    let rogue_id = *rogue.local_peer_id();
    let sent = publish_for(
        &mut rogue,
        Duration::from_secs(4),
        Duration::from_millis(50),
        |i| match i % 3 {
            0 => format!("not json {i}").into_bytes(),
            1 => format!(r#"{{"agent": {i}}}"#).into_bytes(),
            _ => vec![b'x'; 15_000 + i],
        },
    )
    .await;
    // Publishing fails once the node has cut the rogue off.
    assert!(sent >= 5, "the rogue published {sent}");
    let stats = a.stats();
    assert!(stats.announcements_invalid.load(Ordering::Relaxed) >= 5);
    assert_eq!(stats.peers_blocked.load(Ordering::Relaxed), 1);
    let peers = a.peers().await.unwrap();
    assert!(
        !peers.iter().any(|p| p.peer_id == rogue_id),
        "a blocked peer leaves the table"
    );
    assert!(
        !peers
            .iter()
            .any(|p| p.capabilities.is_some() && p.peer_id == rogue_id),
        "nothing the rogue sent was taken"
    );
    // The node goes on serving honest peers.
    let models = wait_for(|| models_of(&a, b.peer_id())).await;
    assert_eq!(models, vec!["honest".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_valid_announcements_is_rate_limited() {
    let mut config = loopback_config(vec![]);
    config.max_announcements_per_peer_per_sec = 3;
    let (a, a_addr) = node(config).await;
    let mut rogue = rogue(a_addr);
    let sent = publish_for(
        &mut rogue,
        Duration::from_secs(3),
        Duration::from_millis(10),
        |i| {
            let mut c = caps("flood");
            c.seq = i as u64 + 1;
            c.encode()
        },
    )
    .await;
    assert!(sent > 50, "the rogue published {sent}");
    let stats = a.stats();
    let accepted = stats.announcements_received.load(Ordering::Relaxed);
    let limited = stats.announcements_rate_limited.load(Ordering::Relaxed);
    assert!(
        limited > 0,
        "nothing was rate limited ({accepted} accepted)"
    );
    assert!(accepted <= 3 * 4, "{accepted} accepted in about 3 s at 3/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_junk_connections_do_not_stop_the_node() {
    let mut config = loopback_config(vec![]);
    config.max_pending_incoming = 16;
    let (a, a_addr) = node(config).await;
    let port = a_addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    // 300 connections that send garbage instead of a Noise handshake, held open.
    let mut junk = Vec::new();
    for i in 0..300 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s
                .write_all(format!("GET / HTTP/1.1 junk {i}\r\n\r\n").as_bytes())
                .await;
            junk.push(s);
        }
    }
    assert!(
        a.stats().connections_denied.load(Ordering::Relaxed) > 0,
        "the pending-connection limit never applied"
    );
    assert!(a.peers().await.unwrap().is_empty());
    drop(junk);
    // An honest pod still gets in and is heard.
    let (b, _) = node(loopback_config(vec![a_addr])).await;
    b.announce(caps("after-flood")).await.unwrap();
    let models = wait_for(|| models_of(&a, b.peer_id())).await;
    assert_eq!(models, vec!["after-flood".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_or_bad_bootstrap_address_is_a_clear_error() {
    let (_a, a_addr) = node(loopback_config(vec![])).await;
    let taken: Multiaddr = a_addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    let mut config = loopback_config(vec![]);
    config.listen = vec![taken.clone()];
    let err = mesh::new(Keypair::generate_ed25519(), config).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen on {taken}")),
        "{err}"
    );
    let err = mesh::new(
        Keypair::generate_ed25519(),
        loopback_config(vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()]),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("must end in /p2p/<PeerId>"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_relayed_by_one_peer_under_fresh_keys_are_rate_limited() {
    const ORIGINS: usize = 60;
    let mut config = loopback_config(vec![]);
    config.max_announcements_per_peer_per_sec = 1;
    let (a, a_addr) = node(config).await;
    let topic = gossipsub::IdentTopic::new(CAPABILITY_TOPIC);

    // One relaying peer, connected to the node, and many publishers with fresh keys behind it.
    let mut relay = rogue(a_addr);
    relay
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let relay_addr = loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            relay.select_next_some().await
        {
            break address;
        }
    };
    tokio::spawn(async move {
        loop {
            relay.select_next_some().await;
        }
    });
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut ready = Vec::new();
    for _ in 0..ORIGINS {
        let mut publisher = rogue(relay_addr.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        let go = std::sync::Arc::clone(&go);
        let topic = topic.clone();
        tokio::spawn(async move {
            // Once the relay is known to take the topic, wait for the signal, publish once.
            while !publisher
                .behaviour()
                .all_peers()
                .any(|(_, topics)| topics.contains(&&topic.hash()))
            {
                publisher.select_next_some().await;
            }
            let _ = tx.send(());
            let notified = go.notified();
            tokio::pin!(notified);
            loop {
                tokio::select! {
                    () = &mut notified => break,
                    _ = publisher.select_next_some() => {}
                }
            }
            let mut c = caps("fresh");
            c.seq = 1;
            let _ = publisher.behaviour_mut().publish(topic, c.encode());
            let end = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::timeout_at(end, publisher.select_next_some())
                .await
                .is_ok()
            {}
        });
    }
    for rx in ready {
        tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    }
    go.notify_waiters();

    let stats = a.stats();
    wait_for(|| async {
        (stats.announcements_rate_limited.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    // Let the rest of the burst arrive before counting what got through.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = stats.announcements_received.load(Ordering::Relaxed);
    let limited = stats.announcements_rate_limited.load(Ordering::Relaxed);
    assert!(
        limited > 0,
        "nothing was rate limited ({accepted} accepted)"
    );
    // The relay may pass on 20 a second (20 times the origin limit of 1): the burst spans
    // at most two of its windows.
    assert!(
        accepted <= 40,
        "{accepted} of {ORIGINS} relayed announcements accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_that_go_away_are_forgotten() {
    let (x, x_addr) = node(loopback_config(vec![])).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        // A relay offers the hop protocol only at an address it knows to be reachable: give
        // it its own as external.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let at: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let (relay, _) = node(MeshConfig {
            relay_server: true,
            listen: vec![at.clone()],
            external: vec![at],
            ..loopback_config(vec![x_addr.clone()])
        })
        .await;
        relays.push(relay);
    }
    let known = |x: Client, want: usize| async move {
        let info = x.node_info().await.ok()?;
        (info.known_relays == want).then_some(())
    };
    wait_for(|| known(x.clone(), 3)).await;
    // A relay's event loop ends with its last client: its connections close.
    drop(relays);
    wait_for(|| known(x.clone(), 0)).await;
    assert_eq!(x.node_info().await.unwrap().known_relays, 0);
}
