//! Request and response bodies of the OpenAI API in DeepSeek's dialect (`reasoning_content`, cache-hit
//! usage), and the checks that turn a request into generation parameters.

use serde::{Deserialize, Serialize};
use tiefsee_engine::SamplingParams;
use tiefsee_tokenizer::Message;

use crate::error::ApiError;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or OpenAI's list of typed parts (text parts only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a list-form message content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub reasoning_content: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields chat and completion requests share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or negative disables (vLLM's convention is -1).
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stop: Option<StopField>,
    pub seed: Option<u64>,
    pub n: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// Most choices one request may ask for (`n`); each is a sequence in the engine.
pub const MAX_CHOICES: u64 = 16;

/// Most alternatives per token (`top_logprobs`, completions' `logprobs`), as OpenAI and vLLM allow.
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// `POST /v1/chat/completions`: the messages and the chat form of logprobs (the shared fields are
/// read from the same body).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
}

impl ChatRequest {
    /// How many alternatives to report per token, if logprobs are wanted: `logprobs: true` with
    /// `top_logprobs` 0 to 20 (0 when absent); `top_logprobs` alone is refused, as by OpenAI and vLLM.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (Some(true), top) => Ok(Some(top_logprobs("top_logprobs", top.unwrap_or(0))?)),
            (_, Some(_)) => Err(ApiError::field(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            )),
            (_, None) => Ok(None),
        }
    }
}

/// `POST /v1/completions`: `prompt` as text, or as token ids, and the legacy form of logprobs (the
/// shared fields are read from the same body).
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// Alternatives to report per token (0 to 20); absent for no logprobs.
    pub logprobs: Option<u64>,
}

impl CompletionRequest {
    /// How many alternatives to report per token, if logprobs are wanted.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        self.logprobs
            .map(|k| top_logprobs("logprobs", k))
            .transpose()
    }
}

fn top_logprobs(name: &str, k: u64) -> Result<usize, ApiError> {
    if k > MAX_TOP_LOGPROBS {
        return Err(ApiError::field(
            name,
            format!("{name} = {k} must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(k as usize)
}

/// Reads one view of a JSON body, naming the field at fault (`messages[0].role`, `temperature`).
pub fn parse<T: serde::de::DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("{path}: {}", e.inner());
        if path == "." {
            ApiError::BadRequest {
                message,
                param: None,
            }
        } else {
            ApiError::field(&path, message)
        }
    })
}

/// A completion prompt: text or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
}

/// Generation settings checked and ready for the engine.
#[derive(Debug, Clone)]
pub struct Generation {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate, each sampled on its own (`SamplingParams::for_choice`).
    pub n: usize,
    /// Alternatives to report per generated token, if logprobs are wanted.
    pub logprobs: Option<usize>,
}

impl CommonParams {
    /// Checks every field, naming the one at fault; `logprobs` comes checked from the endpoint's
    /// own request, whose form of it differs.
    pub fn validate(
        &self,
        context: usize,
        logprobs: Option<usize>,
    ) -> Result<Generation, ApiError> {
        let range = |name: &str, value: Option<f32>, lo: f32, hi: f32| match value {
            Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::field(
                name,
                format!("{name} must be between {lo} and {hi}, got {v}"),
            )),
            _ => Ok(()),
        };
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, 0.0, 1.0)?;
        range("min_p", self.min_p, 0.0, 1.0)?;
        range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::field("top_p", "top_p must be greater than 0"));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES {
            return Err(ApiError::field(
                "n",
                format!("n = {n} must be between 1 and {MAX_CHOICES}"),
            ));
        }
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        if let Some((name, m)) = max_tokens
            && (m == 0 || m > context as u64)
        {
            return Err(ApiError::field(
                name,
                format!("{name} = {m} must be between 1 and the context of {context} tokens"),
            ));
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) if v.len() > 16 => {
                return Err(ApiError::field("stop", "at most 16 stop strings"));
            }
            Some(StopField::Many(v)) => v.clone(),
        };
        Ok(Generation {
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.map_or(0, |k| k.max(0) as usize),
                top_p: self.top_p.unwrap_or(1.0),
                min_p: self.min_p.unwrap_or(0.0),
                repeat_penalty: self.repetition_penalty.unwrap_or(1.0),
                repeat_last_n: 64,
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                seed: self.seed.unwrap_or_else(random_seed),
            },
            max_tokens: max_tokens.map(|(_, m)| m as usize),
            stops,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            n: n as usize,
            logprobs,
        })
    }
}

fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Converts chat messages for the template, rejecting unknown roles and non-text parts by field.
pub fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::field("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "tool" | "developer"
            ) {
                return Err(ApiError::field(
                    &format!("messages[{i}].role"),
                    format!(
                        "unknown role {:?}: expected system, user, assistant or tool",
                        m.role
                    ),
                ));
            }
            let content = match &m.content {
                None => None,
                Some(Content::Text(t)) => Some(t.clone()),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::field(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "content parts of type {:?} are not supported: only text",
                                        part.kind
                                    ),
                                ));
                            }
                        }
                    }
                    Some(text)
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            let mut message = Message::new(role, content.unwrap_or_default());
            message.reasoning_content = m.reasoning_content.clone();
            Ok(message)
        })
        .collect()
}

/// `usage`, with DeepSeek's cache-hit fields.
#[derive(Debug, Clone, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_cache_hit_tokens: usize,
    pub prompt_cache_miss_tokens: usize,
    pub completion_tokens_details: CompletionDetails,
}

impl UsageBody {
    /// The usage of a request for several choices, as OpenAI counts it: the prompt once (with the
    /// first choice's cache hits; the others' hits show in `/metrics`), completion tokens summed.
    pub fn of_choices(choices: &[UsageBody]) -> Option<UsageBody> {
        let first = choices.first()?;
        let completion: usize = choices.iter().map(|u| u.completion_tokens).sum();
        Some(UsageBody {
            completion_tokens: completion,
            total_tokens: first.prompt_tokens + completion,
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: choices
                    .iter()
                    .map(|u| u.completion_tokens_details.reasoning_tokens)
                    .sum(),
            },
            ..first.clone()
        })
    }
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: usize,
}
