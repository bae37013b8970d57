//! Bulk connections (see the module's documentation): the serving side (the TCP listener,
//! tickets, chunks sent with sendfile(2)) and the requesting side (asking for a ticket over the
//! mesh and opening the connection with it).

use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::PeerId;

use super::protocol::{BlobReply, BlobRequest, NO_BULK, PROTOCOL, TICKET_LEN, TICKET_TTL};
use super::server::{Failure, BULK_IDLE};
use super::{BlobServer, Manifest};
use crate::wire::{read_frame, write_frame};

/// Bulk connections that may wait at once for their ticket; more are closed at once.
const MAX_UNTICKETED: usize = 64;

/// Bulk connections from one host that may wait at once for their ticket: an IPv4 address,
/// or an IPv6 /64, which one host or site can fill with addresses at will.
const MAX_UNTICKETED_PER_HOST: usize = 8;

/// How long a bulk connection may take to send its ticket.
const TICKET_WAIT: Duration = Duration::from_secs(2);

/// A bulk ticket not used yet.
#[derive(Debug)]
pub(super) struct Ticket {
    /// The peer it was given to.
    peer: PeerId,
    /// The peer's IPs on its direct mesh connections when it asked: the bulk connection must
    /// come from one of them.
    ips: Vec<IpAddr>,
    /// It holds until then.
    until: Instant,
}

