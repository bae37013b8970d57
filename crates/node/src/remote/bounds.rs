//! What a requester accepts from the peer serving its completion: no more tokens than the
//! request allows, no more text than those tokens can hold, and tokens coming at all. A peer
//! that breaks these is treated as failed, so a malicious provider costs the requester a
//! bounded amount of memory and time before the answer moves to another peer.

use std::time::Duration;

use pod_inference::GenerateRequest;
use tokio::time::Instant;

use super::Frame;

/// Tokens a completion with no `max_tokens` may run to: past the longest context of any
/// model a pod serves, which is what really ends such a completion.
pub const MAX_TOKENS_UNSET: usize = 1 << 17;

/// Average bytes of text per token a peer may send. Real tokens average four or five bytes;
/// the bound is over the whole answer, so a few long tokens never reach it.
pub const BYTES_PER_TOKEN: usize = 64;

/// Text a peer may send beyond [`BYTES_PER_TOKEN`] per token, for text held back and
/// released late (stop strings, incomplete UTF-8).
pub const TEXT_SLACK_BYTES: usize = 4096;

/// Longest text of one token or alternative in a log-probability entry.
pub const MAX_TOKEN_TEXT_BYTES: usize = 256;

/// How a serving peer broke the bounds of its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// It sent more tokens than the request allows.
    #[error("sent {sent} tokens for a request of at most {max}")]
    TooManyTokens {
        /// Tokens the answer would hold, resumed ones included.
        sent: usize,
        /// What the request allows.
        max: usize,
    },
    /// It sent more text than its tokens can hold.
    #[error("sent {bytes} bytes of text for {tokens} tokens")]
    TooMuchText {
        /// Bytes of text the answer would hold.
        bytes: usize,
        /// Tokens of the answer.
        tokens: usize,
    },
    /// Its log-probabilities were not asked for, outnumber the tokens, or are oversized.
    #[error("sent log-probabilities the request did not ask for")]
    Logprobs,
    /// It sent frames with no new token for too long.
    #[error("sent no token for {0:?}")]
    NoTokens(Duration),
    /// It sent more frames with no new token than its heartbeat rate explains.
    #[error("sent {0} frames with no new token")]
    IdleFrames(u32),
}

/// The bounds of one completion's answer, across the peers that serve it in turn.
#[derive(Debug)]
pub struct AnswerBounds {
    max_tokens: usize,
    top_logprobs: Option<usize>,
    tokens: usize,
    text_bytes: usize,
    token_timeout: Duration,
    max_idle_frames: u32,
    idle_frames: u32,
    last_token: Instant,
}

impl AnswerBounds {
    /// The bounds of `request`'s answer (its resumed tokens and text already count); a peer
    /// must send a token at least every `token_timeout`.
    pub fn new(request: &GenerateRequest, token_timeout: Duration) -> Self {
        let (tokens, text_bytes) = request
            .resume
            .as_ref()
            .map_or((0, 0), |r| (r.tokens.len(), r.emitted_bytes));
        // An honest peer heartbeats once a second while it has no token to send.
        let secs = u32::try_from(token_timeout.as_secs()).unwrap_or(u32::MAX);
        Self {
            max_tokens: request.max_tokens.unwrap_or(MAX_TOKENS_UNSET),
            top_logprobs: request.logprobs,
            tokens,
            text_bytes,
            token_timeout,
            max_idle_frames: secs.saturating_mul(2).saturating_add(16),
            idle_frames: 0,
            last_token: Instant::now(),
        }
    }

    /// A new peer takes over the answer at `now`: its wait for a first token starts.
    pub fn restart(&mut self, now: Instant) {
        self.last_token = now;
        self.idle_frames = 0;
    }

    /// How long the peer has left to send a token.
    pub fn time_left(&self, now: Instant) -> Duration {
        self.token_timeout
            .saturating_sub(now.saturating_duration_since(self.last_token))
    }

