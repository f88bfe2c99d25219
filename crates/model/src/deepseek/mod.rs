//! The DeepSeek-V2/V3/R1 decoder: embedding, MLA + (dense | MoE) blocks, final norm, output head,
//! and the multi-token-prediction (MTP) layers V3 stores after the last block.
//!
//! Follows DeepSeek-V3's `inference/model.py` structure (one type per concept); weights are named
//! as in the Hugging Face release (`model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight`, ...).

pub mod mla;
pub mod moe;

use candle_core::Tensor;

use crate::cache::{KvStore, Uncached};
use crate::config::{DeepSeekConfig, FfnKind};
use crate::error::ModelError;
use crate::error::Result;
use crate::nn::{Embedding, Linear, Mlp, RmsNorm};
use crate::weights::Weights;
use crate::{Logits, Segment};
use mla::{Mla, MlaPath};
use moe::{Moe, RoutingTrace};

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

    /// (tokens, hidden) -> (tokens, hidden) for the concatenated tokens of `segments`, and the
    /// routing of a MoE block.
    fn forward(
        &self,
        x: &Tensor,
        segments: &[Segment],
        layer: usize,
        store: &mut dyn KvStore,
        path: MlaPath,
    ) -> Result<(Tensor, Option<RoutingTrace>)> {
        let attn = self
            .attn
            .forward(&self.attn_norm.forward(x)?, segments, layer, store, path)?;
        let x = (x + attn)?;
        let h = self.ffn_norm.forward(&x)?;
        let (ffn, trace) = match &self.ffn {
            FeedForward::Dense(mlp) => (mlp.forward(&h)?, None),
            FeedForward::Moe(moe) => {
                let (y, trace) = moe.forward_traced(&h)?;
                (y, Some(trace))
            }
        };
        Ok(((x + ffn)?, trace))
    }
}

/// One multi-token-prediction module (V3 paper 2.2.2): predicts the token `k + 1` ahead from the
/// previous depth's hidden state and the embedding of the token `k` ahead. Inputs are combined as
/// the released weights expect (vLLM's and SGLang's `DeepSeekMTP`): `eh_proj([enorm(emb); hnorm(h)])`,
/// where depth 1 receives the main model's final-normed hidden state and deeper modules the
/// previous module's block output. The embedding is the layer's own `embed_tokens` where stored
/// (as in the released checkpoints, equal to the main one), else the main model's.
#[derive(Debug, Clone)]
pub struct MtpLayer {
    /// (vocab, hidden) embedding of the token k ahead.
    pub embed: Embedding,
    /// Normalizes the next token's embedding.
    pub enorm: RmsNorm,
    /// Normalizes the previous depth's hidden state.
    pub hnorm: RmsNorm,
    /// (hidden, 2 * hidden): projects [embedding; hidden] back to hidden.
    pub eh_proj: Linear,
    /// A decoder block like the main model's.
    pub block: Block,
    /// The shared head's norm.
    pub head_norm: RmsNorm,
    /// (vocab, hidden), the main output head in the released checkpoints.
    pub head: Linear,
}

/// What [`DeepSeek::forward_train`] computes for a batch of whole sequences.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// Next-token logits at every position of the concatenated sequences. `// (tokens, vocab)`
    pub logits: Tensor,
    /// Per MTP depth k (index k - 1): logits for the token k + 1 ahead at every position i with
    /// i + k < len, sequence by sequence. `// (positions, vocab)`
    pub mtp_logits: Vec<Tensor>,
    /// Every MoE layer's routing, with the layer's index in the checkpoint (MTP layers follow the
    /// main ones).
    pub routing: Vec<(usize, RoutingTrace)>,
}

