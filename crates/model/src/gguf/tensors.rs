//! The tensors of a GGUF file under the Hugging Face names the model loads, and how each is made.
//!
//! [`NAMES`] is the one table between llama.cpp's names (`gguf-py/gguf/tensor_mapping.py`) and the
//! checkpoint's. Three conversions of `convert_hf_to_gguf.py` are undone on the way:
//! - routed experts are stacked, `ffn_gate_exps` (experts, moe_inter, hidden): expert `e` is the `e`-th
//!   slab, and since every row is whole quantization blocks its bytes are a slice of the tensor's;
//! - deepseek2's MLA layout splits `kv_b_proj` (heads * (nope + v), kv_lora_rank) per head into
//!   `attn_k_b` (heads, kv_lora_rank, nope), transposed, and `attn_v_b` (heads, v, kv_lora_rank);
//! - llama permutes the rows of `q_proj` / `k_proj` (weights and biases) within each head from
//!   half-split RoPE pairs `(i, i + d/2)` to adjacent pairs `(2i, 2i + 1)`, for ggml's RoPE.
//!
//! A [`Source`] names GGUF tensors and what to do with them, not values: [`GgufTensors::get`]
//! dequantizes to f32, [`GgufTensors::get_quantized`] keeps the blocks in place in the memory map.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tiefsee_gguf::{GgmlType, GgufFile, TensorInfo};
use tiefsee_kernels::{QMatrix, WeightBytes};

use crate::error::{ModelError, Result};
use crate::gguf::config::GgufArch;
use crate::weights::release_pages;

/// llama.cpp's per-layer names (after `blk.{i}.`) and the checkpoint's (after `model.layers.{i}.`).
/// Experts (`*_exps`) and the MLA pair (`attn_k_b`, `attn_v_b`) are expanded in code.
const NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    // Llama / Qwen2 attention
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    // MLA
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    (
        "attn_kv_a_mqa.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
    ),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    // Dense MLP
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    // DeepSeekMoE
    ("ffn_gate_inp.weight", "mlp.gate.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    (
        "ffn_gate_shexp.weight",
        "mlp.shared_experts.gate_proj.weight",
    ),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    (
        "ffn_down_shexp.weight",
        "mlp.shared_experts.down_proj.weight",
    ),
    // Multi-token prediction (V3), stored as blocks after the main ones
    ("nextn.eh_proj.weight", "eh_proj.weight"),
    ("nextn.enorm.weight", "enorm.weight"),
    ("nextn.hnorm.weight", "hnorm.weight"),
    ("nextn.shared_head_norm.weight", "shared_head.norm.weight"),
    ("nextn.shared_head_head.weight", "shared_head.head.weight"),
    ("nextn.embed_tokens.weight", "embed_tokens.weight"),
];

/// Stacked routed experts: llama.cpp's name and the checkpoint's per-expert name.
const EXPERTS: &[(&str, &str)] = &[
    ("ffn_gate_exps.weight", "gate_proj.weight"),
    ("ffn_up_exps.weight", "up_proj.weight"),
    ("ffn_down_exps.weight", "down_proj.weight"),
];

/// Names outside the blocks.
const GLOBAL: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// GGUF tensors that configure rather than hold weights (read by the config, not by the layers).
const CONFIG_TENSORS: &[&str] = &["rope_freqs.weight"];

/// llama.cpp's name for a checkpoint tensor (`model.layers.3.mlp.gate_proj.weight` ->
/// `blk.3.ffn_gate.weight`), from the same tables the reader uses; `None` for routed experts, `kv_b_proj`
/// (both made of several checkpoint tensors) and names the tables lack.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = NAMES.iter().find(|(_, h)| *h == rest)?;
    Some(format!("blk.{layer}.{g}"))
}

/// llama.cpp's names of the stacked routed experts with the per-expert checkpoint suffix, in the
/// converter's order (down, gate, up).
pub(crate) fn expert_names() -> [(&'static str, &'static str); 3] {
    let find = |g: &str| *EXPERTS.iter().find(|(n, _)| *n == g).expect("listed");
    [
        find("ffn_down_exps.weight"),
        find("ffn_gate_exps.weight"),
        find("ffn_up_exps.weight"),
    ]
}

