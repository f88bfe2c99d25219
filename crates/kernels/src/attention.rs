//! Attention over the rows of a paged KV cache.
