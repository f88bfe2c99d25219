//! The JSON files that describe a training run: [`PretrainConfig`] for `tiefsee train pretrain`
//! and [`GrpoRunConfig`] for `tiefsee train grpo`, plus the [`TaskSpec`] recorded beside every
//! checkpoint so that evaluation knows which task a model was trained on.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and every numeric
//! field is range-checked with a message naming it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::grpo::{AdvantageNorm, Clip, GrpoConfig, LossAggregation, StdKind};
use crate::task::{CorpusMix, Op, TaskConfig};

/// A task by name and parameters, as stored in configs and in `task.json` beside checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// A name for reports, e.g. `arithmetic`.
    pub name: String,
    /// Operations as written in prompts: any of `+`, `-`, `*`.
    pub ops: String,
    pub min_digits: u32,
    pub max_digits: u32,
    /// Percent of all problems reserved for evaluation.
    pub held_out_percent: u8,
}

impl TaskSpec {
    /// The built-in tasks `tiefsee eval --task NAME` knows.
    pub fn named(name: &str) -> Result<Self> {
        let spec = |ops: &str, min_digits, max_digits| Self {
            name: name.to_string(),
            ops: ops.to_string(),
            min_digits,
            max_digits,
            held_out_percent: 10,
        };
        Ok(match name {
            "arithmetic" => spec("+-", 1, 4),
            "addition" => spec("+", 1, 4),
            "subtraction" => spec("-", 1, 4),
            "multiplication" => spec("*", 1, 3),
            _ => {
                return Err(TrainError::Config {
                    field: "task".into(),
                    reason: format!(
                        "unknown task {name:?}; known: arithmetic, addition, subtraction, multiplication"
                    ),
                });
            }
        })
    }

    /// The problem generator's configuration.
    pub fn task_config(&self) -> Result<TaskConfig> {
        let ops = self
            .ops
            .chars()
            .map(|c| match c {
                '+' => Ok(Op::Add),
                '-' => Ok(Op::Sub),
                '*' => Ok(Op::Mul),
                other => Err(TrainError::Config {
                    field: "task.ops".into(),
                    reason: format!("{other:?} is not one of + - *"),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = TaskConfig {
            ops,
            min_digits: self.min_digits,
            max_digits: self.max_digits,
            held_out_percent: self.held_out_percent,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Relative weights of the corpus item kinds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSpec {
    pub direct: u32,
    pub scratchpad: u32,
    pub flawed: u32,
}

impl From<MixSpec> for CorpusMix {
    fn from(m: MixSpec) -> Self {
        CorpusMix {
            direct: m.direct,
            scratchpad: m.scratchpad,
            flawed: m.flawed,
        }
    }
}

/// AdamW with linear warm-up and cosine decay, and global-norm gradient clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSpec {
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Learning rate at the last step (cosine decay from `lr`).
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it. 0 disables.
    pub grad_clip: f64,
}

impl OptimSpec {
    fn validate(&self, prefix: &str) -> Result<()> {
        let positive = [("lr", self.lr), ("eps", self.eps)];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(prefix, name, format!("= {v} must be positive")));
            }
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(bad(
                prefix,
                "min_lr",
                format!("= {} must be in 0..=lr", self.min_lr),
            ));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(prefix, name, format!("= {v} must be in [0, 1)")));
            }
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(prefix, name, format!("= {v} must be at least 0")));
            }
        }
        Ok(())
    }
}

fn bad(prefix: &str, field: &str, reason: String) -> TrainError {
    TrainError::Config {
        field: format!("{prefix}{field}"),
        reason,
    }
}

/// `tiefsee train pretrain --config FILE`: a model trained from scratch on the task corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// Seeds initialization and the corpus; the same config reproduces the same run.
    pub seed: u64,
    /// The model's `config.json` (a `DeepseekV3ForCausalLM`); `vocab_size` must match the tokenizer.
    pub model: serde_json::Value,
    pub task: TaskSpec,
    pub corpus: MixSpec,
    pub steps: usize,
    /// Documents per step.
    pub batch_size: usize,
    pub optim: OptimSpec,
    /// Standard deviation of the normal initialization of weight matrices.
    pub init_std: f64,
    /// Weight of the MTP loss (V3's lambda; 0 trains the MTP layer not at all).
    pub mtp_weight: f64,
    /// Weight of the sequence-wise balance loss (V3's alpha).
    pub balance_alpha: f64,
    /// Bias update speed of auxiliary-loss-free balancing (V3's gamma).
    pub bias_update_speed: f64,
    /// Steps between checkpoints (the last step always saves).
    pub checkpoint_every: usize,
}

impl PretrainConfig {
    /// Reads and checks a config file.
    pub fn read(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks with messages naming the field.
    pub fn validate(&self) -> Result<()> {
        self.task.task_config()?;
        for (name, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(bad("", name, "must be at least 1".into()));
            }
        }
        for (name, v) in [
            ("init_std", self.init_std),
            ("mtp_weight", self.mtp_weight),
            ("balance_alpha", self.balance_alpha),
            ("bias_update_speed", self.bias_update_speed),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad("", name, format!("= {v} must be at least 0")));
            }
        }
        if self.corpus.direct + self.corpus.scratchpad + self.corpus.flawed == 0 {
            return Err(bad("corpus.", "direct", "all weights are zero".into()));
        }
        self.optim.validate("optim.")
    }
}

