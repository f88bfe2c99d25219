//! Training end to end on a tiny preset (seconds): gradients reach every parameter, the balance
//! loss agrees with its scalar formula, resuming equals not stopping, a trained checkpoint gives
//! the training forward pass's logits through the inference path, and bad runs fail clearly.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use tiefsee_model::{CacheFormat, Logits, Model};
use tiefsee_tokenizer::Tokenizer;
use tiefsee_train::TrainError;
use tiefsee_train::balance::sequence_balance_loss;
use tiefsee_train::config::{GrpoRunConfig, PretrainConfig};
use tiefsee_train::params::Params;
use tiefsee_train::pretrain::{self, balance_loss_tensor, batch, document_ids, losses};

fn preset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

fn tiny() -> PretrainConfig {
    PretrainConfig::read(&preset("tiny-pretrain.json")).expect("tiny preset")
}

fn tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().expect("tempdir");
    tiefsee_train::vocab::write(dir.path()).expect("tokenizer files");
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    (dir, tok)
}

fn documents(cfg: &PretrainConfig, step: usize) -> Vec<Vec<u32>> {
    let (_dir, tok) = tokenizer();
    batch(cfg, step)
        .expect("batch")
        .iter()
        .map(|d| document_ids(&tok, d, tiefsee_train::vocab::EOS_ID).expect("ids"))
        .collect()
}

fn never() -> AtomicBool {
    AtomicBool::new(false)
}

