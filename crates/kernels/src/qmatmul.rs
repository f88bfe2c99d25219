//! Quantized matrix products: f32 activations times weights in llama.cpp's block formats.
//!
//! As llama.cpp's CPU backend does (`ggml_compute_forward_mul_mat` with `vec_dot_type`), the
//! activations are quantized once per call to 8 bits (Q8_0 for Q4_0/Q8_0 weights, Q8_K for the
//! K-quants, see `qmatmul/activations.rs`) and every output is a sum of integer block dot products times the
//! block scales, so results match llama.cpp's up to float summation order.
//!
//! Work is split over rayon's global pool by tiles of weight rows. Inside a tile, tokens go in groups
//! of up to four through one row at a time, so each weight row is read from memory once per call
//! (decode is memory-bound: the matrix is streamed exactly once whatever the number of tokens) and,
//! in a prefill, a tile small enough for L2 is reused by every token group while each weight block is
//! unpacked once for four tokens.

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;
use tiefsee_gguf::GgmlType;

use crate::KernelError;
use crate::cpu::{self, Isa};
use activations::{ActFormat, Activations, Token};

/// Bytes of one weight matrix, shared and never copied: a range of a memory map or of an owned buffer.
#[derive(Clone)]
pub struct WeightBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl WeightBytes {
    /// The bytes `range` of `owner` (a memory map, a `Vec<u8>`, ...); errors if the range is out of bounds.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
    ) -> Result<Self, KernelError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(KernelError::RangeOutOfBounds {
                start: range.start,
                end: range.end,
                len,
            });
        }
        Ok(Self { owner, range })
    }

    /// All of `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            owner: Arc::new(bytes),
            range,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    /// The sub-range `range` of these bytes (relative to their start), sharing the owner.
    fn sub(&self, range: Range<usize>) -> Self {
        Self {
            owner: Arc::clone(&self.owner),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({:?})", self.range)
    }
}

/// The weight formats with kernels: the subset of [`GgmlType`] a [`QMatrix`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    fn of(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 => Some(Format::Q4_0),
            GgmlType::Q4_1 => Some(Format::Q4_1),
            GgmlType::Q5_0 => Some(Format::Q5_0),
            GgmlType::Q5_1 => Some(Format::Q5_1),
            GgmlType::Q8_0 => Some(Format::Q8_0),
            GgmlType::Q4_K => Some(Format::Q4K),
            GgmlType::Q5_K => Some(Format::Q5K),
            GgmlType::Q6_K => Some(Format::Q6K),
            _ => None,
        }
    }

    /// Most tokens one kernel call takes: each weight block is unpacked once for them, so the
    /// K-quants, whose unpacking costs most, take more (as many as the registers hold).
    fn max_group(self) -> usize {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => 4,
            Format::Q4K | Format::Q5K | Format::Q6K => 8,
        }
    }

    /// The activation format its kernels dot against.
    fn activations(self) -> ActFormat {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                ActFormat::Q8_0
            }
            Format::Q4K | Format::Q5K | Format::Q6K => ActFormat::Q8K,
        }
    }
}

/// A (rows, cols) weight matrix in one of llama.cpp's block formats, row-major: each row is
/// cols/block_size whole blocks. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K have kernels.
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: GgmlType,
    format: Format,
    rows: usize,
    cols: usize,
    /// (rows, cols / block_size) blocks
    data: WeightBytes,
}

/// Smallest share of weight bytes worth handing to another thread.
const MIN_TASK_BYTES: usize = 32 * 1024;
/// Multiply-adds below which a prefill is not split by tokens (about 50 us of one core's work).
const MIN_SPLIT_MACS: usize = 4 << 20;
/// Token groups from which a prefill goes over the columns in chunks of [`K_CHUNK`].
const CHUNKED_GROUPS: usize = 4;
/// Columns per pass in a prefill: 8 tokens' quantized activations for them take 16 KiB of L1.
const K_CHUNK: usize = 2048;
/// Largest row tile in a prefill: it should stay in L2 while every token group passes over it.
const MAX_TILE_BYTES: usize = 128 * 1024;

thread_local! {
    /// Quantized activations of the calling thread, kept between calls.
    static SCRATCH: Cell<Activations> = Cell::new(Activations::default());
}

