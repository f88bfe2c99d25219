//! On-the-fly 8-bit quantization of the activations a weight matrix is multiplied by.
//!
//! llama.cpp multiplies quantized weights by quantized activations: Q8_0 blocks of 32 for the legacy
//! types and Q8_K super-blocks of 256 (with the sums of each 16 quants, `bsums`, that the K-quants'
//! minimums need) for the K-quants. The quants are those of `tiefsee_gguf::quantize` bit for bit; the
//! block scales are kept as f32 (Q8_0's rounded to f16 first, as the block format stores it) in arrays
//! of their own rather than interleaved, so the quants of a token are one contiguous slice.

use std::ops::Range;

use rayon::prelude::*;
use tiefsee_gguf::QK_K;

#[cfg(target_arch = "x86_64")]
use crate::cpu::{self, Isa};

/// Values per Q8_0 block.
pub(crate) const QK8_0: usize = 32;

/// The activation format a weight type dots against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    /// Blocks of 32 with one scale (`block_q8_0`).
    Q8_0,
    /// Blocks of 256 with one scale and 16 sums of 16 quants (`block_q8_K`).
    Q8K,
}

impl ActFormat {
    /// Values per block.
    pub(crate) fn block_size(self) -> usize {
        match self {
            ActFormat::Q8_0 => QK8_0,
            ActFormat::Q8K => QK_K,
        }
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy)]
pub(crate) struct Token<'a> {
    /// (cols,) quants.
    pub(crate) qs: &'a [i8],
    /// (cols / block_size,) block scales.
    pub(crate) d: &'a [f32],
    /// (cols / 16,) sums of each 16 quants.
    pub(crate) bsums: &'a [i16],
}

/// Quantized activations of a batch of tokens, reused from call to call to avoid allocating.
#[derive(Default)]
pub(crate) struct Activations {
    cols: usize,
    format: Option<ActFormat>,
    /// (tokens, cols)
    qs: Vec<i8>,
    /// (tokens, cols / block_size)
    d: Vec<f32>,
    /// (tokens, cols / 16)
    bsums: Vec<i16>,
}

/// Tokens per parallel task when quantizing many tokens.
const TOKENS_PER_TASK: usize = 16;

impl Activations {
    /// Quantizes `x`, (tokens, cols) row-major, to `format`; `cols` must be a multiple of its block size.
    pub(crate) fn quantize(&mut self, format: ActFormat, x: &[f32], cols: usize) {
        let nb = cols / format.block_size();
        debug_assert!(nb * format.block_size() == cols && x.len().is_multiple_of(cols));
        let tokens = x.len() / cols;
        self.cols = cols;
        self.format = Some(format);
        resize(&mut self.qs, tokens * cols);
        resize(&mut self.d, tokens * nb);
        // Q4_1 and Q5_1 take their activation sums from these; the K-quants need them for their mins.
        resize(&mut self.bsums, tokens * cols / 16);
        if tokens >= 2 * TOKENS_PER_TASK {
            x.par_chunks(cols)
                .zip(self.qs.par_chunks_mut(cols))
                .zip(self.d.par_chunks_mut(nb))
                .zip(self.bsums.par_chunks_mut(cols / 16))
                .with_min_len(TOKENS_PER_TASK)
                .for_each(|(((x, qs), d), bsums)| quantize_token(format, x, qs, d, bsums));
        } else {
            x.chunks(cols)
                .zip(self.qs.chunks_mut(cols))
                .zip(self.d.chunks_mut(nb))
                .zip(self.bsums.chunks_mut(cols / 16))
                .for_each(|(((x, qs), d), bsums)| quantize_token(format, x, qs, d, bsums));
        }
    }

    /// Token `t`'s quantized activations for columns `cols` (whole blocks).
    pub(crate) fn token(&self, t: usize, cols: Range<usize>) -> Token<'_> {
        let bs = self.format.map_or(1, ActFormat::block_size);
        let at = |per: usize| (t * self.cols + cols.start) / per..(t * self.cols + cols.end) / per;
        Token {
            qs: &self.qs[at(1)],
            d: &self.d[at(bs)],
            bsums: &self.bsums[at(16)],
        }
    }
}

/// Quantizes one token's values `x` into `qs`, `d` and the sums of each 16 quants `bsums`.
fn quantize_token(format: ActFormat, x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::detected() >= Isa::Avx2 {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { quantize_token_avx2(format, x, qs, d, bsums) };
    }
    quantize_token_portable(format, x, qs, d, bsums);
}

