//! The per-sequence token pipeline: what each forward pass's logits become. Sampling (with the
//! JSON constraint), log-probabilities, incremental detokenisation, stop strings and tokens,
//! length limits, and the [`GenerateEvent`]s streamed to the caller. The same pipeline replays
//! the tokens of a resumed generation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::admission::Job;
use super::scheduler::{Feed, Progress};
use super::types::{
    EngineStats, FinishReason, GenerateEvent, GenerateRequest, TokenLogprob, Usage,
};
use crate::error::EngineError;
use crate::json::JsonPrefix;
use crate::sampling::{log_softmax, top_logprobs, Sampler};
use crate::stop::{StopMatcher, StopOutcome};
use crate::tokenizer::{DecodeStream, PodTokenizer};

/// Per-sequence state that each generated token advances, apart from the model's KV cache.
pub(super) struct Pipeline {
    sampler: Sampler,
    decoder: DecodeStream,
    stops: StopMatcher,
    json: Option<JsonPrefix>,
    /// Completion tokens so far, resumed ones included.
    pub(super) generated: usize,
    limits: Limits,
}

/// When a completion ends for length.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) prompt_len: usize,
    pub(super) max_tokens: usize,
    pub(super) context_length: usize,
}

/// What one completion token did to the text.
struct Advance {
    /// Text now safe to send (may be empty).
    text: String,
    /// Set when this token ended the completion.
    finish: Option<FinishReason>,
}

impl Pipeline {
    pub(super) fn new(
        tokenizer: &Arc<PodTokenizer>,
        req: &GenerateRequest,
        prompt: &[u32],
        limits: Limits,
    ) -> Self {
        Self {
            sampler: Sampler::new(req.sampling.clone(), prompt),
            decoder: tokenizer.stream(),
            stops: StopMatcher::new(&req.stop),
            json: req.json.then(JsonPrefix::default),
            generated: 0,
            limits,
        }
    }

    /// Takes a chosen completion token (the sampler and the JSON state already advanced past
    /// it) through detokenisation, stop matching and the limits.
    fn push(&mut self, tokenizer: &PodTokenizer, token: u32) -> Result<Advance, EngineError> {
        self.generated += 1;
        if tokenizer.is_stop_token(token) {
            return Ok(Advance {
                text: self.stops.finish(),
                finish: Some(FinishReason::Stop),
            });
        }
        let piece = self
            .decoder
            .push(token)
            .map_err(EngineError::Internal)?
            .unwrap_or_default();
        let mut text = match self.stops.push(&piece) {
            StopOutcome::Stopped(text) => {
                return Ok(Advance {
                    text,
                    finish: Some(FinishReason::Stop),
                })
            }
            StopOutcome::Continue(text) => text,
        };
        let finish = if self.json.as_ref().is_some_and(JsonPrefix::is_complete) {
            Some(FinishReason::Stop)
        } else {
            let l = self.limits;
            let at_context_end = l.prompt_len + self.generated >= l.context_length;
            (self.generated >= l.max_tokens || at_context_end).then_some(FinishReason::Length)
        };
        if finish.is_some() {
            text.push_str(&self.stops.finish());
        }
        Ok(Advance { text, finish })
    }

    /// Replays already generated completion tokens, as if this pipeline had produced them.
    /// Returns the text they yield and, when the completion ended within them, why; tokens
    /// after that point are left out (`generated` says how many were taken).
    pub(super) fn replay(
        &mut self,
        tokenizer: &PodTokenizer,
        tokens: &[u32],
    ) -> Result<(String, Option<FinishReason>), EngineError> {
        let mut text = String::new();
        for (i, &token) in tokens.iter().enumerate() {
            if let Some(state) = self.json.take() {
                self.json = Some(json_step(tokenizer, &state, token).ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "`resume.tokens`: token {i} (id {token}) cannot continue the JSON output"
                    ))
                })?);
            }
            self.sampler.replay(token);
            let advance = self.push(tokenizer, token)?;
            text.push_str(&advance.text);
            if advance.finish.is_some() {
                return Ok((text, advance.finish));
            }
        }
        Ok((text, None))
    }
}

/// The JSON state after `token`, or `None` when JSON-constrained sampling may not pick it.
fn json_step(tokenizer: &PodTokenizer, state: &JsonPrefix, token: u32) -> Option<JsonPrefix> {
    if tokenizer.is_stop_token(token) {
        return None;
    }
    let piece = tokenizer.token_piece(token);
    if piece.is_empty() || piece.contains('\u{FFFD}') {
        return None;
    }
    state.advance(&piece)
}

