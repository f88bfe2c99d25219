//! Perplexity of a token sequence, as llama.cpp's `perplexity` tool and transformers' guide compute it.
//!
//! When the sequence fits in one window of `ctx` tokens this is the reference definition: the
//! exponential of the mean negative log-likelihood of every token after the first, given all tokens
//! before it. Longer sequences are scored in windows of `ctx` tokens that advance by `ctx / 2`
//! (transformers' strided evaluation): each token is scored once, with at least half a window of
//! context except at the start.

use tiefsee_model::{Logits, Model, ModelError, Result};

/// The result of scoring a text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Tokens in the sequence (BOS included where the tokenizer adds one).
    pub tokens: usize,
    /// Tokens whose likelihood was scored (all but the first).
    pub scored: usize,
    /// Mean negative log-likelihood, in nats per token.
    pub mean_nll: f64,
    pub windows: usize,
}

/// Scores `tokens` with windows of at most `ctx` tokens.
pub fn perplexity(model: &Model, tokens: &[u32], ctx: usize) -> Result<Perplexity> {
    if tokens.len() < 2 {
        return Err(ModelError::EmptyInput);
    }
    let ctx = ctx.max(2);
    let stride = (ctx / 2).max(1);
    let mut nll = 0f64;
    let mut scored = 0usize;
    let mut windows = 0;
    let mut start = 0;
    loop {
        let end = (start + ctx).min(tokens.len());
        let window = &tokens[start..end];
        let mut cache = model.new_cache(Some(window.len()))?;
        let logits: Vec<Vec<f32>> = model.forward(window, &mut cache, Logits::All)?.to_vec2()?;
        // Token at window position i + 1 is predicted by row i; score only tokens not scored yet.
        let first_new = if start == 0 { 1 } else { scored + 1 - start };
        for (row, &target) in logits.iter().zip(&window[1..]).skip(first_new - 1) {
            nll -= log_softmax_at(row, target as usize);
        }
        scored = end - 1;
        windows += 1;
        if end == tokens.len() {
            break;
        }
        start += stride;
    }
    let mean_nll = nll / scored as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        tokens: tokens.len(),
        scored,
        mean_nll,
        windows,
    })
}

/// `log(softmax(row)[target])`, computed in f64.
fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::log_softmax_at;

    #[test]
    fn log_softmax_of_uniform_row_is_minus_log_n() {
        let row = [0.3f32; 8];
        assert!((log_softmax_at(&row, 5) + 8f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn log_softmax_matches_hand_computation() {
        // softmax([0, ln 3]) = [1/4, 3/4]
        let row = [0.0f32, 3f32.ln()];
        assert!((log_softmax_at(&row, 1) - 0.75f64.ln()).abs() < 1e-7);
        assert!((log_softmax_at(&row, 0) - 0.25f64.ln()).abs() < 1e-7);
    }
}
