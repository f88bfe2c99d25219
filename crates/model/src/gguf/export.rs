//! Writing a Hugging Face checkpoint as a GGUF model file, laid out as llama.cpp makes it:
//! `convert_hf_to_gguf.py --outtype f32|f16` for the float types, that followed by `llama-quantize` for
//! `q8_0` / `q4_k_m` (llama.cpp as vendored in llama-cpp-python 0.3.36).
//!
//! - Tensors: llama.cpp's names (the table of [`super::tensors`]); routed experts stacked
//!   `ffn_{down,gate,up}_exps` (experts, rows, cols); deepseek2's `kv_b_proj` split per head into
//!   `attn_k_b` (heads, kv_lora_rank, nope), transposed, and `attn_v_b` (heads, v, kv_lora_rank); llama's
//!   q/k rows permuted within each head for ggml's RoPE; Llama 3 RoPE scaling as a `rope_freqs` tensor;
//!   MTP layers, tied `lm_head` and FP8 scale tensors left out, as the converter does.
//! - Order: the converter's (checkpoint names sorted, experts where the first of them sorts) for float
//!   types; llama-quantize's (outside the blocks, then block by block, names sorted) for quantized ones,
//!   whose metadata also ends with `general.quantization_version` and `general.file_type`.
//! - Metadata: the converter's keys in its order ([`hparams`]), then the tokenizer's, which the caller
//!   supplies (`tiefsee_tokenizer::gguf_vocab_metadata`).
//! - Types: [`super::mix`]. Quantized types are computed from the checkpoint's values in f32, which is
//!   what llama-quantize computes from a lossless (`--outtype f32`, or `bf16` for a bf16 checkpoint)
//!   conversion.
//!
//! Departures: `expert_gating_func` is written even when `config.json` does not name `scoring_func`
//! (transformers 5's V3 configs), where the converter leaves it out and llama.cpp assumes softmax;
//! `general.name` is the folder's name (the converter guesses name, base name and version
//! from it with heuristics not reproduced here); checkpoint shards are not kept apart in the float order
//! (the converter sorts within each shard); transformers 5's fused experts (`experts.gate_up_proj`) are
//! split into the stacked gate and up tensors.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::Value;
use tiefsee_gguf::{GgmlType, GgufWriter, MetadataValue};

use crate::config::{ModelConfig, ScoringFunc};
use crate::error::{ModelError, Result};
use crate::gguf::config::GgufArch;
use crate::gguf::mix::{self, FileType, MixFacts};
use crate::gguf::tensors::{expert_names, gguf_name};
use crate::weights::Checkpoint;

/// `GGML_QNT_VERSION`.
const QUANTIZATION_VERSION: u32 = 2;

/// How one GGUF tensor is made from checkpoint tensors.
#[derive(Debug, Clone)]
enum Source {
    Plain(String),
    /// A llama q/k projection (or bias) with rows permuted within each of `heads` heads, from half-split
    /// RoPE pairs `(i, i + d/2)` to adjacent ones `(2i, 2i + 1)` (`LlamaModel.permute`).
    Permuted {
        name: String,
        heads: usize,
    },
    /// Routed experts stacked (experts, rows, cols); each entry is one expert's tensor and a range of
    /// its rows (all of them, or one half of a fused `gate_up_proj` slab).
    Experts(Vec<ExpertSlab>),
    /// One side of `kv_b_proj` (heads * (nope + v), rank): `attn_k_b` (heads, rank, nope) or
    /// `attn_v_b` (heads, v, rank).
    KvB {
        name: String,
        heads: usize,
        nope: usize,
        v: usize,
        key: bool,
    },
    /// Values computed here (`rope_freqs`).
    Values(Vec<f32>),
}

#[derive(Debug, Clone)]
struct ExpertSlab {
    name: String,
    /// Slab of a fused (experts, rows, cols) tensor, or `None` for a per-expert 2-D tensor.
    index: Option<usize>,
    rows: std::ops::Range<usize>,
}

