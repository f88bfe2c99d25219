//! DeepSeek's FP8 weights (e4m3 bytes, one f32 scale per block of 128 x 128 weights), read in place and
//! decoded to f32 as the reference dequantization does: `f32(e4m3) * scale`, one rounding.
//!
//! e4m3 to f32 without a table or a conversion instruction: with the byte at the top of a 32-bit lane,
//! an arithmetic shift right by four puts its exponent at the bottom of f32's exponent field and its
//! mantissa at the top of f32's mantissa, and copies the sign into the four bits between, which a mask
//! clears. The lane is then an f32 of exactly 2^-120 times the e4m3 value, normals and subnormals alike
//! (the latter become f32 subnormals, still exact). Multiplying by 2^120 (exact) and then by the block
//! scale rounds once, as `f32(e4m3) * scale` does. e4m3 has no infinities and two NaN codes (0x7F, 0xFF),
//! which DeepSeek's quantizer never writes (it saturates at +-448): they decode as +-480, the value the
//! same bits would have if they were a number. The row-by-row product (a few tokens, memory-bound) sums
//! each block's products in the 2^-120 domain and scales the sums once per block.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::Arc;

#[cfg(target_arch = "x86_64")]
use super::avx2::{PREFETCH_DISTANCE, hsum};

/// The scales of an FP8 matrix: one f32 per block of `block` = (rows, cols) weights, row-major over
/// the grid of blocks (partial blocks at the right and bottom edges, as DeepSeek's checkpoints have).
#[derive(Clone, Debug)]
pub(super) struct BlockScales {
    values: Arc<[f32]>,
    block: [usize; 2],
    /// Blocks per row of the grid.
    per_row: usize,
    /// Matrix row of this matrix's first row (a row slice keeps its parent's grid).
    first_row: usize,
}

impl BlockScales {
    /// Blocks in the grid of a (`rows`, `cols`) matrix, partial ones included; `None` for an empty
    /// block shape or a count past `usize`.
    pub(super) fn count(block: [usize; 2], rows: usize, cols: usize) -> Option<usize> {
        if block[0] == 0 || block[1] == 0 {
            return None;
        }
        rows.div_ceil(block[0]).checked_mul(cols.div_ceil(block[1]))
    }

    /// `values` (one per block, row-major) for a (`rows`, `cols`) matrix; `None` unless the grid has
    /// exactly that many blocks.
    pub(super) fn new(
        values: Vec<f32>,
        block: [usize; 2],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        (Self::count(block, rows, cols) == Some(values.len())).then(|| Self {
            values: values.into(),
            block,
            per_row: cols.div_ceil(block[1]),
            first_row: 0,
        })
    }

    /// The scales of rows from `start` on (a row slice).
    pub(super) fn rows_from(&self, start: usize) -> Self {
        Self {
            first_row: self.first_row + start,
            ..self.clone()
        }
    }

    /// The scales of row `row`, one per block of columns.
    pub(super) fn row(&self, row: usize) -> &[f32] {
        let grid_row = (self.first_row + row) / self.block[0];
        &self.values[grid_row * self.per_row..][..self.per_row]
    }

    /// Columns per block.
    pub(super) fn block_cols(&self) -> usize {
        self.block[1]
    }
}

/// 2^120, the factor between [`tiny`] and the e4m3 value.
const TWO_POW_120: f32 = f32::from_bits((127 + 120) << 23);

/// The f32 bits of 2^-120 times the value of the e4m3 byte at the top of `lane` (bits 24..32).
fn tiny_bits(lane: u32) -> u32 {
    ((lane as i32) >> 4) as u32 & 0x87FF_FFFF
}

/// 2^-120 times the value of e4m3 byte `byte` (exact, an f32 subnormal for the e4m3 subnormals).
fn tiny(byte: u8) -> f32 {
    f32::from_bits(tiny_bits(u32::from(byte) << 24))
}

/// The value of e4m3 byte `byte` (the NaN codes as +-480, see the module's notes).
pub(super) fn value(byte: u8) -> f32 {
    tiny(byte) * TWO_POW_120
}

/// `out[i] = value(row[i]) * scales[(col0 + i) / block_cols]`: columns `col0..` of one row.
pub(super) fn decode_scalar(
    row: &[u8],
    scales: &[f32],
    block_cols: usize,
    col0: usize,
    out: &mut [f32],
) {
    for (i, (o, &b)) in out.iter_mut().zip(row).enumerate() {
        *o = value(b) * scales[(col0 + i) / block_cols];
    }
}

/// The scalar reference: `row` (all columns of one row) dot `x`, summed in order.
pub(super) fn dot_scalar(row: &[u8], scales: &[f32], block_cols: usize, x: &[f32]) -> f32 {
    assert_eq!(row.len(), x.len(), "row and activations of one length");
    row.iter()
        .zip(x)
        .enumerate()
        .fold(0f32, |sum, (i, (&b, &x))| {
            (value(b) * scales[i / block_cols]).mul_add(x, sum)
        })
}

