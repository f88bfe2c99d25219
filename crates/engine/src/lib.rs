//! tiefsee's generation engine: sampling, the token loop over a model and its cache, and
//! perplexity scoring. It schedules token ids and never sees text.

pub mod generate;
pub mod logprobs;
pub mod paged;
pub mod perplexity;
pub mod sampler;
pub mod scheduler;

pub use generate::{GenerateOptions, GenerationStats, Session, StopReason};
pub use logprobs::TokenLogprobs;
pub use paged::PagedExecutor;
pub use perplexity::{Perplexity, perplexity};
pub use sampler::{Sampler, SamplingParams};
