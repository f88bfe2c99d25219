//! AVX-512 (F, BW, VL) with VNNI dot products: one weight row against `T` tokens (1 to 8) at once.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes and sums each four products into an i32 lane in one
//! instruction, where AVX2 needs `maddubs` then `madd` (and saturates); a 512-bit register holds two
//! legacy blocks or two K-quant sub-blocks, so a token's work per 64 weights is a load, one `vpdpbusd`,
//! a conversion and an FMA against a vector of per-lane scales.
//!
//! - Q8_0, Q4_0, Q5_0 (signed levels): two blocks per register; the weights' signs move onto the
//!   activations with a masked negation (AVX-512 has no `vpsignb`), the scale vector holds each block's
//!   `d_w * d_a` in its eight lanes. An odd last block runs at 256 bits.
//! - Q6_K (levels stored + 32, a signed scale per 16 values): four scales per register, applied in
//!   f32; the +32 is taken off with `bsums` once per super-block.
//!
//! Q4_K and Q5_K have none: written the same way as Q6_K they were no faster than the AVX2 kernels in
//! a prefill and slower in decode (Sapphire Rapids, 2 threads), so those run the AVX2 ones. Nor does
//! decode (one token) use the legacy ones: memory-bound, it ran no faster.
//!
//! Every function checks its slice lengths up front (through the AVX2 module's helpers); the raw loads
//! inside rely on those checks. Callers must only call them where [`crate::cpu::detected`] found
//! [`crate::cpu::Isa::Avx512`].

use std::arch::x86_64::*;

use tiefsee_gguf::QK_K;

use super::activations::{QK8_0, Token};
use super::avx2::{
    self, check_tokens, f16_at, hsum, levels_q4_0, levels_q5_0, levels_q8_0, prefetch_ahead,
};

/// Lane `i` takes element `i / 8`: a scale per eight-lane half (one block each).
const HALVES: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];

/// Lane `i` takes element `base + i / 4`: Q6_K's four scales of 16 values over a register of 64.
const fn quarters(base: i32) -> [i32; 16] {
    let mut idx = [0; 16];
    let mut i = 0;
    while i < 16 {
        idx[i] = base + (i / 4) as i32;
        i += 1;
    }
    idx
}

/// Loads 64 bytes from `p`.
///
/// # Safety
/// `p..p + 64` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load512<T>(p: *const T) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// Sixteen i32 lanes indexing a permutation.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn lanes(idx: &[i32; 16]) -> __m512i {
    // SAFETY: the array is 64 bytes.
    unsafe { load512(idx.as_ptr()) }
}

/// `[x ×8 | y ×8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair(x: f32, y: f32, halves: __m512i) -> __m512 {
    _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_setr_ps(x, y, 0.0, 0.0)))
}

/// Rows of signed-level legacy blocks (`size` bytes, scale first): `levels(block)` gives a block's
/// 32 signed levels.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI (and AVX2, FMA, F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_signed<const T: usize>(
    row: &[u8],
    toks: &[Token; T],
    size: usize,
    levels: impl Fn(&[u8]) -> __m256i,
) -> [f32; T] {
    let nb = row.len() / size;
    check_tokens(toks, nb * QK8_0, QK8_0, false);
    let halves = lanes(&HALVES);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    let mut pairs = row.chunks_exact(2 * size);
    for (i, blocks) in pairs.by_ref().enumerate() {
        prefetch_ahead(blocks);
        let (b0, b1) = blocks.split_at(size);
        let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(levels(b0)), levels(b1));
        let dw = pair(f16_at(b0, 0), f16_at(b1, 0), halves);
        let abs_w = _mm512_abs_epi8(w);
        let negative = _mm512_movepi8_mask(w);
        for t in 0..T {
            // SAFETY: check_tokens: every token holds nb blocks, so blocks 2i and 2i + 1.
            let (a, da) = unsafe {
                let d = toks[t].d.as_ptr().add(2 * i);
                (
                    load512(toks[t].qs.as_ptr().add(2 * QK8_0 * i)),
                    pair(*d, *d.add(1), halves),
                )
            };
            let a = _mm512_mask_sub_epi8(a, negative, zero, a);
            let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, abs_w, a));
            acc[t] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dw, da), acc[t]);
        }
    }
    let mut last = [0f32; T];
    if let Some(block) = pairs.remainder().get(..size) {
        let b = nb - 1;
        let w = levels(block);
        let abs_w = _mm256_sign_epi8(w, w);
        let dw = f16_at(block, 0);
        for t in 0..T {
            // SAFETY: check_tokens: every token holds block b.
            let a = unsafe { avx2::load(toks[t].qs.as_ptr().add(QK8_0 * b)) };
            let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, _mm256_sign_epi8(a, w));
            last[t] = hsum(_mm256_cvtepi32_ps(dot)) * (dw * toks[t].d[b]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) + last[t])
}

