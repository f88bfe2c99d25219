//! AVX2 + FMA + F16C dot products: one weight row against `T` tokens (1 to 8) at once.
//!
//! The approaches are llama.cpp's (`ggml-cpu/arch/x86/quants.c`, `ggml_vec_dot_*_q8_*`): bytes times
//! bytes with `_mm256_maddubs_epi16` (unsigned x signed, so signed weights go through the
//! `_mm256_sign_epi8` trick), pairs of i16 summed or scaled to i32 with `_mm256_madd_epi16`, and one
//! float FMA per block. The K-quants accumulate whole super-blocks in i32 (their sub-block scales are
//! small integers) and subtract their minimums with the activations' 16-value sums (`bsums`).
//!
//! Where it departs: each weight block is unpacked once and dotted with up to eight tokens, so in a
//! prefill the unpacking (the dominant cost of the K-quants) is shared; Q6_K's -32 offset is taken off
//! with `bsums` once per super-block instead of with an extra multiply per 32 values; and Q4_1/Q5_1
//! take their activation sums from the same `bsums` rather than from a separate Q8_1 format.
//!
//! Every function checks its slice lengths up front; the raw loads inside rely on those checks.
//! Callers must only call them on a CPU with AVX2, FMA and F16C (see `crate::cpu`).

use std::arch::x86_64::*;

use tiefsee_gguf::QK_K;

use super::activations::{QK8_0, Token};

/// f16 bits to f32 with F16C.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
}

/// The little-endian f16 at `at` of `block`, as f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_at(block: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([block[at], block[at + 1]]))
}

/// How far ahead of the bytes being dotted weights are prefetched.
pub(super) const PREFETCH_DISTANCE: usize = 1024;

/// Asks for the cache lines `PREFETCH_DISTANCE` bytes past those of `bytes`: decode streams each
/// weight once, and the hardware prefetcher alone keeps too few lines in flight to reach the
/// memory bandwidth.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_ahead(bytes: &[u8]) {
    prefetch_at(bytes, PREFETCH_DISTANCE);
}

/// Asks for the cache lines `distance` bytes past those of `bytes` (a prefetch never faults, so an
/// address past the end of the weights is harmless).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_at(bytes: &[u8], distance: usize) {
    let ahead = bytes.as_ptr().wrapping_add(distance);
    for line in (0..bytes.len()).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
    }
}

/// Sum of the eight lanes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Loads 32 bytes from `p`.
///
/// # Safety
/// `p..p + 32` must be readable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load<T>(p: *const T) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// `_mm256_shuffle_epi8` controls that repeat word `lo` of the low 128-bit lane across that lane and
/// word `hi` of the high lane across that one.
const fn word_shuffle(lo: usize, hi: usize) -> [i8; 32] {
    let mut b = [0i8; 32];
    let mut i = 0;
    while i < 32 {
        let word = if i < 16 { lo } else { hi };
        b[i] = (2 * word + i % 2) as i8;
        i += 1;
    }
    b
}

/// Broadcasts of Q4_K/Q5_K sub-block scale j to all sixteen words.
static K4_SCALE_SHUFFLES: [[i8; 32]; 8] = {
    let mut t = [[0i8; 32]; 8];
    let mut j = 0;
    while j < 8 {
        t[j] = word_shuffle(j, j);
        j += 1;
    }
    t
};

/// For Q6_K's chunk k of 32 values: scale 2k in the low lane, 2k + 1 in the high lane.
static K6_SCALE_SHUFFLES: [[i8; 32]; 4] = {
    let mut t = [[0i8; 32]; 4];
    let mut k = 0;
    while k < 4 {
        t[k] = word_shuffle(2 * k, 2 * k + 1);
        k += 1;
    }
    t
};

/// The shuffle control `table`, as a vector.
#[target_feature(enable = "avx2,fma,f16c")]
fn control(table: &[i8; 32]) -> __m256i {
    // SAFETY: the table is 32 bytes.
    unsafe { load(table.as_ptr()) }
}

/// Panics unless every token has `n` quants (and `n / block` scales): the bounds every raw load relies on.
pub(super) fn check_tokens<const T: usize>(
    toks: &[Token; T],
    n: usize,
    block: usize,
    with_bsums: bool,
) {
    for t in toks {
        assert!(t.qs.len() == n && t.d.len() == n / block);
        assert!(!with_bsums || t.bsums.len() == n / 16);
    }
}

