//! Attention computed directly over the rows of a paged KV cache.
//!
//! A cache row holds one token's keys and values for one layer; [`RowLayout`] says where. DeepSeek's
//! absorbed Multi-head Latent Attention caches `[c_kv (512) | k_pe (64)]` and every query head scores
//! the whole row and reads the first 512 values back (DeepSeek-V3 `inference/model.py`, `absorb`
//! path); grouped-query attention caches `[k of each group | v of each group]`.
//!
//! The kernel follows FlashAttention (Dao et al., 2022): keys are taken in blocks of 32 rows,
//! converted to f32 once and used by every query head that shares them while they are hot in cache;
//! a block's scores go through an online softmax that rescales the output accumulators once per
//! block. Work is split between rayon's threads over query rows and, when there are few of them (the
//! decode step), over ranges of keys whose partial softmax results are merged at the end
//! (flash-decoding, Dao et al., 2023). Each block step has a scalar reference (`scalar.rs`) and an
//! AVX2+FMA version (`avx2.rs`) chosen once through [`crate::cpu::isa`].
//!
//! Departures: rows are converted whole (both layouts read all of a row anyway), queries are
//! pre-multiplied by the softmax scale, GQA prefill is split over query rows only (not heads), and
//! layouts whose key or value width is not a multiple of 8 run the scalar steps.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod pool;
mod scalar;
#[cfg(test)]
mod tests;

use std::ops::Range;

use rayon::prelude::*;
use thiserror::Error;

use crate::cpu::{self, Isa};
pub use pool::{CacheFormat, RowPool};

/// Keys per block of the online softmax: 32 rows of 576 f32 are 72 KiB, at home in L2.
const BLOCK: usize = 32;
/// The fewest keys worth a task of their own when the keys of one query are split between threads.
const MIN_CHUNK: usize = 256;
/// The most query rows that share one task (and so one conversion of each key block).
const MAX_ROW_TILE: usize = 8;

/// What can go wrong building a row pool or computing attention; messages name the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttentionError {
    /// Q8 rows are made of whole blocks.
    #[error("q8 cache rows must be a multiple of {block} values wide, got width {width}")]
    Q8Width { width: usize, block: usize },
    /// The pool's size overflows memory.
    #[error("a row pool of {slots} slots of width {width} does not fit in memory")]
    PoolSize { slots: usize, width: usize },
    /// A slot index past the end of the pool.
    #[error("slot {slot} is out of range for a pool of {slots} slots")]
    SlotOutOfRange { slot: usize, slots: usize },
    /// A row buffer of the wrong length.
    #[error("row buffer holds {found} values, the pool's width is {expected}")]
    RowLength { expected: usize, found: usize },
    /// A layout with a zero size.
    #[error("invalid row layout: {0}")]
    Layout(&'static str),
    /// Query heads that do not split evenly into the layout's kv groups.
    #[error("{heads} query heads cannot be shared evenly by {kv_heads} kv heads")]
    Heads { heads: usize, kv_heads: usize },
    /// A layout reaching past the end of the pool's rows.
    #[error("the row layout needs rows of {needed} values, the pool's rows hold {width}")]
    LayoutWidth { needed: usize, width: usize },
    /// Queries that are not whole rows of `heads * key_width`.
    #[error("queries hold {len} values, not a multiple of heads * key_width = {row}")]
    QueryShape { len: usize, row: usize },
    /// An output buffer of the wrong length.
    #[error("output holds {found} values, expected n * heads * value_width = {expected}")]
    OutputShape { expected: usize, found: usize },
    /// Query positions past the end of the slot table.
    #[error("{n} queries from position {start} need {needed} slots, the slot table has {slots}")]
    Positions {
        n: usize,
        start: usize,
        needed: usize,
        slots: usize,
    },
    /// A slot table entry past the end of the pool.
    #[error("slot table entry {position} is slot {slot}, out of range for a pool of {slots} slots")]
    SlotTable {
        position: usize,
        slot: usize,
        slots: usize,
    },
}

