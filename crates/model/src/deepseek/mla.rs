//! Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1), in its naive and absorbed forms.
//!
//! Keys and values are compressed into a latent `c_kv` of `kv_lora_rank` values per token, plus one
//! decoupled RoPE key `k_pe` shared by all heads; the cache holds only those two. The naive form
//! expands the cached latent into per-head keys and values with `kv_b_proj`; the absorbed form folds
//! the key up-projection into the query and applies the value up-projection after attention, so
//! attention runs directly over the latent. Both give the same result; tests hold one to the other.

use candle_core::Tensor;
use tiefsee_kernels::attention::RowLayout;
use tiefsee_kernels::{MatmulJob, QMatrix, matmul_batch};

use crate::Segment;
use crate::cache::{AttentionQuery, KvStore, Span};
use crate::config::DeepSeekConfig;
use crate::error::Result;
use crate::nn::{Linear, LinearWeight, RmsNorm, causal_mask, forward_all, masked_softmax};
use crate::rope::{RopeStyle, RotaryEmbedding};
use crate::weights::Weights;

/// Epsilon of the latent norms: DeepSeek's code (and transformers) build `q_a_layernorm` and
/// `kv_a_layernorm` with the RMSNorm default, not `rms_norm_eps`.
const LATENT_NORM_EPS: f64 = 1e-6;

/// Which of the two equivalent attention computations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlaPath {
    /// Per-head keys and values reconstructed from the latent (the reference form).
    Naive,
    /// Attention over the latent itself, with the up-projections folded in (the fast form).
    Absorbed,
}

/// How queries are produced.
#[derive(Debug, Clone)]
enum QueryProjection {
    /// `q_proj` straight from the hidden state (V2-Lite, no `q_lora_rank`).
    Plain(Linear),
    /// `q_b_proj(norm(q_a_proj(x)))` through a rank-`q_lora_rank` bottleneck.
    LowRank {
        down: Linear,
        norm: RmsNorm,
        up: Linear,
    },
}

/// `kv_b_proj` (heads * (nope + v), kv_lora_rank), in the form each attention computation uses.
#[derive(Debug, Clone)]
enum LatentUp {
    /// f32, with its halves split per head for the absorbed form.
    Dense {
        /// kv_lora_rank -> heads * (qk_nope_head_dim + v_head_dim), for the naive form.
        kv_up: Linear,
        /// (heads, qk_nope_head_dim, kv_lora_rank): the key half, folded into queries.
        key_up: Tensor,
        /// (heads, kv_lora_rank, v_head_dim): the value half, transposed, applied after attention.
        value_up_t: Tensor,
    },
    /// llama.cpp's MLA pair kept in its block format, one matrix per head: `key[h]` (kv_lora_rank,
    /// nope) maps a head's query to latent space, `value[h]` (v, kv_lora_rank) maps its attended
    /// latent to values.
    Quantized {
        key: Vec<QMatrix>,
        value: Vec<QMatrix>,
    },
}

/// One MLA attention layer.
#[derive(Debug, Clone)]
pub struct Mla {
    query: QueryProjection,
    /// hidden -> kv_lora_rank + qk_rope_head_dim
    kv_down: Linear,
    kv_norm: RmsNorm,
    /// The up-projections out of the latent (`kv_b_proj`).
    latent_up: LatentUp,
    out: Linear,
    rope: RotaryEmbedding,
    heads: usize,
    nope_dim: usize,
    rope_dim: usize,
    v_dim: usize,
    kv_lora_rank: usize,
    softmax_scale: f64,
}