/// `_mm256_shuffle_epi8` controls that put bytes `first..first + 4` of the low 128-bit lane and
/// `first + 4..first + 8` of the high one at the tops of the eight 32-bit lanes, zeroing the rest.
#[cfg(target_arch = "x86_64")]
const fn top_bytes(first: i8) -> [i8; 32] {
    let mut control = [-1i8; 32];
    let mut k = 0;
    while k < 8 {
        control[16 * (k / 4) + 4 * (k % 4) + 3] = first + k as i8;
        k += 1;
    }
    control
}

/// The shuffle picking bytes 0..8 of a 16-byte group broadcast to both lanes.
#[cfg(target_arch = "x86_64")]
const LOW_EIGHT: [i8; 32] = top_bytes(0);
/// The shuffle picking bytes 8..16 of a 16-byte group broadcast to both lanes.
#[cfg(target_arch = "x86_64")]
const HIGH_EIGHT: [i8; 32] = top_bytes(8);

/// Lanes holding e4m3 bytes at their tops as the f32s of 2^-120 times their values (see
/// [`tiny_bits`]).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tiny_lanes(lanes: __m256i) -> __m256 {
    let mask = _mm256_set1_epi32(0x87FF_FFFFu32 as i32);
    _mm256_castsi256_ps(_mm256_and_si256(_mm256_srai_epi32::<4>(lanes), mask))
}

/// Sixteen e4m3 bytes at `p` as two vectors of eight f32, 2^-120 times their values, in order.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p..p + 16` must be readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode16(p: *const u8) -> [__m256; 2] {
    // SAFETY: the caller guarantees sixteen readable bytes.
    let bytes = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    [LOW_EIGHT, HIGH_EIGHT].map(|control| {
        // SAFETY: a 32-byte array is read as a vector.
        let control = unsafe { _mm256_loadu_si256(control.as_ptr().cast()) };
        tiny_lanes(_mm256_shuffle_epi8(bytes, control))
    })
}

/// Eight e4m3 bytes at `p` as f32, 2^-120 times their values.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `p..p + 8` must be readable.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode8(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees eight readable bytes; a 32-byte array is read as a vector.
    unsafe {
        let bytes = _mm256_broadcastsi128_si256(_mm_loadl_epi64(p.cast()));
        let control = _mm256_loadu_si256(LOW_EIGHT.as_ptr().cast());
        tiny_lanes(_mm256_shuffle_epi8(bytes, control))
    }
}

/// What takes a vector from the 2^-120 domain of [`tiny_lanes`] to weights (or sums) times a block's
/// scale: one multiply by 2^120 x scale, which is exact when finite and then rounds the product
/// once exactly as 2^120 and the scale in turn would; two multiplies for a scale of 2^8 or more.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Factors {
    /// 2^120 x scale, or 2^120 when that overflows.
    first: __m256,
    /// The scale when `first` is 2^120 alone.
    second: Option<__m256>,
}

#[cfg(target_arch = "x86_64")]
impl Factors {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(scale: f32) -> Self {
        let combined = scale * TWO_POW_120;
        if combined.is_finite() {
            Self {
                first: _mm256_set1_ps(combined),
                second: None,
            }
        } else {
            Self {
                first: _mm256_set1_ps(TWO_POW_120),
                second: Some(_mm256_set1_ps(scale)),
            }
        }
    }

    /// `v` times 2^120 times the scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn apply(self, v: __m256) -> __m256 {
        match self.second {
            None => _mm256_mul_ps(v, self.first),
            Some(scale) => _mm256_mul_ps(_mm256_mul_ps(v, self.first), scale),
        }
    }

    /// `acc` plus `v` times 2^120 times the scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn apply_add(self, v: __m256, acc: __m256) -> __m256 {
        match self.second {
            None => _mm256_fmadd_ps(v, self.first, acc),
            Some(scale) => _mm256_fmadd_ps(_mm256_mul_ps(v, self.first), scale, acc),
        }
    }
}

/// The pieces of columns `col0..col0 + n` in blocks of `block_cols`: (block index, start, end), start
/// and end relative to `col0`. One division per call: a division per block costs as much as
/// decoding a block's first 32 weights.
#[cfg(target_arch = "x86_64")]
fn segments(
    col0: usize,
    n: usize,
    block_cols: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let first = col0 / block_cols;
    (first..).map_while(move |b| {
        let start = (b * block_cols).max(col0) - col0;
        (start < n).then(|| (b, start, ((b + 1) * block_cols - col0).min(n)))
    })
}

