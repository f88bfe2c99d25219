//! Model configurations, read from a checkpoint's own `config.json` as published.
//!
//! DeepSeek checkpoints spell their routing out (`scoring_func`, `topk_method`, ...) and use the
//! legacy `rope_scaling` dict; transformers 5 writes `rope_parameters` instead. Both are accepted.
//! Anything tiefsee cannot compute exactly is refused with the field that says so.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The architectures tiefsee implements, with their configurations.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// `DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM`: MLA attention, DeepSeekMoE.
    DeepSeek(DeepSeekConfig),
    /// `LlamaForCausalLM` and `Qwen2ForCausalLM` (the R1-Distill families): grouped-query attention.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads `config.json` in a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Json { source, .. } => ModelError::Json { path, source },
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let json_err = |source| ModelError::Json {
            path: "config.json".into(),
            source,
        };
        let value: Value = serde_json::from_str(text).map_err(json_err)?;
        let architecture = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                let model_type = value.get("model_type")?.as_str()?;
                Some(
                    match model_type {
                        "deepseek_v2" => "DeepseekV2ForCausalLM",
                        "deepseek_v3" => "DeepseekV3ForCausalLM",
                        "qwen2" => "Qwen2ForCausalLM",
                        "llama" => "LlamaForCausalLM",
                        other => other,
                    }
                    .to_owned(),
                )
            })
            .ok_or(ModelError::InvalidConfig {
                field: "architectures",
                reason: "neither `architectures` nor `model_type` names the architecture".into(),
            })?;
        let rope = (RopeScaling::from_config(&value)?, rope_theta(&value));
        match architecture.as_str() {
            "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" => {
                let version = if architecture == "DeepseekV3ForCausalLM" {
                    DeepSeekVersion::V3
                } else {
                    DeepSeekVersion::V2
                };
                let raw: RawDeepSeek = serde_json::from_value(value).map_err(json_err)?;
                Ok(Self::DeepSeek(DeepSeekConfig::new(raw, version, rope)?))
            }
            "LlamaForCausalLM" | "Qwen2ForCausalLM" => {
                let family = if architecture == "Qwen2ForCausalLM" {
                    LlamaFamily::Qwen2
                } else {
                    LlamaFamily::Llama
                };
                let raw: RawLlama = serde_json::from_value(value).map_err(json_err)?;
                Ok(Self::Llama(LlamaConfig::new(raw, family, rope)?))
            }
            other => Err(ModelError::UnsupportedArchitecture(other.to_owned())),
        }
    }

    /// The architecture's name as `config.json` spells it.
    pub fn architecture(&self) -> &'static str {
        match self {
            Self::DeepSeek(c) => match c.version {
                DeepSeekVersion::V2 => "DeepseekV2ForCausalLM",
                DeepSeekVersion::V3 => "DeepseekV3ForCausalLM",
            },
            Self::Llama(c) => match c.family {
                LlamaFamily::Llama => "LlamaForCausalLM",
                LlamaFamily::Qwen2 => "Qwen2ForCausalLM",
            },
        }
    }

    /// Number of token ids the embedding and output head cover.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::DeepSeek(c) => c.vocab_size,
            Self::Llama(c) => c.vocab_size,
        }
    }

    /// Longest sequence the model was configured for.
    pub fn max_position_embeddings(&self) -> usize {
        match self {
            Self::DeepSeek(c) => c.max_position_embeddings,
            Self::Llama(c) => c.max_position_embeddings,
        }
    }
}

/// Rotary position embedding frequency scaling, as `rope_scaling` / `rope_parameters` give it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// YaRN (DeepSeek-V2/V3 long context): frequencies blended by a ramp, attention scaled by mscale.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
        /// Explicit cos/sin multiplier; derived from `factor` and the mscales when absent.
        attention_factor: Option<f64>,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per inverse frequency, as llama.cpp stores Llama 3.1's scaling (the `rope_freqs`
    /// tensor of a GGUF file): `inv_freq[i] / factors[i]`.
    Factors(Vec<f64>),
}

impl RopeScaling {
    fn from_config(config: &Value) -> Result<Self> {
        let dict = match (config.get("rope_scaling"), config.get("rope_parameters")) {
            (Some(d), _) if d.is_object() => d,
            (_, Some(d)) if d.is_object() => d,
            _ => return Ok(Self::None),
        };
        let kind = dict
            .get("rope_type")
            .or_else(|| dict.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &'static str| -> Result<Option<f64>> {
            match dict.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or(ModelError::InvalidConfig {
                    field: "rope_scaling",
                    reason: format!("`{key}` is not a number"),
                }),
            }
        };
        let required = |key: &'static str| -> Result<f64> {
            num(key)?.ok_or(ModelError::InvalidConfig {
                field: "rope_scaling",
                reason: format!("{kind} scaling needs `{key}`"),
            })
        };
        let max_pos = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(4096) as f64;
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: required("factor")?,
            }),
            "yarn" => Ok(Self::Yarn {
                factor: required("factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?
                    .unwrap_or(max_pos) as usize,
                beta_fast: num("beta_fast")?.unwrap_or(32.0),
                beta_slow: num("beta_slow")?.unwrap_or(1.0),
                mscale: num("mscale")?.unwrap_or(1.0),
                mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
                attention_factor: num("attention_factor")?,
            }),
            "llama3" => Ok(Self::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?
                    as usize,
            }),
            other => Err(ModelError::UnsupportedConfig {
                field: "rope_scaling.type",
                value: other.to_owned(),
                reason: "supported RoPE scalings are default, linear, yarn and llama3",
            }),
        }
    }
}