/// Dot products of signed 32-byte weight vector `w` (block `b`, scale `dw`) with `T` tokens' quants,
/// FMA'd into `acc[t]` (the Q8_0 / Q4_0 inner step).
///
/// # Safety
/// Every token must hold block `b` (32 quants from `32 * b` and scale `b`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_block<const T: usize>(
    w: __m256i,
    dw: __m256,
    toks: &[Token; T],
    b: usize,
    acc: &mut [__m256; T],
) {
    let ones = _mm256_set1_epi16(1);
    // maddubs multiplies unsigned by signed: move the weights' signs onto the activations.
    let abs_w = _mm256_sign_epi8(w, w);
    for t in 0..T {
        // SAFETY: token t holds block b (caller).
        let (a, da) = unsafe {
            (
                load(toks[t].qs.as_ptr().add(QK8_0 * b)),
                _mm256_broadcast_ss(&*toks[t].d.as_ptr().add(b)),
            )
        };
        let p = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(a, w));
        let p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), da);
        acc[t] = _mm256_fmadd_ps(p, dw, acc[t]);
    }
}

/// Dot products of unsigned 32-byte weight levels `w` (block `b`: value = d * w + m) with `T` tokens'
/// quants: d times the products FMA'd into `acc[t]`, m times the activations' sums added to `mins[t]`
/// (the Q4_1 / Q5_1 inner step, llama.cpp's Q8_1 `s` term taken from `bsums`).
///
/// # Safety
/// Every token must hold block `b` (32 quants from `32 * b`, scale `b`, sums `2b` and `2b + 1`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unsigned_block<const T: usize>(
    w: __m256i,
    (d, m): (__m256, f32),
    toks: &[Token; T],
    b: usize,
    acc: &mut [__m256; T],
    mins: &mut [f32; T],
) {
    let ones = _mm256_set1_epi16(1);
    for t in 0..T {
        // SAFETY: token t holds block b (caller).
        let (a, da, sum) = unsafe {
            let tok = &toks[t];
            let sums = tok.bsums.as_ptr().add(2 * b);
            (
                load(tok.qs.as_ptr().add(QK8_0 * b)),
                *tok.d.as_ptr().add(b),
                i32::from(*sums) + i32::from(*sums.add(1)),
            )
        };
        let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones));
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(p, _mm256_set1_ps(da)), d, acc[t]);
        mins[t] += m * (da * sum as f32);
    }
}

/// Rows of the legacy types (`size`-byte blocks of 32): `step(block, b, acc, mins)` adds block `b`.
/// Blocks alternate between two sets of accumulators so that one token's FMAs do not wait on each
/// other.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `step` may rely on every token holding every block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_legacy<const T: usize>(
    row: &[u8],
    toks: &[Token; T],
    size: usize,
    step: impl Fn(&[u8], usize, &mut [__m256; T], &mut [f32; T]),
) -> [f32; T] {
    let nb = row.len() / size;
    check_tokens(toks, nb * QK8_0, QK8_0, true);
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let mut mins = [0f32; T];
    let mut pairs = row.chunks_exact(2 * size);
    for (i, pair) in pairs.by_ref().enumerate() {
        prefetch_ahead(pair);
        let (b0, b1) = pair.split_at(size);
        step(b0, 2 * i, &mut acc[0], &mut mins);
        step(b1, 2 * i + 1, &mut acc[1], &mut mins);
    }
    if let Some(last) = pairs.remainder().get(..size) {
        step(last, nb - 1, &mut acc[0], &mut mins);
    }
    std::array::from_fn(|t| hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + mins[t])
}

/// The 32 bits at `block[at..at + 4]` as 32 bytes: 0xFF where the bit is set, else 0 (llama.cpp's
/// `bytes_from_bits_32`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bytes_from_bits(block: &[u8], at: usize) -> __m256i {
    let bits = i32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
    // Byte j gets source byte j / 8, then every bit but j % 8 is set: all ones iff bit j was.
    let spread = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread);
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
}

