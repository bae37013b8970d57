//! The event loop's side of capability gossip: publishing this node's announcements, judging
//! received ones (signature origin, rate limit per origin, invalid-message strikes), and
//! dialling pods learned from them.

use std::time::{Duration, Instant};

use libp2p::{gossipsub, PeerId};

use super::EventLoop;
use crate::mesh::addresses::{dial_error_text, is_dialable};
use crate::mesh::behaviour::agent_version;
use crate::mesh::capability::{Capabilities, MAX_ADDRS};
use crate::mesh::{MeshEvent, MeshStats};

/// Shortest gap between two announcements of this node.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_millis(250);

/// How long to wait before dialling a gossip-learned pod again.
const REDIAL_GAP: Duration = Duration::from_secs(30);

/// Per-peer counters for rate limiting and misbehaviour.
#[derive(Debug, Default)]
pub(super) struct PeerConduct {
    window_start: Option<Instant>,
    in_window: u32,
    invalid: u32,
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
    pub(super) fn dial_if_wanted(&mut self, peer: PeerId, now: Instant) {
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
}
