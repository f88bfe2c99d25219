//! The block manager of a paged KV cache: a fixed pool of blocks of `block_size` token slots, one
//! block table per sequence, reference counts, and a prefix cache of full blocks.
//!
//! Follows vLLM's PagedAttention block manager and its automatic prefix caching (v1 `BlockPool`):
//! a full block is identified by its parent block and its own token ids; freed blocks that hold such
//! a block stay findable until the pool needs them, least recently freed first, a sequence's tail
//! before its head. Departures: the key is exact, (parent's content id, tokens) compared for equality,
//! not a 64-bit chain hash, so a collision can never serve another prompt's cache; and blank free
//! blocks are handed out before any cached one is evicted.
//!
//! Only full blocks are shared, and a sequence only writes into its own last, partial block, so
//! shared blocks are never written and no copy-on-write is needed. For DeepSeek's MLA the blocks
//! hold the latent `c_kv` and the rotated `k_pe` of each token, nothing per head.

use std::collections::{BTreeMap, HashMap};

use super::sequence::SeqId;

/// Index of a block in the pool: slot `s` of block `b` is cache row `b * block_size + s`.
pub type BlockId = u32;

/// There are not enough free blocks for what was asked; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{needed} more KV blocks are needed but only {free} are free")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// The block accounting is inconsistent (a bug): the message says which block or sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block accounting is broken: {0}")]
pub struct AccountingError(pub String);

/// A snapshot of the pool, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockUsage {
    pub total: usize,
    /// Blocks referenced by at least one sequence.
    pub in_use: usize,
    /// Blocks no sequence references (blank or cached).
    pub free: usize,
    /// Free blocks that still hold a reusable full block of the prefix cache.
    pub cached: usize,
    /// Tokens found in the prefix cache when sequences were admitted.
    pub hit_tokens: u64,
    /// Tokens that had to be computed when sequences were admitted.
    pub miss_tokens: u64,
}

/// Identity of a full block's content: the content before it and its own tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    /// Content id of the previous block; `None` for a sequence's first block.
    parent: Option<u64>,
    tokens: Box<[u32]>,
}

/// A full block registered in the prefix cache.
#[derive(Debug, Clone, Copy)]
struct CachedBlock {
    block: BlockId,
    /// Names this content as a parent of later blocks; never reused.
    content: u64,
}

#[derive(Debug, Clone, Default)]
struct Block {
    /// Sequences whose table holds this block.
    refs: usize,
    /// The key under which this block is in the prefix cache, if it is.
    key: Option<BlockKey>,
    /// While free and cached: its place in the eviction order (smaller goes first).
    freed_at: Option<u64>,
}

/// One sequence's blocks.
#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    /// Block of each `block_size` positions, in order.
    table: Vec<BlockId>,
    /// Content id of each full block registered (or found) so far, in order.
    contents: Vec<u64>,
}

/// What [`BlockManager::admit`] found and reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Leading tokens whose cache was found: the sequence's first position to compute.
    pub hit_tokens: usize,
    /// Tokens after the hits that blocks were reserved for.
    pub to_compute: usize,
}

/// The pool, the block tables and the prefix cache.
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks holding nothing reusable, handed out first.
    blank: Vec<BlockId>,
    /// Free blocks holding cached content, by `freed_at`: the first is evicted first.
    evictable: BTreeMap<u64, BlockId>,
    clock: u64,
    cache: HashMap<BlockKey, CachedBlock>,
    next_content: u64,
    seqs: HashMap<SeqId, SeqBlocks>,
    hit_tokens: u64,
    miss_tokens: u64,
}