/// Q8_0 weights against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_q8_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_signed(row, toks, 34, |b| levels_q8_0(b)) }
}

/// Q4_0 weights against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_q4_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_signed(row, toks, 18, |b| levels_q4_0(b)) }
}

/// Q5_0 weights against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_q5_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_signed(row, toks, 22, |b| levels_q5_0(b)) }
}

/// Q6_K weights (210 bytes: 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, f16 d) against `T`
/// tokens of Q8_K activations.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI (and AVX2, FMA, F16C).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_q6_k<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let nb = row.len() / 210;
    check_tokens(toks, nb * QK_K, QK_K, true);
    let zero = _mm512_setzero_si512();
    let low4 = _mm512_set1_epi8(0xF);
    let low2 = _mm512_set1_epi8(3);
    // Values 0..64 of a half take bits 0-1 (first 32) and 2-3 (next 32) of the high-bit bytes,
    // values 64..128 bits 4-5 and 6-7.
    let shifts = |a: i16, b: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    };
    let (shift_first, shift_second) = (shifts(0, 2), shifts(4, 6));
    let quarter_index: [__m512i; 4] = std::array::from_fn(|g| lanes(&quarters(4 * g as i32)));
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_offsets = [_mm256_setzero_ps(); T];
    for (i, block) in row.chunks_exact(210).enumerate() {
        prefetch_ahead(block);
        let d = f16_at(block, 208);
        // SAFETY: bytes 192..208 of the block are its 16 scales.
        let scales8 = unsafe { _mm_loadu_si128(block[192..208].as_ptr().cast()) };
        let scales = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(scales8));
        let scales16 = _mm256_cvtepi8_epi16(scales8);
        let mut sums = [_mm512_setzero_ps(); T];
        for n in 0..QK_K / 128 {
            // SAFETY: a 210-byte block has 128 low-nibble bytes at 0 and 64 high-bit bytes at 128; n < 2.
            let (ql, qh) = unsafe {
                (
                    load512(block[..128].as_ptr().add(64 * n)),
                    _mm512_broadcast_i64x4(avx2::load(block[128..192].as_ptr().add(32 * n))),
                )
            };
            let level = |nibbles: __m512i, shift: __m512i| {
                let high = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), low2);
                _mm512_or_si512(nibbles, _mm512_slli_epi16::<4>(high))
            };
            let first = level(_mm512_and_si512(ql, low4), shift_first);
            let second = level(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                shift_second,
            );
            let scale_first = _mm512_permutexvar_ps(quarter_index[2 * n], scales);
            let scale_second = _mm512_permutexvar_ps(quarter_index[2 * n + 1], scales);
            for t in 0..T {
                // SAFETY: check_tokens: every token holds nb * 256 quants.
                let (a_first, a_second) = unsafe {
                    let p = toks[t].qs.as_ptr().add(QK_K * i + 128 * n);
                    (load512(p), load512(p.add(64)))
                };
                let dot_first = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, first, a_first));
                let dot_second = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, second, a_second));
                sums[t] = _mm512_fmadd_ps(dot_first, scale_first, sums[t]);
                sums[t] = _mm512_fmadd_ps(dot_second, scale_second, sums[t]);
            }
        }
        for t in 0..T {
            // Levels are stored + 32: take 32 * scale * (sum of 16 quants) off per sub-block.
            // SAFETY: check_tokens: every token holds nb * 16 sums and nb scales.
            let (bsums, da) = unsafe {
                (
                    avx2::load(toks[t].bsums.as_ptr().add(16 * i)),
                    *toks[t].d.as_ptr().add(i),
                )
            };
            let offsets = _mm256_cvtepi32_ps(_mm256_madd_epi16(scales16, bsums));
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * da), sums[t], acc[t]);
            acc_offsets[t] =
                _mm256_fmadd_ps(_mm256_set1_ps(-32.0 * d * da), offsets, acc_offsets[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) + hsum(acc_offsets[t]))
}
