//! Errors of training and evaluation, each naming the file, field or step at fault.

use std::path::PathBuf;

/// Everything that can stop a training run or an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {field}: {reason}")]
    Config { field: String, reason: String },
    #[error(
        "{what} is {value} at step {step}: training stopped; the last good checkpoint is {checkpoint}"
    )]
    NonFinite {
        what: &'static str,
        value: f64,
        step: usize,
        checkpoint: String,
    },
    #[error(
        "could not save the checkpoint {path}: {source}; the previous checkpoint there is intact"
    )]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a training checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] tiefsee_model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] tiefsee_tokenizer::Error),
    #[error(transparent)]
    Task(#[from] crate::task::TaskError),
    #[error(transparent)]
    Grpo(#[from] crate::grpo::GrpoError),
    #[error(transparent)]
    Balance(#[from] crate::balance::BalanceError),
    #[error(transparent)]
    Engine(#[from] tiefsee_engine::scheduler::EngineError),
    #[error("generation: {0}")]
    Generation(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result of training and evaluation.
pub type Result<T> = std::result::Result<T, TrainError>;
