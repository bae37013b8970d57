//! `POST /v1/completions` (legacy text completions).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use pod_inference::{Prompt, TokenLogprob};
use serde_json::json;

use super::generation::{self, ChunkFormat, Head, FINGERPRINT};
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
        &req.params,
        Some(req.params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
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
        let mut r = plan.request(&req.model, prompt);
        r.logprobs = logprobs;
        for r in generation::seeded(&r, plan.n) {
            requests.push(r);
            echoes.push(if echo { text.clone() } else { String::new() });
        }
    }
    let generations = generation::start(&state, requests).await?;
    let head = Head::new("cmpl", &req.model);
    let streaming = generation::streaming(&req.params);
    let format = TextChunks {
        head: head.clone(),
        echoes: echoes.clone(),
    };
    generation::answer(state, generations, streaming, format, |collected, usage| {
        Completion {
            id: head.id,
            object: "text_completion".into(),
            created: head.created,
            model: head.model,
            system_fingerprint: FINGERPRINT.into(),
            choices: collected
                .into_iter()
                .zip(echoes)
                .enumerate()
                .map(|(index, (c, prefix))| CompletionChoice {
                    logprobs: logprobs.map(|_| logprobs_of(&prefix, c.logprobs)),
                    text: format!("{prefix}{}", c.text),
                    index,
                    finish_reason: Some(c.finish_reason),
                })
                .collect(),
            usage: Some(usage),
        }
    })
    .await
}

/// Text completion stream chunks; choice `i` opens with `echoes[i]` when that is not empty.
struct TextChunks {
    head: Head,
    echoes: Vec<String>,
}

impl TextChunks {
    fn chunk(&self, choices: serde_json::Value, usage: Option<Usage>) -> serde_json::Value {
        self.head.chunk("text_completion", choices, usage)
    }
}

impl ChunkFormat for TextChunks {
    fn head(&self) -> &Head {
        &self.head
    }

    fn start(&self, index: usize) -> Option<serde_json::Value> {
        let echo = self.echoes.get(index).filter(|e| !e.is_empty())?;
        Some(self.chunk(
            json!([{"text": echo, "index": index, "logprobs": null, "finish_reason": null}]),
            None,
        ))
    }

    fn delta(&self, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> serde_json::Value {
        let lp = if logprobs.is_empty() {
            serde_json::Value::Null
        } else {
            json!(logprobs_of("", logprobs))
        };
        self.chunk(
            json!([{"text": text, "index": index, "logprobs": lp, "finish_reason": null}]),
            None,
        )
    }

    fn finish(&self, index: usize, reason: &str) -> serde_json::Value {
        self.chunk(
            json!([{"text": "", "index": index, "logprobs": null, "finish_reason": reason}]),
            None,
        )
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        self.chunk(json!([]), Some(usage))
    }
}