/// One tensor of the file: name, row-major shape, type and how to compute it.
#[derive(Debug, Clone)]
pub struct ExportTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    source: Source,
}

/// Everything to write, decided before any data is read.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub metadata: Vec<(String, MetadataValue)>,
    pub tensors: Vec<ExportTensor>,
    /// The checkpoint folder, for messages.
    dir: PathBuf,
}

/// Plans the GGUF file of the checkpoint in `dir` (opened as `checkpoint`) for `ftype`, with the
/// tokenizer metadata `vocab` appended to the model's.
pub fn plan(
    dir: &Path,
    checkpoint: &Checkpoint,
    ftype: FileType,
    vocab: Vec<(String, MetadataValue)>,
) -> Result<ExportPlan> {
    let config = ModelConfig::from_dir(dir)?;
    let path = dir.join("config.json");
    let raw: Value = std::fs::read_to_string(&path)
        .map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })
        .and_then(|t| {
            serde_json::from_str(&t).map_err(|source| ModelError::Json { path, source })
        })?;
    let (arch, facts) = match &config {
        ModelConfig::DeepSeek(c) => (
            GgufArch::DeepSeek2,
            MixFacts {
                arch: GgufArch::DeepSeek2,
                n_layer: c.num_hidden_layers,
                n_expert: c.n_routed_experts,
                n_head: c.num_attention_heads,
                n_head_kv: 1,
            },
        ),
        ModelConfig::Llama(c) => {
            let arch = match c.family {
                crate::config::LlamaFamily::Qwen2 => GgufArch::Qwen2,
                crate::config::LlamaFamily::Llama => GgufArch::Llama,
            };
            (
                arch,
                MixFacts {
                    arch,
                    n_layer: c.num_hidden_layers,
                    n_expert: 0,
                    n_head: c.num_attention_heads,
                    n_head_kv: c.num_key_value_heads,
                },
            )
        }
    };
    let mut tensors = tensor_list(dir, &config, &raw, arch, checkpoint)?;
    if ftype.is_quantized() {
        tensors.sort_by(|a, b| mix::quantize_order(&a.name, &b.name));
    }
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    for (t, ty) in tensors
        .iter_mut()
        .zip(mix::tensor_types(&shapes, ftype, &facts))
    {
        t.ggml_type = ty;
    }

    let mut md = Kv::default();
    md.set(
        "general.architecture",
        MetadataValue::String(arch.name().into()),
    );
    md.set("general.type", MetadataValue::String("model".into()));
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    md.set("general.name", MetadataValue::String(name));
    md.set(
        "general.size_label",
        MetadataValue::String(size_label(&shapes)),
    );
    hparams(&mut md, &raw, arch, ftype, &config)?;
    md.set(
        "general.quantization_version",
        MetadataValue::U32(QUANTIZATION_VERSION),
    );
    for (k, v) in vocab {
        md.set(&k, v);
    }
    if ftype.is_quantized() {
        // llama-quantize sets these two again, which moves them to the end.
        for key in ["general.quantization_version", "general.file_type"] {
            if let Some(v) = md.remove(key) {
                md.set(key, v);
            }
        }
    }
    Ok(ExportPlan {
        metadata: md.0,
        tensors,
        dir: dir.to_path_buf(),
    })
}

