//! End-to-end tests of the `tiefsee` binary on the fixture checkpoints: outputs against what
//! transformers computed, and bad input against clear errors (never a panic).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{assert_fails_with, fixture, stderr, stdout, tiefsee};

use serde_json::Value;

const VARIANTS: &[&str] = &[
    "deepseek-v2-lite",
    "deepseek-v2",
    "deepseek-v3",
    "deepseek-v3-fp8",
    "qwen2",
    "llama3",
];

fn golden(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn greedy_raw_run_prints_what_transformers_generates() {
    for name in VARIANTS {
        let g = golden(name);
        let dir = fixture(name);
        let out = tiefsee(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--prompt",
            g["prompt_text"].as_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            g["greedy_eos_text"].as_str().unwrap(),
            "{name}"
        );
        assert!(
            stderr(&out).contains("bytes/token"),
            "{name}: no statistics on stderr"
        );
    }
}

#[test]
fn perplexity_json_matches_transformers() {
    for name in VARIANTS {
        let g = golden(name);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), g["perplexity"]["text"].as_str().unwrap()).unwrap();
        let out = tiefsee(&[
            "perplexity",
            "--model",
            fixture(name).to_str().unwrap(),
            "--file",
            file.path().to_str().unwrap(),
            "--json",
            "--cache-type",
            "f32",
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let got: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let expected = g["perplexity"]["ppl"].as_f64().unwrap();
        let ppl = got["perplexity"].as_f64().unwrap();
        assert!(
            ((ppl - expected) / expected).abs() < 1e-4,
            "{name}: perplexity {ppl} vs transformers {expected}"
        );
        assert_eq!(got["tokens"], g["perplexity"]["n_tokens"], "{name}");
    }
}

#[test]
fn strided_perplexity_scores_every_token_once() {
    let g = golden("llama3");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), g["perplexity"]["text"].as_str().unwrap()).unwrap();
    let out = tiefsee(&[
        "perplexity",
        "--model",
        fixture("llama3").to_str().unwrap(),
        "--file",
        file.path().to_str().unwrap(),
        "--ctx",
        "32",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let tokens = got["tokens"].as_u64().unwrap();
    assert_eq!(got["scored"].as_u64().unwrap(), tokens - 1);
    assert!(got["windows"].as_u64().unwrap() > 1);
    // Less context per token than the single full window: a different, finite value.
    let ppl = got["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl != g["perplexity"]["ppl"].as_f64().unwrap());
}

#[test]
fn info_json_reports_latent_cache_and_parameters() {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("deepseek-v3").join("config.json")).unwrap(),
    )
    .unwrap();
    let values = (config["kv_lora_rank"].as_u64().unwrap()
        + config["qk_rope_head_dim"].as_u64().unwrap())
        * config["num_hidden_layers"].as_u64().unwrap();
    // bf16 by default, f32 on request: 2 or 4 bytes per latent value, nothing per head.
    for (flags, dtype, per_token) in [
        (&[][..], "bf16", 2 * values),
        (&["--cache-type", "f32"][..], "f32", 4 * values),
    ] {
        let model = fixture("deepseek-v3");
        let mut args = vec!["info", "--model", model.to_str().unwrap(), "--json"];
        args.extend_from_slice(flags);
        let out = tiefsee(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let info: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(info["kv_bytes_per_token"].as_u64().unwrap(), per_token);
        assert_eq!(info["cache_dtype"], dtype);
        assert_eq!(info["architecture"], "DeepseekV3ForCausalLM");
        assert!(info["active_params"].as_u64().unwrap() < info["total_params"].as_u64().unwrap());
        assert!(info["mtp_params"].as_u64().unwrap() > 0);
    }
}

#[test]
fn chat_keeps_history_and_exits_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tiefsee"))
        .args(["chat", "--model", fixture("deepseek-v3").to_str().unwrap()])
        .args(["--temperature", "0", "--max-tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hallo!\nWie geht's?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().count(),
        2,
        "two answers: {}",
        stdout(&out)
    );
}

/// Copies a fixture checkpoint into a temporary folder so a test can damage it.
fn damaged_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn run_raw(dir: &Path, prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--raw",
        "--prompt",
        prompt,
    ];
    args.extend_from_slice(extra);
    tiefsee(&args)
}

fn rewrite_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let dir = damaged_copy("qwen2");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("Qwen2ForCausalLM", "MambaForCausalLM");
    std::fs::write(&config, text).unwrap();
    assert_fails_with(
        &run_raw(dir.path(), "Hi", &[]),
        &["MambaForCausalLM", "unsupported architecture"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = damaged_copy("qwen2");
    rewrite_tensors(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_proj.bias");
    });
    assert_fails_with(
        &run_raw(dir.path(), "Hi", &[]),
        &["model.layers.1.self_attn.k_proj.bias", "missing"],
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = damaged_copy("qwen2");
    rewrite_tensors(dir.path(), |t| {
        let w = t["model.layers.0.mlp.up_proj.weight"].clone();
        t.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            w.narrow(0, 0, 7).unwrap(),
        );
    });
    let out = run_raw(dir.path(), "Hi", &[]);
    assert_fails_with(
        &out,
        &[
            "model.layers.0.mlp.up_proj.weight",
            "model.safetensors",
            "shape",
        ],
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = damaged_copy("deepseek-v3");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(
        &run_raw(dir.path(), "Hi", &[]),
        &["model.safetensors", "truncated"],
    );
}

/// A NaN among an FP8 checkpoint's block scales is an error naming the scale tensor and block, not a
/// model that silently answers NaNs.
#[test]
fn nan_fp8_block_scale_is_named() {
    let dir = damaged_copy("deepseek-v3-fp8");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight_scale_inv";
    assert_eq!(header[name]["shape"], serde_json::json!([2, 2]), "{name}");
    // Block (1, 0): the third f32 of the tensor's data.
    let start = 8 + header_len + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_fails_with(
        &run_raw(dir.path(), "Hi", &[]),
        &[name, "[1, 0]", "NaN", "not a finite number"],
    );
}

#[test]
fn prompt_longer_than_context_is_refused() {
    let out = run_raw(
        &fixture("deepseek-v3"),
        "a prompt that is certainly longer than eight tokens, by far",
        &["--ctx", "8"],
    );
    assert_fails_with(&out, &["context of 8 tokens"]);
}

#[test]
fn empty_prompt_is_refused() {
    assert_fails_with(
        &run_raw(&fixture("deepseek-v3"), "", &[]),
        &["prompt is empty"],
    );
}

#[test]
fn missing_model_folder_is_named() {
    assert_fails_with(
        &run_raw(Path::new("/nonexistent/model"), "Hi", &[]),
        &["/nonexistent/model"],
    );
}
