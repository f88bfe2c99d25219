//! Which ggml type each tensor of a written GGUF file gets: the choices of llama.cpp's converter for the
//! float file types, and of `llama-quantize` for the quantized ones (`src/llama-quant.cpp`,
//! `llama_tensor_get_type_impl` and `tensor_type_fallback`, llama.cpp as vendored in llama-cpp-python
//! 0.3.36), for the tensors of the architectures tiefsee writes.
//!
//! - Tensors that are never quantized (`tensor_allows_quantization` / the converter's F32 list): 1-D
//!   tensors, norms, biases, the router `ffn_gate_inp`; they stay F32.
//! - `Q8_0`: every other weight.
//! - `Q4_K_M`: `Q4_K`, except `output` (and a tied `token_embd`) `Q6_K`; `attn_v` (and `attn_qkv`,
//!   `attn_kv_b`) and every `ffn_down*` `Q6_K` in the layers `use_more_bits` picks (the first and last
//!   eighth and every third in between, about half); with exactly 8 experts `attn_v` / `attn_k` are `Q8_0`
//!   and `attn_output` `Q5_K`; Llama-70B's `attn_v` at least `Q5_K`.
//! - Fallback when a row (`ne[0]`) is not whole blocks: `Q4_K` -> `Q5_0`, `Q5_K` -> `Q5_1`, `Q6_K` ->
//!   `Q8_0`, and F16 when even 32 does not divide it.
//!
//! The counters `i_attention_wv` / `i_ffn_down` of llama.cpp advance in its tensor order (sorted by block,
//! then name), so [`tensor_types`] must be given the tensors in that order.

use tiefsee_gguf::GgmlType;

use crate::gguf::config::GgufArch;

/// The file types `tiefsee quantize` writes (`enum llama_ftype`).
#[allow(non_camel_case_types)] // llama.cpp's names
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    Q8_0,
    Q4_K_M,
}

impl FileType {
    pub const ALL: [FileType; 4] = [Self::F32, Self::F16, Self::Q8_0, Self::Q4_K_M];

    /// The type named as on llama.cpp's command lines (`q4_k_m`, case-insensitive).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_K_M => "q4_k_m",
        }
    }

    /// The value of `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `_MOSTLY_F16`, `_MOSTLY_Q8_0`,
    /// `_MOSTLY_Q4_K_M`).
    pub fn llama_ftype(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4_K_M => 15,
        }
    }

    /// Whether llama.cpp makes this type with `llama-quantize` (after converting) rather than with the
    /// converter alone; it decides the tensor and metadata order of the file.
    pub fn is_quantized(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4_K_M)
    }
}

/// What the choice depends on besides the tensor itself.
#[derive(Debug, Clone, Copy)]
pub struct MixFacts {
    pub arch: GgufArch,
    /// `block_count`.
    pub n_layer: usize,
    /// Routed experts (0 for a dense model).
    pub n_expert: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
}

/// `tensor_allows_quantization`, and the converter's list of tensors kept F32.
fn keeps_f32(name: &str, n_dims: usize) -> bool {
    n_dims < 2
        || !name.ends_with(".weight")
        || name.ends_with("_norm.weight")
        || name.contains("ffn_gate_inp.weight")
}

/// The converter's type for a float file type (`--outtype f32|f16`).
pub fn converter_type(name: &str, n_dims: usize, ftype: FileType) -> GgmlType {
    if keeps_f32(name, n_dims) || ftype == FileType::F32 {
        GgmlType::F32
    } else {
        GgmlType::F16
    }
}

/// llama-quantize's tensor categories (`tensor_get_category`): the first match wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    AttentionQ,
    AttentionV,
    AttentionK,
    AttentionQkv,
    AttentionKvB,
    AttentionOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Output,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    match name {
        "output.weight" => return Output,
        "token_embd.weight" => return TokenEmbd,
        _ => {}
    }
    let by_substring = [
        ("attn_qkv.weight", AttentionQkv),
        ("attn_kv_b.weight", AttentionKvB),
        ("attn_v.weight", AttentionV),
        ("attn_k.weight", AttentionK),
        ("attn_q.weight", AttentionQ),
        ("attn_output.weight", AttentionOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ];
    by_substring
        .into_iter()
        .find(|(s, _)| name.contains(s))
        .map_or(Other, |(_, c)| c)
}

