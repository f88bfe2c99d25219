//! Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024, eq. 3 and 4; DeepSeek-R1 eq. 1-3)
//! with the later fixes as options: token-level loss and asymmetric "clip-higher" (DAPO, Yu et al. 2025),
//! advantages without std scaling and a constant loss normalizer (Dr. GRPO, Liu et al. 2025), skipping
//! groups whose rewards are all equal, and masking truncated completions.
//!
//! Everything here is a pure function on log-probabilities the caller already has; the scalar version is
//! the oracle and [`grpo_loss_tensor`] is the autograd version used for training.
//!
//! Which std: TRL's `GRPOTrainer` computes `rewards.view(-1, G).std(dim=1)`, and torch's `std` is the
//! *sample* std (Bessel, divide by G - 1), with `eps = 1e-4` added to it. DeepSeekMath only writes
//! `std(r)`. [`StdKind`] offers both; [`AdvantageNorm::trl`] is the TRL choice.

use candle_core::{D, DType, Tensor};
use thiserror::Error;

/// Errors from malformed GRPO inputs.
#[derive(Debug, Error, PartialEq)]
pub enum GrpoError {
    /// The rewards do not split into whole groups.
    #[error("{len} rewards do not split into groups of {group_size}")]
    GroupSize { len: usize, group_size: usize },
    /// Two per-token arrays of one completion differ in length.
    #[error("completion {index}: {field} has {found} tokens, logp has {expected}")]
    LengthMismatch {
        index: usize,
        field: &'static str,
        expected: usize,
        found: usize,
    },
    /// `beta > 0` but a completion has no reference log-probabilities.
    #[error("completion {index}: beta = {beta} needs ref_logp")]
    MissingReference { index: usize, beta: f64 },
    /// A completion is longer than the constant normalizer of Dr. GRPO.
    #[error("completion {index} has {len} tokens, more than max_len = {max_len}")]
    TooLong {
        index: usize,
        len: usize,
        max_len: usize,
    },
}

/// How the group standard deviation is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdKind {
    /// Divide by G: `sqrt(mean((r - mean)^2))`.
    Population,
    /// Divide by G - 1 (torch's default, hence TRL's); 0 for a group of one.
    Sample,
}

/// How rewards become advantages within a group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdvantageNorm {
    /// `(r - mean) / (std + eps)` (GRPO).
    StdScaled {
        /// Which std.
        std: StdKind,
        /// Added to the std so equal-reward groups do not divide by zero.
        eps: f64,
    },
    /// `r - mean` (Dr. GRPO: the std scaling biases toward too-easy and too-hard questions).
    MeanOnly,
}

impl AdvantageNorm {
    /// TRL's choice: sample std, `eps = 1e-4`.
    pub fn trl() -> Self {
        AdvantageNorm::StdScaled {
            std: StdKind::Sample,
            eps: 1e-4,
        }
    }
}

fn groups(rewards: &[f32], group_size: usize) -> Result<std::slice::Chunks<'_, f32>, GrpoError> {
    if group_size == 0 || !rewards.len().is_multiple_of(group_size) {
        return Err(GrpoError::GroupSize {
            len: rewards.len(),
            group_size,
        });
    }
    Ok(rewards.chunks(group_size))
}

/// Advantages for consecutive groups of `group_size` completions of the same prompt.
pub fn group_advantages(
    rewards: &[f32],
    group_size: usize,
    norm: AdvantageNorm,
) -> Result<Vec<f32>, GrpoError> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in groups(rewards, group_size)? {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
        let scale = match norm {
            AdvantageNorm::MeanOnly => 1.0,
            AdvantageNorm::StdScaled { std, eps } => {
                let ss: f64 = g.iter().map(|&r| (f64::from(r) - mean).powi(2)).sum();
                let var = match std {
                    StdKind::Population => ss / n,
                    StdKind::Sample if g.len() > 1 => ss / (n - 1.0),
                    StdKind::Sample => 0.0,
                };
                1.0 / (var.sqrt() + eps)
            }
        };
        out.extend(g.iter().map(|&r| ((f64::from(r) - mean) * scale) as f32));
    }
    Ok(out)
}

