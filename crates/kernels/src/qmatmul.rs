//! Matrix products of f32 activations with weights as stored: llama.cpp's block formats, or floats
//! (f32, f16, bf16) as GGUF and safetensors files hold them.
//!
//! As llama.cpp's CPU backend does (`ggml_compute_forward_mul_mat` with `vec_dot_type`), the
//! activations are quantized once per call to 8 bits (Q8_0 for Q4_0/Q8_0 weights, Q8_K for the
//! K-quants, see `qmatmul/activations.rs`) and every output is a sum of integer block dot products times the
//! block scales, so results match llama.cpp's up to float summation order.
//!
//! One departure, for speed: from 32 tokens on (`F32_MIN_TOKENS`), the legacy formats (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0) are decoded to f32 and multiplied by the f32 activations themselves: up to 255 tokens
//! by `qmatmul/f32_tiles.rs`' register kernel, from 256 on (`GEMM_MIN_TOKENS`) by `gemm`'s f32 kernel
//! over a decoded tile of rows. Their AVX2 byte products take about six instructions per 32
//! multiply-adds (the sign trick, two integer multiplies, convert, scale, FMA), f32 FMAs four, and
//! decoding is paid once for all tokens. The result is then the exact product up to f32 rounding,
//! not the 8-bit-activation one.
//!
//! Float weights always multiply the f32 activations: f32 row by row for a few tokens
//! (`qmatmul/float_rows.rs`), through the same f32 kernels from `FLOAT_TILES_MIN_TOKENS` on. So do
//! DeepSeek's FP8 weights (`qmatmul/fp8.rs`: one byte per weight and a scale per 128 x 128 block),
//! decoded exactly as the reference dequantizes them. bf16 and f16 weights, the dtypes of most Hugging
//! Face checkpoints and of GGUF's float files, are copied into panels of sixteen rows when the matrix
//! is made (`qmatmul/panels.rs`), which one register kernel multiplies from 1 to 255 tokens with no
//! decoding pass; `gemm` from 256.
//!
//! Work is split over rayon's global pool by tiles of weight rows. Inside a tile, tokens go in groups
//! of up to four through one row at a time, so each weight row is read from memory once per call
//! (decode is memory-bound: the matrix is streamed exactly once whatever the number of tokens) and,
//! in a prefill, a tile small enough for L2 is reused by every token group while each weight block is
//! unpacked once for four tokens.

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod f32_tiles;
mod float_rows;
mod fp8;
mod panels;
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
use fp8::BlockScales;

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

    /// All of `owner`'s bytes.
    fn from_owner(owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Self {
        let range = 0..(*owner).as_ref().len();
        Self { owner, range }
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

/// The weight formats with kernels: the subset of [`GgmlType`] a [`QMatrix`] accepts, and DeepSeek's
/// block-scaled FP8.
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
    F32,
    F16,
    BF16,
    /// e4m3 bytes with f32 scales per block of weights ([`BlockScales`]), multiplied as floats.
    F8E4M3,
}

/// The ways of the f32 path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum F32Path {
    /// Float weights times a few tokens, row by row (`float_rows`).
    Rows,
    /// `f32_tiles`' register kernel over the activations transposed once per batch.
    Tiles,
    /// `gemm`'s f32 kernel over a decoded tile of rows.
    Gemm,
    /// bf16 or f16 panels times up to 255 tokens (`panels`).
    Panels,
}

impl Format {
    /// The scalar reference dot product of one weight row with one token's activations.
    fn scalar_dot(self) -> fn(&[u8], &Token) -> f32 {
        match self {
            Format::Q4_0 => scalar::dot_q4_0,
            Format::Q4_1 => scalar::dot_q4_1,
            Format::Q5_0 => scalar::dot_q5_0,
            Format::Q5_1 => scalar::dot_q5_1,
            Format::Q8_0 => scalar::dot_q8_0,
            Format::Q4K => scalar::dot_q4_k,
            Format::Q5K => scalar::dot_q5_k,
            Format::Q6K => scalar::dot_q6_k,
            Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3 => {
                unreachable!("float formats multiply f32 activations")
            }
        }
    }

    /// The GGUF type of this format (FP8 has none).
    fn ty(self) -> Option<GgmlType> {
        Some(match self {
            Format::Q4_0 => GgmlType::Q4_0,
            Format::Q4_1 => GgmlType::Q4_1,
            Format::Q5_0 => GgmlType::Q5_0,
            Format::Q5_1 => GgmlType::Q5_1,
            Format::Q8_0 => GgmlType::Q8_0,
            Format::Q4K => GgmlType::Q4_K,
            Format::Q5K => GgmlType::Q5_K,
            Format::Q6K => GgmlType::Q6_K,
            Format::F32 => GgmlType::F32,
            Format::F16 => GgmlType::F16,
            Format::BF16 => GgmlType::BF16,
            Format::F8E4M3 => return None,
        })
    }