/// llama.cpp's "about half the layers": the first and last eighth, and every third in between.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
}

/// The block number of a `blk.{i}.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// `tensor_type_fallback`: a type whose blocks fit rows of `ncols` values.
fn fallback(ty: GgmlType, ncols: usize) -> GgmlType {
    if ncols.is_multiple_of(ty.block_size()) {
        return ty;
    }
    let smaller = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(smaller.block_size()) {
        smaller
    } else {
        GgmlType::F16
    }
}

/// The type of each tensor, `(name, row-major shape)`: the converter's for a float `ftype`,
/// llama-quantize's for a quantized one (then in llama-quantize's order, see the module documentation).
pub fn tensor_types(
    tensors: &[(String, Vec<usize>)],
    ftype: FileType,
    facts: &MixFacts,
) -> Vec<GgmlType> {
    let default = match ftype {
        FileType::Q4_K_M => GgmlType::Q4_K,
        FileType::Q8_0 => GgmlType::Q8_0,
        FileType::F32 | FileType::F16 => {
            return tensors
                .iter()
                .map(|(name, shape)| converter_type(name, shape.len(), ftype))
                .collect();
        }
    };
    let categories: Vec<Category> = tensors.iter().map(|(n, _)| category(n)).collect();
    let attn_v_like = |c: Category| {
        matches!(
            c,
            Category::AttentionV | Category::AttentionQkv | Category::AttentionKvB
        )
    };
    let n_attention_wv = categories.iter().filter(|&&c| attn_v_like(c)).count();
    let tied = !categories.contains(&Category::Output);
    let is_70b =
        facts.arch == GgufArch::Llama && facts.n_layer == 80 && facts.n_head != facts.n_head_kv;
    let (mut i_attention_wv, mut i_ffn_down) = (0, 0);

    let mut types = Vec::with_capacity(tensors.len());
    for ((name, shape), &cat) in tensors.iter().zip(&categories) {
        if keeps_f32(name, shape.len()) {
            types.push(GgmlType::F32);
            continue;
        }
        let ncols = shape.last().copied().unwrap_or(1);
        let mut ty = default;
        let q4_k_m = ftype == FileType::Q4_K_M;
        if cat == Category::Output || (tied && cat == Category::TokenEmbd) {
            ty = if !ncols.is_multiple_of(ty.block_size()) || ty == GgmlType::Q8_0 {
                GgmlType::Q8_0
            } else {
                GgmlType::Q6_K
            };
        } else if cat == Category::TokenEmbd {
        } else if attn_v_like(cat) {
            if q4_k_m && use_more_bits(i_attention_wv, n_attention_wv) {
                ty = GgmlType::Q6_K;
            }
            if is_70b && matches!(ty, GgmlType::Q3_K | GgmlType::Q4_K) {
                ty = GgmlType::Q5_K;
            }
            if facts.n_expert == 8 {
                ty = GgmlType::Q8_0;
            }
            i_attention_wv += 1;
        } else if cat == Category::AttentionK {
            if facts.n_expert == 8 {
                ty = GgmlType::Q8_0;
            }
        } else if cat == Category::FfnDown {
            // With experts llama.cpp reads the layer from the name (expert tensors are not one per layer).
            let (i_layer, n_layer) = if facts.n_expert > 1 {
                (layer_of(name).unwrap_or(0), facts.n_layer)
            } else {
                (i_ffn_down, facts.n_layer)
            };
            if q4_k_m && use_more_bits(i_layer, n_layer) {
                ty = GgmlType::Q6_K;
            }
            i_ffn_down += 1;
        } else if cat == Category::AttentionOutput {
            if q4_k_m && facts.n_expert == 8 {
                ty = GgmlType::Q5_K;
            }
        } else if cat == Category::AttentionQkv && q4_k_m {
            ty = GgmlType::Q5_K;
        }
        types.push(fallback(ty, ncols));
    }
    types
}

