//! Pretraining a small DeepSeek-V3-style model from scratch on the task corpus, with V3's training
//! features at small scale: the MTP loss, auxiliary-loss-free balancing (bias update after every
//! step), the sequence-wise balance loss, AdamW with warm-up and cosine decay, and clipping.
//!
//! Every step's batch is a pure function of (seed, step), so a run resumed from a checkpoint takes
//! exactly the steps an uninterrupted run would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use tiefsee_model::config::{DeepSeekConfig, FfnKind};
use tiefsee_model::deepseek::TrainOutput;
use tiefsee_tokenizer::{Message, Tokenizer};

use crate::balance::{expert_loads, update_bias};
use crate::checkpoint::{self, TrainerState};
use crate::config::PretrainConfig;
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, clipped_gradients, learning_rate};
use crate::params::{BIAS_SUFFIX, Params};
use crate::plot::Panel;
use crate::task::{Example, SplitMix64, corpus};

/// The token ids of a prompt as the chat template presents it, ending in the opened `<think>`.
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.apply_chat_template(&[Message::new("user", prompt)], true)?)
}

/// A whole training document: the templated prompt, the completion after its `<think>` (which
/// the template already wrote), and the end-of-sequence token.
pub fn document_ids(tokenizer: &Tokenizer, example: &Example, eos: u32) -> Result<Vec<u32>> {
    let mut ids = prompt_ids(tokenizer, &example.prompt)?;
    let body = example
        .completion
        .strip_prefix("<think>")
        .unwrap_or(&example.completion);
    ids.extend(tokenizer.encode(body, false)?);
    ids.push(eos);
    Ok(ids)
}

/// The documents of pretraining step `step`: a function of the seed and the step only.
pub fn batch(cfg: &PretrainConfig, step: usize) -> Result<Vec<Example>> {
    let seed =
        SplitMix64::new(cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
    Ok(corpus(
        &cfg.task.task_config()?,
        &cfg.corpus.into(),
        cfg.batch_size,
        seed,
    )?)
}

/// The parts of the pretraining loss, as differentiable scalars.
pub struct Losses {
    /// `ce + mtp_weight * mtp + balance`.
    pub total: Tensor,
    /// Next-token cross-entropy.
    pub ce: Tensor,
    /// Cross-entropy of the MTP depth-1 prediction (token after next); zero without MTP layers.
    pub mtp: Tensor,
    /// Sequence-wise balance loss, summed over MoE layers, mean over sequences, times alpha.
    pub balance: Tensor,
    /// Per MoE layer (checkpoint index): tokens routed to each expert.
    pub loads: Vec<(usize, Vec<u32>)>,
}

/// Mean cross-entropy of `logits` rows against `targets` (one per row).
fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    Ok(log_probs.gather(&targets, 1)?.mean_all()?.neg()?)
}

/// The rows of position-major logits that have a target `ahead` tokens later, and those targets.
fn shifted_targets(sequences: &[&[u32]], ahead: usize, drop: usize) -> (Vec<u32>, Vec<u32>) {
    // Logit rows cover positions 0 .. len - drop of each sequence; row i predicts token i + ahead.
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut offset = 0;
    for seq in sequences {
        let n = seq.len().saturating_sub(drop);
        for i in 0..n {
            if i + ahead < seq.len() {
                rows.push((offset + i) as u32);
                targets.push(seq[i + ahead]);
            }
        }
        offset += n;
    }
    (rows, targets)
}

