//! The HTTP endpoints: chat and text completions (streamed over SSE or not), models, health, metrics.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tiefsee_tokenizer::ReasoningParser;
use tokio::sync::mpsc;

use crate::AppState;
use crate::api::{
    ChatRequest, CommonParams, CompletionRequest, Generation, PromptField, parse, template_messages,
};
use crate::error::ApiError;
use crate::generation::{self, Output};

/// Which API shape a response takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// `POST /v1/chat/completions`
pub async fn chat(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request: ChatRequest = parse(&body)?;
    let params: CommonParams = parse(&body)?;
    let generation = params.validate(state.context)?;
    let messages = template_messages(&request.messages)?;
    let template = state
        .tokenizer
        .chat_template()
        .map_err(|e| ApiError::Internal(format!("the model's chat template: {e}")))?;
    let prompt = template
        .render(&messages, true)
        .map_err(|e| ApiError::field("messages", e.to_string()))?;
    let ids = state
        .tokenizer
        .encode(&prompt, false)
        .map_err(|e| ApiError::field("messages", e.to_string()))?;
    let opened = ReasoningParser::prompt_opens_think(&prompt);
    let outputs = generation::start(&state, ids, &generation, Some(opened), "messages").await?;
    Ok(respond(state, Kind::Chat, generation, outputs).await)
}

/// `POST /v1/completions`
pub async fn completions(
    State(state): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let request: CompletionRequest = parse(&body)?;
    let params: CommonParams = parse(&body)?;
    let generation = params.validate(state.context)?;
    let ids = match &request.prompt {
        PromptField::Text(text) => state
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::field("prompt", e.to_string()))?,
        PromptField::Tokens(ids) => {
            let vocab = state.vocab_size;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::field(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids.clone()
        }
    };
    let outputs = generation::start(&state, ids, &generation, None, "prompt").await?;
    Ok(respond(state, Kind::Text, generation, outputs).await)
}

/// `GET /v1/models`
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "tiefsee"}],
    }))
}

/// `GET /health`
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics`
pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

fn request_id(kind: Kind) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    match kind {
        Kind::Chat => format!("chatcmpl-{nanos:x}"),
        Kind::Text => format!("cmpl-{nanos:x}"),
    }
}

async fn respond(
    state: AppState,
    kind: Kind,
    generation: Generation,
    outputs: mpsc::Receiver<Output>,
) -> Response {
    if generation.stream {
        Sse::new(sse_stream(state, kind, generation.include_usage, outputs))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        match collect(state, kind, outputs).await {
            Ok(body) => Json(body).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

async fn collect(
    state: AppState,
    kind: Kind,
    mut outputs: mpsc::Receiver<Output>,
) -> Result<Value, ApiError> {
    let (mut reasoning, mut content) = (String::new(), String::new());
    while let Some(output) = outputs.recv().await {
        match output {
            Output::Delta(d) => {
                reasoning += &d.reasoning;
                content += &d.content;
            }
            Output::Failed(message) => return Err(ApiError::Internal(message)),
            Output::Done {
                finish_reason,
                usage,
            } => {
                let choice = match kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": content});
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = json!(reasoning);
                        }
                        json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": content, "logprobs": null, "finish_reason": finish_reason})
                    }
                };
                return Ok(json!({
                    "id": request_id(kind),
                    "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": now(),
                    "model": state.model_name,
                    "choices": [choice],
                    "usage": usage,
                }));
            }
        }
    }
    Err(ApiError::Unavailable(
        "the engine stopped before the request finished".into(),
    ))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Streaming state: the receiver, the response's fixed fields, and whether the role went out.
struct Streaming {
    outputs: mpsc::Receiver<Output>,
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    include_usage: bool,
    sent_role: bool,
    finished: bool,
}

impl Streaming {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Event {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut body = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        if let Some(usage) = usage {
            body["usage"] = usage;
        }
        Event::default().data(body.to_string())
    }

    fn delta(&mut self, reasoning: &str, content: &str, finish_reason: Option<&str>) -> Event {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if !self.sent_role {
                    delta["role"] = json!("assistant");
                    self.sent_role = true;
                }
                if !reasoning.is_empty() {
                    delta["reasoning_content"] = json!(reasoning);
                }
                if !content.is_empty() || (reasoning.is_empty() && finish_reason.is_none()) {
                    delta["content"] = json!(content);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            Kind::Text => {
                json!({"index": 0, "text": content, "logprobs": null, "finish_reason": finish_reason})
            }
        };
        self.chunk(json!([choice]), None)
    }

    /// The SSE events one engine output becomes.
    fn events(&mut self, output: Option<Output>) -> Vec<Event> {
        match output {
            Some(Output::Delta(d)) if d.reasoning.is_empty() && d.content.is_empty() => Vec::new(),
            Some(Output::Delta(d)) => vec![self.delta(&d.reasoning, &d.content, None)],
            Some(Output::Done {
                finish_reason,
                usage,
            }) => {
                self.finished = true;
                let mut events = vec![self.delta("", "", Some(finish_reason))];
                if self.include_usage {
                    let usage = serde_json::to_value(usage).unwrap_or(Value::Null);
                    events.push(self.chunk(json!([]), Some(usage)));
                }
                events.push(Event::default().data("[DONE]"));
                events
            }
            Some(Output::Failed(message)) => {
                self.finished = true;
                let error = json!({"error": {"message": message, "type": "server_error", "param": null, "code": 500}});
                vec![Event::default().data(error.to_string())]
            }
            None => {
                self.finished = true;
                Vec::new()
            }
        }
    }
}

fn sse_stream(
    state: AppState,
    kind: Kind,
    include_usage: bool,
    outputs: mpsc::Receiver<Output>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let streaming = Streaming {
        outputs,
        id: request_id(kind),
        model: state.model_name.clone(),
        created: now(),
        kind,
        include_usage,
        sent_role: false,
        finished: false,
    };
    stream::unfold(streaming, |mut s| async move {
        loop {
            if s.finished {
                return None;
            }
            let output = s.outputs.recv().await;
            let events = s.events(output);
            if !events.is_empty() {
                return Some((stream::iter(events.into_iter().map(Ok)), s));
            }
        }
    })
    .flatten()
}
