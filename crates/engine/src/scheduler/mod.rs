//! The serving scheduler: a plain state machine that decides, step by step, which sequences the
//! model runs and how many tokens each feeds, over a paged KV cache shared by all of them.
//!
//! It follows vLLM's scheduler (continuous batching, chunked prefill, preemption by recomputation,
//! automatic prefix caching) and text-generation-inference's queue (bounded, token budgets, owned by
//! one task and reached over channels). It has no threads and no async: the task that owns it calls
//! [`Scheduler::add`], [`Scheduler::cancel`], [`Scheduler::schedule`] and
//! [`Scheduler::on_step_done`]; [`Engine`] is that loop for a synchronous [`ModelExecutor`].
//!
//! Each step: running sequences that decode feed one token each, oldest first; then running
//! prefills feed chunks of what the token budget leaves; then waiting sequences are admitted, front
//! first, while the budget, the running limit and free blocks allow. When a running sequence needs a
//! block and none is free, the most recently admitted sequence is preempted: its blocks are freed
//! and it goes back to the front of the queue, keeping its generated tokens, to be recomputed
//! (mostly from the prefix cache) when it is admitted again. The oldest running sequence therefore
//! always progresses, and every admitted sequence fits the pool alone: nothing deadlocks.

pub mod blocks;
pub mod engine;
pub mod executor;
pub mod sequence;

use std::collections::{HashSet, VecDeque};

pub use blocks::{AccountingError, BlockId, BlockManager, BlockUsage};
pub use engine::{Engine, EngineError};
pub use executor::{ModelExecutor, ScheduledSeq, Step};
pub use sequence::{Event, Request, SeqId, Usage};

use sequence::Sequence;

/// Sizes and limits of a scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Most tokens, prompt plus generated, one sequence may hold.
    pub context: usize,
    /// Most tokens fed to the model in one step, prefill chunks and decodes together.
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; more are rejected.
    pub max_waiting: usize,
}

/// A configuration that cannot work, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("scheduler config: {0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "scheduler config: the pool holds {pool_tokens} tokens (num_blocks x block_size), less than one sequence of context {context}"
    )]
    PoolSmallerThanContext { pool_tokens: usize, context: usize },
    #[error(
        "scheduler config: max_step_tokens {max_step_tokens} is less than max_running {max_running}, so running sequences could not all decode in one step"
    )]
    BudgetBelowRunning {
        max_step_tokens: usize,
        max_running: usize,
    },
}

/// Why a request was not queued, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the server is busy: {max_waiting} requests are already waiting; retry later")]
    QueueFull { max_waiting: usize },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("max_tokens is 0: there is nothing to generate")]
    ZeroMaxTokens,
    #[error(
        "the prompt has {prompt} tokens, which leaves no room to generate in the context of {context} tokens"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error(
        "the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context of {context} tokens"
    )]
    ExceedsContext {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("n = {n} choices: between 1 and the queue's {max_waiting} are possible")]
    Choices { n: usize, max_waiting: usize },
    #[error(
        "n = {n} choices of max_tokens each need {tokens} cache tokens (the prompt counted once), more than the pool's {pool}: lower n or max_tokens"
    )]
    ChoicesExceedPool {
        n: usize,
        tokens: usize,
        pool: usize,
    },
}

/// The sequence is not waiting or running (finished, cancelled, or never added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sequence {0} is not waiting or running")]
pub struct UnknownSequence(pub SeqId);

/// Queue lengths and pool usage, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Waiting sequences, preempted ones included.
    pub waiting: usize,
    pub running: usize,
    pub blocks: BlockUsage,
}

/// Waiting and running sequences, the block manager, and the step in flight.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    /// Admission order: preempted sequences go back to the front.
    waiting: VecDeque<Sequence>,
    /// Admission order: the last is the first to be preempted.
    running: Vec<Sequence>,
    /// (sequence, tokens fed) of the step handed out and not yet done.
    in_flight: Vec<(SeqId, usize)>,
    next_id: u64,
}

/// The step being planned: (sequence, tokens to feed) and the token budget left.
struct Plan {
    seqs: Vec<(SeqId, usize)>,
    budget: usize,
}

impl Plan {
    fn push(&mut self, id: SeqId, n: usize) {
        self.seqs.push((id, n));
        self.budget -= n;
    }

