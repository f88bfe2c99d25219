//! The `tiefsee` binary on GGUF files (tests/fixtures/gguf-models, converted by llama.cpp's converter from
//! the checkpoint fixtures): the same outputs as transformers computed for the checkpoints, and damaged
//! files refused with a message that names the problem.

mod common;

use std::path::PathBuf;

use common::{assert_fails_with, stderr, tiefsee};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// GGUF file and the checkpoint it was converted from. deepseek-v2 is left out: GGUF cannot hold its
/// YaRN mscale (see tests/fixtures/gguf-models/README.md).
const FILES: &[(&str, &str)] = &[
    ("deepseek-v2-lite.f32.gguf", "deepseek-v2-lite"),
    ("deepseek-v2-lite.kvb.f32.gguf", "deepseek-v2-lite"),
    ("deepseek-v3.f16.gguf", "deepseek-v3"),
    ("qwen2.f16.gguf", "qwen2"),
    ("llama3.bf16.gguf", "llama3"),
];

fn gguf(name: &str) -> String {
    fixtures()
        .join("gguf-models")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn golden(variant: &str) -> Value {
    let path = fixtures().join("models").join(variant).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn greedy_raw_run_on_gguf_prints_what_transformers_generates() {
    for (file, variant) in FILES {
        let g = golden(variant);
        let out = tiefsee(&[
            "run",
            "--model",
            &gguf(file),
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--prompt",
            g["prompt_text"].as_str().unwrap(),
        ]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            g["greedy_eos_text"].as_str().unwrap(),
            "{file}"
        );
    }
}

#[test]
fn perplexity_of_gguf_matches_transformers() {
    for (file, variant) in FILES {
        let g = golden(variant);
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), g["perplexity"]["text"].as_str().unwrap()).unwrap();
        let out = tiefsee(&[
            "perplexity",
            "--model",
            &gguf(file),
            "--file",
            text.path().to_str().unwrap(),
            "--json",
            "--cache-type",
            "f32",
        ]);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected = g["perplexity"]["ppl"].as_f64().unwrap();
        let ppl = got["perplexity"].as_f64().unwrap();
        assert!(
            ((ppl - expected) / expected).abs() < 1e-4,
            "{file}: perplexity {ppl} vs transformers {expected}"
        );
        assert_eq!(got["tokens"], g["perplexity"]["n_tokens"], "{file}");
    }
}

#[test]
fn info_reads_gguf() {
    let out = tiefsee(&["info", "--model", &gguf("deepseek-v3.f16.gguf"), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "DeepseekV3ForCausalLM");
    assert_eq!(info["stored_dtypes"], serde_json::json!(["F16", "F32"]));
    assert_eq!(info["layers"], 3);
}

#[test]
fn damaged_gguf_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("qwen2.f16.gguf")).unwrap();

    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let out = tiefsee(&[
        "run",
        "--model",
        truncated.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(&out, &["truncated.gguf", "tensor", "only"]);

    let header_only = tmp.path().join("header.gguf");
    std::fs::write(&header_only, &bytes[..100]).unwrap();
    let out = tiefsee(&["info", "--model", header_only.to_str().unwrap()]);
    assert_fails_with(&out, &["header.gguf", "truncated or corrupt"]);

    let not_gguf = tmp.path().join("config.json");
    std::fs::write(&not_gguf, r#"{"architectures": ["Qwen2ForCausalLM"]}"#).unwrap();
    let out = tiefsee(&["info", "--model", not_gguf.to_str().unwrap()]);
    assert_fails_with(&out, &["config.json", "not a GGUF file"]);

    let missing = tmp.path().join("missing.gguf");
    let out = tiefsee(&[
        "run",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert_fails_with(&out, &["missing.gguf", "No such file"]);

    // general.architecture = "qwen2" -> "mamba" would change the length; same-length "qwen9".
    let mut unknown = bytes.clone();
    let from = b"\x05\0\0\0\0\0\0\0qwen2";
    let at = unknown.windows(from.len()).position(|w| w == from).unwrap();
    unknown[at + 12] = b'9';
    let path = tmp.path().join("arch.gguf");
    std::fs::write(&path, unknown).unwrap();
    let out = tiefsee(&["run", "--model", path.to_str().unwrap(), "--prompt", "Hi"]);
    assert_fails_with(&out, &["arch.gguf", "\"qwen9\"", "not supported"]);
}