/// llama-quantize's tensor order: tensors outside the blocks first, then block by block, each group
/// sorted by name (`llama_model_loader::weight_name_comparer`).
pub fn quantize_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |n: &str| layer_of(n).map_or(-1, |l| l as i64);
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(n_layer: usize, n_expert: usize) -> MixFacts {
        MixFacts {
            arch: GgufArch::Qwen2,
            n_layer,
            n_expert,
            n_head: 12,
            n_head_kv: 2,
        }
    }

    #[test]
    fn more_bits_picks_about_half_the_layers() {
        // llama.cpp on 28 layers (Qwen2-1.5B): 0..3, 5, 8, ..., 23, 24..27
        let picked: Vec<usize> = (0..28).filter(|&i| use_more_bits(i, 28)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
    }

    #[test]
    fn q4_k_m_of_a_dense_model() {
        let names = [
            ("output.weight", vec![1000, 1536]),
            ("token_embd.weight", vec![1000, 1536]),
            ("blk.0.attn_norm.weight", vec![1536]),
            ("blk.0.attn_q.bias", vec![1536]),
            ("blk.0.attn_v.weight", vec![256, 1536]),
            ("blk.0.ffn_down.weight", vec![1536, 8960]),
            ("blk.0.ffn_up.weight", vec![8960, 1536]),
            ("blk.3.attn_v.weight", vec![256, 1536]),
            ("blk.3.ffn_down.weight", vec![1536, 8960]),
            ("blk.3.attn_k.weight", vec![256, 96]),
        ];
        let tensors: Vec<(String, Vec<usize>)> = names
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect();
        let f = facts(28, 0);
        use GgmlType::*;
        // attn_v is counted over the attn_v tensors present (2 here: the second is "more bits"); a
        // dense model's ffn_down by its own counter (0 and 1 of 28: both); attn_k's 96 columns fall
        // back to Q5_0.
        assert_eq!(
            tensor_types(&tensors, FileType::Q4_K_M, &f),
            [Q6_K, Q4_K, F32, F32, Q4_K, Q6_K, Q4_K, Q6_K, Q6_K, Q5_0]
        );
        assert_eq!(
            tensor_types(&tensors, FileType::Q8_0, &f),
            [Q8_0, Q8_0, F32, F32, Q8_0, Q8_0, Q8_0, Q8_0, Q8_0, Q8_0]
        );
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        use GgmlType::*;
        assert_eq!(fallback(Q4_K, 1408), Q5_0);
        assert_eq!(fallback(Q6_K, 1408), Q8_0);
        assert_eq!(fallback(Q5_K, 96), Q5_1);
        assert_eq!(fallback(Q8_0, 144), F16);
        assert_eq!(fallback(Q4_K, 20), F16);
        assert_eq!(fallback(Q4_K, 2048), Q4_K);
    }

    #[test]
    fn eight_experts_and_tied_embeddings() {
        use GgmlType::*;
        let tensors: Vec<(String, Vec<usize>)> = [
            ("token_embd.weight", vec![700, 512]),
            ("blk.0.attn_output.weight", vec![512, 512]),
            ("blk.1.ffn_down_exps.weight", vec![8, 512, 256]),
            ("blk.1.ffn_gate_inp.weight", vec![8, 512]),
        ]
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
        // 4 layers: layer 1 is not in the first/last eighth (0 and 3..), (1 - 0) % 3 != 2.
        assert_eq!(
            tensor_types(&tensors, FileType::Q4_K_M, &facts(4, 8)),
            [Q6_K, Q5_K, Q4_K, F32]
        );
    }

    #[test]
    fn order_is_globals_then_blocks_by_number() {
        let mut names = vec![
            "blk.10.attn_q.weight",
            "token_embd.weight",
            "blk.2.ffn_up.weight",
            "blk.2.attn_norm.weight",
            "output.weight",
        ];
        names.sort_by(|a, b| quantize_order(a, b));
        assert_eq!(
            names,
            [
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_norm.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }
}
