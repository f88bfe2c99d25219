//! The serving loop for a synchronous executor: schedule a step, run it, sample each sequence's next
//! token with its own sampler, and report tokens and finishes as [`Event`]s.
//!
//! The owner of an [`Engine`] (the server's engine task) calls [`Engine::add`] and [`Engine::cancel`]
//! between steps as requests arrive over its channels, and [`Engine::step`] while work remains.

use std::collections::HashMap;
use std::ops::ControlFlow;

use rayon::prelude::*;
use tiefsee_model::ModelError;

use super::executor::ModelExecutor;
use super::sequence::{Event, Request, SeqId};
use super::{ConfigError, Rejected, Scheduler, UnknownSequence};
use crate::generate::StopReason;
use crate::logprobs::TokenLogprobs;
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::SchedulerConfig;

/// A step could not be completed; its sequences are planned again by the next step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model failed on a step of {seqs} sequences and {tokens} tokens: {source}")]
    Executor {
        seqs: usize,
        tokens: usize,
        source: ModelError,
    },
    #[error("the model returned no logits for sequence {0}, whose next token was due")]
    MissingLogits(SeqId),
    #[error("the model returned empty logits for sequence {0}")]
    EmptyLogits(SeqId),
    #[error("the scheduler ran sequence {0}, which the engine has no sampler for")]
    NoSampler(SeqId),
}

/// A scheduler, the model executor it feeds, and one sampler per live sequence.
#[derive(Debug)]
pub struct Engine<E> {
    scheduler: Scheduler,
    executor: E,
    samplers: HashMap<SeqId, Slot>,
}

/// How one sequence's tokens are chosen and reported.
#[derive(Debug)]
struct Slot {
    sampler: Sampler,
    /// `Request::logprobs`: how many alternatives to report with each token, if any.
    logprobs: Option<usize>,
}

impl<E: ModelExecutor> Engine<E> {
    /// An idle engine; `executor` must hold a pool of `config.num_blocks` x `config.block_size`.
    pub fn new(config: SchedulerConfig, executor: E) -> Result<Self, ConfigError> {
        Ok(Self {
            scheduler: Scheduler::new(config)?,
            executor,
            samplers: HashMap::new(),
        })
    }

    /// The scheduler, for statistics and audits.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The executor, for whoever built it.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// Queues a request sampled with `sampling`, or says why not.
    pub fn add(&mut self, request: Request, sampling: SamplingParams) -> Result<SeqId, Rejected> {
        let logprobs = request.logprobs;
        let id = self.scheduler.add(request)?;
        let sampler = Sampler::new(sampling);
        self.samplers.insert(id, Slot { sampler, logprobs });
        Ok(id)
    }

    /// Queues one sequence per entry of `samplings` (a request's `n` choices), sharing the
    /// prompt's cache, all or none; see [`Scheduler::add_group`].
    pub fn add_group(
        &mut self,
        request: Request,
        samplings: Vec<SamplingParams>,
    ) -> Result<Vec<SeqId>, Rejected> {
        let logprobs = request.logprobs;
        let ids = self.scheduler.add_group(request, samplings.len())?;
        for (&id, sampling) in ids.iter().zip(samplings) {
            let sampler = Sampler::new(sampling);
            self.samplers.insert(id, Slot { sampler, logprobs });
        }
        Ok(ids)
    }

    /// Ends a request at once, freeing its cache; returns its `Finished` event.
    pub fn cancel(&mut self, id: SeqId) -> Result<Event, UnknownSequence> {
        let usage = self.scheduler.cancel(id)?;
        self.samplers.remove(&id);
        Ok(Event::Finished {
            id,
            reason: StopReason::Caller,
            usage,
        })
    }

    /// Runs one step; returns its events (none when idle).
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        let step = self.scheduler.schedule();
        if step.is_empty() {
            return Ok(Vec::new());
        }
        let outputs = self
            .executor
            .execute(&step)
            .map_err(|source| EngineError::Executor {
                seqs: step.seqs.len(),
                tokens: step.num_tokens(),
                source,
            })?;
        let mut due = HashMap::new();
        for seq in step.seqs.iter().filter(|s| s.logits) {
            let id = seq.id;
            let logits = outputs
                .iter()
                .find(|(s, _)| *s == id)
                .map(|(_, l)| l.as_slice())
                .ok_or(EngineError::MissingLogits(id))?;
            if logits.is_empty() {
                return Err(EngineError::EmptyLogits(id));
            }
            if !self.samplers.contains_key(&id) {
                return Err(EngineError::NoSampler(id));
            }
            due.insert(id, (due.len(), logits));
        }
        // Each sequence's sampler and log-probabilities over the vocabulary, in parallel: at many
        // sequences this serial work would leave the other cores idle between forward passes.
        let scheduler = &self.scheduler;
        let mut slots: Vec<(usize, SeqId, &[f32], &mut Slot)> = self
            .samplers
            .iter_mut()
            .filter_map(|(id, slot)| due.get(id).map(|&(at, logits)| (at, *id, logits, slot)))
            .collect();
        let mut picks: Vec<(usize, SeqId, u32, Option<TokenLogprobs>)> = slots
            .par_iter_mut()
            .map(|(at, id, logits, slot)| {
                let history = scheduler.tokens(*id).unwrap_or_default();
                let token = slot.sampler.sample(logits, history);
                let logprobs = slot
                    .logprobs
                    .map(|top| TokenLogprobs::new(logits, token, top));
                (*at, *id, token, logprobs)
            })
            .collect();
        // In the step's order, as when sampled one after another.
        picks.sort_unstable_by_key(|&(at, ..)| at);
        let sampled: Vec<(SeqId, u32)> =
            picks.iter().map(|&(_, id, token, _)| (id, token)).collect();
        let mut logprobs: Vec<(SeqId, TokenLogprobs)> = picks
            .into_iter()
            .filter_map(|(_, id, _, lp)| lp.map(|lp| (id, lp)))
            .collect();
        let mut events = self.scheduler.on_step_done(&sampled);
        for event in &mut events {
            match event {
                Event::Finished { id, .. } => {
                    self.samplers.remove(id);
                }
                Event::Token {
                    id, logprobs: lp, ..
                } if !logprobs.is_empty() => {
                    if let Some(i) = logprobs.iter().position(|(s, _)| s == id) {
                        *lp = Some(Box::new(logprobs.swap_remove(i).1));
                    }
                }
                Event::Token { .. } => {}
            }
        }
        Ok(events)
    }

    /// Steps until nothing is waiting or running, passing every event to `on_event`; breaking on
    /// a `Token` event cancels that request (a stop string matched, the client left).
    pub fn run_until_idle(
        &mut self,
        mut on_event: impl FnMut(&Event) -> ControlFlow<()>,
    ) -> Result<(), EngineError> {
        while !self.scheduler.is_idle() {
            for event in self.step()? {
                let flow = on_event(&event);
                if let (Event::Token { id, .. }, ControlFlow::Break(())) = (&event, flow)
                    && let Ok(cancelled) = self.cancel(*id)
                {
                    // A Break on a request's last token finds it finished already.
                    let _ = on_event(&cancelled);
                }
            }
        }
        Ok(())
    }
}