/// One flag per group: true when every reward in it is equal, so it carries no learning signal.
pub fn zero_variance_groups(rewards: &[f32], group_size: usize) -> Result<Vec<bool>, GrpoError> {
    Ok(groups(rewards, group_size)?
        .map(|g| g.iter().all(|&r| r == g[0]))
        .collect())
}

/// One flag per completion: false when its group should be skipped (all rewards equal; DAPO's filter).
/// The caller drops those rollouts before [`grpo_loss`], so they do not dilute the normalizer.
pub fn informative_completions(rewards: &[f32], group_size: usize) -> Result<Vec<bool>, GrpoError> {
    let flat = zero_variance_groups(rewards, group_size)?;
    Ok(flat
        .iter()
        .flat_map(|&zero| std::iter::repeat_n(!zero, group_size))
        .collect())
}

/// The clip range of the importance ratio: `[1 - low, 1 + high]` (DAPO raises `high` above `low`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    /// `eps_low`.
    pub low: f64,
    /// `eps_high`.
    pub high: f64,
}

impl Clip {
    /// The same epsilon on both sides (PPO, original GRPO).
    pub fn symmetric(eps: f64) -> Self {
        Self {
            low: eps,
            high: eps,
        }
    }
}

/// The per-token clipped surrogate `min(ratio * A, clip(ratio, 1 - low, 1 + high) * A)` (to maximize).
pub fn clipped_surrogate(ratio: f64, advantage: f64, clip: Clip) -> f64 {
    (ratio * advantage).min(ratio.clamp(1.0 - clip.low, 1.0 + clip.high) * advantage)
}

/// True when the clipped branch wins strictly, i.e. this token gives no gradient (TRL's clip ratio).
pub fn is_clipped(ratio: f64, advantage: f64, clip: Clip) -> bool {
    (advantage > 0.0 && ratio > 1.0 + clip.high) || (advantage < 0.0 && ratio < 1.0 - clip.low)
}

/// Schulman's k3 estimator of KL(policy || reference) from one sample: `exp(ref - logp) - (ref - logp) - 1`.
pub fn k3_kl(logp: f64, ref_logp: f64) -> f64 {
    let d = ref_logp - logp;
    d.exp() - d - 1.0
}

/// How per-token losses are reduced to one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossAggregation {
    /// Mean over each completion's tokens, then over completions (GRPO; favours short wrong answers).
    SequenceMean,
    /// Mean over all tokens of the batch (DAPO's token-level loss).
    TokenMean,
    /// Sum over all tokens divided by `completions * max_len`, a constant (Dr. GRPO); masked
    /// completions still count in `completions`, so the divisor never depends on the samples.
    ConstantNorm {
        /// The generation budget in tokens.
        max_len: usize,
    },
}

/// The GRPO objective's options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// The ratio clip range.
    pub clip: Clip,
    /// Weight of the k3 KL penalty to the reference (0 disables it and the reference pass).
    pub beta: f64,
    /// The reduction.
    pub aggregation: LossAggregation,
    /// Give truncated completions (no end of sequence within budget) no weight (DAPO's overlong filter).
    pub mask_truncated: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        // DeepSeekMath's GRPO: eps = 0.2, beta = 0.04, sequence mean.
        Self {
            clip: Clip::symmetric(0.2),
            beta: 0.04,
            aggregation: LossAggregation::SequenceMean,
            mask_truncated: false,
        }
    }
}

/// One sampled completion's per-token log-probabilities (no padding) and its advantage.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    /// Under the policy being optimized.
    pub logp: &'a [f32],
    /// Under the policy that sampled it.
    pub old_logp: &'a [f32],
    /// Under the frozen reference; may be `None` when `beta == 0`.
    pub ref_logp: Option<&'a [f32]>,
    /// The group-relative advantage, shared by every token.
    pub advantage: f32,
    /// Hit the length budget without finishing.
    pub truncated: bool,
}

/// The loss and what to log about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// The number to minimize: the aggregate of `-(surrogate - beta * kl)`.
    pub loss: f64,
    /// Mean k3 KL over counted tokens.
    pub kl: f64,
    /// Share of counted tokens whose ratio was clipped.
    pub clip_fraction: f64,
    /// Tokens that entered the loss.
    pub tokens: usize,
}