/// How one checkpoint tensor is made from GGUF tensors.
#[derive(Debug, Clone)]
pub enum Source {
    /// The GGUF tensor as stored (row-major shape = reversed `ne`).
    Plain { tensor: usize },
    /// Slab `index` of a stacked (experts, rows, cols) tensor.
    Expert { tensor: usize, index: usize },
    /// A llama q/k projection (or its bias) whose rows llama.cpp permuted within each of `heads` heads.
    Unpermute { tensor: usize, heads: usize },
    /// `kv_b_proj` (heads * (nope + v), rank) rebuilt from `attn_k_b` (heads, rank, nope) and
    /// `attn_v_b` (heads, v, rank).
    KvB { k_b: usize, v_b: usize },
}

/// One checkpoint tensor: where it comes from and its checkpoint (row-major) shape.
#[derive(Debug, Clone)]
struct Entry {
    source: Source,
    shape: Vec<usize>,
}

/// A GGUF file seen as a checkpoint: Hugging Face names over llama.cpp's tensors.
pub struct GgufTensors {
    file: GgufFile,
    entries: HashMap<String, Entry>,
}

impl GgufTensors {
    /// Indexes every tensor of `file`; a tensor this table does not know is an error naming it.
    /// `heads` / `kv_heads` undo llama's q/k permutation.
    pub fn new(file: GgufFile, arch: GgufArch, heads: usize, kv_heads: usize) -> Result<Self> {
        let infos = file.tensor_infos();
        let index: HashMap<&str, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name(), i))
            .collect();
        let mut entries = HashMap::new();
        let unknown = |name: &str| ModelError::UnknownGgufTensor {
            path: file.path().to_path_buf(),
            name: name.to_owned(),
            arch: arch.name().to_owned(),
        };
        for (i, info) in infos.iter().enumerate() {
            let name = info.name();
            if CONFIG_TENSORS.contains(&name) {
                continue;
            }
            if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == name) {
                entries.insert(hf.to_string(), plain(i, info));
                continue;
            }
            let Some((layer, rest)) = name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
            else {
                return Err(unknown(name));
            };
            let prefix = format!("model.layers.{layer}");
            if let Some((_, hf)) = NAMES.iter().find(|(g, _)| *g == rest) {
                let permuted = arch == GgufArch::Llama
                    && (rest.starts_with("attn_q.") || rest.starts_with("attn_k."));
                let entry = if permuted {
                    let heads = if rest.starts_with("attn_q.") {
                        heads
                    } else {
                        kv_heads
                    };
                    Entry {
                        source: Source::Unpermute { tensor: i, heads },
                        shape: info.shape(),
                    }
                } else {
                    plain(i, info)
                };
                entries.insert(format!("{prefix}.{hf}"), entry);
            } else if let Some((_, hf)) = EXPERTS.iter().find(|(g, _)| *g == rest) {
                let shape = info.shape();
                if shape.len() != 3 {
                    return Err(ModelError::ShapeMismatch {
                        name: name.to_owned(),
                        file: file.path().to_path_buf(),
                        expected: vec![0, 0, 0],
                        found: shape,
                    });
                }
                for e in 0..shape[0] {
                    entries.insert(
                        format!("{prefix}.mlp.experts.{e}.{hf}"),
                        Entry {
                            source: Source::Expert {
                                tensor: i,
                                index: e,
                            },
                            shape: shape[1..].to_vec(),
                        },
                    );
                }
            } else if rest == "attn_k_b.weight" || rest == "attn_v_b.weight" {
                // Handled as a pair below; a file that also has attn_kv_b uses that instead.
                let k_b = index.get(format!("blk.{layer}.attn_k_b.weight").as_str());
                let v_b = index.get(format!("blk.{layer}.attn_v_b.weight").as_str());
                let kv_b_name = format!("{prefix}.self_attn.kv_b_proj.weight");
                if index.contains_key(format!("blk.{layer}.attn_kv_b.weight").as_str()) {
                    continue;
                }
                let (Some(&k_b), Some(&v_b)) = (k_b, v_b) else {
                    return Err(ModelError::MissingTensor {
                        name: format!(
                            "blk.{layer}.attn_k_b.weight and blk.{layer}.attn_v_b.weight"
                        ),
                        dir: file.path().to_path_buf(),
                    });
                };
                let k_shape = infos[k_b].shape();
                let v_shape = infos[v_b].shape();
                let shape = match (k_shape.as_slice(), v_shape.as_slice()) {
                    (&[h, rank, nope], &[h2, v, rank2]) if h == h2 && rank == rank2 => {
                        vec![h * (nope + v), rank]
                    }
                    _ => {
                        return Err(ModelError::ShapeMismatch {
                            name: format!("blk.{layer}.attn_v_b.weight"),
                            file: file.path().to_path_buf(),
                            expected: vec![
                                k_shape.first().copied().unwrap_or(0),
                                0,
                                k_shape.get(1).copied().unwrap_or(0),
                            ],
                            found: v_shape,
                        });
                    }
                };
                entries.insert(
                    kv_b_name,
                    Entry {
                        source: Source::KvB { k_b, v_b },
                        shape,
                    },
                );
            } else {
                return Err(unknown(name));
            }
        }
        Ok(Self { file, entries })
    }

    /// The file the tensors come from.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Whether a checkpoint tensor of this name can be made.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Checkpoint names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Bytes the file stores for a checkpoint tensor (an expert's share of a stacked tensor).
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        let infos = self.file.tensor_infos();
        Some(match self.entries.get(name)?.source {
            Source::Plain { tensor } | Source::Unpermute { tensor, .. } => infos[tensor].n_bytes(),
            Source::Expert { tensor, .. } => {
                let experts = infos[tensor].shape().first().copied().unwrap_or(1).max(1);
                infos[tensor].n_bytes() / experts
            }
            Source::KvB { k_b, v_b } => infos[k_b].n_bytes() + infos[v_b].n_bytes(),
        })
    }

    /// Checkpoint shape of a tensor.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// How a checkpoint tensor is made, for loaders that keep quantized blocks.
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.entries.get(name).map(|e| &e.source)
    }

    /// ggml type names of the stored tensors ("F16", "Q8_0", ...).
    pub fn stored_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .file
            .tensor_infos()
            .iter()
            .map(|t| t.ggml_type().name().to_owned())
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// The tensor `name` as f32 with its checkpoint shape, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        let Some(entry) = self.checked_entry(name, shape)? else {
            return Ok(None);
        };
        let infos = self.file.tensor_infos();
        let gguf_name = |i: usize| infos[i].name().to_owned();
        let tensor = match entry.source {
            Source::Plain { tensor } => self.dequantize(tensor, None, device)?,
            Source::Expert { tensor, index } => self.dequantize(tensor, Some(index), device)?,
            Source::Unpermute { tensor, heads } => {
                // llama.cpp's rows per head are (d/2, 2) of the original (2, d/2): swap back.
                let w = self.dequantize(tensor, None, device)?;
                let rows = shape[0];
                let rest: usize = shape[1..].iter().product();
                if heads == 0 || !rows.is_multiple_of(2 * heads) {
                    return Err(ModelError::ShapeMismatch {
                        name: format!(
                            "{} (as {name}): rows not divisible into {heads} heads of pairs",
                            gguf_name(tensor)
                        ),
                        file: self.file.path().to_path_buf(),
                        expected: shape.to_vec(),
                        found: entry.shape.clone(),
                    });
                }
                w.reshape((heads, rows / heads / 2, 2, rest))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape(shape)?
            }
            Source::KvB { k_b, v_b } => {
                let k = self.dequantize(k_b, None, device)?; // (heads, rank, nope)
                let v = self.dequantize(v_b, None, device)?; // (heads, v, rank)
                // (heads, nope, rank) ++ (heads, v, rank) -> (heads * (nope + v), rank)
                Tensor::cat(&[&k.transpose(1, 2)?, &v], 1)?.reshape(shape)?
            }
        };
        Ok(Some(tensor))
    }

    /// The entry of `name`, checked against `shape`; `None` when the file lacks it.
    fn checked_entry(&self, name: &str, shape: &[usize]) -> Result<Option<&Entry>> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        if entry.shape != shape {
            let infos = self.file.tensor_infos();
            let gguf_name = |i: usize| infos[i].name().to_owned();
            let described = match &entry.source {
                Source::KvB { k_b, v_b } => format!("{} + {}", gguf_name(*k_b), gguf_name(*v_b)),
                Source::Plain { tensor }
                | Source::Expert { tensor, .. }
                | Source::Unpermute { tensor, .. } => gguf_name(*tensor),
            };
            return Err(ModelError::ShapeMismatch {
                name: format!("{described} (as {name})"),
                file: self.file.path().to_path_buf(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(Some(entry))
    }

    /// The 2-D tensor `name` as a quantized matrix over the file's own bytes, when it is stored in a
    /// block format the kernels multiply; `None` for other formats (load those with [`Self::get`]),
    /// for `kv_b_proj` rebuilt from the MLA pair (see [`Self::get_mla_pair`]) and absent names.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        let Some(entry) = self.checked_entry(name, shape)? else {
            return Ok(None);
        };
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        let infos = self.file.tensor_infos();
        let (tensor, slab) = match entry.source {
            Source::Plain { tensor } | Source::Unpermute { tensor, .. } => (tensor, None),
            Source::Expert { tensor, index } => (tensor, Some(index)),
            Source::KvB { .. } => return Ok(None),
        };
        let info = &infos[tensor];
        if !QMatrix::supports(info.ggml_type()) {
            return Ok(None);
        }
        // Rows are whole blocks (the reader checked the tensor), so a slab is a byte range.
        let Some(bytes) = info.ggml_type().bytes_for(rows * cols) else {
            return Ok(None);
        };
        let start = info.file_offset() + slab.unwrap_or(0) * bytes;
        let data = match entry.source {
            Source::Unpermute { heads, .. } => {
                // llama.cpp's rows per head are (d/2, 2) of the original (2, d/2): copy them back in
                // the original order, each row being whole blocks.
                if heads == 0 || !rows.is_multiple_of(2 * heads) {
                    return Err(ModelError::ShapeMismatch {
                        name: format!(
                            "{} (as {name}): rows not divisible into {heads} heads of pairs",
                            info.name()
                        ),
                        file: self.file.path().to_path_buf(),
                        expected: shape.to_vec(),
                        found: entry.shape.clone(),
                    });
                }
                let map = self.file.shared_map();
                let row_bytes = bytes / rows;
                let half = rows / heads / 2;
                let mut out = Vec::with_capacity(bytes);
                for head in 0..heads {
                    for pair in 0..2 {
                        for i in 0..half {
                            let stored = head * 2 * half + 2 * i + pair;
                            let at = start + stored * row_bytes;
                            out.extend_from_slice(&map[at..at + row_bytes]);
                        }
                    }
                }
                WeightBytes::from_vec(out)
            }
            _ => WeightBytes::new(self.file.shared_map(), start..start + bytes)?,
        };
        let matrix = QMatrix::new(info.ggml_type(), rows, cols, data)?;
        if info.ggml_type() == GgmlType::BF16 {
            release_pages(&self.file.shared_map(), start..start + bytes);
        }
        Ok(Some(matrix))
    }

    /// For a `kv_b_proj` stored as llama.cpp's MLA pair in a block format the kernels multiply: the
    /// key half `attn_k_b` as a (heads * kv_lora_rank, nope) matrix and the value half `attn_v_b` as a
    /// (heads * v, kv_lora_rank) matrix, each head's rows contiguous. `None` otherwise.
    pub fn get_mla_pair(&self, name: &str, shape: &[usize]) -> Result<Option<(QMatrix, QMatrix)>> {
        let Some(entry) = self.checked_entry(name, shape)? else {
            return Ok(None);
        };
        let Source::KvB { k_b, v_b } = entry.source else {
            return Ok(None);
        };
        let infos = self.file.tensor_infos();
        let matrix = |tensor: usize| -> Result<Option<QMatrix>> {
            let info = &infos[tensor];
            let dims = info.shape();
            if !QMatrix::supports(info.ggml_type()) || dims.len() != 3 {
                return Ok(None);
            }
            let start = info.file_offset();
            let data = WeightBytes::new(self.file.shared_map(), start..start + info.n_bytes())?;
            Ok(Some(QMatrix::new(
                info.ggml_type(),
                dims[0] * dims[1],
                dims[2],
                data,
            )?))
        };
        Ok(match (matrix(k_b)?, matrix(v_b)?) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => None,
        })
    }

    /// A stored tensor (or slab `index` of a stacked one) as f32, in its row-major shape.
    fn dequantize(&self, tensor: usize, slab: Option<usize>, device: &Device) -> Result<Tensor> {
        let info = &self.file.tensor_infos()[tensor];
        let view = self.file.tensor(info.name())?;
        let mut shape = info.shape();
        let data = match slab {
            None => view.data,
            Some(index) => {
                let per = info.n_bytes() / shape[0];
                shape.remove(0);
                &view.data[index * per..(index + 1) * per]
            }
        };
        let n = shape.iter().product();
        let values = tiefsee_gguf::dequantize(info.ggml_type(), data, n)?;
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

fn plain(i: usize, info: &TensorInfo) -> Entry {
    Entry {
        source: Source::Plain { tensor: i },
        shape: info.shape(),
    }
}
