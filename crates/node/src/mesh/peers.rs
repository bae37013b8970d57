//! The peer table: every peer the node is connected to or has heard announce itself, with its
//! addresses, round-trip time, capabilities and when it was last heard of.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

use super::capability::Capabilities;

/// Most addresses remembered per peer and source; older ones are forgotten first.
const MAX_ADDRS_PER_PEER: usize = 16;

/// A peer's addresses by where they came from. The peer's own lists (identify, its
/// announcements) replace what it said before, so an address it stops listing (a relay
/// reservation that lapsed, a changed port) is forgotten; addresses a connection was seen at
/// are kept, the latest few.
#[derive(Debug, Clone, Default)]
struct Addrs {
    /// The listen addresses of its latest identify.
    listen: BTreeSet<Multiaddr>,
    /// The addresses of its latest capability announcement.
    announced: BTreeSet<Multiaddr>,
    /// Where connections to or from it were seen, oldest first.
    seen: Vec<Multiaddr>,
}

impl Addrs {
    fn replace(set: &mut BTreeSet<Multiaddr>, addrs: impl IntoIterator<Item = Multiaddr>) {
        set.clear();
        // Bounded against a peer that lists ever more addresses.
        set.extend(addrs.into_iter().take(MAX_ADDRS_PER_PEER));
    }

    fn saw(&mut self, addr: Multiaddr) {
        self.seen.retain(|a| *a != addr);
        if self.seen.len() >= MAX_ADDRS_PER_PEER {
            self.seen.remove(0);
        }
        self.seen.push(addr);
    }

    /// Every address, each once, sorted.
    fn all(&self) -> Vec<Multiaddr> {
        let all: BTreeSet<&Multiaddr> = self
            .listen
            .iter()
            .chain(&self.announced)
            .chain(&self.seen)
            .collect();
        all.into_iter().cloned().collect()
    }
}

/// Most peers a [`PeerTable`] holds by default: announcements relayed under ever new keys
/// must not grow it without bound.
pub const MAX_PEERS: usize = 1024;

/// What the node knows about one peer.
#[derive(Debug, Clone)]
struct PeerEntry {
    addrs: Addrs,
    connections: usize,
    /// Of `connections`, those through a relay.
    relayed: usize,
    hole_punch: Option<HolePunch>,
    rtt: Option<Duration>,
    agent: Option<String>,
    capabilities: Option<Capabilities>,
    last_seen: Instant,
    last_seen_wall: SystemTime,
}

impl PeerEntry {
    fn new(now: Instant) -> Self {
        Self {
            addrs: Addrs::default(),
            connections: 0,
            relayed: 0,
            hole_punch: None,
            rtt: None,
            agent: None,
            capabilities: None,
            last_seen: now,
            last_seen_wall: SystemTime::now(),
        }
    }

    fn seen(&mut self, now: Instant) {
        self.last_seen = now;
        self.last_seen_wall = SystemTime::now();
    }
}

/// How the open connections to a peer reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionPath {
    /// At least one connection reaches the peer without a relay.
    Direct,
    /// Every open connection goes through a circuit relay.
    Relayed,
}

/// The outcome of the latest hole punch (DCUtR) with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HolePunch {
    /// A direct connection replaced the relayed one.
    Succeeded,
    /// Every attempt failed; the peer stays reachable through the relay only.
    Failed,
}

/// A peer as `pod peers` and `/pod/v1/peers` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerSnapshot {
    /// The peer's id.
    pub peer_id: PeerId,
    /// Addresses it was seen at or announced.
    pub addrs: Vec<Multiaddr>,
    /// Whether a connection to it is open now.
    pub connected: bool,
    /// Direct or relayed, when connected.
    pub path: Option<ConnectionPath>,
    /// The latest hole punch with it, if one was tried.
    pub hole_punch: Option<HolePunch>,
    /// Latest ping round-trip time.
    pub rtt: Option<Duration>,
    /// Its identify agent version, e.g. `pod/0.1.0`.
    pub agent: Option<String>,
    /// Its latest capability announcement; `None` for peers that are not pods or have not
    /// announced yet.
    pub capabilities: Option<Capabilities>,
    /// How long ago it was last heard of.
    pub last_seen_ago: Duration,
    /// When it was last heard of, in wall-clock time.
    pub last_seen_at: SystemTime,
}

