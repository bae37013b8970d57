//! The libp2p protocols a pod speaks, combined into one `NetworkBehaviour`.

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, identity, kad, mdns,
    peer_store, ping, relay, upnp, StreamProtocol,
};

use super::capability::MAX_ANNOUNCEMENT_BYTES;
use super::{MeshConfig, MeshError};

/// Kademlia protocol name: pods keep their own DHT and never join the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/kad/1.0.0");

/// Identify's protocol version string.
pub(super) const IDENTIFY_PROTOCOL_VERSION: &str = "/pod/1.0.0";

/// The agent version pods send in identify.
pub fn agent_version() -> String {
    format!("pod/{}", env!("CARGO_PKG_VERSION"))
}

/// Reservations a relay pod holds at once, all peers together.
pub const RELAY_MAX_RESERVATIONS: usize = 128;
/// Reservations one peer may hold on a relay pod.
pub const RELAY_MAX_RESERVATIONS_PER_PEER: usize = 2;
/// How long a reservation lasts before the reserving pod must renew it.
pub const RELAY_RESERVATION_DURATION: Duration = Duration::from_secs(30 * 60);
/// Circuits a relay pod relays at once, all peers together.
pub const RELAY_MAX_CIRCUITS: usize = 64;
/// Circuits one peer may have open through a relay pod.
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// How long one circuit may stay open. Pods behind NAT upgrade to a direct connection
/// (DCUtR) within seconds where the NATs allow it; where they do not, the circuit carries
/// requests until it closes and the next request opens a new one.
pub const RELAY_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(10 * 60);
/// Bytes one circuit may carry by default, both directions together: room for many chat
/// requests and answers, not for model files (those need a direct connection, a storage pod
/// in reach, or a relay run with a higher `--relay-circuit-mib`).
pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 8 * 1024 * 1024;

/// Peers the dialling address book holds (the least recently used go first).
const ADDRESS_BOOK_PEERS: usize = 1024;
/// Addresses it holds per peer.
const ADDRESS_BOOK_ADDRS_PER_PEER: usize = 16;

fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// The relay server's limits, so that being a public relay stays cheap and safe: bounded
/// reservations and circuits, each circuit bounded in bytes and time. libp2p's default rate
/// limiters stay in place (per peer and per IP, for reservations and circuits).
fn relay_config(circuit_bytes: u64) -> relay::Config {
    relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_reservations_per_peer: RELAY_MAX_RESERVATIONS_PER_PEER,
        reservation_duration: RELAY_RESERVATION_DURATION,
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_MAX_CIRCUIT_DURATION,
        max_circuit_bytes: circuit_bytes,
        ..relay::Config::default()
    }
}

/// AutoNAT v1. Probes start soon after start-up and are retried often while the status is
/// unknown, so that a pod behind NAT reserves relay slots within seconds of joining.
/// `trust_private`: peers observed at private addresses may probe and be probed (LANs and
/// test networks); by default only global addresses count, as on the internet.
fn autonat_config(trust_private: bool) -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(5),
        retry_interval: Duration::from_secs(20),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(15),
        only_global_ips: !trust_private,
        ..autonat::Config::default()
    }
}

/// Every protocol of a pod, one field each.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) dcutr: dcutr::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kademlia: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) upnp: Toggle<upnp::tokio::Behaviour>,
    pub(crate) stream: libp2p_stream::Behaviour,
    /// The addresses every dial of a peer by id may use: those it announced, identify's and
    /// those connections were made to; bounded, and an address that fails to dial is dropped.
    pub(crate) addresses: peer_store::Behaviour<peer_store::memory_store::MemoryStore>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &identity::Keypair,
        relay_client: relay::client::Behaviour,
        config: &MeshConfig,
    ) -> Result<Self, MeshError> {
        let peer_id = key.public().to_peer_id();

        let limits = connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(config.max_pending_incoming))
            .with_max_established_incoming(Some(config.max_established_incoming))
            .with_max_established(Some(config.max_established))
            .with_max_established_per_peer(Some(config.max_connections_per_peer));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_millis(700))
            // Announcements are checked before they are forwarded.
            .validate_messages()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .max_transmit_size(MAX_ANNOUNCEMENT_BYTES + 1024)
            .build()
            .map_err(|e| MeshError::Setup(format!("gossipsub config: {e}")))?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| MeshError::Setup(format!("gossipsub: {e}")))?;

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kademlia =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Pods listen for each other; answering DHT queries is part of being a pod, also on a
        // LAN where AutoNAT would never confirm a public address.
        kademlia.set_mode(Some(kad::Mode::Server));

        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| MeshError::Setup(format!("mDNS: {e}")))?,
            )
        } else {
            None
        };

        let relay = config
            .relay_server
            .then(|| relay::Behaviour::new(peer_id, relay_config(config.relay_circuit_bytes)));

        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            relay_client,
            relay: relay.into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(agent_version())
                    // Peers learn at once when a listen address (a relay reservation) goes.
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval)),
            kademlia,
            gossipsub,
            mdns: mdns.into(),
            autonat: autonat::Behaviour::new(peer_id, autonat_config(config.nat_trust_private)),
            upnp: config.upnp.then(upnp::tokio::Behaviour::default).into(),
            stream: libp2p_stream::Behaviour::new(),
            addresses: peer_store::Behaviour::new(peer_store::memory_store::MemoryStore::new(
                peer_store::memory_store::Config::default()
                    .set_peer_capacity(nonzero(ADDRESS_BOOK_PEERS))
                    .set_record_capacity(nonzero(ADDRESS_BOOK_ADDRS_PER_PEER))
                    .set_remove_addr_on_dial_error(true),
            )),
        })
    }
}
