//! The attention cache of one sequence: per layer, two tensors grown along the sequence axis.
//!
//! For MLA layers they are the normalized latent `c_kv` (t, kv_lora_rank) and the rotated RoPE key
//! `k_pe` (t, qk_rope_head_dim), nothing per head; for grouped-query attention, keys and values
//! (kv_heads, t, head_dim). The paged, shared cache of the serving engine builds on the same layout.

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// Two tensors of one layer, concatenated along `seq_dim` as tokens arrive.
#[derive(Debug, Clone)]
pub struct LayerCache {
    entries: Option<(Tensor, Tensor)>,
    seq_dim: usize,
}

impl LayerCache {
    /// An empty cache whose tensors grow along `seq_dim`.
    pub fn new(seq_dim: usize) -> Self {
        Self {
            entries: None,
            seq_dim,
        }
    }

    /// Appends new entries and returns everything cached so far, the new entries included.
    pub fn append(&mut self, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let full = match &self.entries {
            None => (a.clone(), b.clone()),
            Some((old_a, old_b)) => (
                Tensor::cat(&[old_a, a], self.seq_dim)?,
                Tensor::cat(&[old_b, b], self.seq_dim)?,
            ),
        };
        self.entries = Some(full.clone());
        Ok(full)
    }

    /// Bytes held, for reporting.
    pub fn bytes(&self) -> usize {
        self.entries.as_ref().map_or(0, |(a, b)| {
            (a.elem_count() + b.elem_count()) * a.dtype().size_in_bytes()
        })
    }
}

/// The cache of one sequence: one [`LayerCache`] per decoder layer and a context limit.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerCache>,
    len: usize,
    context: usize,
}

impl Cache {
    /// An empty cache for `layers` layers holding at most `context` tokens.
    pub fn new(layers: Vec<LayerCache>, context: usize) -> Self {
        Self {
            layers,
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
        self.layers.iter().map(LayerCache::bytes).sum()
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

    /// The layer caches, for the forward pass.
    pub(crate) fn layers_mut(&mut self) -> &mut [LayerCache] {
        &mut self.layers
    }

    /// Records that `n` tokens were appended to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
