//! The block steps of the attention kernel with AVX2 and FMA (Haswell, Zen and later).
//!
//! Scores and value sums are small matrix products tiled in registers: 4 queries by 3 keys of 8-wide
//! dot-product accumulators, and 2 queries by 48 output values (12 accumulators each, enough
//! independent FMA chains to hide their latency). Every function here needs AVX2, FMA and F16C; `Kernel::Avx2` is only built on CPUs that have them. Keys and values must be whole
//! vectors of 8 (`Kernel::select` checks).

// Register tiles are fixed-size arrays indexed in nested loops that the compiler unrolls.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::bf16;

use super::pool::{Q8_BLOCK, Storage};
use super::{BLOCK, RowPool, Rows};

/// Rows of `slots` as f32 into `out` (slots.len(), width): bf16 is a 16-bit shift, q8 a product.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn convert(pool: &RowPool, slots: &[usize], out: &mut [f32]) {
    let w = pool.width();
    let rows = slots.iter().zip(out.chunks_exact_mut(w));
    match pool.storage() {
        Storage::F32(data) => {
            for (&slot, dst) in rows {
                dst.copy_from_slice(&data[slot * w..][..w]);
            }
        }
        Storage::Bf16(data) => {
            for (&slot, dst) in rows {
                bf16_row(&data[slot * w..][..w], dst);
            }
        }
        Storage::Q8 { values, scales } => {
            for (&slot, dst) in rows {
                let scales = &scales[slot * w / Q8_BLOCK..][..w / Q8_BLOCK];
                q8_row(&values[slot * w..][..w], scales, dst);
            }
        }
    }
}

/// Asks for the stored rows of `slots` to be brought into cache: slot tables are scattered, so the
/// hardware prefetcher cannot guess the next block while the current one is being computed.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch(pool: &RowPool, slots: &[usize]) {
    let w = pool.width();
    let lines = |bytes: &[u8]| {
        for offset in (0..bytes.len()).step_by(64) {
            // SAFETY: offset < bytes.len(); prefetching never faults anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(offset).cast()) };
        }
    };
    for &slot in slots {
        match pool.storage() {
            Storage::F32(data) => lines(as_bytes(&data[slot * w..][..w])),
            Storage::Bf16(data) => lines(as_bytes(&data[slot * w..][..w])),
            Storage::Q8 { values, scales } => {
                lines(as_bytes(&values[slot * w..][..w]));
                lines(as_bytes(&scales[slot * w / Q8_BLOCK..][..w / Q8_BLOCK]));
            }
        }
    }
}

/// The bytes of a slice of plain numbers.
fn as_bytes<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: the element types used here (bf16, i8, f32) have no padding and any bytes are valid u8.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_row(src: &[bf16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices; bf16 is a transparent u16.
        unsafe {
            let x = _mm_loadu_si128(src.as_ptr().add(i).cast());
            let y = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(x));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(y));
        }
        i += 8;
    }
    for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = s.to_f32();
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_row(values: &[i8], scales: &[f32], dst: &mut [f32]) {
    let blocks = values
        .chunks_exact(Q8_BLOCK)
        .zip(dst.chunks_exact_mut(Q8_BLOCK));
    for ((src, dst), &d) in blocks.zip(scales) {
        let d = _mm256_set1_ps(d);
        for k in (0..Q8_BLOCK).step_by(8) {
            // SAFETY: k + 8 <= Q8_BLOCK, the length of both chunks.
            unsafe {
                let x = _mm_loadl_epi64(src.as_ptr().add(k).cast());
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
                _mm256_storeu_ps(dst.as_mut_ptr().add(k), _mm256_mul_ps(f, d));
            }
        }
    }
}

