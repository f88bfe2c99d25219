//! The GRPO loop (R1-Zero style): sample a group of completions per training prompt, score them
//! with the rule-based rewards, turn rewards into group-relative advantages, and take clipped
//! policy-gradient steps with an optional k3 KL penalty to the frozen starting model.
//!
//! During RL the router biases stay frozen and the balance and MTP losses are off. Each step's
//! prompts and sampling seeds are a function of (seed, step), so a resumed run continues exactly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use tiefsee_engine::SamplingParams;
use tiefsee_tokenizer::Tokenizer;

use crate::checkpoint::{self, TrainerState};
use crate::config::{GrpoRunConfig, RewardSpec, TaskSpec};
use crate::error::{Result, TrainError};
use crate::eval::{EvalOptions, completion_text, evaluate, thinks};
use crate::grpo::{Rollout, TensorBatch, group_advantages, grpo_loss, grpo_loss_tensor};
use crate::optim::{AdamW, clipped_gradients, learning_rate};
use crate::params::Params;
use crate::plot::Panel;
use crate::pretrain::{open_log, progress_bar, prompt_ids};
use crate::rewards::Rewards;
use crate::rollout::generate;
use crate::task::{Generator, Problem, Split, SplitMix64};

/// Header of the GRPO log; `eval_accuracy` is empty on steps without an evaluation.
const GRPO_CSV_HEADER: &str = "step,lr,reward,accuracy_reward,format_reward,completion_tokens,thinking,kl,clip_fraction,zero_variance_groups,entropy,loss,grad_norm,seconds,eval_accuracy";

/// What a GRPO run reports when it ends.
#[derive(Debug, Clone)]
pub struct GrpoReport {
    pub steps: usize,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    /// Held-out greedy accuracy of the starting model and of the final one.
    pub eval_start: Option<f64>,
    pub eval_end: Option<f64>,
}

/// Per-token log-probabilities of `completions` (the ids after each prompt) under `params`:
/// one differentiable tensor per completion, plus the mean token entropy of the batch.
fn completion_logprobs(
    params: &Params,
    prompts: &[&[u32]],
    completions: &[Vec<u32>],
) -> Result<(Vec<Tensor>, f64)> {
    let sequences: Vec<Vec<u32>> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| p.iter().chain(c).copied().collect())
        .collect();
    let seqs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    let model = params.model()?;
    let out = model
        .as_deepseek()
        .expect("Params always builds a DeepSeek model")
        .forward_train(&seqs, false)?;
    let log_probs = candle_nn::ops::log_softmax(&out.logits, D::Minus1)?;
    let mut per_completion = Vec::with_capacity(seqs.len());
    let (mut entropy_sum, mut entropy_tokens) = (0.0f64, 0usize);
    let mut offset = 0;
    for (prompt, completion) in prompts.iter().zip(completions) {
        let n = completion.len();
        // Row prompt_len - 1 + j predicts completion token j.
        let rows = log_probs.narrow(0, offset + prompt.len() - 1, n)?;
        let targets = Tensor::new(completion.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
        per_completion.push(rows.gather(&targets, 1)?.squeeze(1)?);
        let p = rows.detach().exp()?;
        let h = (p * rows.detach())?.sum_all()?.to_scalar::<f32>()?;
        entropy_sum -= f64::from(h);
        entropy_tokens += n;
        offset += prompt.len() + n;
    }
    Ok((per_completion, entropy_sum / entropy_tokens.max(1) as f64))
}

/// Pads per-completion vectors into a (batch, max_len) tensor and its 0/1 mask.
fn padded(rows: &[Tensor], max_len: usize) -> Result<(Tensor, Tensor)> {
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * max_len);
    for r in rows {
        let n = r.dim(0)?;
        padded.push(if n < max_len {
            Tensor::cat(&[r, &Tensor::zeros(max_len - n, r.dtype(), r.device())?], 0)?
        } else {
            r.clone()
        });
        mask.extend((0..max_len).map(|i| if i < n { 1.0f32 } else { 0.0 }));
    }
    Ok((
        Tensor::stack(&padded, 0)?,
        Tensor::from_vec(mask, (rows.len(), max_len), &Device::Cpu)?,
    ))
}

