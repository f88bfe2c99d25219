//! The serving scheduler against a mock model: batching, token budgets, chunked prefill,
//! preemption, cancellation, prefix sharing and admission control, with the block accounting
//! audited after every step.
//!
//! The mock keeps a real paged pool: each fed token is written into the slot its block table names,
//! and logits are a function of the whole context read back through the table. A wrong table, a
//! block reused while still held, or a shared block overwritten changes the tokens, so "same tokens
//! as when run alone" checks the cache bookkeeping end to end.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiefsee_engine::sampler::{Sampler, SamplingParams};
use tiefsee_engine::scheduler::{
    ConfigError, Engine, EngineError, Event, ModelExecutor, Rejected, Request, Scheduler,
    SchedulerConfig, SeqId, Step, UnknownSequence, Usage,
};
use tiefsee_engine::{StopReason, TokenLogprobs};
use tiefsee_model::{ModelError, Result};

const VOCAB: usize = 64;

/// The mock's next-token distribution given a whole context: peaked at a hash of it.
fn mock_logits(context: &[u32]) -> Vec<f32> {
    // FNV-1a over the token ids.
    let hash = context.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3)
    });
    let peak = (hash % VOCAB as u64) as usize;
    (0..VOCAB)
        .map(|v| -(((v + VOCAB - peak) % VOCAB) as f32) * 0.4)
        .collect()
}

/// A model whose cache is a paged pool of token ids, recording every step it runs.
struct MockModel {
    /// (num_blocks * block_size) slots: the token whose KV entry each slot holds.
    slots: Vec<Option<u32>>,
    steps: Vec<Step>,
    /// Index of a step to fail, once.
    fail_at: Option<usize>,
}

impl MockModel {
    fn new(config: &SchedulerConfig) -> Self {
        Self {
            slots: vec![None; config.num_blocks * config.block_size],
            steps: Vec::new(),
            fail_at: None,
        }
    }
}

impl ModelExecutor for MockModel {
    fn execute(&mut self, step: &Step) -> Result<Vec<(SeqId, Vec<f32>)>> {
        self.steps.push(step.clone());
        if self.fail_at == Some(self.steps.len() - 1) {
            self.fail_at = None;
            return Err(ModelError::EmptyInput);
        }
        let bs = step.block_size;
        let slot = |table: &[u32], p: usize| table[p / bs] as usize * bs + p % bs;
        for seq in &step.seqs {
            assert!(
                !seq.tokens.is_empty(),
                "{} is scheduled with no tokens",
                seq.id
            );
            for (i, &token) in seq.tokens.iter().enumerate() {
                self.slots[slot(&seq.block_table, seq.start + i)] = Some(token);
            }
        }
        let mut out = Vec::new();
        for seq in step.seqs.iter().filter(|s| s.logits) {
            let context: Vec<u32> = (0..seq.start + seq.tokens.len())
                .map(|p| {
                    let s = slot(&seq.block_table, p);
                    self.slots[s].unwrap_or_else(|| panic!("{} reads empty slot {s}", seq.id))
                })
                .collect();
            out.push((seq.id, mock_logits(&context)));
        }
        Ok(out)
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    reason: StopReason,
    usage: Usage,
}

/// What the request gives when generated alone, straight from the mock's distribution.
fn reference(
    request: &Request,
    sampling: &SamplingParams,
    context: usize,
) -> (Vec<u32>, StopReason) {
    let mut sampler = Sampler::new(sampling.clone());
    let mut history = request.prompt.clone();
    let mut generated = Vec::new();
    loop {
        let token = sampler.sample(&mock_logits(&history), &history);
        if request.stop_ids.contains(&token) {
            return (generated, StopReason::StopToken);
        }
        generated.push(token);
        history.push(token);
        if request.max_tokens == Some(generated.len()) {
            return (generated, StopReason::Length);
        }
        if history.len() >= context {
            return (generated, StopReason::ContextFull);
        }
    }
}

fn config(num_blocks: usize, block_size: usize, max_step_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        num_blocks,
        block_size,
        context: 64,
        max_step_tokens,
        max_running: 8,
        max_waiting: 32,
    }
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        seed,
        ..SamplingParams::default()
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens: Some(max_tokens),
        stop_ids: Vec::new(),
        logprobs: None,
    }
}