/// Writes `plan` to `out`, reading tensors from `checkpoint`; `progress` is called before each tensor.
pub fn write(
    plan: &ExportPlan,
    checkpoint: &Checkpoint,
    out: &Path,
    mut progress: impl FnMut(usize, &ExportTensor),
) -> Result<()> {
    let mut writer = GgufWriter::new();
    for (k, v) in &plan.metadata {
        writer.set(k.clone(), v.clone())?;
    }
    for t in &plan.tensors {
        writer.add_tensor(t.name.clone(), &t.shape, t.ggml_type)?;
    }
    let mut data = writer.create(out)?;
    let get = |name: &str| -> Result<Tensor> {
        let shape = checkpoint
            .shape_of(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: plan.dir.clone(),
            })?
            .to_vec();
        checkpoint.get(name, &shape)
    };
    let encode = |t: &ExportTensor, values: Tensor| -> Result<Vec<u8>> {
        let values = values.flatten_all()?.to_vec1::<f32>()?;
        Ok(tiefsee_gguf::quantize(t.ggml_type, &values)?)
    };
    for (i, t) in plan.tensors.iter().enumerate() {
        progress(i, t);
        match &t.source {
            Source::Plain(name) => data.write_tensor(&t.name, &encode(t, get(name)?)?)?,
            Source::Permuted { name, heads } => {
                let w = get(name)?;
                let rows = w.dims()[0];
                let rest = w.elem_count() / rows;
                // (heads, 2, d/2, rest) -> (heads, d/2, 2, rest)
                let w = w
                    .reshape((*heads, 2, rows / heads / 2, rest))?
                    .transpose(1, 2)?
                    .contiguous()?;
                data.write_tensor(&t.name, &encode(t, w)?)?;
            }
            Source::Experts(slabs) => {
                for slab in slabs {
                    let mut w = get(&slab.name)?;
                    if let Some(index) = slab.index {
                        w = w.get(index)?;
                    }
                    let w = w.narrow(0, slab.rows.start, slab.rows.len())?;
                    data.write_tensor_part(&t.name, &encode(t, w)?)?;
                }
            }
            Source::KvB {
                name,
                heads,
                nope,
                v,
                key,
            } => {
                let kv = get(name)?;
                let rank = kv.dims()[1];
                let kv = kv.reshape((*heads, nope + v, rank))?;
                let side = if *key {
                    kv.narrow(1, 0, *nope)?.transpose(1, 2)?.contiguous()?
                } else {
                    kv.narrow(1, *nope, *v)?
                };
                data.write_tensor(&t.name, &encode(t, side)?)?;
            }
            Source::Values(values) => {
                data.write_tensor(&t.name, &tiefsee_gguf::quantize(t.ggml_type, values)?)?
            }
        }
    }
    data.finish()?;
    Ok(())
}

/// A Python dict of metadata: a key set again keeps its place (as `GGUFWriter.add_key_value` does).
#[derive(Default)]
struct Kv(Vec<(String, MetadataValue)>);

impl Kv {
    fn set(&mut self, key: &str, value: MetadataValue) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
    fn remove(&mut self, key: &str) -> Option<MetadataValue> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(at).1)
    }
}

/// `config.json` read as the converter reads it.
struct Raw<'a>(&'a Value);

impl Raw<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn uint(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(Value::as_u64).map(|v| v as u32)
    }
    fn float(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(Value::as_f64).map(|v| v as f32)
    }
    fn required(&self, key: &'static str) -> Result<u32> {
        self.uint(key).ok_or(ModelError::InvalidConfig {
            field: key,
            reason: "needed to write GGUF metadata".into(),
        })
    }
}

