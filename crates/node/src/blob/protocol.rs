//! The wire protocol of `/pod/blob/1.0.0`: its requests and replies (JSON frames, see
//! [`crate::wire`]), the raw frames chunks travel in, and the limits both sides hold to.

use std::fs::File;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use super::Manifest;
use crate::wire::write_frame;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/blob/1.0.0");

/// Bytes per chunk.
pub const CHUNK_SIZE: u64 = 1024 * 1024;

/// Most chunks one request may ask for.
pub const MAX_CHUNKS_PER_REQUEST: u32 = 16;

/// Streams a server takes from one peer at once by default: twice what a requester opens
/// (4 streams per provider), so a stream that is closing never gets a new one refused.
pub const MAX_STREAMS_PER_PEER: usize = 8;

/// How long a bulk ticket may wait for its connection.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Bytes in a bulk ticket.
pub const TICKET_LEN: usize = 32;

/// Largest JSON frame (a manifest of a 64 GiB file is about 4.5 MB).
pub(super) const MAX_JSON_FRAME: usize = 8 * 1024 * 1024;

/// A request for file data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobRequest {
    /// The manifest of a file.
    Manifest {
        /// The file's SHA-256.
        sha256: String,
    },
    /// Chunks `first..first + count` of a file.
    Chunks {
        /// The file's SHA-256.
        sha256: String,
        /// First chunk index.
        first: u32,
        /// How many.
        count: u32,
    },
    /// A ticket for a bulk connection (see the module's documentation). Only over the mesh.
    Bulk,
}

/// The answer to a [`BlobRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobReply {
    /// The manifest.
    Manifest(Manifest),
    /// The chunks follow as raw frames.
    Chunks,
    /// A bulk ticket: connect to `port` at this server's IP address and send `ticket`.
    Bulk {
        /// The server's bulk TCP port.
        port: u16,
        /// The ticket, lowercase hex of [`TICKET_LEN`] bytes.
        ticket: String,
    },
    /// Refused.
    Error(String),
}

/// What a server without a bulk port answers a ticket request with.
pub(super) const NO_BULK: &str = "no bulk connections here";

/// How long a reply may take to go out.
pub(super) const REPLY_WAIT: Duration = Duration::from_secs(30);

/// Writes a reply frame, giving up after [`REPLY_WAIT`] (a peer that stops reading).
pub(super) async fn send_frame<W: AsyncWrite + Unpin, T: Serialize>(
    wr: &mut W,
    frame: &T,
) -> Result<(), String> {
    tokio::time::timeout(REPLY_WAIT, write_frame(wr, frame))
        .await
        .map_err(|_| "the peer stopped reading".to_owned())?
        .map_err(|e| e.to_string())
}

pub(super) fn check_hash(sha256: &str) -> Result<(), String> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err("files are named by a lowercase hex SHA-256".into())
    }
}

/// Reads `len` bytes at `offset` into `buf` as a chunk frame: their length (4 bytes, big-endian)
/// then the bytes. `buf` is reused; it is only zeroed where it grows.
pub(super) fn read_frame_at(
    file: &File,
    offset: u64,
    len: u64,
    mut buf: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let header = u32::try_from(len).map_err(std::io::Error::other)?;
    buf.resize(4 + len as usize, 0);
    buf[..4].copy_from_slice(&header.to_be_bytes());
    file.read_exact_at(&mut buf[4..], offset)?;
    Ok(buf)
}

/// Reads one chunk frame into `buf` (reused: only the part that grows is zeroed); its length
/// must be `want`.
pub(super) async fn read_chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut buf: Vec<u8>,
    want: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len != want {
        return Err(std::io::Error::other(format!(
            "chunk of {len} bytes, expected {want}"
        )));
    }
    buf.resize(len, 0);
    rd.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_hashes_name_files() {
        assert!(check_hash(&"a".repeat(64)).is_ok());
        for bad in [
            "../../etc/passwd",
            "",
            &"A".repeat(64),
            &"g".repeat(64),
            &"a".repeat(65),
        ] {
            assert!(check_hash(bad).is_err(), "{bad}");
        }
    }
}
