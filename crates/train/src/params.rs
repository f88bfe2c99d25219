//! The trainable state of a DeepSeek model: its parameters as candle variables, named exactly as in
//! a Hugging Face checkpoint, plus the routing-bias buffers that balancing updates outside the
//! gradient. The inference [`Model`] is built from these very tensors, so the training forward pass
//! and `tiefsee run` are the same code.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tiefsee_model::config::{DeepSeekConfig, FfnKind};
use tiefsee_model::{Checkpoint, Model, ModelConfig};

use crate::error::{Result, TrainError};

/// Suffix of the selection-only routing bias of `noaux_tc` gates: a buffer, not a parameter.
pub const BIAS_SUFFIX: &str = "e_score_correction_bias";

/// A model's parameters and buffers, and the config they belong to.
#[derive(Debug, Clone)]
pub struct Params {
    /// The `config.json` as written beside checkpoints.
    pub config_json: serde_json::Value,
    pub config: DeepSeekConfig,
    /// Trainable tensors by checkpoint name.
    pub vars: BTreeMap<String, Var>,
    /// Routing-bias buffers by checkpoint name.
    pub buffers: BTreeMap<String, Tensor>,
}

impl Params {
    /// Freshly initialized parameters for `config_json`: weight matrices from N(0, std^2), norms at
    /// one, routing biases at zero. The same seed gives the same values.
    pub fn init(config_json: serde_json::Value, std: f64, seed: u64) -> Result<Self> {
        let config = deepseek_config(&config_json)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, std as f32).map_err(|e| TrainError::Config {
            field: "init_std".into(),
            reason: e.to_string(),
        })?;
        let mut vars = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let n: usize = shape.iter().product();
            if name.ends_with(BIAS_SUFFIX) {
                buffers.insert(name, Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
            } else if name.ends_with("norm.weight") {
                vars.insert(name, Var::ones(shape, DType::F32, &Device::Cpu)?);
            } else {
                let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                vars.insert(
                    name,
                    Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)?,
                );
            }
        }
        Ok(Self {
            config_json,
            config,
            vars,
            buffers,
        })
    }

    /// The parameters of a checkpoint folder (`config.json` + `model.safetensors`), in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| TrainError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config_json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TrainError::NotACheckpoint {
                path: config_path.clone(),
                reason: e.to_string(),
            })?;
        let config = deepseek_config(&config_json)?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(TrainError::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: "model.safetensors is missing".into(),
            });
        }
        let mut stored = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| {
            TrainError::NotACheckpoint {
                path: weights.clone(),
                reason: e.to_string(),
            }
        })?;
        let mut vars = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let t = stored
                .remove(&name)
                .ok_or_else(|| TrainError::NotACheckpoint {
                    path: weights.clone(),
                    reason: format!("tensor {name} is missing"),
                })?
                .to_dtype(DType::F32)?;
            if t.dims() != shape.as_slice() {
                return Err(TrainError::NotACheckpoint {
                    path: weights.clone(),
                    reason: format!("tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
                });
            }
            if name.ends_with(BIAS_SUFFIX) {
                buffers.insert(name, t);
            } else {
                vars.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(Self {
            config_json,
            config,
            vars,
            buffers,
        })
    }

    /// Every tensor by checkpoint name: parameters and buffers.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .chain(self.buffers.iter().map(|(n, t)| (n.clone(), t.clone())))
            .collect()
    }

    /// The inference model over the current values (rebuilt after every update, because the
    /// absorbed attention path precomputes products of weights at load).
    pub fn model(&self) -> Result<Model> {
        Ok(Model::from_checkpoint(
            ModelConfig::DeepSeek(self.config.clone()),
            &Checkpoint::from_tensors(self.tensors(), &Device::Cpu),
        )?)
    }

    /// Number of trainable values.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Writes `model.safetensors` (f32) and `config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&self.tensors(), &weights).map_err(|e| TrainError::Io {
            path: weights,
            source: std::io::Error::other(e.to_string()),
        })?;
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config_json).expect("JSON serializes") + "\n";
        std::fs::write(&config, text).map_err(|source| TrainError::Io {
            path: config,
            source,
        })
    }
}

