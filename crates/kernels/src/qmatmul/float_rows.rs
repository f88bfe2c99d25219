//! Rows of f32 weights (bf16 and f16 go through `panels`) times a few tokens of f32 activations, the
//! activations used as they are.
//!
//! One token is bound by memory bandwidth: the row is streamed once and FMA'd into the accumulators
//! of up to four tokens. Every token count sums in the same order, so a token's result does not
//! depend on the others in its group.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Format;
#[cfg(target_arch = "x86_64")]
use super::avx2::{PREFETCH_DISTANCE, hsum};

/// Bytes of one weight of a float format.
pub(super) fn weight_bytes(format: Format) -> usize {
    match format {
        Format::F32 => 4,
        Format::F16 | Format::BF16 => 2,
        _ => unreachable!("{format:?} is not a float format"),
    }
}

/// The weight at `bytes` (one weight's bytes) as f32.
fn weight(format: Format, bytes: &[u8]) -> f32 {
    match format {
        Format::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        _ => unreachable!("{format:?} is not a row-major float format"),
    }
}

/// The scalar reference: `row` (bytes of `format`) dot `x`, summed in order.
pub(super) fn dot_scalar(format: Format, row: &[u8], x: &[f32]) -> f32 {
    let size = weight_bytes(format);
    assert_eq!(
        row.len(),
        x.len() * size,
        "row and activations of one length"
    );
    row.chunks_exact(size)
        .zip(x)
        .fold(0f32, |sum, (w, &x)| weight(format, w).mul_add(x, sum))
}

/// Eight weights of `format` from `p` as f32.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p` must have eight weights' bytes readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load8(format: Format, p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees the bytes.
    unsafe {
        match format {
            Format::F32 => _mm256_loadu_ps(p.cast()),
            _ => unreachable!("{format:?} is not a row-major float format"),
        }
    }
}

/// `row` (bytes of a float `format`) dot each of `xs` (as many values as the row has weights).
/// Vectors of eight alternate between two sets of accumulators, so that one token's FMAs do not wait
/// on each other; a tail of fewer than sixteen is added in order.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot<const T: usize>(format: Format, row: &[u8], xs: &[&[f32]; T]) -> [f32; T] {
    let size = weight_bytes(format);
    let cols = row.len() / size;
    assert!(row.len() == cols * size && xs.iter().all(|x| x.len() == cols));
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    // Pairs of vectors, one per set of accumulators; a 64-byte line is prefetched per pair of f32
    // vectors, or per pair of pairs of 16-bit ones.
    let vectors = cols / 16 * 2;
    let p = row.as_ptr();
    for i in (0..vectors).step_by(2) {
        if (i * 8 * size).is_multiple_of(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i * 8 * size + PREFETCH_DISTANCE).cast());
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let at = 8 * (i + j);
            // SAFETY: at + 8 <= vectors * 8 <= cols, so eight weights and eight values of each x
            // are in bounds.
            let w = unsafe { load8(format, p.add(at * size)) };
            for t in 0..T {
                // SAFETY: as above.
                let x = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(at)) };
                acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
            }
        }
    }
    // A loop, not a closure: a closure borrowing the accumulators would keep them in memory.
    let mut dots = [0f32; T];
    for (t, dot) in dots.iter_mut().enumerate() {
        let sum = hsum(_mm256_add_ps(acc[0][t], acc[1][t]));
        let tail = row[vectors * 8 * size..].chunks_exact(size);
        *dot = tail
            .zip(&xs[t][vectors * 8..])
            .fold(sum, |sum, (w, &x)| weight(format, w).mul_add(x, sum));
    }
    dots
}
