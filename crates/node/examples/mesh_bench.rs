//! Mesh formation time and gossip propagation delay for meshes of several sizes, with
//! in-process swarms on 127.0.0.1 (one tokio runtime, real TCP, Noise and Yamux).
//!
//! `cargo run --release -p pod-node --example mesh_bench -- 3 10 30`
//!
//! - formation: from starting every node (each bootstraps from node 0 only) until every node's
//!   peer table holds every other node's capabilities.
//! - propagation: one node announces new capabilities; time until the last other node has
//!   them (median and worst of the rounds).

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use pod_node::mesh::capability::{HardwareSummary, Load};
use pod_node::mesh::{self, Capabilities, Client, MeshConfig};

const ROUNDS: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(60);

fn config(bootstrap: Vec<Multiaddr>) -> MeshConfig {
    MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        listen_optional: vec![],
        bootstrap,
        mdns: false,
        ..MeshConfig::default()
    }
}

fn caps(active: usize) -> Capabilities {
    Capabilities {
        agent: String::new(),
        profile: "relay".into(),
        models: vec![],
        load: Load {
            queued: 0,
            active,
            max_active: 8,
        },
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

async fn start(bootstrap: Vec<Multiaddr>) -> anyhow::Result<(Client, Multiaddr)> {
    let (client, event_loop) = mesh::new(Keypair::generate_ed25519(), config(bootstrap))?;
    tokio::spawn(event_loop.run());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let info = client.node_info().await?;
        if let Some(addr) = info.listen_addrs.first() {
            let addr = addr.clone().with(Protocol::P2p(info.peer_id));
            return Ok((client, addr));
        }
        anyhow::ensure!(Instant::now() < deadline, "node did not listen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every node has `check` true for every other node's entry.
async fn until_all(
    nodes: &[Client],
    check: impl Fn(&mesh::PeerSnapshot) -> bool,
    skip_self_of: Option<usize>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut done = true;
        for (i, viewer) in nodes.iter().enumerate() {
            if Some(i) == skip_self_of {
                continue;
            }
            let peers = viewer.peers().await?;
            let ok = nodes
                .iter()
                .filter(|o| o.peer_id() != viewer.peer_id())
                .all(|o| peers.iter().any(|p| p.peer_id == o.peer_id() && check(p)));
            if !ok {
                done = false;
                break;
            }
        }
        if done {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(n: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    let started = Instant::now();
    let (first, first_addr) = start(vec![]).await?;
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(start(vec![first_addr.clone()]).await?.0);
    }
    for node in &nodes {
        node.announce(caps(0)).await?;
    }
    until_all(&nodes, |p| p.capabilities.is_some(), None).await?;
    let formation = started.elapsed();

    let mut delays = Vec::new();
    for round in 1..=ROUNDS {
        let speaker = round % n;
        let speaker_id = nodes[speaker].peer_id();
        // Announcements are rate limited per node; leave a gap as a real node would.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        nodes[speaker].announce(caps(round)).await?;
        until_all(
            &nodes,
            |p| {
                p.peer_id != speaker_id
                    || p.capabilities
                        .as_ref()
                        .is_some_and(|c| c.load.active == round)
            },
            Some(speaker),
        )
        .await?;
        delays.push(t.elapsed());
    }
    delays.sort();
    Ok((
        formation,
        delays[delays.len() / 2],
        delays[delays.len() - 1],
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![3, 10, 30]
    } else {
        sizes
    };
    println!("in-process swarms on 127.0.0.1; every node bootstraps from node 0; {ROUNDS} propagation rounds");
    println!("| nodes | formation (ms) | propagation median (ms) | propagation max (ms) |");
    println!("|------:|---------------:|------------------------:|---------------------:|");
    for n in sizes {
        anyhow::ensure!(n >= 2, "a mesh needs at least 2 nodes");
        let (formation, median, max) = run(n).await?;
        println!(
            "| {n:>5} | {:>14.0} | {:>23.1} | {:>20.1} |",
            formation.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