fn rope_theta(config: &Value) -> f64 {
    config
        .get("rope_theta")
        .or_else(|| config.get("rope_parameters")?.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0)
}

/// Which DeepSeek generation a checkpoint is; it sets the defaults of unspecified routing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepSeekVersion {
    V2,
    V3,
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite).
    Greedy,
    /// Groups ranked by their best expert, top-k within the best `topk_group` groups (V2).
    GroupLimitedGreedy,
    /// Scores plus `e_score_correction_bias` for selection only; groups ranked by their two best (V3).
    NoauxTc,
}

/// The feed-forward part of a DeepSeek layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

/// DeepSeek-V2/V3 hyperparameters (`DeepseekV2Config` / `DeepseekV3Config`).
#[derive(Debug, Clone)]
pub struct DeepSeekConfig {
    pub version: DeepSeekVersion,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Width of each routed and shared expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Multi-token-prediction layers stored after the last layer.
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    /// Rank of the query compression; `None` projects queries directly (V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Rank of the compressed KV latent that the cache holds.
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub attention_bias: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// RoPE pairs adjacent elements, as DeepSeek's checkpoints do; transformers' `rope_interleave:
    /// false` switches to half-split pairs.
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// DeepSeek's FP8 release: e4m3 weights with one scale per block of this shape.
    pub fp8_block_size: Option<[usize; 2]>,
}

#[derive(Deserialize)]
struct RawDeepSeek {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: usize,
    #[serde(default)]
    num_nextn_predict_layers: usize,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f64>,
    #[serde(default)]
    first_k_dense_replace: usize,
    moe_layer_freq: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_interleave: Option<bool>,
    quantization_config: Option<Value>,
}

fn check_act(act: Option<&str>) -> Result<()> {
    match act {
        None | Some("silu") => Ok(()),
        Some(other) => Err(ModelError::UnsupportedConfig {
            field: "hidden_act",
            value: other.to_owned(),
            reason: "only silu (SwiGLU) feed-forward layers are implemented",
        }),
    }
}

fn fp8_block_size(quant: Option<&Value>) -> Result<Option<[usize; 2]>> {
    let Some(quant) = quant else { return Ok(None) };
    let method = quant.get("quant_method").and_then(Value::as_str);
    if method != Some("fp8") {
        return Err(ModelError::UnsupportedConfig {
            field: "quantization_config.quant_method",
            value: format!("{method:?}"),
            reason: "only DeepSeek's block-scaled fp8 release format is supported",
        });
    }
    let fmt = quant.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
    if fmt != "e4m3" {
        return Err(ModelError::UnsupportedConfig {
            field: "quantization_config.fmt",
            value: fmt.to_owned(),
            reason: "only e4m3 fp8 weights are supported",
        });
    }
    let block = quant
        .get("weight_block_size")
        .and_then(Value::as_array)
        .and_then(|b| Some([b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize]))
        .filter(|b| b[0] > 0 && b[1] > 0)
        .ok_or(ModelError::InvalidConfig {
            field: "quantization_config.weight_block_size",
            reason: "expected two positive integers, e.g. [128, 128]".into(),
        })?;
    Ok(Some(block))
}

