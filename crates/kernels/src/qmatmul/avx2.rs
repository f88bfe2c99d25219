//! AVX2 + FMA + F16C dot products: one weight row against `T` tokens (1 to 4) at once.
//!
//! The approaches are llama.cpp's (`ggml-cpu/arch/x86/quants.c`, `ggml_vec_dot_*_q8_*`): bytes times
//! bytes with `_mm256_maddubs_epi16` (unsigned x signed, so signed weights go through the
//! `_mm256_sign_epi8` trick), pairs of i16 summed or scaled to i32 with `_mm256_madd_epi16`, and one
//! float FMA per block. The K-quants accumulate whole super-blocks in i32 (their sub-block scales are
//! small integers) and subtract their minimums with the activations' 16-value sums (`bsums`).
//!
//! Where it departs: each weight block is unpacked once and dotted with up to four tokens, so in a
//! prefill the unpacking (the dominant cost of the K-quants) is shared; and Q6_K's -32 offset is taken
//! off with `bsums` once per super-block instead of with an extra multiply per 32 values.
//!
//! Every function checks its slice lengths up front; the raw loads inside rely on those checks.
//! Callers must only call them on a CPU with AVX2, FMA and F16C (see `crate::cpu`).

use std::arch::x86_64::*;

use tiefsee_gguf::QK_K;

use super::activations::{QK8_0, Token};

/// f16 bits to f32 with F16C.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The little-endian f16 at `at` of `block`, as f32.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(block: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]))
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Loads 32 bytes from `p`.
///
/// # Safety
/// `p..p + 32` must be readable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load<T>(p: *const T) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Panics unless every token has `n` quants (and `n / block` scales): the bounds every raw load relies on.
fn check_tokens<const T: usize>(toks: &[Token; T], n: usize, block: usize, with_bsums: bool) {
    for t in toks {
        assert!(t.qs.len() == n && t.d.len() == n / block);
        assert!(!with_bsums || t.bsums.len() == n / 16);
    }
}

/// Dot products of signed 32-byte weight vector `w` with `T` tokens' quants at block offset `at`,
/// FMA'd with `scale[t]` into `acc[t]` (the Q8_0 / Q4_0 inner step).
///
/// # Safety
/// Every token must hold 32 quants from `at`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_block<const T: usize>(
    w: __m256i,
    toks: &[Token; T],
    at: usize,
    scale: [f32; T],
    acc: &mut [__m256; T],
) {
    let ones = _mm256_set1_epi16(1);
    // maddubs multiplies unsigned by signed: move the weights' signs onto the activations.
    let abs_w = _mm256_sign_epi8(w, w);
    for t in 0..T {
        // SAFETY: token t holds 32 quants from `at` (caller).
        let a = unsafe { load(toks[t].qs.as_ptr().add(at)) };
        let p = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(a, w));
        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(scale[t]), p, acc[t]);
    }
}

/// Q8_0 weights against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let nb = row.len() / 34;
    check_tokens(toks, nb * QK8_0, QK8_0, false);
    let mut acc = [_mm256_setzero_ps(); T];
    for (b, block) in row.chunks_exact(34).enumerate() {
        let dw = f16_at(block, 0);
        // SAFETY: the block has 32 quant bytes after its scale.
        let w = unsafe { load(block.as_ptr().add(2)) };
        let scale = std::array::from_fn(|t| dw * toks[t].d[b]);
        // SAFETY: check_tokens: every token holds nb * 32 quants.
        unsafe { signed_block(w, toks, QK8_0 * b, scale, &mut acc) };
    }
    acc.map(|a| hsum(a))
}

/// Q4_0 weights against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let nb = row.len() / 18;
    check_tokens(toks, nb * QK8_0, QK8_0, false);
    let low4 = _mm256_set1_epi8(0xF);
    let eight = _mm256_set1_epi8(8);
    let mut acc = [_mm256_setzero_ps(); T];
    for (b, block) in row.chunks_exact(18).enumerate() {
        let dw = f16_at(block, 0);
        // SAFETY: the block has 16 nibble bytes after its scale.
        let q = unsafe { _mm_loadu_si128(block.as_ptr().add(2).cast()) };
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), low4);
        let w = _mm256_sub_epi8(w, eight);
        let scale = std::array::from_fn(|t| dw * toks[t].d[b]);
        // SAFETY: check_tokens: every token holds nb * 32 quants.
        unsafe { signed_block(w, toks, QK8_0 * b, scale, &mut acc) };
    }
    acc.map(|a| hsum(a))
}

