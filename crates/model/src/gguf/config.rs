//! Hyperparameters of a GGUF model: llama.cpp's metadata keys (`{arch}.block_count`, ...) translated back
//! into the `config.json` fields they were converted from, so both formats share one set of config types
//! and one validation.
//!
//! The mapping reads llama.cpp's `convert_hf_to_gguf.py` (`conversion/deepseek.py`, `llama.py`, `qwen.py`)
//! in reverse and follows how `src/llama-model.cpp` interprets each key where the converter leaves a choice:
//! - deepseek2: MLA files (`key_length_mla`) store `key_length = kv_lora_rank + rope` for the latent
//!   "MQA" view; the per-head sizes are the `*_mla` keys. Older files store the per-head sizes in
//!   `key_length` / `value_length`.
//! - deepseek2 YaRN: only `yarn_log_multiplier = 0.1 * mscale_all_dim` is stored; llama.cpp scales
//!   attention by `mscale(factor, mscale_all_dim)^2` and leaves cos/sin unscaled, which is transformers'
//!   formula with `mscale == mscale_all_dim`. A checkpoint with other mscales is not representable.
//! - Routing: `expert_gating_func` 1 = softmax (the default of files older than the key), 2 = sigmoid;
//!   a router bias tensor (`exp_probs_b`) means V3's `noaux_tc`; groups without it mean V2's
//!   `group_limited_greedy`.
//! - Llama 3 RoPE scaling is stored as a `rope_freqs` tensor of per-frequency divisors, read by the caller.
//! - f32 values are widened through their shortest decimal form, so `1e-6` stays 1e-6 and not
//!   9.99999997e-7.

use std::path::PathBuf;

use serde_json::{Value, json};
use tiefsee_gguf::{GgufFile, Metadata, MetadataValue};

use crate::error::{ModelError, Result};

/// Which llama.cpp architecture a file holds, from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    DeepSeek2,
    Qwen2,
    Llama,
}

impl GgufArch {
    pub fn from_file(file: &GgufFile) -> Result<Self> {
        let arch = file.metadata().get_str("general.architecture")?;
        match arch {
            "deepseek2" => Ok(Self::DeepSeek2),
            "qwen2" => Ok(Self::Qwen2),
            "llama" => Ok(Self::Llama),
            other => Err(ModelError::UnsupportedGgufArchitecture {
                path: file.path().to_path_buf(),
                arch: other.to_owned(),
            }),
        }
    }

    /// The key prefix of the architecture's hyperparameters.
    pub fn name(self) -> &'static str {
        match self {
            Self::DeepSeek2 => "deepseek2",
            Self::Qwen2 => "qwen2",
            Self::Llama => "llama",
        }
    }
}

/// Typed, architecture-prefixed access to the metadata; every error names the file and the key.
struct Keys<'a> {
    md: &'a Metadata,
    path: PathBuf,
    arch: &'static str,
}

impl Keys<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    fn opt_uint(&self, name: &str) -> Result<Option<u64>> {
        let key = self.key(name);
        let value = match self.md.get(&key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match *value {
            MetadataValue::U8(v) => Some(v as u64),
            MetadataValue::U16(v) => Some(v as u64),
            MetadataValue::U32(v) => Some(v as u64),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => {
                return Err(tiefsee_gguf::GgufError::WrongType {
                    path: self.path.clone(),
                    key,
                    expected: "unsigned integer",
                    found: value.type_description(),
                }
                .into());
            }
        };
        n.map(Some).ok_or_else(|| ModelError::UnsupportedGgufValue {
            path: self.path.clone(),
            key,
            value: format!("{value:?}"),
            reason: "must not be negative",
        })
    }

    fn uint(&self, name: &str) -> Result<u64> {
        self.opt_uint(name)?.ok_or_else(|| {
            tiefsee_gguf::GgufError::MissingKey {
                path: self.path.clone(),
                key: self.key(name),
            }
            .into()
        })
    }

    fn opt_float(&self, name: &str) -> Result<Option<f64>> {
        let key = self.key(name);
        match self.md.get(&key) {
            None => Ok(None),
            // Rust prints an f32 as the shortest decimal that reads back to it.
            Some(MetadataValue::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(*v as f64))),
            Some(MetadataValue::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(tiefsee_gguf::GgufError::WrongType {
                path: self.path.clone(),
                key,
                expected: "float",
                found: other.type_description(),
            }
            .into()),
        }
    }

