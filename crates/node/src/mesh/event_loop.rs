//! The task that owns the swarm: it answers [`Client`](super::Client) commands, keeps the peer
//! table, and publishes and checks capability announcements.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{autonat, gossipsub, identify, kad, mdns, ping, relay, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::behaviour::{agent_version, Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::capability::{Capabilities, CAPABILITY_TOPIC, MAX_ADDRS};
use super::peers::PeerTable;
use super::{Command, MeshConfig, MeshError, MeshEvent, MeshStats, NodeInfo};

/// The relay v2 hop protocol: peers that speak it can relay for us.
const RELAY_HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// Shortest gap between two announcements of this node.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_millis(250);

/// How often the loop checks timers (expiry, re-announcement).
const TICK: Duration = Duration::from_millis(250);

/// How long to wait before dialling a gossip-learned pod again.
const REDIAL_GAP: Duration = Duration::from_secs(30);

/// Relays to reserve a slot with when AutoNAT finds the node unreachable.
const MAX_RELAY_RESERVATIONS: usize = 2;

/// Per-peer counters for rate limiting and misbehaviour.
#[derive(Debug, Default)]
struct PeerConduct {
    window_start: Option<Instant>,
    in_window: u32,
    invalid: u32,
}

/// Owns the swarm. Run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<MeshEvent>,
    stats: Arc<MeshStats>,
    config: MeshConfig,
    topic: gossipsub::IdentTopic,
    peers: PeerTable,
    conduct: HashMap<PeerId, PeerConduct>,
    own: Option<Capabilities>,
    seq: u64,
    last_announced: Option<Instant>,
    announce_due: bool,
    dialled: HashMap<PeerId, Instant>,
    relays: Vec<(PeerId, Multiaddr)>,
    relay_reservations: usize,
    pending_provide: HashMap<kad::QueryId, oneshot::Sender<Result<(), MeshError>>>,
    pending_providers: HashMap<kad::QueryId, (BTreeSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    /// Open connections that are not relayed, with the peer and its IP address on them.
    direct: HashMap<ConnectionId, (PeerId, IpAddr)>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer_id", self.swarm.local_peer_id())
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<MeshEvent>,
        stats: Arc<MeshStats>,
        config: MeshConfig,
    ) -> Self {
        // Sequence numbers start at the wall clock so a restarted pod's announcements are
        // newer than those of its previous run.
        let seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            swarm,
            commands,
            events,
            stats,
            config,
            topic: gossipsub::IdentTopic::new(CAPABILITY_TOPIC),
            peers: PeerTable::default(),
            conduct: HashMap::new(),
            own: None,
            seq,
            last_announced: None,
            announce_due: false,
            dialled: HashMap::new(),
            relays: Vec::new(),
            relay_reservations: 0,
            pending_provide: HashMap::new(),
            pending_providers: HashMap::new(),
            direct: HashMap::new(),
        }
    }

    /// Binds the listen addresses, subscribes to the capability topic and dials the bootstrap
    /// peers.
    pub(super) fn start(&mut self) -> Result<(), MeshError> {
        for addr in self.config.listen.clone() {
            ensure_port_free(&addr)?;
            self.swarm
                .listen_on(addr.clone())
                .map_err(|e| MeshError::Listen {
                    addr,
                    reason: transport_error_text(&e),
                })?;
        }
        for addr in self.config.listen_optional.clone() {
            if let Err(e) = self.swarm.listen_on(addr.clone()) {
                tracing::debug!(%addr, error = %transport_error_text(&e), "optional listen address unavailable");
            }
        }
        for addr in self.config.external.clone() {
            self.swarm.add_external_address(addr);
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&self.topic)
            .map_err(|e| MeshError::Setup(format!("gossipsub subscribe: {e}")))?;
        let mut bootstrapping = false;
        for addr in self.config.bootstrap.clone() {
            let Some(peer) = peer_id_of(&addr) else {
                return Err(MeshError::BootstrapWithoutPeerId(addr));
            };
            self.swarm
                .behaviour_mut()
                .kademlia
                .add_address(&peer, addr.clone());
            bootstrapping = true;
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %dial_error_text(&e), "cannot dial bootstrap peer");
            }
        }
        if bootstrapping {
            if let Err(e) = self.swarm.behaviour_mut().kademlia.bootstrap() {
                tracing::debug!(error = %e, "DHT bootstrap not started");
            }
        }
        Ok(())
    }

    /// Runs until every [`Client`](super::Client) is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        tracing::debug!("mesh stopped");
    }

    fn emit(&self, event: MeshEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Peers(tx) => {
                let _ = tx.send(self.peers.snapshot(Instant::now()));
            }
            Command::DirectIps(peer, tx) => {
                let mut ips: Vec<IpAddr> = self
                    .direct
                    .values()
                    .filter(|(p, _)| *p == peer)
                    .map(|(_, ip)| *ip)
                    .collect();
                ips.sort();
                ips.dedup();
                let _ = tx.send(ips);
            }
            Command::Node(tx) => {
                let _ = tx.send(self.node_info());
            }
            Command::Announce(caps) => {
                let changed = self.own.as_ref().is_none_or(|own| {
                    let mut next = (*caps).clone();
                    next.agent.clone_from(&own.agent);
                    next.addrs.clone_from(&own.addrs);
                    next.seq = own.seq;
                    !own.same_content(&next)
                });
                self.own = Some(*caps);
                if changed {
                    self.announce_due = true;
                    self.maybe_announce(Instant::now());
                }
            }
            Command::Dial(addr, tx) => {
                let result = self.swarm.dial(addr.clone()).map_err(|e| MeshError::Dial {
                    addr,
                    reason: dial_error_text(&e),
                });
                let _ = tx.send(result);
            }
            Command::Provide(key, tx) => {
                match self
                    .swarm
                    .behaviour_mut()
                    .kademlia
                    .start_providing(kad::RecordKey::new(&key))
                {
                    Ok(id) => {
                        self.pending_provide.insert(id, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(MeshError::Dht(e.to_string())));
                    }
                }
            }
            Command::Providers(key, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kademlia
                    .get_providers(kad::RecordKey::new(&key));
                self.pending_providers.insert(id, (BTreeSet::new(), tx));
            }
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        match result {
            kad::QueryResult::StartProviding(result) => {
                if let Err(e) = &result {
                    // The record is kept here and answered from here all the same.
                    tracing::debug!(error = %e, "provider record reached no peer");
                }
                if let Some(tx) = self.pending_provide.remove(&id) {
                    let _ = tx.send(Ok(()));
                }
            }
            kad::QueryResult::GetProviders(result) => {
                let found = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {
                        Default::default()
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "provider lookup ended");
                        Default::default()
                    }
                };
                let me = *self.swarm.local_peer_id();
                let Some((providers, _)) = self.pending_providers.get_mut(&id) else {
                    return;
                };
                for peer in found.into_iter().filter(|p| *p != me) {
                    if providers.insert(peer) && !self.swarm.is_connected(&peer) {
                        // Dial while the query still holds the addresses it learned for the
                        // provider; once it ends they are gone.
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!(%peer, error = %dial_error_text(&e), "cannot dial provider");
                        }
                    }
                }
                let done = last || !providers.is_empty();
                if done {
                    if let Some((providers, tx)) = self.pending_providers.remove(&id) {
                        let _ = tx.send(providers.into_iter().collect());
                    }
                    if let Some(mut query) = self.swarm.behaviour_mut().kademlia.query_mut(&id) {
                        query.finish();
                    }
                }
            }
            _ => {}
        }
    }

    fn node_info(&self) -> NodeInfo {
        let nat_status = match self.swarm.behaviour().autonat.nat_status() {
            autonat::NatStatus::Public(_) => "public",
            autonat::NatStatus::Private => "private",
            autonat::NatStatus::Unknown => "unknown",
        };
        NodeInfo {
            peer_id: *self.swarm.local_peer_id(),
            agent: agent_version(),
            listen_addrs: self.swarm.listeners().cloned().collect(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            nat_status: nat_status.into(),
            connected_peers: self.swarm.connected_peers().count(),
            known_peers: self.peers.len(),
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for peer in self.peers.expire(self.config.peer_expiry, now) {
            tracing::info!(%peer, "peer expired: not heard of within the expiry window");
            self.conduct.remove(&peer);
            self.emit(MeshEvent::Expired(peer));
        }
        let periodic = self
            .last_announced
            .is_none_or(|t| now.duration_since(t) >= self.config.announce_interval);
        if periodic {
            self.announce_due = true;
        }
        self.maybe_announce(now);
    }

    /// Publishes this node's capabilities if one is due and the last one is not too recent.
    fn maybe_announce(&mut self, now: Instant) {
        if !self.announce_due {
            return;
        }
        if self
            .last_announced
            .is_some_and(|t| now.duration_since(t) < MIN_ANNOUNCE_GAP)
        {
            return;
        }
        let Some(own) = self.own.as_mut() else {
            return;
        };
        self.seq += 1;
        own.seq = self.seq;
        own.agent = agent_version();
        own.addrs = self
            .swarm
            .external_addresses()
            .chain(self.swarm.listeners())
            .filter(|a| is_dialable(a))
            .take(MAX_ADDRS)
            .map(ToString::to_string)
            .collect();
        let data = own.encode();
        self.announce_due = false;
        self.last_announced = Some(now);
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data)
        {
            Ok(_) => {
                MeshStats::bump(&self.stats.announcements_sent);
            }
            // Alone in the mesh, or no peer subscribed yet: the next announcement will do.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::Duplicate) => {}
            Err(e) => tracing::debug!(error = %e, "cannot publish capabilities"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        let now = Instant::now();
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let with_id = address
                    .clone()
                    .with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(address = %with_id, "mesh listening");
                self.announce_due = true;
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.announce_due = true;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                if let Some(ip) = direct_ip(&addr) {
                    self.direct.insert(connection_id, (peer_id, ip));
                }
                self.peers.connected(peer_id, Some(addr.clone()), now);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, %addr, "connected");
                    self.emit(MeshEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.direct.remove(&connection_id);
                self.peers.disconnected(peer_id, now);
                if num_established == 0 {
                    tracing::debug!(peer = %peer_id, cause = ?cause, "disconnected");
                    self.emit(MeshEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    MeshStats::bump(&self.stats.connections_denied);
                }
                tracing::debug!(error = %error, "incoming connection failed");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(error = %error, "listener error");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event, now),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent, now: Instant) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let kad = info.protocols.contains(&KAD_PROTOCOL);
                let relay_hop = info
                    .protocols
                    .iter()
                    .any(|p| p.as_ref() == RELAY_HOP_PROTOCOL);
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| is_dialable(a))
                    .take(MAX_ADDRS)
                    .cloned()
                    .collect();
                if kad {
                    for a in &addrs {
                        self.swarm
                            .behaviour_mut()
                            .kademlia
                            .add_address(&peer_id, a.clone());
                    }
                }
                if relay_hop {
                    if let Some(a) = addrs.first() {
                        if !self.relays.iter().any(|(p, _)| *p == peer_id) {
                            self.relays.push((peer_id, a.clone()));
                        }
                    }
                }
                tracing::debug!(peer = %peer_id, agent = %info.agent_version, "identified");
                self.peers
                    .identified(peer_id, info.agent_version, addrs, now);
            }
            BehaviourEvent::Ping(ping::Event { peer, result, .. }) => match result {
                Ok(rtt) => self.peers.pinged(peer, rtt, now),
                Err(e) => tracing::debug!(%peer, error = %e, "ping failed"),
            },
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_announcement(propagation_source, message_id, message, now),
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                // A newcomer: tell it about us without waiting for the next period.
                tracing::debug!(peer = %peer_id, "peer subscribed to capabilities");
                self.announce_due = true;
                self.maybe_announce(now);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == *self.swarm.local_peer_id() {
                        continue;
                    }
                    tracing::debug!(%peer, %addr, "found on the local network");
                    self.swarm
                        .behaviour_mut()
                        .kademlia
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(from = ?old, to = ?new, "NAT status changed");
                if new == autonat::NatStatus::Private {
                    self.reserve_relays();
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                tracing::info!(relay = %relay_peer_id, "reachable through relay");
            }
            BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, .. }) => {
                tracing::debug!(peer = %src_peer_id, "relaying for peer");
            }
            BehaviourEvent::Dcutr(event) => {
                tracing::debug!(peer = %event.remote_peer_id, result = ?event.result.is_ok(), "hole punch");
            }
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            }) => self.on_query(id, result, step.last),
            BehaviourEvent::Kademlia(kad::Event::RoutingUpdated { peer, .. }) => {
                tracing::trace!(%peer, "DHT routing updated");
            }
            _ => {}
        }
    }

    fn on_announcement(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
        now: Instant,
    ) {
        let acceptance = self.judge(source, &message, now);
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
    }

    /// Checks one announcement, records it, and says whether gossip should forward it.
    fn judge(
        &mut self,
        source: PeerId,
        message: &gossipsub::Message,
        now: Instant,
    ) -> gossipsub::MessageAcceptance {
        if message.topic != self.topic.hash() {
            return gossipsub::MessageAcceptance::Ignore;
        }
        // Strict validation guarantees a signed message from `source`'s key.
        let Some(origin) = message.source else {
            return gossipsub::MessageAcceptance::Reject;
        };
        if origin == *self.swarm.local_peer_id() {
            return gossipsub::MessageAcceptance::Ignore;
        }
        let limit = self.config.max_announcements_per_peer_per_sec;
        let conduct = self.conduct.entry(origin).or_default();
        match conduct.window_start {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                conduct.in_window += 1;
            }
            _ => {
                conduct.window_start = Some(now);
                conduct.in_window = 1;
            }
        }
        if conduct.in_window > limit {
            MeshStats::bump(&self.stats.announcements_rate_limited);
            return gossipsub::MessageAcceptance::Ignore;
        }
        match Capabilities::decode(&message.data) {
            Ok(caps) => {
                MeshStats::bump(&self.stats.announcements_received);
                let models = caps.models.len();
                if self.peers.announced(origin, caps, now) {
                    tracing::debug!(peer = %origin, models, "capabilities announced");
                    self.emit(MeshEvent::Announced(origin));
                    self.dial_if_wanted(origin, now);
                }
                gossipsub::MessageAcceptance::Accept
            }
            Err(e) => {
                MeshStats::bump(&self.stats.announcements_invalid);
                tracing::debug!(peer = %origin, via = %source, error = %e, "dropped announcement");
                let conduct = self.conduct.entry(source).or_default();
                conduct.invalid += 1;
                if conduct.invalid >= self.config.max_invalid_announcements {
                    tracing::warn!(peer = %source, "blocking peer: too many invalid announcements");
                    MeshStats::bump(&self.stats.peers_blocked);
                    self.swarm.behaviour_mut().blocked.block_peer(source);
                    self.peers.remove(&source);
                    self.conduct.remove(&source);
                }
                gossipsub::MessageAcceptance::Reject
            }
        }
    }

    /// Dials a pod learned from gossip when the node has room for more connections.
    fn dial_if_wanted(&mut self, peer: PeerId, now: Instant) {
        if self.swarm.is_connected(&peer)
            || self.swarm.connected_peers().count() >= self.config.target_peers
        {
            return;
        }
        if self
            .dialled
            .get(&peer)
            .is_some_and(|t| now.duration_since(*t) < REDIAL_GAP)
        {
            return;
        }
        self.dialled.insert(peer, now);
        let addrs = self.peers.addrs(&peer);
        if addrs.is_empty() {
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %dial_error_text(&e), "cannot dial announced peer");
        }
    }

    /// Listens through up to two known relays, so peers can reach this node behind NAT.
    fn reserve_relays(&mut self) {
        let wanted = MAX_RELAY_RESERVATIONS.saturating_sub(self.relay_reservations);
        for (peer, addr) in self.relays.iter().take(wanted) {
            let circuit = addr
                .clone()
                .with(Protocol::P2p(*peer))
                .with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => {
                    self.relay_reservations += 1;
                    tracing::info!(relay = %peer, "asking relay for a reservation");
                }
                Err(e) => {
                    tracing::debug!(%circuit, error = %transport_error_text(&e), "relay listen failed");
                }
            }
        }
    }
}

