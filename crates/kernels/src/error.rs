//! The errors the kernels report instead of panicking on a caller's sizes or types.

use tiefsee_gguf::GgmlType;

/// What went wrong when building a weight matrix or multiplying by one.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A byte range does not lie inside the buffer it was cut from.
    #[error("weight byte range {start}..{end} is out of bounds for a buffer of {len} bytes")]
    RangeOutOfBounds {
        /// First byte of the range.
        start: usize,
        /// One past the last byte of the range.
        end: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// The weight type has no quantized matrix-product kernel.
    #[error("no quantized matmul kernel for weight type {0:?}")]
    UnsupportedType(GgmlType),
    /// A row is not a whole number of the type's blocks.
    #[error("{ty:?} matrix has {cols} columns, not a positive multiple of its block size {block}")]
    ColsNotWholeBlocks {
        /// Weight type.
        ty: GgmlType,
        /// Columns of the matrix.
        cols: usize,
        /// Values per block of `ty`.
        block: usize,
    },
    /// The weight bytes do not hold exactly `rows` rows.
    #[error("{ty:?} matrix of {rows} x {cols} takes {expected} bytes, got {found}")]
    DataLength {
        /// Weight type.
        ty: GgmlType,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        found: usize,
    },
    /// An FP8 matrix's bytes or block scales do not fit its shape.
    #[error(
        "FP8 matrix of {rows} x {cols} in blocks of {block:?} needs {expected_bytes} bytes and \
         {expected_scales} block scales, got {found_bytes} bytes and {found_scales} scales"
    )]
    Fp8Shape {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// Rows and columns per scale block.
        block: [usize; 2],
        /// Bytes the shape needs (one per weight).
        expected_bytes: usize,
        /// Bytes given.
        found_bytes: usize,
        /// Scales the shape needs (one per block, partial blocks included).
        expected_scales: usize,
        /// Scales given.
        found_scales: usize,
    },
    /// A row range reaches past the last row.
    #[error("rows {start}..{start}+{len} are out of bounds for a matrix of {rows} rows")]
    RowsOutOfBounds {
        /// First row asked for.
        start: usize,
        /// Number of rows asked for.
        len: usize,
        /// Rows of the matrix.
        rows: usize,
    },
    /// The input is not a whole number of rows of `cols` values.
    #[error("input of {len} values is not a whole number of rows of {cols} columns")]
    InputLength {
        /// Values in the input.
        len: usize,
        /// Columns of the matrix (values per token).
        cols: usize,
    },
    /// The output buffer does not have one value per (token, row).
    #[error("output has {found} values, expected {tokens} tokens x {rows} rows = {expected}")]
    OutputLength {
        /// Tokens in the input.
        tokens: usize,
        /// Rows of the matrix.
        rows: usize,
        /// Values the output needs.
        expected: usize,
        /// Values the output has.
        found: usize,
    },
    /// One job of a batch of products is malformed.
    #[error("job {index} of the batch: {source}")]
    Job {
        /// Position of the job in the batch.
        index: usize,
        /// What is wrong with it.
        source: Box<KernelError>,
    },
}