/// The GRPO loss on plain slices: the oracle for [`grpo_loss_tensor`] and the logging path.
pub fn grpo_loss(rollouts: &[Rollout], cfg: &GrpoConfig) -> Result<LossReport, GrpoError> {
    let (mut total, mut seq_mean_sum, mut seqs, mut tokens, mut kl_sum, mut clipped) =
        (0.0, 0.0, 0usize, 0usize, 0.0, 0usize);
    for (index, r) in rollouts.iter().enumerate() {
        let n = r.logp.len();
        check_len(index, "old_logp", n, r.old_logp.len())?;
        if let Some(rl) = r.ref_logp {
            check_len(index, "ref_logp", n, rl.len())?;
        } else if cfg.beta != 0.0 {
            return Err(GrpoError::MissingReference {
                index,
                beta: cfg.beta,
            });
        }
        if let LossAggregation::ConstantNorm { max_len } = cfg.aggregation
            && n > max_len
        {
            return Err(GrpoError::TooLong {
                index,
                len: n,
                max_len,
            });
        }
        if (cfg.mask_truncated && r.truncated) || n == 0 {
            continue;
        }
        let adv = f64::from(r.advantage);
        let mut seq_sum = 0.0;
        for t in 0..n {
            let (lp, old) = (f64::from(r.logp[t]), f64::from(r.old_logp[t]));
            let ratio = (lp - old).exp();
            let kl = r.ref_logp.map_or(0.0, |rl| k3_kl(lp, f64::from(rl[t])));
            seq_sum += -(clipped_surrogate(ratio, adv, cfg.clip) - cfg.beta * kl);
            kl_sum += kl;
            clipped += usize::from(is_clipped(ratio, adv, cfg.clip));
        }
        total += seq_sum;
        seq_mean_sum += seq_sum / n as f64;
        seqs += 1;
        tokens += n;
    }
    let loss = match cfg.aggregation {
        _ if tokens == 0 => 0.0,
        LossAggregation::SequenceMean => seq_mean_sum / seqs as f64,
        LossAggregation::TokenMean => total / tokens as f64,
        LossAggregation::ConstantNorm { max_len } => total / (rollouts.len() * max_len) as f64,
    };
    let per_token = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };
    Ok(LossReport {
        loss,
        kl: per_token(kl_sum),
        clip_fraction: per_token(clipped as f64),
        tokens,
    })
}

fn check_len(
    index: usize,
    field: &'static str,
    expected: usize,
    found: usize,
) -> Result<(), GrpoError> {
    if expected == found {
        Ok(())
    } else {
        Err(GrpoError::LengthMismatch {
            index,
            field,
            expected,
            found,
        })
    }
}

/// A padded batch of completions as tensors, for [`grpo_loss_tensor`].
#[derive(Debug, Clone, Copy)]
pub struct TensorBatch<'a> {
    /// Policy log-probabilities, differentiable. `// (batch, seq)`
    pub logp: &'a Tensor,
    /// Sampling-policy log-probabilities, treated as constants. `// (batch, seq)`
    pub old_logp: &'a Tensor,
    /// Reference log-probabilities, constants; needed when `beta != 0`. `// (batch, seq)`
    pub ref_logp: Option<&'a Tensor>,
    /// One advantage per completion. `// (batch,)`
    pub advantages: &'a Tensor,
    /// 1 for completion tokens, 0 for padding. `// (batch, seq)`
    pub mask: &'a Tensor,
    /// One flag per completion: hit the length budget.
    pub truncated: &'a [bool],
}