/// V3's sequence-wise balance loss of one layer as a tensor: for each sequence, `sum_i f_i P_i`
/// with `f_i = N / (K T) * count_i` (constant) and `P_i` the mean normalized affinity; averaged
/// over sequences and multiplied by `alpha`.
pub fn balance_loss_tensor(
    scores: &Tensor,
    chosen: &[u32],
    top_k: usize,
    lens: &[usize],
    alpha: f64,
) -> Result<Tensor> {
    let n_experts = scores.dim(1)?;
    let normalized = scores.broadcast_div(&scores.sum_keepdim(1)?)?;
    let mut total: Option<Tensor> = None;
    let mut offset = 0;
    let mut sequences = 0usize;
    for &len in lens.iter().filter(|&&l| l > 0) {
        let topk: Vec<usize> = chosen[offset * top_k..(offset + len) * top_k]
            .iter()
            .map(|&e| e as usize)
            .collect();
        let counts = expert_loads(&topk, n_experts)?;
        let scale = n_experts as f32 / (top_k * len) as f32;
        let f: Vec<f32> = counts.iter().map(|&c| c as f32 * scale).collect();
        let f = Tensor::from_vec(f, n_experts, scores.device())?;
        let p = normalized.narrow(0, offset, len)?.mean(0)?;
        let term = (p * f)?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
        offset += len;
        sequences += 1;
    }
    match total {
        Some(t) => Ok(((t / sequences as f64)? * alpha)?),
        None => Ok(Tensor::zeros((), scores.dtype(), scores.device())?),
    }
}

/// The pretraining loss of a batch of token sequences.
pub fn losses(
    params: &Params,
    sequences: &[&[u32]],
    mtp_weight: f64,
    balance_alpha: f64,
) -> Result<Losses> {
    let model = params.model()?;
    let deepseek = model
        .as_deepseek()
        .expect("Params always builds a DeepSeek model");
    let TrainOutput {
        logits,
        mtp_logits,
        routing,
    } = deepseek.forward_train(sequences, mtp_weight > 0.0)?;
    let device = logits.device().clone();
    let (rows, targets) = shifted_targets(sequences, 1, 0);
    let ce = cross_entropy(
        &logits.index_select(&Tensor::new(rows.as_slice(), &device)?, 0)?,
        &targets,
    )?;
    let zero = Tensor::zeros((), candle_core::DType::F32, &device)?;
    let mtp = match mtp_logits.first() {
        Some(m) => {
            // MTP depth 1: rows are positions 0 .. len - 1, row i predicts token i + 2.
            let (rows, targets) = shifted_targets(sequences, 2, 1);
            if rows.is_empty() {
                zero.clone()
            } else {
                cross_entropy(
                    &m.index_select(&Tensor::new(rows.as_slice(), &device)?, 0)?,
                    &targets,
                )?
            }
        }
        None => zero.clone(),
    };
    let cfg = &params.config;
    let mut balance = zero.clone();
    let mut loads = Vec::new();
    for (layer, trace) in &routing {
        // MTP depth k routes the positions that have a token k ahead.
        let depth = if *layer >= cfg.num_hidden_layers {
            layer - cfg.num_hidden_layers + 1
        } else {
            0
        };
        let lens: Vec<usize> = sequences
            .iter()
            .map(|s| s.len().saturating_sub(depth))
            .collect();
        if balance_alpha > 0.0 {
            balance = (balance
                + balance_loss_tensor(
                    &trace.scores,
                    &trace.chosen,
                    trace.top_k,
                    &lens,
                    balance_alpha,
                )?)?;
        }
        let topk: Vec<usize> = trace.chosen.iter().map(|&e| e as usize).collect();
        loads.push((*layer, expert_loads(&topk, cfg.n_routed_experts)?));
    }
    let total = ((&ce + (&mtp * mtp_weight)?)? + &balance)?;
    Ok(Losses {
        total,
        ce,
        mtp,
        balance,
        loads,
    })
}

/// Auxiliary-loss-free balancing: each MoE layer's bias moves by `gamma` toward equal loads.
pub fn update_biases(params: &mut Params, loads: &[(usize, Vec<u32>)], gamma: f64) -> Result<()> {
    for (layer, load) in loads {
        let name = format!("model.layers.{layer}.mlp.gate.{BIAS_SUFFIX}");
        let Some(bias) = params.buffers.get(&name) else {
            continue;
        };
        let mut values: Vec<f32> = bias.to_vec1()?;
        update_bias(&mut values, load, gamma as f32)?;
        let updated = Tensor::from_vec(values, load.len(), &Device::Cpu)?;
        params.buffers.insert(name, updated);
    }
    Ok(())
}