/// The converter's `set_gguf_parameters` for the three architectures (`TextModel`, `DeepseekV2Model`,
/// `LlamaModel`, `Qwen2Model`), keys in its order.
fn hparams(
    md: &mut Kv,
    raw: &Value,
    arch: GgufArch,
    ftype: FileType,
    config: &ModelConfig,
) -> Result<()> {
    let r = Raw(raw);
    let a = arch.name();
    let u32v = MetadataValue::U32;
    let f32v = MetadataValue::F32;
    let deepseek = arch == GgufArch::DeepSeek2;
    md.set(
        &format!("{a}.block_count"),
        u32v(r.required("num_hidden_layers")?),
    );
    md.set(
        &format!("{a}.context_length"),
        u32v(r.required("max_position_embeddings")?),
    );
    md.set(
        &format!("{a}.embedding_length"),
        u32v(r.required("hidden_size")?),
    );
    md.set(
        &format!("{a}.feed_forward_length"),
        u32v(r.required("intermediate_size")?),
    );
    let heads = r.required("num_attention_heads")?;
    md.set(&format!("{a}.attention.head_count"), u32v(heads));
    // MLA is written as MQA (one latent key/value head); transformers fills in the Llama default.
    let kv_heads = if deepseek {
        1
    } else {
        r.uint("num_key_value_heads").unwrap_or(heads)
    };
    md.set(&format!("{a}.attention.head_count_kv"), u32v(kv_heads));
    let rope = r
        .get("rope_parameters")
        .or_else(|| r.get("rope_scaling"))
        .cloned()
        .unwrap_or(Value::Null);
    let rope_r = Raw(&rope);
    let rope_type = rope_r
        .get("rope_type")
        .or_else(|| rope_r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(factor) = rope_r.float("factor") {
        match rope_type {
            "linear" => {
                md.set(
                    &format!("{a}.rope.scaling.type"),
                    MetadataValue::String("linear".into()),
                );
                md.set(&format!("{a}.rope.scaling.factor"), f32v(factor));
            }
            "yarn" => {
                md.set(
                    &format!("{a}.rope.scaling.type"),
                    MetadataValue::String("yarn".into()),
                );
                md.set(&format!("{a}.rope.scaling.factor"), f32v(factor));
                let orig = rope_r.uint("original_max_position_embeddings").ok_or(
                    ModelError::InvalidConfig {
                        field: "rope_scaling.original_max_position_embeddings",
                        reason: "YaRN needs it".into(),
                    },
                )?;
                md.set(
                    &format!("{a}.rope.scaling.original_context_length"),
                    u32v(orig),
                );
                let optional = [
                    ("extrapolation_factor", "yarn_ext_factor"),
                    ("attention_factor", "yarn_attn_factor"),
                    ("beta_fast", "yarn_beta_fast"),
                    ("beta_slow", "yarn_beta_slow"),
                ];
                for (key, gguf) in optional {
                    if let Some(v) = rope_r.float(key) {
                        md.set(&format!("{a}.rope.scaling.{gguf}"), f32v(v));
                    }
                }
            }
            _ => {}
        }
    }
    let theta = rope_r.float("rope_theta").or_else(|| r.float("rope_theta"));
    if let Some(theta) = theta {
        md.set(&format!("{a}.rope.freq_base"), f32v(theta));
    }
    let eps = r.float("rms_norm_eps").or(deepseek.then_some(1e-6));
    if let Some(eps) = eps {
        md.set(&format!("{a}.attention.layer_norm_rms_epsilon"), f32v(eps));
    }
    if deepseek {
        for (key, gguf) in [
            ("n_routed_experts", "expert_count"),
            ("num_experts_per_tok", "expert_used_count"),
            ("n_group", "expert_group_count"),
            ("topk_group", "expert_group_used_count"),
        ] {
            if let Some(v) = r.uint(key) {
                md.set(&format!("{a}.{gguf}"), u32v(v));
            }
        }
        // The converter writes this only when config.json names `scoring_func`; transformers 5 does not
        // save it for V3 (always sigmoid there), and llama.cpp then falls back to softmax, which is
        // wrong. tiefsee writes the function the model uses whenever there are experts.
        if let ModelConfig::DeepSeek(c) = config
            && (r.get("scoring_func").is_some() || c.n_routed_experts > 0)
        {
            let func = match c.scoring_func {
                ScoringFunc::Softmax => 1,
                ScoringFunc::Sigmoid => 2,
            };
            md.set(&format!("{a}.expert_gating_func"), u32v(func));
        }
    }
    // transformers' configs carry `head_dim` (DeepSeek's and Llama's always): its key/value lengths
    // go here, where deepseek2 later overwrites them with the latent "MQA" sizes.
    let kv_lora = r.uint("kv_lora_rank").unwrap_or(512);
    let head_dim = match (arch, config) {
        (GgufArch::DeepSeek2, ModelConfig::DeepSeek(c)) => {
            Some((kv_lora + c.qk_rope_head_dim as u32, kv_lora))
        }
        (_, ModelConfig::Llama(c)) if arch == GgufArch::Llama || r.get("head_dim").is_some() => {
            Some((c.head_dim as u32, c.head_dim as u32))
        }
        _ => None,
    };
    if let Some((k, v)) = head_dim {
        md.set(&format!("{a}.attention.key_length"), u32v(k));
        md.set(&format!("{a}.attention.value_length"), u32v(v));
    }
    md.set("general.file_type", u32v(ftype.llama_ftype()));
    match config {
        ModelConfig::DeepSeek(c) => {
            // Without routed experts every layer is dense.
            let all_dense = r.get("n_routed_experts").is_none();
            let first_dense = r.uint("first_k_dense_replace").unwrap_or(if all_dense {
                c.num_hidden_layers as u32
            } else {
                0
            });
            md.set(&format!("{a}.leading_dense_block_count"), u32v(first_dense));
            md.set(&format!("{a}.vocab_size"), u32v(c.vocab_size as u32));
            if let Some(q) = r.uint("q_lora_rank") {
                md.set(&format!("{a}.attention.q_lora_rank"), u32v(q));
            }
            md.set(&format!("{a}.attention.kv_lora_rank"), u32v(kv_lora));
            md.set(
                &format!("{a}.attention.key_length_mla"),
                u32v((c.qk_nope_head_dim + c.qk_rope_head_dim) as u32),
            );
            md.set(
                &format!("{a}.attention.value_length_mla"),
                u32v(c.v_head_dim as u32),
            );
            let moe_inter = r
                .uint("moe_intermediate_size")
                .or_else(|| r.uint("intermediate_size"))
                .unwrap_or(0);
            md.set(&format!("{a}.expert_feed_forward_length"), u32v(moe_inter));
            md.set(
                &format!("{a}.expert_shared_count"),
                u32v(r.uint("n_shared_experts").unwrap_or(0)),
            );
            if let Some(scale) = r.float("routed_scaling_factor") {
                md.set(&format!("{a}.expert_weights_scale"), f32v(scale));
            }
            if r.get("norm_topk_prob").and_then(Value::as_bool) == Some(true) {
                md.set(
                    &format!("{a}.expert_weights_norm"),
                    MetadataValue::Bool(true),
                );
            }
            md.set(
                &format!("{a}.rope.dimension_count"),
                u32v(c.qk_rope_head_dim as u32),
            );
            if let Some(m) = rope_r.get("mscale_all_dim").and_then(Value::as_f64) {
                md.set(
                    &format!("{a}.rope.scaling.yarn_log_multiplier"),
                    f32v((0.1 * m) as f32),
                );
            }
        }
        ModelConfig::Llama(c) if arch == GgufArch::Llama => {
            md.set(&format!("{a}.vocab_size"), u32v(c.vocab_size as u32));
            md.set(
                &format!("{a}.rope.dimension_count"),
                u32v(c.head_dim as u32),
            );
        }
        ModelConfig::Llama(_) => {}
    }
    Ok(())
}

/// `gguf.size_label`: "8x373K" for experts (shared + one expert's parameters), else "1.5B".
fn size_label(tensors: &[(String, Vec<usize>)]) -> String {
    let (mut total, mut shared, mut expert, mut expert_sum, mut n_expert_tensors) = (0, 0, 0, 0, 0);
    for (name, shape) in tensors {
        let size: usize = shape.iter().product();
        if name.contains("_exps.") && shape.len() >= 3 {
            let count = shape[shape.len() - if name.contains(".bias") { 2 } else { 3 }];
            expert += size / count;
            expert_sum += count;
            n_expert_tensors += 1;
        } else {
            shared += size;
        }
        total += size;
    }
    match expert_sum.checked_div(n_expert_tensors) {
        Some(experts) => format!("{experts}x{}", rounded_count(shared + expert)),
        None => rounded_count(total),
    }
}

/// `gguf.utility.model_weight_count_rounded_notation` with two significant digits at least.
fn rounded_count(n: usize) -> String {
    let n = n as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python's round() ties to even; the digits of the integer part, leading zeros stripped.
    let int_digits = format!("{}", scaled.round_ties_even() as u64)
        .trim_start_matches('0')
        .len();
    let fix = 2usize.saturating_sub(int_digits);
    format!("{scaled:.fix$}{suffix}")
}

/// The tensors of the file in the converter's order, types still unset.
fn tensor_list(
    dir: &Path,
    config: &ModelConfig,
    raw: &Value,
    arch: GgufArch,
    checkpoint: &Checkpoint,
) -> Result<Vec<ExportTensor>> {
    let mut names: Vec<&str> = checkpoint.names().collect();
    names.sort_unstable();
    let unknown = |name: &str| ModelError::NoGgufName {
        name: name.to_owned(),
        dir: dir.to_path_buf(),
    };
    let shape_of = |name: &str| checkpoint.shape_of(name).unwrap_or_default().to_vec();
    let plain = |gguf: String, name: &str| ExportTensor {
        name: gguf,
        shape: shape_of(name),
        ggml_type: GgmlType::F32,
        source: Source::Plain(name.to_owned()),
    };
    let mut out = Vec::new();
    if let Some(freqs) = llama3_rope_freqs(config, raw) {
        out.push(ExportTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![freqs.len()],
            ggml_type: GgmlType::F32,
            source: Source::Values(freqs),
        });
    }
    let (main_layers, tied) = match config {
        ModelConfig::DeepSeek(c) => (c.num_hidden_layers, c.tie_word_embeddings),
        ModelConfig::Llama(c) => (c.num_hidden_layers, c.tie_word_embeddings),
    };
    let mut experts_done = std::collections::HashSet::new();
    for &name in &names {
        if name.ends_with("_scale_inv") || name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if tied && name == "lm_head.weight" {
            continue;
        }
        let layer: Option<usize> = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok());
        if layer.is_some_and(|l| l >= main_layers) {
            continue; // MTP layers: the converter drops them
        }
        match config {
            ModelConfig::DeepSeek(c) if name.contains(".mlp.experts.") => {
                let layer = layer.ok_or_else(|| unknown(name))?;
                if experts_done.insert(layer) {
                    out.extend(stacked_experts(dir, checkpoint, layer, c.n_routed_experts)?);
                }
            }
            ModelConfig::DeepSeek(c) if name.ends_with("self_attn.kv_b_proj.weight") => {
                let layer = layer.ok_or_else(|| unknown(name))?;
                let (heads, nope, v) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim);
                let rank = c.kv_lora_rank;
                for (key, suffix, shape) in [
                    (true, "attn_k_b", vec![heads, rank, nope]),
                    (false, "attn_v_b", vec![heads, v, rank]),
                ] {
                    out.push(ExportTensor {
                        name: format!("blk.{layer}.{suffix}.weight"),
                        shape,
                        ggml_type: GgmlType::F32,
                        source: Source::KvB {
                            name: name.to_owned(),
                            heads,
                            nope,
                            v,
                            key,
                        },
                    });
                }
            }
            ModelConfig::Llama(c)
                if arch == GgufArch::Llama
                    && (name.contains("self_attn.q_proj.")
                        || name.contains("self_attn.k_proj.")) =>
            {
                let gguf = gguf_name(name).ok_or_else(|| unknown(name))?;
                let heads = if name.contains("q_proj") {
                    c.num_attention_heads
                } else {
                    c.num_key_value_heads
                };
                out.push(ExportTensor {
                    name: gguf,
                    shape: shape_of(name),
                    ggml_type: GgmlType::F32,
                    source: Source::Permuted {
                        name: name.to_owned(),
                        heads,
                    },
                });
            }
            _ => out.push(plain(gguf_name(name).ok_or_else(|| unknown(name))?, name)),
        }
    }
    Ok(out)
}