    /// Whether a matrix keeps its weights in `panels` (bf16 and f16) rather than row-major.
    fn in_panels(self) -> bool {
        matches!(self, Format::BF16 | Format::F16)
    }

    /// Whether the weights multiply the f32 activations as floats (f32, f16, bf16, FP8) rather than
    /// as blocks of integers.
    fn is_float(self) -> bool {
        matches!(
            self,
            Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3
        )
    }

    /// Bytes of `values` weights, a multiple of the block size.
    fn bytes_for(self, values: usize) -> usize {
        match self {
            Format::F8E4M3 => values,
            Format::F32 | Format::F16 | Format::BF16 => values * float_rows::weight_bytes(self),
            Format::Q4K | Format::Q5K | Format::Q6K => values / 256 * self.block_bytes(),
            _ => values / 32 * self.block_bytes(),
        }
    }

    /// Bytes of one block of 32 values (legacy formats), 256 (K-quants) or one (floats).
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
            Format::F32 | Format::F16 | Format::BF16 => float_rows::weight_bytes(self),
            Format::F8E4M3 => 1,
        }
    }

    /// Every format with a GGUF type, in the order of the enum.
    const GGML: [Format; 11] = [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
        Format::F32,
        Format::F16,
        Format::BF16,
    ];

    fn of(ty: GgmlType) -> Option<Self> {
        Self::GGML.into_iter().find(|f| f.ty() == Some(ty))
    }

    /// Most tokens one kernel call takes: each weight block is unpacked once for them, so the
    /// K-quants, whose unpacking costs most, take more (as many as the registers hold).
    fn max_group(self) -> usize {
        match self {
            Format::Q4_0
            | Format::Q4_1
            | Format::Q5_0
            | Format::Q5_1
            | Format::Q8_0
            | Format::F32
            | Format::F16
            | Format::BF16
            | Format::F8E4M3 => 4,
            Format::Q4K | Format::Q5K | Format::Q6K => 8,
        }
    }

    /// How a product over `tokens` on `isa` goes through f32, if it does (see [`F32_MIN_TOKENS`]): the
    /// float formats always (bf16 and f16 through their panels below [`GEMM_MIN_TOKENS`] and on the
    /// scalar reference; f32 and FP8 row by row below [`FLOAT_TILES_MIN_TOKENS`] and on the scalar
    /// reference), the legacy formats, whose byte products cost most, for several tokens on SIMD
    /// machines (the scalar reference keeps their integer path everywhere, for the tests that hold
    /// SIMD to it).
    fn f32_path(self, isa: Isa, tokens: usize) -> Option<F32Path> {
        let legacy = matches!(
            self,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0
        );
        let simd = isa > Isa::Scalar;
        if self.in_panels() {
            return Some(if simd && tokens >= GEMM_MIN_TOKENS {
                F32Path::Gemm
            } else {
                F32Path::Panels
            });
        }
        match (self.is_float(), legacy && simd) {
            (true, _) if !simd || tokens < FLOAT_TILES_MIN_TOKENS => Some(F32Path::Rows),
            (false, false) => None,
            (false, _) if tokens < F32_MIN_TOKENS => None,
            _ if tokens < GEMM_MIN_TOKENS => Some(F32Path::Tiles),
            _ => Some(F32Path::Gemm),
        }
    }

    /// The activation format its kernels dot against.
    fn activations(self) -> ActFormat {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => {
                ActFormat::Q8_0
            }
            Format::Q4K | Format::Q5K | Format::Q6K => ActFormat::Q8K,
            Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3 => {
                unreachable!("float formats multiply f32 activations")
            }
        }
    }
}

/// A (rows, cols) weight matrix in one of llama.cpp's block formats or a float type, row-major: each
/// row is cols/block_size whole blocks. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F32, F16 and
/// BF16 have kernels, and so has DeepSeek's block-scaled FP8 ([`QMatrix::fp8`]).
#[derive(Clone, Debug)]
pub struct QMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// (rows, cols / block_size) blocks
    data: WeightBytes,
    /// The block scales of an FP8 matrix.
    scales: Option<BlockScales>,
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

