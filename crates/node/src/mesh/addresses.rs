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