/// A prompt of `len` tokens that differs for each `salt`.
fn prompt(salt: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (salt * 7 + i * 3) % VOCAB as u32)
        .collect()
}

/// Collects events into outcomes, checking their order: tokens, then exactly one `Finished`.
#[derive(Default)]
struct Collector {
    tokens: HashMap<SeqId, Vec<u32>>,
    done: BTreeMap<SeqId, Outcome>,
}

impl Collector {
    fn take(&mut self, events: Vec<Event>) {
        for event in events {
            self.take_one(&event);
        }
    }

    fn take_one(&mut self, event: &Event) {
        match *event {
            Event::Token { id, token, .. } => {
                assert!(
                    !self.done.contains_key(&id),
                    "{id} produced a token after finishing"
                );
                self.tokens.entry(id).or_default().push(token);
            }
            Event::Finished { id, reason, usage } => {
                let tokens = self.tokens.remove(&id).unwrap_or_default();
                assert_eq!(usage.completion_tokens, tokens.len(), "{id} usage");
                let outcome = Outcome {
                    tokens,
                    reason,
                    usage,
                };
                assert!(
                    self.done.insert(id, outcome).is_none(),
                    "{id} finished twice"
                );
            }
        }
    }
}

/// Steps until idle, auditing the books after every step; then every block must be free.
fn run(engine: &mut Engine<MockModel>, collector: &mut Collector) {
    let mut guard = 0;
    while !engine.scheduler().is_idle() {
        collector.take(engine.step().unwrap());
        engine.scheduler().audit().unwrap();
        guard += 1;
        assert!(guard < 10_000, "no progress");
    }
    let blocks = engine.scheduler().stats().blocks;
    assert_eq!(
        (blocks.in_use, blocks.free),
        (0, blocks.total),
        "blocks leaked"
    );
}

/// Adds `requests` and checks each ends as when generated alone.
fn run_and_compare(
    engine: &mut Engine<MockModel>,
    requests: Vec<(Request, SamplingParams)>,
) -> BTreeMap<SeqId, Outcome> {
    let mut ids = Vec::new();
    for (r, s) in &requests {
        ids.push(engine.add(r.clone(), s.clone()).unwrap());
    }
    let mut collector = Collector::default();
    run(engine, &mut collector);
    for (id, (r, s)) in ids.iter().zip(&requests) {
        let outcome = &collector.done[id];
        let (tokens, reason) = reference(r, s, 64);
        assert_eq!((&outcome.tokens, outcome.reason), (&tokens, reason), "{id}");
        assert_eq!(outcome.usage.prompt_tokens, r.prompt.len());
    }
    collector.done
}

fn engine(config: SchedulerConfig) -> Engine<MockModel> {
    let mock = MockModel::new(&config);
    Engine::new(config, mock).unwrap()
}

