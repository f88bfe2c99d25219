//! One request's generation as the HTTP layer sees it: submitted to the engine thread as `n` choices,
//! each choice's tokens turned into text (whole UTF-8 characters, stop strings cut, `<think>` split
//! off), log-probabilities and usage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tiefsee_engine::TokenLogprobs;
use tiefsee_engine::generate::StopReason;
use tiefsee_engine::scheduler::Request;
use tiefsee_tokenizer::{ReasoningDelta, ReasoningParser, StopStrings, Tokenizer};
use tokio::sync::{mpsc, oneshot};

use crate::AppState;
use crate::api::{CompletionDetails, Generation, UsageBody};
use crate::error::ApiError;
use crate::worker::{Choice, Submit, WorkerEvent};

/// What the HTTP layer receives for one choice while a request generates.
#[derive(Debug)]
pub enum Output {
    /// New text: reasoning (inside `<think>`) and answer; and the log-probabilities of the answer
    /// tokens that made it, if asked for.
    Delta {
        text: ReasoningDelta,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish_reason: &'static str,
        usage: UsageBody,
    },
    Failed(String),
}

/// One answer token's log-probability and the most likely alternatives, as text.
///
/// Each token is decoded alone, as vLLM does: a token holding part of a UTF-8 character comes out
/// with U+FFFD, and its `bytes` are those of that text, not the token's raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl TokenLogprob {
    fn new(tokenizer: &Tokenizer, token: u32, lp: &TokenLogprobs) -> Self {
        let text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
        Self {
            token: text(token),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect(),
        }
    }
}

/// Submits a prompt for `generation.n` choices and returns the stream of (choice index, output),
/// or why the engine would not take it (naming `prompt_field`, the request field the prompt came
/// from, when the prompt is at fault). `reasoning` is `Some(prompt_opened_think)` to split `<think>`
/// reasoning from the answer; log-probabilities are then given for answer tokens only, as DeepSeek's
/// API gives them for `content` only.
///
/// Dropping the receiver cancels every choice still generating.
pub async fn start(
    state: &AppState,
    prompt: Vec<u32>,
    generation: &Generation,
    reasoning: Option<bool>,
    prompt_field: &str,
) -> Result<mpsc::Receiver<(usize, Output)>, ApiError> {
    let prompt_tokens = prompt.len();
    let (accepted_tx, accepted) = oneshot::channel();
    let mut receivers = Vec::new();
    let choices = (0..generation.n)
        .map(|i| {
            let (events_tx, events) = mpsc::unbounded_channel();
            let stop = Arc::new(AtomicBool::new(false));
            receivers.push((events, stop.clone()));
            Choice {
                sampling: generation.sampling.for_choice(i),
                events: events_tx,
                stop,
            }
        })
        .collect();
    let submit = Submit {
        request: Request {
            prompt,
            max_tokens: generation.max_tokens,
            stop_ids: state.tokenizer.eos_ids().to_vec(),
            logprobs: generation.logprobs,
        },
        choices,
        accepted: accepted_tx,
    };
    let gone = || ApiError::Unavailable("the engine is not running".into());
    state.submit.send(submit).map_err(|_| gone())?;
    accepted
        .await
        .map_err(|_| gone())?
        .map_err(|rejected| ApiError::rejected(rejected, prompt_field))?;

    let (out, rx) = mpsc::channel(64);
    for (index, (events, stop)) in receivers.into_iter().enumerate() {
        let choice = ChoiceStream {
            index,
            events,
            stop,
            out: out.clone(),
            prompt_tokens,
            stops: generation.stops.clone(),
            reasoning,
        };
        tokio::spawn(choice.run(state.tokenizer.clone()));
    }
    Ok(rx)
}

/// One choice's engine events on their way to text.
struct ChoiceStream {
    index: usize,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    stop: Arc<AtomicBool>,
    out: mpsc::Sender<(usize, Output)>,
    prompt_tokens: usize,
    stops: Vec<String>,
    reasoning: Option<bool>,
}

impl ChoiceStream {
    async fn run(mut self, tokenizer: Arc<Tokenizer>) {
        let index = self.index;
        let prompt_tokens = self.prompt_tokens;
        let mut decoder = tokenizer.stream(true);
        let mut stops = StopStrings::new(std::mem::take(&mut self.stops));
        let mut parser = self.reasoning.map(ReasoningParser::new);
        let mut reasoning_tokens = 0;
        let split = |parser: &mut Option<ReasoningParser>, text: &str| match parser {
            Some(p) => p.push(text),
            None => ReasoningDelta {
                reasoning: String::new(),
                content: text.to_owned(),
            },
        };
        loop {
            // A choice still waiting for admission sends nothing, so watch for the client leaving
            // too: dropping `events` makes the engine cancel this choice.
            let event = tokio::select! {
                event = self.events.recv() => event,
                () = self.out.closed() => return,
            };
            let Some(event) = event else {
                return;
            };
            let output = match event {
                WorkerEvent::Token { token, logprobs } => {
                    let in_reasoning = parser.as_ref().is_some_and(ReasoningParser::in_reasoning);
                    if in_reasoning {
                        reasoning_tokens += 1;
                    }
                    if stops.stopped() {
                        continue;
                    }
                    let piece = match decoder.push(token) {
                        Ok(piece) => piece,
                        Err(e) => {
                            let _ = self.out.send((index, Output::Failed(e.to_string()))).await;
                            return;
                        }
                    };
                    let (ready, stopped) = stops.push(&piece);
                    if stopped {
                        self.stop.store(true, Ordering::Relaxed);
                    }
                    let logprobs = match logprobs {
                        Some(lp) if !in_reasoning => {
                            vec![TokenLogprob::new(&tokenizer, token, &lp)]
                        }
                        _ => Vec::new(),
                    };
                    Output::Delta {
                        text: split(&mut parser, &ready),
                        logprobs,
                    }
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
                    if !delta.reasoning.is_empty() || !delta.content.is_empty() {
                        let output = Output::Delta {
                            text: delta,
                            logprobs: Vec::new(),
                        };
                        if self.out.send((index, output)).await.is_err() {
                            return;
                        }
                    }
                    // A stop string can complete only in the flushed tail (an unfinished
                    // character at the end comes out as U+FFFD), after the engine stopped for length.
                    let finish_reason = match reason {
                        _ if stops.stopped() => "stop",
                        StopReason::Length | StopReason::ContextFull => "length",
                        StopReason::StopToken | StopReason::Caller => "stop",
                    };
                    let completion = usage.completion_tokens;
                    let hit = usage.cached_tokens.min(prompt_tokens);
                    let usage = UsageBody {
                        prompt_tokens,
                        completion_tokens: completion,
                        total_tokens: prompt_tokens + completion,
                        prompt_cache_hit_tokens: hit,
                        prompt_cache_miss_tokens: prompt_tokens - hit,
                        completion_tokens_details: CompletionDetails {
                            reasoning_tokens: reasoning_tokens.min(completion),
                        },
                    };
                    let done = Output::Done {
                        finish_reason,
                        usage,
                    };
                    let _ = self.out.send((index, done)).await;
                    return;
                }
                WorkerEvent::Failed(message) => Output::Failed(message),
            };
            if self.out.send((index, output)).await.is_err() {
                // The client is gone: dropping `events` makes the engine cancel this choice.
                return;
            }
        }
    }
}
