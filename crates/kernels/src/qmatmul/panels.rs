//! bf16 and f16 weights as a matrix stores them: panels of 16 rows, column-major inside each panel
//! (for each column, the 16 rows' weights are 32 contiguous bytes), the last panel padded with zero
//! rows. Repacked once when the matrix is made.
//!
//! Why: a 32-byte load then gives sixteen rows' weights at one column, which become two vectors of f32
//! with no decoding pass (bf16: a shift gives the even rows, a mask the odd ones; f16: F16C converts
//! rows 0-7 and 8-15); each token's activation is one
//! broadcast, and a tile of 16 rows by up to six tokens keeps twelve accumulators, enough to hide the
//! FMA latency. Row-major bf16 needs either a decoded strip (a quarter of the time at sixteen tokens)
//! or a widening per weight in the FMA loop (four rows at most, latency-bound). One token streams
//! four panels at once. Measured in bench/README.md ("Session 8").
//!
//! A token's sum over a row is one chain of FMAs over the columns in order, whatever the number of
//! tokens and panels multiplied together: a token's result does not depend on its batch.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::ops::Range;

use std::sync::Arc;

use memmap2::{Advice, MmapMut};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::f32_tiles::{GROUP, Transposed};
use super::{Format, OutPtr, WeightBytes};

/// Rows per panel.
pub(super) const PANEL: usize = 16;
/// Columns per pass in a product: sixteen tokens' transposed activations for them take 16 KiB of L1,
/// the panel's 8 KiB.
#[cfg(target_arch = "x86_64")]
const STRIP: usize = 256;
/// Panels multiplied strip by strip together: a strip's activations are read from L1 for all of them,
/// where a panel at a time would stream every column's activations again per panel (from L3 once a
/// group's activations outgrow L2, as for a down projection's 8960 or more columns).
#[cfg(target_arch = "x86_64")]
const BLOCK_PANELS: usize = 4;
/// Most tokens per tile: twelve accumulators (two vectors of rows per token).
#[cfg(target_arch = "x86_64")]
const MAX_TILE_TOKENS: usize = 6;

/// Bytes of one panel of `cols` columns.
pub(super) fn panel_bytes(cols: usize) -> usize {
    PANEL * cols * 2
}

/// Bytes of the panels holding `rows` rows of `cols` columns.
pub(super) fn bytes_for(rows: usize, cols: usize) -> usize {
    rows.div_ceil(PANEL) * panel_bytes(cols)
}

/// Offset of the weight (`row`, `col`) in panels of `cols` columns.
fn offset(cols: usize, row: usize, col: usize) -> usize {
    ((row / PANEL * cols + col) * PANEL + row % PANEL) * 2
}

/// Panels of the bf16 matrix `row_major` (`rows` rows of `cols` weights), in fresh memory asked for
/// in huge pages (a model's worth of 4 KiB page faults, each clearing its page, took longer than the
/// copy); a `Vec` where anonymous maps fail.
pub(super) fn pack(row_major: &[u8], rows: usize, cols: usize) -> WeightBytes {
    assert_eq!(row_major.len(), rows * cols * 2, "bf16 rows");
    let len = bytes_for(rows, cols);
    match MmapMut::map_anon(len) {
        Ok(mut map) => {
            // Only speed is at stake: without huge pages the map works the same.
            let _ = map.advise(Advice::HugePage);
            fill(row_major, rows, cols, &mut map);
            WeightBytes::from_owner(Arc::new(map))
        }
        Err(_) => {
            let mut out = vec![0u8; len];
            fill(row_major, rows, cols, &mut out);
            WeightBytes::from_vec(out)
        }
    }
}

/// Writes the panels of `row_major` to `out` (zeroed, [`bytes_for`] long).
fn fill(row_major: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    out.par_chunks_mut(panel_bytes(cols))
        .enumerate()
        .for_each(|(p, panel)| {
            // Column by column: the panel is written in order while its rows are read in order.
            let n = PANEL.min(rows - p * PANEL);
            let first = &row_major[p * PANEL * cols * 2..][..n * cols * 2];
            for (k, column) in panel.chunks_exact_mut(PANEL * 2).enumerate() {
                for (i, w) in column[..n * 2].chunks_exact_mut(2).enumerate() {
                    w.copy_from_slice(&first[(i * cols + k) * 2..][..2]);
                }
            }
        });
}

/// The two bytes `w` of a weight of `format` (bf16 or f16) as f32.
fn to_f32(format: Format, w: [u8; 2]) -> f32 {
    match format {
        Format::BF16 => f32::from_bits(u32::from(u16::from_le_bytes(w)) << 16),
        Format::F16 => half::f16::from_le_bytes(w).to_f32(),
        _ => unreachable!("{format:?} is not kept in panels"),
    }
}

/// The weight (`row`, `col`) of `panels` of `format` as f32.
fn weight(format: Format, panels: &[u8], cols: usize, row: usize, col: usize) -> f32 {
    let at = offset(cols, row, col);
    to_f32(format, [panels[at], panels[at + 1]])
}