impl Mla {
    /// Loads `self_attn` of one layer.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig) -> Result<Self> {
        let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let (nope_dim, rope_dim, v_dim) =
            (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let kv_lora_rank = cfg.kv_lora_rank;
        let bias = cfg.attention_bias;
        let query = match cfg.q_lora_rank {
            None => QueryProjection::Plain(Linear::load(
                &w.pp("q_proj"),
                hidden,
                heads * cfg.qk_head_dim(),
                false,
            )?),
            Some(rank) => QueryProjection::LowRank {
                down: Linear::load(&w.pp("q_a_proj"), hidden, rank, bias)?,
                norm: RmsNorm::load(&w.pp("q_a_layernorm"), rank, LATENT_NORM_EPS)?,
                up: Linear::load(&w.pp("q_b_proj"), rank, heads * cfg.qk_head_dim(), false)?,
            },
        };
        let kv_b_shape = [heads * (nope_dim + v_dim), kv_lora_rank];
        let latent_up = match w.get_mla_pair("kv_b_proj.weight", &kv_b_shape)? {
            Some((key, value)) => LatentUp::Quantized {
                key: (0..heads)
                    .map(|h| key.slice_rows(h * kv_lora_rank, kv_lora_rank))
                    .collect::<std::result::Result<_, _>>()?,
                value: (0..heads)
                    .map(|h| value.slice_rows(h * v_dim, v_dim))
                    .collect::<std::result::Result<_, _>>()?,
            },
            None => {
                let kv_up = Linear::load(&w.pp("kv_b_proj"), kv_lora_rank, kv_b_shape[0], false)?;
                // (heads * (nope + v), rank) -> (heads, nope + v, rank)
                let per_head = kv_up.weight().to_dense(w.device())?.reshape((
                    heads,
                    nope_dim + v_dim,
                    kv_lora_rank,
                ))?;
                let key_up = per_head.narrow(1, 0, nope_dim)?.contiguous()?;
                let value_up_t = per_head
                    .narrow(1, nope_dim, v_dim)?
                    .transpose(1, 2)?
                    .contiguous()?;
                LatentUp::Dense {
                    kv_up,
                    key_up,
                    value_up_t,
                }
            }
        };
        Ok(Self {
            query,
            kv_down: Linear::load(
                &w.pp("kv_a_proj_with_mqa"),
                hidden,
                kv_lora_rank + rope_dim,
                bias,
            )?,
            kv_norm: RmsNorm::load(&w.pp("kv_a_layernorm"), kv_lora_rank, LATENT_NORM_EPS)?,
            latent_up,
            out: Linear::load(&w.pp("o_proj"), heads * v_dim, hidden, bias)?,
            rope: RotaryEmbedding::new(
                rope_dim,
                cfg.rope_theta,
                &cfg.rope_scaling,
                if cfg.rope_interleave {
                    RopeStyle::Interleaved
                } else {
                    RopeStyle::HalfSplit
                },
            ),
            heads,
            nope_dim,
            rope_dim,
            v_dim,
            kv_lora_rank,
            softmax_scale: cfg.softmax_scale(),
        })
    }