/// Tokens from which a product with legacy-format weights (Q4_0 ... Q8_0) goes through f32: weight rows
/// are decoded once and multiplied by all tokens with f32 FMAs, 32 multiply-adds in four instructions
/// where the AVX2 byte products of these formats take six. Below it, decoding costs more than it saves.
const F32_MIN_TOKENS: usize = 32;
/// Tokens from which f32 and FP8 weights go through `f32_tiles`' register kernel rather than
/// row by row: they need little decoding, so the kernel wins as soon as it fills its token vectors.
const FLOAT_TILES_MIN_TOKENS: usize = 10;
/// Tokens from which the f32 path multiplies with `gemm` rather than `f32_tiles`' register kernel:
/// the latter goes over all tokens' activations for every few rows, which stops fitting in L2 about
/// there, while `gemm` packs blocks of both operands for every call.
const GEMM_MIN_TOKENS: usize = 256;
/// Weight rows per task on the f32 path: fixed, so that a product's result does not depend on the
/// batch it runs in, and a multiple of `f32_tiles`' six-row groups.
const F32_TILE_ROWS: usize = 60;
/// Weight rows per task over bf16 or f16 panels: four panels, the most one tile multiplies.
const PANEL_TASK_ROWS: usize = 4 * panels::PANEL;

/// Parallel tasks per thread a batch is cut into, so that two threads finish together.
const TASKS_PER_THREAD: usize = 4;
/// Activation values from which a batch's distinct inputs are quantized in parallel.
const PARALLEL_QUANTIZE_VALUES: usize = 1 << 16;

thread_local! {
    /// Quantized activations of the calling thread, one per distinct input, kept between calls.
    static SCRATCH: Cell<Vec<Activations>> = const { Cell::new(Vec::new()) };
    /// Decoded weight rows of the f32 path, per thread, kept between calls.
    static DECODED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Buffers of the f32 register kernel, per thread, kept between calls.
    #[cfg(target_arch = "x86_64")]
    static F32_TILES: Cell<f32_tiles::Scratch> = Cell::new(f32_tiles::Scratch::default());
    /// Transposed inputs of the f32 register kernel, per calling thread, kept between calls.
    #[cfg(target_arch = "x86_64")]
    static TRANSPOSED: Cell<Vec<f32_tiles::Transposed>> = const { Cell::new(Vec::new()) };
}

