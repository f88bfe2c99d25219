//! `tiefsee train` and `tiefsee eval` as a user runs them: a tiny preset trained end to end through
//! the binary, its checkpoint used by `run` and `eval --json`, and bad input refused clearly.

mod common;

use std::path::PathBuf;

use common::{fixture, stderr, tiefsee};

fn preset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../train/tests")
        .join(name)
}

#[test]
fn pretrain_grpo_eval_and_run_through_the_binary() {
    let run = tempfile::tempdir().unwrap();
    let base = run.path().join("base");
    let out = tiefsee(&[
        "train",
        "pretrain",
        "--config",
        preset("tiny-pretrain.json").to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("done after 4 of 4 steps"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("MFU"), "{}", stderr(&out));
    assert!(base.join("metrics.png").is_file());
    let checkpoint = base.join("checkpoint");

    let rl = run.path().join("rl");
    let out = tiefsee(&[
        "train",
        "grpo",
        "--model",
        checkpoint.to_str().unwrap(),
        "--config",
        preset("tiny-grpo.json").to_str().unwrap(),
        "--out",
        rl.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(rl.join("metrics.png").is_file() && rl.join("metrics.csv").is_file());

    // eval --json defaults to the task recorded beside the checkpoint.
    let out = tiefsee(&[
        "eval",
        "--model",
        rl.join("checkpoint").to_str().unwrap(),
        "--problems",
        "6",
        "-k",
        "2",
        "--max-tokens",
        "16",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["task"], "addition");
    assert_eq!(report["problems"], 6);
    let accuracy = report["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    assert!(report["pass_at_k"].as_f64().unwrap() >= report["pass_at_1"].as_f64().unwrap());

    // The checkpoint is a model folder like any other.
    let out = tiefsee(&[
        "run",
        "--model",
        rl.join("checkpoint").to_str().unwrap(),
        "--prompt",
        "12+34",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn bad_training_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.json");
    std::fs::write(&config, r#"{"seed": 1, "steps": 3}"#).unwrap();
    let out = tiefsee(&[
        "train",
        "pretrain",
        "--config",
        config.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing field"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    // GRPO from a folder that is not a checkpoint.
    let out = tiefsee(&[
        "train",
        "grpo",
        "--model",
        dir.path().to_str().unwrap(),
        "--config",
        preset("tiny-grpo.json").to_str().unwrap(),
        "--out",
        dir.path().join("g").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a training checkpoint"),
        "{}",
        stderr(&out)
    );

    // eval of a model without task.json and no --task.
    let model = fixture("deepseek-v3");
    let out = tiefsee(&["eval", "--model", model.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("pass --task"), "{}", stderr(&out));
    let out = tiefsee(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--task",
        "poetry",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown task \"poetry\""),
        "{}",
        stderr(&out)
    );
}

/// A disk that fills up mid-save (simulated by a file-size limit: writes past it fail with EFBIG)
/// stops the run with a message naming the checkpoint, not a panic, and leaves no half-written
/// checkpoint behind.
#[test]
fn a_failed_save_is_reported_and_leaves_no_partial_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("base");
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' train pretrain --config '{}' --out '{}' --quiet",
        env!("CARGO_BIN_EXE_tiefsee"),
        preset("tiny-pretrain.json").display(),
        out.display()
    );
    let result = std::process::Command::new("bash")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("bash runs");
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("could not save the checkpoint"), "{err}");
    assert!(err.contains("previous checkpoint there is intact"), "{err}");
    assert!(!out.join("checkpoint.tmp").exists());
    assert!(!out.join("checkpoint").join("model.safetensors").exists());
}
