//! The serving loop for a synchronous executor: schedule a step, run it, sample each sequence's next
//! token with its own sampler, and report tokens and finishes as [`Event`]s.
//!
//! The owner of an [`Engine`] (the server's engine task) calls [`Engine::add`] and [`Engine::cancel`]
//! between steps as requests arrive over its channels, and [`Engine::step`] while work remains.

use std::collections::HashMap;
use std::ops::ControlFlow;

use tiefsee_model::ModelError;

use super::executor::ModelExecutor;
use super::sequence::{Event, Request, SeqId};
use super::{ConfigError, Rejected, Scheduler, UnknownSequence};
use crate::generate::StopReason;
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

/// A scheduler, the model executor it feeds, and one sampler per live request.
#[derive(Debug)]
pub struct Engine<E> {
    scheduler: Scheduler,
    executor: E,
    samplers: HashMap<SeqId, Sampler>,
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
        let id = self.scheduler.add(request)?;
        self.samplers.insert(id, Sampler::new(sampling));
        Ok(id)
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
        let mut sampled = Vec::new();
        for seq in step.seqs.iter().filter(|s| s.logits) {
            let id = seq.id;
            let logits = outputs
                .iter()
                .find(|(s, _)| *s == id)
                .map(|(_, l)| l)
                .ok_or(EngineError::MissingLogits(id))?;
            if logits.is_empty() {
                return Err(EngineError::EmptyLogits(id));
            }
            let sampler = self
                .samplers
                .get_mut(&id)
                .ok_or(EngineError::NoSampler(id))?;
            let history = self.scheduler.tokens(id).unwrap_or_default();
            sampled.push((id, sampler.sample(logits, history)));
        }
        let events = self.scheduler.on_step_done(&sampled);
        for event in &events {
            if let Event::Finished { id, .. } = event {
                self.samplers.remove(id);
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