/// The DeepSeek config inside a `config.json` value; other architectures cannot be trained here.
fn deepseek_config(json: &serde_json::Value) -> Result<DeepSeekConfig> {
    let text = serde_json::to_string(json).expect("JSON serializes");
    match ModelConfig::from_json_str(&text)? {
        ModelConfig::DeepSeek(c) if !c.attention_bias && c.fp8_block_size.is_none() => Ok(c),
        ModelConfig::DeepSeek(_) => Err(TrainError::Config {
            field: "model".into(),
            reason: "training needs attention_bias false and no quantization_config".into(),
        }),
        other => Err(TrainError::Config {
            field: "model.architectures".into(),
            reason: format!(
                "{} cannot be trained here; use DeepseekV3ForCausalLM or DeepseekV2ForCausalLM",
                other.architecture()
            ),
        }),
    }
}

/// Name and shape of every tensor the model loads, in the published layout (per-expert tensors,
/// MTP layers after the main ones sharing the main embedding and output head).
pub fn parameter_shapes(cfg: &DeepSeekConfig) -> Vec<(String, Vec<usize>)> {
    let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let heads = cfg.num_attention_heads;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    let block = |out: &mut Vec<(String, Vec<usize>)>, p: &str, layer: usize| {
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{p}{name}"), shape));
        add("input_layernorm.weight", vec![hidden]);
        add("post_attention_layernorm.weight", vec![hidden]);
        let qk = cfg.qk_head_dim();
        match cfg.q_lora_rank {
            None => add("self_attn.q_proj.weight", vec![heads * qk, hidden]),
            Some(rank) => {
                add("self_attn.q_a_proj.weight", vec![rank, hidden]);
                add("self_attn.q_a_layernorm.weight", vec![rank]);
                add("self_attn.q_b_proj.weight", vec![heads * qk, rank]);
            }
        }
        let rank = cfg.kv_lora_rank;
        add(
            "self_attn.kv_a_proj_with_mqa.weight",
            vec![rank + cfg.qk_rope_head_dim, hidden],
        );
        add("self_attn.kv_a_layernorm.weight", vec![rank]);
        add(
            "self_attn.kv_b_proj.weight",
            vec![heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), rank],
        );
        add(
            "self_attn.o_proj.weight",
            vec![hidden, heads * cfg.v_head_dim],
        );
        let mut mlp = |prefix: &str, inter: usize| {
            add(&format!("{prefix}.gate_proj.weight"), vec![inter, hidden]);
            add(&format!("{prefix}.up_proj.weight"), vec![inter, hidden]);
            add(&format!("{prefix}.down_proj.weight"), vec![hidden, inter]);
        };
        match cfg.ffn_kind(layer) {
            FfnKind::Dense => mlp("mlp", cfg.intermediate_size),
            FfnKind::Moe => {
                let inter = cfg.moe_intermediate_size;
                for e in 0..cfg.n_routed_experts {
                    mlp(&format!("mlp.experts.{e}"), inter);
                }
                if cfg.n_shared_experts > 0 {
                    mlp("mlp.shared_experts", inter * cfg.n_shared_experts);
                }
                add("mlp.gate.weight", vec![cfg.n_routed_experts, hidden]);
                if cfg.topk_method == tiefsee_model::config::TopkMethod::NoauxTc {
                    add(
                        &format!("mlp.gate.{BIAS_SUFFIX}"),
                        vec![cfg.n_routed_experts],
                    );
                }
            }
        }
    };
    for layer in 0..cfg.num_hidden_layers {
        block(&mut out, &format!("model.layers.{layer}."), layer);
    }
    out.push(("model.norm.weight".into(), vec![hidden]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    for k in 0..cfg.num_nextn_predict_layers {
        let layer = cfg.num_hidden_layers + k;
        let p = format!("model.layers.{layer}.");
        block(&mut out, &p, layer);
        out.push((format!("{p}enorm.weight"), vec![hidden]));
        out.push((format!("{p}hnorm.weight"), vec![hidden]));
        out.push((format!("{p}eh_proj.weight"), vec![hidden, 2 * hidden]));
        out.push((format!("{p}shared_head.norm.weight"), vec![hidden]));
    }
    out
}
