//! The event loop's side of NAT traversal: relay reservations while this node is private,
//! their loss, and the outcome of hole punches.

use std::time::Instant;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{autonat, dcutr, Multiaddr, PeerId};

use super::{EventLoop, MAX_RELAY_RESERVATIONS, RESERVE_RETRY};
use crate::mesh::addresses::{peer_id_of, transport_error_text};
use crate::mesh::peers::HolePunch;

impl EventLoop {
    pub(super) fn is_private(&self) -> bool {
        self.swarm.behaviour().autonat.nat_status() == autonat::NatStatus::Private
    }

    /// Listens through up to two known relays, so peers can reach this node behind NAT.
    pub(super) fn reserve_relays(&mut self, now: Instant) {
        let wanted = MAX_RELAY_RESERVATIONS.saturating_sub(self.reservations.len());
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reservations.contains_key(p) && self.swarm.is_connected(p))
            .take(wanted)
            .cloned()
            .collect();
        for (peer, addr) in candidates {
            let mut circuit = addr;
            if peer_id_of(&circuit).is_none() {
                circuit.push(Protocol::P2p(peer));
            }
            circuit.push(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    self.reservations.insert(peer, id);
                    tracing::info!(relay = %peer, "asking relay for a reservation");
                }
                Err(e) => {
                    self.reserve_after = now + RESERVE_RETRY;
                    tracing::debug!(%circuit, error = %transport_error_text(&e), "relay listen failed");
                }
            }
        }
    }

    /// A relay listener closed: the reservation was refused or lost (the relay went away).
    pub(super) fn on_listener_closed(
        &mut self,
        listener: ListenerId,
        reason: Result<(), std::io::Error>,
        now: Instant,
    ) {
        let Some(relay) = self
            .reservations
            .iter()
            .find(|(_, id)| **id == listener)
            .map(|(p, _)| *p)
        else {
            return;
        };
        self.reservations.remove(&relay);
        let was_reserved = self.reserved.remove(&relay);
        self.reserve_after = now + RESERVE_RETRY;
        self.announce_due = true;
        let error = reason.err().map(|e| e.to_string()).unwrap_or_default();
        if was_reserved && self.reserved.is_empty() {
            tracing::warn!(%relay, %error, "relay reservation lost: this node is not reachable from outside until another relay takes it");
        } else {
            tracing::info!(%relay, %error, "relay reservation ended");
        }
    }

    /// A hole punch ended. On success the relayed connections to the peer are closed: the
    /// direct one carries everything from now on, free of the relay's circuit limits.
    pub(super) fn on_hole_punch(
        &mut self,
        peer: PeerId,
        result: Result<ConnectionId, dcutr::Error>,
        now: Instant,
    ) {
        match result {
            Ok(direct) => {
                tracing::info!(%peer, "hole punch succeeded: direct connection");
                self.peers.hole_punched(peer, HolePunch::Succeeded, now);
                let relayed: Vec<ConnectionId> = self
                    .relayed
                    .iter()
                    .filter(|(id, p)| **p == peer && **id != direct)
                    .map(|(id, _)| *id)
                    .collect();
                for id in relayed {
                    self.swarm.close_connection(id);
                }
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "hole punch failed: the peer stays relayed");
                self.peers.hole_punched(peer, HolePunch::Failed, now);
            }
        }
    }
}