    fn float(&self, name: &str) -> Result<f64> {
        self.opt_float(name)?.ok_or_else(|| {
            tiefsee_gguf::GgufError::MissingKey {
                path: self.path.clone(),
                key: self.key(name),
            }
            .into()
        })
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        let key = self.key(name);
        match self.md.get(&key) {
            None => Ok(None),
            Some(_) => Ok(Some(self.md.get_bool(&key)?)),
        }
    }

    fn opt_str(&self, name: &str) -> Result<Option<&str>> {
        let key = self.key(name);
        match self.md.get(&key) {
            None => Ok(None),
            Some(_) => Ok(Some(self.md.get_str(&key)?)),
        }
    }

    fn unsupported(&self, name: &str, value: String, reason: &'static str) -> ModelError {
        ModelError::UnsupportedGgufValue {
            path: self.path.clone(),
            key: self.key(name),
            value,
            reason,
        }
    }
}

/// What the tensors tell about the configuration (the metadata does not say it).
pub struct TensorFacts {
    /// Rows of `token_embd.weight`.
    pub vocab_size: usize,
    /// `output.weight` is absent: the head is the embedding.
    pub tied_embeddings: bool,
    /// `blk.0.attn_q.bias` exists (Llama with `attention_bias`).
    pub attention_bias: bool,
    /// `blk.{i}.exp_probs_b.bias` exists in some layer (V3's router bias).
    pub router_bias: bool,
}

