//! Models stored as GGUF files, as llama.cpp's `convert_hf_to_gguf.py` writes them: architectures
//! `deepseek2` (both the MLA layout with `attn_k_b` / `attn_v_b` and the older one with `attn_kv_b`),
//! `qwen2` and `llama`.
//!
//! A GGUF file becomes the two things a Hugging Face folder gives: a [`ModelConfig`] (from the metadata,
//! [`config`]) and a [`Checkpoint`] whose tensors carry the Hugging Face names ([`tensors`]), so the
//! model code is the same for both formats. Weights are dequantized to f32 when fetched.
//!
//! The other way, [`export`] writes a checkpoint as such a file (`tiefsee quantize`), with the type
//! of each tensor chosen as llama.cpp does ([`mix`]).

pub mod config;
pub mod export;
pub mod mix;
pub mod tensors;

use std::path::Path;

use candle_core::Device;
use tiefsee_gguf::GgufFile;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::weights::Checkpoint;
use config::{GgufArch, TensorFacts};
use tensors::GgufTensors;

/// Whether `path` names a GGUF file rather than a checkpoint folder: any file (one that is not GGUF is
/// then reported as such), or a missing path ending in `.gguf` (reported as missing).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() || (!path.exists() && path.extension().is_some_and(|e| e == "gguf"))
}

/// Opens a GGUF model file: its configuration and its tensors under checkpoint names.
pub fn open(path: &Path, device: &Device) -> Result<(ModelConfig, Checkpoint)> {
    let file = GgufFile::open(path)?;
    let arch = GgufArch::from_file(&file)?;
    let embed = file.tensor("token_embd.weight")?;
    let names: Vec<&str> = file.tensor_infos().iter().map(|t| t.name()).collect();
    let facts = TensorFacts {
        vocab_size: embed.info.shape().first().copied().unwrap_or(0),
        tied_embeddings: !file.contains_tensor("output.weight"),
        attention_bias: file.contains_tensor("blk.0.attn_q.bias"),
        router_bias: names.iter().any(|n| n.ends_with(".exp_probs_b.bias")),
    };
    let json = config::config_json(&file, arch, &facts)?;
    let wrap = |source| ModelError::GgufConfig {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let mut config = ModelConfig::from_json_str(&json.to_string()).map_err(wrap)?;
    let (heads, kv_heads) = match &mut config {
        ModelConfig::Llama(c) => {
            if file.contains_tensor("rope_freqs.weight") {
                let freqs = file.tensor("rope_freqs.weight")?;
                let factors = freqs.dequantize()?;
                if factors.len() != c.head_dim / 2 {
                    return Err(ModelError::ShapeMismatch {
                        name: "rope_freqs.weight".into(),
                        file: path.to_path_buf(),
                        expected: vec![c.head_dim / 2],
                        found: freqs.info.shape(),
                    });
                }
                c.rope_scaling = RopeScaling::Factors(factors.iter().map(|&f| f as f64).collect());
            }
            (c.num_attention_heads, c.num_key_value_heads)
        }
        ModelConfig::DeepSeek(c) => (c.num_attention_heads, c.num_attention_heads),
    };
    let tensors = GgufTensors::new(file, arch, heads, kv_heads)?;
    Ok((config, Checkpoint::from_gguf(tensors, device)))
}