/// The 32 levels of a block's 16 nibble bytes at `at`: low nibbles (elements 0..16), then high.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles(block: &[u8], at: usize) -> __m256i {
    // SAFETY: the 16 bytes at `at` are in the block (indexing checks them).
    let q = unsafe { _mm_loadu_si128(block[at..at + 16].as_ptr().cast()) };
    _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
        _mm256_set1_epi8(0xF),
    )
}

/// The 32 signed levels of a Q8_0 block (34 bytes: f16 d, 32 i8).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn levels_q8_0(block: &[u8]) -> __m256i {
    // SAFETY: the 32 bytes after the scale are in the block (indexing checks them).
    unsafe { load(block[2..34].as_ptr()) }
}

/// The 32 signed levels `q - 8` of a Q4_0 block (18 bytes: f16 d, 16 nibble bytes).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn levels_q4_0(block: &[u8]) -> __m256i {
    _mm256_sub_epi8(nibbles(block, 2), _mm256_set1_epi8(8))
}

/// The 32 signed levels `q - 16` of a Q5_0 block (22 bytes: f16 d, 32 fifth bits, 16 nibble bytes).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn levels_q5_0(block: &[u8]) -> __m256i {
    // q - 16 in two's complement is the nibble with the top four bits set, unless the fifth bit is.
    _mm256_or_si256(
        nibbles(block, 6),
        _mm256_andnot_si256(bytes_from_bits(block, 2), _mm256_set1_epi8(0xF0u8 as i8)),
    )
}

/// Q8_0 weights (34 bytes: f16 d, 32 i8) against `T` tokens of Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let step = |block: &[u8], b, acc: &mut [__m256; T], _: &mut [f32; T]| {
        let d = _mm256_set1_ps(f16_at(block, 0));
        // SAFETY: dot_legacy checked the tokens.
        unsafe { signed_block(levels_q8_0(block), d, toks, b, acc) };
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_legacy(row, toks, 34, step) }
}

/// Q4_0 weights (18 bytes: f16 d, 16 nibble bytes; value = d * (q - 8)) against Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let step = |block: &[u8], b, acc: &mut [__m256; T], _: &mut [f32; T]| {
        let d = _mm256_set1_ps(f16_at(block, 0));
        // SAFETY: dot_legacy checked the tokens.
        unsafe { signed_block(levels_q4_0(block), d, toks, b, acc) };
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_legacy(row, toks, 18, step) }
}

/// Q5_0 weights (22 bytes: f16 d, 32 fifth bits, 16 nibble bytes; value = d * (q - 16)) against Q8_0
/// activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_0<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let step = |block: &[u8], b, acc: &mut [__m256; T], _: &mut [f32; T]| {
        let d = _mm256_set1_ps(f16_at(block, 0));
        // SAFETY: dot_legacy checked the tokens.
        unsafe { signed_block(levels_q5_0(block), d, toks, b, acc) };
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_legacy(row, toks, 22, step) }
}

/// Q4_1 weights (20 bytes: f16 d, f16 m, 16 nibble bytes; value = d * q + m) against Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_1<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let step = |block: &[u8], b, acc: &mut [__m256; T], mins: &mut [f32; T]| {
        let dm = (_mm256_set1_ps(f16_at(block, 0)), f16_at(block, 2));
        // SAFETY: dot_legacy checked the tokens.
        unsafe { unsigned_block(nibbles(block, 4), dm, toks, b, acc, mins) };
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_legacy(row, toks, 20, step) }
}

/// Q5_1 weights (24 bytes: f16 d, f16 m, 32 fifth bits, 16 nibble bytes; value = d * q + m) against
/// Q8_0 activations.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5_1<const T: usize>(row: &[u8], toks: &[Token; T]) -> [f32; T] {
    let sixteen = _mm256_set1_epi8(16);
    let step = |block: &[u8], b, acc: &mut [__m256; T], mins: &mut [f32; T]| {
        let dm = (_mm256_set1_ps(f16_at(block, 0)), f16_at(block, 2));
        let w = _mm256_or_si256(
            nibbles(block, 8),
            _mm256_and_si256(bytes_from_bits(block, 4), sixteen),
        );
        // SAFETY: dot_legacy checked the tokens.
        unsafe { unsigned_block(w, dm, toks, b, acc, mins) };
    };
    // SAFETY: the caller guarantees the CPU features.
    unsafe { dot_legacy(row, toks, 24, step) }
}

