//! The HTTP endpoints: chat and text completions (streamed over SSE or not), models, health, metrics.
//!
//! A request for `n` choices answers with `choices[0..n]`; streamed, their chunks interleave, each
//! naming its `index` and ending with its own `finish_reason`, and `[DONE]` follows the last. Usage
//! counts the prompt once and sums the choices' completions, as OpenAI does.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tiefsee_tokenizer::{ReasoningDelta, ReasoningParser};
use tokio::sync::mpsc;

use crate::AppState;
use crate::api::{
    ChatRequest, CommonParams, CompletionRequest, Generation, PromptField, UsageBody, parse,
    template_messages,
};
use crate::error::ApiError;
use crate::generation::{self, Output, TokenLogprob};

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
    let generation = params.validate(state.context, request.logprobs()?)?;
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
    let generation = params.validate(state.context, request.logprobs()?)?;
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
    outputs: mpsc::Receiver<(usize, Output)>,
) -> Response {
    if generation.stream {
        Sse::new(sse_stream(state, kind, &generation, outputs))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        match collect(state, kind, &generation, outputs).await {
            Ok(body) => Json(body).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// OpenAI's stand-in for a log-probability of minus infinity, which JSON cannot hold.
const MIN_LOGPROB: f32 = -9999.0;

/// Log-probabilities in the response shape of `kind`, for tokens of one choice; `offset` is the
/// text offset of the first (completions' `text_offset`, counted in characters as vLLM does) and
/// moves past them.
fn logprobs_json(kind: Kind, logprobs: &[TokenLogprob], offset: &mut usize) -> Value {
    let lp = |l: f32| l.max(MIN_LOGPROB);
    match kind {
        Kind::Chat => {
            let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": lp(logprob), "bytes": token.as_bytes()});
            let content: Vec<Value> = logprobs
                .iter()
                .map(|t| {
                    let mut e = entry(&t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|(tok, l)| entry(tok, *l)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Text => {
            let mut text_offset = Vec::new();
            let mut top_logprobs = Vec::new();
            for t in logprobs {
                text_offset.push(*offset);
                *offset += t.token.chars().count();
                // As vLLM: the sampled token and the top alternatives, by text.
                let mut top = serde_json::Map::new();
                for (tok, l) in &t.top {
                    top.entry(tok.clone()).or_insert(json!(lp(*l)));
                }
                top.entry(t.token.clone()).or_insert(json!(lp(t.logprob)));
                top_logprobs.push(Value::Object(top));
            }
            json!({
                "tokens": logprobs.iter().map(|t| &t.token).collect::<Vec<_>>(),
                "token_logprobs": logprobs.iter().map(|t| lp(t.logprob)).collect::<Vec<_>>(),
                "top_logprobs": top_logprobs,
                "text_offset": text_offset,
            })
        }
    }
}

/// One choice of a response being collected.
#[derive(Default)]
struct Collected {
    reasoning: String,
    content: String,
    logprobs: Vec<TokenLogprob>,
    done: Option<(&'static str, UsageBody)>,
}

async fn collect(
    state: AppState,
    kind: Kind,
    generation: &Generation,
    mut outputs: mpsc::Receiver<(usize, Output)>,
) -> Result<Value, ApiError> {
    let mut choices: Vec<Collected> = (0..generation.n).map(|_| Collected::default()).collect();
    let mut finished = 0;
    while finished < choices.len() {
        let Some((index, output)) = outputs.recv().await else {
            return Err(ApiError::Unavailable(
                "the engine stopped before the request finished".into(),
            ));
        };
        let Some(choice) = choices.get_mut(index) else {
            continue;
        };
        match output {
            Output::Delta { text, logprobs } => {
                choice.reasoning += &text.reasoning;
                choice.content += &text.content;
                choice.logprobs.extend(logprobs);
            }
            Output::Failed(message) => return Err(ApiError::Internal(message)),
            Output::Done {
                finish_reason,
                usage,
            } => {
                choice.done = Some((finish_reason, usage));
                finished += 1;
            }
        }
    }
    let mut usages = Vec::new();
    let mut bodies = Vec::new();
    for (index, c) in choices.into_iter().enumerate() {
        let Some((finish_reason, usage)) = c.done else {
            continue;
        };
        usages.push(usage);
        let logprobs = match generation.logprobs {
            Some(_) => logprobs_json(kind, &c.logprobs, &mut 0),
            None => Value::Null,
        };
        bodies.push(match kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": c.content});
                if !c.reasoning.is_empty() {
                    message["reasoning_content"] = json!(c.reasoning);
                }
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Kind::Text => {
                json!({"index": index, "text": c.content, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        });
    }
    Ok(json!({
        "id": request_id(kind),
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": now(),
        "model": state.model_name,
        "choices": bodies,
        "usage": UsageBody::of_choices(&usages),
    }))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Streaming state: the receiver, the response's fixed fields, and each choice's progress.
struct Streaming {
    outputs: mpsc::Receiver<(usize, Output)>,
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    include_usage: bool,
    logprobs: bool,
    /// Per choice: whether the role went out, the text offset reached, its usage once done.
    sent_role: Vec<bool>,
    offsets: Vec<usize>,
    usages: Vec<Option<UsageBody>>,
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

    fn delta(
        &mut self,
        index: usize,
        text: &ReasoningDelta,
        logprobs: &[TokenLogprob],
        finish_reason: Option<&str>,
    ) -> Event {
        let (reasoning, content) = (&text.reasoning, &text.content);
        let logprobs = match (self.logprobs, self.offsets.get_mut(index)) {
            (true, Some(offset)) if !logprobs.is_empty() || finish_reason.is_none() => {
                logprobs_json(self.kind, logprobs, offset)
            }
            _ => Value::Null,
        };
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if let Some(sent) = self.sent_role.get_mut(index)
                    && !*sent
                {
                    delta["role"] = json!("assistant");
                    *sent = true;
                }
                if !reasoning.is_empty() {
                    delta["reasoning_content"] = json!(reasoning);
                }
                if !content.is_empty() || (reasoning.is_empty() && finish_reason.is_none()) {
                    delta["content"] = json!(content);
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Kind::Text => {
                json!({"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        };
        self.chunk(json!([choice]), None)
    }

    /// The SSE events one engine output becomes.
    fn events(&mut self, output: Option<(usize, Output)>) -> Vec<Event> {
        match output {
            Some((_, Output::Delta { text, logprobs }))
                if text.reasoning.is_empty() && text.content.is_empty() && logprobs.is_empty() =>
            {
                Vec::new()
            }
            Some((index, Output::Delta { text, logprobs })) => {
                vec![self.delta(index, &text, &logprobs, None)]
            }
            Some((
                index,
                Output::Done {
                    finish_reason,
                    usage,
                },
            )) => {
                let mut events =
                    vec![self.delta(index, &ReasoningDelta::default(), &[], Some(finish_reason))];
                if let Some(slot) = self.usages.get_mut(index) {
                    *slot = Some(usage);
                }
                if self.usages.iter().all(Option::is_some) {
                    self.finished = true;
                    if self.include_usage {
                        let usages: Vec<UsageBody> =
                            self.usages.iter().flatten().cloned().collect();
                        let usage = serde_json::to_value(UsageBody::of_choices(&usages))
                            .unwrap_or(Value::Null);
                        events.push(self.chunk(json!([]), Some(usage)));
                    }
                    events.push(Event::default().data("[DONE]"));
                }
                events
            }
            Some((_, Output::Failed(message))) => {
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
    generation: &Generation,
    outputs: mpsc::Receiver<(usize, Output)>,
) -> impl Stream<Item = Result<Event, Infallible>> + use<> {
    let n = generation.n;
    let streaming = Streaming {
        outputs,
        id: request_id(kind),
        model: state.model_name.clone(),
        created: now(),
        kind,
        include_usage: generation.include_usage,
        logprobs: generation.logprobs.is_some(),
        sent_role: vec![false; n],
        offsets: vec![0; n],
        usages: vec![None; n],
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