/// `s[q, t] = dot(q[q], rows[t][key_offset..][..kw])`; q is (queries, kw), s is (queries, BLOCK).
///
/// Four queries at a time stay in L1 while the block's keys stream past them from L2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn scores(q: &[f32], kw: usize, rows: Rows, key_offset: usize, s: &mut [f32]) {
    let nq = q.len() / kw;
    assert!(kw.is_multiple_of(8) && key_offset + kw <= rows.width);
    assert!(rows.count() <= BLOCK && s.len() >= nq * BLOCK);
    let mut qi = 0;
    while qi + 4 <= nq {
        score_queries::<4>(q, kw, rows, key_offset, s, qi);
        qi += 4;
    }
    match nq - qi {
        3 => score_queries::<3>(q, kw, rows, key_offset, s, qi),
        2 => score_queries::<2>(q, kw, rows, key_offset, s, qi),
        1 => score_queries::<1>(q, kw, rows, key_offset, s, qi),
        _ => {}
    }
}

/// Scores of queries `qi..qi + H` against every key of the block, three keys at a time.
#[target_feature(enable = "avx2,fma,f16c")]
fn score_queries<const H: usize>(
    q: &[f32],
    kw: usize,
    rows: Rows,
    key_offset: usize,
    s: &mut [f32],
    qi: usize,
) {
    let nb = rows.count();
    let mut t = 0;
    while t + 3 <= nb {
        score_tile::<H, 3>(q, kw, rows, key_offset, s, qi, t);
        t += 3;
    }
    match nb - t {
        2 => score_tile::<H, 2>(q, kw, rows, key_offset, s, qi, t),
        1 => score_tile::<H, 1>(q, kw, rows, key_offset, s, qi, t),
        _ => {}
    }
}

/// Dot products of queries `qi..qi + H` with keys `t0..t0 + T`.
#[target_feature(enable = "avx2,fma,f16c")]
fn score_tile<const H: usize, const T: usize>(
    q: &[f32],
    kw: usize,
    rows: Rows,
    key_offset: usize,
    s: &mut [f32],
    qi: usize,
    t0: usize,
) {
    let keys = &rows.data[t0 * rows.width..(t0 + T) * rows.width];
    let q = &q[qi * kw..(qi + H) * kw];
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    for d in (0..kw).step_by(8) {
        let mut k = [_mm256_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: key_offset + kw <= width (checked by `scores`) and d + 8 <= kw.
            k[t] = unsafe { _mm256_loadu_ps(keys.as_ptr().add(t * rows.width + key_offset + d)) };
        }
        for h in 0..H {
            // SAFETY: h * kw + d + 8 <= H * kw = q.len().
            let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(h * kw + d)) };
            for t in 0..T {
                acc[h][t] = _mm256_fmadd_ps(qv, k[t], acc[h][t]);
            }
        }
    }
    for h in 0..H {
        for t in 0..T {
            s[(qi + h) * BLOCK + t0 + t] = hsum(acc[h][t]);
        }
    }
}

/// One online-softmax step per query over its first `valid[q]` scores (the rest become weight 0).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn softmax(
    s: &mut [f32],
    valid: &[usize],
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) {
    for (q, row) in s.chunks_exact_mut(BLOCK).take(valid.len()).enumerate() {
        if valid[q] == 0 {
            row.fill(0.0);
            alpha[q] = 1.0;
            continue;
        }
        row[valid[q]..].fill(f32::NEG_INFINITY);
        let mut m = _mm256_set1_ps(max[q]);
        for x in row.chunks_exact(8) {
            // SAFETY: chunks of exactly 8.
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(x.as_ptr()) });
        }
        let new_max = hmax(m);
        alpha[q] = (max[q] - new_max).exp();
        let m = _mm256_set1_ps(new_max);
        let mut total = _mm256_setzero_ps();
        for x in row.chunks_exact_mut(8) {
            // SAFETY: chunks of exactly 8.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr());
                let seen = _mm256_cmp_ps::<_CMP_NEQ_OQ>(v, _mm256_set1_ps(f32::NEG_INFINITY));
                let p = _mm256_and_ps(exp(_mm256_sub_ps(v, m)), seen);
                total = _mm256_add_ps(total, p);
                _mm256_storeu_ps(x.as_mut_ptr(), p);
            }
        }
        sum[q] = sum[q] * alpha[q] + hsum(total);
        max[q] = new_max;
    }
}