/// The eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K's 12 packed bytes (ggml's `utmp` shuffle:
/// four sub-blocks in the low 6 bits of bytes 0..4 and 4..8, the other four split over nibbles of
/// bytes 8..12 and the top 2 bits of bytes 0..8).
fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let scales_hi = (u2 & low4) | (((u0 >> 6) & top2) << 4);
    let mins_hi = ((u2 >> 4) & low4) | (((u1 >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    (join(u0 & low6, scales_hi), join(u1 & low6, mins_hi))
}

/// Q4_K and Q5_K: `unpack(j)` gives the unsigned levels of sub-blocks 2j and 2j+1 (32 bytes each).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; blocks are `size` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k4_like<const T: usize>(
    row: &[u8],
    toks: &[Token; T],
    size: usize,
    unpack: impl Fn(&[u8], usize) -> (__m256i, __m256i),
) -> [f32; T] {
    let nb = row.len() / size;
    check_tokens(toks, nb * QK_K, QK_K, true);
    let mut acc = [_mm256_setzero_ps(); T];
    for (i, block) in row.chunks_exact(size).enumerate() {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, mins) = k4_scales_mins(&block[4..16]);
        // Each min twice, to meet the 16 sums of 16 quants: madd gives min_j * (sum of sub-block j).
        let mins = _mm_cvtsi64_si128(i64::from_le_bytes(mins));
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..QK_K / 64 {
            let (q_lo, q_hi) = unpack(block, j);
            let s_lo = _mm256_set1_epi16(i16::from(scales[2 * j]));
            let s_hi = _mm256_set1_epi16(i16::from(scales[2 * j + 1]));
            for t in 0..T {
                let at = QK_K * i + 64 * j;
                // SAFETY: check_tokens: every token holds nb * 256 quants.
                let (a_lo, a_hi) = unsafe {
                    let p = toks[t].qs.as_ptr().add(at);
                    (load(p), load(p.add(32)))
                };
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(q_lo, a_lo), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(q_hi, a_hi), s_hi);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p_lo, p_hi));
            }
        }
        for t in 0..T {
            let da = toks[t].d[i];
            // SAFETY: check_tokens: every token holds nb * 16 sums.
            let bsums = unsafe { load(toks[t].bsums.as_ptr().add(16 * i)) };
            let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums));
            let sumi = _mm256_cvtepi32_ps(sumi[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * da), sumi, acc[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * da), summ, acc[t]);
        }
    }
    acc.map(|a| hsum(a))
}

/// Q4_K weights against `T` tokens of Q8_K activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let low4 = _mm256_set1_epi8(0xF);
    let unpack = |block: &[u8], j: usize| {
        // SAFETY: a 144-byte block has 128 nibble bytes from offset 16; j < 4.
        let bits = unsafe { load(block[16..144].as_ptr().add(32 * j)) };
        let lo = _mm256_and_si256(bits, low4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), low4);
        (lo, hi)
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_k4_like(row, toks, 144, unpack) }
}

/// Q5_K weights against `T` tokens of Q8_K activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_k<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let low4 = _mm256_set1_epi8(0xF);
    let sixteen = _mm256_set1_epi8(16);
    let unpack = |block: &[u8], j: usize| {
        // SAFETY: a 176-byte block has 32 high-bit bytes at 16 and 128 nibble bytes from 48; j < 4.
        let (hbits, bits) = unsafe {
            (
                load(block[16..48].as_ptr()),
                load(block[48..176].as_ptr().add(32 * j)),
            )
        };
        // The fifth bit of sub-block s is bit s of each high-bit byte.
        let fifth = |s: usize| {
            let m = _mm256_set1_epi8((1u8 << s) as i8);
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, m), m), sixteen)
        };
        let lo = _mm256_or_si256(_mm256_and_si256(bits, low4), fifth(2 * j));
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), low4);
        (lo, _mm256_or_si256(hi, fifth(2 * j + 1)))
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_k4_like(row, toks, 176, unpack) }
}

/// Q6_K weights against `T` tokens of Q8_K activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let nb = row.len() / 210;
    check_tokens(toks, nb * QK_K, QK_K, true);
    let low4 = _mm256_set1_epi8(0xF);
    let low2 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); T];
    for (i, block) in row.chunks_exact(210).enumerate() {
        let d = f16_at(block, 208);
        let scales: [i8; 16] = std::array::from_fn(|j| block[192 + j] as i8);
        // SAFETY: bytes 192..208 of the block are its 16 scales.
        let scales16 =
            _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(block[192..208].as_ptr().cast()) });
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..QK_K / 128 {
            // SAFETY: a 210-byte block has 128 low-nibble bytes at 0 and 64 high-bit bytes at 128; n < 2.
            let (b1, b2, h) = unsafe {
                (
                    load(block[..128].as_ptr().add(64 * n)),
                    load(block[..128].as_ptr().add(64 * n + 32)),
                    load(block[128..192].as_ptr().add(32 * n)),
                )
            };
            // Chunk k of 32 values: nibble k/2 of b1 (k even) or b2 (k odd), bits 2k..2k+2 of h.
            let high = |shifted: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(shifted, low2));
            let q = [
                _mm256_or_si256(_mm256_and_si256(b1, low4), high(h)),
                _mm256_or_si256(_mm256_and_si256(b2, low4), high(_mm256_srli_epi16::<2>(h))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(b1), low4),
                    high(_mm256_srli_epi16::<4>(h)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(b2), low4),
                    high(_mm256_srli_epi16::<6>(h)),
                ),
            ];
            for (k, &q) in q.iter().enumerate() {
                // The 16 i16 lanes of maddubs cover sub-blocks 8n + 2k (low half) and 8n + 2k + 1.
                let j = 8 * n + 2 * k;
                let s = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(scales[j + 1])),
                    _mm_set1_epi16(i16::from(scales[j])),
                );
                for t in 0..T {
                    // SAFETY: check_tokens: every token holds nb * 256 quants.
                    let a = unsafe { load(toks[t].qs.as_ptr().add(QK_K * i + 128 * n + 32 * k)) };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), s);
                    sumi[t] = _mm256_add_epi32(sumi[t], p);
                }
            }
        }
        for t in 0..T {
            // Levels are stored + 32: take 32 * scale * (sum of 16 quants) off per sub-block.
            // SAFETY: check_tokens: every token holds nb * 16 sums.
            let bsums = unsafe { load(toks[t].bsums.as_ptr().add(16 * i)) };
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales16, bsums));
            let sumi = _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[t], offset));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * toks[t].d[i]), sumi, acc[t]);
        }
    }
    acc.map(|a| hsum(a))
}