/// The GRPO loss as a differentiable scalar tensor; agrees with [`grpo_loss`] on the same data.
pub fn grpo_loss_tensor(b: &TensorBatch, cfg: &GrpoConfig) -> candle_core::Result<Tensor> {
    let (batch, _seq) = b.logp.dims2()?;
    if b.truncated.len() != batch {
        candle_core::bail!(
            "truncated has {} flags for a batch of {batch}",
            b.truncated.len()
        );
    }
    let dtype = b.logp.dtype();
    let keep: Vec<f64> = b
        .truncated
        .iter()
        .map(|&t| if cfg.mask_truncated && t { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::from_vec(keep, (batch, 1), b.logp.device())?.to_dtype(dtype)?;
    let mask = b.mask.to_dtype(dtype)?.broadcast_mul(&keep)?; // (batch, seq)

    let ratio = (b.logp - b.old_logp.detach())?.exp()?; // (batch, seq)
    let adv = b.advantages.to_dtype(dtype)?.detach().unsqueeze(1)?; // (batch, 1)
    let unclipped = ratio.broadcast_mul(&adv)?;
    let clipped = ratio
        .clamp(1.0 - cfg.clip.low, 1.0 + cfg.clip.high)?
        .broadcast_mul(&adv)?;
    let mut per_token = unclipped.minimum(&clipped)?.neg()?; // (batch, seq)
    if cfg.beta != 0.0 {
        let Some(ref_logp) = b.ref_logp else {
            candle_core::bail!("beta = {} needs ref_logp", cfg.beta)
        };
        let d = (ref_logp.detach() - b.logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    let per_token = (per_token * &mask)?; // (batch, seq)

    let tokens = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    if tokens == 0.0 {
        return per_token.sum_all()?.affine(0.0, 0.0);
    }
    match cfg.aggregation {
        LossAggregation::TokenMean => per_token.sum_all()? / tokens,
        LossAggregation::ConstantNorm { max_len } => {
            per_token.sum_all()? / (batch * max_len) as f64
        }
        LossAggregation::SequenceMean => {
            let lens = mask.sum(D::Minus1)?; // (batch,)
            let nonempty = lens
                .gt(0.0)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            let seq_means = (per_token.sum(D::Minus1)? / lens.clamp(1.0, f64::INFINITY)?)?; // (batch,)
            seq_means.sum_all()? / nonempty
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn advantages_by_hand() {
        // Group [1, 0, 0, 1]: mean 0.5, population std 0.5, sample std sqrt(1/3) = 0.57735.
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0];
        let pop = group_advantages(
            &r,
            4,
            AdvantageNorm::StdScaled {
                std: StdKind::Population,
                eps: 0.0,
            },
        )
        .expect("ok");
        assert_eq!(&pop[..4], &[1.0, -1.0, -1.0, 1.0]);
        let samp = group_advantages(
            &r,
            4,
            AdvantageNorm::StdScaled {
                std: StdKind::Sample,
                eps: 0.0,
            },
        )
        .expect("ok");
        let s = 0.5 / (1.0f64 / 3.0).sqrt();
        for (got, want) in samp[..4].iter().zip([s, -s, -s, s]) {
            assert!(close(f64::from(*got), want, 1e-6), "{got} vs {want}");
        }
        // An all-equal group has zero advantages whatever the normalization (eps keeps it finite).
        let trl = group_advantages(&r, 4, AdvantageNorm::trl()).expect("ok");
        assert_eq!(&trl[4..], &[0.0; 4]);
        assert!(close(
            f64::from(trl[0]),
            0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4),
            1e-6
        ));
        // Dr. GRPO: only the mean is removed. Group [3, 1]: mean 2.
        let dr = group_advantages(&[3.0, 1.0, 0.0, 1.0], 2, AdvantageNorm::MeanOnly).expect("ok");
        assert_eq!(dr, vec![1.0, -1.0, -0.5, 0.5]);
        // Population std for [0, 0, 0, 1]: mean 0.25, std sqrt(3)/4.
        let p = group_advantages(
            &[0.0, 0.0, 0.0, 1.0],
            4,
            AdvantageNorm::StdScaled {
                std: StdKind::Population,
                eps: 0.0,
            },
        )
        .expect("ok");
        let sd = 3f64.sqrt() / 4.0;
        assert!(
            close(f64::from(p[3]), 0.75 / sd, 1e-6) && close(f64::from(p[0]), -0.25 / sd, 1e-6)
        );
        // A sample std of a group of one is taken as 0.
        assert_eq!(
            group_advantages(&[5.0], 1, AdvantageNorm::trl()).expect("ok"),
            vec![0.0]
        );
    }

    #[test]
    fn bad_group_sizes() {
        assert_eq!(
            group_advantages(&[1.0; 5], 2, AdvantageNorm::MeanOnly),
            Err(GrpoError::GroupSize {
                len: 5,
                group_size: 2
            })
        );
        assert_eq!(
            zero_variance_groups(&[1.0; 4], 0),
            Err(GrpoError::GroupSize {
                len: 4,
                group_size: 0
            })
        );
    }

    #[test]
    fn zero_variance_detection() {
        let r = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5];
        assert_eq!(
            zero_variance_groups(&r, 2).expect("ok"),
            vec![true, true, false, true]
        );
        assert_eq!(
            informative_completions(&r, 2).expect("ok"),
            vec![false, false, false, false, true, true, false, false]
        );
    }

    #[test]
    fn surrogate_and_clipping_by_hand() {
        let c = Clip {
            low: 0.2,
            high: 0.28,
        };
        // A > 0: capped at (1 + high) * A once the ratio passes it; below 1 - low nothing is capped.
        assert!(close(clipped_surrogate(1.5, 2.0, c), 1.28 * 2.0, 1e-12));
        assert!(close(clipped_surrogate(0.5, 2.0, c), 1.0, 1e-12));
        assert!(is_clipped(1.5, 2.0, c) && !is_clipped(0.5, 2.0, c) && !is_clipped(1.1, 2.0, c));
        // A < 0: the pessimistic bound is ratio * A above 1 + high, (1 - low) * A below 1 - low.
        assert!(close(clipped_surrogate(1.5, -1.0, c), -1.5, 1e-12));
        assert!(close(clipped_surrogate(0.5, -1.0, c), -0.8, 1e-12));
        assert!(is_clipped(0.5, -1.0, c) && !is_clipped(1.5, -1.0, c));
        // Asymmetry: ratio 1.25 is clipped with eps 0.2 but not with eps_high 0.28.
        assert!(is_clipped(1.25, 1.0, Clip::symmetric(0.2)) && !is_clipped(1.25, 1.0, c));
        assert_eq!(clipped_surrogate(1.1, 0.0, c), 0.0);
    }

    #[test]
    fn k3_by_hand() {
        assert_eq!(k3_kl(-1.0, -1.0), 0.0);
        // ref - logp = 1: e - 2.
        assert!(close(k3_kl(-2.0, -1.0), std::f64::consts::E - 2.0, 1e-12));
        // ref - logp = -1: 1/e.
        assert!(close(k3_kl(-1.0, -2.0), (-1.0f64).exp(), 1e-12));
        for d in [-3.0, -0.1, 0.4, 2.0] {
            assert!(k3_kl(0.0, d) > 0.0);
        }
    }

    /// Two completions at ratio 1 (logp == old_logp), so each token's surrogate is exactly A.
    fn on_policy() -> (Vec<Vec<f32>>, [f32; 2]) {
        (
            vec![vec![-1.0, -1.0], vec![-0.5, -0.5, -0.5, -0.5]],
            [1.0, -0.5],
        )
    }

    #[test]
    fn aggregations_by_hand() {
        let (lp, adv) = on_policy();
        let rollouts: Vec<Rollout> = (0..2)
            .map(|i| Rollout {
                logp: &lp[i],
                old_logp: &lp[i],
                ref_logp: None,
                advantage: adv[i],
                truncated: i == 1,
            })
            .collect();
        let cfg = |aggregation, mask_truncated| GrpoConfig {
            clip: Clip::symmetric(0.2),
            beta: 0.0,
            aggregation,
            mask_truncated,
        };
        let loss = |a, m| grpo_loss(&rollouts, &cfg(a, m)).expect("ok").loss;
        // Per-token losses: -1 (x2) and +0.5 (x4).
        assert!(close(
            loss(LossAggregation::SequenceMean, false),
            (-1.0 + 0.5) / 2.0,
            1e-12
        ));
        assert!(close(
            loss(LossAggregation::TokenMean, false),
            (-2.0 + 2.0) / 6.0,
            1e-12
        ));
        assert!(close(
            loss(LossAggregation::ConstantNorm { max_len: 8 }, false),
            0.0,
            1e-12
        ));
        // Masking the truncated second completion leaves only the first.
        assert!(close(
            loss(LossAggregation::SequenceMean, true),
            -1.0,
            1e-12
        ));
        assert!(close(loss(LossAggregation::TokenMean, true), -1.0, 1e-12));
        // The constant stays 2 * 8 even though one completion is masked.
        assert!(close(
            loss(LossAggregation::ConstantNorm { max_len: 8 }, true),
            -2.0 / 16.0,
            1e-12
        ));
        let r = grpo_loss(&rollouts, &cfg(LossAggregation::TokenMean, true)).expect("ok");
        assert_eq!((r.tokens, r.kl, r.clip_fraction), (2, 0.0, 0.0));
        // Everything masked: a zero loss, not a NaN.
        let all = [Rollout {
            truncated: true,
            ..rollouts[1]
        }];
        assert_eq!(
            grpo_loss(&all, &cfg(LossAggregation::SequenceMean, true))
                .expect("ok")
                .loss,
            0.0
        );
    }

    #[test]
    fn kl_and_clip_fraction_by_hand() {
        // One token, ratio e^0.5 = 1.6487 > 1.2 with A = 1: clipped to 1.2. ref - logp = 1: kl = e - 2.
        let (lp, old, rf) = ([-1.0f32, -1.0], [-1.5f32, -1.0], [0.0f32, -1.0]);
        let r = [Rollout {
            logp: &lp,
            old_logp: &old,
            ref_logp: Some(&rf),
            advantage: 1.0,
            truncated: false,
        }];
        let cfg = GrpoConfig {
            clip: Clip::symmetric(0.2),
            beta: 0.1,
            aggregation: LossAggregation::TokenMean,
            mask_truncated: false,
        };
        let rep = grpo_loss(&r, &cfg).expect("ok");
        let kl0 = std::f64::consts::E - 2.0;
        assert!(close(rep.kl, kl0 / 2.0, 1e-6));
        assert_eq!(rep.clip_fraction, 0.5);
        let want = (-(1.2 - 0.1 * kl0) + -(1.0 - 0.0)) / 2.0;
        assert!(close(rep.loss, want, 1e-6), "{} vs {want}", rep.loss);
    }

    #[test]
    fn malformed_rollouts_are_errors() {
        let (a, b) = ([0.0f32; 3], [0.0f32; 2]);
        let bad = [Rollout {
            logp: &a,
            old_logp: &b,
            ref_logp: None,
            advantage: 1.0,
            truncated: false,
        }];
        let cfg = GrpoConfig {
            beta: 0.0,
            ..GrpoConfig::default()
        };
        assert_eq!(
            grpo_loss(&bad, &cfg),
            Err(GrpoError::LengthMismatch {
                index: 0,
                field: "old_logp",
                expected: 3,
                found: 2
            })
        );
        let no_ref = [Rollout {
            logp: &a,
            old_logp: &a,
            ref_logp: None,
            advantage: 1.0,
            truncated: false,
        }];
        assert_eq!(
            grpo_loss(&no_ref, &GrpoConfig::default()),
            Err(GrpoError::MissingReference {
                index: 0,
                beta: 0.04
            })
        );
        let short = GrpoConfig {
            aggregation: LossAggregation::ConstantNorm { max_len: 2 },
            ..cfg
        };
        assert_eq!(
            grpo_loss(&no_ref, &short),
            Err(GrpoError::TooLong {
                index: 0,
                len: 3,
                max_len: 2
            })
        );
    }

    /// A padded batch of three completions (lengths 3, 2, 4), with ratios inside, above and below the clip range.
    struct Fixture {
        logp: Vec<f64>,
        old: Vec<f64>,
        reference: Vec<f64>,
        adv: Vec<f64>,
        lens: Vec<usize>,
        truncated: Vec<bool>,
    }

    const SEQ: usize = 4;

    fn fixture() -> Fixture {
        Fixture {
            logp: vec![
                -1.0, -0.7, -2.0, 0.0, -0.3, -1.2, 0.0, 0.0, -0.9, -0.4, -1.5, -0.2,
            ],
            old: vec![
                -1.1, -1.0, -1.9, 0.0, -0.8, -1.25, 0.0, 0.0, -0.5, -0.45, -1.4, -0.9,
            ],
            reference: vec![
                -1.3, -0.6, -2.2, 0.0, -0.2, -1.0, 0.0, 0.0, -1.0, -0.3, -1.2, -0.4,
            ],
            adv: vec![0.8, -1.3, 0.5],
            lens: vec![3, 2, 4],
            truncated: vec![false, false, true],
        }
    }

    fn scalar_loss(f: &Fixture, logp: &[f64], cfg: &GrpoConfig) -> f64 {
        let cast = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let (lp, old, rf) = (cast(logp), cast(&f.old), cast(&f.reference));
        let rollouts: Vec<Rollout> = (0..3)
            .map(|i| {
                let s = i * SEQ..i * SEQ + f.lens[i];
                Rollout {
                    logp: &lp[s.clone()],
                    old_logp: &old[s.clone()],
                    ref_logp: Some(&rf[s]),
                    advantage: f.adv[i] as f32,
                    truncated: f.truncated[i],
                }
            })
            .collect();
        grpo_loss(&rollouts, cfg).expect("ok").loss
    }

    fn tensor_loss(f: &Fixture, logp: &Tensor, cfg: &GrpoConfig) -> Tensor {
        let dev = Device::Cpu;
        let t = |v: &[f64]| Tensor::from_slice(v, (3, SEQ), &dev).expect("tensor");
        let mask: Vec<f64> = (0..3 * SEQ)
            .map(|i| if i % SEQ < f.lens[i / SEQ] { 1.0 } else { 0.0 })
            .collect();
        let (old, rf, mask) = (t(&f.old), t(&f.reference), t(&mask));
        let adv = Tensor::from_slice(&f.adv, 3, &dev).expect("tensor");
        let b = TensorBatch {
            logp,
            old_logp: &old,
            ref_logp: Some(&rf),
            advantages: &adv,
            mask: &mask,
            truncated: &f.truncated,
        };
        grpo_loss_tensor(&b, cfg).expect("loss")
    }

    fn configs() -> Vec<GrpoConfig> {
        let mut out = Vec::new();
        for aggregation in [
            LossAggregation::SequenceMean,
            LossAggregation::TokenMean,
            LossAggregation::ConstantNorm { max_len: 6 },
        ] {
            for mask_truncated in [false, true] {
                for beta in [0.0, 0.05] {
                    out.push(GrpoConfig {
                        clip: Clip {
                            low: 0.2,
                            high: 0.28,
                        },
                        beta,
                        aggregation,
                        mask_truncated,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn tensor_loss_matches_scalar_oracle() {
        let f = fixture();
        let logp = Tensor::from_slice(&f.logp, (3, SEQ), &Device::Cpu).expect("tensor");
        for cfg in configs() {
            let t = tensor_loss(&f, &logp, &cfg)
                .to_scalar::<f64>()
                .expect("scalar");
            let s = scalar_loss(&f, &f.logp, &cfg);
            assert!(close(t, s, 1e-6), "{cfg:?}: tensor {t} vs scalar {s}");
        }
    }

    #[test]
    fn tensor_gradient_matches_finite_differences() {
        let f = fixture();
        let h = 1e-6;
        for cfg in configs() {
            let var = Var::from_slice(&f.logp, (3, SEQ), &Device::Cpu).expect("var");
            let loss = tensor_loss(&f, var.as_tensor(), &cfg);
            let grads = loss.backward().expect("backward");
            let g = grads
                .get(&var)
                .expect("grad")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("vec");
            let eval = |x: &[f64]| {
                let t = Tensor::from_slice(x, (3, SEQ), &Device::Cpu).expect("tensor");
                tensor_loss(&f, &t, &cfg)
                    .to_scalar::<f64>()
                    .expect("scalar")
            };
            for i in 0..3 * SEQ {
                let (mut up, mut down) = (f.logp.clone(), f.logp.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (eval(&up) - eval(&down)) / (2.0 * h);
                assert!(
                    close(g[i], fd, 1e-5),
                    "{cfg:?} token {i}: autograd {} vs finite difference {fd}",
                    g[i]
                );
            }
            // Padding, masked completions and clipped tokens get exactly zero gradient.
            assert_eq!(g[3], 0.0);
            // Token 1 of completion 0 has ratio e^0.3 > 1 + eps_high with A > 0: clipped, so only KL pulls on it.
            if cfg.beta == 0.0 {
                assert_eq!(g[1], 0.0);
            }
            if cfg.mask_truncated {
                assert!(g[8..12].iter().all(|&x| x == 0.0));
            }
        }
    }
}