/// Which rewards GRPO optimizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardSpec {
    /// Accuracy plus `format_weight` times the format reward (R1-Zero).
    AccuracyAndFormat,
    /// Accuracy only (the ablation).
    Accuracy,
}

/// How per-token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationSpec {
    /// GRPO's mean per completion, then over completions.
    Sequence,
    /// DAPO's mean over all tokens.
    Token,
    /// Dr. GRPO's sum over a constant `completions * max_completion_tokens`.
    Constant,
}

/// `tiefsee train grpo --model DIR --config FILE`: R1-Zero-style RL from a pretrained checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoRunConfig {
    /// Seeds the prompts and the sampling.
    pub seed: u64,
    pub steps: usize,
    /// Distinct prompts per step.
    pub prompts_per_step: usize,
    /// Completions sampled per prompt (G).
    pub group_size: usize,
    /// Generation budget per completion, in tokens.
    pub max_completion_tokens: usize,
    /// Sampling temperature of the rollouts.
    pub temperature: f32,
    pub optim: OptimSpec,
    /// KL penalty weight to the frozen starting model (0 skips the reference pass).
    pub beta: f64,
    /// Lower clip range of the ratio (eps).
    pub clip_low: f64,
    /// Upper clip range of the ratio (DAPO's clip-higher when larger than `clip_low`).
    pub clip_high: f64,
    pub aggregation: AggregationSpec,
    /// Divide advantages by the group's std (false: Dr. GRPO).
    pub std_scaling: bool,
    /// Drop groups whose rewards are all equal (they carry no signal).
    pub skip_zero_variance_groups: bool,
    /// Give completions that hit the budget without finishing no weight.
    pub mask_truncated: bool,
    pub rewards: RewardSpec,
    /// Weight of the format reward in the total.
    pub format_weight: f32,
    /// Gradient steps on each batch of rollouts (mu); the ratio departs from 1 from the second on.
    pub updates_per_batch: usize,
    /// Steps between held-out greedy evaluations logged in the CSV (0: only at the end).
    pub eval_every: usize,
    /// Held-out problems in those evaluations.
    pub eval_problems: usize,
    /// Steps between checkpoints (the last step always saves).
    pub checkpoint_every: usize,
}

impl GrpoRunConfig {
    /// Reads and checks a config file.
    pub fn read(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks with messages naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("steps", self.steps),
            ("prompts_per_step", self.prompts_per_step),
            ("max_completion_tokens", self.max_completion_tokens),
            ("updates_per_batch", self.updates_per_batch),
            ("eval_problems", self.eval_problems),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(bad("", name, "must be at least 1".into()));
            }
        }
        if self.group_size < 2 {
            return Err(bad(
                "",
                "group_size",
                format!("= {} must be at least 2", self.group_size),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad(
                "",
                "temperature",
                format!("= {} must be positive", self.temperature),
            ));
        }
        if !(self.clip_low > 0.0 && self.clip_low < 1.0) {
            return Err(bad(
                "",
                "clip_low",
                format!("= {} must be in (0, 1)", self.clip_low),
            ));
        }
        if !(self.clip_high.is_finite() && self.clip_high > 0.0) {
            return Err(bad(
                "",
                "clip_high",
                format!("= {} must be positive", self.clip_high),
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(bad(
                "",
                "beta",
                format!("= {} must be at least 0", self.beta),
            ));
        }
        if !(self.format_weight.is_finite() && self.format_weight >= 0.0) {
            return Err(bad(
                "",
                "format_weight",
                format!("= {} must be at least 0", self.format_weight),
            ));
        }
        self.optim.validate("optim.")
    }

    /// The loss options of [`crate::grpo`].
    pub fn loss(&self) -> GrpoConfig {
        GrpoConfig {
            clip: Clip {
                low: self.clip_low,
                high: self.clip_high,
            },
            beta: self.beta,
            aggregation: match self.aggregation {
                AggregationSpec::Sequence => LossAggregation::SequenceMean,
                AggregationSpec::Token => LossAggregation::TokenMean,
                AggregationSpec::Constant => LossAggregation::ConstantNorm {
                    max_len: self.max_completion_tokens,
                },
            },
            mask_truncated: self.mask_truncated,
        }
    }

    /// The advantage normalization: TRL's (sample std, eps 1e-4) or none.
    pub fn advantage_norm(&self) -> AdvantageNorm {
        if self.std_scaling {
            AdvantageNorm::StdScaled {
                std: StdKind::Sample,
                eps: 1e-4,
            }
        } else {
            AdvantageNorm::MeanOnly
        }
    }
}

/// Reads a JSON file into `T`, naming the file and the offending key on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::Config {
        field: path.display().to_string(),
        reason: e.to_string(),
    })
}
