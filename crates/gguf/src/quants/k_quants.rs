//! The K-quants: super-blocks of 256 values (`QK_K`) split into sub-blocks of 16 or 32, each with its
//! own small integer scale (and minimum) relative to one f16 super-block scale.
//!
//! Block layouts (`ggml-common.h`), byte offsets; `e` is the element index within the super-block:
//!
//! ```text
//! Q2_K  (84 B): scales[16] @0 | qs[64] @16 | d f16 @80 | dmin f16 @82
//!               q = 2 bits ((e/32)%4) of qs[32*(e/128) + e%32]; scales[e/16] = scale | min << 4
//!               value = d*scale*q - dmin*min
//! Q3_K (110 B): hmask[32] @0 | qs[64] @32 | scales[12] @96 | d f16 @108
//!               q = 2 bits as Q2_K, minus 4 unless bit e/32 of hmask[e%32] is set;
//!               16 six-bit scales s (stored + 32) packed as in `unpack_q3_scale`; value = d*(s-32)*q
//! Q4_K (144 B): d f16 @0 | dmin f16 @2 | scales[12] @4 | qs[128] @16
//!               q = nibble (e%64)/32 of qs[32*(e/64) + e%32]; six-bit (scale, min) of sub-block e/32
//!               packed as in `scale_min_k4`; value = d*scale*q - dmin*min
//! Q5_K (176 B): d f16 @0 | dmin f16 @2 | scales[12] @4 | qh[32] @16 | qs[128] @48
//!               as Q4_K, plus 16 if bit e/32 of qh[e%32] is set
//! Q6_K (210 B): ql[128] @0 | qh[64] @128 | scales i8[16] @192 | d f16 @208
//!               n = e/128, k = (e%128)/32: low nibble (k/2) of ql[64n + 32*(k%2) + e%32],
//!               high 2 bits (2k) of qh[32n + e%32]; value = d*scales[e/16]*(q - 32)
//! Q8_K (292 B): d f32 @0 | qs i8[256] @4 | bsums i16[16] @260 (sums of 16 quants; dot-product helper)
//!               value = d*q
//! ```
//!
//! Dequantization is `dequantize_row_*` of `ggml-quants.c` (and `gguf.quants`, bit for bit).
//! Quantization is llama.cpp's `quantize_row_*_ref`: what `llama-quantize` does without an importance
//! matrix. The `gguf` package has no K-quant quantizer, so these are tested by round-trip error.

use super::fit::{
    GROUP_MAX_EPS, Search, make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int,
};
use super::{f16_at, put_f16};
use crate::types::QK_K;

/// The 2-bit field holding element `e` of Q2_K/Q3_K's 64-byte `qs`.
fn two_bits(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3
}

/// Packs 256 two-bit levels: byte `32*(e/128) + e%32` holds element `e` at bits `2*((e/32)%4)`.
fn pack_two_bits(levels: &[u8], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for l in 0..32 {
            qs[j / 4 + l] = levels[j + l]
                | (levels[j + l + 32] << 2)
                | (levels[j + l + 64] << 4)
                | (levels[j + l + 96] << 6);
        }
    }
}

/// Six-bit (scale, min) of sub-block `j` of Q4_K/Q5_K: sub-blocks 0..4 in the low 6 bits of bytes 0..4
/// (scales) and 4..8 (mins); sub-blocks 4..8 in the nibbles of bytes 8..12 plus the top 2 bits of
/// bytes 0..8 (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The inverse of `scale_min_k4` for eight six-bit scales and mins.
fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            s[j - 4] |= (ls >> 4) << 6;
            s[j] |= (lm >> 4) << 6;
        }
    }
    s
}

/// Six-bit scale `j` (0..16) of Q3_K, still offset by 32: low nibbles in bytes 0..8 (sub-blocks 0..8
/// low halves, 8..16 high halves), top 2 bits in bytes 8..12 at bits `2*(j/4)` of byte `8 + j%4`.
fn unpack_q3_scale(j: usize, s: &[u8]) -> u8 {
    let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    low | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)
}

pub(super) fn dequantize_q2_k(block: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&block[0..16], &block[16..80]);
    let d = f16_at(block, 80);
    let dmin = f16_at(block, 82);
    for (e, out) in y.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let dl = d * f32::from(sc & 0xF);
        let ml = dmin * f32::from(sc >> 4);
        *out = dl * f32::from(two_bits(qs, e)) - ml;
    }
}