/// The eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K's 12 packed bytes (ggml's `utmp` shuffle:
/// four sub-blocks in the low 6 bits of bytes 0..4 and 4..8, the other four split over nibbles of
/// bytes 8..12 and the top 2 bits of bytes 0..8).
pub(super) fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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
        prefetch_ahead(block);
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, mins) = k4_scales_mins(&block[4..16]);
        // The eight scales as i16 in both 128-bit lanes; one shuffle broadcasts any of them.
        let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(
            i64::from_le_bytes(scales),
        )));
        // Each min twice, to meet the 16 sums of 16 quants: madd gives min_j * (sum of sub-block j).
        let mins = _mm_cvtsi64_si128(i64::from_le_bytes(mins));
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mins, mins));
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..QK_K / 64 {
            let (q_lo, q_hi) = unpack(block, j);
            let s_lo = _mm256_shuffle_epi8(scales, control(&K4_SCALE_SHUFFLES[2 * j]));
            let s_hi = _mm256_shuffle_epi8(scales, control(&K4_SCALE_SHUFFLES[2 * j + 1]));
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
        let (d, neg_dmin) = (_mm256_set1_ps(d), _mm256_set1_ps(-dmin));
        for t in 0..T {
            // SAFETY: check_tokens: every token holds nb * 16 sums and nb scales.
            let (bsums, da) = unsafe {
                (
                    load(toks[t].bsums.as_ptr().add(16 * i)),
                    _mm256_broadcast_ss(&*toks[t].d.as_ptr().add(i)),
                )
            };
            let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums));
            let x = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sumi[t]));
            acc[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(neg_dmin, summ, x), da, acc[t]);
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
        prefetch_ahead(block);
        let d = _mm256_set1_ps(f16_at(block, 208));
        // SAFETY: bytes 192..208 of the block are its 16 scales.
        let scales16 =
            _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(block[192..208].as_ptr().cast()) });
        let mut sumi = [_mm256_setzero_si256(); T];
        for n in 0..QK_K / 128 {
            // Scales of sub-blocks 8n..8n + 8 in both 128-bit lanes.
            let half = if n == 0 {
                _mm256_castsi256_si128(scales16)
            } else {
                _mm256_extracti128_si256::<1>(scales16)
            };
            let scales = _mm256_broadcastsi128_si256(half);
            // SAFETY: a 210-byte block has 128 low-nibble bytes at 0 and 64 high-bit bytes at 128; n < 2.
            let (b1, b2, h) = unsafe {
                (
                    load(block[..128].as_ptr().add(64 * n)),
                    load(block[..128].as_ptr().add(64 * n + 32)),
                    load(block[128..192].as_ptr().add(32 * n)),
                )
            };
            // Chunk k of 32 values: nibble k/2 of b1 (k even) or b2 (k odd), bits 2k..2k+2 of h.
            // Unpacked one chunk at a time, to leave registers for eight tokens' sums.
            let level = |k: usize| {
                let shift =
                    |v: __m256i, by: usize| _mm256_srl_epi16(v, _mm_cvtsi32_si128(by as i32));
                let low = _mm256_and_si256(
                    shift(if k.is_multiple_of(2) { b1 } else { b2 }, 4 * (k / 2)),
                    low4,
                );
                let high = _mm256_and_si256(shift(h, 2 * k), low2);
                _mm256_or_si256(low, _mm256_slli_epi16::<4>(high))
            };
            for (k, shuffle) in K6_SCALE_SHUFFLES.iter().enumerate() {
                let q = level(k);
                // Chunk k spans sub-blocks 2k (low lane of maddubs' output) and 2k + 1 (high lane).
                let s = _mm256_shuffle_epi8(scales, control(shuffle));
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
            // SAFETY: check_tokens: every token holds nb scales.
            let da = unsafe { _mm256_broadcast_ss(&*toks[t].d.as_ptr().add(i)) };
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(sumi, da), d, acc[t]);
        }
    }
    acc.map(|a| hsum(a))
}
