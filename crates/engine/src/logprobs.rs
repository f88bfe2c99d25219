//! Log-probabilities of a sampled token and of the most likely alternatives, for the API's
//! `logprobs` / `top_logprobs`.
//!
//! Like vLLM's default (`logprobs_mode = "raw_logprobs"`), they are of the model's own distribution,
//! `log_softmax(logits)`, before penalties, temperature and truncation: they say what the model
//! thinks, not how this request's sampler happened to reshape it. They are computed only for
//! requests that ask for them.

/// One generated token's log-probability and the `top` most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the token that was sampled.
    pub logprob: f32,
    /// (token id, log-probability), most likely first; ties go to the smaller id.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// `log_softmax(logits)` at `token`, and the `top` most likely tokens, (vocab,) logits in.
    pub fn new(logits: &[f32], token: u32, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Each term in f32 (within an ulp, and several times cheaper than f64's exp), summed in f64:
        // a vocabulary of 100k+ terms loses digits in an f32 sum.
        let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        let log_z = max + sum.ln() as f32;
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - log_z);
        Self {
            logprob,
            top: top_k(logits, top)
                .into_iter()
                .map(|(id, l)| (id, l - log_z))
                .collect(),
        }
    }
}

/// The `k` largest (id, logit), largest first, ties to the smaller id: one pass, no vocab-sized copy.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (id, &l) in logits.iter().enumerate() {
        if l.is_nan() || (best.len() == k && l <= best[k - 1].1) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (id as u32, l));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_the_token_and_the_top_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        let lp = TokenLogprobs::new(&logits, 2, 3);
        assert!((lp.logprob - (2.0 - z)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        for (id, l) in lp.top {
            assert!((l - (logits[id as usize] - z)).abs() < 1e-6);
        }
        let probs: f32 = logits.iter().map(|l| (l - z).exp()).sum();
        assert!((probs - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_zero_is_empty_and_top_beyond_the_vocabulary_is_all_of_it() {
        assert!(TokenLogprobs::new(&[0.5, 0.1], 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::new(&[0.5, 0.1], 0, 5).top.len(), 2);
    }

    #[test]
    fn masked_tokens_have_minus_infinity() {
        let lp = TokenLogprobs::new(&[0.0, f32::NEG_INFINITY], 1, 2);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        assert_eq!(lp.top[0], (0, 0.0));
    }
}
