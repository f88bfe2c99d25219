//! Many completions at once through the serving engine: continuous batching over a paged latent
//! cache, with the prompt blocks of a GRPO group shared by the prefix cache. Used for GRPO rollouts
//! and for evaluation.

use std::collections::HashMap;
use std::ops::ControlFlow;

use tiefsee_engine::scheduler::{Engine, Event, Request, SchedulerConfig};
use tiefsee_engine::{PagedExecutor, SamplingParams, StopReason};
use tiefsee_model::Model;

use crate::error::{Result, TrainError};

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Generated ids, the stop token excluded.
    pub tokens: Vec<u32>,
    /// Ended by the token budget (or the context), not by a stop token.
    pub truncated: bool,
}

const BLOCK_SIZE: usize = 16;

/// Generates one completion per prompt, each with its own sampling parameters (and seed), at most
/// `max_tokens` each, stopping at any of `stop_ids`.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    sampling: &[SamplingParams],
    max_tokens: usize,
    stop_ids: &[u32],
) -> Result<Vec<Completion>> {
    if prompts.len() != sampling.len() {
        return Err(TrainError::Generation(format!(
            "{} prompts but {} sampling settings",
            prompts.len(),
            sampling.len()
        )));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let context = (longest + max_tokens).min(model.config().max_position_embeddings());
    let blocks_per_seq = context.div_ceil(BLOCK_SIZE);
    let n = prompts.len();
    let config = SchedulerConfig {
        num_blocks: n * blocks_per_seq + 1,
        block_size: BLOCK_SIZE,
        context,
        max_step_tokens: (n * 8).max(context),
        max_running: n,
        max_waiting: n,
    };
    let executor = PagedExecutor::new(model, config.num_blocks, config.block_size)
        .map_err(|e| TrainError::Generation(format!("cache: {e}")))?;
    let mut engine = Engine::new(config, executor)
        .map_err(|e| TrainError::Generation(format!("engine: {e}")))?;
    let mut index = HashMap::new();
    for (i, (prompt, params)) in prompts.iter().zip(sampling).enumerate() {
        let request = Request {
            prompt: prompt.clone(),
            max_tokens: Some(max_tokens.min(context.saturating_sub(prompt.len()))),
            stop_ids: stop_ids.to_vec(),
            logprobs: None,
        };
        let id = engine
            .add(request, params.clone())
            .map_err(|e| TrainError::Generation(format!("prompt {i}: {e}")))?;
        index.insert(id, i);
    }
    let mut out = vec![
        Completion {
            tokens: Vec::new(),
            truncated: false,
        };
        n
    ];
    engine.run_until_idle(|event| {
        match event {
            Event::Token { id, token, .. } => out[index[id]].tokens.push(*token),
            Event::Finished { id, reason, .. } => {
                out[index[id]].truncated =
                    matches!(reason, StopReason::Length | StopReason::ContextFull);
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok(out)
}
