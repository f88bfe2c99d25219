//! llama.cpp's tensor encodings: scalar reference (de)quantization, one block at a time.
//!
//! These are the oracles the SIMD kernels are tested against, so they favour the obvious over the fast.
//! Every function reproduces the `gguf` Python package (`gguf.quants`, v0.19.0) bit for bit where that
//! package implements the operation (dequantization of all types but Q8_K; quantization of F16, BF16 and
//! Q4_0 ... Q8_0), and otherwise llama.cpp's reference C (`ggml-quants.c`, `quantize_row_*_ref`,
//! `dequantize_row_*`), operation for operation in f32 without fused multiply-adds. Blocks are
//! independent, so quantization runs on all cores without changing a bit of the output.
//!
//! Values follow ggml's flattening: element `i` of a tensor with dims `ne` is at
//! `i = i0 + ne[0] * (i1 + ne[1] * (i2 + ...))`, the same as a row-major array of `shape()`.

mod fit;
mod float;
mod k_quants;
mod legacy;

use rayon::prelude::*;

use crate::error::{GgufError, Result};
use crate::types::GgmlType;

/// Decodes one block of `type_size` bytes into `block_size` values.
type DequantizeBlock = fn(&[u8], &mut [f32]);
/// Encodes `block_size` values into one block of `type_size` bytes.
type QuantizeBlock = fn(&[f32], &mut [u8]);

/// The block codecs of a type.
fn codecs(ty: GgmlType) -> (DequantizeBlock, QuantizeBlock) {
    match ty {
        GgmlType::F32 => (float::dequantize_f32, float::quantize_f32),
        GgmlType::F16 => (float::dequantize_f16, float::quantize_f16),
        GgmlType::BF16 => (float::dequantize_bf16, float::quantize_bf16),
        GgmlType::Q4_0 => (legacy::dequantize_q4_0, legacy::quantize_q4_0),
        GgmlType::Q4_1 => (legacy::dequantize_q4_1, legacy::quantize_q4_1),
        GgmlType::Q5_0 => (legacy::dequantize_q5_0, legacy::quantize_q5_0),
        GgmlType::Q5_1 => (legacy::dequantize_q5_1, legacy::quantize_q5_1),
        GgmlType::Q8_0 => (legacy::dequantize_q8_0, legacy::quantize_q8_0),
        GgmlType::Q2_K => (k_quants::dequantize_q2_k, k_quants::quantize_q2_k),
        GgmlType::Q3_K => (k_quants::dequantize_q3_k, k_quants::quantize_q3_k),
        GgmlType::Q4_K => (k_quants::dequantize_q4_k, k_quants::quantize_q4_k),
        GgmlType::Q5_K => (k_quants::dequantize_q5_k, k_quants::quantize_q5_k),
        GgmlType::Q6_K => (k_quants::dequantize_q6_k, k_quants::quantize_q6_k),
        GgmlType::Q8_K => (k_quants::dequantize_q8_k, k_quants::quantize_q8_k),
    }
}

/// Decodes `n` values of type `ty` from `data`, which must hold exactly their blocks.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Decodes `out.len()` values of type `ty` from `data` into `out`.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    check_sizes(ty, out.len(), data.len())?;
    let (dequantize_block, _) = codecs(ty);
    for (block, values) in data
        .chunks_exact(ty.type_size())
        .zip(out.chunks_exact_mut(ty.block_size()))
    {
        dequantize_block(block, values);
    }
    Ok(())
}

/// Encodes `x` as type `ty`; `x.len()` must be a multiple of the block size.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let n_bytes = ty
        .bytes_for(x.len())
        .ok_or_else(|| not_whole_blocks(ty, x.len()))?;
    let mut out = vec![0u8; n_bytes];
    quantize_into(ty, x, &mut out)?;
    Ok(out)
}

/// Encodes `x` as type `ty` into `out`, which must have room for exactly its blocks.
pub fn quantize_into(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<()> {
    check_sizes(ty, x.len(), out.len())?;
    let (_, quantize_block) = codecs(ty);
    // Tasks of about 16k values: big enough to amortize scheduling, small enough to balance.
    let blocks_per_task = (16 * 1024 / ty.block_size()).max(1);
    x.par_chunks(blocks_per_task * ty.block_size())
        .zip(out.par_chunks_mut(blocks_per_task * ty.type_size()))
        .for_each(|(xs, bytes)| {
            for (values, block) in xs
                .chunks_exact(ty.block_size())
                .zip(bytes.chunks_exact_mut(ty.type_size()))
            {
                quantize_block(values, block);
            }
        });
    Ok(())
}

fn not_whole_blocks(ty: GgmlType, n: usize) -> GgufError {
    GgufError::QuantSize {
        ty,
        reason: format!(
            "{n} values are not a whole number of blocks of {}",
            ty.block_size()
        ),
    }
}

/// Checks that `n` values of `ty` take exactly `n_bytes` bytes.
fn check_sizes(ty: GgmlType, n: usize, n_bytes: usize) -> Result<()> {
    let expected = ty.bytes_for(n).ok_or_else(|| not_whole_blocks(ty, n))?;
    if expected != n_bytes {
        return Err(GgufError::QuantSize {
            ty,
            reason: format!("{n} values take {expected} bytes, got {n_bytes}"),
        });
    }
    Ok(())
}

/// Reads the little-endian f16 at `at` as f32 (exact).
fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Rounds `x` to f16 (to nearest, ties to even, as numpy and ggml do), stores it at `at`, and returns
/// the rounded value as f32, which is what a decoder will see.
fn put_f16(block: &mut [u8], at: usize, x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    block[at..at + 2].copy_from_slice(&h.to_le_bytes());
    h.to_f32()
}
