//! The engine thread: owns the model, the paged cache and the scheduler, takes requests over a
//! channel, steps the continuous batch, and sends each request its tokens. A request for `n` choices
//! is `n` sequences, each with its own receiver; one whose receiver is gone (the client disconnected,
//! a stop string matched) is cancelled at once, freeing its blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tiefsee_engine::generate::StopReason;
use tiefsee_engine::scheduler::{Engine, Event, Rejected, Request, SchedulerConfig, SeqId, Usage};
use tiefsee_engine::{PagedExecutor, SamplingParams, TokenLogprobs};
use tiefsee_model::Model;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// What the engine thread sends back for one request.
#[derive(Debug)]
pub enum WorkerEvent {
    Token {
        token: u32,
        logprobs: Option<Box<TokenLogprobs>>,
    },
    Finished {
        reason: StopReason,
        usage: Usage,
    },
    /// The model failed; the request is over.
    Failed(String),
}

/// A request for the engine thread: its choices are queued together or not at all.
pub struct Submit {
    pub request: Request,
    pub choices: Vec<Choice>,
    pub accepted: oneshot::Sender<Result<(), Rejected>>,
}

/// One choice of a request: its sampling and where its events go.
pub struct Choice {
    pub sampling: SamplingParams,
    pub events: mpsc::UnboundedSender<WorkerEvent>,
    /// Set by the receiver to end generation early (a stop string matched); usage still follows.
    pub stop: Arc<AtomicBool>,
}

/// The engine thread's handle on one live request.
struct Live {
    events: mpsc::UnboundedSender<WorkerEvent>,
    stop: Arc<AtomicBool>,
}

/// Starts the engine thread; it runs until every sender of the returned channel is dropped.
pub fn spawn(
    model: Model,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> std::io::Result<mpsc::UnboundedSender<Submit>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("tiefsee-engine".into())
        .spawn(move || run(model, config, metrics, rx))?;
    Ok(tx)
}

fn run(
    model: Model,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    mut submissions: mpsc::UnboundedReceiver<Submit>,
) {
    let executor = match PagedExecutor::new(&model, config.num_blocks, config.block_size) {
        Ok(executor) => executor,
        Err(e) => {
            tracing::error!("cache allocation: {e}");
            return;
        }
    };
    let mut engine = match Engine::new(config, executor) {
        Ok(engine) => engine,
        Err(e) => {
            tracing::error!("engine configuration: {e}");
            return;
        }
    };
    let mut live: HashMap<SeqId, Live> = HashMap::new();
    loop {
        // Block for work when idle; otherwise take whatever arrived since the last step.
        if live.is_empty() {
            match submissions.blocking_recv() {
                Some(submit) => admit(&mut engine, &mut live, &metrics, submit),
                None => return,
            }
        }
        while let Ok(submit) = submissions.try_recv() {
            admit(&mut engine, &mut live, &metrics, submit);
        }
        let ended: Vec<SeqId> = live
            .iter()
            .filter(|(_, l)| l.events.is_closed() || l.stop.load(Ordering::Relaxed))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            if let (Some(l), Ok(Event::Finished { reason, usage, .. })) =
                (live.remove(&id), engine.cancel(id))
            {
                metrics
                    .prompt_tokens
                    .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
                metrics
                    .cache_hit_tokens
                    .fetch_add(usage.cached_tokens, Ordering::Relaxed);
                let _ = l.events.send(WorkerEvent::Finished { reason, usage });
            }
        }
        update_gauges(&engine, &metrics);
        if live.is_empty() {
            continue;
        }
        match engine.step() {
            Ok(events) => {
                metrics.steps.fetch_add(1, Ordering::Relaxed);
                metrics.last_batch.store(
                    events
                        .iter()
                        .filter(|e| matches!(e, Event::Token { .. }))
                        .count(),
                    Ordering::Relaxed,
                );
                for event in events {
                    dispatch(&mut engine, &mut live, &metrics, event);
                }
            }
            Err(e) => {
                // A failing step would fail again: end every request with the reason.
                tracing::error!("engine step failed: {e}");
                for (id, l) in live.drain() {
                    let _ = l.events.send(WorkerEvent::Failed(e.to_string()));
                    let _ = engine.cancel(id);
                }
            }
        }
        update_gauges(&engine, &metrics);
    }
}

fn update_gauges<E: tiefsee_engine::scheduler::ModelExecutor>(
    engine: &Engine<E>,
    metrics: &Metrics,
) {
    let stats = engine.scheduler().stats();
    metrics.running.store(stats.running, Ordering::Relaxed);
    metrics.waiting.store(stats.waiting, Ordering::Relaxed);
    metrics
        .blocks_in_use
        .store(stats.blocks.in_use, Ordering::Relaxed);
    metrics
        .blocks_total
        .store(stats.blocks.total, Ordering::Relaxed);
}

fn admit<E: tiefsee_engine::scheduler::ModelExecutor>(
    engine: &mut Engine<E>,
    live: &mut HashMap<SeqId, Live>,
    metrics: &Metrics,
    submit: Submit,
) {
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    let samplings = submit.choices.iter().map(|c| c.sampling.clone()).collect();
    match engine.add_group(submit.request, samplings) {
        Ok(ids) => {
            for (id, choice) in ids.into_iter().zip(submit.choices) {
                let handle = Live {
                    events: choice.events,
                    stop: choice.stop,
                };
                live.insert(id, handle);
            }
            let _ = submit.accepted.send(Ok(()));
        }
        Err(rejected) => {
            metrics.rejected.fetch_add(1, Ordering::Relaxed);
            let _ = submit.accepted.send(Err(rejected));
        }
    }
}

fn dispatch<E: tiefsee_engine::scheduler::ModelExecutor>(
    engine: &mut Engine<E>,
    live: &mut HashMap<SeqId, Live>,
    metrics: &Metrics,
    event: Event,
) {
    match event {
        Event::Token {
            id,
            token,
            logprobs,
        } => {
            metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let delivered = live.get(&id).is_some_and(|l| {
                l.events
                    .send(WorkerEvent::Token { token, logprobs })
                    .is_ok()
            });
            if !delivered {
                live.remove(&id);
                let _ = engine.cancel(id);
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        Event::Finished { id, reason, usage } => {
            metrics
                .prompt_tokens
                .fetch_add(usage.prompt_tokens, Ordering::Relaxed);
            metrics
                .cache_hit_tokens
                .fetch_add(usage.cached_tokens, Ordering::Relaxed);
            if let Some(l) = live.remove(&id) {
                let _ = l.events.send(WorkerEvent::Finished { reason, usage });
            }
        }
    }
}
