//! Errors of the model core: each names the file, tensor or config field at fault.

use std::path::PathBuf;

/// Everything that can go wrong while loading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for this purpose: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "unsupported architecture {0:?}: tiefsee runs DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, Qwen2ForCausalLM and LlamaForCausalLM"
    )]
    UnsupportedArchitecture(String),
    #[error("config.json: {field} = {value} is not supported: {reason}")]
    UnsupportedConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("config.json: {field} is missing or invalid: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("{file}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Safetensors { file: PathBuf, reason: String },
    #[error("tensor {name} is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor {name} in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} in {file} has dtype {dtype}, which tiefsee cannot load here")]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
    #[error(
        "tensor {name} in {file} holds the block scale {value} at block {block:?}: not a finite number"
    )]
    BadFp8Scale {
        name: String,
        file: PathBuf,
        block: [usize; 2],
        value: f32,
    },
    #[error(transparent)]
    Gguf(#[from] tiefsee_gguf::GgufError),
    #[error(transparent)]
    Kernel(#[from] tiefsee_kernels::KernelError),
    #[error("KV cache: {0}")]
    Attention(#[from] tiefsee_kernels::AttentionError),
    #[error(
        "{path}: GGUF architecture {arch:?} is not supported: tiefsee reads deepseek2, qwen2 and llama"
    )]
    UnsupportedGgufArchitecture { path: PathBuf, arch: String },
    #[error("{path}: metadata {key} = {value} is not supported: {reason}")]
    UnsupportedGgufValue {
        path: PathBuf,
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("{path}: tensor {name:?} is not one tiefsee knows how to use for {arch}")]
    UnknownGgufTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("{dir}: tensor {name} has no llama.cpp (GGUF) name, so it cannot be written to GGUF")]
    NoGgufName { name: String, dir: PathBuf },
    #[error("{path}: its metadata gives an invalid configuration: {source}")]
    GgufConfig {
        path: PathBuf,
        source: Box<ModelError>,
    },
    #[error(
        "a {format} cache stores rows in blocks of 32 values, but this model's cache rows have {width}"
    )]
    UnsupportedCacheFormat { format: &'static str, width: usize },
    #[error("the input is empty: at least one token is needed")]
    EmptyInput,
    #[error("{needed} tokens do not fit in the context of {context} tokens")]
    ContextOverflow { needed: usize, context: usize },
    #[error(
        "a segment starts at position {start}, but an uncached forward pass feeds whole sequences from position 0"
    )]
    UncachedContinuation { start: usize },
    #[error("a single-sequence cache was given {found} sequences in one forward pass")]
    SingleSequenceCache { found: usize },
    #[error(
        "an attention batch of {sequences} sequences ({tokens} tokens) got {tables} slot tables, {rows} row values and {queries} query values"
    )]
    AttentionBatch {
        sequences: usize,
        tokens: usize,
        tables: usize,
        rows: usize,
        queries: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result of the model core.
pub type Result<T> = std::result::Result<T, ModelError>;