/// `acc[q] = alpha[q] * acc[q] + sum_t w[q, t] * rows[t][value_offset..][..vw]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn accumulate(
    w: &[f32],
    alpha: &[f32],
    rows: Rows,
    value_offset: usize,
    acc: &mut [f32],
) {
    let nq = alpha.len();
    let vw = acc.len() / nq;
    assert!(vw.is_multiple_of(8) && value_offset + vw <= rows.width);
    assert!(acc.len() == nq * vw && w.len() >= nq * BLOCK && rows.count() <= BLOCK);
    let mut d = 0;
    while d + 48 <= vw {
        value_columns::<6>(w, alpha, rows, value_offset, acc, d);
        d += 48;
    }
    match (vw - d) / 8 {
        5 => value_columns::<5>(w, alpha, rows, value_offset, acc, d),
        4 => value_columns::<4>(w, alpha, rows, value_offset, acc, d),
        3 => value_columns::<3>(w, alpha, rows, value_offset, acc, d),
        2 => value_columns::<2>(w, alpha, rows, value_offset, acc, d),
        1 => value_columns::<1>(w, alpha, rows, value_offset, acc, d),
        _ => {}
    }
}

/// Output values `d0..d0 + 8 * V` of every query, two queries at a time (the block's slice of these
/// values stays in L1 across them).
#[target_feature(enable = "avx2,fma,f16c")]
fn value_columns<const V: usize>(
    w: &[f32],
    alpha: &[f32],
    rows: Rows,
    value_offset: usize,
    acc: &mut [f32],
    d0: usize,
) {
    let nq = alpha.len();
    let mut qi = 0;
    while qi + 2 <= nq {
        value_tile::<2, V>(w, alpha, rows, value_offset, acc, qi, d0);
        qi += 2;
    }
    if qi < nq {
        value_tile::<1, V>(w, alpha, rows, value_offset, acc, qi, d0);
    }
}

/// Output values `d0..d0 + 8 * V` of queries `qi..qi + H`, rescaled by alpha and summed over the block.
#[target_feature(enable = "avx2,fma,f16c")]
fn value_tile<const H: usize, const V: usize>(
    w: &[f32],
    alpha: &[f32],
    rows: Rows,
    value_offset: usize,
    acc: &mut [f32],
    qi: usize,
    d0: usize,
) {
    let vw = acc.len() / alpha.len();
    let out = acc[qi * vw..(qi + H) * vw].as_mut_ptr();
    let w = &w[qi * BLOCK..(qi + H) * BLOCK];
    let mut tile = [[_mm256_setzero_ps(); V]; H];
    for h in 0..H {
        let a = _mm256_set1_ps(alpha[qi + h]);
        for v in 0..V {
            // SAFETY: d0 + 8 * V <= vw, so the vector lies in query h's row of `acc`.
            tile[h][v] = _mm256_mul_ps(a, unsafe { _mm256_loadu_ps(out.add(h * vw + d0 + 8 * v)) });
        }
    }
    for t in 0..rows.count() {
        // SAFETY: t < count and value_offset + vw <= width (checked by `accumulate`).
        let row = unsafe { rows.data.as_ptr().add(t * rows.width + value_offset + d0) };
        let mut p = [_mm256_setzero_ps(); H];
        for h in 0..H {
            p[h] = _mm256_set1_ps(w[h * BLOCK + t]);
        }
        // one value vector at a time: H * V accumulators + H weights + 1 value fit in 16 registers
        for v in 0..V {
            // SAFETY: d0 + 8 * V <= vw.
            let x = unsafe { _mm256_loadu_ps(row.add(8 * v)) };
            for h in 0..H {
                tile[h][v] = _mm256_fmadd_ps(p[h], x, tile[h][v]);
            }
        }
    }
    for h in 0..H {
        for v in 0..V {
            // SAFETY: as for the loads above.
            unsafe { _mm256_storeu_ps(out.add(h * vw + d0 + 8 * v), tile[h][v]) };
        }
    }
}

/// e^x to about 2 ulp (Cephes `expf`), for x <= 88; below -87 (and for -inf) it flushes to a tiny
/// value, so callers mask what must be exactly 0.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    // x - n ln 2, with ln 2 split in two so the first product is exact
    let x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(x, x),
        _mm256_add_ps(x, _mm256_set1_ps(1.0)),
    );
    let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}