/// The PeerId at the end of a multiaddr.
pub(crate) fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Fails if another process already listens on the address's port. libp2p binds listeners
/// with `SO_REUSEPORT`, so a second pod on the same port would otherwise start and silently
/// share the first one's connections.
fn ensure_port_free(addr: &Multiaddr) -> Result<(), MeshError> {
    let mut ip = None;
    let mut socket = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => socket = Some((port, true)),
            Protocol::Udp(port) if port != 0 => socket = Some((port, false)),
            _ => {}
        }
    }
    let (Some(ip), Some((port, tcp))) = (ip, socket) else {
        return Ok(());
    };
    let at = std::net::SocketAddr::new(ip, port);
    let probe = if tcp {
        std::net::TcpListener::bind(at).map(drop)
    } else {
        std::net::UdpSocket::bind(at).map(drop)
    };
    probe.map_err(|e| MeshError::Listen {
        addr: addr.clone(),
        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "{} port {port} is in use (another pod?); pick another with --p2p-port",
                if tcp { "TCP" } else { "UDP" }
            )
        } else {
            e.to_string()
        },
    })
}

/// The peer's IP address on a connection that reaches it directly, over TCP or QUIC; `None`
/// for relayed connections and other transports.
fn direct_ip(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        // A link-local address needs its interface, which a multiaddr does not carry.
        Protocol::Ip6(ip) if ip.segments()[0] & 0xffc0 != 0xfe80 => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Whether an address is worth handing to others: not a wildcard.
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

fn transport_error_text<E: std::error::Error>(e: &libp2p::TransportError<E>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(a) => {
            format!("address {a} is not supported")
        }
        libp2p::TransportError::Other(e) => e.to_string(),
    }
}

fn dial_error_text(e: &DialError) -> String {
    e.to_string()
}
