//! `POST /v1/completions` (legacy text completions).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use pod_inference::{GenerateRequest, Prompt, TokenLogprob};
use serde_json::json;

use super::generation::{self, ChunkFormat, CommonParams, FINGERPRINT};
use super::ApiJson;
use crate::error::ApiError;
use crate::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, PromptInput, Usage,
};
use crate::{AppState, Backend};

/// OpenAI's default for this endpoint.
const DEFAULT_MAX_TOKENS: i64 = 16;

fn logprobs_of(prefix: &str, list: Vec<TokenLogprob>) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = prefix.len();
    for t in list {
        out.text_offset.push(offset);
        offset += t.text.len();
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(
            t.top
                .into_iter()
                .map(|(_, text, lp)| (text, lp))
                .collect::<BTreeMap<_, _>>(),
        );
        out.tokens.push(t.text);
    }
    out
}

/// Text completion, whole or streamed.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses(
        (status = 200, body = Completion, description = "The completion, or `text/event-stream` of Completion chunks with `stream: true`"),
        (status = 400, body = crate::openai::ErrorBody),
        (status = 404, body = crate::openai::ErrorBody),
    ))]
pub(crate) async fn completions<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "`model` is required"));
    }
    let prompts: Vec<(Prompt, String)> = match req.prompt.clone() {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(PromptInput::Text(t)) => vec![(Prompt::Text(t.clone()), t)],
        Some(PromptInput::Texts(ts)) if ts.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Some(PromptInput::Texts(ts)) => ts
            .into_iter()
            .map(|t| (Prompt::Text(t.clone()), t))
            .collect(),
        Some(PromptInput::Tokens(ids)) => vec![(Prompt::Tokens(ids), String::new())],
    };
    let plan = generation::plan(
        &CommonParams {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed: req.seed,
            max_tokens: Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            n: req.n,
        },
        state.config.max_choices,
    )?;
    if prompts.len() * plan.n > state.config.max_choices {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "at most {} choices (prompts × n) per request",
                state.config.max_choices
            ),
        ));
    }
    let logprobs = match req.logprobs {
        Some(k) if !(0..=5).contains(&k) => {
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` must be between 0 and 5",
            ))
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    let echo = req.echo.unwrap_or(false);
    let mut requests = Vec::new();
    let mut echoes = Vec::new();
    for (prompt, text) in prompts {
        let mut r = GenerateRequest::new(req.model.clone(), prompt);
        r.sampling = plan.sampling.clone();
        r.max_tokens = plan.max_tokens;
        r.stop = req.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        r.logprobs = logprobs;
        for r in generation::seeded(&r, plan.n) {
            requests.push(r);
            echoes.push(if echo { text.clone() } else { String::new() });
        }
    }
    let generations = generation::start(&state, requests).await?;
    let served_by = generations
        .first()
        .map(|g| g.served_by.clone())
        .unwrap_or_default();
    let id = generation::new_id("cmpl");
    let created = generation::now();
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let format = TextChunks {
            id,
            created,
            model: req.model.clone(),
            echoes,
        };
        return Ok(generation::stream(
            Arc::clone(&state),
            req.model,
            generations,
            format,
            include_usage,
        ));
    }
    let collected = generation::collect_all(&state, &req.model, generations).await?;
    let usage = generation::total_usage(&collected);
    let choices = collected
        .into_iter()
        .zip(echoes)
        .enumerate()
        .map(|(index, (c, prefix))| CompletionChoice {
            logprobs: logprobs.map(|_| logprobs_of(&prefix, c.logprobs)),
            text: format!("{prefix}{}", c.text),
            index,
            finish_reason: Some(c.finish_reason),
        })
        .collect();
    let body = Completion {
        id,
        object: "text_completion".into(),
        created,
        model: req.model,
        system_fingerprint: FINGERPRINT.into(),
        choices,
        usage: Some(usage),
    };
    Ok(generation::with_served_by(
        axum::Json(body).into_response(),
        &served_by,
    ))
}

struct TextChunks {
    id: String,
    created: u64,
    model: String,
    echoes: Vec<String>,
}

impl TextChunks {
    fn chunk(&self, choices: serde_json::Value) -> serde_json::Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        })
    }
}

impl ChunkFormat for TextChunks {
    fn start(&self, index: usize) -> Option<serde_json::Value> {
        let echo = self.echoes.get(index).filter(|e| !e.is_empty())?;
        Some(self.chunk(
            json!([{"text": echo, "index": index, "logprobs": null, "finish_reason": null}]),
        ))
    }

    fn delta(&self, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> serde_json::Value {
        let lp = if logprobs.is_empty() {
            serde_json::Value::Null
        } else {
            json!(logprobs_of("", logprobs))
        };
        self.chunk(json!([{"text": text, "index": index, "logprobs": lp, "finish_reason": null}]))
    }

    fn finish(&self, index: usize, reason: &str) -> serde_json::Value {
        self.chunk(json!([{"text": "", "index": index, "logprobs": null, "finish_reason": reason}]))
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = json!(usage);
        v
    }
}