/// A sequence being generated: its request, its cache and how far it got.
pub(super) struct Running<C> {
    pub(super) job: Box<Job>,
    /// Its attention cache.
    pub(super) cache: C,
    /// Tokens of the job's context fed so far.
    pub(super) fed: usize,
    next_input: Option<u32>,
    /// Every token fed to `cache`, in order: what the prefix cache keys it by.
    pub(super) history: Vec<u32>,
    /// Tokens of the context taken from the prefix cache.
    cached: usize,
    /// Bytes of KV cache this sequence may come to hold (its job's `max_len` tokens), counted
    /// against the engine's KV memory budget while it runs.
    pub(super) kv_reserved: usize,
    pending_tokens: Vec<u32>,
    pending_logprobs: Vec<TokenLogprob>,
}

/// Whether a sequence goes on after a step.
pub(super) enum Step {
    /// It runs again next step.
    Continue,
    /// Its completion ended and [`GenerateEvent::Done`] was sent.
    Finished,
}

impl<C> Running<C> {
    /// Starts `job` on `cache`, whose first `cached` context tokens came from the prefix cache.
    pub(super) fn new(job: Box<Job>, cache: C, cached: usize) -> Self {
        Self {
            history: job.context[..cached].to_vec(),
            job,
            cache,
            fed: cached,
            next_input: None,
            cached,
            kv_reserved: 0,
            pending_tokens: Vec::new(),
            pending_logprobs: Vec::new(),
        }
    }

    /// Where the sequence stands, for the scheduler.
    pub(super) fn progress(&self) -> Progress {
        Progress {
            fed: self.fed,
            context_len: self.job.context.len(),
            prompt_len: self.job.prompt_len,
        }
    }

    /// The tokens the scheduler's `feed` stands for.
    pub(super) fn tokens(&self, feed: Feed) -> Result<Vec<u32>, EngineError> {
        match feed {
            Feed::Context(range) => self
                .job
                .context
                .get(range)
                .map(<[u32]>::to_vec)
                .ok_or_else(|| EngineError::Internal("context range out of bounds".into())),
            Feed::Sampled => self
                .next_input
                .map(|t| vec![t])
                .ok_or_else(|| EngineError::Internal("sequence has no next token".into())),
        }
    }

    /// What follows a forward pass of this sequence that fed `fed_now` tokens: more prompt to come,
    /// or sample, detokenise and stream the next token.
    pub(super) fn advance(
        &mut self,
        fed_now: usize,
        mut logits: Vec<f32>,
        stats: &EngineStats,
    ) -> Result<Step, EngineError> {
        let a = self;
        if a.fed < a.job.context.len() {
            a.fed += fed_now;
            stats
                .prompt_tokens
                .fetch_add(fed_now as u64, Ordering::Relaxed);
            if a.fed < a.job.context.len() {
                return Ok(Step::Continue);
            }
        }

        let logprob_info = a.job.logprobs.map(|k| (log_softmax(&logits), k));
        let tokenizer: &PodTokenizer = &a.job.tokenizer;
        let state = &mut a.job.state;
        let token = match state.json.take() {
            None => state.sampler.sample(&mut logits),
            Some(json) => {
                let mut next_json = None;
                let token = state.sampler.sample_constrained(&mut logits, |t| {
                    next_json = json_step(tokenizer, &json, t);
                    next_json.is_some()
                });
                let Some(token) = token else {
                    return Err(EngineError::Internal(
                        "no token can continue the JSON output".into(),
                    ));
                };
                state.json = next_json;
                token
            }
        };
        state.sampler.accept(token);
        stats.completion_tokens.fetch_add(1, Ordering::Relaxed);

        if !tokenizer.is_stop_token(token) {
            a.pending_tokens.push(token);
            if let Some((lp, k)) = logprob_info {
                a.pending_logprobs.push(TokenLogprob {
                    id: token,
                    text: tokenizer.token_piece(token),
                    logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
                    top: top_logprobs(&lp, k)
                        .into_iter()
                        .map(|(id, l)| (id, tokenizer.token_piece(id), l))
                        .collect(),
                });
            }
        }
        let Advance { text, finish } = a.job.state.push(tokenizer, token)?;
        if let Some(finish_reason) = finish {
            flush(a, text);
            let usage = Usage {
                prompt_tokens: a.job.prompt_len,
                completion_tokens: a.job.state.generated,
                cached_tokens: a.cached.min(a.job.prompt_len),
            };
            send_done(a, finish_reason, usage);
            return Ok(Step::Finished);
        }
        if !text.is_empty() {
            flush(a, text);
        }
        a.next_input = Some(token);
        Ok(Step::Continue)
    }
}

fn flush<C>(a: &mut Running<C>, text: String) {
    if text.is_empty() && a.pending_tokens.is_empty() {
        return;
    }
    let delta = GenerateEvent::Delta {
        text,
        tokens: std::mem::take(&mut a.pending_tokens),
        logprobs: std::mem::take(&mut a.pending_logprobs),
    };
    // The engine steps a sequence only with room for a step's events (see `step_all`).
    let _ = a.job.events.try_send(delta);
}

fn send_done<C>(a: &Running<C>, finish_reason: FinishReason, usage: Usage) {
    let _ = a.job.events.try_send(GenerateEvent::Done {
        finish_reason,
        usage,
    });
}
