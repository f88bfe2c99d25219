//! Llama and Qwen2 decoders, as the DeepSeek-R1-Distill models use them: grouped-query attention
//! with half-split RoPE (optionally Llama 3.1-scaled), SwiGLU MLPs, tied or untied output head.
//! Qwen2 differs only by its query/key/value biases, so both share this file.

use candle_core::Tensor;
use tiefsee_kernels::attention::RowLayout;

use crate::Segment;
use crate::cache::{AttentionQuery, KvStore, Span};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::nn::{Embedding, Linear, Mlp, RmsNorm, forward_all};
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
        let tokens = x.dim(0)?;
        let [q, k, v] = forward_all([&self.q, &self.k, &self.v], x)?;
        // RoPE runs once for the whole batch: the position of every token, sequence by sequence.
        let positions: Vec<usize> = segments
            .iter()
            .flat_map(|s| s.start..s.start + s.tokens.len())
            .collect();
        // (tokens, heads * d) -> (1, heads, tokens, d), rotated, -> (tokens, heads * d)
        let rotate = |t: &Tensor, heads: usize| -> Result<Tensor> {
            let t = t
                .reshape((tokens, heads, d))?
                .transpose(0, 1)?
                .unsqueeze(0)?;
            Ok(self
                .rope
                .apply_at(&t, &positions)?
                .squeeze(0)?
                .transpose(0, 1)?
                .reshape((tokens, heads * d))?)
        };
        // Cached rows are [k | v], (tokens, 2 * kv_heads * d); queries (tokens, heads, d).
        let rows = Tensor::cat(&[&rotate(&k, self.kv_heads)?, &v], 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let queries = rotate(&q, self.heads)?.flatten_all()?.to_vec1::<f32>()?;
        let spans: Vec<Span> = segments.iter().map(Segment::span).collect();
        let query = AttentionQuery {
            layout: RowLayout::grouped(self.kv_heads, d),
            queries: &queries,
            heads: self.heads,
            scale: (d as f32).powf(-0.5),
        };
        let out = store.attend(layer, &spans, &rows, query)?;
        self.o.forward(&Tensor::from_vec(
            out,
            (tokens, self.heads * d),
            x.device(),
        )?)
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