fn read_params(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let p = Params::load(dir).expect("checkpoint");
    p.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

#[test]
fn every_parameter_receives_a_gradient() {
    let cfg = tiny();
    let params = Params::init(cfg.model.clone(), cfg.init_std, cfg.seed).unwrap();
    let docs = documents(&cfg, 0);
    let seqs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
    let l = losses(&params, &seqs, cfg.mtp_weight, cfg.balance_alpha).unwrap();
    assert!(l.mtp.to_scalar::<f32>().unwrap() > 0.0);
    assert!(l.balance.to_scalar::<f32>().unwrap() > 0.0);
    let grads = l.total.backward().unwrap();
    let mut missing = Vec::new();
    for (name, var) in &params.vars {
        let norm = grads.get(var.as_tensor()).map(|g| {
            g.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        });
        if !norm.is_some_and(|n| n > 0.0) {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    // The MTP layer (index 2) is among the trained ones.
    assert!(
        params
            .vars
            .keys()
            .any(|n| n.starts_with("model.layers.2.eh_proj"))
    );
    // Loads are reported for the main MoE layer and the MTP block's.
    let layers: Vec<usize> = l.loads.iter().map(|(l, _)| *l).collect();
    assert_eq!(layers, vec![1, 2]);
    let tokens: usize = seqs.iter().map(|s| s.len()).sum();
    assert_eq!(l.loads[0].1.iter().sum::<u32>() as usize, tokens * 2);
}

#[test]
fn balance_loss_tensor_equals_the_scalar_formula() {
    let (experts, k, alpha) = (6, 2, 0.3);
    let lens = [5usize, 3, 4];
    let tokens: usize = lens.iter().sum();
    let scores: Vec<f32> = (0..tokens * experts)
        .map(|i| 0.05 + ((i * 37 % 11) as f32) / 11.0)
        .collect();
    let chosen: Vec<u32> = (0..tokens)
        .flat_map(|t| [(t % experts) as u32, ((t * 5 + 1) % experts) as u32])
        .collect();
    let got = balance_loss_tensor(
        &Tensor::from_vec(scores.clone(), (tokens, experts), &Device::Cpu).unwrap(),
        &chosen,
        k,
        &lens,
        alpha,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    let mut want = 0.0;
    let mut offset = 0;
    for &len in &lens {
        let topk: Vec<usize> = chosen[offset * k..(offset + len) * k]
            .iter()
            .map(|&e| e as usize)
            .collect();
        want += sequence_balance_loss(
            &scores[offset * experts..(offset + len) * experts],
            &topk,
            experts,
            k,
            alpha as f32,
        )
        .unwrap();
        offset += len;
    }
    want /= lens.len() as f32;
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{got} vs {want}"
    );
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let cfg = tiny();
    let whole = tempfile::tempdir().unwrap();
    let report = pretrain::pretrain(&cfg, whole.path(), &never(), false).unwrap();
    assert_eq!(report.steps, 4);
    assert!(!report.interrupted);

    // Ctrl-C before the first step: the run stops after it, saving a checkpoint.
    let split = tempfile::tempdir().unwrap();
    let first = pretrain::pretrain(&cfg, split.path(), &AtomicBool::new(true), false).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps, 1);
    let rest = pretrain::pretrain(&cfg, split.path(), &never(), false).unwrap();
    assert_eq!(rest.steps, 4);
    assert_eq!(
        read_params(&whole.path().join("checkpoint")),
        read_params(&split.path().join("checkpoint"))
    );
    // The log holds each step once, with the same losses.
    let log = |d: &Path| -> Vec<String> {
        std::fs::read_to_string(d.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(log(whole.path()), log(split.path()));
    assert_eq!(log(whole.path()).len(), 5);
}

#[test]
fn trained_checkpoint_gives_the_training_logits_through_the_inference_path() {
    let cfg = tiny();
    let run = tempfile::tempdir().unwrap();
    pretrain::pretrain(&cfg, run.path(), &never(), false).unwrap();
    let dir = run.path().join("checkpoint");
    let docs = documents(&cfg, 99);
    let params = Params::load(&dir).unwrap();
    let model = params.model().unwrap();
    let train = model
        .as_deepseek()
        .unwrap()
        .forward_train(&[&docs[0]], false)
        .unwrap()
        .logits;
    // What `tiefsee run` does: load the folder from disk, absorbed attention, a growing cache
    // (f32 here, so that only the computation order differs).
    let mut loaded = Model::load(&dir, &Device::Cpu).unwrap();
    loaded.set_cache_format(CacheFormat::F32).unwrap();
    let mut cache = loaded.new_cache(None).unwrap();
    let half = docs[0].len() / 2;
    let a = loaded
        .forward(&docs[0][..half], &mut cache, Logits::All)
        .unwrap();
    let b = loaded
        .forward(&docs[0][half..], &mut cache, Logits::All)
        .unwrap();
    let inference = Tensor::cat(&[a, b], 0).unwrap();
    let diff = (train - inference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 1e-4,
        "training and inference logits differ by {diff}"
    );
    // The folder is a complete model: tokenizer, template and task beside the weights.
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(
        tok.chat_template()
            .unwrap()
            .render(&[tiefsee_tokenizer::Message::new("user", "1+1")], true)
            .unwrap()
            .ends_with("<think>")
    );
    assert_eq!(
        tiefsee_train::checkpoint::read_task(&dir).unwrap().name,
        "addition"
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let mut cfg = tiny();
    cfg.optim.lr = 1e30;
    cfg.optim.min_lr = 1e30;
    cfg.optim.grad_clip = 0.0;
    cfg.checkpoint_every = 1;
    cfg.steps = 6;
    let run = tempfile::tempdir().unwrap();
    let err = pretrain::pretrain(&cfg, run.path(), &never(), false).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{message}");
    assert!(message.contains("the last good checkpoint is"), "{message}");
    let state = tiefsee_train::checkpoint::read_state(&run.path().join("checkpoint")).unwrap();
    assert!(state.step >= 1);
    assert!(
        message.contains(&format!("at step {}", state.step)),
        "{message}"
    );
    // The kept checkpoint holds finite values only.
    for (name, values) in read_params(&run.path().join("checkpoint")) {
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn broken_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        let path = dir.path().join("c.json");
        std::fs::write(&path, text).unwrap();
        path
    };
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(preset("tiny-pretrain.json")).unwrap())
            .unwrap();
    let variant = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        PretrainConfig::read(&write(&v.to_string()))
            .unwrap_err()
            .to_string()
    };
    assert!(variant(&|v| v["stepz"] = 3.into()).contains("stepz"));
    assert!(variant(&|v| v["steps"] = 0.into()).contains("steps"));
    assert!(variant(&|v| v["optim"]["lr"] = (-1.0).into()).contains("optim.lr"));
    assert!(variant(&|v| v["task"]["ops"] = "+/".into()).contains("task.ops"));
    let missing = PretrainConfig::read(&dir.path().join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.json"), "{missing}");
    // A model whose vocabulary does not match the tokenizer is refused before any work.
    let mut cfg = tiny();
    cfg.model["vocab_size"] = 300.into();
    let err = pretrain::pretrain(&cfg, dir.path(), &never(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab_size"), "{err}");
}

#[test]
fn grpo_runs_logs_and_resumes_exactly() {
    let run = tempfile::tempdir().unwrap();
    pretrain::pretrain(&tiny(), run.path(), &never(), false).unwrap();
    let base = run.path().join("checkpoint");
    let cfg = GrpoRunConfig::read(&preset("tiny-grpo.json")).unwrap();

    let whole = tempfile::tempdir().unwrap();
    let report = tiefsee_train::rl::grpo(&base, &cfg, whole.path(), &never(), false).unwrap();
    assert_eq!(report.steps, 2);
    assert!(report.eval_start.is_some() && report.eval_end.is_some());
    let log = std::fs::read_to_string(whole.path().join("metrics.csv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    assert!(lines[0].starts_with("step,lr,reward,accuracy_reward,format_reward"));
    // Every logged number is finite; KL is positive once the policy has moved (beta > 0).
    for line in &lines[2..] {
        for field in line.split(',').filter(|f| !f.is_empty()) {
            let x: f64 = field.parse().unwrap();
            assert!(x.is_finite(), "{line}");
        }
    }

    let split = tempfile::tempdir().unwrap();
    let first =
        tiefsee_train::rl::grpo(&base, &cfg, split.path(), &AtomicBool::new(true), false).unwrap();
    assert!(first.interrupted);
    tiefsee_train::rl::grpo(&base, &cfg, split.path(), &never(), false).unwrap();
    assert_eq!(
        read_params(&whole.path().join("checkpoint")),
        read_params(&split.path().join("checkpoint"))
    );
    // The router biases are frozen during RL.
    let bias = |d: &Path| {
        read_params(d)
            .into_iter()
            .filter(|(n, _)| n.ends_with("e_score_correction_bias"))
            .collect::<Vec<_>>()
    };
    assert_eq!(bias(&base), bias(&whole.path().join("checkpoint")));
}
