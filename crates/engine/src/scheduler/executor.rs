//! The boundary between the scheduler and the model: one [`Step`] is one batched forward pass over
//! a paged KV cache, and a [`ModelExecutor`] runs it.
//!
//! A step mixes prefill chunks and decodes, as in vLLM's chunked prefill and Orca's iteration-level
//! batching: each scheduled sequence brings the tokens to feed, their first position and its block
//! table. Nothing else crosses: the executor never sees requests, queues or sampling.

use tiefsee_model::Result;

use super::blocks::BlockId;
use super::sequence::SeqId;

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Token ids to feed, at positions `start..start + tokens.len()`.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`: the cache already holds positions `0..start`.
    pub start: usize,
    /// The sequence's blocks, covering at least positions `0..start + tokens.len()`: position `p`
    /// lives in slot `p % block_size` of block `block_table[p / block_size]`.
    pub block_table: Vec<BlockId>,
    /// Whether logits of the last fed position are wanted: for decodes and a prefill's last chunk.
    pub logits: bool,
}

/// One batched forward pass: what to compute and where its cache lives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Token slots per block of the pool the block tables point into.
    pub block_size: usize,
    /// Decodes first, then prefill chunks.
    pub seqs: Vec<ScheduledSeq>,
}

impl Step {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Tokens fed in this step, all sequences together.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// A model that runs steps over a paged cache of the scheduler's `num_blocks` x `block_size` slots.
pub trait ModelExecutor {
    /// Writes the KV entries of every fed token into its slot, attends each token to its sequence's
    /// positions `0..=p` through the block table, and returns the last position's logits, (vocab,),
    /// for every sequence with `logits` set.
    fn execute(&mut self, step: &Step) -> Result<Vec<(SeqId, Vec<f32>)>>;
}
