//! The f32 path of the legacy formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), f32 weights and FP8 for short
//! prefills and prompt chunks (`F32_MIN_TOKENS` up to `GEMM_MIN_TOKENS`): weight rows are decoded to f32 a strip of
//! columns at a time, and an AVX2 + FMA register kernel multiplies them by the activations,
//! transposed once per call so that eight tokens fill a vector.
//!
//! Why: on AVX2 a 32-value block of byte products takes two integer multiplies (`maddubs`, `madd`),
//! which run on one pipe here, and three float instructions per token (convert, scale, FMA), while
//! f32 FMAs do the same 32 multiply-adds in four instructions on two pipes; decoding a block to f32
//! costs about twenty instructions, paid once for all tokens. The kernel's shape is the usual one of
//! BLAS libraries (six rows by sixteen tokens of outputs held in twelve registers, one broadcast
//! weight times a vector of tokens per FMA); unlike `gemm`, which packs both operands on every call,
//! it copies nothing but the decoded strip, which is what makes it faster below a few hundred tokens.
//!
//! A token's result depends only on its own activations: tokens never share a vector lane, and the
//! summation order over columns is fixed.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{bytes_from_bits, f16_at, levels_q4_0, levels_q5_0, nibbles, prefetch_at};
use super::float_rows::load8;
use super::fp8::{self, BlockScales};
use super::{Format, OutPtr};

/// Columns decoded per pass: sixteen tokens' activations for them take 16 KiB of L1.
const K_STRIP: usize = 256;
/// Tokens per vector.
const LANES: usize = 8;
/// Vectors of tokens per kernel pass.
const VECTORS: usize = 2;
/// Tokens per kernel pass, and per group of the transposed activations.
pub(super) const GROUP: usize = VECTORS * LANES;
/// Weight rows per kernel pass: with two vectors of tokens, twelve accumulators, enough to hide the
/// FMA latency on two pipes, and four registers to spare.
const ROWS: usize = 6;

/// Decoded weights and running sums of the calling thread, kept between calls.
#[derive(Default)]
pub(super) struct Scratch {
    /// `ROWS` rows of the current strip, `K_STRIP` apart.
    weights: Vec<f32>,
    /// Running sums of the task's outputs: (row group, token group, vector, row in group).
    sums: Vec<__m256>,
}

/// Activations (tokens, cols) rearranged for the kernel, once per input: (token group, column,
/// token in group), the last group padded with zeros.
#[derive(Default)]
pub(super) struct Transposed {
    values: Vec<f32>,
    tokens: usize,
    cols: usize,
}

impl Transposed {
    /// Tokens.
    pub(super) fn tokens(&self) -> usize {
        self.tokens
    }

    /// Columns.
    pub(super) fn cols(&self) -> usize {
        self.cols
    }

    /// Token group `g`'s values: (column, token in group).
    pub(super) fn group(&self, g: usize) -> &[f32] {
        &self.values[g * GROUP * self.cols..][..GROUP * self.cols]
    }

    /// Rearranges `x`, (tokens, cols) row-major.
    pub(super) fn fill(&mut self, x: &[f32], cols: usize) {
        let tokens = x.len() / cols;
        self.tokens = tokens;
        self.cols = cols;
        self.values.clear();
        self.values
            .resize(tokens.div_ceil(GROUP) * GROUP * cols, 0.0);
        // Token by token, so that x is read in order (tokens' rows are often a multiple of 4 KiB
        // apart: gathering a column of them would thrash one L1 set).
        for (t, row) in x.chunks_exact(cols).enumerate() {
            let (g, j) = (t / GROUP, t % GROUP);
            let columns = self.values[g * GROUP * cols..][..GROUP * cols].chunks_exact_mut(GROUP);
            for (column, &v) in columns.zip(row) {
                column[j] = v;
            }
        }
    }
}