/// Matrix-multiply FLOPs per token of a forward pass (weights only: embedding lookups are free,
/// attention scores are added separately), counting only the experts a token visits.
pub fn forward_flops_per_token(cfg: &DeepSeekConfig, mean_len: f64) -> f64 {
    let (h, heads) = (cfg.hidden_size as f64, cfg.num_attention_heads as f64);
    let qk = cfg.qk_head_dim() as f64;
    let attn_weights = match cfg.q_lora_rank {
        None => h * heads * qk,
        Some(r) => h * r as f64 + r as f64 * heads * qk,
    } + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) as f64
        + cfg.kv_lora_rank as f64 * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) as f64
        + heads * cfg.v_head_dim as f64 * h;
    // Scores and weighted values over on average half the sequence.
    let attn_scores = heads * (qk + cfg.v_head_dim as f64) * mean_len / 2.0;
    let ffn = |layer: usize| -> f64 {
        match cfg.ffn_kind(layer) {
            FfnKind::Dense => 3.0 * h * cfg.intermediate_size as f64,
            FfnKind::Moe => {
                let visited = (cfg.num_experts_per_tok + cfg.n_shared_experts) as f64;
                3.0 * h * cfg.moe_intermediate_size as f64 * visited
                    + h * cfg.n_routed_experts as f64
            }
        }
    };
    let layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
    let blocks: f64 = (0..layers)
        .map(|l| attn_weights + attn_scores + ffn(l))
        .sum();
    let heads_out = h * cfg.vocab_size as f64 * (1 + cfg.num_nextn_predict_layers) as f64;
    let mtp_proj = 2.0 * h * h * cfg.num_nextn_predict_layers as f64;
    2.0 * (blocks + heads_out + mtp_proj)
}

