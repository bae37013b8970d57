//! The task that owns the swarm: it answers [`Client`](super::Client) commands, keeps the peer
//! table, and publishes and checks capability announcements.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    autonat, dcutr, gossipsub, identify, kad, mdns, ping, relay, upnp, Multiaddr, PeerId, Swarm,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::addresses::{
    dial_error_text, direct_ip, ensure_port_free, is_dialable, is_usable_from, peer_id_of,
    transport_error_text,
};
use super::behaviour::{agent_version, Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::capability::{Capabilities, CAPABILITY_TOPIC, MAX_ADDRS};
use super::peers::PeerTable;
use super::{Command, MeshConfig, MeshError, MeshEvent, MeshStats, NodeInfo};
use gossip::PeerConduct;

mod gossip;
mod nat;

/// The relay v2 hop protocol: peers that speak it can relay for us.
const RELAY_HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// How often the loop checks timers (expiry, re-announcement).
const TICK: Duration = Duration::from_millis(250);

/// Relays to reserve a slot with when AutoNAT finds the node unreachable.
const MAX_RELAY_RESERVATIONS: usize = 2;

/// Relays known at once (connected peers that offer to relay); only two are used, the others
/// stand by.
const MAX_KNOWN_RELAYS: usize = 16;

/// How long to wait before asking relays again after a reservation failed or was lost.
const RESERVE_RETRY: Duration = Duration::from_secs(10);

/// Why a private mesh leaves QUIC addresses alone.
const QUIC_IN_PRIVATE_MESH: &str =
    "a private mesh (--mesh-key) runs over TCP only: QUIC cannot carry its key";

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
    /// Gossip-learned pods dialled lately: when, and at which of their addresses.
    dialled: HashMap<PeerId, (Instant, Vec<Multiaddr>)>,
    /// Addresses of gossip-learned pods that may still be dialled this tick.
    dial_budget: usize,
    /// Connected peers that offer to relay (they speak the hop protocol), at the address to
    /// reach them; at most [`MAX_KNOWN_RELAYS`], and forgotten when their last connection
    /// closes.
    relays: Vec<(PeerId, Multiaddr)>,
    /// Relay listeners asked for, by relay.
    reservations: HashMap<PeerId, ListenerId>,
    /// Relays that accepted a reservation: peers reach this node through them.
    reserved: BTreeSet<PeerId>,
    /// No new reservation is asked for before this.
    reserve_after: Instant,
    /// Addresses this node dialled and is connected at, by peer: the address that is known
    /// to work, preferred when the peer is used as a relay.
    dialled_at: HashMap<PeerId, Multiaddr>,
    /// Open relayed connections, by peer: closed once a hole punch gives a direct one.
    relayed: HashMap<ConnectionId, PeerId>,
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
            dial_budget: gossip::DIAL_ADDRS_PER_TICK,
            relays: Vec::new(),
            reservations: HashMap::new(),
            reserved: BTreeSet::new(),
            reserve_after: Instant::now(),
            dialled_at: HashMap::new(),
            relayed: HashMap::new(),
            pending_provide: HashMap::new(),
            pending_providers: HashMap::new(),
            direct: HashMap::new(),
        }
    }

    /// Binds the listen addresses, subscribes to the capability topic and dials the bootstrap
    /// peers.
    pub(super) fn start(&mut self) -> Result<(), MeshError> {
        let private = self.config.mesh_key.is_some();
        for addr in self.config.listen.clone() {
            if private && super::is_quic(&addr) {
                return Err(MeshError::Listen {
                    addr,
                    reason: QUIC_IN_PRIVATE_MESH.into(),
                });
            }
            ensure_port_free(&addr)?;
            self.swarm
                .listen_on(addr.clone())
                .map_err(|e| MeshError::Listen {
                    addr,
                    reason: transport_error_text(&e),
                })?;
        }
        for addr in self.config.listen_optional.clone() {
            if private && super::is_quic(&addr) {
                continue;
            }
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
            if private && super::is_quic(&addr) {
                tracing::warn!(%addr, "{QUIC_IN_PRIVATE_MESH}: bootstrap address not dialled");
                continue;
            }
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

    /// Whether this node's transports can reach `addr`: not QUIC in a private mesh.
    pub(super) fn can_dial(&self, addr: &Multiaddr) -> bool {
        self.config.mesh_key.is_none() || !super::is_quic(addr)
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
            relays: self.reserved.iter().copied().collect(),
            known_relays: self.relays.len(),
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
        self.dial_budget = gossip::DIAL_ADDRS_PER_TICK;
        self.prune_gossip_state(now);
        if self.is_private() && now >= self.reserve_after {
            self.reserve_relays(now);
        }
        let periodic = self
            .last_announced
            .is_none_or(|t| now.duration_since(t) >= self.config.announce_interval);
        if periodic {
            self.announce_due = true;
        }
        self.maybe_announce(now);
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
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.announce_due = true;
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::debug!(%address, "listen address expired");
                self.announce_due = true;
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.on_listener_closed(listener_id, reason, now),
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
                    if endpoint.is_dialer() {
                        self.dialled_at.insert(peer_id, addr.clone());
                    }
                } else if endpoint.is_relayed() {
                    self.relayed.insert(connection_id, peer_id);
                }
                // The listening end of a relayed connection knows the peer by its id alone, and
                // a circuit address is only as good as the relay's reservation: those are known
                // from the peer's own lists, which drop them when the reservation goes.
                let named = addr.iter().any(|p| !matches!(p, Protocol::P2p(_)));
                self.peers.connected(
                    peer_id,
                    (named && !endpoint.is_relayed()).then(|| addr.clone()),
                    endpoint.is_relayed(),
                    now,
                );
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
                endpoint,
                ..
            } => {
                self.direct.remove(&connection_id);
                self.relayed.remove(&connection_id);
                self.peers.disconnected(peer_id, endpoint.is_relayed(), now);
                if num_established == 0 {
                    self.dialled_at.remove(&peer_id);
                    // Only connected relays are asked for reservations; one that comes back
                    // is found again by identify.
                    self.relays.retain(|(p, _)| *p != peer_id);
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
                // Loopback addresses name the peer only to a pod on its own host.
                let same_host = self
                    .direct
                    .values()
                    .any(|(p, ip)| *p == peer_id && ip.is_loopback());
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| is_dialable(a) && is_usable_from(a, same_host) && self.can_dial(a))
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
                    // The address this node reached the relay at is known to work.
                    let at = self
                        .dialled_at
                        .get(&peer_id)
                        .or_else(|| addrs.iter().find(|a| direct_ip(a).is_some()))
                        .cloned();
                    if let Some(a) = at {
                        if self.relays.len() < MAX_KNOWN_RELAYS
                            && !self.relays.iter().any(|(p, _)| *p == peer_id)
                        {
                            tracing::debug!(relay = %peer_id, addr = %a, "relay found");
                            self.relays.push((peer_id, a));
                            if self.is_private() {
                                self.reserve_relays(now);
                            }
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
                    if peer == *self.swarm.local_peer_id() || !self.can_dial(&addr) {
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
                // Behind NAT the node cannot answer DHT queries from peers that are not
                // already connected: it asks, it does not serve.
                let mode = if new == autonat::NatStatus::Private {
                    kad::Mode::Client
                } else {
                    kad::Mode::Server
                };
                self.swarm.behaviour_mut().kademlia.set_mode(Some(mode));
                if new == autonat::NatStatus::Private {
                    self.reserve_relays(now);
                }
                self.announce_due = true;
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "reachable through relay");
                }
                self.reserved.insert(relay_peer_id);
                self.announce_due = true;
            }
            BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, .. }) => {
                tracing::debug!(peer = %src_peer_id, "relaying for peer");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => self.on_hole_punch(remote_peer_id, result, now),
            BehaviourEvent::Kademlia(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            }) => self.on_query(id, result, step.last),
            BehaviourEvent::Upnp(event) => match event {
                upnp::Event::NewExternalAddr { external_addr, .. } => {
                    tracing::info!(address = %external_addr, "the router forwards the mesh port (UPnP)");
                }
                upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                    tracing::info!(address = %external_addr, "UPnP port mapping expired");
                }
                upnp::Event::GatewayNotFound => {
                    tracing::debug!("no UPnP gateway on the local network");
                }
                upnp::Event::NonRoutableGateway => {
                    tracing::debug!("the UPnP gateway is itself behind NAT; no port mapping");
                }
            },
            BehaviourEvent::Kademlia(kad::Event::RoutingUpdated { peer, .. }) => {
                tracing::trace!(%peer, "DHT routing updated");
            }
            _ => {}
        }
    }
}
