//! F32, F16 and BF16: "blocks" of one little-endian value.
//!
//! F16 rounds to nearest, ties to even (numpy's `astype(np.float16)`, ggml's `GGML_FP32_TO_FP16`).
//! BF16 follows ggml's `ggml_compute_fp32_to_bf16` (and `gguf.quants.BF16`): NaNs are kept quiet NaNs,
//! everything else rounds to nearest, ties to even. Widening to f32 is exact for both.

use super::{f16_at, put_f16};

pub(super) fn dequantize_f32(block: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
}

pub(super) fn quantize_f32(x: &[f32], block: &mut [u8]) {
    block.copy_from_slice(&x[0].to_le_bytes());
}

pub(super) fn dequantize_f16(block: &[u8], y: &mut [f32]) {
    y[0] = f16_at(block, 0);
}

pub(super) fn quantize_f16(x: &[f32], block: &mut [u8]) {
    put_f16(block, 0, x[0]);
}

pub(super) fn dequantize_bf16(block: &[u8], y: &mut [f32]) {
    // bf16 is the top half of an f32.
    y[0] = f32::from_bits(u32::from(u16::from_le_bytes([block[0], block[1]])) << 16);
}

pub(super) fn quantize_bf16(x: &[f32], block: &mut [u8]) {
    let bits = x[0].to_bits();
    let bf16 = if bits & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: keep sign and top payload bits, force the quiet bit.
        (bits >> 16) | 0x40
    } else {
        // Round to nearest, ties to even; cannot overflow because NaNs were handled above.
        (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    };
    block.copy_from_slice(&(bf16 as u16).to_le_bytes());
}
