//! Limits on what one request may ask of the engine, checked by [`EngineHandle`] for every
//! caller (the HTTP API, peers over `/pod/infer`, the CLI), so no entry point can hand the
//! single engine thread unbounded work.
//!
//! [`EngineHandle`]: super::EngineHandle

use super::types::{EmbedRequest, GenerateRequest};
use crate::error::EngineError;

/// Most stop strings in one completion request, as OpenAI allows: the engine matches every
/// stop against the text after every token.
pub const MAX_STOPS: usize = 4;

/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Most alternatives listed with each token's log-probability, as OpenAI's `top_logprobs`
/// allows: each one costs a detokenised string per generated token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most texts in one embedding request, as OpenAI allows.
pub const MAX_EMBED_INPUTS: usize = 2048;

/// Most bytes of text over all the inputs of one embedding request: tokenizing reads every
/// byte before truncation, so this bounds the work a request brings besides its forward
/// passes (each input is cut to the model's longest input, in tokens).
pub const MAX_EMBED_BYTES: usize = 2 * 1024 * 1024;

/// Checks a completion request's stops and log-probability listing.
pub(super) fn check_generate(req: &GenerateRequest) -> Result<(), EngineError> {
    if req.stop.len() > MAX_STOPS {
        return Err(EngineError::InvalidRequest(format!(
            "`stop` may hold at most {MAX_STOPS} sequences, not {}",
            req.stop.len()
        )));
    }
    if let Some(long) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(EngineError::InvalidRequest(format!(
            "each `stop` sequence may be at most {MAX_STOP_BYTES} bytes long, not {}",
            long.len()
        )));
    }
    if let Some(k) = req.logprobs.filter(|k| *k > MAX_TOP_LOGPROBS) {
        return Err(EngineError::InvalidRequest(format!(
            "`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"
        )));
    }
    Ok(())
}

/// Checks an embedding request's input count and size.
pub(super) fn check_embed(req: &EmbedRequest) -> Result<(), EngineError> {
    if req.input.is_empty() {
        return Err(EngineError::InvalidRequest(
            "`input` must not be empty".into(),
        ));
    }
    if req.input.len() > MAX_EMBED_INPUTS {
        return Err(EngineError::InvalidRequest(format!(
            "at most {MAX_EMBED_INPUTS} inputs per request, not {}",
            req.input.len()
        )));
    }
    let bytes: usize = req.input.iter().map(String::len).sum();
    if bytes > MAX_EMBED_BYTES {
        return Err(EngineError::InvalidRequest(format!(
            "the inputs hold {bytes} bytes of text, over the limit of {MAX_EMBED_BYTES} bytes \
             per request"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Prompt;

    fn generate() -> GenerateRequest {
        GenerateRequest::new("m", Prompt::Tokens(vec![1]))
    }

    fn embed(input: Vec<String>) -> EmbedRequest {
        EmbedRequest {
            model: "m".into(),
            input,
        }
    }

    fn refused(r: Result<(), EngineError>, needle: &str) {
        assert!(
            matches!(&r, Err(EngineError::InvalidRequest(m)) if m.contains(needle)),
            "{r:?}"
        );
    }

    #[test]
    fn stops_are_capped_in_count_and_length() {
        let mut req = generate();
        req.stop = vec!["s".into(); MAX_STOPS];
        assert_eq!(check_generate(&req), Ok(()));
        req.stop.push("s".into());
        refused(check_generate(&req), "at most 4");
        req.stop = vec!["x".repeat(MAX_STOP_BYTES)];
        assert_eq!(check_generate(&req), Ok(()));
        req.stop = vec!["x".repeat(MAX_STOP_BYTES + 1)];
        refused(check_generate(&req), "256 bytes");
    }

    #[test]
    fn logprob_listings_are_capped() {
        let mut req = generate();
        req.logprobs = Some(MAX_TOP_LOGPROBS);
        assert_eq!(check_generate(&req), Ok(()));
        req.logprobs = Some(150_000);
        refused(check_generate(&req), "top_logprobs");
    }

    #[test]
    fn embedding_inputs_are_capped_in_count_and_bytes() {
        assert_eq!(
            check_embed(&embed(vec!["a".into(); MAX_EMBED_INPUTS])),
            Ok(())
        );
        refused(check_embed(&embed(Vec::new())), "empty");
        refused(
            check_embed(&embed(vec!["a".into(); MAX_EMBED_INPUTS + 1])),
            "2048 inputs",
        );
        let half = "x".repeat(MAX_EMBED_BYTES / 2 + 1);
        refused(check_embed(&embed(vec![half.clone(), half])), "bytes");
    }
}