/// The three stacked expert tensors of `layer`, per-expert or fused (transformers 5) in the checkpoint.
fn stacked_experts(
    dir: &Path,
    checkpoint: &Checkpoint,
    layer: usize,
    n_experts: usize,
) -> Result<Vec<ExportTensor>> {
    let prefix = format!("model.layers.{layer}.mlp.experts");
    let missing = |name: String| ModelError::MissingTensor {
        name,
        dir: dir.to_path_buf(),
    };
    let fused = format!("{prefix}.gate_up_proj");
    let mut out = Vec::new();
    for (gguf, hf) in expert_names() {
        let name = format!("blk.{layer}.{gguf}");
        let (slabs, shape) = if let Some(&[e, two_inter, hidden]) = checkpoint.shape_of(&fused) {
            // transformers 5: gate_up_proj (experts, 2 * inter, hidden), down_proj (experts, hidden, inter)
            let inter = two_inter / 2;
            if hf.starts_with("down") {
                let down = format!("{prefix}.down_proj");
                let shape = checkpoint
                    .shape_of(&down)
                    .ok_or_else(|| missing(down.clone()))?
                    .to_vec();
                let slabs = (0..e)
                    .map(|i| ExpertSlab {
                        name: down.clone(),
                        index: Some(i),
                        rows: 0..shape[1],
                    })
                    .collect();
                (slabs, shape)
            } else {
                let rows = if hf.starts_with("gate") {
                    0..inter
                } else {
                    inter..2 * inter
                };
                let slabs = (0..e)
                    .map(|i| ExpertSlab {
                        name: fused.clone(),
                        index: Some(i),
                        rows: rows.clone(),
                    })
                    .collect();
                (slabs, vec![e, inter, hidden])
            }
        } else {
            let mut slabs = Vec::with_capacity(n_experts);
            let mut shape = Vec::new();
            for e in 0..n_experts {
                let expert = format!("{prefix}.{e}.{hf}");
                let s = checkpoint
                    .shape_of(&expert)
                    .ok_or_else(|| missing(expert.clone()))?;
                shape = s.to_vec();
                slabs.push(ExpertSlab {
                    name: expert,
                    index: None,
                    rows: 0..s[0],
                });
            }
            shape.insert(0, n_experts);
            (slabs, shape)
        };
        out.push(ExportTensor {
            name,
            shape,
            ggml_type: GgmlType::F32,
            source: Source::Experts(slabs),
        });
    }
    Ok(out)
}