/// [`quantize_token_portable`] with AVX2 intrinsics, bit for bit: the same scalar scale per block, the
/// same products, round-half-away-from-zero (Q8_0) or to-even (Q8_K) done exactly on whole vectors,
/// and the sums of each 16 quants taken before packing to bytes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_token_avx2(
    format: ActFormat,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
) {
    use std::arch::x86_64::*;

    let block = format.block_size();
    assert!(
        qs.len() == x.len() && d.len() * block == x.len() && bsums.len() * 16 == x.len(),
        "quantize_token: mismatched buffers"
    );
    let sign_bit = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign_bit, v);
    let hmax = |v: __m256| {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
    };
    let hsum = |v: __m256i| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
    };
    // packs_epi32 and packs_epi16 interleave 128-bit lanes; this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for (((x, qs), d), bsums) in x
        .chunks_exact(block)
        .zip(qs.chunks_exact_mut(block))
        .zip(d.iter_mut())
        .zip(bsums.chunks_exact_mut(block / 16))
    {
        // SAFETY: the loads below stay inside `x` (whole blocks of 32 or 256 values).
        let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) };
        let mut amax = _mm256_setzero_ps();
        for i in 0..block / 8 {
            amax = _mm256_max_ps(amax, abs(load(i)));
        }
        let amax = hmax(amax);
        // Packs the levels of each eight values (`levels(i)`, as i32) into the block's bytes, with the
        // sums of each 16.
        let store = |levels: &dyn Fn(usize) -> __m256i, qs: &mut [i8], bsums: &mut [i16]| {
            for (j, (qs, sums)) in qs
                .chunks_exact_mut(32)
                .zip(bsums.chunks_exact_mut(2))
                .enumerate()
            {
                let q: [__m256i; 4] = std::array::from_fn(|k| levels(4 * j + k));
                sums[0] = hsum(_mm256_add_epi32(q[0], q[1])) as i16;
                sums[1] = hsum(_mm256_add_epi32(q[2], q[3])) as i16;
                let bytes = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let bytes = _mm256_permutevar8x32_epi32(bytes, order);
                // SAFETY: `qs` is 32 bytes.
                unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
            }
        };
        match format {
            ActFormat::Q8_0 => {
                let scale = amax / 127.0;
                let id = _mm256_set1_ps(if scale == 0.0 { 0.0 } else { 1.0 / scale });
                *d = half::f16::from_f32(scale).to_f32();
                let levels = |i: usize| {
                    let v = _mm256_mul_ps(load(i), id);
                    // round half away from zero: truncate, then step away from zero if |frac| >= 0.5
                    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
                    let away = _mm256_cmp_ps::<_CMP_GE_OQ>(abs(_mm256_sub_ps(v, t)), half);
                    let step = _mm256_and_ps(away, _mm256_or_ps(_mm256_and_ps(v, sign_bit), one));
                    _mm256_cvttps_epi32(_mm256_add_ps(t, step))
                };
                store(&levels, qs, bsums);
            }
            ActFormat::Q8K if amax == 0.0 => {
                qs.fill(0);
                bsums.fill(0);
                *d = 0.0;
            }
            ActFormat::Q8K => {
                // the signed value of largest magnitude, the first one on ties
                let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
                let iscale = -127.0 / max;
                *d = 1.0 / iscale;
                let iscale = _mm256_set1_ps(iscale);
                let cap = _mm256_set1_epi32(127);
                let levels = |i: usize| {
                    let v = _mm256_mul_ps(iscale, load(i));
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    _mm256_min_epi32(_mm256_cvttps_epi32(r), cap)
                };
                store(&levels, qs, bsums);
            }
        }
    }
}

/// The body of [`quantize_token`].
#[inline(always)]
fn quantize_token_portable(
    format: ActFormat,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
) {
    match format {
        ActFormat::Q8_0 => quantize_q8_0(x, qs, d),
        ActFormat::Q8K => quantize_q8_k(x, qs, d),
    }
    for (s, q) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&q| i16::from(q)).sum();
    }
}

/// Sets `v`'s length to `n`, keeping its allocation (contents are overwritten by the caller).
fn resize<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::default());
}

#[inline(always)]
/// `quantize_row_q8_0_ref`: d = max|x| / 127, q = round(x / d), half away from zero.
pub(crate) fn quantize_q8_0(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((x, qs), d) in x.chunks_exact(QK8_0).zip(qs.chunks_exact_mut(QK8_0)).zip(d) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let id = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        *d = half::f16::from_f32(scale).to_f32();
    }
}

#[inline(always)]
/// `quantize_row_q8_K_ref`: scale from the signed value of largest magnitude, q = nearest(x * -127 / max)
/// capped at 127.
pub(crate) fn quantize_q8_k(x: &[f32], qs: &mut [i8], d: &mut [f32]) {
    for ((x, qs), d) in x.chunks_exact(QK_K).zip(qs.chunks_exact_mut(QK_K)).zip(d) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            qs.fill(0);
            *d = 0.0;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        *d = 1.0 / iscale;
    }
}
