//! GGUF, llama.cpp's model file format, and the ggml quantization formats stored in it.
//!
//! - [`GgufFile`] opens a GGUF v2/v3 file memory-mapped and validates all of it up front; tensor data is
//!   handed out as `&[u8]` slices of the map ([`TensorView`]), so weights can be used without copying.
//! - [`Metadata`] holds the key/value pairs with strict typed accessors (`get_u32`, `get_str_array`, ...).
//! - [`GgufWriter`] writes files the `gguf` Python package and llama.cpp read, streaming tensor data.
//! - [`quantize`] / [`dequantize`] are the scalar reference codecs of F32, F16, BF16, Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q8_0 and the K-quants Q2_K ... Q8_K ([`GgmlType`]).
//!
//! Shapes: GGUF stores ggml's `ne`, innermost dimension first. [`TensorInfo::ne`] returns that order,
//! [`TensorInfo::shape`] the reverse (numpy/PyTorch row-major), and [`GgufWriter::add_tensor`] takes the
//! row-major shape. A linear layer's weight `[out_features, in_features]` has `ne = [in, out]`: each row
//! of `in_features` values is a run of whole quantization blocks.
//!
//! Reference: ggml's `docs/gguf.md`, `ggml-quants.c`, and the `gguf` Python package 0.19.0, which the
//! tests in `tests/` compare against bit for bit through `tests/fixtures/gguf/`.

mod error;
mod metadata;
mod quants;
mod reader;
mod types;
mod writer;

pub use error::{GgufError, Result};
pub use metadata::{Metadata, MetadataArray, MetadataValue, ValueType};
pub use quants::{dequantize, dequantize_into, quantize, quantize_into};
pub use reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufFile, MAX_DIMS, TensorInfo, TensorView};
pub use types::{GgmlType, QK_K, ggml_type_name};
pub use writer::{GgufWriter, TensorDataWriter};
