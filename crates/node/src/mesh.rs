//! The libp2p mesh: how pods find each other and learn what each one serves.
//!
//! [`new`] builds the swarm and returns a [`Client`] handle plus the [`EventLoop`] that owns the
//! swarm; spawn the loop, keep clones of the client. Nothing outside this module touches the
//! swarm. The loop ends when every client is dropped.
//!
//! Protocols: TCP and QUIC-v1 transports with Noise and Yamux (TCP only, under a pre-shared key,
//! in a private mesh: see [`mesh_key`]), identify (agent `pod/<version>`),
//! ping, Kademlia under `/pod/kad/1.0.0` (peer routing, and provider records for served
//! files), gossipsub (capability announcements on [`capability::CAPABILITY_TOPIC`]), mDNS,
//! AutoNAT, circuit relay v2 (client always, server on request), DCUtR hole punching and
//! UPnP port mapping (on request).

pub mod capability;
pub mod mesh_key;
pub mod peers;

mod addresses;
mod behaviour;
mod event_loop;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::pnet::PnetConfig;
use libp2p::{identity::Keypair, noise, quic, tcp, yamux, Multiaddr, PeerId, SwarmBuilder};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use behaviour::{
    agent_version, KAD_PROTOCOL, RELAY_MAX_CIRCUITS, RELAY_MAX_CIRCUITS_PER_PEER,
    RELAY_MAX_CIRCUIT_BYTES, RELAY_MAX_CIRCUIT_DURATION, RELAY_MAX_RESERVATIONS,
    RELAY_MAX_RESERVATIONS_PER_PEER, RELAY_RESERVATION_DURATION,
};
pub use capability::Capabilities;
pub use event_loop::EventLoop;
pub use mesh_key::PreSharedKey;
pub use peers::{ConnectionPath, HolePunch, PeerSnapshot};

/// Default TCP and UDP (QUIC) port of the mesh.
pub const DEFAULT_P2P_PORT: u16 = 4001;

/// How long a new connection may take to agree on encryption (the private mesh's nonces,
/// Noise) and multiplexing before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// How the mesh runs.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Addresses to listen on. All must be bound or start-up fails.
    pub listen: Vec<Multiaddr>,
    /// Further addresses to listen on if the system allows (e.g. IPv6); failures are logged.
    pub listen_optional: Vec<Multiaddr>,
    /// Addresses others can reach this node at, when the node cannot tell (port forwarding).
    pub external: Vec<Multiaddr>,
    /// Peers to dial at start and add to the DHT. Each must end in `/p2p/<PeerId>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Act as a circuit relay v2 server for peers behind NAT (with the limits of
    /// [`RELAY_MAX_RESERVATIONS`] and the constants beside it).
    pub relay_server: bool,
    /// Bytes one relayed circuit may carry, both directions together, when this node is a
    /// relay ([`RELAY_MAX_CIRCUIT_BYTES`] by default).
    pub relay_circuit_bytes: u64,
    /// Let AutoNAT probe and be probed by peers at private addresses (LANs, test networks).
    /// By default only peers at global addresses count, so a pod on a private network never
    /// learns whether it is reachable.
    pub nat_trust_private: bool,
    /// Ask the home router (UPnP IGD) to forward the mesh port to this node, so peers reach
    /// it directly. Off by default here; `pod start` turns it on unless `--no-upnp`.
    pub upnp: bool,
    /// How often the node re-announces its capabilities when nothing changes.
    pub announce_interval: Duration,
    /// A peer with no connection that has not been heard of for this long is forgotten.
    pub peer_expiry: Duration,
    /// How often connected peers are pinged.
    pub ping_interval: Duration,
    /// Connections being set up from outside at once.
    pub max_pending_incoming: u32,
    /// Established connections from outside.
    pub max_established_incoming: u32,
    /// Established connections in total.
    pub max_established: u32,
    /// Connections to one peer.
    pub max_connections_per_peer: u32,
    /// Announcements accepted from one peer per second; the rest are dropped.
    pub max_announcements_per_peer_per_sec: u32,
    /// Invalid announcements after which a peer is disconnected and blocked.
    pub max_invalid_announcements: u32,
    /// Peers the node tries to stay connected to; pods learned from gossip are dialled until
    /// this many connections are open.
    pub target_peers: usize,
    /// The pre-shared key of a private mesh: every connection is encrypted with it before
    /// Noise, so only pods holding it can connect. It wraps TCP only: with a key the node
    /// neither listens on nor dials QUIC. `None`: the open mesh, TCP and QUIC.
    pub mesh_key: Option<PreSharedKey>,
}

