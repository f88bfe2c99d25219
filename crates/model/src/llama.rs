//! Llama and Qwen2 decoders, as the DeepSeek-R1-Distill models use them: grouped-query attention
//! with half-split RoPE (optionally Llama 3.1-scaled), SwiGLU MLPs, tied or untied output head.
//! Qwen2 differs only by its query/key/value biases, so both share this file.

use candle_core::Tensor;
use tiefsee_kernels::attention::RowLayout;

use crate::Segment;
use crate::cache::{AttentionQuery, KvStore};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::nn::{Embedding, Linear, Mlp, RmsNorm};
use crate::rope::{RopeStyle, RotaryEmbedding};
use crate::weights::Weights;

/// Grouped-query self-attention: `heads` query heads share `kv_heads` key/value heads.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    rope: RotaryEmbedding,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (hidden, d) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q: Linear::load(&w.pp("q_proj"), hidden, heads * d, cfg.qkv_bias)?,
            k: Linear::load(&w.pp("k_proj"), hidden, kv_heads * d, cfg.qkv_bias)?,
            v: Linear::load(&w.pp("v_proj"), hidden, kv_heads * d, cfg.qkv_bias)?,
            o: Linear::load(&w.pp("o_proj"), heads * d, hidden, cfg.o_bias)?,
            rope: RotaryEmbedding::new(d, cfg.rope_theta, &cfg.rope_scaling, RopeStyle::HalfSplit),
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    /// (tokens, hidden) -> (tokens, hidden) for the concatenated tokens of `segments`; each
    /// segment's keys and values go into `store` and its queries attend to that sequence only.
    fn forward(
        &self,
        x: &Tensor,
        segments: &[Segment],
        layer: usize,
        store: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let (q_all, k_all, v_all) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let mut outputs = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for (seq, segment) in segments.iter().enumerate() {
            let (n, start) = (segment.tokens.len(), segment.start);
            // (n, heads * d) -> (1, heads, n, d), rotated
            let heads_first = |t: &Tensor, heads: usize| -> Result<Tensor> {
                Ok(t.narrow(0, offset, n)?
                    .reshape((n, heads, d))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?)
            };
            let q = self.rope.apply(&heads_first(&q_all, self.heads)?, start)?;
            let k = self
                .rope
                .apply(&heads_first(&k_all, self.kv_heads)?, start)?;
            // Cached rows are [k | v], (n, 2 * kv_heads * d); queries (n, heads, d).
            let k = k
                .squeeze(0)?
                .transpose(0, 1)?
                .reshape((n, self.kv_heads * d))?;
            let rows = Tensor::cat(&[&k, &v_all.narrow(0, offset, n)?], 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let queries = q
                .squeeze(0)?
                .transpose(0, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let query = AttentionQuery {
                layout: RowLayout::grouped(self.kv_heads, d),
                queries: &queries,
                heads: self.heads,
                scale: (d as f32).powf(-0.5),
            };
            let out = store.attend(seq, layer, start, &rows, query)?;
            let out = Tensor::from_vec(out, (n, self.heads * d), x.device())?;
            outputs.push(out);
            offset += n;
        }
        self.o.forward(&Tensor::cat(&outputs, 0)?)
    }
}

/// One decoder block: pre-norm attention and pre-norm MLP, each with a residual.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama or Qwen2 causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    /// (vocab, hidden)
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
}

impl Llama {
    /// Loads every tensor the config calls for, checking names and shapes.
    pub fn load(w: &Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (vocab, hidden, eps) = (cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps);
        let model = w.pp("model");
        let embed = Embedding::load(&model.pp("embed_tokens"), vocab, hidden)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = model.pp(format!("layers.{i}"));
                Ok(Block {
                    attn_norm: RmsNorm::load(&l.pp("input_layernorm"), hidden, eps)?,
                    attn: Attention::load(&l.pp("self_attn"), cfg)?,
                    mlp_norm: RmsNorm::load(&l.pp("post_attention_layernorm"), hidden, eps)?,
                    mlp: Mlp::load(&l.pp("mlp"), hidden, cfg.intermediate_size, cfg.mlp_bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Some tied checkpoints still store lm_head; transformers ignores it then, and so do we.
        let lm_head = if cfg.tie_word_embeddings {
            embed.as_linear()
        } else {
            Linear::load(&w.pp("lm_head"), hidden, vocab, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::load(&model.pp("norm"), hidden, eps)?,
            lm_head,
        })
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Widths of the two cached rows per token and layer: keys and values of all kv heads.
    pub fn cache_row_widths(&self) -> (usize, usize) {
        let width = self.cfg.num_key_value_heads * self.cfg.head_dim;
        (width, width)
    }

    /// Number of layers with a cache.
    pub fn cache_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Final hidden states (tokens, hidden), after the last norm, for the concatenated segments.
    pub fn forward_hidden(
        &self,
        tokens: &Tensor,
        segments: &[Segment],
        store: &mut dyn KvStore,
    ) -> Result<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block
                .attn
                .forward(&block.attn_norm.forward(&x)?, segments, layer, store)?;
            x = (x + h)?;
            x = (&x + block.mlp.forward(&block.mlp_norm.forward(&x)?)?)?;
        }
        self.norm.forward(&x)
    }

    /// (seq, hidden) -> (seq, vocab)
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}