/// The best f32 matrix-product rate of this machine through candle, in FLOP/s: the reference for
/// model-FLOPs utilization.
pub fn measured_peak_flops() -> Result<f64> {
    let n = 512;
    let a = Tensor::ones((n, n), candle_core::DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((n, n), candle_core::DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// What a pretraining run reports when it ends.
#[derive(Debug, Clone)]
pub struct PretrainReport {
    /// Steps completed in all (resumed ones included).
    pub steps: usize,
    /// The loss of the last step this invocation ran (`None` when the run was already complete).
    pub loss: Option<f64>,
    /// Whether the run stopped early on request (Ctrl-C); the checkpoint holds its last step.
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    /// Mean model-FLOPs utilization of this invocation against [`measured_peak_flops`].
    pub mfu: f64,
}

/// One CSV line of the pretraining log.
const PRETRAIN_CSV_HEADER: &str =
    "step,lr,loss,ce,mtp,balance,grad_norm,tokens,seconds,tokens_per_s,mfu";

/// Runs (or resumes, when `out/checkpoint` exists) pretraining into `out`. `stop` is polled after
/// every step; when set, the run saves a checkpoint and returns.
pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    stop: &AtomicBool,
    show_progress: bool,
) -> Result<PretrainReport> {
    let tokenizer = crate::vocab::build()?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let declared = cfg.model.get("vocab_size").and_then(|v| v.as_u64());
    if declared != Some(vocab_size as u64) {
        return Err(TrainError::Config {
            field: "model.vocab_size".into(),
            reason: format!("is {declared:?}, but the tokenizer has {vocab_size} tokens"),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let tokenizer_dir = out.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir).map_err(|source| TrainError::Io {
        path: tokenizer_dir.clone(),
        source,
    })?;
    crate::vocab::write(&tokenizer_dir)?;
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;

    let ckpt_dir = out.join("checkpoint");
    let config_value = serde_json::to_value(cfg).expect("config serializes");
    let (mut params, mut optimizer, start) =
        match checkpoint::resume(&ckpt_dir, "pretrain", &config_value, None, cfg.optim)? {
            Some(resumed) => resumed,
            None => (
                Params::init(cfg.model.clone(), cfg.init_std, cfg.seed)?,
                AdamW::new(cfg.optim),
                0,
            ),
        };
    let csv_path = out.join("metrics.csv");
    let mut csv = open_log(&csv_path, PRETRAIN_CSV_HEADER, start)?;
    let eos = crate::vocab::EOS_ID;
    let peak = measured_peak_flops()?;
    let progress = progress_bar(cfg.steps, start, show_progress);
    let mut last_saved = if start > 0 {
        ckpt_dir.display().to_string()
    } else {
        "none (no checkpoint was saved yet)".to_string()
    };
    let (mut flops_done, mut seconds_done) = (0.0, 0.0);
    let mut loss_value = f64::NAN;
    let mut interrupted = false;
    let mut step = start;
    while step < cfg.steps {
        let t0 = Instant::now();
        let docs = batch(cfg, step)?;
        let ids: Vec<Vec<u32>> = docs
            .iter()
            .map(|d| document_ids(&tokenizer, d, eos))
            .collect::<Result<_>>()?;
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let l = losses(&params, &seqs, cfg.mtp_weight, cfg.balance_alpha)?;
        loss_value = f64::from(l.total.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the loss",
                value: loss_value,
                step,
                checkpoint: last_saved,
            });
        }
        let grads = l.total.backward()?;
        let (grads, grad_norm) = clipped_gradients(&params.vars, &grads, cfg.optim.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the gradient norm",
                value: grad_norm,
                step,
                checkpoint: last_saved,
            });
        }
        let lr = learning_rate(&cfg.optim, step, cfg.steps);
        optimizer.update(&params.vars, &grads, lr)?;
        update_biases(&mut params, &l.loads, cfg.bias_update_speed)?;
        step += 1;

        let seconds = t0.elapsed().as_secs_f64();
        let tokens: usize = seqs.iter().map(|s| s.len()).sum();
        let mean_len = tokens as f64 / seqs.len() as f64;
        let flops = 3.0 * forward_flops_per_token(&params.config, mean_len) * tokens as f64;
        flops_done += flops;
        seconds_done += seconds;
        let mfu = flops / seconds / peak;
        writeln!(
            csv,
            "{step},{lr:.6e},{loss_value:.6},{:.6},{:.6},{:.6},{grad_norm:.4},{tokens},{seconds:.4},{:.1},{mfu:.4}",
            l.ce.to_scalar::<f32>()?,
            l.mtp.to_scalar::<f32>()?,
            l.balance.to_scalar::<f32>()?,
            tokens as f64 / seconds,
        )
        .map_err(|source| TrainError::Io {
            path: csv_path.clone(),
            source,
        })?;
        csv.flush().map_err(|source| TrainError::Io {
            path: csv_path.clone(),
            source,
        })?;
        progress.set_position(step as u64);
        progress.set_message(format!(
            "loss {loss_value:.4} | {:.0} tok/s | MFU {:.1}%",
            tokens as f64 / seconds,
            100.0 * mfu
        ));
        interrupted = stop.load(Ordering::SeqCst);
        if step % cfg.checkpoint_every == 0 || step == cfg.steps || interrupted {
            let state = TrainerState {
                phase: "pretrain".into(),
                step,
                config: config_value.clone(),
                started_from: None,
            };
            checkpoint::save(&ckpt_dir, &params, &cfg.task, &state, Some(&optimizer))?;
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
                title: "loss",
                columns: &["ce", "mtp", "loss"],
            },
            Panel {
                title: "tokens/s",
                columns: &["tokens_per_s"],
            },
        ],
    )?;
    Ok(PretrainReport {
        steps: step,
        loss: loss_value.is_finite().then_some(loss_value),
        interrupted,
        checkpoint: ckpt_dir,
        mfu: if seconds_done > 0.0 {
            flops_done / seconds_done / peak
        } else {
            0.0
        },
    })
}

/// Opens the CSV log for appending, keeping only rows of steps up to `keep_through` (those a
/// resumed run will not repeat) and writing the header to a new file.
pub fn open_log(
    path: &Path,
    header: &str,
    keep_through: usize,
) -> Result<std::io::BufWriter<std::fs::File>> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut kept = vec![header.to_string()];
    if keep_through > 0
        && let Ok(text) = std::fs::read_to_string(path)
    {
        kept.extend(
            text.lines()
                .skip(1)
                .filter(|line| {
                    line.split(',')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|s| s <= keep_through)
                })
                .map(str::to_string),
        );
    }
    std::fs::write(path, kept.join("\n") + "\n").map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io)?;
    Ok(std::io::BufWriter::new(file))
}

/// A progress bar over `total` steps starting at `start`, hidden when not wanted.
pub fn progress_bar(total: usize, start: usize, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  (eta {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}