impl MeshConfig {
    /// TCP and QUIC on `port` on every IPv4 interface, with IPv6 when available.
    pub fn listen_on_port(port: u16) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
        let addr = |s: String| s.parse::<Multiaddr>().ok();
        let required = [
            format!("/ip4/0.0.0.0/tcp/{port}"),
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
        ];
        let optional = [
            format!("/ip6/::/tcp/{port}"),
            format!("/ip6/::/udp/{port}/quic-v1"),
        ];
        (
            required.into_iter().filter_map(addr).collect(),
            optional.into_iter().filter_map(addr).collect(),
        )
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        let (listen, listen_optional) = Self::listen_on_port(DEFAULT_P2P_PORT);
        Self {
            listen,
            listen_optional,
            external: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            relay_server: false,
            relay_circuit_bytes: RELAY_MAX_CIRCUIT_BYTES,
            nat_trust_private: false,
            upnp: false,
            announce_interval: Duration::from_secs(10),
            peer_expiry: Duration::from_secs(30),
            ping_interval: Duration::from_secs(15),
            max_pending_incoming: 64,
            max_established_incoming: 256,
            max_established: 512,
            max_connections_per_peer: 4,
            max_announcements_per_peer_per_sec: 5,
            max_invalid_announcements: 16,
            target_peers: 32,
            mesh_key: None,
        }
    }
}

/// Whether an address is a QUIC one (UDP), which a private mesh cannot use.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| {
        matches!(
            p,
            libp2p::multiaddr::Protocol::QuicV1 | libp2p::multiaddr::Protocol::Quic
        )
    })
}

/// The mesh could not start or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Building the transports or protocols failed.
    #[error("cannot set up the mesh: {0}")]
    Setup(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A bootstrap address lacks its `/p2p/<PeerId>` suffix.
    #[error("bootstrap address {0} must end in /p2p/<PeerId>")]
    BootstrapWithoutPeerId(Multiaddr),
    /// Dialling failed at once.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The DHT refused a record (its local store is full).
    #[error("the DHT refused the record: {0}")]
    Dht(String),
    /// The event loop has stopped.
    #[error("the mesh has stopped")]
    Stopped,
}

/// This node as `/pod/v1/node` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    /// The node's PeerId.
    pub peer_id: PeerId,
    /// Its identify agent version.
    pub agent: String,
    /// Addresses it listens on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Addresses others reach it at, as confirmed (AutoNAT) or configured.
    pub external_addrs: Vec<Multiaddr>,
    /// `public`, `private` or `unknown`, from AutoNAT.
    pub nat_status: String,
    /// Relays holding a reservation for this node: peers reach it through them while it is
    /// private.
    pub relays: Vec<PeerId>,
    /// Connected peers that offer to relay, which reservations are asked of when this node is
    /// private.
    pub known_relays: usize,
    /// Peers with an open connection.
    pub connected_peers: usize,
    /// Peers in the peer table.
    pub known_peers: usize,
}

/// Something that happened in the mesh, for whoever listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshEvent {
    /// The first connection to a peer opened.
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// A peer announced new capabilities.
    Announced(PeerId),
    /// A silent peer was forgotten.
    Expired(PeerId),
}

/// Counters of the mesh, readable at any time.
#[derive(Debug, Default)]
pub struct MeshStats {
    /// Announcements this node published.
    pub announcements_sent: AtomicU64,
    /// Valid announcements received.
    pub announcements_received: AtomicU64,
    /// Received announcements dropped: malformed, oversized, over limits.
    pub announcements_invalid: AtomicU64,
    /// Received announcements dropped because a peer sent too many.
    pub announcements_rate_limited: AtomicU64,
    /// Peers blocked for misbehaving.
    pub peers_blocked: AtomicU64,
    /// Gossip-learned pods not dialled because the tick's dial budget was spent (they are
    /// dialled on a later announcement).
    pub dials_deferred: AtomicU64,
    /// Incoming connections refused by the connection limits.
    pub connections_denied: AtomicU64,
}

impl MeshStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum Command {
    Peers(oneshot::Sender<Vec<PeerSnapshot>>),
    DirectIps(PeerId, oneshot::Sender<Vec<std::net::IpAddr>>),
    Node(oneshot::Sender<NodeInfo>),
    Announce(Box<Capabilities>),
    Dial(Multiaddr, oneshot::Sender<Result<(), MeshError>>),
    Provide(Vec<u8>, oneshot::Sender<Result<(), MeshError>>),
    Providers(Vec<u8>, oneshot::Sender<Vec<PeerId>>),
}