    /// Counts `frame`, received at `now`, or says how it breaks the bounds (then nothing of
    /// it is counted, and it must not be passed on).
    pub fn admit(&mut self, frame: &Frame, now: Instant) -> Result<(), Broken> {
        let new_tokens = match frame {
            Frame::Delta {
                text,
                tokens,
                logprobs,
            } => {
                let sent = self.tokens + tokens.len();
                if sent > self.max_tokens {
                    return Err(Broken::TooManyTokens {
                        sent,
                        max: self.max_tokens,
                    });
                }
                let bytes = self.text_bytes + text.len();
                if bytes > sent * BYTES_PER_TOKEN + TEXT_SLACK_BYTES {
                    return Err(Broken::TooMuchText {
                        bytes,
                        tokens: sent,
                    });
                }
                let top = self.top_logprobs.unwrap_or(0);
                let logprobs_fit = logprobs.is_empty()
                    || (self.top_logprobs.is_some()
                        && logprobs.len() <= tokens.len()
                        && logprobs.iter().all(|l| {
                            l.text.len() <= MAX_TOKEN_TEXT_BYTES
                                && l.top.len() <= top
                                && l.top.iter().all(|t| t.1.len() <= MAX_TOKEN_TEXT_BYTES)
                        }));
                if !logprobs_fit {
                    return Err(Broken::Logprobs);
                }
                self.tokens = sent;
                self.text_bytes = bytes;
                tokens.len()
            }
            Frame::Accepted | Frame::Stages { .. } | Frame::Heartbeat | Frame::Progress { .. } => 0,
            // The last frame: nothing follows to bound.
            Frame::Done { .. } | Frame::Embeddings { .. } | Frame::Error(_) => return Ok(()),
        };
        if new_tokens > 0 {
            self.restart(now);
            return Ok(());
        }
        if now.saturating_duration_since(self.last_token) > self.token_timeout {
            return Err(Broken::NoTokens(self.token_timeout));
        }
        self.idle_frames += 1;
        if self.idle_frames > self.max_idle_frames {
            return Err(Broken::IdleFrames(self.idle_frames));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pod_inference::{Prompt, Resume, TokenLogprob};

    fn request(max_tokens: Option<usize>) -> GenerateRequest {
        GenerateRequest {
            max_tokens,
            ..GenerateRequest::new("m", Prompt::Text("hi".into()))
        }
    }

    fn delta(text: &str, tokens: usize) -> Frame {
        Frame::Delta {
            text: text.into(),
            tokens: vec![7; tokens],
            logprobs: vec![],
        }
    }

    #[test]
    fn tokens_count_resumed_ones_against_max_tokens() {
        let now = Instant::now();
        let mut req = request(Some(10));
        req.resume = Some(Resume {
            tokens: vec![1; 6],
            emitted_bytes: 20,
        });
        let mut b = AnswerBounds::new(&req, Duration::from_secs(60));
        assert_eq!(b.admit(&delta("abc", 3), now), Ok(()));
        assert_eq!(
            b.admit(&delta("ab", 2), now),
            Err(Broken::TooManyTokens { sent: 11, max: 10 })
        );
        // The refused delta counted for nothing: the last allowed token still fits.
        assert_eq!(b.admit(&delta("a", 1), now), Ok(()));
    }

    #[test]
    fn unset_max_tokens_is_still_bounded() {
        let now = Instant::now();
        let mut b = AnswerBounds::new(&request(None), Duration::from_secs(60));
        assert_eq!(b.admit(&delta("", MAX_TOKENS_UNSET), now), Ok(()));
        assert!(matches!(
            b.admit(&delta("", 1), now),
            Err(Broken::TooManyTokens { .. })
        ));
    }

    #[test]
    fn text_is_bounded_by_the_tokens_over_the_whole_answer() {
        let now = Instant::now();
        let mut b = AnswerBounds::new(&request(Some(100)), Duration::from_secs(60));
        // Held-back text may arrive late, within the slack.
        assert_eq!(
            b.admit(&delta(&"x".repeat(TEXT_SLACK_BYTES), 0), now),
            Ok(())
        );
        assert_eq!(
            b.admit(&delta(&"x".repeat(BYTES_PER_TOKEN), 1), now),
            Ok(())
        );
        assert!(matches!(
            b.admit(&delta("x", 0), now),
            Err(Broken::TooMuchText { .. })
        ));
    }

    #[test]
    fn logprobs_only_as_asked() {
        let now = Instant::now();
        let lp = |top: usize| TokenLogprob {
            id: 7,
            text: "a".into(),
            logprob: -0.1,
            top: vec![(7, "a".into(), -0.1); top],
        };
        let with = |logprobs: Vec<TokenLogprob>, tokens: usize| Frame::Delta {
            text: "a".into(),
            tokens: vec![7; tokens],
            logprobs,
        };
        let mut b = AnswerBounds::new(&request(Some(10)), Duration::from_secs(60));
        assert_eq!(b.admit(&with(vec![lp(0)], 1), now), Err(Broken::Logprobs));
        let mut req = request(Some(10));
        req.logprobs = Some(2);
        let mut b = AnswerBounds::new(&req, Duration::from_secs(60));
        assert_eq!(b.admit(&with(vec![lp(2)], 1), now), Ok(()));
        assert_eq!(b.admit(&with(vec![lp(3)], 1), now), Err(Broken::Logprobs));
        assert_eq!(
            b.admit(&with(vec![lp(1), lp(1)], 1), now),
            Err(Broken::Logprobs)
        );
    }

    #[test]
    fn heartbeats_do_not_stand_in_for_tokens() {
        let start = Instant::now();
        let mut b = AnswerBounds::new(&request(Some(10)), Duration::from_secs(3));
        b.restart(start);
        let mut at = start;
        for _ in 0..3 {
            at += Duration::from_secs(1);
            assert_eq!(b.admit(&Frame::Heartbeat, at), Ok(()));
        }
        assert_eq!(b.time_left(at), Duration::ZERO);
        at += Duration::from_millis(1);
        assert_eq!(
            b.admit(&Frame::Heartbeat, at),
            Err(Broken::NoTokens(Duration::from_secs(3)))
        );
        // A token resets the wait.
        assert_eq!(b.admit(&delta("a", 1), at), Ok(()));
        assert_eq!(b.time_left(at), Duration::from_secs(3));
    }

    #[test]
    fn a_flood_of_heartbeats_is_cut_short() {
        let now = Instant::now();
        let mut b = AnswerBounds::new(&request(Some(10)), Duration::from_secs(3));
        b.restart(now);
        for _ in 0..22 {
            assert_eq!(b.admit(&Frame::Heartbeat, now), Ok(()));
        }
        assert_eq!(b.admit(&Frame::Heartbeat, now), Err(Broken::IdleFrames(23)));
    }
}