/// Decodes weights `bytes` of a legacy or float `format` (not FP8, whose scales are elsewhere: see
/// `fp8::decode`) to `out`, as `tiefsee_gguf::dequantize` does.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn decode(format: Format, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(format.bytes_for(out.len()), bytes.len(), "decoded length");
    assert_ne!(format, Format::F8E4M3, "FP8 decodes with its block scales");
    let size = format.block_bytes();
    if format.is_float() {
        for (w, o) in bytes.chunks_exact(8 * size).zip(out.chunks_exact_mut(8)) {
            // SAFETY: eight weights are read, eight floats written (chunks of those lengths).
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), load8(format, w.as_ptr())) };
        }
        let done = out.len() / 8 * 8;
        if done < out.len() {
            let ty = format.ty().expect("only FP8 has no GGUF type");
            tiefsee_gguf::dequantize_into(ty, &bytes[done * size..], &mut out[done..])
                .expect("whole weights by the length check");
        }
        return;
    }
    let blocks = bytes.chunks_exact(size).zip(out.chunks_exact_mut(32));
    match format {
        Format::Q8_0 => blocks.for_each(|(b, o)| {
            let d = _mm256_set1_ps(f16_at(b, 0));
            for (eight, o) in b[2..34].chunks_exact(8).zip(o.chunks_exact_mut(8)) {
                // SAFETY: eight bytes are read, eight floats written (chunks of those lengths).
                unsafe {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(eight.as_ptr().cast()));
                    _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
                }
            }
        }),
        Format::Q4_0 => {
            blocks.for_each(|(b, o)| store_block(levels_q4_0(b), f16_at(b, 0), None, o))
        }
        Format::Q5_0 => {
            blocks.for_each(|(b, o)| store_block(levels_q5_0(b), f16_at(b, 0), None, o))
        }
        Format::Q4_1 => blocks.for_each(|(b, o)| {
            store_block(nibbles(b, 4), f16_at(b, 0), Some(f16_at(b, 2)), o);
        }),
        Format::Q5_1 => blocks.for_each(|(b, o)| {
            let fifth = _mm256_and_si256(bytes_from_bits(b, 4), _mm256_set1_epi8(16));
            let levels = _mm256_or_si256(nibbles(b, 8), fifth);
            store_block(levels, f16_at(b, 0), Some(f16_at(b, 2)), o);
        }),
        _ => unreachable!("{format:?} is not a legacy or float format"),
    }
}

/// Writes `d * level`, plus `m` if given, for the 32 signed byte levels to `out` (multiply, then
/// add, as the scalar decoder rounds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_block(levels: __m256i, d: f32, m: Option<f32>, out: &mut [f32]) {
    let out = &mut out[..32];
    let d = _mm256_set1_ps(d);
    let halves = [
        _mm256_castsi256_si128(levels),
        _mm256_extracti128_si256::<1>(levels),
    ];
    for (h, half) in halves.into_iter().enumerate() {
        for (q, eight) in [half, _mm_unpackhi_epi64(half, half)]
            .into_iter()
            .enumerate()
        {
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), d);
            let v = m.map_or(v, |m| _mm256_add_ps(v, _mm256_set1_ps(m)));
            // SAFETY: out has 32 values; this writes 8 from 16 h + 8 q.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(16 * h + 8 * q), v) };
        }
    }
}

