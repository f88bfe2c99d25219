//! The real [`ModelExecutor`]: a loaded model and the paged cache pool the scheduler's block
//! tables point into. Block tables become per-position slot tables; the model does the rest in one
//! batched forward pass per step.

use tiefsee_model::{Logits, Model, PagedCache, Result, Segment};

use crate::scheduler::{ModelExecutor, SeqId, Step};

/// A model plus its pool of `num_blocks * block_size` token slots.
pub struct PagedExecutor<'m> {
    model: &'m Model,
    cache: PagedCache,
}

impl<'m> PagedExecutor<'m> {
    /// An executor whose pool matches a scheduler of `num_blocks` blocks of `block_size` slots.
    pub fn new(model: &'m Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        Ok(Self {
            model,
            cache: model.new_paged_cache(num_blocks * block_size)?,
        })
    }
}

impl ModelExecutor for PagedExecutor<'_> {
    fn execute(&mut self, step: &Step) -> Result<Vec<(SeqId, Vec<f32>)>> {
        let block_size = step.block_size;
        // Position p of a sequence lives in slot block_table[p / block_size] * block_size + p % block_size.
        let slot_tables: Vec<Vec<usize>> = step
            .seqs
            .iter()
            .map(|s| {
                (0..s.start + s.tokens.len())
                    .map(|p| {
                        let block = s
                            .block_table
                            .get(p / block_size)
                            .copied()
                            .unwrap_or(u32::MAX);
                        block as usize * block_size + p % block_size
                    })
                    .collect()
            })
            .collect();
        let segments: Vec<Segment> = step
            .seqs
            .iter()
            .map(|s| Segment {
                tokens: &s.tokens,
                start: s.start,
                logits: s.logits.then_some(Logits::Last),
            })
            .collect();
        let tables = slot_tables.iter().map(Vec::as_slice).collect();
        let logits = self
            .model
            .forward_paged(&segments, &mut self.cache, tables)?;
        let mut out = Vec::new();
        for (seq, logits) in step.seqs.iter().zip(logits) {
            if let Some(logits) = logits {
                out.push((seq.id, logits.squeeze(0)?.to_vec1()?));
            }
        }
        Ok(out)
    }
}