/// Where keys and values sit in a row: kv group `g` has its key at `g * key_stride` and its value at
/// `value_offset + g * value_stride`; query head `h` uses group `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// Number of key/value groups in a row.
    pub kv_heads: usize,
    /// Values per key (and per query head).
    pub key_width: usize,
    /// Distance between the keys of consecutive groups.
    pub key_stride: usize,
    /// Where group 0's value starts.
    pub value_offset: usize,
    /// Values per value (and per output head).
    pub value_width: usize,
    /// Distance between the values of consecutive groups.
    pub value_stride: usize,
}

impl RowLayout {
    /// MLA's absorbed cache `[c_kv | k_pe]`: one group, the key is the whole row, the value is `c_kv`.
    pub fn latent(kv_lora_rank: usize, rope_dim: usize) -> Self {
        let width = kv_lora_rank + rope_dim;
        Self {
            kv_heads: 1,
            key_width: width,
            key_stride: width,
            value_offset: 0,
            value_width: kv_lora_rank,
            value_stride: kv_lora_rank,
        }
    }

    /// Grouped-query attention `[k_0 | .. | k_{kv_heads-1} | v_0 | .. | v_{kv_heads-1}]`.
    pub fn grouped(kv_heads: usize, head_dim: usize) -> Self {
        Self {
            kv_heads,
            key_width: head_dim,
            key_stride: head_dim,
            value_offset: kv_heads * head_dim,
            value_width: head_dim,
            value_stride: head_dim,
        }
    }

    /// The narrowest row that holds every key and value of the layout.
    pub fn width(&self) -> usize {
        let last = self.kv_heads.saturating_sub(1);
        let keys = last * self.key_stride + self.key_width;
        let values = self.value_offset + last * self.value_stride + self.value_width;
        keys.max(values)
    }

    fn key_offset(&self, group: usize) -> usize {
        group * self.key_stride
    }

    fn value_offset_of(&self, group: usize) -> usize {
        self.value_offset + group * self.value_stride
    }

    fn check(&self, width: usize, heads: usize) -> Result<(), AttentionError> {
        if self.kv_heads == 0 {
            return Err(AttentionError::Layout("kv_heads is 0"));
        }
        if self.key_width == 0 {
            return Err(AttentionError::Layout("key_width is 0"));
        }
        if self.value_width == 0 {
            return Err(AttentionError::Layout("value_width is 0"));
        }
        if heads == 0 || !heads.is_multiple_of(self.kv_heads) {
            return Err(AttentionError::Heads {
                heads,
                kv_heads: self.kv_heads,
            });
        }
        if self.width() > width {
            return Err(AttentionError::LayoutWidth {
                needed: self.width(),
                width,
            });
        }
        Ok(())
    }
}

/// Attention of `n` new queries over the rows of one sequence.
///
/// `slots[p]` is the slot of the token at position `p`; `queries` is `(n, heads, key_width)` and
/// query `i` sees keys `0..=start + i`; `out` is `(n, heads, value_width)`. Shape mismatches and
/// out-of-range slots are errors.
#[allow(clippy::too_many_arguments)] // the cache, the sequence and the queries, each plain
pub fn attend(
    pool: &RowPool,
    layout: RowLayout,
    slots: &[usize],
    queries: &[f32],
    heads: usize,
    start: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttentionError> {
    let mut seqs = [SequenceQueries {
        slots,
        queries,
        start,
        out,
    }];
    attend_batch(pool, layout, heads, scale, &mut seqs)
}

/// One sequence's part of an [`attend_batch`] call: as the arguments of [`attend`].
#[derive(Debug)]
pub struct SequenceQueries<'a> {
    /// The slot of every position of the sequence (at least `start + n`).
    pub slots: &'a [usize],
    /// (n, heads, key_width): its new tokens' queries.
    pub queries: &'a [f32],
    /// The position of its first new token.
    pub start: usize,
    /// (n, heads, value_width): where their attention outputs go.
    pub out: &'a mut [f32],
}