/// What waiting bulk connections are counted by: an IPv4 address, or the /64 of an IPv6 one.
pub(super) fn host_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl BlobServer {
    /// Listens for bulk connections at `addrs` (their IPs; the port of the first, 0 for any
    /// free one, and the port it got for the others) until the process ends; returns the port.
    /// Fails only when the first address cannot be bound; the others are skipped. Tickets are
    /// bound to the IPs `mesh` reaches the asking peer at directly.
    pub async fn listen_bulk(
        self: &Arc<Self>,
        addrs: &[SocketAddr],
        mesh: &crate::mesh::Client,
    ) -> std::io::Result<u16> {
        let Some(first) = addrs.first() else {
            return Err(std::io::Error::other("no address to listen on"));
        };
        // Set before the port is: no ticket is given before it can be bound.
        let _ = self.bulk_mesh.set(mesh.clone());
        let listener = bulk_listener(*first)?;
        let port = listener.local_addr()?.port();
        let mut listeners = vec![listener];
        for addr in &addrs[1..] {
            match bulk_listener(SocketAddr::new(addr.ip(), port)) {
                Ok(l) => listeners.push(l),
                // E.g. no IPv6 on this host.
                Err(e) => {
                    tracing::debug!(ip = %addr.ip(), port, error = %e, "cannot listen for bulk connections")
                }
            }
        }
        self.bulk_port.store(port, Ordering::Relaxed);
        for listener in listeners {
            let server = Arc::clone(self);
            tokio::spawn(async move { server.accept_bulk(listener).await });
        }
        Ok(port)
    }

    /// The bulk TCP port, if this server listens on one.
    pub fn bulk_port(&self) -> Option<u16> {
        Some(self.bulk_port.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Gives `peer` a ticket for one bulk connection, good from the IPs of its direct mesh
    /// connections only: a ticket that leaks (it crosses the network in the clear) is of no
    /// use elsewhere, and a peer cannot send the server's bulk traffic to another host.
    pub(super) async fn ticket(&self, peer: PeerId) -> Result<(u16, [u8; TICKET_LEN]), String> {
        let port = self.bulk_port().ok_or_else(|| NO_BULK.to_owned())?;
        let mesh = self.bulk_mesh.get().ok_or_else(|| NO_BULK.to_owned())?;
        let ips: Vec<IpAddr> = mesh
            .direct_ips(peer)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|ip| ip.to_canonical())
            .collect();
        if ips.is_empty() {
            return Err("no direct connection to bind a bulk ticket to".into());
        }
        let mut tickets = self
            .tickets
            .lock()
            .map_err(|_| "tickets poisoned".to_owned())?;
        let now = Instant::now();
        tickets.retain(|_, t| t.until > now);
        if tickets.values().filter(|t| t.peer == peer).count() >= self.max_streams_per_peer {
            return Err("too many unused bulk tickets".into());
        }
        let ticket: [u8; TICKET_LEN] = rand::random();
        tickets.insert(
            ticket,
            Ticket {
                peer,
                ips,
                until: now + TICKET_TTL,
            },
        );
        Ok((port, ticket))
    }

    /// Takes back a ticket presented from `from`: the peer it was given to, if it is valid
    /// and was given for that address. Used either way.
    fn redeem(&self, ticket: &[u8; TICKET_LEN], from: IpAddr) -> Option<PeerId> {
        let t = self.tickets.lock().ok()?.remove(ticket)?;
        if !t.ips.contains(&from.to_canonical()) {
            tracing::info!(peer = %t.peer, %from, "bulk ticket presented from another address");
            return None;
        }
        (t.until > Instant::now()).then_some(t.peer)
    }

    async fn accept_bulk(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (socket, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a bulk connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !self.await_ticket(from.ip()) {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Chunk frames go out as soon as they are written.
            let _ = socket.set_nodelay(true);
            let server = Arc::clone(&self);
            tokio::spawn(async move { server.bulk_connection(socket, from).await });
        }
    }

    /// Whether a new connection from `ip` may wait for its ticket: only while tickets are out,
    /// and within [`MAX_UNTICKETED`] waiting connections, [`MAX_UNTICKETED_PER_HOST`] per
    /// IPv4 address or IPv6 /64 ([`host_of`]), so no single host can crowd out the others.
    fn await_ticket(&self, ip: IpAddr) -> bool {
        if self.tickets.lock().map_or(true, |t| t.is_empty()) {
            return false;
        }
        let Ok(mut waiting) = self.unticketed.lock() else {
            return false;
        };
        let host = host_of(ip);
        let total: usize = waiting.values().sum();
        let from_host = waiting.entry(host).or_insert(0);
        if total >= MAX_UNTICKETED || *from_host >= MAX_UNTICKETED_PER_HOST {
            if *from_host == 0 {
                waiting.remove(&host);
            }
            return false;
        }
        *from_host += 1;
        true
    }

    /// A bulk connection: its ticket, then requests as on a stream of the peer it names.
    async fn bulk_connection(&self, socket: tokio::net::TcpStream, from: SocketAddr) {
        use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
        let (rd, wr) = socket.into_split();
        let (mut rd, mut wr) = (rd.compat(), wr.compat_write());
        let mut ticket = [0u8; TICKET_LEN];
        let read = tokio::time::timeout(TICKET_WAIT, rd.read_exact(&mut ticket)).await;
        if let Ok(mut waiting) = self.unticketed.lock() {
            let host = host_of(from.ip());
            if let Some(n) = waiting.get_mut(&host) {
                *n -= 1;
                if *n == 0 {
                    waiting.remove(&host);
                }
            }
        }
        let peer = match read {
            Ok(Ok(())) => self.redeem(&ticket, from.ip()),
            _ => None,
        };
        let Some(peer) = peer else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "bulk connection without a valid ticket refused");
            return;
        };
        tracing::debug!(%peer, %from, "bulk connection");
        self.session(peer, &mut rd, &mut wr, true).await;
    }

    /// Sends chunks `first..first + count` of `file` down a bulk connection's socket: the
    /// kernel sends from the page cache, while the blocking pool asks it to read the next chunk
    /// ahead from disk.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_chunks_direct(
        &self,
        socket: &tokio::net::TcpStream,
        peer: PeerId,
        sha256: &str,
        manifest: &Manifest,
        file: &Arc<File>,
        first: u32,
        count: u32,
    ) -> Result<(), Failure> {
        let broken = |e: std::io::Error| Failure::Broken(e.to_string());
        let ahead = |index: u32| {
            let file = Arc::clone(file);
            let len = manifest.chunk_len(index as usize);
            let offset = index as u64 * manifest.chunk_size;
            tokio::task::spawn_blocking(move || {
                use rustix::fs::{fadvise, Advice};
                let _ = fadvise(
                    &*file,
                    offset,
                    std::num::NonZeroU64::new(len),
                    Advice::WillNeed,
                );
            })
        };
        let _ = ahead(first).await;
        for index in first..first + count {
            if index + 1 < first + count {
                drop(ahead(index + 1));
            }
            let len = manifest.chunk_len(index as usize);
            let wait = self.pace(peer, len);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let offset = index as u64 * manifest.chunk_size;
            tokio::time::timeout(BULK_IDLE, send_chunk(socket, file, offset, len))
                .await
                .map_err(|_| Failure::Broken("the peer stopped reading".into()))?
                .map_err(broken)?;
            self.record_sent(peer, sha256, len);
        }
        Ok(())
    }
}

