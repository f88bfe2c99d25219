//! The model-independent parts of training tiefsee's small DeepSeek models, R1-Zero style: a verifiable
//! arithmetic task and its pretraining corpus ([`task`]), rule-based rewards ([`rewards`]), the GRPO
//! objective with its DAPO and Dr. GRPO options ([`grpo`]), and DeepSeek-V3 MoE load balancing ([`balance`]).
//! Nothing here loads a model; the training loop feeds these functions log-probabilities and routing counts.

pub mod balance;
pub mod grpo;
pub mod rewards;
pub mod task;
