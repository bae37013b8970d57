//! `/pod/infer/1.0.0`: one pod asks another to run a completion or an embedding.
//!
//! One libp2p stream per request. Every message is a frame: a 4-byte big-endian length, then
//! that many bytes of JSON. The requester sends one [`Request`] and keeps its side open;
//! closing it (or the connection dropping) cancels the work. The server answers with
//! [`Frame`]s: `Accepted` once the request is queued, `Delta`s as tokens are produced,
//! `Heartbeat`s while there is nothing else to say, `Progress` receipts every few tokens, and
//! one final `Done`, `Embeddings` or `Error`. Frames over the size limits end the stream.

pub mod client;
pub mod server;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pod_inference::{EngineError, FinishReason, GenerateRequest, TokenLogprob, Usage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::receipts::SignedReceipt;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/infer/1.0.0");

/// Largest request frame: prompts up to a few MiB.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Largest answer frame (a batch of embeddings is the biggest).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// What a requester asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// A completion; `request.resume` continues one another pod started.
    Generate {
        /// The requester's id for the request (also in the receipt).
        id: String,
        /// The completion.
        request: GenerateRequest,
    },
    /// Sentence embeddings.
    Embed {
        /// The requester's id for the request.
        id: String,
        /// An embedding model the server holds.
        model: String,
        /// Texts to embed.
        input: Vec<String>,
    },
}

impl Request {
    /// The requester's id for the request.
    pub fn id(&self) -> &str {
        match self {
            Request::Generate { id, .. } | Request::Embed { id, .. } => id,
        }
    }
}

/// What a server sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// The request passed the checks and is queued.
    Accepted,
    /// Nothing new, the server is still working (sent at least every second).
    Heartbeat,
    /// New text and tokens.
    Delta {
        /// Text to append.
        text: String,
        /// Token ids generated since the last delta.
        tokens: Vec<u32>,
        /// Their log-probabilities, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// A signed receipt for the work so far (`partial`), kept by the requester in case the
    /// server goes away before `Done`.
    Progress {
        /// The receipt.
        receipt: SignedReceipt,
    },
    /// The completion finished.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts of the whole completion (resumed tokens included).
        usage: Usage,
        /// The server's signed receipt for its work.
        receipt: Option<SignedReceipt>,
    },
    /// Embeddings, one per input in order.
    Embeddings {
        /// The vectors.
        data: Vec<Vec<f32>>,
        /// Tokens read over all inputs.
        prompt_tokens: usize,
        /// The server's signed receipt.
        receipt: Option<SignedReceipt>,
    },
    /// The request failed; the last frame.
    Error(EngineError),
}

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or broke.
    #[error("stream closed: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length is over the limit.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Writes one frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, message: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        let frame = Frame::Delta {
            text: "héllo".into(),
            tokens: vec![1, 2],
            logprobs: vec![],
        };
        write_frame(&mut buf, &frame).await.unwrap();
        write_frame(&mut buf, &Frame::Heartbeat).await.unwrap();
        let mut r = futures::io::Cursor::new(buf.clone());
        assert_eq!(read_frame::<_, Frame>(&mut r, 1024).await.unwrap(), frame);
        assert_eq!(
            read_frame::<_, Frame>(&mut r, 1024).await.unwrap(),
            Frame::Heartbeat
        );
        assert!(matches!(
            read_frame::<_, Frame>(&mut r, 1024).await,
            Err(FrameError::Io(_))
        ));
        let mut r = futures::io::Cursor::new(buf);
        assert!(matches!(
            read_frame::<_, Frame>(&mut r, 4).await,
            Err(FrameError::TooLarge { max: 4, .. })
        ));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{{");
        let mut r = futures::io::Cursor::new(garbage);
        assert!(matches!(
            read_frame::<_, Frame>(&mut r, 1024).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
