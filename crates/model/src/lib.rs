//! tiefsee's model core: DeepSeek-V2/V3/R1 (MLA, DeepSeekMoE, MTP) and the Llama/Qwen2 families of
//! the R1-Distill models, loaded from Hugging Face checkpoints as published.
//!
//! The model is pure: token ids and a cache in, logits out. It knows nothing of text, sampling or
//! scheduling; tokenizer, engine and server live beside it.

pub mod cache;
pub mod config;
pub mod deepseek;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod nn;
pub mod rope;
pub mod weights;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use cache::{
    AttentionQuery, Cache, CacheFormat, KvStore, PagedBatch, PagedCache, Span, Uncached,
};
pub use config::ModelConfig;
pub use deepseek::mla::MlaPath;
pub use error::{ModelError, Result};
pub use weights::Checkpoint;

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation): (1, vocab).
    Last,
    /// Every position (scoring, perplexity): (seq, vocab).
    All,
}

/// One sequence's part of a batched forward pass: `tokens` at positions `start ..`.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    /// Logits wanted for this segment; `None` for a prefill chunk that is not the last.
    pub logits: Option<Logits>,
}

impl Segment<'_> {
    /// The positions its tokens take.
    pub fn span(&self) -> Span {
        Span {
            start: self.start,
            len: self.tokens.len(),
        }
    }
}

/// The architectures behind one type.
#[derive(Debug, Clone)]
enum Architecture {
    DeepSeek(deepseek::DeepSeek),
    Llama(llama::Llama),
}

/// A loaded causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    arch: Architecture,
    config: ModelConfig,
    device: Device,
    info: ModelInfo,
    cache_format: CacheFormat,
    /// Values cached per token (all layers) and what multi-head attention would cache.
    kv_values_per_token: (usize, usize),
}

/// What `tiefsee info` reports about a checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    /// Parameters of the main model (embedding and head included, MTP layers excluded).
    pub total_params: u64,
    /// Parameters used for one token: all but the routed experts a token does not visit.
    pub active_params: u64,
    /// Parameters of the multi-token-prediction layers.
    pub mtp_params: u64,
    /// Stored dtypes of the checkpoint's tensors, e.g. ["BF16", "F32"].
    pub stored_dtypes: Vec<String>,
    /// Dtype of the cache and of compute.
    pub cache_dtype: String,
    /// Bytes the cache holds per token (for MLA: latent plus RoPE key, all layers).
    pub kv_bytes_per_token: u64,
    /// Bytes per token that full multi-head attention with these dimensions would cache.
    pub kv_bytes_per_token_mha: u64,
    /// Bytes of weights one decoded token reads, as stored: all but the embedding table (one row)
    /// and, on average, the routed experts it does not visit. With the cache read, the traffic that
    /// bounds decoding speed by memory bandwidth.
    pub weight_bytes_per_token: u64,
    pub layers: usize,
    pub vocab_size: usize,
    pub context_length: usize,
}

