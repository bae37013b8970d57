//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use pod_inference::engine::limits::MAX_TOP_LOGPROBS;
use pod_inference::{ChatMessage, GenerateRequest, Prompt, Role, TokenLogprob};
use serde_json::json;

use super::generation::{self, ChunkFormat, Head, FINGERPRINT};
use super::ApiJson;
use crate::error::ApiError;
use crate::openai::{
    ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessageOut, ChoiceLogprobs,
    MessageContent, TopLogprob, Usage,
};
use crate::{AppState, Backend};

fn role(name: &str, i: usize) -> Result<Role, ApiError> {
    match name {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(ApiError::invalid(
            &format!("messages[{i}].role"),
            format!("unknown role `{other}` (expected system, developer, user, assistant or tool)"),
        )),
    }
}

fn messages(req: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = role(&m.role, i)?;
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("content part type `{}` is not supported; only `text` parts are", p.kind),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

pub(super) fn logprobs_of(list: Vec<TokenLogprob>) -> ChoiceLogprobs {
    ChoiceLogprobs {
        content: list
            .into_iter()
            .map(|t| crate::openai::TokenLogprob {
                bytes: t.text.as_bytes().to_vec(),
                token: t.text,
                logprob: t.logprob,
                top_logprobs: t
                    .top
                    .into_iter()
                    .map(|(_, text, logprob)| TopLogprob {
                        bytes: text.as_bytes().to_vec(),
                        token: text,
                        logprob,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Builds the engine request from a chat request.
pub(crate) fn engine_request(
    req: &ChatCompletionRequest,
    max_choices: usize,
) -> Result<(GenerateRequest, usize), ApiError> {
    if req.model.is_empty() {
        return Err(ApiError::invalid("model", "`model` is required"));
    }
    let msgs = messages(req)?;
    let plan = generation::plan(
        &req.params,
        req.max_completion_tokens.or(req.params.max_tokens),
        max_choices,
    )?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let json_mode = match req.response_format.as_ref().map(|f| f.kind.as_str()) {
        None | Some("text") => false,
        Some("json_object") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!(
                    "response_format type `{other}` is not supported (use `text` or `json_object`)"
                ),
            ))
        }
    };
    let mut request = plan.request(&req.model, Prompt::Chat(msgs));
    request.logprobs = logprobs;
    request.json = json_mode;
    Ok((request, plan.n))
}

/// Chat completion, whole or streamed.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses(
        (status = 200, body = ChatCompletion, description = "The answer, or `text/event-stream` of ChatCompletionChunk with `stream: true`"),
        (status = 400, body = crate::openai::ErrorBody),
        (status = 404, body = crate::openai::ErrorBody),
        (status = 429, body = crate::openai::ErrorBody),
        (status = 503, body = crate::openai::ErrorBody),
    ))]
pub(crate) async fn chat_completions<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (request, n) = engine_request(&req, state.config.max_choices)?;
    if let Some(user) = &req.params.user {
        tracing::debug!(user = %user, model = %req.model, "chat request");
    }
    let generations = generation::start(&state, generation::seeded(&request, n)).await?;
    let head = Head::new("chatcmpl", &req.model);
    let want_logprobs = request.logprobs.is_some();
    let streaming = generation::streaming(&req.params);
    generation::answer(
        state,
        generations,
        streaming,
        ChatChunks(head.clone()),
        |collected, usage| ChatCompletion {
            id: head.id,
            object: "chat.completion".into(),
            created: head.created,
            model: head.model,
            choices: collected
                .into_iter()
                .enumerate()
                .map(|(index, c)| ChatChoice {
                    index,
                    message: ChatMessageOut {
                        role: "assistant".into(),
                        content: c.text,
                    },
                    logprobs: want_logprobs.then(|| logprobs_of(c.logprobs)),
                    finish_reason: c.finish_reason,
                })
                .collect(),
            usage,
            system_fingerprint: FINGERPRINT.into(),
        },
    )
    .await
}

/// Chat stream chunks.
struct ChatChunks(Head);

impl ChatChunks {
    fn chunk(&self, choices: serde_json::Value, usage: Option<Usage>) -> serde_json::Value {
        self.0.chunk("chat.completion.chunk", choices, usage)
    }
}

impl ChunkFormat for ChatChunks {
    fn head(&self) -> &Head {
        &self.0
    }

    fn start(&self, index: usize) -> Option<serde_json::Value> {
        Some(self.chunk(
            json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
            None,
        ))
    }

    fn delta(&self, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> serde_json::Value {
        let lp = if logprobs.is_empty() {
            serde_json::Value::Null
        } else {
            json!(logprobs_of(logprobs))
        };
        self.chunk(
            json!([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]),
            None,
        )
    }

    fn finish(&self, index: usize, reason: &str) -> serde_json::Value {
        self.chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}]),
            None,
        )
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        self.chunk(json!([]), Some(usage))
    }
}
