//! MoE load balancing for training, as in DeepSeek-V3 (arXiv 2412.19437, section 2.1.2).
//!
//! - Auxiliary-loss-free balancing: each routed expert has a bias `b_i` added to its affinity for top-k
//!   *selection only*; after each step `b_i += gamma * sign(mean_load - load_i)`, so overloaded experts
//!   become less likely to be picked. The bias never enters the gating weights or the loss.
//! - The complementary sequence-wise balance loss (eq. 17-20), `alpha * sum_i f_i * P_i`, with
//!   `f_i = N_r / (K_r * T) * #{t : expert i in top-k of token t}` and `P_i = (1/T) sum_t s'_{i,t}`, where
//!   `s'_{i,t} = s_{i,t} / sum_j s_{j,t}` over all `N_r` experts.
//!
//! Departure: the top-k set is passed in rather than recomputed, because V3 selects on the biased scores
//! `s + b` while `P_i` uses the unbiased `s`; the caller has both.

use thiserror::Error;

/// Errors from mis-shaped routing statistics.
#[derive(Debug, Error, PartialEq)]
pub enum BalanceError {
    /// A buffer does not have the length its shape implies.
    #[error("{field} has length {found}, expected {expected}")]
    Shape {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    /// A flattened `(rows, row_len)` buffer whose length is not a multiple of the row length.
    #[error("{field} has length {len}, not a multiple of {row_len}")]
    Ragged {
        field: &'static str,
        len: usize,
        row_len: usize,
    },
    /// A size that must be positive is zero.
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    /// A routed expert index is out of range.
    #[error("expert index {index} out of range for {n_experts} experts")]
    ExpertOutOfRange { index: usize, n_experts: usize },
    /// A token's affinities sum to zero, so they cannot be normalized.
    #[error("token {token}: affinities sum to zero")]
    ZeroAffinity { token: usize },
}

/// Tokens routed to each expert, from the flattened top-k indices. `topk: // (tokens, k)`
pub fn expert_loads(topk: &[usize], n_experts: usize) -> Result<Vec<u32>, BalanceError> {
    let mut loads = vec![0u32; n_experts];
    for &e in topk {
        let slot = loads.get_mut(e).ok_or(BalanceError::ExpertOutOfRange {
            index: e,
            n_experts,
        })?;
        *slot += 1;
    }
    Ok(loads)
}

/// One step of auxiliary-loss-free balancing: `b_i += gamma * sign(mean_load - load_i)` (sign(0) = 0).
pub fn update_bias(bias: &mut [f32], loads: &[u32], gamma: f32) -> Result<(), BalanceError> {
    if bias.len() != loads.len() {
        return Err(BalanceError::Shape {
            field: "loads",
            expected: bias.len(),
            found: loads.len(),
        });
    }
    if loads.is_empty() {
        return Ok(());
    }
    let mean = loads.iter().map(|&l| f64::from(l)).sum::<f64>() / loads.len() as f64;
    for (b, &l) in bias.iter_mut().zip(loads) {
        let diff = mean - f64::from(l);
        // f64::signum(0.0) is 1, not 0: an expert exactly at the mean must stay put.
        let sign = if diff > 0.0 {
            1.0
        } else if diff < 0.0 {
            -1.0
        } else {
            0.0
        };
        *b += gamma * sign;
    }
    Ok(())
}

/// V3's sequence-wise balance loss for one sequence.
/// `affinity: // (tokens, n_experts)` unbiased scores `s_{i,t}`; `topk: // (tokens, k)` chosen experts.
pub fn sequence_balance_loss(
    affinity: &[f32],
    topk: &[usize],
    n_experts: usize,
    k: usize,
    alpha: f32,
) -> Result<f32, BalanceError> {
    if n_experts == 0 {
        return Err(BalanceError::Zero { field: "n_experts" });
    }
    if k == 0 {
        return Err(BalanceError::Zero { field: "k" });
    }
    if !affinity.len().is_multiple_of(n_experts) {
        return Err(BalanceError::Ragged {
            field: "affinity",
            len: affinity.len(),
            row_len: n_experts,
        });
    }
    let tokens = affinity.len() / n_experts;
    if topk.len() != tokens * k {
        return Err(BalanceError::Shape {
            field: "topk",
            expected: tokens * k,
            found: topk.len(),
        });
    }
    if tokens == 0 {
        return Ok(0.0);
    }
    let counts = expert_loads(topk, n_experts)?;
    let mut p = vec![0f64; n_experts]; // (n_experts,) sum over tokens of normalized affinity
    for (t, row) in affinity.chunks(n_experts).enumerate() {
        let total: f64 = row.iter().map(|&s| f64::from(s)).sum();
        if total == 0.0 {
            return Err(BalanceError::ZeroAffinity { token: t });
        }
        for (pi, &s) in p.iter_mut().zip(row) {
            *pi += f64::from(s) / total;
        }
    }
    let t = tokens as f64;
    let f_scale = n_experts as f64 / (k as f64 * t);
    let sum: f64 = counts
        .iter()
        .zip(&p)
        .map(|(&c, &pi)| f_scale * f64::from(c) * (pi / t))
        .sum();
    Ok((f64::from(alpha) * sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_by_hand() {
        // 3 tokens, k = 2, 4 experts.
        assert_eq!(
            expert_loads(&[0, 1, 1, 3, 0, 3], 4).expect("ok"),
            vec![2, 2, 0, 2]
        );
        assert_eq!(
            expert_loads(&[4], 4),
            Err(BalanceError::ExpertOutOfRange {
                index: 4,
                n_experts: 4
            })
        );
    }

    #[test]
    fn bias_update_by_hand() {
        // Loads [6, 2, 4, 4]: mean 4. Overloaded expert 0 goes down, underloaded 1 up, the rest stay.
        let mut b = vec![0.0, 0.5, -0.25, 0.0];
        update_bias(&mut b, &[6, 2, 4, 4], 0.01).expect("ok");
        assert_eq!(b, vec![-0.01, 0.51, -0.25, 0.0]);
        // Fractional mean 7/3: all three move.
        let mut b = vec![0.0; 3];
        update_bias(&mut b, &[1, 2, 4], 0.1).expect("ok");
        assert_eq!(b, vec![0.1, 0.1, -0.1]);
        // Balanced: nothing moves.
        let mut b = vec![0.3; 2];
        update_bias(&mut b, &[5, 5], 0.1).expect("ok");
        assert_eq!(b, vec![0.3, 0.3]);
        assert_eq!(
            update_bias(&mut b, &[1], 0.1),
            Err(BalanceError::Shape {
                field: "loads",
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn bias_update_balances_a_skewed_router() {
        // A router with fixed affinities that always prefers expert 0; the bias alone must spread the load.
        let affinity = [
            [0.9f32, 0.5, 0.4, 0.3],
            [0.8, 0.6, 0.2, 0.1],
            [0.7, 0.3, 0.5, 0.2],
            [0.95, 0.1, 0.3, 0.6],
        ];
        let mut bias = vec![0.0f32; 4];
        let route = |bias: &[f32]| -> Vec<usize> {
            affinity
                .iter()
                .map(|row| {
                    (0..4)
                        .max_by(|&i, &j| (row[i] + bias[i]).total_cmp(&(row[j] + bias[j])))
                        .unwrap_or(0)
                })
                .collect()
        };
        assert_eq!(
            expert_loads(&route(&bias), 4).expect("ok"),
            vec![4, 0, 0, 0]
        );
        for _ in 0..200 {
            let loads = expert_loads(&route(&bias), 4).expect("ok");
            update_bias(&mut bias, &loads, 0.01).expect("ok");
        }
        let loads = expert_loads(&route(&bias), 4).expect("ok");
        assert!(loads.iter().all(|&l| l <= 2), "still skewed: {loads:?}");
    }

    #[test]
    fn sequence_loss_by_hand() {
        // T = 2, N_r = 2, K_r = 1. Token 0: s = [0.6, 0.2] -> s' = [0.75, 0.25], picks 0.
        // Token 1: s = [0.3, 0.3] -> s' = [0.5, 0.5], picks 1. P = [0.625, 0.375].
        let s = [0.6, 0.2, 0.3, 0.3];
        // Balanced picks: f = [1, 1], L = alpha * (0.625 + 0.375) = alpha.
        assert!((sequence_balance_loss(&s, &[0, 1], 2, 1, 0.1).expect("ok") - 0.1).abs() < 1e-7);
        // Both tokens pick 0: f = [2, 0], L = alpha * 2 * 0.625.
        assert!((sequence_balance_loss(&s, &[0, 0], 2, 1, 0.1).expect("ok") - 0.125).abs() < 1e-7);
        // T = 1, N_r = 4, K_r = 2, s = [1, 1, 1, 1]: f = [2, 2, 0, 0], P = 1/4 each, L = alpha * 1.
        assert!(
            (sequence_balance_loss(&[1.0; 4], &[0, 1], 4, 2, 1.0).expect("ok") - 1.0).abs() < 1e-7
        );
        // T = 1, N_r = 3, K_r = 2, s = [0.5, 0.3, 0.2] picks {0, 1}: f = 1.5 * [1, 1, 0], L = 1.5 * 0.8.
        assert!(
            (sequence_balance_loss(&[0.5, 0.3, 0.2], &[0, 1], 3, 2, 1.0).expect("ok") - 1.2).abs()
                < 1e-6
        );
    }

    #[test]
    fn sequence_loss_rejects_bad_shapes() {
        let ragged = BalanceError::Ragged {
            field: "affinity",
            len: 5,
            row_len: 2,
        };
        assert_eq!(
            sequence_balance_loss(&[1.0; 5], &[0, 1], 2, 1, 1.0),
            Err(ragged)
        );
        let zero_k = sequence_balance_loss(&[1.0; 4], &[0, 1], 2, 0, 1.0);
        assert_eq!(zero_k, Err(BalanceError::Zero { field: "k" }));
        let zero_n = sequence_balance_loss(&[1.0; 4], &[0, 1], 0, 1, 1.0);
        assert_eq!(zero_n, Err(BalanceError::Zero { field: "n_experts" }));
        assert_eq!(
            sequence_balance_loss(&[1.0; 4], &[0], 2, 1, 1.0),
            Err(BalanceError::Shape {
                field: "topk",
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            sequence_balance_loss(&[0.0, 0.0], &[0], 2, 1, 1.0),
            Err(BalanceError::ZeroAffinity { token: 0 })
        );
        assert_eq!(
            sequence_balance_loss(&[1.0; 2], &[2], 2, 1, 1.0),
            Err(BalanceError::ExpertOutOfRange {
                index: 2,
                n_experts: 2
            })
        );
    }
}