    /// (tokens, hidden) -> (tokens, hidden) for the concatenated tokens of `segments`; each
    /// segment's latent rows go into `store` and its queries attend to that sequence's rows only.
    pub fn forward(
        &self,
        x: &Tensor,
        segments: &[Segment],
        layer: usize,
        store: &mut dyn KvStore,
        path: MlaPath,
    ) -> Result<Tensor> {
        let h = self.heads;
        // Projections run once over all tokens of the batch, so weights are read once per step; the
        // two that read the hidden state run together.
        let (q, kv) = match &self.query {
            QueryProjection::Plain(proj) => {
                let [q, kv] = forward_all([proj, &self.kv_down], x)?;
                (q, kv)
            }
            QueryProjection::LowRank { down, norm, up } => {
                let [q_a, kv] = forward_all([down, &self.kv_down], x)?;
                (up.forward(&norm.forward(&q_a)?)?, kv)
            }
        }; // (tokens, heads * qk), (tokens, kv_lora_rank + rope)
        let c_kv = self.kv_norm.forward(&kv.narrow(1, 0, self.kv_lora_rank)?)?;
        let tokens = x.dim(0)?;
        // RoPE and the absorbed key projection also run once for the whole batch: the position of
        // every token, sequence by sequence.
        let positions: Vec<usize> = segments
            .iter()
            .flat_map(|s| s.start..s.start + s.tokens.len())
            .collect();
        // (tokens, heads * qk) -> (heads, tokens, qk)
        let q = q
            .reshape((tokens, h, self.nope_dim + self.rope_dim))?
            .transpose(0, 1)?;
        let q_nope = q.narrow(2, 0, self.nope_dim)?.contiguous()?;
        let q_pe = self
            .rope
            .apply_at(
                &q.narrow(2, self.nope_dim, self.rope_dim)?.unsqueeze(0)?,
                &positions,
            )?
            .squeeze(0)?; // (heads, tokens, rope)
        let k_pe = kv.narrow(1, self.kv_lora_rank, self.rope_dim)?.reshape((
            1,
            1,
            tokens,
            self.rope_dim,
        ))?;
        let k_pe = self
            .rope
            .apply_at(&k_pe, &positions)?
            .reshape((tokens, self.rope_dim))?;
        let q_first = match path {
            MlaPath::Absorbed => self.absorb_query(&q_nope)?, // (heads, tokens, kv_lora_rank)
            MlaPath::Naive => q_nope,
        };
        let out = match path {
            MlaPath::Absorbed => {
                // Rows [c_kv | k_pe] and queries [q_latent | q_pe] of every token: attention over
                // the latent cache itself, values being the latent part of each row, all sequences
                // in one call.
                let spans: Vec<Span> = segments.iter().map(Segment::span).collect();
                let rows = Tensor::cat(&[&c_kv, &k_pe], 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let queries = Tensor::cat(&[&q_first, &q_pe], 2)?
                    .transpose(0, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let query = AttentionQuery {
                    layout: RowLayout::latent(self.kv_lora_rank, self.rope_dim),
                    queries: &queries,
                    heads: h,
                    scale: self.softmax_scale as f32,
                };
                let out = store.attend(layer, &spans, &rows, query)?;
                // (tokens, heads, kv_lora_rank) -> (heads, tokens, kv_lora_rank) -> (heads, tokens, v)
                let out = Tensor::from_vec(out, (tokens, h, self.kv_lora_rank), x.device())?
                    .transpose(0, 1)?;
                self.expand_values(&out)?
            }
            MlaPath::Naive => {
                let mut outputs = Vec::with_capacity(segments.len());
                let mut offset = 0;
                for (seq, segment) in segments.iter().enumerate() {
                    let (n, start) = (segment.tokens.len(), segment.start);
                    // (t, kv_lora_rank), (t, rope) for all t = start + n positions of this sequence
                    let (seq_c_kv, seq_k_pe) = store.store(
                        seq,
                        layer,
                        start,
                        &c_kv.narrow(0, offset, n)?,
                        &k_pe.narrow(0, offset, n)?,
                    )?;
                    outputs.push(self.attend_naive(
                        &q_first.narrow(1, offset, n)?.contiguous()?,
                        &q_pe.narrow(1, offset, n)?.contiguous()?,
                        &seq_c_kv,
                        &seq_k_pe,
                        start,
                    )?);
                    offset += n;
                }
                Tensor::cat(&outputs, 1)?
            }
        };
        // (heads, tokens, v) -> (tokens, heads * v)
        let out = out.transpose(0, 1)?.reshape((tokens, h * self.v_dim))?;
        self.out.forward(&out)
    }

    /// Naive attention of one sequence: per-head keys and values expanded from its latent
    /// (t, kv_lora_rank) by `kv_b_proj` -> (heads, n, v_head_dim).
    fn attend_naive(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        c_kv: &Tensor,
        k_pe: &Tensor,
        start: usize,
    ) -> Result<Tensor> {
        let (h, n) = (self.heads, q_nope.dim(1)?);
        let t = c_kv.dim(0)?;
        // (t, heads * (nope + v)) -> (heads, t, nope + v)
        let kv = self
            .naive_kv_up(c_kv)?
            .reshape((t, h, self.nope_dim + self.v_dim))?
            .transpose(0, 1)?;
        let k_nope = kv.narrow(2, 0, self.nope_dim)?;
        let v = kv.narrow(2, self.nope_dim, self.v_dim)?.contiguous()?;
        let k_pe = k_pe.unsqueeze(0)?.broadcast_as((h, t, self.rope_dim))?;
        let k = Tensor::cat(&[&k_nope, &k_pe], 2)?; // (heads, t, qk)
        let q = Tensor::cat(&[q_nope, q_pe], 2)?; // (heads, n, qk)
        let scores = q.matmul(&k.transpose(1, 2)?.contiguous()?)?; // (heads, n, t)
        let mask = self.mask(start, n, c_kv)?;
        Ok(masked_softmax(&scores, self.softmax_scale, mask.as_ref())?.matmul(&v)?)
    }

    /// Folds the key up-projection into the queries: (heads, tokens, nope) -> (heads, tokens, rank).
    fn absorb_query(&self, q_nope: &Tensor) -> Result<Tensor> {
        match &self.latent_up {
            LatentUp::Dense { key_up, .. } => Ok(q_nope.matmul(key_up)?),
            LatentUp::Quantized { key, .. } => per_head(key, q_nope),
        }
    }

    /// Applies the value up-projection after attention: (heads, tokens, rank) -> (heads, tokens, v).
    fn expand_values(&self, attended: &Tensor) -> Result<Tensor> {
        match &self.latent_up {
            LatentUp::Dense { value_up_t, .. } => Ok(attended.matmul(value_up_t)?),
            LatentUp::Quantized { value, .. } => per_head(value, attended),
        }
    }

    /// Per-head keys and values (t, heads * (nope + v)) of latent rows (t, rank), for the naive form.
    fn naive_kv_up(&self, c_kv: &Tensor) -> Result<Tensor> {
        match &self.latent_up {
            LatentUp::Dense { kv_up, .. } => kv_up.forward(c_kv),
            LatentUp::Quantized { key, value } => {
                // The reference form on a quantized file: rebuild kv_b_proj's rows head by head.
                let device = c_kv.device();
                let mut rows = Vec::with_capacity(2 * key.len());
                for (k, v) in key.iter().zip(value) {
                    rows.push(
                        LinearWeight::Mapped(k.clone())
                            .to_dense(device)?
                            .t()?
                            .contiguous()?,
                    );
                    rows.push(LinearWeight::Mapped(v.clone()).to_dense(device)?);
                }
                Ok(c_kv.matmul(&Tensor::cat(&rows, 0)?.t()?)?)
            }
        }
    }

    /// The causal mask of `n` queries at positions `start ..`; none for a single query.
    fn mask(&self, start: usize, n: usize, like: &Tensor) -> Result<Option<Tensor>> {
        Ok(if n > 1 {
            Some(causal_mask(start, n, like.device())?)
        } else {
            None
        })
    }
}

/// `x[h]` (tokens, in) through `matrices[h]` (out, in) for every head, as one batch of products:
/// (heads, tokens, in) -> (heads, tokens, out).
fn per_head(matrices: &[QMatrix], x: &Tensor) -> Result<Tensor> {
    let (heads, tokens, in_dim) = x.dims3()?;
    let out_dim = matrices.first().map_or(0, QMatrix::rows);
    let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; heads * tokens * out_dim];
    if !out.is_empty() && !input.is_empty() {
        let mut jobs: Vec<MatmulJob> = matrices
            .iter()
            .zip(input.chunks_exact(tokens * in_dim))
            .zip(out.chunks_exact_mut(tokens * out_dim))
            .map(|((matrix, x), out)| MatmulJob { matrix, x, out })
            .collect();
        matmul_batch(&mut jobs)?;
    }
    Ok(Tensor::from_vec(out, (heads, tokens, out_dim), x.device())?)
}

/// Cache elements per token of MLA (latent plus RoPE key) and of the multi-head attention it replaces.
pub fn kv_elements_per_token(cfg: &DeepSeekConfig) -> (usize, usize) {
    let layers = cfg.num_hidden_layers;
    let latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers;
    let mha = cfg.num_attention_heads * (cfg.qk_head_dim() + cfg.v_head_dim) * layers;
    (latent, mha)
}