/// A handle to the mesh. Cheap to clone; every method talks to the [`EventLoop`].
#[derive(Clone)]
pub struct Client {
    peer_id: PeerId,
    streams: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<MeshEvent>,
    stats: Arc<MeshStats>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Every peer in the peer table.
    pub async fn peers(&self) -> Result<Vec<PeerSnapshot>, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Peers(tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// The peer's IP addresses on the open connections that reach it directly (not through
    /// a relay); empty when there are none.
    pub async fn direct_ips(&self, peer: PeerId) -> Result<Vec<std::net::IpAddr>, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::DirectIps(peer, tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// This node's addresses and NAT status.
    pub async fn node_info(&self) -> Result<NodeInfo, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Node(tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Sets what this node announces. It is published at once if it changed (at most a few
    /// times a second) and re-published periodically. The loop fills in `agent`, `addrs`
    /// and `seq`.
    pub async fn announce(&self, caps: Capabilities) -> Result<(), MeshError> {
        self.send(Command::Announce(Box::new(caps))).await
    }

    /// Dials an address; returns once the dial started.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Dial(addr, tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Records in the DHT that this node provides `key` (e.g. the SHA-256 of a file it serves):
    /// stored here and on the peers closest to the key. Returns when those peers were asked.
    /// Records expire unless renewed, so call it again from time to time.
    pub async fn provide(&self, key: Vec<u8>) -> Result<(), MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Provide(key, tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// The peers that provide `key`, as the DHT knows them (this node excluded). The node
    /// starts dialling them as they are found, so streams to them open without further lookup.
    /// Empty when none is found within the DHT's query timeout.
    pub async fn providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Providers(key, tx)).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// A handle to open and accept streams of application protocols (inference, blobs)
    /// without going through the event loop.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// Subscribes to mesh events. A subscriber that falls behind misses events (and is told
    /// so by the receiver).
    pub fn events(&self) -> broadcast::Receiver<MeshEvent> {
        self.events.subscribe()
    }

    /// The mesh's counters.
    pub fn stats(&self) -> &MeshStats {
        &self.stats
    }

    async fn send(&self, command: Command) -> Result<(), MeshError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| MeshError::Stopped)
    }
}

/// Builds the swarm, binds the listen addresses and dials the bootstrap peers.
///
/// Must be called within a tokio runtime. Spawn the returned [`EventLoop`]'s
/// [`run`](EventLoop::run).
pub fn new(key: Keypair, config: MeshConfig) -> Result<(Client, EventLoop), MeshError> {
    let peer_id = key.public().to_peer_id();
    let setup = |e: &dyn std::fmt::Display| MeshError::Setup(e.to_string());
    let behaviour_config = config.clone();
    let mut built_error = None;
    if let Some(psk) = &config.mesh_key {
        tracing::info!(
            fingerprint = %psk.fingerprint(),
            "private mesh: only pods holding this key can connect; the key covers TCP only, so QUIC is off"
        );
    }
    let transport = transport(&key, config.mesh_key).map_err(|e| setup(&e))?;
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            match behaviour::Behaviour::new(key, relay_client, &behaviour_config) {
                Ok(b) => Ok(b),
                Err(e) => {
                    let text = e.to_string();
                    built_error = Some(e);
                    Err(text.into())
                }
            }
        })
        .map_err(|e| built_error.take().unwrap_or_else(|| setup(&e)))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();

    let streams = swarm.behaviour().stream.new_control();
    let (commands_tx, commands_rx) = mpsc::channel(64);
    let (events_tx, _) = broadcast::channel(256);
    let stats = Arc::new(MeshStats::default());
    let mut event_loop = EventLoop::new(
        swarm,
        commands_rx,
        events_tx.clone(),
        Arc::clone(&stats),
        config,
    );
    event_loop.start()?;
    Ok((
        Client {
            peer_id,
            streams,
            commands: commands_tx,
            events: events_tx,
            stats,
        },
        event_loop,
    ))
}

/// The mesh's transports: TCP with Noise and Yamux, plus QUIC-v1 in the open mesh. With a
/// `mesh_key`, every TCP connection first exchanges nonces and is encrypted with the key
/// (XSalsa20), so a peer without the key fails the Noise handshake that follows; there is no
/// QUIC, which the key cannot wrap. (Relayed connections run inside a connection to the
/// relay, so they are covered as well.)
fn transport(
    key: &Keypair,
    mesh_key: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    let tcp = match mesh_key {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    if mesh_key.is_some() {
        return Ok(tcp);
    }
    let quic = quic::tokio::Transport::new(quic::Config::new(key))
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
    Ok(tcp
        .or_transport(quic)
        .map(|either, _| either.into_inner())
        .boxed())
}

/// Accepts streams of `protocol` until the mesh stops, each handled on its own task.
pub async fn serve_streams<F, Fut>(
    mut control: libp2p_stream::Control,
    protocol: libp2p::StreamProtocol,
    handle: F,
) where
    F: Fn(PeerId, libp2p::Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut incoming = match control.accept(protocol.clone()) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve {protocol}");
            return;
        }
    };
    while let Some((peer, stream)) = futures::StreamExt::next(&mut incoming).await {
        tokio::spawn(handle(peer, stream));
    }
}