#[test]
fn requests_decode_together_and_a_late_one_joins_the_next_step() {
    let mut e = engine(config(64, 4, 64));
    let mut collector = Collector::default();
    let mut requests: Vec<(SeqId, Request)> = (0..4)
        .map(|i| {
            let r = request(prompt(i, 5 + i as usize), 10);
            (e.add(r.clone(), greedy()).unwrap(), r)
        })
        .collect();
    collector.take(e.step().unwrap());
    collector.take(e.step().unwrap());
    let late = request(prompt(9, 6), 10);
    requests.push((e.add(late.clone(), greedy()).unwrap(), late));
    collector.take(e.step().unwrap());
    let steps = &e.executor().steps;
    // Step 1: the four prompts prefill together, each producing its first token.
    let first: Vec<SeqId> = steps[0].seqs.iter().map(|s| s.id).collect();
    assert_eq!(first, requests[..4].iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(steps[0].seqs.iter().all(|s| s.logits && s.start == 0));
    // Step 2: four decodes of one token each, at the position after the prompt.
    for (i, s) in steps[1].seqs.iter().enumerate() {
        assert_eq!((s.tokens.len(), s.start, s.logits), (1, 5 + i, true));
    }
    // Step 3: the late request prefills beside the decodes.
    assert_eq!(steps[2].seqs.len(), 5);
    assert_eq!(
        (steps[2].seqs[4].id, steps[2].seqs[4].tokens.len()),
        (requests[4].0, 6)
    );
    run(&mut e, &mut collector);
    for (id, r) in &requests {
        assert_eq!(collector.done[id].tokens, reference(r, &greedy(), 64).0);
    }
}

#[test]
fn steps_keep_the_budget_and_a_long_prompt_is_chunked_beside_decodes() {
    let budget = 8;
    let mut e = engine(config(64, 4, budget));
    let short = request(prompt(1, 3), 30);
    let long = request(prompt(2, 50), 5);
    let a = e.add(short.clone(), greedy()).unwrap();
    let mut collector = Collector::default();
    collector.take(e.step().unwrap());
    let b = e.add(long.clone(), greedy()).unwrap();
    run(&mut e, &mut collector);
    let steps = &e.executor().steps;
    assert!(steps.iter().all(|s| s.num_tokens() <= budget));
    // The long prompt arrives in chunks of what the decode leaves, in order, logits on the last.
    let chunks: Vec<_> = steps
        .iter()
        .filter_map(|s| s.seqs.iter().find(|q| q.id == b && q.start < 50))
        .collect();
    assert_eq!(chunks.len(), 50_usize.div_ceil(budget - 1));
    let fed: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.clone()).collect();
    assert_eq!(fed, long.prompt);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.start, i * (budget - 1));
        assert_eq!(c.logits, i == chunks.len() - 1);
    }
    // The short request decoded in every one of those steps.
    for s in steps
        .iter()
        .filter(|s| s.seqs.iter().any(|q| q.id == b && q.start < 50))
    {
        assert!(s.seqs.iter().any(|q| q.id == a && q.tokens.len() == 1));
    }
    assert_eq!(
        collector.done[&a].tokens,
        reference(&short, &greedy(), 64).0
    );
    assert_eq!(collector.done[&b].tokens, reference(&long, &greedy(), 64).0);
}

#[test]
fn a_pool_too_small_for_all_preempts_and_still_gives_the_same_tokens() {
    // 16 blocks of 4 hold 64 tokens; six requests of up to 34 tokens each need 204.
    let mut e = engine(config(16, 4, 16));
    let requests = (0..6)
        .map(|i| (request(prompt(i, 10 + i as usize), 24), sampled(i.into())))
        .collect();
    let done = run_and_compare(&mut e, requests);
    assert!(done.values().any(|o| o.usage.preemptions > 0), "{done:?}");
    // Preempted requests are recomputed from the prefix cache where it survived.
    assert!(e.scheduler().stats().blocks.hit_tokens > 0);
}

#[test]
fn cancel_frees_blocks_at_once_and_leaves_others_alone() {
    let mut e = engine(SchedulerConfig {
        max_running: 2,
        ..config(64, 4, 64)
    });
    let requests: Vec<Request> = (0..3).map(|i| request(prompt(i, 9), 20)).collect();
    let ids: Vec<SeqId> = requests
        .iter()
        .map(|r| e.add(r.clone(), greedy()).unwrap())
        .collect();
    let mut collector = Collector::default();
    for _ in 0..3 {
        collector.take(e.step().unwrap());
    }
    // Two run (9 + 3 tokens computed: 3 blocks each), the third waits.
    let before = e.scheduler().stats();
    assert_eq!(
        (before.running, before.waiting, before.blocks.in_use),
        (2, 1, 6)
    );
    collector.take_one(&e.cancel(ids[0]).unwrap());
    let after = e.scheduler().stats();
    assert_eq!((after.running, after.blocks.in_use), (1, 3));
    e.scheduler().audit().unwrap();
    let cancelled = &collector.done[&ids[0]];
    assert_eq!(
        (cancelled.reason, cancelled.tokens.len()),
        (StopReason::Caller, 3)
    );
    assert_eq!(e.cancel(ids[0]), Err(UnknownSequence(ids[0])));
    run(&mut e, &mut collector);
    for (id, r) in ids.iter().zip(&requests).skip(1) {
        assert_eq!(collector.done[id].tokens, reference(r, &greedy(), 64).0);
    }
    // A waiting request can be cancelled too; it held nothing.
    let waiting = e.add(requests[0].clone(), greedy()).unwrap();
    assert_eq!(e.cancel(waiting).map(|_| ()), Ok(()));
    assert!(e.scheduler().is_idle());
}

