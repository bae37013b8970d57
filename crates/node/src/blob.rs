//! `/pod/blob/1.0.0`: pods share the model files they hold.
//!
//! A file is named by the SHA-256 of its content and described by a [`Manifest`]: its size and,
//! for every [`CHUNK_SIZE`] chunk, SHA-256's chaining value after that chunk (the last one is
//! the file's SHA-256 itself). A chunk is checked alone by running SHA-256's compression over
//! it from the value before it, so checking every chunk is checking the whole file against its
//! pinned SHA-256, with one pass of hashing. A requester asks a provider for the manifest, then
//! for ranges of chunks, verifies each chunk before writing it, and spreads the ranges over
//! several providers and several streams per provider. A chunk that fails verification is
//! fetched again elsewhere and its provider is dropped after [`MAX_STRIKES`] bad chunks. Every
//! provider's manifest is asked for: when they differ, each is tried in turn, a chunk that
//! fails a manifest its sender did not send counts against the manifest rather than the
//! sender, and the manifest the whole file verifies against strikes the providers of the
//! others. The partial file keeps its name between attempts, so an interrupted download
//! resumes from the chunks that verify.
//!
//! Frames: a 4-byte big-endian length and JSON for requests and replies; chunk data follows a
//! `Chunks` reply as raw length-prefixed frames. Requests name files only by hash, so a peer can
//! never reach a path: the server looks the hash up in its own index of verified store files.
//!
//! Bulk connections: a server may also listen on a plain TCP port (by default the mesh port
//! plus one). A peer asks for a [`BlobRequest::Bulk`] ticket over the mesh, where the peer is
//! authenticated and the stream encrypted; the ticket is 32 random bytes, good for one
//! connection within [`TICKET_TTL`], from one of the IPs of the peer's direct mesh
//! connections. The peer opens a TCP connection to that port at the IP
//! address its mesh connection reaches, sends the ticket, and then makes the same requests
//! as on a mesh stream, one after another, on that connection, counted as one of its streams
//! under the same limits. The data skips Noise and Yamux, which is where most of a pull's CPU
//! went: its integrity does not rest on the transport, since every chunk is checked against
//! the manifest, whose last value is the catalogue's pinned SHA-256. What is lost is only
//! secrecy: an observer of the network sees which public model file is fetched. A pod that
//! wants none of that serves and pulls over the mesh alone (`--no-bulk`).
//!
//! The parts, one per role: [`manifest`](Manifest) (chaining values, saved manifests), the wire
//! `protocol` (requests, replies, chunk frames, limits), the `server` (the serving side and
//! its per-peer limits), `bulk` connections (both sides), `fetch` (the chunk queue and its
//! workers, which reach providers through a chunk source) and `pull` (finding providers and
//! installing what was fetched).

mod bulk;
mod fetch;
mod manifest;
mod protocol;
mod pull;
mod server;

pub use fetch::{fetch, FetchError, FetchReport, PullOptions, MAX_STRIKES};
pub use manifest::Manifest;
pub use protocol::{
    BlobReply, BlobRequest, CHUNK_SIZE, MAX_CHUNKS_PER_REQUEST, MAX_STREAMS_PER_PEER, PROTOCOL,
    TICKET_LEN, TICKET_TTL,
};
pub use pull::{dht_key, providers_of, pull_missing_files, pull_via_mesh, PulledFile};
pub use server::{BlobServer, BlobStats, ServedFile, MAX_PEERS_COUNTED};
