//! The block steps of the attention kernel in portable Rust: the reference the SIMD versions are
//! tested against, and the fallback for CPUs and layouts they do not cover.

use super::{BLOCK, RowPool, Rows};

/// Rows of `slots` as f32 into `out` (slots.len(), width).
pub(super) fn convert(pool: &RowPool, slots: &[usize], out: &mut [f32]) {
    for (&slot, row) in slots.iter().zip(out.chunks_exact_mut(pool.width())) {
        pool.read_unchecked(slot, row);
    }
}

/// `s[q, t] = dot(q[q], rows[t][key_offset..][..kw])`; q is (queries, kw), s is (queries, BLOCK).
pub(super) fn scores(q: &[f32], kw: usize, rows: Rows, key_offset: usize, s: &mut [f32]) {
    for (query, s) in q.chunks_exact(kw).zip(s.chunks_exact_mut(BLOCK)) {
        for (row, s) in rows.data.chunks_exact(rows.width).zip(s.iter_mut()) {
            let key = &row[key_offset..][..kw];
            *s = query.iter().zip(key).map(|(a, b)| a * b).sum();
        }
    }
}

/// One online-softmax step per query over its first `valid[q]` scores (the rest become weight 0).
pub(super) fn softmax(
    s: &mut [f32],
    valid: &[usize],
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) {
    for (q, row) in s.chunks_exact_mut(BLOCK).take(valid.len()).enumerate() {
        let (seen, masked) = row.split_at_mut(valid[q]);
        masked.fill(0.0);
        if seen.is_empty() {
            alpha[q] = 1.0;
            continue;
        }
        let new_max = seen.iter().copied().fold(max[q], f32::max);
        alpha[q] = (max[q] - new_max).exp();
        let mut block_sum = 0.0;
        for x in seen {
            *x = (*x - new_max).exp();
            block_sum += *x;
        }
        sum[q] = sum[q] * alpha[q] + block_sum;
        max[q] = new_max;
    }
}

/// `acc[q] = alpha[q] * acc[q] + sum_t w[q, t] * rows[t][value_offset..][..vw]`.
pub(super) fn accumulate(
    w: &[f32],
    alpha: &[f32],
    rows: Rows,
    value_offset: usize,
    acc: &mut [f32],
) {
    let vw = acc.len() / alpha.len();
    for ((acc, w), &a) in acc
        .chunks_exact_mut(vw)
        .zip(w.chunks_exact(BLOCK))
        .zip(alpha)
    {
        for x in acc.iter_mut() {
            *x *= a;
        }
        for (row, &w) in rows.data.chunks_exact(rows.width).zip(w) {
            for (x, v) in acc.iter_mut().zip(&row[value_offset..][..vw]) {
                *x += w * v;
            }
        }
    }
}