/// Llama 3.1 RoPE scaling as llama.cpp's per-frequency divisors (`LlamaModel.generate_extra_tensors`),
/// in f32 as torch computes them.
fn llama3_rope_freqs(config: &ModelConfig, raw: &Value) -> Option<Vec<f32>> {
    let ModelConfig::Llama(c) = config else {
        return None;
    };
    if c.family != crate::config::LlamaFamily::Llama {
        return None;
    }
    let r = Raw(raw);
    let rope = r.get("rope_parameters").or_else(|| r.get("rope_scaling"))?;
    let rope = Raw(rope);
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))?
        .as_str()?;
    if !kind.eq_ignore_ascii_case("llama3") {
        return None;
    }
    let base = rope
        .float("rope_theta")
        .or_else(|| r.float("rope_theta"))
        .unwrap_or(10000.0);
    let factor = rope.float("factor").unwrap_or(8.0);
    let low = rope.float("low_freq_factor").unwrap_or(1.0);
    let high = rope.float("high_freq_factor").unwrap_or(4.0);
    let old_ctx = rope
        .float("original_max_position_embeddings")
        .unwrap_or(8192.0);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    let dim = c.head_dim;
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                // torch divides a scalar by a tensor as reciprocal(tensor) * scalar, in f32.
                let freq = 1.0 / base.powf(i as f32 / dim as f32);
                let wavelen = (1.0 / freq) * std::f32::consts::TAU;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = ((1.0 / wavelen) * old_ctx - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels_match_gguf_py() {
        assert_eq!(rounded_count(373_456), "373K");
        assert_eq!(rounded_count(1_777_088_000), "1.8B");
        assert_eq!(rounded_count(15_700_000_000), "16B");
        assert_eq!(rounded_count(250), "0.25K");
        let t = |n: &str, s: &[usize]| (n.to_string(), s.to_vec());
        assert_eq!(
            size_label(&[
                t("a", &[10, 100]),
                t("blk.1.ffn_up_exps.weight", &[8, 10, 10])
            ]),
            "8x1.1K"
        );
    }
}