impl Model {
    /// Loads a Hugging Face checkpoint folder (config.json and safetensors) or a GGUF file onto
    /// `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if gguf::is_gguf(dir) {
            let (config, checkpoint) = gguf::open(dir, device)?;
            return Self::from_checkpoint(config, &checkpoint);
        }
        let config = ModelConfig::from_dir(dir)?;
        let fp8 = match &config {
            ModelConfig::DeepSeek(c) => c.fp8_block_size,
            ModelConfig::Llama(_) => None,
        };
        let checkpoint = Checkpoint::open(dir, device)?.with_fp8_block_size(fp8);
        Self::from_checkpoint(config, &checkpoint)
    }

    /// Builds the model from an opened checkpoint, e.g. one of trainable variables
    /// ([`Checkpoint::from_tensors`]): the forward pass then records gradients for them. The
    /// absorbed MLA path folds `kv_b_proj` into per-head matrices here, so after an optimizer
    /// updates the variables, build the model again (or use [`MlaPath::Naive`]).
    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint) -> Result<Self> {
        let device = checkpoint.device();
        let root = checkpoint.pp("");
        let arch = match &config {
            ModelConfig::DeepSeek(c) => Architecture::DeepSeek(deepseek::DeepSeek::load(&root, c)?),
            ModelConfig::Llama(c) => Architecture::Llama(llama::Llama::load(&root, c)?),
        };
        let (info, kv_values_per_token) = model_info(&config, checkpoint);
        let mut model = Self {
            arch,
            config,
            device: device.clone(),
            info,
            cache_format: CacheFormat::Bf16,
            kv_values_per_token,
        };
        model.set_cache_format(CacheFormat::Bf16)?;
        Ok(model)
    }

    /// The configuration read from `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Sizes and cache costs, for `tiefsee info` and run statistics.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The DeepSeek model inside, if this is one (for MLA-path selection and MTP access).
    pub fn as_deepseek_mut(&mut self) -> Option<&mut deepseek::DeepSeek> {
        match &mut self.arch {
            Architecture::DeepSeek(m) => Some(m),
            Architecture::Llama(_) => None,
        }
    }

    /// The DeepSeek model inside, if this is one (for the training forward pass).
    pub fn as_deepseek(&self) -> Option<&deepseek::DeepSeek> {
        match &self.arch {
            Architecture::DeepSeek(m) => Some(m),
            Architecture::Llama(_) => None,
        }
    }

    /// Chooses how caches made from now on store their rows (bf16 by default); `info` reports it.
    /// An 8-bit cache needs rows that are whole blocks of 32 values.
    pub fn set_cache_format(&mut self, format: CacheFormat) -> Result<()> {
        let (layers, widths) = self.cache_shape();
        let width = widths.0 + widths.1;
        let per_row = CacheFormat::bytes_per_row(format, width).ok_or_else(|| {
            ModelError::UnsupportedCacheFormat {
                format: format.name(),
                width,
            }
        })?;
        let (values, mha_values) = self.kv_values_per_token;
        self.cache_format = format;
        self.info.cache_dtype = format.name().to_owned();
        self.info.kv_bytes_per_token = (layers * per_row) as u64;
        self.info.kv_bytes_per_token_mha = (mha_values * layers * per_row / values) as u64;
        Ok(())
    }

    /// How caches store their rows.
    pub fn cache_format(&self) -> CacheFormat {
        self.cache_format
    }

    /// Cached layers and the widths of the two row parts per token and layer.
    fn cache_shape(&self) -> (usize, (usize, usize)) {
        match &self.arch {
            Architecture::DeepSeek(m) => (m.cache_layers(), m.cache_row_widths()),
            Architecture::Llama(m) => (m.cache_layers(), m.cache_row_widths()),
        }
    }

    /// An empty cache for up to `context` tokens (at most the configured maximum when `None`).
    /// Its memory grows by doubling as tokens arrive, up to what `context` tokens take.
    pub fn new_cache(&self, context: Option<usize>) -> Result<Cache> {
        let context = context.unwrap_or(self.config.max_position_embeddings());
        let (layers, widths) = self.cache_shape();
        Cache::new(self.cache_format, layers, context, widths)
    }

    /// Runs `tokens` after what `cache` holds and returns f32 logits, (1 | seq, vocab).
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache, which: Logits) -> Result<Tensor> {
        cache.reserve(tokens.len())?;
        let segment = Segment {
            tokens,
            start: cache.len(),
            logits: Some(which),
        };
        let logits = self.forward_batch(&[segment], cache)?;
        cache.advance(tokens.len());
        logits
            .into_iter()
            .next()
            .flatten()
            .ok_or(ModelError::EmptyInput)
    }

    /// An empty pool of `slots` token slots for [`Model::forward_paged`].
    pub fn new_paged_cache(&self, slots: usize) -> Result<PagedCache> {
        let (layers, widths) = self.cache_shape();
        PagedCache::new(self.cache_format, layers, slots, widths, &self.device)
    }

    /// One batched step over sequences kept in a paged cache: `slot_tables[i]` gives the slot of
    /// every position of segment i's sequence (at least `start + tokens`). Returns the requested
    /// logits per segment.
    pub fn forward_paged(
        &self,
        segments: &[Segment],
        cache: &mut PagedCache,
        slot_tables: Vec<&[usize]>,
    ) -> Result<Vec<Option<Tensor>>> {
        let ends: Vec<usize> = segments.iter().map(|s| s.start + s.tokens.len()).collect();
        let mut batch = cache.batch(slot_tables);
        batch.check(&ends)?;
        self.forward_batch(segments, &mut batch)
    }

    /// One forward pass over several sequences at once: linear layers run on all their tokens
    /// together (each weight read once per step), attention per sequence through `store`.
    pub fn forward_batch(
        &self,
        segments: &[Segment],
        store: &mut dyn KvStore,
    ) -> Result<Vec<Option<Tensor>>> {
        // The pass runs on a thread of rayon's pool, so that the kernels' parallel loops start and
        // end there: no hand-over to the pool and back (a futex round trip) for every product.
        rayon::scope(|_| self.forward_batch_in_pool(segments, store))
    }

    fn forward_batch_in_pool(
        &self,
        segments: &[Segment],
        store: &mut dyn KvStore,
    ) -> Result<Vec<Option<Tensor>>> {
        let vocab_size = self.config.vocab_size();
        let mut ids = Vec::new();
        for segment in segments {
            if segment.tokens.is_empty() {
                return Err(ModelError::EmptyInput);
            }
            if let Some(&id) = segment.tokens.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(ModelError::TokenOutOfRange { id, vocab_size });
            }
            ids.extend_from_slice(segment.tokens);
        }
        if ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let hidden = match &self.arch {
            Architecture::DeepSeek(m) => m.forward_hidden(&ids, segments, store)?,
            Architecture::Llama(m) => m.forward_hidden(&ids, segments, store)?,
        };
        // Rows that need logits, gathered so the output head runs once.
        let mut rows: Vec<u32> = Vec::new();
        let mut offset = 0;
        for segment in segments {
            let n = segment.tokens.len();
            match segment.logits {
                Some(Logits::All) => rows.extend((offset..offset + n).map(|r| r as u32)),
                Some(Logits::Last) => rows.push((offset + n - 1) as u32),
                None => {}
            }
            offset += n;
        }
        let logits = if rows.is_empty() {
            None
        } else {
            let index = Tensor::new(rows.as_slice(), &self.device)?;
            let selected = hidden.index_select(&index, 0)?;
            Some(match &self.arch {
                Architecture::DeepSeek(m) => m.logits(&selected)?,
                Architecture::Llama(m) => m.logits(&selected)?,
            })
        };
        let mut out = Vec::with_capacity(segments.len());
        let mut row = 0;
        for segment in segments {
            let n = match segment.logits {
                Some(Logits::All) => segment.tokens.len(),
                Some(Logits::Last) => 1,
                None => 0,
            };
            out.push(match &logits {
                Some(l) if n > 0 => Some(l.narrow(0, row, n)?),
                _ => None,
            });
            row += n;
        }
        Ok(out)
    }
}

