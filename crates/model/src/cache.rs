//! Attention caches. Per layer, each token leaves two rows: for MLA the normalized latent `c_kv`
//! (kv_lora_rank) and the rotated RoPE key `k_pe` (qk_rope_head_dim), nothing per head; for
//! grouped-query attention its keys and values (kv_heads * head_dim each).
//!
//! The forward pass reaches a cache through [`KvStore`]: new rows of one sequence go in, all of that
//! sequence's rows come out. [`Cache`] keeps one sequence contiguously (the CLI's generation loop);
//! [`PagedCache`] keeps many sequences in a pool of fixed-size slots addressed through per-sequence
//! slot tables (the serving engine's block tables), so sequences can share prefix blocks.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// What the forward pass needs from a cache.
pub trait KvStore {
    /// Stores the rows (tokens, width) of sequence `seq` for `layer`, at positions `start ..`, and
    /// returns all of that sequence's rows `0 .. start + tokens`.
    fn store(
        &mut self,
        seq: usize,
        layer: usize,
        start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
}

/// The cache of one sequence: per layer, two row tensors grown as tokens arrive.
#[derive(Debug, Clone)]
pub struct Cache {
    /// Per layer: (len, width_a) and (len, width_b) rows, `None` before the first token.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    context: usize,
}

impl Cache {
    /// An empty cache for `layers` layers holding at most `context` tokens.
    pub fn new(layers: usize, context: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
            context,
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens this cache may hold.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Bytes held by all layers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(a, b)| (a.elem_count() + b.elem_count()) * a.dtype().size_in_bytes())
            .sum()
    }

    /// Checks that `n` more tokens fit; called before any layer is touched.
    pub(crate) fn reserve(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(ModelError::EmptyInput);
        }
        if self.len + n > self.context {
            return Err(ModelError::ContextOverflow {
                needed: self.len + n,
                context: self.context,
            });
        }
        Ok(())
    }

    /// Records that `n` tokens were appended to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl KvStore for Cache {
    fn store(
        &mut self,
        _seq: usize,
        layer: usize,
        _start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let full = match &self.layers[layer] {
            None => (a.clone(), b.clone()),
            Some((old_a, old_b)) => (Tensor::cat(&[old_a, a], 0)?, Tensor::cat(&[old_b, b], 0)?),
        };
        self.layers[layer] = Some(full.clone());
        Ok(full)
    }
}

/// No cache at all: every sequence is fed whole from position 0 and attends to exactly the rows it
/// brings. For training and scoring, where keeping rows would only cost memory (and the rows stay
/// differentiable).
#[derive(Debug, Clone, Copy, Default)]
pub struct Uncached;

impl KvStore for Uncached {
    fn store(
        &mut self,
        _seq: usize,
        _layer: usize,
        start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if start != 0 {
            return Err(ModelError::UncachedContinuation { start });
        }
        Ok((a.clone(), b.clone()))
    }
}

/// A pool of token slots shared by many sequences: per layer, two (slots, width) row arrays.
#[derive(Debug, Clone)]
pub struct PagedCache {
    /// Per layer: (slots * width_a) and (slots * width_b) values.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    widths: (usize, usize),
    slots: usize,
    device: Device,
}

impl PagedCache {
    /// A pool of `slots` token slots for `layers` layers with rows of the given widths.
    pub fn new(layers: usize, slots: usize, widths: (usize, usize), device: &Device) -> Self {
        Self {
            layers: (0..layers)
                .map(|_| (vec![0.0; slots * widths.0], vec![0.0; slots * widths.1]))
                .collect(),
            widths,
            slots,
            device: device.clone(),
        }
    }

    /// Number of token slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// A view for one forward pass: `slot_tables[i]` maps sequence i's positions to slots.
    pub fn batch<'a>(&'a mut self, slot_tables: Vec<&'a [usize]>) -> PagedBatch<'a> {
        PagedBatch {
            cache: self,
            slot_tables,
        }
    }
}

/// A [`PagedCache`] seen through the slot tables of the sequences in one forward pass.
pub struct PagedBatch<'a> {
    cache: &'a mut PagedCache,
    slot_tables: Vec<&'a [usize]>,
}

impl PagedBatch<'_> {
    /// Checks that every table covers its sequence's positions and addresses existing slots.
    pub fn check(&self, ends: &[usize]) -> Result<()> {
        for (table, &end) in self.slot_tables.iter().zip(ends) {
            if table.len() < end {
                return Err(ModelError::ContextOverflow {
                    needed: end,
                    context: table.len(),
                });
            }
            if let Some(&bad) = table[..end].iter().find(|&&s| s >= self.cache.slots) {
                return Err(ModelError::ContextOverflow {
                    needed: bad + 1,
                    context: self.cache.slots,
                });
            }
        }
        Ok(())
    }
}

impl KvStore for PagedBatch<'_> {
    fn store(
        &mut self,
        seq: usize,
        layer: usize,
        start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let table = self.slot_tables[seq];
        let new = a.dim(0)?;
        let (wa, wb) = self.cache.widths;
        let (pool_a, pool_b) = &mut self.cache.layers[layer];
        let rows_a: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let rows_b: Vec<f32> = b.flatten_all()?.to_vec1()?;
        for (i, &slot) in table[start..start + new].iter().enumerate() {
            pool_a[slot * wa..(slot + 1) * wa].copy_from_slice(&rows_a[i * wa..(i + 1) * wa]);
            pool_b[slot * wb..(slot + 1) * wb].copy_from_slice(&rows_b[i * wb..(i + 1) * wb]);
        }
        let total = start + new;
        let mut all_a = Vec::with_capacity(total * wa);
        let mut all_b = Vec::with_capacity(total * wb);
        for &slot in &table[..total] {
            all_a.extend_from_slice(&pool_a[slot * wa..(slot + 1) * wa]);
            all_b.extend_from_slice(&pool_b[slot * wb..(slot + 1) * wb]);
        }
        let device = &self.cache.device;
        Ok((
            Tensor::from_vec(all_a, (total, wa), device)?,
            Tensor::from_vec(all_b, (total, wb), device)?,
        ))
    }
}