impl QMatrix {
    /// Checks that `ty` has kernels, `cols` is a positive multiple of its block size and `data` holds
    /// exactly `rows` rows. bf16 and f16 rows are copied into panels of sixteen (see `qmatmul/panels.rs`);
    /// the other types are read where `data` lies.
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
        let data = if format.in_panels() {
            panels::pack(data.as_slice(), rows, cols)
        } else {
            data
        };
        Ok(Self {
            format,
            rows,
            cols,
            data,
            scales: None,
        })
    }

    /// DeepSeek's FP8 weights: `data` holds (rows, cols) e4m3 bytes, row-major, and `scales` one f32
    /// per `block` (rows, cols) of weights, row-major over the grid of blocks (partial blocks at the
    /// edges); a weight is its e4m3 value times its block's scale (the checkpoint's `weight_scale_inv`).
    /// The two e4m3 NaN codes (0x7F, 0xFF), which DeepSeek's quantizer never writes, read as +-480.
    pub fn fp8(
        rows: usize,
        cols: usize,
        data: WeightBytes,
        scales: Vec<f32>,
        block: [usize; 2],
    ) -> Result<Self, KernelError> {
        let found_scales = scales.len();
        let expected_bytes = rows.checked_mul(cols);
        let grid = BlockScales::new(scales, block, rows, cols);
        let found_bytes = data.as_slice().len();
        match grid {
            Some(scales) if cols > 0 && expected_bytes == Some(found_bytes) => Ok(Self {
                format: Format::F8E4M3,
                rows,
                cols,
                data,
                scales: Some(scales),
            }),
            _ => Err(KernelError::Fp8Shape {
                rows,
                cols,
                block,
                expected_bytes: expected_bytes.unwrap_or(usize::MAX),
                found_bytes,
                expected_scales: BlockScales::count(block, rows, cols).unwrap_or(0),
                found_scales,
            }),
        }
    }

    /// Whether [`QMatrix::new`] accepts weights of type `ty`.
    pub fn supports(ty: GgmlType) -> bool {
        Format::of(ty).is_some()
    }

    /// The weight type (`None` for FP8, which GGUF does not have).
    pub fn ty(&self) -> Option<GgmlType> {
        self.format.ty()
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
        self.format.bytes_for(self.cols)
    }

    /// All rows' bytes as stored: row-major, but for bf16 and f16 in panels of sixteen rows, column-major
    /// inside each panel (the last padded with zero rows).
    pub fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The rows `start..start + len`, sharing these bytes (for per-head sub-matrices); bf16 and f16
    /// rows that do not start a panel are copied.
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
        if let (true, Some(ty)) = (self.format.in_panels(), self.format.ty()) {
            if !start.is_multiple_of(panels::PANEL) {
                let rows = panels::unpack_rows(self.data(), self.cols, start..end);
                return QMatrix::new(ty, len, self.cols, WeightBytes::from_vec(rows));
            }
            let first = start / panels::PANEL * panels::panel_bytes(self.cols);
            return Ok(QMatrix {
                rows: len,
                data: self
                    .data
                    .sub(first..first + panels::bytes_for(len, self.cols)),
                ..self.clone()
            });
        }
        let rb = self.row_bytes();
        Ok(QMatrix {
            rows: len,
            data: self.data.sub(start * rb..end * rb),
            scales: self.scales.as_ref().map(|s| s.rows_from(start)),
            ..self.clone()
        })
    }

    /// Decodes row `row` into `out` (for embedding lookups).
    ///
    /// Panics, as slice indexing does, if `row >= rows` or `out.len() != cols`.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of a {}-row matrix", self.rows);
        assert_eq!(out.len(), self.cols, "output length for one row");
        if self.format.in_panels() {
            return panels::dequantize_row(self.format, self.data(), self.cols, row, out);
        }
        let rb = self.row_bytes();
        let bytes = &self.data()[row * rb..(row + 1) * rb];
        match (&self.scales, self.format.ty()) {
            (Some(scales), _) => {
                fp8::decode_scalar(bytes, scales.row(row), scales.block_cols(), 0, out)
            }
            (None, Some(ty)) => tiefsee_gguf::dequantize_into(ty, bytes, out)
                .expect("QMatrix::new checked that a row is whole blocks"),
            (None, None) => unreachable!("an FP8 matrix has scales"),
        }
    }

    /// `out = x W^T`: x is (tokens, cols) row-major f32 and out (tokens, rows), tokens = x.len() / cols.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
        let tokens = self.tokens(x.len(), out.len())?;
        let job = MatmulJob {
            matrix: self,
            x,
            out,
        };
        run_batch(cpu::isa(), &mut [job], &[tokens]);
        Ok(())
    }

    /// Tokens of an input of `len` values, checked against an output of `out_len` values.
    fn tokens(&self, len: usize, out_len: usize) -> Result<usize, KernelError> {
        if !len.is_multiple_of(self.cols) {
            return Err(KernelError::InputLength {
                len,
                cols: self.cols,
            });
        }
        let tokens = len / self.cols;
        let expected = tokens.checked_mul(self.rows);
        if expected != Some(out_len) {
            return Err(KernelError::OutputLength {
                tokens,
                rows: self.rows,
                expected: expected.unwrap_or(usize::MAX),
                found: out_len,
            });
        }
        Ok(tokens)
    }

    /// Columns per pass: with many token groups, a prefill goes over the columns in chunks so that one
    /// group's activations stay in L1; with few, whole rows keep the weights streaming from memory in order.
    /// Float weights always go whole rows: a token's sum is then the same whatever the batch.
    fn chunk(&self, tokens: usize) -> usize {
        if !self.format.is_float() && tokens.div_ceil(self.format.max_group()) >= CHUNKED_GROUPS {
            K_CHUNK.min(self.cols)
        } else {
            self.cols
        }
    }

    /// Work of a product over `tokens`, in weight bytes streamed: the matrix once per token group.
    fn cost(&self, tokens: usize) -> usize {
        (self.rows * self.row_bytes()).saturating_mul(tokens.div_ceil(self.format.max_group()))
    }

    /// Splits the product over `tokens` into about `cost / target` tasks: tiles of rows no smaller than
    /// [`MIN_TASK_BYTES`] (and, in a prefill, whose `chunk` columns stay in L2 while every token group
    /// passes over them), then, if the rows alone make too few tasks for a prefill big enough to share
    /// (a small matrix, such as one head's slice, times many tokens), ranges of token groups.
    fn plan(&self, tokens: usize, chunk: usize, target: usize) -> TaskGrid {
        let max_group = self.format.max_group();
        let wanted = self.cost(tokens).div_ceil(target.max(1)).max(1);
        let row_bytes = self.row_bytes();
        let rows = (self.rows * row_bytes / wanted).max(MIN_TASK_BYTES) / row_bytes;
        let rows = if tokens > max_group {
            let chunk_bytes = self.format.bytes_for(chunk);
            rows.min(MAX_TILE_BYTES / chunk_bytes)
        } else {
            rows
        };
        let rows_per_task = rows.clamp(1, self.rows);
        let groups = tokens.div_ceil(max_group);
        let row_tasks = self.rows.div_ceil(rows_per_task);
        let macs = (self.rows * self.cols).saturating_mul(tokens);
        let groups_per_task = if row_tasks >= wanted || macs < MIN_SPLIT_MACS {
            groups
        } else {
            groups.div_ceil(wanted.div_ceil(row_tasks).min(groups))
        };
        TaskGrid {
            rows_per_task,
            row_tasks,
            tokens_per_task: groups_per_task * max_group,
        }
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
        let bytes = |c: usize| self.format.bytes_for(c);
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
        if isa >= Isa::Avx512 {
            // SAFETY (all arms): isa is Avx512 only when cpu::detected() found AVX-512 F/BW/VL, VNNI,
            // AVX2, FMA and F16C.
            match self.format {
                // One token is memory-bound: the AVX2 kernels stream as fast.
                Format::Q4_0 if T > 1 => {
                    return each_row(&|row| unsafe { avx512::dot_q4_0(row, &toks) });
                }
                Format::Q5_0 if T > 1 => {
                    return each_row(&|row| unsafe { avx512::dot_q5_0(row, &toks) });
                }
                Format::Q8_0 if T > 1 => {
                    return each_row(&|row| unsafe { avx512::dot_q8_0(row, &toks) });
                }
                Format::Q6K => return each_row(&|row| unsafe { avx512::dot_q6_k(row, &toks) }),
                // no faster AVX-512 kernel: the AVX2 one below
                _ => {}
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY (all arms): isa is Avx2 or better only when cpu::detected() found AVX2, FMA and F16C.
            match self.format {
                Format::Q4_0 => each_row(&|row| unsafe { avx2::dot_q4_0(row, &toks) }),
                Format::Q4_1 => each_row(&|row| unsafe { avx2::dot_q4_1(row, &toks) }),
                Format::Q5_0 => each_row(&|row| unsafe { avx2::dot_q5_0(row, &toks) }),
                Format::Q5_1 => each_row(&|row| unsafe { avx2::dot_q5_1(row, &toks) }),
                Format::Q8_0 => each_row(&|row| unsafe { avx2::dot_q8_0(row, &toks) }),
                Format::Q4K => each_row(&|row| unsafe { avx2::dot_q4_k(row, &toks) }),
                Format::Q5K => each_row(&|row| unsafe { avx2::dot_q5_k(row, &toks) }),
                Format::Q6K => each_row(&|row| unsafe { avx2::dot_q6_k(row, &toks) }),
                Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3 => {
                    unreachable!("float formats multiply f32 activations")
                }
            }
            return;
        }
        let dot = self.format.scalar_dot();
        each_row(&|row| std::array::from_fn(|k| dot(row, &toks[k])));
    }
}

