//! What a completion request goes through before it is queued: its parameters checked, its
//! prompt rendered and tokenized, its length checked against the model's context, and a resumed
//! generation checked and replayed. All of it runs on the caller's thread, so a bad request
//! fails at once and the engine thread only ever sees runnable [`Job`]s.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::handle::ChatFormat;
use super::limits;
use super::pipeline::{Limits, Pipeline};
use super::types::{FinishReason, GenerateEvent, GenerateRequest, Prompt, Resume, EVENT_QUEUE};
use crate::error::EngineError;
use crate::model::ChatModelInfo;
use crate::tokenizer::PodTokenizer;

/// A checked request, ready for the engine thread.
pub(super) struct Job {
    /// Name of the chat model.
    pub(super) model: String,
    /// What to feed before sampling: the prompt (in chunks), then any resumed completion
    /// tokens.
    pub(super) context: Vec<u32>,
    /// How many of `context` are the prompt.
    pub(super) prompt_len: usize,
    /// Most tokens its cache may come to hold: prompt plus `max_tokens`, or the context.
    pub(super) max_len: usize,
    /// Alternatives to list with each token's log-probability (`None`: no logprobs).
    pub(super) logprobs: Option<usize>,
    /// The model's tokenizer, for detokenising and logprob listings.
    pub(super) tokenizer: Arc<PodTokenizer>,
    /// Everything generated tokens advance apart from the attention cache.
    pub(super) state: Pipeline,
    /// Where the events go; closed when the caller gave up.
    pub(super) events: mpsc::Sender<GenerateEvent>,
    /// Since when the caller has left [`EVENT_QUEUE`] events unread (the sequence waits).
    pub(super) full_since: Option<std::time::Instant>,
}

/// A request that passed admission.
pub(super) struct Admitted {
    /// The job, to queue unless `finished`.
    pub(super) job: Job,
    /// The receiving end of `job.events`, for the caller.
    pub(super) events: mpsc::Receiver<GenerateEvent>,
    /// Text of resumed tokens the client does not have yet.
    pub(super) unsent: String,
    /// Set when the resumed tokens already ended the completion: nothing is left to generate.
    pub(super) finished: Option<FinishReason>,
}

/// Checks what needs no model: sampling parameters, `max_tokens`, and the [`limits`] on stops
/// and log-probabilities.
pub(super) fn check_request(req: &GenerateRequest) -> Result<(), EngineError> {
    limits::check_generate(req)?;
    req.sampling
        .validate()
        .map_err(EngineError::InvalidRequest)?;
    if req.max_tokens == Some(0) {
        return Err(EngineError::InvalidRequest(
            "`max_tokens` must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Renders and tokenizes a prompt for the model `format` describes.
pub(super) fn tokenize(format: &ChatFormat, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
    let ids = match prompt {
        Prompt::Chat(messages) => {
            if messages.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "`messages` must not be empty".into(),
                ));
            }
            let text = format
                .template
                .render(messages, true)
                .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))?;
            format
                .tokenizer
                .encode(&text)
                .map_err(EngineError::Internal)?
        }
        Prompt::Text(text) => format
            .tokenizer
            .encode(text)
            .map_err(EngineError::Internal)?,
        Prompt::Tokens(ids) => {
            let vocab = format.info.vocab_size;
            if let Some(bad) = ids.iter().find(|i| **i as usize >= vocab) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary of {vocab} tokens"
                )));
            }
            ids.clone()
        }
    };
    if ids.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    Ok(ids)
}

/// Tokenizes `req` for the model `format` describes, checks it fits the context, and replays
/// its resumed tokens, if any.
pub(super) fn admit(req: GenerateRequest, format: &ChatFormat) -> Result<Admitted, EngineError> {
    let mut context = tokenize(format, &req.prompt)?;
    let prompt_len = context.len();
    let info = &format.info;
    let context_length = info.context_length;
    let requested = req.max_tokens.unwrap_or(0);
    if prompt_len + requested > context_length || prompt_len >= context_length {
        return Err(EngineError::ContextLength {
            prompt_tokens: prompt_len,
            max_tokens: requested,
            context_length,
        });
    }
    let limits = Limits {
        prompt_len,
        max_tokens: req.max_tokens.unwrap_or(context_length - prompt_len),
        context_length,
    };
    let max_len = (prompt_len + limits.max_tokens).min(context_length);
    let mut state = Pipeline::new(&format.tokenizer, &req, &context, limits);
    let mut unsent = String::new();
    let mut finished = None;
    if let Some(resume) = &req.resume {
        check_resume(resume, prompt_len, info)?;
        let (text, finish) = state.replay(&format.tokenizer, &resume.tokens)?;
        let Some(rest) = text.get(resume.emitted_bytes..) else {
            return Err(EngineError::InvalidRequest(
                if resume.emitted_bytes > text.len() {
                    format!(
                        "`resume.emitted_bytes` is {}, but the resumed tokens yield only {} \
                         bytes of text so far",
                        resume.emitted_bytes,
                        text.len()
                    )
                } else {
                    format!(
                        "`resume.emitted_bytes` ({}) falls inside a character of the \
                         resumed text",
                        resume.emitted_bytes
                    )
                },
            ));
        };
        unsent = rest.to_owned();
        finished = finish;
        context.extend_from_slice(&resume.tokens[..state.generated]);
    }
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    Ok(Admitted {
        job: Job {
            model: req.model,
            context,
            prompt_len,
            max_len,
            logprobs: req.logprobs,
            tokenizer: Arc::clone(&format.tokenizer),
            state,
            events: tx,
            full_since: None,
        },
        events: rx,
        unsent,
        finished,
    })
}

/// Checks what can be checked of a resume before replaying it.
fn check_resume(
    resume: &Resume,
    prompt_len: usize,
    info: &ChatModelInfo,
) -> Result<(), EngineError> {
    let vocab = info.vocab_size;
    if let Some((i, bad)) = resume
        .tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(EngineError::InvalidRequest(format!(
            "`resume.tokens`: token {i} has id {bad}, outside the vocabulary of {vocab} tokens"
        )));
    }
    if prompt_len + resume.tokens.len() > info.context_length {
        return Err(EngineError::InvalidRequest(format!(
            "`resume.tokens`: the prompt's {prompt_len} tokens and {} resumed tokens exceed the \
             model's context length of {} tokens",
            resume.tokens.len(),
            info.context_length
        )));
    }
    Ok(())
}