/// `sums[v * ROWS + r] += w[r][k] * xt[k][v]` over the strip's first `cols` columns: `ROWS` decoded
/// rows (`K_STRIP` apart in `w`) times one group of tokens (`GROUP` per column of `xt`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn strip_kernel(w: &[f32], xt: &[f32], cols: usize, sums: &mut [__m256]) {
    assert!(cols <= K_STRIP && w.len() >= (ROWS - 1) * K_STRIP + cols && xt.len() >= cols * GROUP);
    let sums = &mut sums[..ROWS * VECTORS];
    let mut acc: [[__m256; VECTORS]; ROWS] =
        std::array::from_fn(|r| std::array::from_fn(|v| sums[v * ROWS + r]));
    let (w, xt) = (w.as_ptr(), xt.as_ptr());
    for k in 0..cols {
        // SAFETY: k < cols, and the lengths were checked above.
        let x: [__m256; VECTORS] =
            std::array::from_fn(|v| unsafe { _mm256_loadu_ps(xt.add(k * GROUP + v * LANES)) });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let b = unsafe { _mm256_broadcast_ss(&*w.add(r * K_STRIP + k)) };
            for v in 0..VECTORS {
                acc[v] = _mm256_fmadd_ps(b, x[v], acc[v]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for v in 0..VECTORS {
            sums[v * ROWS + r] = acc[v];
        }
    }
}

/// Outputs of all tokens of `x` for weight rows `rows` of a legacy-format, float or FP8 matrix (`data`,
/// FP8's block `scales`, `cols` columns, `out_rows` rows in `out`): decoded a strip at a time and
/// multiplied in f32.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may write these outputs meanwhile; `out`
/// must hold `x.tokens * out_rows` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile(
    format: Format,
    data: &[u8],
    scales: Option<&BlockScales>,
    cols: usize,
    out_rows: usize,
    rows: Range<usize>,
    x: &Transposed,
    out: &OutPtr,
    scratch: &mut Scratch,
) {
    let tokens = x.tokens;
    let token_groups = tokens.div_ceil(GROUP);
    let row_groups = rows.len().div_ceil(ROWS);
    let row_bytes = format.bytes_for(cols);
    assert!(x.cols == cols && data.len() >= rows.end * row_bytes);
    let Scratch { weights, sums } = scratch;
    weights.clear();
    weights.resize(ROWS * K_STRIP, 0.0);
    sums.clear();
    sums.resize(
        row_groups * token_groups * ROWS * VECTORS,
        _mm256_setzero_ps(),
    );
    // Row group by row group, each over all strips: the group's rows are read in order, and the
    // next strip of each is prefetched while this one is multiplied.
    for rg in 0..row_groups {
        let first = rows.start + rg * ROWS;
        let n = ROWS.min(rows.end - first);
        for k0 in (0..cols).step_by(K_STRIP) {
            let width = K_STRIP.min(cols - k0);
            let bytes = format.bytes_for(k0)..format.bytes_for(k0 + width);
            for (i, w) in weights.chunks_exact_mut(K_STRIP).take(n).enumerate() {
                let row = &data[(first + i) * row_bytes..][bytes.clone()];
                prefetch_at(row, bytes.len());
                match scales {
                    // SAFETY: the caller guarantees the CPU features.
                    Some(s) => unsafe {
                        fp8::decode(row, s.row(first + i), s.block_cols(), k0, &mut w[..width])
                    },
                    None => decode(format, row, &mut w[..width]),
                }
            }
            // Rows past the tile's end (n < ROWS) multiply stale values into sums never stored.
            for g in 0..token_groups {
                let sums = &mut sums[(rg * token_groups + g) * ROWS * VECTORS..];
                strip_kernel(weights, &x.values[(g * cols + k0) * GROUP..], width, sums);
            }
        }
    }
    for rg in 0..row_groups {
        let first = rows.start + rg * ROWS;
        for g in 0..token_groups {
            let sums = &sums[(rg * token_groups + g) * ROWS * VECTORS..][..ROWS * VECTORS];
            for (i, row) in (first..rows.end.min(first + ROWS)).enumerate() {
                for v in 0..VECTORS {
                    let mut lanes = [0f32; LANES];
                    // SAFETY: lanes has room for one vector.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums[v * ROWS + i]) };
                    for (j, &value) in lanes.iter().enumerate() {
                        let t = g * GROUP + v * LANES + j;
                        if t < tokens {
                            // SAFETY: (t, row) is in bounds and ours alone (caller).
                            unsafe { out.store(t * out_rows + row, value, false) };
                        }
                    }
                }
            }
        }
    }
}
