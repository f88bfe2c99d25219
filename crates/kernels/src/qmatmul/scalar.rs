//! Scalar reference dot products: one weight row against one token's quantized activations.
//!
//! Written from the block layouts in `tiefsee_gguf`'s quants (llama.cpp's `ggml-common.h`) and
//! llama.cpp's generic `ggml_vec_dot_*` functions: integer dot products per block or sub-block, scaled
//! once per block. They are the oracle the SIMD kernels are tested against, so they favour the obvious.

use tiefsee_gguf::QK_K;

use super::activations::{QK8_0, Token};

/// The little-endian f16 at `at` as f32.
pub(crate) fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Integer dot product of two equally long slices.
fn idot(w: impl Iterator<Item = i32>, a: &[i8]) -> i32 {
    w.zip(a).map(|(w, &a)| w * i32::from(a)).sum()
}

/// Q4_0 (18 bytes: f16 d, 16 bytes of nibbles, low nibbles first) against Q8_0 activations.
pub(crate) fn dot_q4_0(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for ((block, a), &da) in row
        .chunks_exact(18)
        .zip(tok.qs.chunks_exact(QK8_0))
        .zip(tok.d)
    {
        let qs = &block[2..18];
        let low = qs.iter().map(|&q| i32::from(q & 0xF) - 8);
        let high = qs.iter().map(|&q| i32::from(q >> 4) - 8);
        let isum = idot(low, &a[..16]) + idot(high, &a[16..]);
        sum += isum as f32 * (f16_at(block, 0) * da);
    }
    sum
}

/// The 32 five-bit levels of a Q5_0/Q5_1 block: nibbles at `qs` (low ones first) plus bit `j` of the
/// little-endian u32 at `qh` as bit 4 of level `j`.
fn five_bit_levels(block: &[u8], qh: usize, qs: usize) -> impl Iterator<Item = i32> + '_ {
    let high = u32::from_le_bytes([block[qh], block[qh + 1], block[qh + 2], block[qh + 3]]);
    (0..32).map(move |j| {
        let nibble = if j < 16 {
            block[qs + j] & 0xF
        } else {
            block[qs + j - 16] >> 4
        };
        i32::from(nibble) | ((((high >> j) & 1) as i32) << 4)
    })
}

/// Q5_0 (22 bytes: f16 d, u32 fifth bits, 16 nibble bytes; value = d * (q - 16)) against Q8_0.
pub(crate) fn dot_q5_0(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for ((block, a), &da) in row
        .chunks_exact(22)
        .zip(tok.qs.chunks_exact(QK8_0))
        .zip(tok.d)
    {
        let isum = idot(five_bit_levels(block, 2, 6).map(|q| q - 16), a);
        sum += isum as f32 * (f16_at(block, 0) * da);
    }
    sum
}

/// Shared by Q4_1 and Q5_1 (f16 d, f16 m first; value = d * q + m): d * da * sum(q a) plus
/// m * da * sum(a) per block.
fn dot_with_min<'a, L: Iterator<Item = i32>>(
    row: &'a [u8],
    size: usize,
    tok: &Token,
    levels: impl Fn(&'a [u8]) -> L,
) -> f32 {
    let mut sum = 0f32;
    for ((block, a), &da) in row
        .chunks_exact(size)
        .zip(tok.qs.chunks_exact(QK8_0))
        .zip(tok.d)
    {
        let isum = idot(levels(block), a);
        let asum: i32 = a.iter().map(|&a| i32::from(a)).sum();
        sum += isum as f32 * (f16_at(block, 0) * da) + f16_at(block, 2) * (da * asum as f32);
    }
    sum
}

/// Q4_1 (20 bytes: f16 d, f16 m, 16 nibble bytes) against Q8_0 activations.
pub(crate) fn dot_q4_1(row: &[u8], tok: &Token) -> f32 {
    dot_with_min(row, 20, tok, |block| {
        let qs = &block[4..20];
        qs.iter()
            .map(|&q| i32::from(q & 0xF))
            .chain(qs.iter().map(|&q| i32::from(q >> 4)))
    })
}

/// Q5_1 (24 bytes: f16 d, f16 m, u32 fifth bits, 16 nibble bytes) against Q8_0 activations.
pub(crate) fn dot_q5_1(row: &[u8], tok: &Token) -> f32 {
    dot_with_min(row, 24, tok, |block| five_bit_levels(block, 4, 8))
}

