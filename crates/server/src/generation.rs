//! One request's generation as the HTTP layer sees it: submitted to the engine thread, its tokens
//! turned into text (whole UTF-8 characters, stop strings cut, `<think>` split off) and usage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tiefsee_engine::generate::StopReason;
use tiefsee_engine::scheduler::Request;
use tiefsee_tokenizer::{ReasoningDelta, ReasoningParser, StopStrings};
use tokio::sync::{mpsc, oneshot};

use crate::AppState;
use crate::api::{CompletionDetails, Generation, UsageBody};
use crate::error::ApiError;
use crate::worker::{Submit, WorkerEvent};

/// What the HTTP layer receives while a request generates.
#[derive(Debug)]
pub enum Output {
    /// New text: reasoning (inside `<think>`) and answer.
    Delta(ReasoningDelta),
    Done {
        finish_reason: &'static str,
        usage: UsageBody,
    },
    Failed(String),
}

/// Submits a prompt and returns the stream of outputs, or why the engine would not take it
/// (naming `prompt_field`, the request field the prompt came from, when the prompt is at fault).
/// `reasoning` is `Some(prompt_opened_think)` to split `<think>` reasoning from the answer.
pub async fn start(
    state: &AppState,
    prompt: Vec<u32>,
    generation: &Generation,
    reasoning: Option<bool>,
    prompt_field: &str,
) -> Result<mpsc::Receiver<Output>, ApiError> {
    let prompt_tokens = prompt.len();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (accepted_tx, accepted) = oneshot::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let submit = Submit {
        request: Request {
            prompt,
            max_tokens: generation.max_tokens,
            stop_ids: state.tokenizer.eos_ids().to_vec(),
        },
        sampling: generation.sampling.clone(),
        events: events_tx,
        stop: stop.clone(),
        accepted: accepted_tx,
    };
    let gone = || ApiError::Unavailable("the engine is not running".into());
    state.submit.send(submit).map_err(|_| gone())?;
    accepted
        .await
        .map_err(|_| gone())?
        .map_err(|rejected| ApiError::rejected(rejected, prompt_field))?;

    let (out, rx) = mpsc::channel(64);
    let tokenizer = state.tokenizer.clone();
    let stops = generation.stops.clone();
    tokio::spawn(async move {
        let mut decoder = tokenizer.stream(true);
        let mut stops = StopStrings::new(stops);
        let mut parser = reasoning.map(ReasoningParser::new);
        let mut reasoning_tokens = 0;
        let split = |parser: &mut Option<ReasoningParser>, text: &str| match parser {
            Some(p) => p.push(text),
            None => ReasoningDelta {
                reasoning: String::new(),
                content: text.to_owned(),
            },
        };
        while let Some(event) = events.recv().await {
            let output = match event {
                WorkerEvent::Token(token) => {
                    if parser.as_ref().is_some_and(ReasoningParser::in_reasoning) {
                        reasoning_tokens += 1;
                    }
                    if stops.stopped() {
                        continue;
                    }
                    let piece = match decoder.push(token) {
                        Ok(piece) => piece,
                        Err(e) => {
                            let _ = out.send(Output::Failed(e.to_string())).await;
                            return;
                        }
                    };
                    let (ready, stopped) = stops.push(&piece);
                    if stopped {
                        stop.store(true, Ordering::Relaxed);
                    }
                    Output::Delta(split(&mut parser, &ready))
                }
                WorkerEvent::Finished { reason, usage } => {
                    let mut tail = String::new();
                    if !stops.stopped() {
                        let rest = decoder.finish().unwrap_or_default();
                        tail = stops.push(&rest).0 + &stops.flush();
                    }
                    let mut delta = split(&mut parser, &tail);
                    if let Some(p) = parser.as_mut() {
                        let end = p.finish();
                        delta.reasoning += &end.reasoning;
                        delta.content += &end.content;
                    }
                    if (!delta.reasoning.is_empty() || !delta.content.is_empty())
                        && out.send(Output::Delta(delta)).await.is_err()
                    {
                        return;
                    }
                    let finish_reason = match reason {
                        StopReason::Length | StopReason::ContextFull => "length",
                        StopReason::StopToken | StopReason::Caller => "stop",
                    };
                    let completion = usage.completion_tokens;
                    let hit = usage.cached_tokens.min(prompt_tokens);
                    let _ = out
                        .send(Output::Done {
                            finish_reason,
                            usage: UsageBody {
                                prompt_tokens,
                                completion_tokens: completion,
                                total_tokens: prompt_tokens + completion,
                                prompt_cache_hit_tokens: hit,
                                prompt_cache_miss_tokens: prompt_tokens - hit,
                                completion_tokens_details: CompletionDetails {
                                    reasoning_tokens: reasoning_tokens.min(completion),
                                },
                            },
                        })
                        .await;
                    return;
                }
                WorkerEvent::Failed(message) => Output::Failed(message),
            };
            if out.send(output).await.is_err() {
                // The client is gone: dropping `events` makes the engine cancel the request.
                return;
            }
        }
    });
    Ok(rx)
}