/// Decodes row `row` of `panels` into `out` (`cols` values).
pub(super) fn dequantize_row(
    format: Format,
    panels: &[u8],
    cols: usize,
    row: usize,
    out: &mut [f32],
) {
    for (k, o) in out[..cols].iter_mut().enumerate() {
        *o = weight(format, panels, cols, row, k);
    }
}

/// Row-major bf16 bytes of rows `rows` of `panels`.
pub(super) fn unpack_rows(panels: &[u8], cols: usize, rows: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * cols * 2);
    for r in rows {
        for k in 0..cols {
            let at = offset(cols, r, k);
            out.extend_from_slice(&panels[at..at + 2]);
        }
    }
    out
}

/// Decodes rows `rows` (starting a panel) of `panels` into `out`, (rows.len(), cols) row-major f32.
pub(super) fn decode_rows(
    format: Format,
    panels: &[u8],
    cols: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    assert!(rows.start.is_multiple_of(PANEL) && out.len() == rows.len() * cols);
    let first = rows.start;
    for (p, panel) in panels[offset(cols, first, 0)..]
        .chunks(panel_bytes(cols))
        .take(rows.len().div_ceil(PANEL))
        .enumerate()
    {
        for (k, column) in panel.chunks_exact(PANEL * 2).enumerate() {
            for (i, w) in column.chunks_exact(2).enumerate() {
                let r = p * PANEL + i;
                if r < rows.len() {
                    out[r * cols + k] = to_f32(format, [w[0], w[1]]);
                }
            }
        }
    }
}

/// Outputs of `tokens` (rows of `x`, (tokens, cols) row-major) for rows `rows`, in scalar code:
/// each a sum over the columns in order.
///
/// # Safety
/// No other thread may write these outputs meanwhile; `out` must hold `x`'s tokens times
/// `out_rows` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn multiply_scalar(
    format: Format,
    panels: &[u8],
    cols: usize,
    out_rows: usize,
    rows: Range<usize>,
    x: &[f32],
    tokens: Range<usize>,
    out: &OutPtr,
) {
    for t in tokens {
        let xt = &x[t * cols..][..cols];
        for r in rows.clone() {
            let sum = (0..cols).fold(0f32, |s, k| {
                weight(format, panels, cols, r, k).mul_add(xt[k], s)
            });
            // SAFETY: (t, r) is in bounds and ours alone (caller).
            unsafe { out.store(t * out_rows + r, sum, false) };
        }
    }
}

/// Outputs of all tokens of `x` for rows `rows` (starting a panel) of `panels`: per group of sixteen
/// tokens and per block of up to four panels, a strip of columns at a time, every tile of tokens over
/// the strip for each panel (or set of panels multiplied together) of the block.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; no other thread may write these outputs meanwhile; `out`
/// must hold `x.tokens` times `out_rows` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn multiply(
    format: Format,
    panels: &[u8],
    cols: usize,
    out_rows: usize,
    rows: Range<usize>,
    x: &Transposed,
    out: &OutPtr,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match format {
            Format::BF16 => multiply_as::<false>(panels, cols, out_rows, rows, x, out),
            Format::F16 => multiply_as::<true>(panels, cols, out_rows, rows, x, out),
            _ => unreachable!("{format:?} is not kept in panels"),
        }
    }
}