/// What `info` reports, with the cache sizes still in values (set in bytes by the cache format), and
/// the values cached per token next to what multi-head attention would cache.
fn model_info(config: &ModelConfig, checkpoint: &Checkpoint) -> (ModelInfo, (usize, usize)) {
    let numel = |name: &str| -> u64 {
        checkpoint
            .shape_of(name)
            .map_or(0, |s| s.iter().product::<usize>() as u64)
    };
    let stored = |pred: &dyn Fn(&str) -> bool| -> u64 {
        checkpoint
            .names()
            .filter(|n| pred(n))
            .filter_map(|n| checkpoint.stored_bytes(n))
            .sum::<usize>() as u64
    };
    // FP8 scales are bookkeeping, not parameters.
    let params = |pred: &dyn Fn(&str) -> bool| -> u64 {
        checkpoint
            .names()
            .filter(|n| !n.ends_with("_scale_inv") && pred(n))
            .map(numel)
            .sum()
    };
    match config {
        ModelConfig::DeepSeek(c) => {
            let mtp_prefixes: Vec<String> = (0..c.num_nextn_predict_layers)
                .map(|k| format!("model.layers.{}.", c.num_hidden_layers + k))
                .collect();
            let is_mtp = |n: &str| mtp_prefixes.iter().any(|p| n.starts_with(p.as_str()));
            let total_params = params(&|n| !is_mtp(n));
            let mtp_params = params(&|n| is_mtp(n));
            let moe_layers = (0..c.num_hidden_layers)
                .filter(|&l| c.ffn_kind(l) == config::FfnKind::Moe)
                .count() as u64;
            let expert_params = 3 * (c.hidden_size * c.moe_intermediate_size) as u64;
            let idle = (c.n_routed_experts - c.num_experts_per_tok) as u64;
            let (latent, mha) = deepseek::mla::kv_elements_per_token(c);
            let embed_read = |n: &str| c.tie_word_embeddings || n != "model.embed_tokens.weight";
            let idle_expert_bytes: u64 = (0..c.num_hidden_layers)
                .filter(|&l| c.ffn_kind(l) == config::FfnKind::Moe)
                .map(|l| {
                    let prefix = format!("model.layers.{l}.mlp.experts.");
                    let all = stored(&|n| n.starts_with(&prefix));
                    idle * all / c.n_routed_experts.max(1) as u64
                })
                .sum();
            let weight_bytes_per_token =
                stored(&|n| !is_mtp(n) && embed_read(n)).saturating_sub(idle_expert_bytes);
            let info = ModelInfo {
                architecture: config.architecture().into(),
                total_params,
                active_params: total_params - moe_layers * idle * expert_params,
                mtp_params,
                stored_dtypes: checkpoint.stored_dtypes(),
                cache_dtype: String::new(),
                kv_bytes_per_token: 0,
                kv_bytes_per_token_mha: 0,
                weight_bytes_per_token,
                layers: c.num_hidden_layers,
                vocab_size: c.vocab_size,
                context_length: c.max_position_embeddings,
            };
            (info, (latent, mha))
        }
        ModelConfig::Llama(c) => {
            let total_params = params(&|n| !(c.tie_word_embeddings && n == "lm_head.weight"));
            let kv = 2 * c.num_key_value_heads * c.head_dim * c.num_hidden_layers;
            let mha = 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers;
            // A tied head reads the embedding table (and a stored lm_head is ignored).
            let weight_bytes_per_token = stored(&|n| match c.tie_word_embeddings {
                true => n != "lm_head.weight",
                false => n != "model.embed_tokens.weight",
            });
            let info = ModelInfo {
                architecture: config.architecture().into(),
                total_params,
                active_params: total_params,
                mtp_params: 0,
                stored_dtypes: checkpoint.stored_dtypes(),
                cache_dtype: String::new(),
                kv_bytes_per_token: 0,
                kv_bytes_per_token_mha: 0,
                weight_bytes_per_token,
                layers: c.num_hidden_layers,
                vocab_size: c.vocab_size,
                context_length: c.max_position_embeddings,
            };
            (info, (kv, mha))
        }
    }
}
