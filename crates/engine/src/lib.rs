//! tiefsee's generation engine: sampling, the token loop over a model and its cache, and
//! perplexity scoring. It schedules token ids and never sees text.

pub mod generate;
pub mod perplexity;
pub mod sampler;

pub use generate::{GenerateOptions, GenerationStats, Session, StopReason};
pub use perplexity::{Perplexity, perplexity};
pub use sampler::{Sampler, SamplingParams};