pub(super) fn quantize_q2_k(x: &[f32], block: &mut [u8]) {
    const SEARCH: Search = Search {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut scales = [0f32; QK_K / 16];
    let mut mins = [0f32; QK_K / 16];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
        let (scale, min) = make_qkx2_quants(
            3,
            xs,
            &weights,
            &mut levels[16 * j..16 * j + 16],
            &mut aux,
            &SEARCH,
        );
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let mut packed = [0u8; QK_K / 16];
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (p, &s) in packed.iter_mut().zip(&scales) {
            *p = nearest_int(iscale * s) as u8;
        }
        put_f16(block, 80, max_scale / 15.0)
    } else {
        put_f16(block, 80, 0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (p, &m) in packed.iter_mut().zip(&mins) {
            *p |= (nearest_int(iscale * m) << 4) as u8;
        }
        put_f16(block, 82, max_min / 15.0)
    } else {
        put_f16(block, 82, 0.0)
    };
    // Requantize against the scales as a decoder will see them.
    for (j, &sc) in packed.iter().enumerate() {
        let dl = d * f32::from(sc & 0xF);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * f32::from(sc >> 4);
        for i in 16 * j..16 * j + 16 {
            levels[i] = nearest_int((x[i] + ml) / dl).clamp(0, 3) as u8;
        }
    }
    block[0..16].copy_from_slice(&packed);
    pack_two_bits(&levels, &mut block[16..80]);
}

pub(super) fn dequantize_q3_k(block: &[u8], y: &mut [f32]) {
    let (hmask, qs, scales) = (&block[0..32], &block[32..96], &block[96..108]);
    let d = f16_at(block, 108);
    for (e, out) in y.iter_mut().enumerate() {
        let dl = d * (i32::from(unpack_q3_scale(e / 16, scales)) - 32) as f32;
        let high = hmask[e % 32] & (1 << (e / 32)) != 0;
        let q = i32::from(two_bits(qs, e)) - if high { 0 } else { 4 };
        *out = dl * q as f32;
    }
}

pub(super) fn quantize_q3_k(x: &[f32], block: &mut [u8]) {
    block.fill(0);
    // Levels in 0..8, i.e. the signed level + 4.
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..QK_K / 16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut levels[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        let packed = &mut block[96..108];
        for (j, &s) in scales.iter().enumerate() {
            // C stores nearest_int's result in an int8_t before clamping: keep that wrap-around.
            let l = (i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = l & 0xF;
            } else {
                packed[j - 8] |= (l & 0xF) << 4;
            }
            packed[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
        }
        put_f16(block, 108, 1.0 / iscale)
    } else {
        put_f16(block, 108, 0.0)
    };
    for j in 0..QK_K / 16 {
        let dl = d * (i32::from(unpack_q3_scale(j, &block[96..108])) - 32) as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dl).clamp(-4, 3) + 4) as i8;
        }
    }
    // Levels 4..8 set their bit in hmask (bit e/32 of byte e%32) and keep the low 2 bits in qs.
    let mut low = [0u8; QK_K];
    for (e, &l) in levels.iter().enumerate() {
        let mut l = l as u8;
        if l > 3 {
            block[e % 32] |= 1 << (e / 32);
            l -= 4;
        }
        low[e] = l;
    }
    pack_two_bits(&low, &mut block[32..96]);
}

pub(super) fn dequantize_q4_k(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (scales, qs) = (&block[4..16], &block[16..144]);
    for (e, out) in y.iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(e / 32, scales);
        let byte = qs[32 * (e / 64) + e % 32];
        let q = if (e % 64) < 32 { byte & 0xF } else { byte >> 4 };
        *out = (d * f32::from(sc)) * f32::from(q) - dmin * f32::from(m);
    }
}

/// Shared by Q4_K and Q5_K (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`): fits each 32-value
/// sub-block with levels in `0..=nmax`, stores 6-bit scales and mins and the f16 super-scales in the
/// first 16 bytes, and returns the levels, requantized against the stored scales.
fn quantize_scale_min_k(x: &[f32], block: &mut [u8], nmax: i32, search: &Search) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 32];
    let mut scales = [0f32; QK_K / 32];
    let mut mins = [0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            &mut aux,
            search,
        );
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // C converts nearest_int's result to uint8_t before taking the minimum with 63: keep that.
    let ls: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_scale * scales[j]) as u8).min(63));
    let lm: [u8; 8] = std::array::from_fn(|j| (nearest_int(inv_min * mins[j]) as u8).min(63));
    let packed = pack_scale_min_k4(&ls, &lm);
    block[4..16].copy_from_slice(&packed);
    let d = put_f16(block, 0, max_scale / 63.0);
    let dmin = put_f16(block, 2, max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dl = d * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / dl).clamp(0, nmax) as u8;
        }
    }
    levels
}