#[test]
fn a_common_prefix_is_computed_once_and_reported() {
    let mut e = engine(config(64, 4, 64));
    let base = prompt(3, 14);
    let first = request(base.clone(), 4);
    run_and_compare(&mut e, vec![(first, greedy())]);
    // Shares two full blocks (8 tokens) and half of a third with the finished request.
    let mut second = base[..10].to_vec();
    second.extend([60, 61, 62, 63, 1, 2]);
    let second = request(second, 6);
    let b = e.add(second.clone(), greedy()).unwrap();
    let mut collector = Collector::default();
    collector.take(e.step().unwrap());
    let first_step = &e.executor().steps.last().unwrap().seqs[0];
    assert_eq!((first_step.id, first_step.start), (b, 8));
    assert_eq!(first_step.tokens, second.prompt[8..]);
    // While it runs, a third shares its first three blocks, one of them computed by the second.
    let mut third = second.prompt[..12].to_vec();
    third.extend([5, 5, 5]);
    let third = request(third, 6);
    let c = e.add(third.clone(), greedy()).unwrap();
    collector.take(e.step().unwrap());
    let step = e.executor().steps.last().unwrap();
    let c_step = step.seqs.iter().find(|s| s.id == c).unwrap();
    let b_step = step.seqs.iter().find(|s| s.id == b).unwrap();
    assert_eq!(c_step.start, 12);
    assert_eq!(c_step.block_table[..3], b_step.block_table[..3]);
    run(&mut e, &mut collector);
    assert_eq!(collector.done[&b].usage.cached_tokens, 8);
    assert_eq!(collector.done[&c].usage.cached_tokens, 12);
    assert_eq!(
        collector.done[&b].tokens,
        reference(&second, &greedy(), 64).0
    );
    assert_eq!(
        collector.done[&c].tokens,
        reference(&third, &greedy(), 64).0
    );
    let blocks = e.scheduler().stats().blocks;
    assert_eq!(blocks.hit_tokens, 8 + 12);
    assert_eq!(blocks.miss_tokens, 14 + (16 - 8) + (15 - 12));
    // A prompt cached in full still computes its last block: its last token's logits are needed.
    let again = e.add(second.clone(), greedy()).unwrap();
    collector.take(e.step().unwrap());
    let step = &e.executor().steps.last().unwrap().seqs[0];
    assert_eq!((step.id, step.start, step.logits), (again, 12, true));
    run(&mut e, &mut collector);
    assert_eq!(
        collector.done[&again].tokens,
        reference(&second, &greedy(), 64).0
    );
}

#[test]
fn a_full_queue_and_impossible_requests_are_rejected_with_reasons() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_waiting: 2,
        ..config(64, 4, 64)
    })
    .unwrap();
    s.add(request(vec![1], 1)).unwrap();
    s.add(request(vec![1], 1)).unwrap();
    let full = s.add(request(vec![1], 1)).unwrap_err();
    assert_eq!(full, Rejected::QueueFull { max_waiting: 2 });
    assert!(full.to_string().contains("busy"), "{full}");
    // Admitted requests leave room in the queue.
    s.schedule();
    s.add(request(vec![1], 1)).unwrap();

    let too_long = s.add(request(vec![1; 64], 1)).unwrap_err();
    assert_eq!(
        too_long,
        Rejected::PromptTooLong {
            prompt: 64,
            context: 64
        }
    );
    let beyond = s.add(request(vec![1; 60], 5)).unwrap_err();
    assert_eq!(
        beyond,
        Rejected::ExceedsContext {
            prompt: 60,
            max_tokens: 5,
            context: 64
        }
    );
    assert!(beyond.to_string().contains("max_tokens (5)"), "{beyond}");
    assert_eq!(s.add(request(vec![], 1)), Err(Rejected::EmptyPrompt));
    assert_eq!(s.add(request(vec![1], 0)), Err(Rejected::ZeroMaxTokens));
}