/// Q8_0 (34 bytes: f16 d, 32 i8) against Q8_0 activations.
pub(crate) fn dot_q8_0(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for ((block, a), &da) in row
        .chunks_exact(34)
        .zip(tok.qs.chunks_exact(QK8_0))
        .zip(tok.d)
    {
        let isum = idot(block[2..34].iter().map(|&q| i32::from(q as i8)), a);
        sum += isum as f32 * (f16_at(block, 0) * da);
    }
    sum
}

/// Six-bit (scale, min) of sub-block `j` of Q4_K/Q5_K (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (i32, i32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (i32::from(sc), i32::from(m))
}

/// Shared by Q4_K and Q5_K: `level(e)` is the unsigned level of element `e` of a super-block whose
/// first 16 bytes are d, dmin and the packed scales; value = d * scale * level - dmin * min.
fn dot_k4_like(block: &[u8], a: &[i8], bsums: &[i16], level: impl Fn(usize) -> i32) -> (i32, i32) {
    let (mut sumi, mut summ) = (0i32, 0i32);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min_k4(j, &block[4..16]);
        sumi += sc * idot((32 * j..32 * j + 32).map(&level), &a[32 * j..32 * j + 32]);
        summ += m * (i32::from(bsums[2 * j]) + i32::from(bsums[2 * j + 1]));
    }
    (sumi, summ)
}

/// The low nibble (first 32 of each 64) or high nibble (last 32) of element `e` of a 128-byte `qs`.
fn nibble_k(qs: &[u8], e: usize) -> i32 {
    let byte = qs[32 * (e / 64) + e % 32];
    i32::from(if e % 64 < 32 { byte & 0xF } else { byte >> 4 })
}

/// Q4_K (144 bytes: f16 d, f16 dmin, 12 bytes of scales, 128 of nibbles) against Q8_K activations.
pub(crate) fn dot_q4_k(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for (i, block) in row.chunks_exact(144).enumerate() {
        let a = &tok.qs[QK_K * i..QK_K * (i + 1)];
        let bsums = &tok.bsums[16 * i..16 * (i + 1)];
        let qs = &block[16..144];
        let (sumi, summ) = dot_k4_like(block, a, bsums, |e| nibble_k(qs, e));
        let da = tok.d[i];
        sum += f16_at(block, 0) * da * sumi as f32 - f16_at(block, 2) * da * summ as f32;
    }
    sum
}

/// Q5_K (176 bytes: as Q4_K plus 32 bytes of fifth bits before the nibbles) against Q8_K activations.
pub(crate) fn dot_q5_k(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for (i, block) in row.chunks_exact(176).enumerate() {
        let a = &tok.qs[QK_K * i..QK_K * (i + 1)];
        let bsums = &tok.bsums[16 * i..16 * (i + 1)];
        let (qh, qs) = (&block[16..48], &block[48..176]);
        let level = |e: usize| nibble_k(qs, e) + 16 * i32::from((qh[e % 32] >> (e / 32)) & 1);
        let (sumi, summ) = dot_k4_like(block, a, bsums, level);
        let da = tok.d[i];
        sum += f16_at(block, 0) * da * sumi as f32 - f16_at(block, 2) * da * summ as f32;
    }
    sum
}

/// Q6_K (210 bytes: 128 of low nibbles, 64 of high 2-bit pairs, 16 i8 scales, f16 d) against Q8_K.
pub(crate) fn dot_q6_k(row: &[u8], tok: &Token) -> f32 {
    let mut sum = 0f32;
    for (i, block) in row.chunks_exact(210).enumerate() {
        let a = &tok.qs[QK_K * i..QK_K * (i + 1)];
        let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
        let level = |e: usize| {
            let (n, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let low_byte = ql[64 * n + 32 * (k % 2) + l];
            let low = if k < 2 { low_byte & 0xF } else { low_byte >> 4 };
            let high = (qh[32 * n + l] >> (2 * k)) & 3;
            i32::from(low | (high << 4)) - 32
        };
        let mut sumi = 0i32;
        for (j, &sc) in scales.iter().enumerate() {
            sumi += i32::from(sc as i8)
                * idot((16 * j..16 * j + 16).map(level), &a[16 * j..16 * j + 16]);
        }
        sum += f16_at(block, 208) * tok.d[i] * sumi as f32;
    }
    sum
}