/// A listening socket for bulk connections; an IPv6 one takes IPv6 only, so `::` and `0.0.0.0`
/// can both be bound on one port, as the mesh does.
fn bulk_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        let socket = tokio::net::TcpSocket::new_v6()?;
        rustix::net::sockopt::set_ipv6_v6only(&socket, true)?;
        socket
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Where a server's replies and chunks go.
pub(super) trait ChunkSink: AsyncWrite + Unpin {
    /// The plain TCP socket under this writer, which chunks can be sent down with sendfile(2).
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

impl ChunkSink for futures::io::WriteHalf<libp2p::Stream> {}

impl ChunkSink for tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf> {
    fn socket(&self) -> Option<&tokio::net::TcpStream> {
        Some(self.get_ref().as_ref())
    }
}

/// Sends a chunk frame down a bulk connection's socket: its length, then `len` bytes of `file`
/// at `offset` with sendfile(2), from the page cache to the socket without passing through this
/// process. A chunk not in the page cache is read during the call (the caller has the next one
/// read ahead).
async fn send_chunk(
    socket: &tokio::net::TcpStream,
    file: &File,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let header = u32::try_from(len)
        .map_err(std::io::Error::other)?
        .to_be_bytes();
    let mut written = 0;
    while written < header.len() {
        socket.writable().await?;
        match socket.try_write(&header[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let (mut at, end) = (offset, offset + len);
    while at < end {
        socket.writable().await?;
        let left = (end - at) as usize;
        match socket.try_io(tokio::io::Interest::WRITABLE, || {
            rustix::fs::sendfile(socket, file, Some(&mut at), left).map_err(std::io::Error::from)
        }) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The two halves of a bulk connection.
pub(super) type BulkConnection = (
    tokio_util::compat::Compat<tokio::net::tcp::OwnedReadHalf>,
    tokio_util::compat::Compat<tokio::net::tcp::OwnedWriteHalf>,
);

/// Attempts at a bulk connection per stream before it keeps to mesh streams.
pub(super) const BULK_TRIES: u32 = 3;

/// How long connecting to a bulk port may take: one that cannot be reached is often
/// filtered rather than refused.
const BULK_CONNECT: Duration = Duration::from_secs(2);

/// Why no bulk connection opened.
#[derive(Debug)]
pub(super) struct BulkError {
    /// What went wrong.
    pub(super) why: String,
    /// Trying again cannot help: the provider has no bulk port, or it cannot be reached.
    pub(super) last: bool,
}

impl BulkError {
    fn again(why: impl ToString) -> Self {
        Self {
            why: why.to_string(),
            last: false,
        }
    }

    fn last(why: impl ToString) -> Self {
        Self {
            why: why.to_string(),
            last: true,
        }
    }
}

/// How long a bulk connection may take to open, ticket included.
const BULK_OPEN: Duration = Duration::from_secs(10);

/// Asks `peer` for a bulk ticket over the mesh and opens the connection with it, at the first of
/// `ips` that answers.
pub(super) async fn open_bulk(
    control: &libp2p_stream::Control,
    peer: PeerId,
    ips: &[IpAddr],
) -> Result<BulkConnection, BulkError> {
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    let ask = async {
        let stream = control
            .clone()
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(BulkError::again)?;
        let (mut rd, mut wr) = stream.split();
        write_frame(&mut wr, &BlobRequest::Bulk)
            .await
            .map_err(BulkError::again)?;
        let reply = read_frame::<_, BlobReply>(&mut rd, 4096)
            .await
            .map_err(BulkError::again)?;
        let _ = wr.close().await;
        match reply {
            BlobReply::Bulk { port, ticket } => hex::decode(&ticket)
                .ok()
                .filter(|t| t.len() == TICKET_LEN)
                .map(|t| (port, t))
                .ok_or_else(|| BulkError::last("malformed ticket")),
            BlobReply::Error(e) if e == NO_BULK => Err(BulkError::last(e)),
            // Busy: too many streams or tickets for now.
            BlobReply::Error(e) => Err(BulkError::again(e)),
            _ => Err(BulkError::last("unexpected reply")),
        }
    };
    let (port, ticket) = tokio::time::timeout(BULK_OPEN, ask)
        .await
        .map_err(|_| BulkError::again("no ticket in time"))??;
    let mut why = String::from("no address");
    for ip in ips {
        let connecting = tokio::net::TcpStream::connect((*ip, port));
        match tokio::time::timeout(BULK_CONNECT, connecting).await {
            Ok(Ok(socket)) => {
                let _ = socket.set_nodelay(true);
                let (rd, wr) = socket.into_split();
                let (rd, mut wr) = (rd.compat(), wr.compat_write());
                tokio::time::timeout(BULK_CONNECT, wr.write_all(&ticket))
                    .await
                    .map_err(|_| BulkError::again("ticket not sent in time"))?
                    .map_err(BulkError::again)?;
                return Ok((rd, wr));
            }
            Ok(Err(e)) => why = format!("{ip} port {port}: {e}"),
            Err(_) => why = format!("{ip} port {port}: no answer"),
        }
    }
    Err(BulkError::last(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_connections_are_counted_per_ipv4_address_and_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // One /64: every address of it is the same host.
        assert_eq!(
            host_of(ip("2001:db8:1:2::1")),
            host_of(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_eq!(host_of(ip("2001:db8:1:2:abcd::9")), ip("2001:db8:1:2::"));
        // The next /64 is another.
        assert_ne!(
            host_of(ip("2001:db8:1:2::1")),
            host_of(ip("2001:db8:1:3::1"))
        );
        // IPv4 addresses count alone, also when they arrive mapped into IPv6.
        assert_ne!(host_of(ip("192.0.2.1")), host_of(ip("192.0.2.2")));
        assert_eq!(host_of(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }
}