#[test]
fn configs_that_cannot_work_are_refused() {
    let bad = |c: SchedulerConfig| Scheduler::new(c).unwrap_err();
    assert_eq!(
        bad(SchedulerConfig {
            block_size: 0,
            ..config(64, 4, 64)
        }),
        ConfigError::Zero("block_size")
    );
    assert_eq!(
        bad(config(15, 4, 64)),
        ConfigError::PoolSmallerThanContext {
            pool_tokens: 60,
            context: 64
        }
    );
    assert_eq!(
        bad(config(16, 4, 4)),
        ConfigError::BudgetBelowRunning {
            max_step_tokens: 4,
            max_running: 8
        }
    );
}

#[test]
fn stop_tokens_and_the_context_end_generation() {
    let mut e = engine(config(64, 4, 64));
    let base = request(prompt(4, 10), 20);
    let (expected, _) = reference(&base, &greedy(), 64);
    // Stop on the third generated token: two come out, the stop token does not.
    let stopping = Request {
        stop_ids: vec![expected[2]],
        ..base.clone()
    };
    let unbounded = Request {
        max_tokens: None,
        ..base
    };
    let done = run_and_compare(&mut e, vec![(stopping, greedy()), (unbounded, greedy())]);
    let outcomes: Vec<_> = done.values().collect();
    let first_stop = expected.iter().position(|&t| t == expected[2]).unwrap();
    assert_eq!(outcomes[0].reason, StopReason::StopToken);
    assert_eq!(outcomes[0].tokens, expected[..first_stop]);
    assert_eq!(outcomes[1].reason, StopReason::ContextFull);
    assert_eq!(outcomes[1].tokens.len(), 64 - 10);
}

#[test]
fn a_failed_step_is_planned_again() {
    let c = config(64, 4, 64);
    let mut mock = MockModel::new(&c);
    mock.fail_at = Some(3);
    let mut e = Engine::new(c, mock).unwrap();
    let requests: Vec<Request> = (0..3).map(|i| request(prompt(i, 6), 8)).collect();
    let ids: Vec<SeqId> = requests
        .iter()
        .map(|r| e.add(r.clone(), sampled(7)).unwrap())
        .collect();
    let mut collector = Collector::default();
    let mut failures = 0;
    while !e.scheduler().is_idle() {
        match e.step() {
            Ok(events) => collector.take(events),
            Err(EngineError::Executor { seqs, .. }) => {
                assert_eq!(seqs, 3);
                failures += 1;
            }
            Err(other) => panic!("{other}"),
        }
        e.scheduler().audit().unwrap();
    }
    assert_eq!(failures, 1);
    for (id, r) in ids.iter().zip(&requests) {
        assert_eq!(collector.done[id].tokens, reference(r, &sampled(7), 64).0);
    }
}