/// Peers by id, with expiry of those gone silent and a bound on how many are held.
#[derive(Debug)]
pub struct PeerTable {
    peers: HashMap<PeerId, PeerEntry>,
    capacity: usize,
}

impl Default for PeerTable {
    fn default() -> Self {
        Self::with_capacity(MAX_PEERS)
    }
}

impl PeerTable {
    /// A table holding at most `capacity` peers with no open connection: a new peer beyond
    /// that replaces the one not connected and heard of longest ago. Connected peers are
    /// always kept (the swarm's connection limits bound them).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            peers: HashMap::new(),
            capacity,
        }
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> &mut PeerEntry {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.capacity {
            let oldest = self
                .peers
                .iter()
                .filter(|(_, e)| e.connections == 0)
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
            }
        }
        self.peers
            .entry(peer)
            .or_insert_with(|| PeerEntry::new(now))
    }

    /// A connection to `peer` opened, at `addr` when it names one; `relayed`: through a
    /// circuit relay.
    pub fn connected(
        &mut self,
        peer: PeerId,
        addr: Option<Multiaddr>,
        relayed: bool,
        now: Instant,
    ) {
        let e = self.entry(peer, now);
        e.connections += 1;
        if relayed {
            e.relayed += 1;
        }
        e.seen(now);
        if let Some(addr) = addr {
            e.addrs.saw(addr);
        }
    }

    /// A connection to `peer` closed; `relayed` as it was opened.
    pub fn disconnected(&mut self, peer: PeerId, relayed: bool, now: Instant) {
        if let Some(e) = self.peers.get_mut(&peer) {
            e.connections = e.connections.saturating_sub(1);
            if relayed {
                e.relayed = e.relayed.saturating_sub(1);
            }
            e.seen(now);
        }
    }

    /// A hole punch with `peer` ended.
    pub fn hole_punched(&mut self, peer: PeerId, outcome: HolePunch, now: Instant) {
        let e = self.entry(peer, now);
        e.hole_punch = Some(outcome);
        e.seen(now);
    }

    /// Identify told us the peer's agent and its listen addresses now.
    pub fn identified(
        &mut self,
        peer: PeerId,
        agent: String,
        addrs: impl IntoIterator<Item = Multiaddr>,
        now: Instant,
    ) {
        let e = self.entry(peer, now);
        e.agent = Some(agent);
        Addrs::replace(&mut e.addrs.listen, addrs);
        e.seen(now);
    }

    /// A ping to the peer came back.
    pub fn pinged(&mut self, peer: PeerId, rtt: Duration, now: Instant) {
        let e = self.entry(peer, now);
        e.rtt = Some(rtt);
        e.seen(now);
    }

    /// The peer announced its capabilities. Returns false (and changes nothing) when the
    /// announcement is older than the one held.
    pub fn announced(&mut self, peer: PeerId, caps: Capabilities, now: Instant) -> bool {
        let e = self.entry(peer, now);
        if e.capabilities.as_ref().is_some_and(|c| c.seq >= caps.seq) {
            // A pod that restarted starts counting again; accept a lower number once the old
            // run has been silent for a while (the entry expires and is recreated).
            return false;
        }
        Addrs::replace(
            &mut e.addrs.announced,
            caps.addrs
                .iter()
                .filter_map(|a| a.parse::<Multiaddr>().ok()),
        );
        e.capabilities = Some(caps);
        e.seen(now);
        true
    }

    /// Forgets peers with no open connection that have not been heard of for `expiry`;
    /// returns them.
    pub fn expire(&mut self, expiry: Duration, now: Instant) -> Vec<PeerId> {
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, e)| e.connections == 0 && now.duration_since(e.last_seen) >= expiry)
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.peers.remove(p);
        }
        gone
    }

    /// Forgets a peer now (it was found to be unreachable or misbehaving).
    pub fn remove(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Whether the peer is known.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Whether a connection to the peer is open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|e| e.connections > 0)
    }

    /// The addresses known for `peer` (none when it is unknown).
    pub fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|e| e.addrs.all())
            .unwrap_or_default()
    }

    /// Every known peer, sorted by id.
    pub fn snapshot(&self, now: Instant) -> Vec<PeerSnapshot> {
        let mut out: Vec<PeerSnapshot> = self
            .peers
            .iter()
            .map(|(id, e)| PeerSnapshot {
                peer_id: *id,
                addrs: e.addrs.all(),
                connected: e.connections > 0,
                path: match (e.connections, e.relayed) {
                    (0, _) => None,
                    (all, relayed) if relayed >= all => Some(ConnectionPath::Relayed),
                    _ => Some(ConnectionPath::Direct),
                },
                hole_punch: e.hole_punch,
                rtt: e.rtt,
                agent: e.agent.clone(),
                capabilities: e.capabilities.clone(),
                last_seen_ago: now.saturating_duration_since(e.last_seen),
                last_seen_at: e.last_seen_wall,
            })
            .collect();
        out.sort_by_key(|p| p.peer_id.to_bytes());
        out
    }

    /// Number of known peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::capability::{HardwareSummary, Load};

    fn caps(seq: u64) -> Capabilities {
        Capabilities {
            agent: "pod/test".into(),
            profile: "inference".into(),
            models: vec![],
            load: Load::default(),
            hardware: HardwareSummary::default(),
            api: None,
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            files: vec![],
            stages: Vec::new(),
            serve_to: Default::default(),
            trusted: vec![],
            seq,
        }
    }

    #[test]
    fn silent_unconnected_peers_expire() {
        let mut t = PeerTable::default();
        let start = Instant::now();
        let a = PeerId::random();
        let b = PeerId::random();
        t.connected(a, None, false, start);
        assert!(t.announced(b, caps(1), start));
        let later = start + Duration::from_secs(10);
        assert_eq!(t.expire(Duration::from_secs(5), later), vec![b]);
        assert!(t.contains(&a), "a connected peer never expires");
        t.disconnected(a, false, later);
        assert!(t.expire(Duration::from_secs(5), later).is_empty());
        assert_eq!(
            t.expire(Duration::from_secs(5), later + Duration::from_secs(5)),
            vec![a]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn older_announcements_are_ignored() {
        let mut t = PeerTable::default();
        let now = Instant::now();
        let p = PeerId::random();
        assert!(t.announced(p, caps(5), now));
        assert!(!t.announced(p, caps(4), now));
        assert!(!t.announced(p, caps(5), now));
        assert!(t.announced(p, caps(6), now));
        let snap = t.snapshot(now);
        assert_eq!(snap[0].capabilities.as_ref().map(|c| c.seq), Some(6));
        assert_eq!(snap[0].addrs.len(), 1);
    }

    #[test]
    fn the_table_evicts_the_oldest_unconnected_peers_beyond_its_capacity() {
        let mut t = PeerTable::with_capacity(4);
        let start = Instant::now();
        let connected = [PeerId::random(), PeerId::random()];
        for p in connected {
            t.connected(p, None, false, start);
        }
        let mut announced = Vec::new();
        for i in 0..100u64 {
            let p = PeerId::random();
            assert!(t.announced(p, caps(1), start + Duration::from_millis(i)));
            announced.push(p);
        }
        assert_eq!(t.len(), 4);
        assert!(
            connected.iter().all(|p| t.contains(p)),
            "connected peers stay"
        );
        assert!(t.contains(&announced[98]) && t.contains(&announced[99]));
        assert!(!t.contains(&announced[97]));

        // Full of connected peers, a new one still gets in (and goes when a slot frees).
        let mut t = PeerTable::with_capacity(2);
        for p in connected {
            t.connected(p, None, false, start);
        }
        let third = PeerId::random();
        t.connected(third, None, false, start);
        assert_eq!(t.len(), 3);
        t.disconnected(third, false, start);
        assert!(t.announced(PeerId::random(), caps(1), start));
        assert_eq!(t.len(), 3);
        assert!(!t.contains(&third));
    }

    #[test]
    fn a_peer_is_relayed_until_a_direct_connection_opens() {
        let mut t = PeerTable::default();
        let now = Instant::now();
        let p = PeerId::random();
        let circuit: Multiaddr = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp/p2p-circuit"
            .parse()
            .expect("valid multiaddr");
        let direct: Multiaddr = "/ip4/10.0.2.2/tcp/4001".parse().expect("valid multiaddr");
        assert_eq!(t.snapshot(now).len(), 0);
        t.connected(p, Some(circuit), true, now);
        assert_eq!(t.snapshot(now)[0].path, Some(ConnectionPath::Relayed));
        t.connected(p, Some(direct), false, now);
        t.hole_punched(p, HolePunch::Succeeded, now);
        let snap = &t.snapshot(now)[0];
        assert_eq!(snap.path, Some(ConnectionPath::Direct));
        assert_eq!(snap.hole_punch, Some(HolePunch::Succeeded));
        t.disconnected(p, false, now);
        assert_eq!(t.snapshot(now)[0].path, Some(ConnectionPath::Relayed));
        t.disconnected(p, true, now);
        assert_eq!(t.snapshot(now)[0].path, None);
    }

    #[test]
    fn addresses_stay_bounded() {
        let mut t = PeerTable::default();
        let now = Instant::now();
        let p = PeerId::random();
        for port in 0..100u16 {
            let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}")
                .parse()
                .expect("valid multiaddr");
            t.connected(p, Some(addr), false, now);
        }
        assert_eq!(t.snapshot(now)[0].addrs.len(), MAX_ADDRS_PER_PEER);
        // The latest connection's address is among those kept.
        let last: Multiaddr = "/ip4/127.0.0.1/tcp/99".parse().expect("valid multiaddr");
        assert!(t.addrs(&p).contains(&last));
        let many = (0..100u16).map(|port| {
            format!("/ip4/10.0.0.1/tcp/{port}")
                .parse::<Multiaddr>()
                .expect("valid multiaddr")
        });
        t.identified(p, "pod/test".into(), many, now);
        assert_eq!(t.addrs(&p).len(), 2 * MAX_ADDRS_PER_PEER);
    }

    /// An address the peer no longer lists (here: a circuit through a relay whose
    /// reservation lapsed) is forgotten; one a connection was seen at stays.
    #[test]
    fn addresses_a_peer_stops_listing_are_forgotten() {
        let mut t = PeerTable::default();
        let now = Instant::now();
        let p = PeerId::random();
        let addr = |s: &str| s.parse::<Multiaddr>().expect("valid multiaddr");
        let dialled = addr("/ip4/10.0.2.2/tcp/4001");
        let old_circuit = addr(&format!(
            "/ip4/10.0.0.1/tcp/4001/p2p/{}/p2p-circuit",
            PeerId::random()
        ));
        let new_circuit = addr(&format!(
            "/ip4/10.0.0.1/tcp/4002/p2p/{}/p2p-circuit",
            PeerId::random()
        ));
        t.connected(p, Some(dialled.clone()), false, now);
        t.identified(
            p,
            "pod/test".into(),
            [old_circuit.clone(), new_circuit.clone()],
            now,
        );
        let mut c = caps(1);
        c.addrs = vec![old_circuit.to_string()];
        assert!(t.announced(p, c, now));
        assert!(t.addrs(&p).contains(&old_circuit));

        t.identified(p, "pod/test".into(), [new_circuit.clone()], now);
        assert!(t.addrs(&p).contains(&old_circuit), "still announced");
        let mut c = caps(2);
        c.addrs = vec![new_circuit.to_string()];
        assert!(t.announced(p, c, now));
        let now_known = t.addrs(&p);
        assert_eq!(now_known.len(), 2, "{now_known:?}");
        assert!(now_known.contains(&dialled) && now_known.contains(&new_circuit));
    }
}
