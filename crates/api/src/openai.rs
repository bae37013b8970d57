//! OpenAI wire types: what clients send and what pod answers, with the same field names and
//! shapes as the OpenAI API. Unknown request fields are ignored.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl StopSpec {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

/// One part of an array-form message content.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    /// Part type; only `text` is understood.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// Message content: a string or an array of parts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// A chat message as clients send it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    pub role: String,
    /// The content; may be null for assistant messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional author name (ignored).
    #[serde(default)]
    pub name: Option<String>,
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ResponseFormat {
    /// `text` or `json_object`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(text|json_object)$")]
    pub kind: String,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Request fields that chat and text completions share; flattened into both bodies.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct GenerationParams {
    /// Sampling temperature, 0-2 (default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, (0, 1] (default 1).
    pub top_p: Option<f32>,
    /// Most tokens to generate (text completions: 16 when not given, as OpenAI).
    pub max_tokens: Option<i64>,
    /// Stop strings: at most 4, each at most 256 bytes.
    pub stop: Option<StopSpec>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// -2 to 2.
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// Number of choices (1-8; text completions: per prompt).
    pub n: Option<i64>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id (logged only).
    pub user: Option<String>,
    /// Extension: keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension: min-p sampling.
    pub min_p: Option<f32>,
    /// Extension: llama.cpp-style repetition penalty.
    pub repetition_penalty: Option<f32>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct ChatCompletionRequest {
    /// Model name, as listed by `/v1/models`.
    #[schema(required = true)]
    pub model: String,
    /// The conversation.
    #[schema(required = true, min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    /// Newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities of the output tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0-20), with `logprobs`.
    pub top_logprobs: Option<i64>,
    /// `{"type": "json_object"}` constrains the output to a JSON object.
    pub response_format: Option<ResponseFormat>,
    /// Sampling, length, stop strings, choices and streaming.
    #[serde(flatten)]
    pub params: GenerationParams,
}

/// `prompt` of `/v1/completions`: a string, a list of strings, or token ids.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    Text(String),
    /// Several prompts (one choice each).
    Texts(Vec<String>),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// The prompt.
    pub prompt: Option<PromptInput>,
    /// Number of alternatives to return per token (0-5).
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the output.
    pub echo: Option<bool>,
    /// Sampling, length, stop strings, choices and streaming.
    #[serde(flatten)]
    pub params: GenerationParams,
}

/// `input` of `/v1/embeddings`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: String,
    /// Text(s) to embed.
    pub input: Option<EmbeddingInput>,
    /// `float` (default) or `base64` (little-endian f32).
    pub encoding_format: Option<String>,
    /// End-user id.
    pub user: Option<String>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    /// Tokens read.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
    /// Breakdown of the prompt tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// What became of the prompt tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache of an earlier request that began the same
    /// way.
    pub cached_tokens: usize,
}

impl Usage {
    /// Counts, with the cached prompt tokens reported when there are any.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: (cached_tokens > 0)
                .then_some(PromptTokensDetails { cached_tokens }),
        }
    }
}

impl From<pod_inference::Usage> for Usage {
    fn from(u: pod_inference::Usage) -> Self {
        Self::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    }
}

/// An alternative token with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
}

/// Log-probability of one output token (chat format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    /// Token text.
    pub token: String,
    /// Natural-log probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
    /// Most likely alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChoiceLogprobs {
    /// One entry per output token.
    pub content: Vec<TokenLogprob>,
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: usize,
    /// The answer.
    pub message: ChatMessageOut,
    /// Token log-probabilities, when asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// `POST /v1/chat/completions` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts over all choices.
    pub usage: Usage,
    /// Identifies the serving build.
    pub system_fingerprint: String,
}

/// Incremental message content of a stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text to append.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Position among the choices.
    pub index: usize,
    /// What to append.
    pub delta: ChatDelta,
    /// Log-probabilities of this chunk's tokens.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<String>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same id in every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model.
    pub model: String,
    /// Identifies the serving build.
    pub system_fingerprint: String,
    /// Choices (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, only in the final chunk with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Log-probabilities in the legacy completions format.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per position.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Character offset of each token in the text.
    pub text_offset: Vec<usize>,
}

/// One choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    /// Generated text.
    pub text: String,
    /// Position among the choices.
    pub index: usize,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` (null in intermediate stream chunks).
    pub finish_reason: Option<String>,
}

/// `POST /v1/completions` answer (and stream chunk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model.
    pub model: String,
    /// Identifies the serving build.
    pub system_fingerprint: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent in intermediate stream chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A vector: floats, or base64 of little-endian f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

/// One embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingData {
    /// `embedding`.
    pub object: String,
    /// Position of the input.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// Token counts of an embedding request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens read.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
}

/// `POST /v1/embeddings` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    /// One entry per input.
    pub data: Vec<EmbeddingData>,
    /// Model.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

/// A model in `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelObject {
    /// Name to use in requests.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// `pod` for local models, else the serving peer.
    pub owned_by: String,
    /// Extension: `chat` or `embedding`.
    pub kind: String,
    /// Extension: architecture.
    pub architecture: String,
    /// Extension: quantisation.
    pub quantization: String,
    /// Extension: context length in tokens.
    pub context_length: usize,
    /// Extension: how many peers serve it (1 = only this node).
    pub providers: usize,
    /// Extension: the pipeline stages it is split across, where pods serve it that way
    /// (absent for a model only whole pods serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<ModelPipeline>,
}

/// Extension: a model split across pods, as the mesh announces its stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelPipeline {
    /// Blocks of the whole model.
    pub total_layers: usize,
    /// Whether the stages of one model file chain from the first block to the last, so a
    /// head can answer through them.
    pub complete: bool,
    /// Every announced stage, by first block.
    pub stages: Vec<ModelStage>,
}

/// Extension: blocks of a model one pod serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ModelStage {
    /// The pod's peer id.
    pub peer: String,
    /// The blocks, first-last, e.g. `0-14`.
    pub layers: String,
    /// SHA-256 of the model file it holds: only stages of one file chain together.
    pub sha256: String,
}

/// `GET /v1/models` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelObject>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, OpenAI-style.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, `rate_limit_error`,
    /// `server_error`...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, if any.
    pub code: Option<String>,
}
