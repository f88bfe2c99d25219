//! Training tiefsee's small DeepSeek models, R1-Zero style: a verifiable arithmetic task and its
//! pretraining corpus ([`task`]), pretraining with MTP and DeepSeek-V3 load balancing
//! ([`pretrain`], [`balance`]), rule-based rewards ([`rewards`]), GRPO with its DAPO and Dr. GRPO
//! options ([`grpo`], [`rl`]), and held-out evaluation ([`eval`]).

pub mod balance;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod grpo;
pub mod optim;
pub mod params;
pub mod plot;
pub mod pretrain;
pub mod rewards;
pub mod rl;
pub mod rollout;
pub mod task;
pub mod vocab;

pub use error::{Result, TrainError};
