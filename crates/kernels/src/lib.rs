//! CPU kernels for inference: quantized matrix products over llama.cpp's block formats
//! ([`qmatmul`]) and attention computed directly over the rows of a paged KV cache ([`attention`]).
//!
//! Every SIMD kernel has a scalar reference beside it; the instruction set is chosen once at run
//! time ([`cpu`]), and all work runs on rayon's global pool (long-lived threads, no per-call spawning).

pub mod attention;
pub mod cpu;
mod error;
pub mod qmatmul;

pub use attention::{
    AttentionError, CacheFormat, RowLayout, RowPool, SequenceQueries, attend, attend_batch,
};
pub use error::KernelError;
pub use qmatmul::{MatmulJob, QMatrix, WeightBytes, matmul_batch};