/// [`attend`] for several sequences over one pool, as one parallel region: the tasks of all of
/// them (a decode step of many sequences is many small problems) are shared by rayon's threads at
/// once, so no thread waits at the end of each sequence.
pub fn attend_batch(
    pool: &RowPool,
    layout: RowLayout,
    heads: usize,
    scale: f32,
    seqs: &mut [SequenceQueries<'_>],
) -> Result<(), AttentionError> {
    let problems = seqs
        .iter()
        .map(|s| {
            Problem::new(
                pool,
                layout,
                s.slots,
                s.queries,
                heads,
                s.start,
                scale,
                s.out.len(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kernel = Kernel::select(cpu::isa(), &layout);
    // Tasks per problem: together a few per thread, however many sequences share them.
    let busy = problems.iter().filter(|p| p.n > 0).count().max(1);
    let tasks = (4 * rayon::current_num_threads()).div_ceil(busy);
    let plans: Vec<Plan> = problems.iter().map(|p| Plan::new(p, tasks)).collect();
    let mut outs: Vec<&mut [f32]> = seqs.iter_mut().map(|s| &mut *s.out).collect();
    run(kernel, &problems, &plans, &mut outs);
    Ok(())
}

/// One validated call of [`attend`].
struct Problem<'a> {
    pool: &'a RowPool,
    layout: RowLayout,
    slots: &'a [usize],
    /// (n, heads, key_width)
    queries: &'a [f32],
    heads: usize,
    start: usize,
    scale: f32,
    n: usize,
}

impl<'a> Problem<'a> {
    #[allow(clippy::too_many_arguments)] // the arguments of `attend`, checked one by one
    fn new(
        pool: &'a RowPool,
        layout: RowLayout,
        slots: &'a [usize],
        queries: &'a [f32],
        heads: usize,
        start: usize,
        scale: f32,
        out_len: usize,
    ) -> Result<Self, AttentionError> {
        layout.check(pool.width(), heads)?;
        let row = heads * layout.key_width;
        if !queries.len().is_multiple_of(row) {
            return Err(AttentionError::QueryShape {
                len: queries.len(),
                row,
            });
        }
        let n = queries.len() / row;
        let expected = n * heads * layout.value_width;
        if out_len != expected {
            return Err(AttentionError::OutputShape {
                expected,
                found: out_len,
            });
        }
        let needed = start.saturating_add(n);
        if needed > slots.len() {
            return Err(AttentionError::Positions {
                n,
                start,
                needed,
                slots: slots.len(),
            });
        }
        if let Some((position, &slot)) = slots.iter().enumerate().find(|(_, s)| **s >= pool.slots())
        {
            return Err(AttentionError::SlotTable {
                position,
                slot,
                slots: pool.slots(),
            });
        }
        Ok(Self {
            pool,
            layout,
            slots,
            queries,
            heads,
            start,
            scale,
            n,
        })
    }

    /// Query heads per kv group.
    fn group(&self) -> usize {
        self.heads / self.layout.kv_heads
    }
}

/// How the work of one call is split into tasks: tiles of query rows times chunks of keys.
#[derive(Debug, Clone, Copy)]
struct Plan {
    row_tile: usize,
    /// Keys per chunk, a multiple of [`BLOCK`].
    chunk: usize,
}

impl Plan {
    /// About `tasks` tasks for `p` (to share with others' between rayon's threads), each as large as
    /// that allows.
    fn new(p: &Problem, tasks: usize) -> Self {
        let tasks = tasks.max(1);
        let row_tile = p.n.div_ceil(tasks).clamp(1, MAX_ROW_TILE);
        let row_tiles = p.n.div_ceil(row_tile).max(1);
        let keys = p.start + p.n;
        let chunks = tasks
            .div_ceil(row_tiles)
            .min(keys.div_ceil(MIN_CHUNK))
            .max(1);
        Self {
            row_tile,
            chunk: keys.div_ceil(chunks).next_multiple_of(BLOCK).max(BLOCK),
        }
    }

    /// Ranges of query rows of `p`, each one task's (times its key chunks).
    fn row_tiles(&self, p: &Problem) -> impl Iterator<Item = Range<usize>> {
        let (n, tile) = (p.n, self.row_tile);
        (0..n).step_by(tile).map(move |r0| r0..(r0 + tile).min(n))
    }

    /// Ranges of keys, each one task's (times its row tiles).
    fn key_chunks(&self, p: &Problem) -> impl Iterator<Item = Range<usize>> {
        let (keys, chunk) = (p.start + p.n, self.chunk);
        (0..keys)
            .step_by(chunk)
            .map(move |k0| k0..(k0 + chunk).min(keys))
    }
}

/// Softmax state of one task's queries after its keys: running max, sum of weights, and the
/// weighted sum of values, not yet divided by the sum.
struct Partial {
    /// (kv_heads, rows, group)
    max: Vec<f32>,
    /// (kv_heads, rows, group)
    sum: Vec<f32>,
    /// (kv_heads, rows, group, value_width)
    acc: Vec<f32>,
}

/// Runs the tasks of every problem under its plan in one parallel region, then merges each row
/// tile's partial results into its rows of that problem's output (n, heads, value_width).
fn run(kernel: Kernel, problems: &[Problem], plans: &[Plan], outs: &mut [&mut [f32]]) {
    // Every (problem, row tile, key chunk), in that order.
    let mut tasks = Vec::new();
    for (i, (p, plan)) in problems.iter().zip(plans).enumerate() {
        for rows in plan.row_tiles(p) {
            for keys in plan.key_chunks(p) {
                tasks.push((i, rows.clone(), keys));
            }
        }
    }
    let parts: Vec<Partial> = tasks
        .par_iter()
        .map(|(i, rows, keys)| run_task(kernel, &problems[*i], rows.clone(), keys.clone()))
        .collect();
    // Each row tile's output rows with the partial results of its key chunks.
    let mut merges = Vec::new();
    let mut next = 0;
    for ((p, plan), out) in problems.iter().zip(plans).zip(outs.iter_mut()) {
        let chunks = plan.key_chunks(p).count();
        let tile_len = plan.row_tile * p.heads * p.layout.value_width;
        for out in out.chunks_mut(tile_len) {
            merges.push((p, out, &parts[next..next + chunks]));
            next += chunks;
        }
    }
    merges.into_par_iter().for_each(|(p, out, parts)| {
        let (group, vw) = (p.group(), p.layout.value_width);
        let rows = out.len() / (p.heads * vw);
        for (r, out_row) in out.chunks_exact_mut(p.heads * vw).enumerate() {
            for (h, dst) in out_row.chunks_exact_mut(vw).enumerate() {
                // the (kv_heads, rows, group) order of `Partial`
                let q = (h / group * rows + r) * group + h % group;
                merge(parts, q, vw, dst);
            }
        }
    });
}

/// Combines the partial softmax results of one query head over disjoint key ranges into its output.
fn merge(parts: &[Partial], q: usize, vw: usize, dst: &mut [f32]) {
    let max = parts
        .iter()
        .map(|part| part.max[q])
        .fold(f32::NEG_INFINITY, f32::max);
    dst.fill(0.0);
    let mut sum = 0.0;
    for part in parts {
        if part.sum[q] == 0.0 {
            continue;
        }
        let w = (part.max[q] - max).exp();
        sum += w * part.sum[q];
        for (d, &a) in dst.iter_mut().zip(&part.acc[q * vw..][..vw]) {
            *d += w * a;
        }
    }
    let inv = 1.0 / sum;
    for d in dst {
        *d *= inv;
    }
}

/// The queries of rows `rows` against keys `keys` (each row stops at its causal limit).
fn run_task(kernel: Kernel, p: &Problem, rows: Range<usize>, keys: Range<usize>) -> Partial {
    let layout = &p.layout;
    let (kw, vw, group) = (layout.key_width, layout.value_width, p.group());
    let nq = rows.len() * group; // queries per kv group
    let width = p.pool.width();

    // (kv_heads, rows, group, key_width), pre-multiplied by the softmax scale
    let mut q = Vec::with_capacity(layout.kv_heads * nq * kw);
    for g in 0..layout.kv_heads {
        for i in rows.clone() {
            let heads = &p.queries[(i * p.heads + g * group) * kw..][..group * kw];
            q.extend(heads.iter().map(|x| x * p.scale));
        }
    }
    let mut max = vec![f32::NEG_INFINITY; layout.kv_heads * nq];
    let mut sum = vec![0.0; layout.kv_heads * nq];
    let mut acc = vec![0.0; layout.kv_heads * nq * vw];

    let mut block = vec![0.0; BLOCK * width]; // (BLOCK, width)
    let mut weights = vec![0.0; nq * BLOCK]; // (nq, BLOCK): scores, then softmax weights
    let mut alpha = vec![0.0; nq];
    let mut valid = vec![0; nq];
    let end = keys.end.min(p.start + rows.end);
    for b0 in (keys.start..end).step_by(BLOCK) {
        let nb = BLOCK.min(end - b0);
        let block = &mut block[..nb * width];
        kernel.convert(p.pool, &p.slots[b0..b0 + nb], block);
        let next = (b0 + nb)..(b0 + nb + BLOCK).min(end);
        kernel.prefetch(p.pool, &p.slots[next]);
        for (r, i) in rows.clone().enumerate() {
            let visible = (p.start + i + 1).saturating_sub(b0).min(nb);
            valid[r * group..][..group].fill(visible);
        }
        let block = Rows { data: block, width };
        for g in 0..layout.kv_heads {
            let qs = g * nq..(g + 1) * nq;
            let q = &q[qs.start * kw..qs.end * kw];
            kernel.scores(q, kw, block, layout.key_offset(g), &mut weights);
            kernel.softmax(
                &mut weights,
                &valid,
                &mut max[qs.clone()],
                &mut sum[qs.clone()],
                &mut alpha,
            );
            let acc = &mut acc[qs.start * vw..qs.end * vw];
            kernel.accumulate(&weights, &alpha, block, layout.value_offset_of(g), acc);
        }
    }
    Partial { max, sum, acc }
}

/// A block of cache rows converted to f32: (count, width).
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    width: usize,
}

impl Rows<'_> {
    fn count(&self) -> usize {
        self.data.len() / self.width
    }
}

/// The implementation of the four block steps, chosen once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    /// Only constructed where the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The AVX2 kernel wants keys and values in whole vectors of 8; other layouts run scalar.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn select(isa: Isa, layout: &RowLayout) -> Self {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2
            && layout.key_width.is_multiple_of(8)
            && layout.value_width.is_multiple_of(8)
        {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// Rows of `slots` as f32 into `out` (slots.len(), width).
    fn convert(self, pool: &RowPool, slots: &[usize], out: &mut [f32]) {
        match self {
            Kernel::Scalar => scalar::convert(pool, slots, out),
            // SAFETY: `Kernel::Avx2` exists only on CPUs with AVX2, FMA and F16C.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::convert(pool, slots, out) },
        }
    }

    /// Starts loading the rows of `slots` into cache (the next block, while this one is computed).
    fn prefetch(self, pool: &RowPool, slots: &[usize]) {
        match self {
            // the reference leaves it to the hardware
            Kernel::Scalar => {}
            // SAFETY: as in `convert`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::prefetch(pool, slots) },
        }
    }

    /// `s[q, t] = dot(q[q], key of row t)` for the `q.len() / kw` queries: s is (queries, BLOCK).
    fn scores(self, q: &[f32], kw: usize, rows: Rows, key_offset: usize, s: &mut [f32]) {
        match self {
            Kernel::Scalar => scalar::scores(q, kw, rows, key_offset, s),
            // SAFETY: as in `convert`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::scores(q, kw, rows, key_offset, s) },
        }
    }

    /// Online softmax step over the first `valid[q]` scores of each query: turns scores into weights
    /// relative to the new running max, updates max and sum, and sets the old accumulators' rescale
    /// factor `alpha`.
    fn softmax(
        self,
        s: &mut [f32],
        valid: &[usize],
        max: &mut [f32],
        sum: &mut [f32],
        alpha: &mut [f32],
    ) {
        match self {
            Kernel::Scalar => scalar::softmax(s, valid, max, sum, alpha),
            // SAFETY: as in `convert`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::softmax(s, valid, max, sum, alpha) },
        }
    }

    /// `acc[q] = alpha[q] * acc[q] + sum_t w[q, t] * value of row t`; acc is (queries, value_width).
    fn accumulate(
        self,
        w: &[f32],
        alpha: &[f32],
        rows: Rows,
        value_offset: usize,
        acc: &mut [f32],
    ) {
        match self {
            Kernel::Scalar => scalar::accumulate(w, alpha, rows, value_offset, acc),
            // SAFETY: as in `convert`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::accumulate(w, alpha, rows, value_offset, acc) },
        }
    }
}