#[test]
fn run_until_idle_streams_events_and_a_break_cancels() {
    let mut e = engine(config(64, 4, 64));
    let long = e.add(request(prompt(1, 5), 20), greedy()).unwrap();
    let other = e.add(request(prompt(2, 5), 6), greedy()).unwrap();
    let mut collector = Collector::default();
    e.run_until_idle(|event| {
        collector.take_one(event);
        match event {
            Event::Token { id, .. } if *id == long && collector.tokens[id].len() == 3 => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    })
    .unwrap();
    assert_eq!(collector.done[&long].reason, StopReason::Caller);
    assert_eq!(collector.done[&long].tokens.len(), 3);
    assert_eq!(collector.done[&other].reason, StopReason::Length);
    assert_eq!(e.scheduler().stats().blocks.in_use, 0);
}

#[test]
fn random_traffic_keeps_the_books_balanced() {
    let mut rng = StdRng::seed_from_u64(11);
    // A small pool, short budget and shared prefixes: preemption, chunking and sharing all happen.
    let mut e = engine(SchedulerConfig {
        max_running: 6,
        ..config(20, 4, 12)
    });
    let prefixes: Vec<Vec<u32>> = (0..3).map(|i| prompt(i, 9)).collect();
    let mut live: Vec<(SeqId, Request, SamplingParams)> = Vec::new();
    let mut cancelled = Vec::new();
    let mut collector = Collector::default();
    for round in 0..400 {
        if round < 300 && rng.random_bool(0.3) {
            let mut p = prefixes[rng.random_range(0..3)][..rng.random_range(1..=9)].to_vec();
            p.extend((0..rng.random_range(0..12)).map(|_| rng.random_range(0..VOCAB as u32)));
            let r = request(p, rng.random_range(1..=20));
            let s = sampled(round);
            match e.add(r.clone(), s.clone()) {
                Ok(id) => live.push((id, r, s)),
                Err(Rejected::QueueFull { .. }) => {}
                Err(other) => panic!("{other}"),
            }
        }
        if !live.is_empty() && rng.random_bool(0.05) {
            let (id, ..) = live.swap_remove(rng.random_range(0..live.len()));
            if let Ok(event) = e.cancel(id) {
                collector.take_one(&event);
                cancelled.push(id);
            }
        }
        collector.take(e.step().unwrap());
        e.scheduler().audit().unwrap();
    }
    run(&mut e, &mut collector);
    for (id, r, s) in &live {
        let outcome = &collector.done[id];
        assert_eq!(outcome.tokens, reference(r, s, 64).0, "{id}");
    }
    for id in &cancelled {
        assert!(collector.done.contains_key(id));
    }
    let steps = &e.executor().steps;
    assert!(
        steps
            .iter()
            .all(|s| s.num_tokens() <= 12 && s.seqs.len() <= 6)
    );
    let stats = e.scheduler().stats().blocks;
    assert!(stats.hit_tokens > 0 && stats.cached > 0, "{stats:?}");
}

#[test]
fn a_group_samples_each_choice_alone_shares_the_prompt_and_reports_logprobs() {
    let mut e = engine(config(64, 4, 64));
    let r = Request {
        logprobs: Some(3),
        ..request(prompt(3, 13), 6)
    };
    let base = sampled(11);
    let samplings: Vec<_> = (0..3).map(|i| base.for_choice(i)).collect();
    let ids = e.add_group(r.clone(), samplings.clone()).unwrap();
    let mut collector = Collector::default();
    let mut logprobs: HashMap<SeqId, Vec<TokenLogprobs>> = HashMap::new();
    while !e.scheduler().is_idle() {
        let events = e.step().unwrap();
        for event in &events {
            if let Event::Token {
                id, logprobs: lp, ..
            } = event
            {
                logprobs.entry(*id).or_default().push(*lp.clone().unwrap());
            }
        }
        collector.take(events);
        e.scheduler().audit().unwrap();
    }
    let mut outputs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let outcome = &collector.done[id];
        // Each choice is what its own seed gives alone; choice 0 is a plain request's.
        assert_eq!(outcome.tokens, reference(&r, &samplings[i], 64).0, "{i}");
        // 13 prompt tokens: the later choices find its 3 full blocks of 4 cached.
        assert_eq!(outcome.usage.cached_tokens, if i == 0 { 0 } else { 12 });
        let mut history = r.prompt.clone();
        for (lp, &token) in logprobs[id].iter().zip(&outcome.tokens) {
            let logits = mock_logits(&history);
            let log_z = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
            assert!((lp.logprob - (logits[token as usize] - log_z)).abs() < 1e-5);
            assert_eq!(lp.top.len(), 3);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            history.push(token);
        }
        outputs.push(outcome.tokens.clone());
    }
    assert_eq!(reference(&r, &base, 64).0, outputs[0]);
    assert!(
        outputs[0] != outputs[1] || outputs[1] != outputs[2],
        "{outputs:?}"
    );
}
