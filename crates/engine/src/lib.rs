//! tiefsee's generation engine: sampling and the token loop over a model and its cache.
//! It schedules token ids and never sees text.

pub mod generate;
pub mod sampler;

pub use generate::{GenerateOptions, GenerationStats, Session, StopReason};
pub use sampler::{Sampler, SamplingParams};