impl QMatrix {
    /// Outputs of float weights for the rows and tokens of `task`, up to four tokens per pass over a
    /// row.
    ///
    /// # Safety
    /// No other thread may write these outputs meanwhile; `out` must hold tokens x self.rows values
    /// and `x` tokens x self.cols.
    unsafe fn rows_f32(&self, isa: Isa, task: &Task, x: &[f32], out: &OutPtr) {
        for first in task.tokens.clone().step_by(4) {
            // SAFETY: the caller's contract.
            unsafe {
                match (task.tokens.end - first).min(4) {
                    1 => self.rows_group::<1>(isa, task.rows.clone(), first, x, out),
                    2 => self.rows_group::<2>(isa, task.rows.clone(), first, x, out),
                    3 => self.rows_group::<3>(isa, task.rows.clone(), first, x, out),
                    _ => self.rows_group::<4>(isa, task.rows.clone(), first, x, out),
                }
            }
        }
    }

    /// [`QMatrix::rows_f32`] for the `T` tokens from `first`.
    ///
    /// # Safety
    /// As for [`QMatrix::rows_f32`].
    unsafe fn rows_group<const T: usize>(
        &self,
        isa: Isa,
        rows: Range<usize>,
        first: usize,
        x: &[f32],
        out: &OutPtr,
    ) {
        let xs: [&[f32]; T] = std::array::from_fn(|k| &x[(first + k) * self.cols..][..self.cols]);
        let rb = self.row_bytes();
        for r in rows {
            let row = &self.data()[r * rb..(r + 1) * rb];
            let scales = self.scales.as_ref().map(|s| (s.row(r), s.block_cols()));
            let scalar = |x: &[f32]| match scales {
                Some((scales, block_cols)) => fp8::dot_scalar(row, scales, block_cols, x),
                None => float_rows::dot_scalar(self.format, row, x),
            };
            #[cfg(target_arch = "x86_64")]
            let dots = if isa >= Isa::Avx2 {
                // SAFETY: isa is Avx2 or better only when cpu::detected() found AVX2, FMA and F16C.
                unsafe {
                    match scales {
                        Some((scales, block_cols)) => fp8::dot(row, scales, block_cols, &xs),
                        None => float_rows::dot(self.format, row, &xs),
                    }
                }
            } else {
                xs.map(scalar)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let dots = xs.map(scalar);
            for (k, v) in dots.into_iter().enumerate() {
                // SAFETY: (first + k, r) is in bounds and ours alone (caller).
                unsafe { out.store((first + k) * self.rows + r, v, false) };
            }
        }
    }

    /// Outputs of all tokens for weight rows `rows` through f32 with `gemm`: the rows are decoded, then
    /// multiplied by `x` (tokens, cols) with gemm's f32 kernel on this thread.
    ///
    /// # Safety
    /// No other thread may write these outputs meanwhile; `out` must hold tokens x self.rows values.
    unsafe fn tile_f32(&self, rows: Range<usize>, x: &[f32], tokens: usize, out: &OutPtr) {
        let (cols, rb) = (self.cols, self.row_bytes());
        let mut decoded = DECODED.take();
        decoded.resize(rows.len() * cols, 0.0);
        let row_major = || &self.data()[rows.start * rb..rows.end * rb];
        match &self.scales {
            None if self.format.in_panels() => {
                panels::decode_rows(self.format, self.data(), cols, rows.clone(), &mut decoded)
            }
            Some(scales) => {
                let rows_out = row_major()
                    .chunks_exact(rb)
                    .zip(decoded.chunks_exact_mut(cols));
                for (r, (row, out)) in rows.clone().zip(rows_out) {
                    // SAFETY: f32_path gives Gemm only on an Avx2 isa or better.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        fp8::decode(row, scales.row(r), scales.block_cols(), 0, out)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    fp8::decode_scalar(row, scales.row(r), scales.block_cols(), 0, out);
                }
            }
            // SAFETY: f32_path gives Gemm only on an Avx2 isa or better (AVX2, FMA and F16C present).
            #[cfg(target_arch = "x86_64")]
            None => unsafe { f32_tiles::decode(self.format, row_major(), &mut decoded) },
            #[cfg(not(target_arch = "x86_64"))]
            None => tiefsee_gguf::dequantize_into(
                self.format.ty().expect("only FP8 has no GGUF type"),
                row_major(),
                &mut decoded,
            )
            .expect("QMatrix::new checked that rows are whole blocks"),
        }
        // SAFETY: dst (tokens, rows.len()) at column rows.start of `out` (row stride self.rows) is
        // ours alone (caller); lhs = x (tokens, cols) and rhs = decoded^T (cols, rows.len()) are read
        // within their lengths.
        unsafe {
            gemm::gemm(
                tokens,
                rows.len(),
                cols,
                out.0.add(rows.start),
                1,
                self.rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                decoded.as_ptr(),
                cols as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        DECODED.set(decoded);
    }
}

/// One product of a batch: `out = x W^T` for `matrix`, x (tokens, cols) and out (tokens, rows).
pub struct MatmulJob<'a> {
    /// The weights.
    pub matrix: &'a QMatrix,
    /// (tokens, cols) row-major activations; jobs may share one slice (it is quantized once).
    pub x: &'a [f32],
    /// (tokens, rows) row-major outputs.
    pub out: &'a mut [f32],
}

/// Runs every job, splitting all their row tiles over the threads at once: one parallel region
/// (and one wait for the slowest thread) for the batch instead of one per product. Each output is
/// computed exactly as [`QMatrix::matmul`] computes it alone.
pub fn matmul_batch(jobs: &mut [MatmulJob<'_>]) -> Result<(), KernelError> {
    matmul_batch_with(cpu::isa(), jobs)
}

/// [`matmul_batch`] with kernels for `isa` (or the best the CPU has, if lower).
fn matmul_batch_with(isa: Isa, jobs: &mut [MatmulJob<'_>]) -> Result<(), KernelError> {
    let tokens = jobs
        .iter()
        .enumerate()
        .map(|(index, j)| {
            j.matrix
                .tokens(j.x.len(), j.out.len())
                .map_err(|e| KernelError::Job {
                    index,
                    source: Box::new(e),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    run_batch(isa, jobs, &tokens);
    Ok(())
}

/// The index of `key` in `keys`, pushed if absent; the input slice (the key's first part) compares by
/// address and length, not by value.
fn index_of<'a, K: Copy + PartialEq>(keys: &mut Vec<(&'a [f32], K)>, key: (&'a [f32], K)) -> usize {
    let same = |&(x, rest): &(&[f32], K)| std::ptr::eq(x, key.0) && rest == key.1;
    keys.iter().position(same).unwrap_or_else(|| {
        keys.push(key);
        keys.len() - 1
    })
}

/// Runs `jobs`, whose sizes are checked and whose token counts are `tokens`, in one parallel region.
fn run_batch(isa: Isa, jobs: &mut [MatmulJob<'_>], tokens: &[usize]) {
    let isa = isa.min(cpu::detected());
    // Each distinct input, by address, length, width and activation format, is quantized once.
    let mut inputs: Vec<(&[f32], (usize, ActFormat))> = Vec::new();
    // Jobs on the f32 path read their input as it is: their index is never used.
    let input_of: Vec<usize> = jobs
        .iter()
        .zip(tokens)
        .map(|(j, &t)| {
            if j.matrix.format.f32_path(isa, t).is_some() {
                return usize::MAX;
            }
            index_of(
                &mut inputs,
                (j.x, (j.matrix.cols, j.matrix.format.activations())),
            )
        })
        .collect();
    // Taken, not borrowed: a nested call (a rayon task run while this one waits) gets fresh ones.
    let mut acts = SCRATCH.take();
    if acts.len() < inputs.len() {
        acts.resize_with(inputs.len(), Activations::default);
    }
    let values: usize = inputs.iter().map(|(x, _)| x.len()).sum();
    let quantize =
        |(a, &(x, (cols, format))): (&mut Activations, &(&[f32], (usize, ActFormat)))| {
            a.quantize(format, x, cols)
        };
    if inputs.len() > 1 && values >= PARALLEL_QUANTIZE_VALUES {
        acts.par_iter_mut().zip(&inputs).for_each(quantize);
    } else {
        acts.iter_mut().zip(&inputs).for_each(quantize);
    }
    // Inputs of the f32 register kernel, by address and width, each transposed once.
    #[cfg(target_arch = "x86_64")]
    let (transposed, transposed_of) = {
        let mut keys: Vec<(&[f32], usize)> = Vec::new();
        let transposed_of: Vec<usize> = jobs
            .iter()
            .zip(tokens)
            .map(|(j, &t)| {
                let path = j.matrix.format.f32_path(isa, t);
                if !matches!(path, Some(F32Path::Tiles | F32Path::Panels)) || isa == Isa::Scalar {
                    return usize::MAX;
                }
                index_of(&mut keys, (j.x, j.matrix.cols))
            })
            .collect();
        let mut transposed = TRANSPOSED.take();
        if transposed.len() < keys.len() {
            transposed.resize_with(keys.len(), f32_tiles::Transposed::default);
        }
        for (t, &(x, cols)) in transposed.iter_mut().zip(&keys) {
            t.fill(x, cols);
        }
        (transposed, transposed_of)
    };
    let chunks: Vec<usize> = jobs
        .iter()
        .zip(tokens)
        .map(|(j, &t)| j.matrix.chunk(t))
        .collect();
    // Tasks of about equal work across the whole batch: a few per thread, so the threads finish together.
    let total: usize = jobs
        .iter()
        .zip(tokens)
        .map(|(j, &t)| j.matrix.cost(t))
        .sum();
    let target = total / (TASKS_PER_THREAD * rayon::current_num_threads());
    let mut tasks = Vec::new();
    for (job, (j, &t)) in jobs.iter().zip(tokens).enumerate() {
        if t == 0 || j.matrix.rows == 0 {
            continue;
        }
        let path = j.matrix.format.f32_path(isa, t);
        if matches!(path, Some(F32Path::Tiles | F32Path::Gemm | F32Path::Panels)) {
            let step = if j.matrix.format.in_panels() {
                PANEL_TASK_ROWS
            } else {
                F32_TILE_ROWS
            };
            for r0 in (0..j.matrix.rows).step_by(step) {
                tasks.push(Task {
                    job,
                    rows: r0..(r0 + step).min(j.matrix.rows),
                    tokens: 0..t,
                });
            }
            continue;
        }
        let grid = j.matrix.plan(t, chunks[job], target);
        for token_start in (0..t).step_by(grid.tokens_per_task) {
            for row_task in 0..grid.row_tasks {
                let rows = row_task * grid.rows_per_task
                    ..((row_task + 1) * grid.rows_per_task).min(j.matrix.rows);
                tasks.push(Task {
                    job,
                    rows,
                    tokens: token_start..(token_start + grid.tokens_per_task).min(t),
                });
            }
        }
    }
    let matrices: Vec<&QMatrix> = jobs.iter().map(|j| j.matrix).collect();
    let outs: Vec<OutPtr> = jobs
        .iter_mut()
        .map(|j| OutPtr(j.out.as_mut_ptr()))
        .collect();
    let inputs_f32: Vec<&[f32]> = jobs.iter().map(|j| j.x).collect();
    let run = |task: &Task| {
        let m = matrices[task.job];
        match m.format.f32_path(isa, tokens[task.job]) {
            #[cfg(target_arch = "x86_64")]
            Some(F32Path::Tiles) => {
                let mut scratch = F32_TILES.take();
                // SAFETY: f32_path gives Tiles only on an Avx2 isa or better (AVX2, FMA and F16C
                // present); this task alone writes the outputs of its rows (tasks split each job's
                // rows); the output has tokens * rows values (checked above).
                unsafe {
                    f32_tiles::tile(
                        m.format,
                        m.data(),
                        m.scales.as_ref(),
                        m.cols,
                        m.rows,
                        task.rows.clone(),
                        &transposed[transposed_of[task.job]],
                        &outs[task.job],
                        &mut scratch,
                    )
                };
                F32_TILES.set(scratch);
                return;
            }
            Some(F32Path::Panels) => {
                #[cfg(target_arch = "x86_64")]
                if isa >= Isa::Avx2 {
                    // SAFETY: isa is Avx2 or better only when cpu::detected() found AVX2, FMA and F16C;
                    // this task alone writes the outputs of its rows (tasks split each job's rows,
                    // by whole panels); the output has tokens * rows values (checked above).
                    unsafe {
                        panels::multiply(
                            m.format,
                            m.data(),
                            m.cols,
                            m.rows,
                            task.rows.clone(),
                            &transposed[transposed_of[task.job]],
                            &outs[task.job],
                        )
                    };
                    return;
                }
                // SAFETY: as above, for the scalar code.
                unsafe {
                    panels::multiply_scalar(
                        m.format,
                        m.data(),
                        m.cols,
                        m.rows,
                        task.rows.clone(),
                        inputs_f32[task.job],
                        task.tokens.clone(),
                        &outs[task.job],
                    )
                };
                return;
            }
            Some(F32Path::Rows) => {
                // SAFETY: this task alone writes the outputs of its rows for its tokens (tasks split
                // each job's rows and tokens); the output has tokens * rows values (checked above).
                unsafe { m.rows_f32(isa, task, inputs_f32[task.job], &outs[task.job]) };
                return;
            }
            Some(_) => {
                // SAFETY: this task alone writes the outputs of its rows(tasks split each job's
                // rows); the output has tokens * rows values (checked above).
                unsafe {
                    m.tile_f32(
                        task.rows.clone(),
                        inputs_f32[task.job],
                        tokens[task.job],
                        &outs[task.job],
                    )
                };
                return;
            }
            None => {}
        }
        let a = &acts[input_of[task.job]];
        let chunk = chunks[task.job];
        let max_group = m.format.max_group();
        for start in (0..m.cols).step_by(chunk) {
            let cols = start..(start + chunk).min(m.cols);
            for first in task.tokens.clone().step_by(max_group) {
                let part = Part {
                    rows: task.rows.clone(),
                    cols: cols.clone(),
                    first,
                };
                let out = &outs[task.job];
                // SAFETY: this task alone writes the outputs of its rows for its tokens (tasks split
                // each job's rows and tokens, jobs' outputs are distinct `&mut` slices), and the
                // output has tokens * rows values (checked above).
                unsafe {
                    match max_group.min(task.tokens.end - first) {
                        1 => m.tile::<1>(isa, &part, a, out),
                        2 => m.tile::<2>(isa, &part, a, out),
                        3 => m.tile::<3>(isa, &part, a, out),
                        4 => m.tile::<4>(isa, &part, a, out),
                        5 => m.tile::<5>(isa, &part, a, out),
                        6 => m.tile::<6>(isa, &part, a, out),
                        7 => m.tile::<7>(isa, &part, a, out),
                        _ => m.tile::<8>(isa, &part, a, out),
                    }
                }
            }
        }
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
    SCRATCH.set(acts);
    #[cfg(target_arch = "x86_64")]
    TRANSPOSED.set(transposed);
}

/// How one job is cut into tasks: tiles of rows times ranges of tokens.
struct TaskGrid {
    rows_per_task: usize,
    row_tasks: usize,
    /// A multiple of the format's token group.
    tokens_per_task: usize,
}

/// One parallel task of a batch: weight rows `rows` of job `job` for tokens `tokens`.
struct Task {
    job: usize,
    rows: Range<usize>,
    tokens: Range<usize>,
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
