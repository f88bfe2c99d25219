//! ggml tensor types: the id stored in a GGUF tensor info, and the block layout it implies.
//!
//! Ids, block sizes and bytes per block are ggml's (`ggml.h` `enum ggml_type`, `ggml-common.h` block
//! structs; the `gguf` Python package's `GGML_QUANT_SIZES` lists the same). A tensor of type `t` stores
//! `n / t.block_size()` blocks of `t.type_size()` bytes each, blocks running along `ne[0]`, so `ne[0]` (the
//! innermost dimension) must be a multiple of the block size. Only the types tiefsee computes with are
//! variants; every other ggml id is refused by name (`IQ2_XXS`, `I32`, ...) or as unknown.

use std::fmt;

/// Elements per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// The ggml tensor types tiefsee reads, writes, dequantizes and quantizes.
#[allow(non_camel_case_types)] // ggml's own names, so they can be searched for in llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
}

impl GgmlType {
    /// Every supported type, in ggml id order.
    pub const ALL: [GgmlType; 14] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::BF16,
    ];

    /// The type with this ggml id, if tiefsee supports it (see [`ggml_type_name`] for the others).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The id ggml and GGUF use for this type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// ggml's name for the type (`"Q4_K"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::BF16 => "BF16",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            // f16 d, 16 bytes of nibbles
            Self::Q4_0 => 2 + 16,
            // f16 d, f16 m, 16 bytes of nibbles
            Self::Q4_1 => 2 + 2 + 16,
            // f16 d, u32 of high bits, 16 bytes of nibbles
            Self::Q5_0 => 2 + 4 + 16,
            // f16 d, f16 m, u32 of high bits, 16 bytes of nibbles
            Self::Q5_1 => 2 + 2 + 4 + 16,
            // f16 d, 32 i8
            Self::Q8_0 => 2 + 32,
            // 16 scale/min bytes, 64 bytes of 2-bit quants, f16 d, f16 dmin
            Self::Q2_K => QK_K / 16 + QK_K / 4 + 2 + 2,
            // 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales, f16 d
            Self::Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            // f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
            Self::Q4_K => 2 + 2 + 12 + QK_K / 2,
            // as Q4_K plus 32 bytes of high bits
            Self::Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            // 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 i8 scales, f16 d
            Self::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            // f32 d, 256 i8, 16 i16 sums of 16 quants each
            Self::Q8_K => 4 + QK_K + 2 * QK_K / 16,
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number of blocks (or overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// ggml's name for any type id it defines or once defined, supported here or not.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    if let Some(t) = GgmlType::from_id(id) {
        return Some(t.name());
    }
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        31 => "Q4_0_4_4 (removed from ggml)",
        32 => "Q4_0_4_8 (removed from ggml)",
        33 => "Q4_0_8_8 (removed from ggml)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4 (removed from ggml)",
        37 => "IQ4_NL_4_8 (removed from ggml)",
        38 => "IQ4_NL_8_8 (removed from ggml)",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// "ggml type IQ2_XXS (id 16), which tiefsee does not support" or "unknown ggml type id 99".
pub(crate) fn describe_unsupported(id: u32) -> String {
    match ggml_type_name(id) {
        Some(name) => format!("ggml type {name} (id {id}), which tiefsee does not support"),
        None => format!("unknown ggml type id {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        // (block size, bytes per block) from ggml-common.h / GGML_QUANT_SIZES.
        let expected = [
            (1, 4),
            (1, 2),
            (32, 18),
            (32, 20),
            (32, 22),
            (32, 24),
            (32, 34),
            (256, 84),
            (256, 110),
            (256, 144),
            (256, 176),
            (256, 210),
            (256, 292),
            (1, 2),
        ];
        for (t, (bs, ts)) in GgmlType::ALL.into_iter().zip(expected) {
            assert_eq!((t.block_size(), t.type_size()), (bs, ts), "{t}");
        }
        assert_eq!(GgmlType::from_id(16), None);
        assert_eq!(ggml_type_name(16), Some("IQ2_XXS"));
        assert_eq!(ggml_type_name(1000), None);
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
    }
}
