//! `/pod/stage/1.0.0`: one model's blocks split over several pods (pipeline stages).
//!
//! The pod holding block 0 (the *head*) serves the model like any other: requests reach it
//! through its API or `/pod/infer`, and its engine tokenizes, batches, samples and streams.
//! Its forward pass runs its own blocks, then sends the hidden states to the pods serving the
//! next blocks, one hop after the other ([`client::MeshDownstream`]); the pod holding the last
//! block returns the logits. Each stage keeps the attention caches of its own blocks for each
//! sequence, keyed by the head's peer id and the sequence id, so a decode step sends one row
//! per sequence.
//!
//! The head keeps the hidden states it sent. When a stage dies or stalls, the head plans a new
//! chain from the stages the mesh announces and replays those states from position 0: every
//! stage computes each row the same way whatever the batch, so the rebuilt caches are the lost
//! ones bit for bit and the answer goes on as if nothing happened.
//!
//! On the wire, one stream per head and stage, with requests answered in order. A request is
//! a JSON frame ([`crate::wire`]) followed, for [`StageRequest::Forward`], by a payload frame:
//! a 4-byte big-endian length, then the hidden states as little-endian f32, row after row.
//! The answer is a JSON [`StageReply`], followed by a payload of hidden states or logits.
//! f32 is sent as is: what a stage computes is bit-identical to the whole model's.

pub mod client;
pub mod coverage;
pub mod placement;
pub mod server;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pod_inference::model::stage::LayerRange;
use serde::{Deserialize, Serialize};

use crate::receipts::SignedReceipt;
use crate::wire::FrameError;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/stage/1.0.0");

/// Largest JSON frame of a request or answer.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most sequences in one request.
pub const MAX_SEQUENCES: usize = 256;

/// Most positions (rows) in one request.
pub const MAX_ROWS: usize = 8192;

/// Largest payload frame: hidden states of [`MAX_ROWS`] rows of a wide model, or the logits
/// of [`MAX_SEQUENCES`] sequences over a large vocabulary.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024 * 1024;

/// What a stage announces to the mesh: which blocks of which model file it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAnnouncement {
    /// The model's name.
    pub model: String,
    /// SHA-256 of the model file: stages of different files never mix.
    pub sha256: String,
    /// The blocks served.
    pub layers: LayerRange,
    /// Blocks of the whole model.
    pub total_layers: usize,
}

/// One sequence's rows in a [`StageRequest::Forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRows {
    /// The sequence (the head's id; a stage keys it by the head's peer id too).
    pub id: u64,
    /// Position of the first row: the stage keeps the first `start` positions of its cache
    /// and feeds the rows after them.
    pub start: usize,
    /// Rows (positions) sent.
    pub count: usize,
    /// A sequence of the same head to copy the cache of, where this one is new to the stage
    /// (a copy the head made, e.g. from its prompt cache): the copy keeps its first `start`
    /// positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<u64>,
}

/// What a head asks of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageRequest {
    /// Run rows through the stage's blocks; a payload of hidden states follows.
    Forward {
        /// SHA-256 of the model file.
        sha256: String,
        /// The blocks the head expects this stage to run.
        layers: LayerRange,
        /// The sequences, in payload order.
        seqs: Vec<SeqRows>,
    },
    /// Free these sequences.
    Release {
        /// Their ids.
        seqs: Vec<u64>,
    },
}

/// A stage's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageReply {
    /// The hidden states after the stage's last block, for every row sent, in order; a
    /// payload follows.
    Hidden,
    /// Each sequence's next-token logits (`vocab` values each), in order; a payload follows.
    Logits {
        /// Values per sequence.
        vocab: usize,
    },
    /// The sequences were freed, with the stage's signed receipt for the work it did for
    /// each one it held.
    Released {
        /// One per sequence freed that the stage held (none where it signs no receipts).
        #[serde(default)]
        receipts: Vec<SignedReceipt>,
    },
    /// The stage does not hold these sequences up to the start asked (it restarted, or
    /// freed them): the head resends them from position 0.
    Missing {
        /// Their ids.
        seqs: Vec<u64>,
    },
    /// The request was refused or failed; the stream stays usable.
    Error {
        /// Why.
        message: String,
    },
}

/// Writes `values` as one payload frame.
pub async fn write_payload<W: AsyncWrite + Unpin>(
    w: &mut W,
    values: &[f32],
) -> std::io::Result<()> {
    let bytes = values.len() * 4;
    let len = u32::try_from(bytes).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + bytes);
    buf.extend_from_slice(&len.to_be_bytes());
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one payload frame that must hold exactly `expected` values (checked before anything
/// is allocated).
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    expected: usize,
) -> Result<Vec<f32>, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    if len != expected * 4 {
        // The bytes are read anyway, so that the stream stays in step.
        let mut rest = r.take(len as u64);
        futures::io::copy(&mut rest, &mut futures::io::sink()).await?;
        return Err(FrameError::Malformed(format!(
            "payload of {len} bytes; {} expected",
            expected * 4
        )));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes).await?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn payloads_round_trip_exactly_and_wrong_sizes_keep_the_stream_in_step() {
        let values = vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38, f32::NAN];
        let mut buf = Vec::new();
        write_payload(&mut buf, &values).await.unwrap();
        write_payload(&mut buf, &[7.0]).await.unwrap();
        let mut r = futures::io::Cursor::new(buf);
        let back = read_payload(&mut r, values.len()).await.unwrap();
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut buf = Vec::new();
        write_payload(&mut buf, &[1.0, 2.0]).await.unwrap();
        write_payload(&mut buf, &[7.0]).await.unwrap();
        let mut r = futures::io::Cursor::new(buf);
        assert!(matches!(
            read_payload(&mut r, 3).await,
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(read_payload(&mut r, 1).await.unwrap(), vec![7.0]);
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut r = futures::io::Cursor::new(huge);
        assert!(matches!(
            read_payload(&mut r, 1).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