impl QMatrix {
    /// Checks that `ty` has kernels, `cols` is a positive multiple of its block size and `data` holds
    /// exactly `rows` rows.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: WeightBytes,
    ) -> Result<Self, KernelError> {
        let format = Format::of(ty).ok_or(KernelError::UnsupportedType(ty))?;
        let block = ty.block_size();
        if cols == 0 || !cols.is_multiple_of(block) {
            return Err(KernelError::ColsNotWholeBlocks { ty, cols, block });
        }
        let expected = (cols / block)
            .checked_mul(ty.type_size())
            .and_then(|row| row.checked_mul(rows));
        let found = data.as_slice().len();
        if expected != Some(found) {
            return Err(KernelError::DataLength {
                ty,
                rows,
                cols,
                expected: expected.unwrap_or(usize::MAX),
                found,
            });
        }
        Ok(Self {
            ty,
            format,
            rows,
            cols,
            data,
        })
    }

    /// Whether [`QMatrix::new`] accepts weights of type `ty`.
    pub fn supports(ty: GgmlType) -> bool {
        Format::of(ty).is_some()
    }

    /// The weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Number of rows (outputs per token).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs per token).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// All rows' bytes.
    pub fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The rows `start..start + len`, sharing these bytes (for per-head sub-matrices).
    pub fn slice_rows(&self, start: usize, len: usize) -> Result<QMatrix, KernelError> {
        let out_of_bounds = KernelError::RowsOutOfBounds {
            start,
            len,
            rows: self.rows,
        };
        let end = start.checked_add(len).ok_or(out_of_bounds)?;
        if end > self.rows {
            return Err(KernelError::RowsOutOfBounds {
                start,
                len,
                rows: self.rows,
            });
        }
        let rb = self.row_bytes();
        Ok(QMatrix {
            rows: len,
            data: self.data.sub(start * rb..end * rb),
            ..self.clone()
        })
    }

    /// Decodes row `row` into `out` (for embedding lookups).
    ///
    /// Panics, as slice indexing does, if `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of a {}-row matrix", self.rows);
        assert_eq!(out.len(), self.cols, "output length for one row");
        let rb = self.row_bytes();
        let bytes = &self.data()[row * rb..(row + 1) * rb];
        tiefsee_gguf::dequantize_into(self.ty, bytes, out)
            .expect("QMatrix::new checked that a row is whole blocks");
    }

    /// `out = x W^T`: x is (tokens, cols) row-major f32 and out (tokens, rows), tokens = x.len() / cols.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(cpu::isa(), x, out)
    }

    /// [`QMatrix::matmul`] with kernels for `isa` (or the best the CPU has, if lower).
    fn matmul_with(&self, isa: Isa, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        let isa = isa.min(cpu::detected());
        if !x.len().is_multiple_of(self.cols) {
            return Err(KernelError::InputLength {
                len: x.len(),
                cols: self.cols,
            });
        }
        let tokens = x.len() / self.cols;
        let expected = tokens.checked_mul(self.rows);
        if expected != Some(out.len()) {
            return Err(KernelError::OutputLength {
                tokens,
                rows: self.rows,
                expected: expected.unwrap_or(usize::MAX),
                found: out.len(),
            });
        }
        if tokens == 0 || self.rows == 0 {
            return Ok(());
        }
        // Taken, not borrowed: a nested call (a rayon task run while this one waits) gets a fresh one.
        let mut acts = SCRATCH.take();
        acts.quantize(self.format.activations(), x, self.cols);
        let max_group = self.format.max_group();
        // With many token groups, a prefill goes over the columns in chunks so that one group's
        // activations stay in L1; with few, whole rows keep the weights streaming from memory in order.
        let chunk = if tokens.div_ceil(max_group) >= CHUNKED_GROUPS {
            K_CHUNK.min(self.cols)
        } else {
            self.cols
        };
        let rows_per_task = self.rows_per_task(tokens, chunk);
        let groups_per_task = self.groups_per_task(tokens, rows_per_task);
        let tokens_per_task = groups_per_task * max_group;
        let row_tasks = self.rows.div_ceil(rows_per_task);
        let n_tasks = row_tasks * tokens.div_ceil(tokens_per_task);
        let out = OutPtr(out.as_mut_ptr());
        let task = |task: usize| {
            let (row_task, token_task) = (task % row_tasks, task / row_tasks);
            let rows = row_task * rows_per_task..((row_task + 1) * rows_per_task).min(self.rows);
            let token_end = ((token_task + 1) * tokens_per_task).min(tokens);
            for start in (0..self.cols).step_by(chunk) {
                let cols = start..(start + chunk).min(self.cols);
                for first in (token_task * tokens_per_task..token_end).step_by(max_group) {
                    let part = Part {
                        rows: rows.clone(),
                        cols: cols.clone(),
                        first,
                    };
                    // SAFETY: this task alone writes the outputs of `rows` for its tokens (tasks
                    // split rows and tokens), and `out` has tokens * self.rows values (checked above).
                    unsafe {
                        match max_group.min(token_end - first) {
                            1 => self.tile::<1>(isa, &part, &acts, &out),
                            2 => self.tile::<2>(isa, &part, &acts, &out),
                            3 => self.tile::<3>(isa, &part, &acts, &out),
                            4 => self.tile::<4>(isa, &part, &acts, &out),
                            5 => self.tile::<5>(isa, &part, &acts, &out),
                            6 => self.tile::<6>(isa, &part, &acts, &out),
                            7 => self.tile::<7>(isa, &part, &acts, &out),
                            _ => self.tile::<8>(isa, &part, &acts, &out),
                        }
                    }
                }
            }
        };
        if n_tasks == 1 {
            task(0);
        } else {
            (0..n_tasks).into_par_iter().for_each(task);
        }
        SCRATCH.set(acts);
        Ok(())
    }

    /// Rows per parallel task: a few tasks per thread so two threads finish together, none so small
    /// that scheduling costs more than it computes, and in a prefill tiles whose `chunk` columns stay
    /// in L2 while every token group passes over them.
    fn rows_per_task(&self, tokens: usize, chunk: usize) -> usize {
        let total = self.rows * self.row_bytes();
        let rows =
            (total / (4 * rayon::current_num_threads())).max(MIN_TASK_BYTES) / self.row_bytes();
        let rows = if tokens > self.format.max_group() {
            let chunk_bytes = self.ty.bytes_for(chunk).unwrap_or(self.row_bytes());
            rows.min(MAX_TILE_BYTES / chunk_bytes)
        } else {
            rows
        };
        rows.clamp(1, self.rows)
    }

    /// Token groups per parallel task: all of them, unless the rows alone make too few tasks for a
    /// prefill big enough to share (a small matrix, such as one head's slice, times many tokens).
    fn groups_per_task(&self, tokens: usize, rows_per_task: usize) -> usize {
        let groups = tokens.div_ceil(self.format.max_group());
        let row_tasks = self.rows.div_ceil(rows_per_task);
        let wanted = 4 * rayon::current_num_threads();
        let macs = (self.rows * self.cols).saturating_mul(tokens);
        if row_tasks >= wanted || macs < MIN_SPLIT_MACS {
            return groups;
        }
        groups.div_ceil(wanted.div_ceil(row_tasks).min(groups))
    }

    /// Outputs of tokens `part.first..part.first + T` for weight rows `part.rows`, summed over columns
    /// `part.cols` (and added to what earlier columns left there).
    ///
    /// # Safety
    /// No other thread may write these outputs meanwhile; `out` must hold tokens x self.rows values.
    unsafe fn tile<const T: usize>(&self, isa: Isa, part: &Part, acts: &Activations, out: &OutPtr) {
        let first = part.first;
        let toks: [Token; T] = std::array::from_fn(|k| acts.token(first + k, part.cols.clone()));
        let rb = self.row_bytes();
        let bytes = |c: usize| c / self.ty.block_size() * self.ty.type_size();
        let (start, end) = (bytes(part.cols.start), bytes(part.cols.end));
        let data = self.data();
        let accumulate = part.cols.start > 0;
        let each_row = |dot: &dyn Fn(&[u8]) -> [f32; T]| {
            for r in part.rows.clone() {
                for (k, v) in dot(&data[r * rb + start..r * rb + end])
                    .into_iter()
                    .enumerate()
                {
                    // SAFETY: (first + k, r) is in bounds and ours alone (caller).
                    unsafe { out.store((first + k) * self.rows + r, v, accumulate) };
                }
            }
        };
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 {
            // SAFETY (all arms): isa is Avx2 only when cpu::detected() found AVX2, FMA and F16C.
            match self.format {
                Format::Q4_0 => each_row(&|row| unsafe { avx2::dot_q4_0(row, &toks) }),
                Format::Q4_1 => each_row(&|row| unsafe { avx2::dot_q4_1(row, &toks) }),
                Format::Q5_0 => each_row(&|row| unsafe { avx2::dot_q5_0(row, &toks) }),
                Format::Q5_1 => each_row(&|row| unsafe { avx2::dot_q5_1(row, &toks) }),
                Format::Q8_0 => each_row(&|row| unsafe { avx2::dot_q8_0(row, &toks) }),
                Format::Q4K => each_row(&|row| unsafe { avx2::dot_q4_k(row, &toks) }),
                Format::Q5K => each_row(&|row| unsafe { avx2::dot_q5_k(row, &toks) }),
                Format::Q6K => each_row(&|row| unsafe { avx2::dot_q6_k(row, &toks) }),
            }
            return;
        }
        let dot: fn(&[u8], &Token) -> f32 = match self.format {
            Format::Q4_0 => scalar::dot_q4_0,
            Format::Q4_1 => scalar::dot_q4_1,
            Format::Q5_0 => scalar::dot_q5_0,
            Format::Q5_1 => scalar::dot_q5_1,
            Format::Q8_0 => scalar::dot_q8_0,
            Format::Q4K => scalar::dot_q4_k,
            Format::Q5K => scalar::dot_q5_k,
            Format::Q6K => scalar::dot_q6_k,
        };
        each_row(&|row| std::array::from_fn(|k| dot(row, &toks[k])));
    }
}

/// The output buffer, written by several tasks at disjoint indices.
struct OutPtr(*mut f32);

// SAFETY: tasks write disjoint indices (each owns a range of rows), and the buffer outlives them.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `v` at `index`, or adds it to what is there if `accumulate`.
    ///
    /// # Safety
    /// `index` must be in bounds and written by no other thread meanwhile.
    unsafe fn store(&self, index: usize, v: f32, accumulate: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            let p = self.0.add(index);
            *p = if accumulate { *p + v } else { v };
        }
    }
}

/// One piece of a task's work: weight rows `rows` over columns `cols` for the token group from `first`.
struct Part {
    rows: Range<usize>,
    cols: Range<usize>,
    first: usize,
}