/// [`decode_scalar`] with AVX2, the same bits: 16 and 8 weights at a time within each block of
/// columns, each vector times 2^120, then the block's scale.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode(
    row: &[u8],
    scales: &[f32],
    block_cols: usize,
    col0: usize,
    out: &mut [f32],
) {
    let n = out.len();
    assert!(row.len() >= n && scales.len() * block_cols >= col0 + n);
    let (p, o) = (row.as_ptr(), out.as_mut_ptr());
    for (b, mut i, end) in segments(col0, n, block_cols) {
        let scale = scales[b];
        let factors = Factors::new(scale);
        let weights = |tiny: __m256| factors.apply(tiny);
        while i + 16 <= end {
            // SAFETY: i + 16 <= n <= row.len() and <= out.len().
            unsafe {
                let [a, b] = decode16(p.add(i));
                _mm256_storeu_ps(o.add(i), weights(a));
                _mm256_storeu_ps(o.add(i + 8), weights(b));
            }
            i += 16;
        }
        while i + 8 <= end {
            // SAFETY: i + 8 <= n.
            unsafe { _mm256_storeu_ps(o.add(i), weights(decode8(p.add(i)))) };
            i += 8;
        }
        while i < end {
            out[i] = value(row[i]) * scale;
            i += 1;
        }
    }
}

/// `row` (all columns of one row) dot each of `xs`, the weights decoded in registers, two tokens per
/// pass (see [`dot_pass`]): a token's result does not depend on the others.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot<const T: usize>(
    row: &[u8],
    scales: &[f32],
    block_cols: usize,
    xs: &[&[f32]; T],
) -> [f32; T] {
    let mut dots = [0f32; T];
    for (xs, dots) in xs.chunks(2).zip(dots.chunks_mut(2)) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            match *xs {
                [a, b] => dots.copy_from_slice(&dot_pass(row, scales, block_cols, &[a, b])),
                [a] => dots.copy_from_slice(&dot_pass(row, scales, block_cols, &[a])),
                _ => unreachable!("chunks of at most two"),
            }
        }
    }
    dots
}

/// [`dot`] for one or two tokens. Within a block of columns the products of the unscaled weights
/// (2^-120 times their values) go into four chains of block sums (vector k of the block into chain
/// k mod 4: one token alone keeps four FMAs in flight), which are then added, multiplied by 2^120
/// and FMA'd times the block's scale into the row's sum (three operations per block instead of one
/// per weight); a block's last values short of eight are added in order to a scalar sum, scaled
/// weight by weight.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_pass<const T: usize>(
    row: &[u8],
    scales: &[f32],
    block_cols: usize,
    xs: &[&[f32]; T],
) -> [f32; T] {
    let cols = row.len();
    assert!(xs.iter().all(|x| x.len() == cols) && scales.len() * block_cols >= cols);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut tail = [0f32; T];
    let p = row.as_ptr();
    for (b, mut i, end) in segments(0, cols, block_cols) {
        let mut chains = [[_mm256_setzero_ps(); T]; 4];
        let mut step = |i: usize, first_chain: usize| {
            // SAFETY: callers pass i + 16 <= cols: 16 weights and 16 values of each x are in bounds.
            let w = unsafe { decode16(p.add(i)) };
            for (j, w) in w.into_iter().enumerate() {
                for t in 0..T {
                    // SAFETY: as above.
                    let x = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(i + 8 * j)) };
                    let chain = &mut chains[first_chain + j][t];
                    *chain = _mm256_fmadd_ps(w, x, *chain);
                }
            }
        };
        while i + 32 <= end {
            if i.is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + PREFETCH_DISTANCE).cast());
            }
            step(i, 0);
            step(i + 16, 2);
            i += 32;
        }
        if i + 16 <= end {
            step(i, 0);
            i += 16;
        }
        if i + 8 <= end {
            // SAFETY: i + 8 <= cols.
            let w = unsafe { decode8(p.add(i)) };
            for t in 0..T {
                // SAFETY: as above.
                let x = unsafe { _mm256_loadu_ps(xs[t].as_ptr().add(i)) };
                chains[0][t] = _mm256_fmadd_ps(w, x, chains[0][t]);
            }
            i += 8;
        }
        let factors = Factors::new(scales[b]);
        for t in 0..T {
            let sum = _mm256_add_ps(
                _mm256_add_ps(chains[0][t], chains[1][t]),
                _mm256_add_ps(chains[2][t], chains[3][t]),
            );
            acc[t] = factors.apply_add(sum, acc[t]);
        }
        while i < end {
            let w = value(row[i]) * scales[b];
            for (t, tail) in tail.iter_mut().enumerate() {
                *tail = w.mul_add(xs[t][i], *tail);
            }
            i += 1;
        }
    }
    // A loop, not a closure: a closure borrowing the accumulators would keep them in memory.
    let mut dots = [0f32; T];
    for (t, dot) in dots.iter_mut().enumerate() {
        *dot = hsum(acc[t]) + tail[t];
    }
    dots
}
