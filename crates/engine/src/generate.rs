//! The token loop: prefill a prompt, then sample and feed one token at a time until a stop.
//!
//! A [`Session`] keeps its cache between calls, so a chat whose next prompt extends the previous
//! one (prompt plus answer) only prefills the new tokens.

use std::ops::ControlFlow;
use std::time::Instant;

use tiefsee_model::{Cache, Logits, Model, Result};

use crate::sampler::Sampler;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` were generated.
    Length,
    /// The model produced one of the stop tokens (not passed on).
    StopToken,
    /// The caller asked to stop (a stop string, Ctrl-C).
    Caller,
    /// The context is full.
    ContextFull,
}

/// Limits of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Token ids that end generation (end of text, end of turn).
    pub stop_ids: Vec<u32>,
}

/// Counts and timings of one generation, for the statistics users see.
#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the session's cache).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
    /// Bytes the cache holds at the end.
    pub cache_bytes: usize,
}

impl GenerationStats {
    /// Prefill speed in tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Decode speed in tokens per second (tokens after the first, which prefill produced).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// One sequence's state across generations: the model, its cache, and the tokens cached.
pub struct Session<'m> {
    model: &'m Model,
    context: Option<usize>,
    cache: Cache,
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A fresh session holding at most `context` tokens (the model's maximum when `None`).
    pub fn new(model: &'m Model, context: Option<usize>) -> Result<Self> {
        Ok(Self {
            model,
            context,
            cache: model.new_cache(context)?,
            tokens: Vec::new(),
        })
    }

    /// Generates after `prompt`, calling `on_token` with each new token until a stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationStats> {
        let reuse = self.tokens.len() < prompt.len() && prompt.starts_with(&self.tokens);
        if !reuse {
            self.cache = self.model.new_cache(self.context)?;
            self.tokens.clear();
        }
        let new = &prompt[self.tokens.len()..];
        let started = Instant::now();
        let mut logits = self.feed(new)?;
        let prefill_secs = started.elapsed().as_secs_f64();
        let mut history = prompt.to_vec();
        let decode_started = Instant::now();
        let mut generated = 0;
        let stop = loop {
            if generated == options.max_tokens {
                break StopReason::Length;
            }
            let token = sampler.sample(&logits, &history);
            if options.stop_ids.contains(&token) {
                break StopReason::StopToken;
            }
            generated += 1;
            history.push(token);
            if on_token(token).is_break() {
                break StopReason::Caller;
            }
            if generated == options.max_tokens {
                break StopReason::Length;
            }
            if self.cache.len() == self.cache.context() {
                break StopReason::ContextFull;
            }
            logits = self.feed(&[token])?;
        };
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            prefilled_tokens: new.len(),
            generated_tokens: generated,
            prefill_secs,
            decode_secs: decode_started.elapsed().as_secs_f64(),
            stop,
            cache_bytes: self.cache.bytes(),
        })
    }

    /// Runs tokens through the model and returns the last position's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.model.forward(tokens, &mut self.cache, Logits::Last)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits.squeeze(0)?.to_vec1()?)
    }
}