pub(super) fn quantize_q4_k(x: &[f32], block: &mut [u8]) {
    const SEARCH: Search = Search {
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let levels = quantize_scale_min_k(x, block, 15, &SEARCH);
    let qs = &mut block[16..144];
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

pub(super) fn dequantize_q5_k(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (scales, qh, qs) = (&block[4..16], &block[16..48], &block[48..176]);
    for (e, out) in y.iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(e / 32, scales);
        let byte = qs[32 * (e / 64) + e % 32];
        let low = if (e % 64) < 32 { byte & 0xF } else { byte >> 4 };
        let high = if qh[e % 32] & (1 << (e / 32)) != 0 {
            16
        } else {
            0
        };
        *out = (d * f32::from(sc)) * f32::from(low + high) - dmin * f32::from(m);
    }
}

pub(super) fn quantize_q5_k(x: &[f32], block: &mut [u8]) {
    const SEARCH: Search = Search {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let levels = quantize_scale_min_k(x, block, 31, &SEARCH);
    let (qh, qs) = block[16..176].split_at_mut(32);
    qh.fill(0);
    for (e, &l) in levels.iter().enumerate() {
        if l > 15 {
            qh[e % 32] |= 1 << (e / 32);
        }
    }
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            qs[32 * c + l] = (levels[64 * c + l] & 0xF) | ((levels[64 * c + l + 32] & 0xF) << 4);
        }
    }
}

pub(super) fn dequantize_q6_k(block: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    for (e, out) in y.iter_mut().enumerate() {
        let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let low_byte = ql[64 * n + 32 * (k % 2) + l];
        let low = if k < 2 { low_byte & 0xF } else { low_byte >> 4 };
        let high = (qh[32 * n + l] >> (2 * k)) & 3;
        let q = i32::from(low | (high << 4)) - 32;
        *out = d * f32::from(scales[e / 16] as i8) * q as f32;
    }
}

pub(super) fn quantize_q6_k(x: &[f32], block: &mut [u8]) {
    // Levels in 0..64, i.e. the signed level + 32.
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants(
            32,
            &x[16 * ib..16 * ib + 16],
            &mut levels[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    block.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_f16(block, 208, 1.0 / iscale);
    for (ib, &s) in scales.iter().enumerate() {
        block[192 + ib] = nearest_int(iscale * s).min(127) as i8 as u8;
    }
    for j in 0..QK_K / 16 {
        let dl = d * f32::from(block[192 + j] as i8);
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, qh) = block[0..192].split_at_mut(128);
    for n in 0..QK_K / 128 {
        let at = |k: usize, l: usize| levels[128 * n + 32 * k + l] as u8;
        for l in 0..32 {
            ql[64 * n + l] = (at(0, l) & 0xF) | ((at(2, l) & 0xF) << 4);
            ql[64 * n + l + 32] = (at(1, l) & 0xF) | ((at(3, l) & 0xF) << 4);
            qh[32 * n + l] = (at(0, l) >> 4)
                | ((at(1, l) >> 4) << 2)
                | ((at(2, l) >> 4) << 4)
                | ((at(3, l) >> 4) << 6);
        }
    }
}

pub(super) fn dequantize_q8_k(block: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    for (out, &q) in y.iter_mut().zip(&block[4..260]) {
        *out = d * f32::from(q as i8);
    }
}

pub(super) fn quantize_q8_k(x: &[f32], block: &mut [u8]) {
    block.fill(0);
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return;
    }
    let iscale = -127.0 / max;
    for (b, &v) in block[4..260].iter_mut().zip(x) {
        *b = nearest_int(iscale * v).min(127) as i8 as u8;
    }
    for j in 0..QK_K / 16 {
        let sum: i16 = block[4 + 16 * j..4 + 16 * j + 16]
            .iter()
            .map(|&q| i16::from(q as i8))
            .sum();
        block[260 + 2 * j..262 + 2 * j].copy_from_slice(&sum.to_le_bytes());
    }
    block[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}
