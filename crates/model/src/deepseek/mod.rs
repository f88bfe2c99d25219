//! The DeepSeek-V2/V3/R1 decoder: embedding, MLA + (dense | MoE) blocks, final norm, output head,
//! and the multi-token-prediction (MTP) layers V3 stores after the last block.
//!
//! Follows DeepSeek-V3's `inference/model.py` structure (one type per concept); weights are named
//! as in the Hugging Face release (`model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight`, ...).

pub mod mla;
pub mod moe;

use candle_core::Tensor;

use crate::Segment;
use crate::cache::{Cache, KvStore};
use crate::config::{DeepSeekConfig, FfnKind};
use crate::error::Result;
use crate::nn::{Linear, Mlp, RmsNorm};
use crate::weights::Weights;
use mla::{Mla, MlaPath};
use moe::Moe;

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// One decoder block: pre-norm MLA attention and pre-norm feed-forward, each with a residual.
#[derive(Debug, Clone)]
pub struct Block {
    attn_norm: RmsNorm,
    attn: Mla,
    ffn_norm: RmsNorm,
    ffn: FeedForward,
}

impl Block {
    fn load(w: &Weights, cfg: &DeepSeekConfig, kind: FfnKind) -> Result<Self> {
        let ffn = match kind {
            FfnKind::Dense => FeedForward::Dense(Mlp::load(
                &w.pp("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                false,
            )?),
            FfnKind::Moe => FeedForward::Moe(Moe::load(&w.pp("mlp"), cfg)?),
        };
        Ok(Self {
            attn_norm: RmsNorm::load(&w.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            attn: Mla::load(&w.pp("self_attn"), cfg)?,
            ffn_norm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            ffn,
        })
    }

    /// (tokens, hidden) -> (tokens, hidden) for the concatenated tokens of `segments`.
    fn forward(
        &self,
        x: &Tensor,
        segments: &[Segment],
        layer: usize,
        store: &mut dyn KvStore,
        path: MlaPath,
    ) -> Result<Tensor> {
        let attn = self
            .attn
            .forward(&self.attn_norm.forward(x)?, segments, layer, store, path)?;
        let x = (x + attn)?;
        let h = self.ffn_norm.forward(&x)?;
        let ffn = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&h)?,
            FeedForward::Moe(moe) => moe.forward(&h)?,
        };
        Ok((x + ffn)?)
    }
}

/// One multi-token-prediction module (V3 paper 2.2): predicts the token after next from the main
/// model's hidden state and the next token's embedding. Loaded so checkpoints round-trip and
/// speculative decoding can use it.
#[derive(Debug, Clone)]
pub struct MtpLayer {
    /// Normalizes the next token's embedding.
    pub enorm: RmsNorm,
    /// Normalizes the previous depth's hidden state.
    pub hnorm: RmsNorm,
    /// (hidden, 2 * hidden): projects [embedding; hidden] back to hidden.
    pub eh_proj: Linear,
    pub block: Block,
    pub head_norm: RmsNorm,
    /// (vocab, hidden), the main output head in the released checkpoints.
    pub head: Linear,
}

/// A DeepSeek-V2/V3 causal language model.
#[derive(Debug, Clone)]
pub struct DeepSeek {
    cfg: DeepSeekConfig,
    /// (vocab, hidden)
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    mtp: Vec<MtpLayer>,
    path: MlaPath,
}

impl DeepSeek {
    /// Loads every tensor the config calls for, checking names and shapes.
    pub fn load(w: &Weights, cfg: &DeepSeekConfig) -> Result<Self> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let model = w.pp("model");
        let embed = model.get("embed_tokens.weight", &[vocab, hidden])?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(&model.pp(format!("layers.{i}")), cfg, cfg.ffn_kind(i)))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embed.clone())
        } else {
            Linear::load(&w.pp("lm_head"), hidden, vocab, false)?
        };
        // Checkpoints saved by transformers keep `num_nextn_predict_layers` but drop the MTP
        // tensors; the main model is complete without them, so their absence is not an error.
        let mtp_stored =
            model.contains(&format!("layers.{}.eh_proj.weight", cfg.num_hidden_layers));
        let mtp_layers = if mtp_stored {
            cfg.num_nextn_predict_layers
        } else {
            0
        };
        let mtp = (0..mtp_layers)
            .map(|k| {
                let l = model.pp(format!("layers.{}", cfg.num_hidden_layers + k));
                Ok(MtpLayer {
                    enorm: RmsNorm::load(&l.pp("enorm"), hidden, cfg.rms_norm_eps)?,
                    hnorm: RmsNorm::load(&l.pp("hnorm"), hidden, cfg.rms_norm_eps)?,
                    eh_proj: Linear::load(&l.pp("eh_proj"), 2 * hidden, hidden, false)?,
                    block: Block::load(&l, cfg, cfg.ffn_kind(cfg.num_hidden_layers + k))?,
                    head_norm: RmsNorm::load(&l.pp("shared_head.norm"), hidden, cfg.rms_norm_eps)?,
                    head: if l.contains("shared_head.head.weight") {
                        Linear::load(&l.pp("shared_head.head"), hidden, vocab, false)?
                    } else {
                        lm_head.clone()
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::load(&model.pp("norm"), hidden, cfg.rms_norm_eps)?,
            lm_head,
            mtp,
            path: MlaPath::Absorbed,
        })
    }

    /// The configuration the model was loaded with.
    pub fn config(&self) -> &DeepSeekConfig {
        &self.cfg
    }

    /// The MTP modules, in depth order.
    pub fn mtp_layers(&self) -> &[MtpLayer] {
        &self.mtp
    }

    /// Chooses the attention computation (absorbed by default).
    pub fn set_mla_path(&mut self, path: MlaPath) {
        self.path = path;
    }

    /// An empty latent cache for up to `context` tokens.
    pub fn new_cache(&self, context: usize) -> Cache {
        Cache::new(self.blocks.len(), context)
    }

    /// Widths of the two cached rows per token and layer: latent and RoPE key.
    pub fn cache_row_widths(&self) -> (usize, usize) {
        (self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
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
        let mut x = self.embed.index_select(tokens, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, segments, layer, store, self.path)?;
        }
        self.norm.forward(&x)
    }

    /// (seq, hidden) -> (seq, vocab)
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}