/// A DeepSeek-V2/V3 causal language model.
#[derive(Debug, Clone)]
pub struct DeepSeek {
    cfg: DeepSeekConfig,
    /// (vocab, hidden)
    embed: Embedding,
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
        let embed = Embedding::load(&model.pp("embed_tokens"), vocab, hidden)?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(&model.pp(format!("layers.{i}")), cfg, cfg.ffn_kind(i)))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.as_linear()
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
                    embed: if l.contains("embed_tokens.weight") {
                        Embedding::load(&l.pp("embed_tokens"), vocab, hidden)?
                    } else {
                        embed.clone()
                    },
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
        let mut x = self.embed.forward(tokens)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, segments, layer, store, self.path)?.0;
        }
        self.norm.forward(&x)
    }

    /// The training forward pass over whole sequences (no cache): next-token logits at every
    /// position, each MTP depth's logits (when `with_mtp`), and every MoE layer's routing. All
    /// differentiable.
    pub fn forward_train(&self, sequences: &[&[u32]], with_mtp: bool) -> Result<TrainOutput> {
        let device = &self.embed.device().clone();
        let ids: Vec<u32> = sequences.iter().flat_map(|s| s.iter().copied()).collect();
        if sequences.iter().any(|s| s.is_empty()) || ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab_size: self.cfg.vocab_size,
            });
        }
        let segments = whole_sequences(sequences);
        let mut x = self.embed.forward(&Tensor::new(ids.as_slice(), device)?)?;
        let mut routing = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            let (y, trace) = block.forward(&x, &segments, layer, &mut Uncached, MlaPath::Naive)?;
            routing.extend(trace.map(|t| (layer, t)));
            x = y;
        }
        let hidden = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&hidden)?;

        // Depth k sees position i of each sequence (i + k < len) with the token at i + k.
        let mut mtp_logits = Vec::with_capacity(self.mtp.len());
        let mut previous = hidden;
        let mut lens: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let depths = if with_mtp { self.mtp.len() } else { 0 };
        for (depth, mtp) in self.mtp.iter().take(depths).enumerate() {
            let k = depth + 1;
            // Rows of `previous` to keep (each sequence loses its last position) and the tokens k ahead.
            let mut keep = Vec::new();
            let mut ahead = Vec::new();
            let mut offset = 0;
            for (seq, &len) in sequences.iter().zip(&lens) {
                if len > 1 {
                    keep.extend((offset..offset + len - 1).map(|r| r as u32));
                    ahead.extend_from_slice(&seq[k..k + len - 1]);
                }
                offset += len;
            }
            lens.iter_mut().for_each(|l| *l = l.saturating_sub(1));
            if keep.is_empty() {
                break;
            }
            let h = previous.index_select(&Tensor::new(keep.as_slice(), device)?, 0)?;
            let e = mtp.embed.forward(&Tensor::new(ahead.as_slice(), device)?)?;
            let x = mtp.eh_proj.forward(&Tensor::cat(
                &[mtp.enorm.forward(&e)?, mtp.hnorm.forward(&h)?],
                1,
            )?)?;
            let shifted: Vec<&[u32]> = sequences
                .iter()
                .zip(&lens)
                .filter(|(_, len)| **len > 0)
                .map(|(s, &len)| &s[k..k + len])
                .collect();
            let segments = whole_sequences(&shifted);
            let layer = self.blocks.len() + depth;
            let (y, trace) =
                mtp.block
                    .forward(&x, &segments, layer, &mut Uncached, MlaPath::Naive)?;
            routing.extend(trace.map(|t| (layer, t)));
            mtp_logits.push(mtp.head.forward(&mtp.head_norm.forward(&y)?)?);
            previous = y;
        }
        Ok(TrainOutput {
            logits,
            mtp_logits,
            routing,
        })
    }

    /// (seq, hidden) -> (seq, vocab)
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

/// Segments feeding each sequence whole from position 0, with logits everywhere.
fn whole_sequences<'a>(sequences: &[&'a [u32]]) -> Vec<Segment<'a>> {
    sequences
        .iter()
        .map(|tokens| Segment {
            tokens,
            start: 0,
            logits: Some(Logits::All),
        })
        .collect()
}
