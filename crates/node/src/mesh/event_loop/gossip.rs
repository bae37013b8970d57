//! The event loop's side of capability gossip: publishing this node's announcements, judging
//! received ones (signature origin, rate limits per origin and per relaying peer,
//! invalid-message strikes), and dialling pods learned from them within a budget.

use std::time::{Duration, Instant};

use libp2p::{gossipsub, Multiaddr, PeerId};

use super::EventLoop;
use crate::mesh::addresses::{announceable, dial_error_text};
use crate::mesh::behaviour::agent_version;
use crate::mesh::capability::{Capabilities, MAX_ADDRS};
use crate::mesh::{MeshEvent, MeshStats};

/// Shortest gap between two announcements of this node.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_millis(250);

/// How long to wait before dialling a gossip-learned pod again.
const REDIAL_GAP: Duration = Duration::from_secs(30);

/// A relaying peer may pass on this many times the announcements one origin may send: it
/// forwards every pod's, but an origin key costs nothing to make, so the relay is what bounds
/// a flood under fresh keys.
const RELAY_RATE_FACTOR: u32 = 20;

/// Addresses of gossip-learned pods dialled per tick of the event loop, all pods together:
/// every announcement names addresses of its sender's choosing, and each would otherwise make
/// every pod dial them.
pub(super) const DIAL_ADDRS_PER_TICK: usize = 8;

/// Per-peer counters for rate limiting and misbehaviour.
#[derive(Debug, Default)]
pub(super) struct PeerConduct {
    /// Announcements signed by the peer.
    as_origin: RateWindow,
    /// Announcements the peer relayed (its own included).
    as_source: RateWindow,
    invalid: u32,
}

impl PeerConduct {
    /// Whether the counters still matter at `now`: a strike, or a window not yet over.
    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.invalid > 0 || self.as_origin.is_open(now) || self.as_source.is_open(now)
    }
}

/// Counts events in one-second windows.
#[derive(Debug, Default)]
pub(super) struct RateWindow {
    start: Option<Instant>,
    count: u32,
}

impl RateWindow {
    /// Counts an event at `now`; false when it is over `limit` in its window.
    pub(super) fn admit(&mut self, now: Instant, limit: u32) -> bool {
        match self.start {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                self.count = self.count.saturating_add(1);
            }
            _ => {
                self.start = Some(now);
                self.count = 1;
            }
        }
        self.count <= limit
    }

    fn is_open(&self, now: Instant) -> bool {
        self.start
            .is_some_and(|s| now.duration_since(s) < Duration::from_secs(1))
    }
}

impl EventLoop {
    /// Publishes this node's capabilities if one is due and the last one is not too recent.
    pub(super) fn maybe_announce(&mut self, now: Instant) {
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
        let ours: Vec<&Multiaddr> = self
            .swarm
            .external_addresses()
            .chain(self.swarm.listeners())
            .collect();
        own.addrs = announceable(&ours)
            .into_iter()
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

    pub(super) fn on_announcement(
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
        let relayed_ok = self
            .conduct
            .entry(source)
            .or_default()
            .as_source
            .admit(now, limit.saturating_mul(RELAY_RATE_FACTOR));
        let origin_ok = self
            .conduct
            .entry(origin)
            .or_default()
            .as_origin
            .admit(now, limit);
        if !(relayed_ok && origin_ok) {
            MeshStats::bump(&self.stats.announcements_rate_limited);
            return gossipsub::MessageAcceptance::Ignore;
        }
        match Capabilities::decode(&message.data) {
            Ok(caps) => {
                MeshStats::bump(&self.stats.announcements_received);
                let models = caps.models.len();
                let addrs: Vec<Multiaddr> = caps
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .filter(|a| self.can_dial(a))
                    .collect();
                if self.peers.announced(origin, caps, now) {
                    tracing::debug!(peer = %origin, models, "capabilities announced");
                    // Every dial of the pod (a stream opened to it by id) may use them: its
                    // relayed addresses are known from here alone.
                    for a in addrs {
                        self.swarm.add_peer_address(origin, a);
                    }
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

    /// Forgets the dial times and conduct counters that no longer matter, so that neither map
    /// outgrows the peer table.
    pub(super) fn prune_gossip_state(&mut self, now: Instant) {
        self.dialled
            .retain(|_, (t, _)| now.duration_since(*t) < REDIAL_GAP);
        let peers = &self.peers;
        self.conduct
            .retain(|p, c| peers.contains(p) || c.is_live(now));
    }

    /// Dials a pod learned from gossip when the node has room for more connections and the
    /// tick's dial budget is not spent.
    pub(super) fn dial_if_wanted(&mut self, peer: PeerId, now: Instant) {
        if self.swarm.is_connected(&peer)
            || self.swarm.connected_peers().count() >= self.config.target_peers
        {
            return;
        }
        let addrs: Vec<_> = self
            .peers
            .addrs(&peer)
            .into_iter()
            .filter(|a| self.can_dial(a))
            .collect();
        // A pod that could not be reached is tried again after a while, or at once when it
        // announces new addresses (a relay reservation made after it joined).
        if self
            .dialled
            .get(&peer)
            .is_some_and(|(t, tried)| now.duration_since(*t) < REDIAL_GAP && *tried == addrs)
        {
            return;
        }
        if self.dial_budget == 0 {
            MeshStats::bump(&self.stats.dials_deferred);
            return;
        }
        if addrs.is_empty() {
            return;
        }
        self.dialled.insert(peer, (now, addrs.clone()));
        let addrs: Vec<_> = addrs.into_iter().take(self.dial_budget).collect();
        self.dial_budget -= addrs.len();
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %dial_error_text(&e), "cannot dial announced peer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_window_admits_up_to_its_limit_per_second() {
        let start = Instant::now();
        let mut w = RateWindow::default();
        for _ in 0..5 {
            assert!(w.admit(start, 5));
        }
        assert!(!w.admit(start + Duration::from_millis(999), 5));
        assert!(w.is_open(start + Duration::from_millis(999)));
        assert!(!w.is_open(start + Duration::from_secs(1)));
        assert!(w.admit(start + Duration::from_secs(1), 5));
    }

    #[test]
    fn conduct_outlives_its_window_only_with_strikes() {
        let now = Instant::now();
        let later = now + Duration::from_secs(2);
        let mut c = PeerConduct::default();
        assert!(c.as_source.admit(now, 1));
        assert!(c.is_live(now));
        assert!(!c.is_live(later));
        c.invalid = 1;
        assert!(c.is_live(later));
    }
}