impl DeepSeekConfig {
    fn new(
        raw: RawDeepSeek,
        version: DeepSeekVersion,
        (rope_scaling, rope_theta): (RopeScaling, f64),
    ) -> Result<Self> {
        check_act(raw.hidden_act.as_deref())?;
        let v3 = version == DeepSeekVersion::V3;
        let scoring_func = match raw.scoring_func.as_deref() {
            None if v3 => ScoringFunc::Sigmoid,
            None | Some("softmax") => ScoringFunc::Softmax,
            Some("sigmoid") => ScoringFunc::Sigmoid,
            Some(other) => {
                return Err(ModelError::UnsupportedConfig {
                    field: "scoring_func",
                    value: other.to_owned(),
                    reason: "expected softmax or sigmoid",
                });
            }
        };
        let topk_method = match raw.topk_method.as_deref() {
            None if v3 => TopkMethod::NoauxTc,
            None | Some("greedy") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
            Some("noaux_tc") => TopkMethod::NoauxTc,
            Some(other) => {
                return Err(ModelError::UnsupportedConfig {
                    field: "topk_method",
                    value: other.to_owned(),
                    reason: "expected greedy, group_limited_greedy or noaux_tc",
                });
            }
        };
        let n_routed_experts = raw.n_routed_experts.unwrap_or(0);
        let num_experts_per_tok = raw.num_experts_per_tok.unwrap_or(0);
        let n_group = raw.n_group.unwrap_or(1).max(1);
        let topk_group = raw.topk_group.unwrap_or(n_group);
        let moe_layer_freq = raw.moe_layer_freq.unwrap_or(1);
        if n_routed_experts > 0 {
            let invalid = |field, reason: String| Err(ModelError::InvalidConfig { field, reason });
            if num_experts_per_tok == 0 || num_experts_per_tok > n_routed_experts {
                return invalid(
                    "num_experts_per_tok",
                    format!("must be between 1 and n_routed_experts ({n_routed_experts})"),
                );
            }
            if !n_routed_experts.is_multiple_of(n_group) {
                return invalid(
                    "n_group",
                    format!("{n_group} groups do not divide {n_routed_experts} experts"),
                );
            }
            if topk_group == 0 || topk_group > n_group {
                return invalid(
                    "topk_group",
                    format!("must be between 1 and n_group ({n_group})"),
                );
            }
            if topk_group * (n_routed_experts / n_group) < num_experts_per_tok {
                return invalid(
                    "topk_group",
                    format!(
                        "{topk_group} of {n_group} groups hold fewer than num_experts_per_tok ({num_experts_per_tok}) experts"
                    ),
                );
            }
            if moe_layer_freq == 0 {
                return invalid("moe_layer_freq", "must be at least 1".into());
            }
            if raw.moe_intermediate_size.is_none() {
                return invalid("moe_intermediate_size", "needed with routed experts".into());
            }
        }
        Ok(Self {
            version,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(0),
            num_hidden_layers: raw.num_hidden_layers,
            num_nextn_predict_layers: raw.num_nextn_predict_layers,
            num_attention_heads: raw.num_attention_heads,
            q_lora_rank: raw.q_lora_rank,
            kv_lora_rank: raw.kv_lora_rank,
            qk_nope_head_dim: raw.qk_nope_head_dim,
            qk_rope_head_dim: raw.qk_rope_head_dim,
            v_head_dim: raw.v_head_dim,
            n_routed_experts,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok,
            n_group,
            topk_group,
            topk_method,
            scoring_func,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(v3),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            first_k_dense_replace: raw.first_k_dense_replace,
            moe_layer_freq,
            attention_bias: raw.attention_bias,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_interleave: raw.rope_interleave.unwrap_or(true),
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            fp8_block_size: fp8_block_size(raw.quantization_config.as_ref())?,
        })
    }

    /// Query/key width per head: the non-positional part plus the decoupled RoPE part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether decoder layer `layer` uses DeepSeekMoE (else a dense MLP).
    pub fn ffn_kind(&self, layer: usize) -> FfnKind {
        if self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
        {
            FfnKind::Moe
        } else {
            FfnKind::Dense
        }
    }

    /// Attention softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match self.rope_scaling {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim,
                ..
            } if mscale_all_dim != 0.0 => {
                let m = crate::rope::yarn_mscale(factor, mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}

/// Which member of the Llama family a dense checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    Llama,
    /// Qwen2: Llama with biases on the query, key and value projections.
    Qwen2,
}

/// Llama / Qwen2 hyperparameters (`LlamaConfig` / `Qwen2Config`).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub family: LlamaFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Biases on the q, k, v projections (always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

#[derive(Deserialize)]
struct RawLlama {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    use_sliding_window: bool,
}

impl LlamaConfig {
    fn new(
        raw: RawLlama,
        family: LlamaFamily,
        (rope_scaling, rope_theta): (RopeScaling, f64),
    ) -> Result<Self> {
        check_act(raw.hidden_act.as_deref())?;
        if raw.use_sliding_window {
            return Err(ModelError::UnsupportedConfig {
                field: "use_sliding_window",
                value: "true".into(),
                reason: "sliding-window attention is not implemented",
            });
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(ModelError::InvalidConfig {
                field: "num_key_value_heads",
                reason: format!(
                    "{num_key_value_heads} key/value heads do not divide {} attention heads",
                    raw.num_attention_heads
                ),
            });
        }
        let qwen2 = family == LlamaFamily::Qwen2;
        Ok(Self {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            qkv_bias: qwen2 || raw.attention_bias,
            o_bias: !qwen2 && raw.attention_bias,
            mlp_bias: !qwen2 && raw.mlp_bias,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
        })
    }
}
