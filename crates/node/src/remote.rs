//! `/pod/infer/1.0.0`: one pod asks another to run a completion or an embedding (remote
//! inference between pods; the inference itself is `pod_inference`'s).
//!
//! One libp2p stream per request. Every message is a frame: a 4-byte big-endian length, then
//! that many bytes of JSON. The requester sends one [`Request`] and keeps its side open;
//! closing it (or the connection dropping) cancels the work. The server answers with
//! [`Frame`]s: `Accepted` once the request is queued, `Delta`s as tokens are produced,
//! `Heartbeat`s while there is nothing else to say, `Progress` receipts every few tokens, and
//! one final `Done`, `Embeddings` or `Error`. Frames over the size limits end the stream, and
//! a requester gives up a peer whose answer breaks the request's [`bounds`].
//! The framing is [`crate::wire`]'s.

pub mod bounds;
pub mod client;
pub mod server;

use libp2p::StreamProtocol;
use pod_inference::{EngineError, FinishReason, GenerateRequest, TokenLogprob, Usage};
use serde::{Deserialize, Serialize};

use crate::receipts::SignedReceipt;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/pod/infer/1.0.0");

/// Largest request frame: prompts up to a few MiB.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Largest answer frame (a batch of embeddings is the biggest).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Largest frame of a completion's answer: a delta holds a few tokens' text and
/// log-probabilities, a receipt a few hundred bytes.
pub const MAX_GENERATE_FRAME_BYTES: usize = 1024 * 1024;

/// Longest request id a peer may send: ids are logged, signed into receipts every few tokens
/// and kept in ledgers.
pub const MAX_ID_BYTES: usize = 128;

/// Longest model name a peer may send.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// The engine's limits on stops and embedding inputs, checked before a peer's request is
/// logged; the engine checks them (and the rest of its limits) again for every caller.
pub use pod_inference::engine::limits::{MAX_EMBED_INPUTS, MAX_STOPS, MAX_STOP_BYTES};

/// A peer's request breaks the limits on its strings; the server refuses it before logging
/// or queueing anything of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestLimitError {
    /// The id is empty, too long, or not printable ASCII.
    #[error("the request id must be 1 to {MAX_ID_BYTES} printable ASCII characters")]
    Id,
    /// The model name is empty, too long, or holds control characters.
    #[error("the model name must be 1 to {MAX_MODEL_NAME_BYTES} bytes with no control characters")]
    ModelName,
    /// Too many stop strings, or one too long.
    #[error("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes each")]
    Stops,
    /// Too many texts to embed.
    #[error("at most {MAX_EMBED_INPUTS} texts to embed")]
    EmbedInputs,
}

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

    /// Checks the strings a peer controls against the limits above.
    pub fn check_limits(&self) -> Result<(), RequestLimitError> {
        let id = self.id();
        if id.is_empty() || id.len() > MAX_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RequestLimitError::Id);
        }
        let model = match self {
            Request::Generate { request, .. } => &request.model,
            Request::Embed { model, .. } => model,
        };
        if model.is_empty()
            || model.len() > MAX_MODEL_NAME_BYTES
            || model.chars().any(char::is_control)
        {
            return Err(RequestLimitError::ModelName);
        }
        match self {
            Request::Generate { request, .. } => {
                if request.stop.len() > MAX_STOPS
                    || request.stop.iter().any(|s| s.len() > MAX_STOP_BYTES)
                {
                    return Err(RequestLimitError::Stops);
                }
            }
            Request::Embed { input, .. } => {
                if input.len() > MAX_EMBED_INPUTS {
                    return Err(RequestLimitError::EmbedInputs);
                }
            }
        }
        Ok(())
    }
}

/// Most stages a head names in [`Frame::Stages`].
pub const MAX_STAGES: usize = 32;

/// What a server sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// The request passed the checks and is queued.
    Accepted,
    /// Sent before [`Frame::Accepted`] by a pipeline head: the pods running the later blocks
    /// of the model for this answer, in order (at most [`MAX_STAGES`]).
    Stages {
        /// Their peer ids.
        peers: Vec<String>,
    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use pod_inference::Prompt;

    fn generate(id: &str, model: &str) -> Request {
        Request::Generate {
            id: id.into(),
            request: GenerateRequest::new(model, Prompt::Text("hi".into())),
        }
    }

    #[test]
    fn peer_strings_are_bounded() {
        assert_eq!(generate("a-uuid-1", "m").check_limits(), Ok(()));
        let long_id = "x".repeat(MAX_ID_BYTES);
        assert_eq!(generate(&long_id, "m").check_limits(), Ok(()));
        let too_long_id = "x".repeat(MAX_ID_BYTES + 1);
        for id in ["", "a b", "a\nb", "é", too_long_id.as_str()] {
            assert_eq!(
                generate(id, "m").check_limits(),
                Err(RequestLimitError::Id),
                "{id:?}"
            );
        }
        let long_model = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
        for model in ["", "a\u{1b}[2J", long_model.as_str()] {
            assert_eq!(
                generate("id", model).check_limits(),
                Err(RequestLimitError::ModelName),
                "{model:?}"
            );
        }
        let Request::Generate { id, mut request } = generate("id", "m") else {
            unreachable!()
        };
        request.stop = vec!["s".repeat(MAX_STOP_BYTES + 1)];
        let r = Request::Generate { id, request };
        assert_eq!(r.check_limits(), Err(RequestLimitError::Stops));
        let embed = Request::Embed {
            id: "id".into(),
            model: "m".into(),
            input: vec![String::new(); MAX_EMBED_INPUTS + 1],
        };
        assert_eq!(embed.check_limits(), Err(RequestLimitError::EmbedInputs));
    }
    use crate::wire::{read_frame, write_frame, FrameError};

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