impl BlockManager {
    /// A pool of `num_blocks` empty blocks of `block_size` token slots each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            // Reversed so that block 0 is handed out first.
            blank: (0..num_blocks as BlockId).rev().collect(),
            evictable: BTreeMap::new(),
            clock: 0,
            cache: HashMap::new(),
            next_content: 0,
            seqs: HashMap::new(),
            hit_tokens: 0,
            miss_tokens: 0,
        }
    }

    /// The blocks of `seq`, one per `block_size` positions; empty for an unknown sequence.
    pub fn table(&self, seq: SeqId) -> &[BlockId] {
        self.seqs.get(&seq).map_or(&[], |s| &s.table)
    }

    /// Starts `seq`'s table (replacing any it had) from the longest cached prefix of `tokens`, and
    /// reserves blocks for up to `max_compute` of the tokens after it. All or nothing.
    ///
    /// At least the last token is always left to compute, since its logits are needed.
    pub fn admit(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        max_compute: usize,
    ) -> Result<Admitted, OutOfBlocks> {
        self.free(seq);
        let hits = self.lookup(tokens);
        let hit_tokens = hits.len() * self.block_size;
        let to_compute = (tokens.len() - hit_tokens).min(max_compute);
        let needed = (hit_tokens + to_compute).div_ceil(self.block_size) - hits.len();
        // Hit blocks that are free now stop being free once taken.
        let free_hits = hits
            .iter()
            .filter(|c| self.blocks[c.block as usize].refs == 0)
            .count();
        let free = self.free_count() - free_hits;
        if needed > free {
            return Err(OutOfBlocks { needed, free });
        }
        for c in &hits {
            self.take_ref(c.block);
        }
        let fresh = self.take_free(needed);
        let table = hits.iter().map(|c| c.block).chain(fresh).collect();
        let contents = hits.iter().map(|c| c.content).collect();
        self.seqs.insert(seq, SeqBlocks { table, contents });
        self.hit_tokens += hit_tokens as u64;
        self.miss_tokens += (tokens.len() - hit_tokens) as u64;
        Ok(Admitted {
            hit_tokens,
            to_compute,
        })
    }

    /// Grows `seq`'s table to cover `len` tokens. All or nothing.
    pub fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), OutOfBlocks> {
        let have = self.table(seq).len();
        let needed = len.div_ceil(self.block_size).saturating_sub(have);
        let free = self.free_count();
        if needed > free {
            return Err(OutOfBlocks { needed, free });
        }
        let fresh = self.take_free(needed);
        self.seqs.entry(seq).or_default().table.extend(fresh);
        Ok(())
    }

    /// Records that the cache of `seq` now holds `computed` (its tokens from position 0), and
    /// registers its newly full blocks in the prefix cache.
    pub fn commit(&mut self, seq: SeqId, computed: &[u32]) {
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let full = (computed.len() / self.block_size).min(s.table.len());
        for i in s.contents.len()..full {
            let key = BlockKey {
                parent: s.contents.last().copied(),
                tokens: computed[i * self.block_size..(i + 1) * self.block_size].into(),
            };
            let content = match self.cache.get(&key) {
                // Same content computed twice (two prompts admitted together): keep the first
                // copy cached; this one is freed as blank.
                Some(c) => c.content,
                None => {
                    let content = self.next_content;
                    self.next_content += 1;
                    let block = s.table[i];
                    self.blocks[block as usize].key = Some(key.clone());
                    self.cache.insert(key, CachedBlock { block, content });
                    content
                }
            };
            s.contents.push(content);
        }
    }

    /// Drops `seq`'s table: each of its blocks loses a reference; unknown sequences are ignored.
    pub fn free(&mut self, seq: SeqId) {
        let Some(s) = self.seqs.remove(&seq) else {
            return;
        };
        // Tail first, so that a prompt's later blocks are evicted before its earlier ones, which
        // more prompts share.
        for &block in s.table.iter().rev() {
            let b = &mut self.blocks[block as usize];
            b.refs -= 1;
            if b.refs > 0 {
                continue;
            }
            if b.key.is_some() {
                b.freed_at = Some(self.clock);
                self.evictable.insert(self.clock, block);
                self.clock += 1;
            } else {
                self.blank.push(block);
            }
        }
    }

    /// Counts of blocks and of prefix-cache hits and misses.
    pub fn usage(&self) -> BlockUsage {
        let free = self.free_count();
        BlockUsage {
            total: self.blocks.len(),
            in_use: self.blocks.len() - free,
            free,
            cached: self.evictable.len(),
            hit_tokens: self.hit_tokens,
            miss_tokens: self.miss_tokens,
        }
    }

    /// Checks every invariant of the accounting: reference counts equal table occurrences, each
    /// block is either referenced or in exactly one free list, and cache entries and block keys
    /// agree.
    pub fn audit(&self) -> Result<(), AccountingError> {
        let fail = |msg: String| Err(AccountingError(msg));
        let mut refs = vec![0usize; self.blocks.len()];
        for (seq, s) in &self.seqs {
            let mut seen = s.table.clone();
            seen.sort_unstable();
            if seen.windows(2).any(|w| w[0] == w[1]) {
                return fail(format!("sequence {seq} holds a block twice: {:?}", s.table));
            }
            if s.contents.len() > s.table.len() {
                return fail(format!("sequence {seq} has more contents than blocks"));
            }
            for &b in &s.table {
                match refs.get_mut(b as usize) {
                    Some(r) => *r += 1,
                    None => return fail(format!("sequence {seq} holds unknown block {b}")),
                }
            }
        }
        let mut free_lists = vec![0usize; self.blocks.len()];
        for &b in self.blank.iter().chain(self.evictable.values()) {
            free_lists[b as usize] += 1;
        }
        for (i, (block, (&r, &f))) in self
            .blocks
            .iter()
            .zip(refs.iter().zip(&free_lists))
            .enumerate()
        {
            if block.refs != r {
                return fail(format!(
                    "block {i} counts {} references but {r} tables hold it",
                    block.refs
                ));
            }
            if f != usize::from(r == 0) {
                return fail(format!(
                    "block {i} with {r} references is in {f} free lists"
                ));
            }
            if block.freed_at.is_some() != (r == 0 && block.key.is_some()) {
                return fail(format!(
                    "block {i} is misplaced between the blank and cached free lists"
                ));
            }
            if let Some(key) = &block.key
                && self.cache.get(key).map(|c| c.block) != Some(i as BlockId)
            {
                return fail(format!(
                    "block {i} has a cache key that does not lead back to it"
                ));
            }
        }
        for (&t, &b) in &self.evictable {
            if self.blocks[b as usize].freed_at != Some(t) {
                return fail(format!(
                    "block {b} is in the eviction order at the wrong place"
                ));
            }
        }
        let keyed = self.blocks.iter().filter(|b| b.key.is_some()).count();
        if keyed != self.cache.len() {
            return fail(format!(
                "{} cache entries but {keyed} blocks with a key",
                self.cache.len()
            ));
        }
        Ok(())
    }

    /// The cached full blocks that `tokens` starts with, leaving at least its last token out.
    fn lookup(&self, tokens: &[u32]) -> Vec<CachedBlock> {
        let reusable = tokens.len().saturating_sub(1);
        let mut parent = None;
        let mut hits = Vec::new();
        for chunk in tokens[..reusable].chunks_exact(self.block_size) {
            let key = BlockKey {
                parent,
                tokens: chunk.into(),
            };
            let Some(&c) = self.cache.get(&key) else {
                break;
            };
            hits.push(c);
            parent = Some(c.content);
        }
        hits
    }

    fn free_count(&self) -> usize {
        self.blank.len() + self.evictable.len()
    }

    /// Adds a reference to a cached block, taking it off the free list if it was free.
    fn take_ref(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        if let Some(t) = b.freed_at.take() {
            self.evictable.remove(&t);
        }
        b.refs += 1;
    }

    /// Takes `n` free blocks (the caller checked there are enough), blank ones first, then the
    /// least recently freed cached ones, whose cache entries are dropped.
    fn take_free(&mut self, n: usize) -> Vec<BlockId> {
        let mut taken = Vec::with_capacity(n);
        while taken.len() < n {
            let block = match self.blank.pop() {
                Some(b) => b,
                None => match self.evictable.pop_first() {
                    Some((_, b)) => {
                        let old = &mut self.blocks[b as usize];
                        old.freed_at = None;
                        if let Some(key) = old.key.take() {
                            self.cache.remove(&key);
                        }
                        b
                    }
                    None => break,
                },
            };
            self.blocks[block as usize].refs = 1;
            taken.push(block);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SeqId = SeqId(1);
    const B: SeqId = SeqId(2);
    const C: SeqId = SeqId(3);

    /// Admits `seq` for all of `tokens`, marks them computed, and checks the books.
    fn compute(m: &mut BlockManager, seq: SeqId, tokens: &[u32]) -> Admitted {
        let admitted = m.admit(seq, tokens, usize::MAX).unwrap();
        m.commit(seq, tokens);
        m.audit().unwrap();
        admitted
    }

    #[test]
    fn tables_grow_on_demand_and_return_every_block() {
        let mut m = BlockManager::new(4, 2);
        let a = m.admit(A, &[1, 2, 3], 2).unwrap();
        assert_eq!((a.hit_tokens, a.to_compute), (0, 2));
        assert_eq!(m.table(A), &[0]);
        m.reserve(A, 3).unwrap();
        m.reserve(A, 4).unwrap();
        assert_eq!(m.table(A), &[0, 1]);
        assert_eq!(m.reserve(B, 7), Err(OutOfBlocks { needed: 4, free: 2 }));
        assert_eq!(
            m.table(B),
            &[] as &[BlockId],
            "a failed reserve changes nothing"
        );
        m.audit().unwrap();
        m.free(A);
        m.free(A);
        m.audit().unwrap();
        assert_eq!(m.usage().free, 4);
    }

    #[test]
    fn a_common_prefix_is_shared_and_counted() {
        let mut m = BlockManager::new(8, 2);
        compute(&mut m, A, &[1, 2, 3, 4, 5]);
        // B shares two full blocks, then differs.
        let b = compute(&mut m, B, &[1, 2, 3, 4, 9, 9, 9]);
        assert_eq!((b.hit_tokens, b.to_compute), (4, 3));
        assert_eq!(m.table(B)[..2], m.table(A)[..2]);
        assert_ne!(m.table(B)[2], m.table(A)[2]);
        let u = m.usage();
        assert_eq!((u.hit_tokens, u.miss_tokens), (4, 5 + 3));
        assert_eq!(u.in_use, 3 + 2);
        // Shared blocks stay in use until the last holder frees them.
        m.free(A);
        m.audit().unwrap();
        assert_eq!(m.usage().in_use, 4);
    }

    #[test]
    fn the_last_token_is_always_computed() {
        let mut m = BlockManager::new(8, 2);
        compute(&mut m, A, &[1, 2, 3, 4]);
        // The whole prompt is cached, but its last token's logits are needed: the last block is
        // recomputed into a fresh block, never written into the shared one.
        let b = compute(&mut m, B, &[1, 2, 3, 4]);
        assert_eq!((b.hit_tokens, b.to_compute), (2, 2));
        assert_eq!(m.table(B)[0], m.table(A)[0]);
        assert_ne!(m.table(B)[1], m.table(A)[1]);
    }

    #[test]
    fn freed_blocks_stay_cached_until_the_pool_needs_them() {
        let mut m = BlockManager::new(4, 2);
        compute(&mut m, A, &[1, 2, 3, 4, 5]);
        m.free(A);
        let u = m.usage();
        assert_eq!((u.in_use, u.free, u.cached), (0, 4, 2));
        // Found again after being freed.
        assert_eq!(compute(&mut m, B, &[1, 2, 3, 4, 7]).hit_tokens, 4);
        m.free(B);
        // C needs all four blocks: blank ones go first, then the cached ones, A's tail first.
        let c = compute(&mut m, C, &[8, 8, 8, 8, 8, 8, 8]);
        assert_eq!(c.hit_tokens, 0);
        m.free(C);
        assert_eq!(compute(&mut m, A, &[1, 2, 3, 4, 5]).hit_tokens, 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_freed_and_the_tail_first() {
        let mut m = BlockManager::new(5, 2);
        compute(&mut m, A, &[1, 2, 3, 4, 0]);
        compute(&mut m, B, &[5, 6, 0]);
        m.free(B);
        m.free(A);
        // C needs four blocks: the two blank ones, then B's cached block (freed first), then A's
        // tail; A's head stays cached.
        compute(&mut m, C, &[9, 9, 9, 9, 9, 9, 0]);
        assert_eq!(m.usage().cached, 1);
        assert_eq!(m.lookup(&[5, 6, 0]).len(), 0);
        assert_eq!(m.lookup(&[1, 2, 3, 4, 0]).len(), 1);
    }

    #[test]
    fn duplicate_content_is_cached_once() {
        let mut m = BlockManager::new(8, 2);
        m.admit(A, &[1, 2, 3], 3).unwrap();
        m.admit(B, &[1, 2, 3], 3).unwrap();
        m.commit(A, &[1, 2, 3]);
        m.commit(B, &[1, 2, 3]);
        m.audit().unwrap();
        m.free(A);
        m.free(B);
        m.audit().unwrap();
        assert_eq!(m.usage().cached, 1);
        assert_eq!(compute(&mut m, C, &[1, 2, 3]).hit_tokens, 2);
    }

    #[test]
    fn hits_taken_from_the_free_list_count_against_it() {
        let mut m = BlockManager::new(3, 2);
        compute(&mut m, A, &[1, 2, 3, 4, 5]);
        m.free(A);
        // Three blocks free, two of them A's cached prefix. B hits both and needs two more
        // blocks: only one is left once the hits are taken.
        assert_eq!(
            m.admit(B, &[1, 2, 3, 4, 5, 6, 7], 3),
            Err(OutOfBlocks { needed: 2, free: 1 })
        );
        m.audit().unwrap();
        assert_eq!(m.usage().cached, 2, "a refused admission evicts nothing");
    }

    #[test]
    fn the_audit_catches_a_double_free_and_a_leak() {
        let mut m = BlockManager::new(4, 2);
        compute(&mut m, A, &[1, 2, 3]);
        let mut double_free = m.clone();
        double_free.blank.push(double_free.table(A)[1]);
        assert!(double_free.audit().is_err());
        let mut leak = m.clone();
        leak.blocks[2].refs = 1;
        leak.blank.retain(|&b| b != 2);
        assert!(leak.audit().is_err());
    }
}