    /// Takes a preempted sequence back out of the step, returning its tokens to the budget.
    fn remove(&mut self, id: SeqId) {
        if let Some(i) = self.seqs.iter().position(|&(s, _)| s == id) {
            self.budget += self.seqs.remove(i).1;
        }
    }
}

/// Which running sequences a pass over them schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// One pending token: a decode (or a prefill's last token).
    Decode,
    /// More than one pending token: a prefill, fed in chunks.
    Prefill,
}

impl Scheduler {
    /// An idle scheduler over an empty pool.
    pub fn new(config: SchedulerConfig) -> Result<Self, ConfigError> {
        for (field, value) in [
            ("num_blocks", config.num_blocks),
            ("block_size", config.block_size),
            ("context", config.context),
            ("max_step_tokens", config.max_step_tokens),
            ("max_running", config.max_running),
            ("max_waiting", config.max_waiting),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        let pool_tokens = config.num_blocks.saturating_mul(config.block_size);
        if pool_tokens < config.context {
            return Err(ConfigError::PoolSmallerThanContext {
                pool_tokens,
                context: config.context,
            });
        }
        if config.max_step_tokens < config.max_running {
            return Err(ConfigError::BudgetBelowRunning {
                max_step_tokens: config.max_step_tokens,
                max_running: config.max_running,
            });
        }
        Ok(Self {
            blocks: BlockManager::new(config.num_blocks, config.block_size),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: Vec::new(),
            next_id: 0,
        })
    }

    /// Queues a request at the back, or says why not.
    pub fn add(&mut self, request: Request) -> Result<SeqId, Rejected> {
        self.check(&request, 1)?;
        Ok(self.push(request, None))
    }

    /// Queues the `n` choices of one request as `n` sequences, all or none. The first is admitted
    /// as usual; the others wait at the front of the queue until it has computed the prompt, then
    /// find the prompt's full blocks in the prefix cache instead of computing them again (as vLLM's
    /// parallel sampling shares them). Together they must fit the pool, the prompt counted once.
    pub fn add_group(&mut self, request: Request, n: usize) -> Result<Vec<SeqId>, Rejected> {
        self.check(&request, n)?;
        let first = self.push(request.clone(), None);
        let mut ids = vec![first];
        for _ in 1..n {
            ids.push(self.push(request.clone(), Some(first)));
        }
        Ok(ids)
    }

    /// Why `n` sequences of `request` cannot be queued now, if they cannot.
    fn check(&self, request: &Request, n: usize) -> Result<(), Rejected> {
        let context = self.config.context;
        let prompt = request.prompt.len();
        if prompt == 0 {
            return Err(Rejected::EmptyPrompt);
        }
        if prompt >= context {
            return Err(Rejected::PromptTooLong { prompt, context });
        }
        match request.max_tokens {
            Some(0) => return Err(Rejected::ZeroMaxTokens),
            Some(max_tokens) if prompt + max_tokens > context => {
                return Err(Rejected::ExceedsContext {
                    prompt,
                    max_tokens,
                    context,
                });
            }
            _ => {}
        }
        let max_waiting = self.config.max_waiting;
        if n == 0 || n > max_waiting {
            return Err(Rejected::Choices { n, max_waiting });
        }
        let pool = self.config.num_blocks * self.config.block_size;
        let generated = request.max_tokens.unwrap_or(context - prompt);
        let tokens = prompt.saturating_add(n.saturating_mul(generated));
        if n > 1 && tokens > pool {
            return Err(Rejected::ChoicesExceedPool { n, tokens, pool });
        }
        if self.waiting.len() + n > max_waiting {
            return Err(Rejected::QueueFull { max_waiting });
        }
        Ok(())
    }

    fn push(&mut self, request: Request, after: Option<SeqId>) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let mut seq = Sequence::new(id, request, self.config.context);
        seq.after = after;
        self.waiting.push_back(seq);
        id
    }

