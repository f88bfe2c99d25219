//! The original ggml block formats: 32 values per block, one f16 scale (and, for the `_1` types, an
//! f16 minimum).
//!
//! Block layouts (`ggml-common.h`), byte offsets:
//!
//! ```text
//! Q4_0 (18 B): d f16 @0 | qs[16] @2            value = d * (q - 8),   q in 0..16
//! Q4_1 (20 B): d f16 @0 | m f16 @2 | qs[16] @4 value = d * q + m,     q in 0..16
//! Q5_0 (22 B): d f16 @0 | qh u32 @2 | qs[16] @6            value = d * (q - 16), q in 0..32
//! Q5_1 (24 B): d f16 @0 | m f16 @2 | qh u32 @4 | qs[16] @8 value = d * q + m,    q in 0..32
//! Q8_0 (34 B): d f16 @0 | qs i8[32] @2          value = d * q
//! ```
//!
//! Nibble packing: byte `qs[j]` holds element `j` in its low nibble and element `j + 16` in its high
//! nibble. Q5's fifth bits: bit `j` of the little-endian `qh` is the high bit of element `j`.
//!
//! Quantization follows `gguf.quants` (which matches `quantize_row_*_ref` in `ggml-quants.c`): the
//! `_0` types scale by the value of largest magnitude (first one on ties, sign kept), the `_1` types
//! by the range; indices are truncated after adding 0.5 (plus the offset) and clamped. The one place
//! the two references differ, a block of zeros starting with -0.0 (Q4_0/Q5_0 store d = +0.0 in Python,
//! -0.0 in C), follows Python. Not covered: NaN inputs, and the sign of a zero minimum when a block
//! holds both +0.0 and -0.0 as its minimum (numpy's reduction order decides; here the first wins, as in C).

use super::{f16_at, put_f16};

/// The value of largest magnitude, sign kept; the first one if several tie (numpy's `argmax`).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut max = x[0];
    for &v in &x[1..] {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    max
}

/// `1 / d`, or 0 for a zero scale (an all-zero block).
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// (min, max) of a block; the first of equal values wins, as in the C reference.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (x[0], x[0]);
    for &v in &x[1..] {
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
    }
    (lo, hi)
}

/// Packs 32 small indices: low nibbles of elements 0..16, high nibbles of elements 16..32.
fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | (q[j + 16] << 4);
    }
}

/// The fifth bits of 32 five-bit indices, as the little-endian u32 `qh`.
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let qh = (0..32).fold(0u32, |acc, j| acc | (u32::from(q[j] >> 4) << j));
    qh.to_le_bytes()
}

/// Element `j` of a block's 16 nibble bytes (low nibbles first, then high).
fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }
}

pub(super) fn dequantize_q4_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    for (j, out) in y.iter_mut().enumerate() {
        *out = d * (i32::from(nibble(qs, j)) - 8) as f32;
    }
}

pub(super) fn quantize_q4_0(x: &[f32], block: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 8.5).trunc() as u8).min(15));
    pack_nibbles(&q, &mut block[2..18]);
}

pub(super) fn dequantize_q4_1(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..20];
    for (j, out) in y.iter_mut().enumerate() {
        *out = d * f32::from(nibble(qs, j)) + m;
    }
}

pub(super) fn quantize_q4_1(x: &[f32], block: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    put_f16(block, 2, min);
    let q: [u8; 32] = std::array::from_fn(|j| (((x[j] - min) * id + 0.5).trunc() as u8).min(15));
    pack_nibbles(&q, &mut block[4..20]);
}

pub(super) fn dequantize_q5_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..22];
    for (j, out) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4);
        *out = d * (i32::from(q) - 16) as f32;
    }
}

pub(super) fn quantize_q5_0(x: &[f32], block: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5).trunc() as u8).min(31));
    block[2..6].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut block[6..22]);
}

pub(super) fn dequantize_q5_1(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let qs = &block[8..24];
    for (j, out) in y.iter_mut().enumerate() {
        let q = nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4);
        *out = d * f32::from(q) + m;
    }
}

pub(super) fn quantize_q5_1(x: &[f32], block: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    put_f16(block, 2, min);
    let q: [u8; 32] = std::array::from_fn(|j| (((x[j] - min) * id + 0.5).trunc() as u8).min(31));
    block[4..8].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut block[8..24]);
}

pub(super) fn dequantize_q8_0(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    for (out, &q) in y.iter_mut().zip(&block[2..34]) {
        *out = f32::from(q as i8) * d;
    }
}

pub(super) fn quantize_q8_0(x: &[f32], block: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(block, 0, d);
    for (b, &v) in block[2..34].iter_mut().zip(x) {
        // f32::round rounds half away from zero, as C's roundf and the package's np_roundf.
        *b = ((v * id).round() as i8) as u8;
    }
}
