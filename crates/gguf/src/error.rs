//! Errors of the GGUF reader, writer and quantizers: each names the file, key or tensor at fault.

use std::path::PathBuf;

use crate::types::{GgmlType, describe_unsupported};

/// Everything that can go wrong reading, writing or (de)quantizing GGUF data.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (starts with {found:02x?}, expected the magic \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: GGUF version {version} is not supported: {reason}")]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        reason: &'static str,
    },
    #[error(
        "{path}: truncated or corrupt: {what} at byte {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{path}: corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: metadata key {key:?} appears twice")]
    DuplicateKey { path: PathBuf, key: String },
    #[error("{path}: tensor {name:?} appears twice")]
    DuplicateTensor { path: PathBuf, name: String },
    #[error("{path}: general.alignment must be a u32 power of two, found {found}")]
    BadAlignment { path: PathBuf, found: String },
    #[error("{path}: tensor {tensor:?} has {}", describe_unsupported(*.id))]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        id: u32,
    },
    #[error("{path}: tensor {tensor:?} is invalid: {reason}")]
    InvalidTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error(
        "{path}: tensor {tensor:?} spans bytes {start}..{end} of the file, which has only {file_len} bytes"
    )]
    TensorOutOfBounds {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error(
        "{path}: tensor {tensor:?} starts at data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    UnalignedTensor {
        path: PathBuf,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("{path}: the data of tensors {first:?} and {second:?} overlap")]
    OverlappingTensors {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{path}: metadata key {key:?} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key:?} is a {found}, expected a {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: no tensor named {name:?}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{ty}: {reason}")]
    QuantSize { ty: GgmlType, reason: String },
    #[error("GGUF writer: {0}")]
    InvalidWrite(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, GgufError>;