/// The training prompts of step `step`: a function of the seed and the step only.
fn step_problems(task: &TaskSpec, cfg: &GrpoRunConfig, step: usize) -> Result<Vec<Problem>> {
    let seed =
        SplitMix64::new(cfg.seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407)).next_u64();
    let mut generator = Generator::new(task.task_config()?, seed)?;
    (0..cfg.prompts_per_step)
        .map(|_| Ok(generator.sample(Split::Train)?))
        .collect()
}

/// Runs (or resumes, when `out/checkpoint` holds this run) GRPO from the checkpoint `model_dir`.
pub fn grpo(
    model_dir: &Path,
    cfg: &GrpoRunConfig,
    out: &Path,
    stop: &AtomicBool,
    show_progress: bool,
) -> Result<GrpoReport> {
    let start_dir = checkpoint::resolve(model_dir).ok_or_else(|| TrainError::NotACheckpoint {
        path: model_dir.to_path_buf(),
        reason: "no model.safetensors there".into(),
    })?;
    let task = checkpoint::read_task(&start_dir)?;
    let tokenizer = Tokenizer::from_dir(&start_dir)?;
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let ckpt_dir = out.join("checkpoint");
    let config_value = serde_json::to_value(cfg).expect("config serializes");
    let origin = start_dir.display().to_string();
    let (params, mut optimizer, start) =
        match checkpoint::resume(&ckpt_dir, "grpo", &config_value, Some(&origin), cfg.optim)? {
            Some(resumed) => resumed,
            None => (Params::load(&start_dir)?, AdamW::new(cfg.optim), 0),
        };
    let reference = if cfg.beta > 0.0 {
        Some(Params::load(&start_dir)?)
    } else {
        None
    };
    let csv_path = out.join("metrics.csv");
    let mut csv = open_log(&csv_path, GRPO_CSV_HEADER, start)?;
    let eval_options = EvalOptions {
        problems: cfg.eval_problems,
        samples: 0,
        temperature: 1.0,
        seed: 0,
        max_tokens: cfg.max_completion_tokens,
    };
    let loss_cfg = cfg.loss();
    let eos = tokenizer.eos_ids().to_vec();
    let progress = progress_bar(cfg.steps, start, show_progress);
    let mut last_saved = if start > 0 {
        ckpt_dir.display().to_string()
    } else {
        "none (no checkpoint was saved yet)".to_string()
    };
    let eval_start = if start == 0 {
        let accuracy = evaluate(&params.model()?, &tokenizer, &task, &eval_options)?.accuracy;
        writeln!(csv, "0,,,,,,,,,,,,,,{accuracy:.4}").map_err(|source| TrainError::Io {
            path: csv_path.clone(),
            source,
        })?;
        Some(accuracy)
    } else {
        None
    };
    let mut eval_end = None;
    let mut interrupted = false;
    let mut step = start;
    while step < cfg.steps {
        let t0 = Instant::now();
        let problems = step_problems(&task, cfg, step)?;
        let g = cfg.group_size;
        let mut prompts = Vec::with_capacity(problems.len() * g);
        let mut sampling = Vec::with_capacity(problems.len() * g);
        for (i, p) in problems.iter().enumerate() {
            let ids = prompt_ids(&tokenizer, &p.prompt())?;
            for j in 0..g {
                prompts.push(ids.clone());
                sampling.push(SamplingParams {
                    temperature: cfg.temperature,
                    top_p: 1.0,
                    seed: cfg.seed
                        ^ ((step * 1_000_003 + i * g + j) as u64)
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..SamplingParams::default()
                });
            }
        }
        let samples = generate(
            &params.model()?,
            &prompts,
            &sampling,
            cfg.max_completion_tokens,
            &eos,
        )?;

        // Rewards, kept apart for the log.
        let mut scored = Vec::with_capacity(samples.len());
        let (mut thinking, mut completion_tokens) = (0.0, 0usize);
        for (k, s) in samples.iter().enumerate() {
            let text = completion_text(&tokenizer, &s.tokens)?;
            let answer = problems[k / g].answer().to_string();
            scored.push(Rewards::score(&text, &answer));
            thinking += f64::from(u8::from(thinks(&text)));
            completion_tokens += s.tokens.len();
        }
        let total: Vec<f32> = scored
            .iter()
            .map(|r| match cfg.rewards {
                RewardSpec::AccuracyAndFormat => r.total(cfg.format_weight),
                RewardSpec::Accuracy => r.accuracy,
            })
            .collect();
        let advantages = group_advantages(&total, g, cfg.advantage_norm())?;
        let zero_variance = crate::grpo::zero_variance_groups(&total, g)?;
        let keep: Vec<usize> = (0..samples.len())
            .filter(|&k| !(cfg.skip_zero_variance_groups && zero_variance[k / g]))
            .collect();

        let lr = learning_rate(&cfg.optim, step, cfg.steps);
        let (mut kl, mut clip_fraction, mut entropy, mut loss_value, mut grad_norm) =
            (0.0, 0.0, f64::NAN, 0.0, 0.0);
        if !keep.is_empty() {
            // The sampled actions: generated tokens plus the stop token when one ended them.
            let actions: Vec<Vec<u32>> = keep
                .iter()
                .map(|&k| {
                    let mut a = samples[k].tokens.clone();
                    if !samples[k].truncated {
                        a.push(eos[0]);
                    }
                    a
                })
                .collect();
            let batch_prompts: Vec<&[u32]> = keep.iter().map(|&k| prompts[k].as_slice()).collect();
            let truncated: Vec<bool> = keep.iter().map(|&k| samples[k].truncated).collect();
            let adv: Vec<f32> = keep.iter().map(|&k| advantages[k]).collect();
            let max_len = actions.iter().map(Vec::len).max().unwrap_or(1).max(1);
            // The first update's pass doubles as the sampling policy's log-probabilities: the
            // parameters have not moved yet.
            let (first_rows, first_entropy) =
                completion_logprobs(&params, &batch_prompts, &actions)?;
            entropy = first_entropy;
            let old_rows: Vec<Tensor> = first_rows.iter().map(Tensor::detach).collect();
            let mut first_rows = Some(first_rows);
            let (old_logp, mask) = padded(&old_rows, max_len)?;
            let ref_logp = match &reference {
                Some(r) => {
                    let (rows, _) = completion_logprobs(r, &batch_prompts, &actions)?;
                    let rows: Vec<Tensor> = rows.iter().map(Tensor::detach).collect();
                    Some(padded(&rows, max_len)?.0)
                }
                None => None,
            };
            let advantages_t = Tensor::from_vec(adv.clone(), adv.len(), &Device::Cpu)?;
            for _ in 0..cfg.updates_per_batch {
                let rows = match first_rows.take() {
                    Some(rows) => rows,
                    None => completion_logprobs(&params, &batch_prompts, &actions)?.0,
                };
                let (logp, _) = padded(&rows, max_len)?;
                let batch = TensorBatch {
                    logp: &logp,
                    old_logp: &old_logp,
                    ref_logp: ref_logp.as_ref(),
                    advantages: &advantages_t,
                    mask: &mask,
                    truncated: &truncated,
                };
                let loss = grpo_loss_tensor(&batch, &loss_cfg)?;
                loss_value = f64::from(loss.to_scalar::<f32>()?);
                if !loss_value.is_finite() {
                    return Err(TrainError::NonFinite {
                        what: "the GRPO loss",
                        value: loss_value,
                        step,
                        checkpoint: last_saved,
                    });
                }
                // KL and clip fraction of this update, from the plain-slice oracle.
                let report = {
                    let logp_v: Vec<Vec<f32>> = rows
                        .iter()
                        .map(|r| r.to_vec1())
                        .collect::<candle_core::Result<_>>()?;
                    let old_v: Vec<Vec<f32>> = old_rows
                        .iter()
                        .map(|r| r.to_vec1())
                        .collect::<candle_core::Result<_>>()?;
                    let ref_v: Option<Vec<Vec<f32>>> = match &ref_logp {
                        Some(t) => Some(
                            (0..rows.len())
                                .map(|i| -> candle_core::Result<Vec<f32>> {
                                    let n = rows[i].dim(0)?;
                                    t.get(i)?.narrow(0, 0, n)?.to_vec1()
                                })
                                .collect::<candle_core::Result<_>>()?,
                        ),
                        None => None,
                    };
                    let rollouts: Vec<Rollout> = (0..rows.len())
                        .map(|i| Rollout {
                            logp: &logp_v[i],
                            old_logp: &old_v[i],
                            ref_logp: ref_v.as_ref().map(|r| r[i].as_slice()),
                            advantage: adv[i],
                            truncated: truncated[i],
                        })
                        .collect();
                    grpo_loss(&rollouts, &loss_cfg)?
                };
                kl = report.kl;
                clip_fraction = report.clip_fraction;
                let grads = loss.backward()?;
                let (grads, norm) = clipped_gradients(&params.vars, &grads, cfg.optim.grad_clip)?;
                if !norm.is_finite() {
                    return Err(TrainError::NonFinite {
                        what: "the gradient norm",
                        value: norm,
                        step,
                        checkpoint: last_saved,
                    });
                }
                grad_norm = norm;
                optimizer.update(&params.vars, &grads, lr)?;
            }
        }
        step += 1;

        let eval_now = step == cfg.steps || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
        let eval_accuracy = if eval_now {
            let a = evaluate(&params.model()?, &tokenizer, &task, &eval_options)?.accuracy;
            eval_end = Some(a);
            format!("{a:.4}")
        } else {
            String::new()
        };
        let n = samples.len() as f64;
        let mean =
            |f: &dyn Fn(&Rewards) -> f32| scored.iter().map(|r| f64::from(f(r))).sum::<f64>() / n;
        let zero_share =
            zero_variance.iter().filter(|&&z| z).count() as f64 / problems.len() as f64;
        writeln!(
            csv,
            "{step},{lr:.6e},{:.4},{:.4},{:.4},{:.2},{:.4},{kl:.6},{clip_fraction:.4},{zero_share:.4},{entropy:.4},{loss_value:.6},{grad_norm:.4},{:.2},{eval_accuracy}",
            total.iter().map(|&r| f64::from(r)).sum::<f64>() / n,
            mean(&|r| r.accuracy),
            mean(&|r| r.format),
            completion_tokens as f64 / n,
            thinking / n,
            t0.elapsed().as_secs_f64(),
        )
        .and_then(|()| csv.flush())
        .map_err(|source| TrainError::Io {
            path: csv_path.clone(),
            source,
        })?;
        progress.set_position(step as u64);
        progress.set_message(format!(
            "reward {:.3} | acc {:.3} | thinking {:.2} | len {:.0}{}",
            total.iter().map(|&r| f64::from(r)).sum::<f64>() / n,
            mean(&|r| r.accuracy),
            thinking / n,
            completion_tokens as f64 / n,
            if eval_accuracy.is_empty() {
                String::new()
            } else {
                format!(" | held-out {eval_accuracy}")
            }
        ));
        interrupted = stop.load(Ordering::SeqCst);
        if step % cfg.checkpoint_every == 0 || step == cfg.steps || interrupted {
            let state = TrainerState {
                phase: "grpo".into(),
                step,
                config: config_value.clone(),
                started_from: Some(origin.clone()),
            };
            checkpoint::save(&ckpt_dir, &params, &task, &state, Some(&optimizer))?;
            last_saved = ckpt_dir.display().to_string();
        }
        if interrupted {
            break;
        }
    }
    progress.finish_and_clear();
    drop(csv);
    crate::plot::plot_csv(
        &csv_path,
        &out.join("metrics.png"),
        &[
            Panel {
                title: "reward and accuracy",
                columns: &[
                    "reward",
                    "accuracy_reward",
                    "format_reward",
                    "eval_accuracy",
                ],
            },
            Panel {
                title: "completion length (tokens)",
                columns: &["completion_tokens"],
            },
            Panel {
                title: "share thinking, clip fraction, zero-variance groups",
                columns: &["thinking", "clip_fraction", "zero_variance_groups"],
            },
            Panel {
                title: "KL and entropy",
                columns: &["kl", "entropy"],
            },
        ],
    )?;
    Ok(GrpoReport {
        steps: step,
        interrupted,
        checkpoint: ckpt_dir,
        eval_start,
        eval_end,
    })
}
