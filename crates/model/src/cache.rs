//! Attention caches. Per layer, each token leaves one row: for MLA the normalized latent `c_kv`
//! (kv_lora_rank) followed by the rotated RoPE key `k_pe` (qk_rope_head_dim), nothing per head; for
//! grouped-query attention its keys then its values (kv_heads * head_dim each).
//!
//! Rows live in [`RowPool`]s, one per layer, in the cache's [`CacheFormat`] (bf16 by default, f32
//! or 8-bit on request), and attention runs directly over them ([`KvStore::attend`]). The forward
//! pass reaches a cache through [`KvStore`]. [`Cache`] keeps one sequence in consecutive slots (the
//! CLI's generation loop); [`PagedCache`] keeps many sequences in a pool of slots addressed through
//! per-sequence slot tables (the serving engine's block tables), so sequences can share prefix blocks.

use candle_core::{Device, Tensor};
use tiefsee_kernels::attention::{self, RowLayout, RowPool, SequenceQueries};

pub use tiefsee_kernels::attention::CacheFormat;

use crate::error::{ModelError, Result};

/// One sequence's new tokens in a forward pass: positions `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Position of the first new token.
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// What attention over the cache needs besides the rows: the queries and how to read rows.
#[derive(Debug, Clone, Copy)]
pub struct AttentionQuery<'a> {
    /// Where keys and values sit in a row.
    pub layout: RowLayout,
    /// (n, heads, key_width) for the `n` new tokens of all sequences, in order.
    pub queries: &'a [f32],
    /// Query heads.
    pub heads: usize,
    /// Softmax scale.
    pub scale: f32,
}

/// What the forward pass needs from a cache.
pub trait KvStore: Send {
    /// Stores the rows (tokens, width_a) and (tokens, width_b) of sequence `seq` for `layer`, at
    /// positions `start ..`, and returns all of that sequence's rows `0 .. start + tokens` as f32
    /// (as stored: rounded to the cache's format). The reference path; training differentiates it.
    fn store(
        &mut self,
        seq: usize,
        layer: usize,
        start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// Stores the rows `[a | b]` (n, width_a + width_b) of the new tokens of every sequence (sequence
    /// `i` brings `spans[i]`, in order) for `layer`, and attends each sequence's queries over all of
    /// its rows, causally, every sequence in one parallel call: returns (n, heads, value_width).
    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        rows: &[f32],
        query: AttentionQuery,
    ) -> Result<Vec<f32>>;
}

/// Per layer, one pool of rows `[a | b]`.
#[derive(Debug, Clone)]
struct LayerPools {
    layers: Vec<RowPool>,
    widths: (usize, usize),
}

impl LayerPools {
    fn new(
        format: CacheFormat,
        layers: usize,
        slots: usize,
        widths: (usize, usize),
    ) -> Result<Self> {
        Ok(Self {
            layers: (0..layers)
                .map(|_| RowPool::new(format, slots, widths.0 + widths.1))
                .collect::<std::result::Result<_, _>>()?,
            widths,
        })
    }

    fn width(&self) -> usize {
        self.widths.0 + self.widths.1
    }

    /// Writes rows (n, width) into `slots`.
    fn write(&mut self, layer: usize, slots: &[usize], rows: &[f32]) -> Result<()> {
        let pool = &mut self.layers[layer];
        for (&slot, row) in slots
            .iter()
            .zip(rows.chunks_exact(self.widths.0 + self.widths.1))
        {
            pool.write(slot, row)?;
        }
        Ok(())
    }

    /// Writes `[a | b]` into `new_slots` and returns the rows of `all_slots` as two f32 tensors.
    fn store(
        &mut self,
        layer: usize,
        new_slots: &[usize],
        all_slots: &[usize],
        a: &Tensor,
        b: &Tensor,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let rows = Tensor::cat(&[a, b], 1)?.flatten_all()?.to_vec1::<f32>()?;
        self.write(layer, new_slots, &rows)?;
        let width = self.width();
        let mut all = vec![0f32; all_slots.len() * width];
        for (&slot, row) in all_slots.iter().zip(all.chunks_exact_mut(width)) {
            self.layers[layer].read(slot, row)?;
        }
        let all = Tensor::from_vec(all, (all_slots.len(), width), device)?;
        Ok((
            all.narrow(1, 0, self.widths.0)?.contiguous()?,
            all.narrow(1, self.widths.0, self.widths.1)?.contiguous()?,
        ))
    }

    /// Writes each sequence's rows (its part of `rows`) into its slots `start .. start + len`, then
    /// attends every sequence over its slots `0 .. start + len`; `tables[i]` maps sequence i's
    /// positions to slots.
    fn attend(
        &mut self,
        layer: usize,
        tables: &[&[usize]],
        spans: &[Span],
        rows: &[f32],
        query: AttentionQuery,
    ) -> Result<Vec<f32>> {
        let width = self.width();
        let (kw, vw) = (query.layout.key_width, query.layout.value_width);
        let tokens: usize = spans.iter().map(|s| s.len).sum();
        if tables.len() != spans.len()
            || rows.len() != tokens * width
            || query.queries.len() != tokens * query.heads * kw
        {
            return Err(ModelError::AttentionBatch {
                sequences: spans.len(),
                tokens,
                tables: tables.len(),
                rows: rows.len(),
                queries: query.queries.len(),
            });
        }
        let mut offset = 0;
        for (table, span) in tables.iter().zip(spans) {
            let end = span.start + span.len;
            let slots = table
                .get(span.start..end)
                .ok_or(ModelError::ContextOverflow {
                    needed: end,
                    context: table.len(),
                })?;
            self.write(
                layer,
                slots,
                &rows[offset * width..(offset + span.len) * width],
            )?;
            offset += span.len;
        }
        let mut out = vec![0f32; offset * query.heads * vw];
        let mut seqs = Vec::with_capacity(spans.len());
        let (mut queries, mut outs) = (query.queries, out.as_mut_slice());
        for (table, span) in tables.iter().zip(spans) {
            let (q, rest_q) = queries.split_at(span.len * query.heads * kw);
            let (o, rest_o) = std::mem::take(&mut outs).split_at_mut(span.len * query.heads * vw);
            seqs.push(SequenceQueries {
                slots: &table[..span.start + span.len],
                queries: q,
                start: span.start,
                out: o,
            });
            (queries, outs) = (rest_q, rest_o);
        }
        attention::attend_batch(
            &self.layers[layer],
            query.layout,
            query.heads,
            query.scale,
            &mut seqs,
        )?;
        Ok(out)
    }