/// [`multiply`] for bf16 panels (`F16` false) or f16 ones.
///
/// # Safety
/// As for [`multiply`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn multiply_as<const F16: bool>(
    panels: &[u8],
    cols: usize,
    out_rows: usize,
    rows: Range<usize>,
    x: &Transposed,
    out: &OutPtr,
) {
    assert!(rows.start.is_multiple_of(PANEL) && x.cols() == cols);
    let count = rows.len().div_ceil(PANEL);
    let first = rows.start / PANEL;
    assert!(panels.len() >= (first + count) * panel_bytes(cols));
    let tokens = x.tokens();
    let mut sums = [0f32; BLOCK_PANELS * GROUP * PANEL];
    for g in 0..tokens.div_ceil(GROUP) {
        let n = GROUP.min(tokens - g * GROUP);
        // Few tokens: more panels per tile, so that eight or twelve accumulators are busy.
        let at_once = match n {
            1 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let xg = &x.group(g)[..cols * GROUP];
        // Tiles as even as possible (sixteen tokens: 6 + 5 + 5, not 6 + 6 + 4), so that none is left
        // with too few accumulators to hide the FMA latency.
        let tiles = n.div_ceil(MAX_TILE_TOKENS);
        for block in (0..count).step_by(BLOCK_PANELS) {
            let block_panels = BLOCK_PANELS.min(count - block);
            let sums = &mut sums[..block_panels * n * PANEL];
            sums.fill(0.0);
            for k0 in (0..cols).step_by(STRIP) {
                let strip = STRIP.min(cols - k0);
                let mut set = 0;
                while set < block_panels {
                    let width = if block_panels - set >= at_once {
                        at_once
                    } else {
                        1
                    };
                    let sums = &mut sums[set * n * PANEL..(set + width) * n * PANEL];
                    let w = |q: usize| {
                        panels[(first + block + set + q) * panel_bytes(cols) + k0 * PANEL * 2..]
                            .as_ptr()
                    };
                    let mut t0 = 0;
                    for i in 0..tiles {
                        let t = n / tiles + usize::from(i < n % tiles);
                        let x = &xg[k0 * GROUP + t0..];
                        // SAFETY (all arms): each panel pointer starts `strip` columns of its
                        // panel, the activations hold `strip` columns of GROUP values from t0, and
                        // the sums slice (width panels, n tokens) holds the tile's.
                        unsafe {
                            match (width, t) {
                                (4, 1) => tile::<4, 1, F16>(
                                    [w(0), w(1), w(2), w(3)],
                                    x,
                                    strip,
                                    sums,
                                    t0,
                                    n,
                                ),
                                (2, 2) => tile::<2, 2, F16>([w(0), w(1)], x, strip, sums, t0, n),
                                (2, 3) => tile::<2, 3, F16>([w(0), w(1)], x, strip, sums, t0, n),
                                (_, 1) => tile::<1, 1, F16>([w(0)], x, strip, sums, t0, n),
                                (_, 2) => tile::<1, 2, F16>([w(0)], x, strip, sums, t0, n),
                                (_, 3) => tile::<1, 3, F16>([w(0)], x, strip, sums, t0, n),
                                (_, 4) => tile::<1, 4, F16>([w(0)], x, strip, sums, t0, n),
                                (_, 5) => tile::<1, 5, F16>([w(0)], x, strip, sums, t0, n),
                                _ => tile::<1, 6, F16>([w(0)], x, strip, sums, t0, n),
                            }
                        }
                        t0 += t;
                    }
                    set += width;
                }
            }
            for q in 0..block_panels {
                for j in 0..n {
                    let sums = &sums[(q * n + j) * PANEL..][..PANEL];
                    for (h, half) in sums.chunks_exact(PANEL / 2).enumerate() {
                        for (i, &v) in half.iter().enumerate() {
                            // bf16 tiles hold the even rows, then the odd ones; f16 tiles rows
                            // 0-7, then 8-15.
                            let in_panel = if F16 { 8 * h + i } else { 2 * i + h };
                            let r = rows.start + (block + q) * PANEL + in_panel;
                            if r < rows.end {
                                // SAFETY: (token, r) is in bounds and ours alone (caller).
                                unsafe { out.store((g * GROUP + j) * out_rows + r, v, false) };
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `T` tokens (from `t0` of `n` in the sums) times `P` panels (bf16, or f16 if `F16`) over `strip`
/// columns: `w[q]` points at the strip's first column of panel q, `x` at its first column's
/// activation of token `t0` (columns `GROUP` apart). The sums hold, per panel and token, sixteen
/// rows' values: for bf16 the even rows, then the odd ones; for f16 rows 0-7, then 8-15.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; each `w[q]` must have `strip` columns of a panel readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const P: usize, const T: usize, const F16: bool>(
    w: [*const u8; P],
    x: &[f32],
    strip: usize,
    sums: &mut [f32],
    t0: usize,
    n: usize,
) {
    assert!(x.len() > (strip - 1) * GROUP + T - 1 && sums.len() >= P * n * PANEL && t0 + T <= n);
    let at = |q: usize, j: usize| (q * n + t0 + j) * PANEL;
    // SAFETY: at(q, j) + 16 <= sums.len() (checked above).
    let mut acc: [[[__m256; 2]; T]; P] = std::array::from_fn(|q| {
        std::array::from_fn(|j| {
            std::array::from_fn(|h| unsafe { _mm256_loadu_ps(sums.as_ptr().add(at(q, j) + 8 * h)) })
        })
    });
    // Opaque to the compiler, which would otherwise turn the mask into a blend with zero.
    let odd = std::hint::black_box(_mm256_set1_epi32(0xFFFF_0000u32 as i32));
    let x = x.as_ptr();
    for k in 0..strip {
        for (q, acc) in acc.iter_mut().enumerate() {
            // SAFETY: column k < strip of panel q (caller); the line 1 KiB ahead may be past the
            // panel, and prefetching it is harmless.
            let pair = unsafe {
                let p = w[q].add(k * PANEL * 2);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(1024).cast());
                _mm256_loadu_si256(p.cast())
            };
            let halves = if F16 {
                [
                    _mm256_cvtph_ps(_mm256_castsi256_si128(pair)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(pair)),
                ]
            } else {
                [
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(pair)),
                    _mm256_castsi256_ps(_mm256_and_si256(pair, odd)),
                ]
            };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: k * GROUP + j < x.len() (checked above).
                let b = unsafe { _mm256_broadcast_ss(&*x.add(k * GROUP + j)) };
                acc[0] = _mm256_fmadd_ps(halves[0], b, acc[0]);
                acc[1] = _mm256_fmadd_ps(halves[1], b, acc[1]);
            }
        }
    }
    for (q, acc) in acc.iter().enumerate() {
        for (j, acc) in acc.iter().enumerate() {
            for (h, &v) in acc.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(at(q, j) + 8 * h), v) };
            }
        }
    }
}