    /// Drops a waiting or running sequence and frees its blocks at once. If it is in the step in
    /// flight, that step's result for it is ignored.
    pub fn cancel(&mut self, id: SeqId) -> Result<Usage, UnknownSequence> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            self.blocks.free(id);
            return Ok(seq.usage());
        }
        if let Some(i) = self.waiting.iter().position(|s| s.id == id)
            && let Some(seq) = self.waiting.remove(i)
        {
            return Ok(seq.usage());
        }
        Err(UnknownSequence(id))
    }

    /// Plans the next step. A step still in flight is dropped and its work planned again.
    pub fn schedule(&mut self) -> Step {
        let mut plan = Plan {
            seqs: Vec::new(),
            budget: self.config.max_step_tokens,
        };
        let mut preempted = false;
        // Decodes before prefill chunks: a long prompt never stalls a running decode.
        for pass in [Pass::Decode, Pass::Prefill] {
            let mut i = 0;
            while i < self.running.len() && plan.budget > 0 {
                let seq = &self.running[i];
                let pending = seq.pending();
                let wanted = match pass {
                    Pass::Decode => pending == 1,
                    Pass::Prefill => pending > 1,
                };
                if wanted {
                    let (id, n) = (seq.id, pending.min(plan.budget));
                    if self.reserve_or_preempt(i, seq.computed + n, &mut plan) {
                        plan.push(id, n);
                    } else {
                        preempted = true;
                    }
                }
                i += 1;
            }
        }
        // No admissions in a step that had to preempt: the pool is full.
        while !preempted && plan.budget > 0 && self.running.len() < self.config.max_running {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            if seq.after.is_some_and(|first| self.prefilling(first)) {
                // A later choice waits for the first to cache the prompt they share.
                break;
            }
            let Ok(admitted) = self.blocks.admit(seq.id, &seq.tokens, plan.budget) else {
                // First come, first served: later requests do not overtake the front one.
                break;
            };
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            seq.computed = admitted.hit_tokens;
            if seq.preemptions == 0 {
                seq.cached_tokens = admitted.hit_tokens;
            }
            plan.push(seq.id, admitted.to_compute);
            self.running.push(seq);
        }
        self.in_flight = plan.seqs;
        self.step()
    }

    /// Takes the results of the step in flight: the tokens sampled from the logits it returned.
    /// Finished sequences release their blocks; a sequence whose logits were wanted but which got
    /// no token is planned again as if the step had not run for it.
    pub fn on_step_done(&mut self, sampled: &[(SeqId, u32)]) -> Vec<Event> {
        let mut events = Vec::new();
        for (id, n) in std::mem::take(&mut self.in_flight) {
            // Cancelled while the step ran.
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let seq = &mut self.running[i];
            let token = if seq.computed + n == seq.tokens.len() {
                match sampled.iter().find(|&&(s, _)| s == id) {
                    Some(&(_, token)) => Some(token),
                    None => continue,
                }
            } else {
                None
            };
            seq.computed += n;
            self.blocks.commit(id, &seq.tokens[..seq.computed]);
            let Some(token) = token else {
                continue;
            };
            let (event, stop) = seq.accept(token);
            events.extend(event);
            if let Some(reason) = stop {
                let usage = seq.usage();
                self.running.remove(i);
                self.blocks.free(id);
                events.push(Event::Finished { id, reason, usage });
            }
        }
        events
    }

    /// Whether `id` is running and has not computed its whole prompt yet.
    fn prefilling(&self, id: SeqId) -> bool {
        self.running
            .iter()
            .any(|s| s.id == id && s.computed < s.prompt_len)
    }

    /// Prompt and generated tokens of a waiting or running sequence: the sampler's history.
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
            .map(|s| s.tokens.as_slice())
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queue lengths and pool usage.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            blocks: self.blocks.usage(),
        }
    }

    /// Checks the block accounting and that exactly the running sequences hold blocks, enough for
    /// what they have computed.
    pub fn audit(&self) -> Result<(), AccountingError> {
        self.blocks.audit()?;
        let block_size = self.config.block_size;
        for seq in &self.running {
            let held = self.blocks.table(seq.id).len();
            if held * block_size < seq.computed {
                return Err(AccountingError(format!(
                    "running sequence {} computed {} tokens but holds {held} blocks",
                    seq.id, seq.computed
                )));
            }
        }
        for seq in &self.waiting {
            if !self.blocks.table(seq.id).is_empty() || seq.computed != 0 {
                return Err(AccountingError(format!(
                    "waiting sequence {} holds blocks or computed tokens",
                    seq.id
                )));
            }
        }
        let held: HashSet<BlockId> = self
            .running
            .iter()
            .flat_map(|s| self.blocks.table(s.id))
            .copied()
            .collect();
        let in_use = self.blocks.usage().in_use;
        if held.len() != in_use {
            return Err(AccountingError(format!(
                "{in_use} blocks in use but running sequences hold {}",
                held.len()
            )));
        }
        Ok(())
    }

    /// Grows `running[i]`'s blocks to cover `len` tokens, preempting the most recently admitted
    /// sequences until they fit. False if `running[i]` itself had to be preempted.
    fn reserve_or_preempt(&mut self, i: usize, len: usize, plan: &mut Plan) -> bool {
        let id = self.running[i].id;
        while self.blocks.reserve(id, len).is_err() {
            // `running[i]` is still running, so there is a last one.
            let Some(mut victim) = self.running.pop() else {
                return false;
            };
            plan.remove(victim.id);
            self.blocks.free(victim.id);
            victim.computed = 0;
            victim.preemptions += 1;
            let is_self = victim.id == id;
            self.waiting.push_front(victim);
            if is_self {
                return false;
            }
        }
        true
    }

    /// The step for the planned sequences.
    fn step(&self) -> Step {
        let seqs = self
            .in_flight
            .iter()
            .filter_map(|&(id, n)| {
                let seq = self.running.iter().find(|s| s.id == id)?;
                let end = seq.computed + n;
                Some(ScheduledSeq {
                    id,
                    tokens: seq.tokens[seq.computed..end].to_vec(),
                    start: seq.computed,
                    block_table: self.blocks.table(id).to_vec(),
                    logits: end == seq.tokens.len(),
                })
            })
            .collect();
        Step {
            block_size: self.config.block_size,
            seqs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::StopReason;

    fn scheduler(num_blocks: usize, max_step_tokens: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            num_blocks,
            block_size: 2,
            context: 8,
            max_step_tokens,
            max_running: 4,
            max_waiting: 8,
        })
        .unwrap()
    }

    fn add(s: &mut Scheduler, prompt: &[u32], max_tokens: usize) -> SeqId {
        let request = Request {
            prompt: prompt.to_vec(),
            max_tokens: Some(max_tokens),
            stop_ids: vec![],
            logprobs: None,
        };
        s.add(request).unwrap()
    }

    /// Completes the step in flight, sampling token 1 for every sequence that wants one.
    fn finish_step(s: &mut Scheduler, step: &Step) -> Vec<Event> {
        let sampled: Vec<_> = step
            .seqs
            .iter()
            .filter(|q| q.logits)
            .map(|q| (q.id, 1))
            .collect();
        let events = s.on_step_done(&sampled);
        s.audit().unwrap();
        events
    }

    fn plan(step: &Step) -> Vec<(SeqId, usize, usize)> {
        step.seqs
            .iter()
            .map(|q| (q.id, q.start, q.tokens.len()))
            .collect()
    }

    #[test]
    fn the_most_recently_admitted_is_preempted_and_keeps_its_tokens() {
        // Four blocks of two slots: two sequences of 3 prompt tokens fill them by their 5th token.
        let mut s = scheduler(4, 8);
        let a = add(&mut s, &[9, 9, 9], 5);
        let b = add(&mut s, &[8, 8, 8], 5);
        let step = s.schedule();
        assert_eq!(plan(&step), vec![(a, 0, 3), (b, 0, 3)]);
        finish_step(&mut s, &step);
        let step = s.schedule();
        finish_step(&mut s, &step);
        // Each has computed 4 tokens in 2 blocks; the next needs a third block and none is free:
        // b, admitted last, goes back to the queue with its generated tokens, and a runs on.
        let step = s.schedule();
        assert_eq!(plan(&step), vec![(a, 4, 1)]);
        assert_eq!(s.stats().waiting, 1);
        assert_eq!(s.tokens(b), Some(&[8, 8, 8, 1, 1][..]));
        finish_step(&mut s, &step);
        while s.tokens(a).is_some() {
            let step = s.schedule();
            assert_eq!(step.seqs.len(), 1, "b waits while a needs the pool");
            finish_step(&mut s, &step);
        }
        // a took b's cached blocks too, so b recomputes all it had, then generates on.
        let step = s.schedule();
        assert_eq!(plan(&step), vec![(b, 0, 5)]);
        let mut events = finish_step(&mut s, &step);
        while !s.is_idle() {
            let step = s.schedule();
            events.extend(finish_step(&mut s, &step));
        }
        let Some(Event::Finished { usage, .. }) = events.last() else {
            panic!("b finishes");
        };
        assert_eq!((usage.completion_tokens, usage.preemptions), (5, 1));
    }

    fn request(prompt: &[u32], max_tokens: usize) -> Request {
        Request {
            prompt: prompt.to_vec(),
            max_tokens: Some(max_tokens),
            stop_ids: vec![],
            logprobs: None,
        }
    }

    #[test]
    fn later_choices_wait_for_the_first_to_cache_the_prompt() {
        let mut s = scheduler(16, 8);
        let ids = s.add_group(request(&[1, 2, 3, 4, 5], 2), 3).unwrap();
        // Only the first is admitted while it computes the prompt.
        let step = s.schedule();
        assert_eq!(plan(&step), vec![(ids[0], 0, 5)]);
        finish_step(&mut s, &step);
        // The prompt's two full blocks are cached now: the others compute only its last token.
        let step = s.schedule();
        assert_eq!(
            plan(&step),
            vec![(ids[0], 5, 1), (ids[1], 4, 1), (ids[2], 4, 1)]
        );
        assert_eq!(s.stats().blocks.hit_tokens, 8);
        let mut events = finish_step(&mut s, &step);
        while !s.is_idle() {
            let step = s.schedule();
            events.extend(finish_step(&mut s, &step));
        }
        let cached: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finished { usage, .. } => Some(usage.cached_tokens),
                Event::Token { .. } => None,
            })
            .collect();
        assert_eq!(cached, vec![0, 4, 4]);
    }

    #[test]
    fn a_group_is_queued_whole_or_not_at_all() {
        // 16 blocks of 2 slots: 32 tokens; 8 may wait.
        let mut s = scheduler(16, 8);
        let choices = |n| Rejected::Choices { n, max_waiting: 8 };
        assert_eq!(s.add_group(request(&[1, 2, 3], 5), 0), Err(choices(0)));
        assert_eq!(s.add_group(request(&[1, 2, 3], 1), 9), Err(choices(9)));
        // 3 + 6 x 5 = 33 tokens do not fit the pool; 3 + 5 x 5 = 28 do.
        assert_eq!(
            s.add_group(request(&[1, 2, 3], 5), 6),
            Err(Rejected::ChoicesExceedPool {
                n: 6,
                tokens: 33,
                pool: 32
            })
        );
        assert_eq!(s.add_group(request(&[1, 2, 3], 5), 5).unwrap().len(), 5);
        assert_eq!(
            s.add_group(request(&[4, 5], 1), 4),
            Err(Rejected::QueueFull { max_waiting: 8 })
        );
        assert_eq!(s.stats().waiting, 5);
        assert_eq!(s.add_group(request(&[4, 5], 1), 3).unwrap().len(), 3);
    }

    #[test]
    fn a_sequence_cancelled_during_its_step_is_ignored_when_the_step_completes() {
        let mut s = scheduler(8, 8);
        let a = add(&mut s, &[1, 2, 3], 4);
        let b = add(&mut s, &[4, 5, 6], 4);
        let step = s.schedule();
        assert_eq!(s.cancel(a).unwrap().completion_tokens, 0);
        assert_eq!(s.stats().blocks.in_use, 2);
        let events = finish_step(&mut s, &step);
        assert_eq!(
            events,
            vec![Event::Token {
                id: b,
                token: 1,
                logprobs: None
            }]
        );
    }

    #[test]
    fn a_step_without_the_wanted_token_or_never_completed_is_planned_again() {
        let mut s = scheduler(8, 8);
        let a = add(&mut s, &[1, 2, 3], 4);
        let first = s.schedule();
        // The model gave no token for `a`: nothing advances.
        assert!(s.on_step_done(&[]).is_empty());
        s.audit().unwrap();
        assert_eq!(s.schedule(), first);
        // Planning again without completing drops the step in flight.
        assert_eq!(s.schedule(), first);
        finish_step(&mut s, &first);
        assert_eq!(plan(&s.schedule()), vec![(a, 3, 1)]);
    }

    #[test]
    fn finishing_releases_blocks_and_reports_usage() {
        let mut s = scheduler(8, 8);
        let a = add(&mut s, &[1, 2, 3], 2);
        let mut events = Vec::new();
        while !s.is_idle() {
            let step = s.schedule();
            events.extend(finish_step(&mut s, &step));
        }
        let usage = Usage {
            prompt_tokens: 3,
            cached_tokens: 0,
            completion_tokens: 2,
            preemptions: 0,
        };
        assert_eq!(
            events.last(),
            Some(&Event::Finished {
                id: a,
                reason: StopReason::Length,
                usage
            })
        );
        assert_eq!(s.stats().blocks.in_use, 0);
    }
}