    fn bytes(&self) -> usize {
        self.layers.iter().map(RowPool::bytes).sum()
    }
}

/// The cache of one sequence, in consecutive slots; its pools grow (doubling) up to `context`.
#[derive(Debug, Clone)]
pub struct Cache {
    pools: LayerPools,
    format: CacheFormat,
    /// `0 .. capacity`: the slot of every position.
    identity: Vec<usize>,
    len: usize,
    context: usize,
}

/// Slots a fresh [`Cache`] starts with before growing.
const INITIAL_SLOTS: usize = 256;

impl Cache {
    /// An empty cache for `layers` layers holding at most `context` tokens, with rows of widths `widths`.
    pub fn new(
        format: CacheFormat,
        layers: usize,
        context: usize,
        widths: (usize, usize),
    ) -> Result<Self> {
        let capacity = INITIAL_SLOTS.min(context);
        Ok(Self {
            pools: LayerPools::new(format, layers, capacity, widths)?,
            format,
            identity: (0..capacity).collect(),
            len: 0,
            context,
        })
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

    /// The storage format of the rows.
    pub fn format(&self) -> CacheFormat {
        self.format
    }

    /// Bytes the cached tokens occupy, all layers.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_token()
    }

    /// Bytes one token occupies, all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.pools.layers.iter().map(RowPool::bytes_per_row).sum()
    }

    /// Bytes allocated for rows, all layers (grows by doubling up to the context).
    pub fn allocated_bytes(&self) -> usize {
        self.pools.bytes()
    }

    /// Checks that `n` more tokens fit and makes room for them; called before any layer is touched.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(ModelError::EmptyInput);
        }
        let needed = self.len + n;
        if needed > self.context {
            return Err(ModelError::ContextOverflow {
                needed,
                context: self.context,
            });
        }
        if needed > self.identity.len() {
            let capacity = needed.next_power_of_two().min(self.context);
            let mut grown = LayerPools::new(
                self.format,
                self.pools.layers.len(),
                capacity,
                self.pools.widths,
            )?;
            let mut row = vec![0f32; self.pools.width()];
            for (old, new) in self.pools.layers.iter().zip(&mut grown.layers) {
                for slot in 0..self.len {
                    old.read(slot, &mut row)?;
                    new.write(slot, &row)?;
                }
            }
            self.pools = grown;
            self.identity = (0..capacity).collect();
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
        start: usize,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let end = start + a.dim(0)?;
        self.pools.store(
            layer,
            &self.identity[start..end],
            &self.identity[..end],
            a,
            b,
            a.device(),
        )
    }

    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        rows: &[f32],
        query: AttentionQuery,
    ) -> Result<Vec<f32>> {
        if spans.len() != 1 {
            return Err(ModelError::SingleSequenceCache { found: spans.len() });
        }
        let identity = &self.identity[..];
        self.pools.attend(layer, &[identity], spans, rows, query)
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

    fn attend(
        &mut self,
        _layer: usize,
        spans: &[Span],
        rows: &[f32],
        query: AttentionQuery,
    ) -> Result<Vec<f32>> {
        if let Some(span) = spans.iter().find(|s| s.start != 0) {
            return Err(ModelError::UncachedContinuation { start: span.start });
        }
        // Each sequence's own rows, exactly, in a pool that lives for this call.
        let width = query.layout.width();
        let n = rows.len() / width;
        let mut pools = LayerPools::new(CacheFormat::F32, 1, n, (width, 0))?;
        let slots: Vec<usize> = (0..n).collect();
        let mut tables = Vec::with_capacity(spans.len());
        let mut offset = 0;
        for span in spans {
            tables.push(&slots[offset..offset + span.len]);
            offset += span.len;
        }
        pools.attend(0, &tables, spans, rows, query)
    }
}

/// A pool of token slots shared by many sequences: per layer, one row pool.
#[derive(Debug, Clone)]
pub struct PagedCache {
    pools: LayerPools,
    slots: usize,
    device: Device,
}

impl PagedCache {
    /// A pool of `slots` token slots for `layers` layers with rows of the given widths.
    pub fn new(
        format: CacheFormat,
        layers: usize,
        slots: usize,
        widths: (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            pools: LayerPools::new(format, layers, slots, widths)?,
            slots,
            device: device.clone(),
        })
    }

    /// Number of token slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes allocated for rows, all layers.
    pub fn bytes(&self) -> usize {
        self.pools.bytes()
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
        let end = start + a.dim(0)?;
        self.cache.pools.store(
            layer,
            &table[start..end],
            &table[..end],
            a,
            b,
            &self.cache.device,
        )
    }

    fn attend(
        &mut self,
        layer: usize,
        spans: &[Span],
        rows: &[f32],
        query: AttentionQuery,
    ) -> Result<Vec<f32>> {
        self.cache
            .pools
            .attend(layer, &self.slot_tables, spans, rows, query)
    }
}
