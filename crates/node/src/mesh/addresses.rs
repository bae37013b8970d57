//! Multiaddr helpers of the mesh: which addresses are worth announcing or name a direct
//! connection, whose PeerId an address ends in, and one-line texts for transport errors.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::DialError;
use libp2p::{Multiaddr, PeerId};

use super::MeshError;

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
pub(crate) fn ensure_port_free(addr: &Multiaddr) -> Result<(), MeshError> {
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
pub(crate) fn direct_ip(addr: &Multiaddr) -> Option<IpAddr> {
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
pub(crate) fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The address's IP, if it starts with one.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Whether the address is on a loopback interface (127.0.0.0/8, ::1).
fn is_loopback(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

/// Whether the address is link-local (169.254.0.0/16, fe80::/10): it needs an interface,
/// which a multiaddr does not carry, so no peer can use it.
pub(crate) fn is_link_local(addr: &Multiaddr) -> bool {
    match ip_of(addr) {
        Some(IpAddr::V4(ip)) => ip.is_link_local(),
        Some(IpAddr::V6(ip)) => ip.segments()[0] & 0xffc0 == 0xfe80,
        None => false,
    }
}

/// Whether a peer's address may be dialled by this node: never link-local, loopback only
/// when the peer is on this host (it was reached over loopback).
pub(crate) fn is_usable_from(addr: &Multiaddr, same_host: bool) -> bool {
    !is_link_local(addr) && (same_host || !is_loopback(addr))
}

/// The addresses worth announcing to other pods, in order: no wildcards, no link-local, and
/// loopback only from a node that has nothing else (one listening on loopback alone, whose
/// peers are on its host).
pub(crate) fn announceable<'a>(addrs: &[&'a Multiaddr]) -> Vec<&'a Multiaddr> {
    let usable = |a: &&&Multiaddr| is_dialable(a) && !is_link_local(a);
    let loopback_only = addrs.iter().filter(usable).all(|a| is_loopback(a));
    addrs
        .iter()
        .filter(|a| usable(a) && (loopback_only || !is_loopback(a)))
        .copied()
        .collect()
}

pub(crate) fn transport_error_text<E: std::error::Error>(e: &libp2p::TransportError<E>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(a) => {
            format!("address {a} is not supported")
        }
        libp2p::TransportError::Other(e) => e.to_string(),
    }
}

pub(crate) fn dial_error_text(e: &DialError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("valid multiaddr")
    }

    #[test]
    fn announcements_leave_out_loopback_and_link_local_when_there_is_better() {
        let all = [
            addr("/ip4/127.0.0.1/tcp/4001"),
            addr("/ip4/169.254.3.4/tcp/4001"),
            addr("/ip6/fe80::1/tcp/4001"),
            addr("/ip4/0.0.0.0/tcp/4001"),
            addr("/ip4/192.168.1.2/tcp/4001"),
            addr("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp/p2p-circuit"),
        ];
        let all_refs: Vec<&Multiaddr> = all.iter().collect();
        assert_eq!(announceable(&all_refs), vec![&all[4], &all[5]]);

        let loopback_only = [addr("/ip4/127.0.0.1/tcp/4001"), addr("/ip6/::1/tcp/4001")];
        let refs: Vec<&Multiaddr> = loopback_only.iter().collect();
        assert_eq!(announceable(&refs).len(), 2);
    }

    #[test]
    fn loopback_peer_addresses_are_used_only_on_the_same_host() {
        let lo = addr("/ip4/127.0.0.1/tcp/4001");
        let lan = addr("/ip4/192.168.1.2/tcp/4001");
        assert!(is_usable_from(&lo, true));
        assert!(!is_usable_from(&lo, false));
        assert!(is_usable_from(&lan, false));
        assert!(!is_usable_from(&addr("/ip4/169.254.1.1/tcp/1"), true));
    }
}