/// The `config.json` this file's metadata was converted from.
pub fn config_json(file: &GgufFile, arch: GgufArch, facts: &TensorFacts) -> Result<Value> {
    let keys = Keys {
        md: file.metadata(),
        path: file.path().to_path_buf(),
        arch: arch.name(),
    };
    let k = &keys;
    let usize_of = |name: &str| -> Result<usize> { Ok(k.uint(name)? as usize) };
    let heads = usize_of("attention.head_count")?;
    let hidden = usize_of("embedding_length")?;
    let mut config = json!({
        "vocab_size": facts.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": usize_of("feed_forward_length")?,
        "num_hidden_layers": usize_of("block_count")?,
        "num_attention_heads": heads,
        "rms_norm_eps": k.float("attention.layer_norm_rms_epsilon")?,
        "rope_theta": k.opt_float("rope.freq_base")?.unwrap_or(10000.0),
        "max_position_embeddings": usize_of("context_length")?,
        "tie_word_embeddings": facts.tied_embeddings,
        "hidden_act": "silu",
    });
    let rope_scaling = rope_scaling(k, arch)?;
    if !rope_scaling.is_null() {
        config["rope_scaling"] = rope_scaling;
    }
    let extra = match arch {
        GgufArch::DeepSeek2 => deepseek2(k, facts, heads)?,
        GgufArch::Qwen2 | GgufArch::Llama => {
            let kv_heads = k
                .opt_uint("attention.head_count_kv")?
                .unwrap_or(heads as u64);
            let head_dim = k
                .opt_uint("attention.key_length")?
                .unwrap_or((hidden / heads.max(1)) as u64);
            let value_dim = k.opt_uint("attention.value_length")?.unwrap_or(head_dim);
            if value_dim != head_dim {
                return Err(k.unsupported(
                    "attention.value_length",
                    value_dim.to_string(),
                    "value heads must be as wide as key heads (attention.key_length)",
                ));
            }
            json!({
                "architectures": [if arch == GgufArch::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
                "num_key_value_heads": kv_heads,
                "head_dim": head_dim,
                "attention_bias": facts.attention_bias,
            })
        }
    };
    for (key, value) in extra.as_object().into_iter().flatten() {
        config[key] = value.clone();
    }
    Ok(config)
}

fn deepseek2(k: &Keys, facts: &TensorFacts, heads: usize) -> Result<Value> {
    let rope_dim = k.uint("rope.dimension_count")?;
    // MLA files describe the latent as one "MQA" head; the per-head sizes are the *_mla keys.
    let key_dim = match k.opt_uint("attention.key_length_mla")? {
        Some(v) => v,
        None => k.uint("attention.key_length")?,
    };
    let value_dim = match k.opt_uint("attention.value_length_mla")? {
        Some(v) => v,
        None => k.uint("attention.value_length")?,
    };
    if key_dim <= rope_dim {
        return Err(k.unsupported(
            "attention.key_length_mla",
            key_dim.to_string(),
            "the key head must be wider than rope.dimension_count",
        ));
    }
    let scoring = match k.opt_uint("expert_gating_func")? {
        None | Some(1) => "softmax",
        Some(2) => "sigmoid",
        Some(other) => {
            return Err(k.unsupported(
                "expert_gating_func",
                other.to_string(),
                "expected 1 (softmax) or 2 (sigmoid)",
            ));
        }
    };
    let n_group = k.opt_uint("expert_group_count")?.unwrap_or(1).max(1);
    let topk_method = if facts.router_bias {
        "noaux_tc"
    } else if n_group > 1 {
        "group_limited_greedy"
    } else {
        "greedy"
    };
    let nextn = k.opt_uint("nextn_predict_layers")?.unwrap_or(0);
    let blocks = k.uint("block_count")?;
    let Some(main_layers) = blocks.checked_sub(nextn) else {
        return Err(k.unsupported(
            "nextn_predict_layers",
            nextn.to_string(),
            "more than block_count",
        ));
    };
    let architecture = if scoring == "sigmoid" {
        "DeepseekV3ForCausalLM"
    } else {
        "DeepseekV2ForCausalLM"
    };
    Ok(json!({
        "architectures": [architecture],
        // block_count counts the MTP layers stored after the main ones.
        "num_hidden_layers": main_layers,
        "num_nextn_predict_layers": nextn,
        "num_key_value_heads": heads,
        "q_lora_rank": k.opt_uint("attention.q_lora_rank")?,
        "kv_lora_rank": k.uint("attention.kv_lora_rank")?,
        "qk_nope_head_dim": key_dim - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": value_dim,
        "moe_intermediate_size": k.opt_uint("expert_feed_forward_length")?,
        "n_routed_experts": k.opt_uint("expert_count")?,
        "n_shared_experts": k.opt_uint("expert_shared_count")?.unwrap_or(0),
        "num_experts_per_tok": k.opt_uint("expert_used_count")?,
        "n_group": n_group,
        "topk_group": k.opt_uint("expert_group_used_count")?.unwrap_or(n_group),
        "topk_method": topk_method,
        "scoring_func": scoring,
        "norm_topk_prob": k.opt_bool("expert_weights_norm")?.unwrap_or(false),
        "routed_scaling_factor": k.opt_float("expert_weights_scale")?.unwrap_or(1.0),
        "first_k_dense_replace": k.opt_uint("leading_dense_block_count")?.unwrap_or(0),
        "moe_layer_freq": 1,
        "rope_interleave": true,
    }))
}

/// `rope_scaling` from `rope.scaling.*`; `Value::Null` for none.
fn rope_scaling(k: &Keys, arch: GgufArch) -> Result<Value> {
    let kind = k.opt_str("rope.scaling.type")?.unwrap_or("none");
    let factor = k.opt_float("rope.scaling.factor")?;
    match kind {
        "none" => Ok(Value::Null),
        "linear" => Ok(json!({"type": "linear", "factor": factor.unwrap_or(1.0)})),
        "yarn" => {
            let mut yarn = json!({
                "type": "yarn",
                "factor": k.float("rope.scaling.factor")?,
                "original_max_position_embeddings": k.uint("rope.scaling.original_context_length")?,
                "beta_fast": k.opt_float("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                "beta_slow": k.opt_float("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
            });
            if arch == GgufArch::DeepSeek2 {
                // llama.cpp: kq_scale = mscale(factor, 10 * log_mul)^2 / sqrt(d), cos/sin unscaled.
                let mscale_all_dim = k
                    .opt_float("rope.scaling.yarn_log_multiplier")?
                    .map_or(0.0, |m| m / 0.1);
                yarn["mscale"] = json!(mscale_all_dim);
                yarn["mscale_all_dim"] = json!(mscale_all_dim);
                yarn["attention_factor"] = json!(1.0);
            } else if let Some(attn) = k.opt_float("rope.scaling.attn_factor")? {
                yarn["attention_factor"] = json!(attn);
            }
            Ok(yarn)
        }
        other => Err(k.unsupported(
            "rope.scaling.type",
            other.to_owned(),
            "supported RoPE scalings are none, linear and yarn",
        )),
    }
}
