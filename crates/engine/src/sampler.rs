//! Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p.
//!
//! The order follows transformers' logits processors (penalties, then temperature, then the
//! truncations); temperature 0 is greedy decoding, the first maximum winning ties as `argmax` does.
//! Presence and frequency penalties follow OpenAI's definition over the tokens this sampler has
//! produced: `logit -= frequency * count + presence * (count > 0)`.

use std::collections::HashMap;

use rand::SeedableRng;
use rand::distr::{Distribution, weighted::WeightedIndex};
use rand::rngs::StdRng;

/// The knobs users set for sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recently seen tokens; 1 disables.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token generated so far (OpenAI, -2..2).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token generated so far (OpenAI, -2..2).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// The params of choice `index` of a request for several: choice 0 keeps the seed, so it
    /// samples what a request for one would; the others get distinct seeds derived from it, so a
    /// seeded request for `n` choices is reproducible and its choices differ.
    pub fn for_choice(&self, index: usize) -> Self {
        let seed = if index == 0 {
            self.seed
        } else {
            // SplitMix64 of seed + index * golden ratio: neighbouring seeds give unrelated streams.
            let mut z = self
                .seed
                .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            seed,
            ..self.clone()
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.6,
            top_k: 0,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

/// A seeded sampler: the same params, seed and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often this sampler produced each token, for presence and frequency penalties.
    produced: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler with its own random stream seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            produced: HashMap::new(),
        }
    }

    /// Picks the next token from one position's logits, given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_repeat_penalty(&mut logits, history);
        self.apply_openai_penalties(&mut logits);
        let token = if self.params.temperature <= 0.0 {
            argmax(&logits)
        } else {
            let probs = self.truncated_probs(&logits);
            match WeightedIndex::new(probs.iter().map(|&(_, p)| p)) {
                Ok(dist) => probs[dist.sample(&mut self.rng)].0,
                // All weights zero or non-finite (NaN logits): fall back to the most likely token.
                Err(_) => argmax(&logits),
            }
        };
        *self.produced.entry(token).or_default() += 1;
        token
    }

    fn apply_openai_penalties(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 {
            return;
        }
        for (&token, &count) in &self.produced {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= frequency * count as f32 + presence;
            }
        }
    }

    fn apply_repeat_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        let mut seen = vec![false; logits.len()];
        for &id in recent {
            if let Some(s) = seen.get_mut(id as usize) {
                *s = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }

    /// Candidates (token, probability) after temperature, top-k, top-p and min-p, most likely first.
    fn truncated_probs(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        let total: f32 = probs.iter().map(|&(_, q)| q).sum();
        probs.iter_mut().for_each(|(_, q)| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, q)| {
                    cumulative += q;
                    cumulative >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = probs[0].1 * p.min_p;
            probs.retain(|&(_, q)| q >= threshold);
        }
        probs
    }
}

/// Index of the first maximum.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 7,
        }
    }

    #[test]
    fn presence_and_frequency_penalties_count_produced_tokens() {
        // Greedy over logits 3, 2, 0.5 with a token's logit lowered by 1 + 0.6 * count:
        // 0 wins (3); then 0 is at 1.4 < 2, so 1 wins; then 1 is at 0.4 and 0 at 1.4: 0 wins;
        // then 0 is at 3 - 2.2 = 0.8, still first; then 0 is at 0.2 < 0.4 < 0.5: 2 wins.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            frequency_penalty: 0.6,
            ..params(0.0)
        });
        let logits = [3.0, 2.0, 0.5];
        let drawn: Vec<u32> = (0..5).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(drawn, vec![0, 1, 0, 0, 2]);
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        // Token 0 (logit 2.0) seen: 2.0 / 2 = 1.0 < 1.5, so token 1 wins.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
        // Token 1 (logit -1.0) seen: -1.0 * 2 = -2.0 < -1.5, so token 0 wins.
        assert_eq!(s.sample(&[-1.5, -1.0], &[1]), 0);
        // Only the last `repeat_last_n` tokens count.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            repeat_last_n: 1,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0, 1]), 0);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(5.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 0.5, 0.2], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs at temperature 1).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let s = Sampler::new(SamplingParams {
            top_p: 0.75,
            ..params(1.0)
        });
        let kept: Vec<u32> = s.truncated_probs(&logits).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![0, 1]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        // Threshold 0.25: token 2 (0.2) goes.
        let kept: Vec<u32> = s.truncated_probs(&logits).iter().map(|c| c.0).collect();
        assert_eq!(kept, vec![0, 1]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(params(1.0));
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.7, 0.2, 0.1]) {
            let freq = *c as f64 / 20_000.0;
            assert!((freq - p).abs() < 0.02, "{counts:?}");
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
