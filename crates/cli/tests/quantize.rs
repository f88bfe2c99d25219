//! `tiefsee quantize` against llama.cpp: the fixture checkpoints written as GGUF must equal what llama.cpp
//! wrote for them (tests/fixtures/gguf-models: its converter, tests/fixtures/make_gguf_models.py, and its
//! quantizer, tests/fixtures/make_llama_quantize.py) in every metadata value and tensor byte, and in order;
//! every written file must load in tiefsee with the logits of the checkpoint. `bench` is checked here too.
//!
//! Left out of the comparison: `general.name` / `basename` / `version`, which the converter guesses from
//! the folder name with heuristics tiefsee does not copy (tiefsee writes the folder name).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tiefsee_gguf::{GgufFile, MetadataValue};
use tiefsee_model::{CacheFormat, Logits, Model};

const NAME_KEYS: &[&str] = &["general.name", "general.basename", "general.version"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(variant: &str) -> PathBuf {
    fixtures().join("models").join(variant)
}

fn tiefsee(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tiefsee"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("tiefsee runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn quantize(variant: &str, ty: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{variant}.{ty}.gguf"));
    let run = tiefsee(&[
        "quantize",
        "--model",
        model_dir(variant).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--type",
        ty,
    ]);
    assert!(run.status.success(), "{variant} {ty}: {}", stderr(&run));
    out
}

fn metadata(file: &GgufFile) -> Vec<(String, MetadataValue)> {
    file.metadata()
        .iter()
        .filter(|(k, _)| !NAME_KEYS.contains(k))
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
}

/// Compares two GGUF files: metadata (all but the name keys) and tensors (name, type, shape, bytes),
/// in order when `ordered`; `ignore` lists metadata keys whose values may differ.
fn assert_same(ours: &Path, theirs: &Path, ordered: bool, ignore: &[&str]) {
    let (a, b) = (
        GgufFile::open(ours).unwrap(),
        GgufFile::open(theirs).unwrap(),
    );
    let (mut ma, mut mb) = (metadata(&a), metadata(&b));
    if !ordered {
        ma.sort_by(|x, y| x.0.cmp(&y.0));
        mb.sort_by(|x, y| x.0.cmp(&y.0));
    }
    let keys = |m: &[(String, MetadataValue)]| m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&ma), keys(&mb), "{}: metadata keys", ours.display());
    for ((k, va), (_, vb)) in ma.iter().zip(&mb) {
        if !ignore.contains(&k.as_str()) {
            assert_eq!(va, vb, "{}: metadata {k}", ours.display());
        }
    }
    let mut ta: Vec<_> = a
        .tensor_infos()
        .iter()
        .map(|t| t.name().to_owned())
        .collect();
    let mut tb: Vec<_> = b
        .tensor_infos()
        .iter()
        .map(|t| t.name().to_owned())
        .collect();
    if !ordered {
        ta.sort();
        tb.sort();
    }
    assert_eq!(ta, tb, "{}: tensor names", ours.display());
    for name in &ta {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(x.info.shape(), y.info.shape(), "{name}");
        if x.info.ggml_type() == y.info.ggml_type() {
            assert!(x.data == y.data, "{}: {name} bytes differ", ours.display());
        } else {
            // Same values stored in another float type (f32 written, bf16 converted).
            let n = x.info.shape().iter().product();
            let xv = tiefsee_gguf::dequantize(x.info.ggml_type(), x.data, n).unwrap();
            let yv = tiefsee_gguf::dequantize(y.info.ggml_type(), y.data, n).unwrap();
            assert_eq!(xv, yv, "{}: {name} values differ", ours.display());
        }
    }
}

#[test]
fn float_files_equal_the_converters_in_order_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = |f: &str| fixtures().join("gguf-models").join(f);
    for (variant, ty, fixture) in [
        ("deepseek-v2-lite", "f32", "deepseek-v2-lite.f32.gguf"),
        ("deepseek-v3", "f16", "deepseek-v3.f16.gguf"),
        ("qwen2", "f16", "qwen2.f16.gguf"),
    ] {
        assert_same(
            &quantize(variant, ty, tmp.path()),
            &gguf(fixture),
            true,
            &[],
        );
    }
    // The converter wrote llama3 in bf16: the same values, rope_freqs included, and file type.
    let ours = quantize("llama3", "f32", tmp.path());
    assert_same(
        &ours,
        &gguf("llama3.bf16.gguf"),
        true,
        &["general.file_type"],
    );
}

#[test]
fn q8_0_equals_the_converters_in_llama_quantize_order() {
    // The converter's own Q8_0 has the same types and bytes as llama-quantize's, in the converter's order.
    let tmp = tempfile::tempdir().unwrap();
    for variant in ["deepseek-v3", "qwen2"] {
        let ours = quantize(variant, "q8_0", tmp.path());
        let theirs = fixtures()
            .join("gguf-models")
            .join(format!("{variant}.q8_0.gguf"));
        assert_same(&ours, &theirs, false, &[]);
        // llama-quantize's order: outside the blocks, then by block; its two keys last.
        let file = GgufFile::open(&ours).unwrap();
        let names: Vec<&str> = file.tensor_infos().iter().map(|t| t.name()).collect();
        let layer = |n: &str| {
            n.strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .map_or(-1, |l| l.parse::<i64>().unwrap())
        };
        let mut sorted = names.clone();
        sorted.sort_by_key(|n| (layer(n), n.to_string()));
        assert_eq!(names, sorted);
        let keys: Vec<&str> = file.metadata().iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys[keys.len() - 2..],
            ["general.quantization_version", "general.file_type"]
        );
        assert_eq!(
            file.metadata().get("general.file_type"),
            Some(&MetadataValue::U32(7))
        );
    }
}

#[test]
fn q4_k_m_equals_llama_quantize_in_order_and_bytes() {
    // Fixtures made by llama.cpp's own quantizer (tests/fixtures/make_llama_quantize.py) from the
    // converter's lossless files; only the name keys differ.
    let tmp = tempfile::tempdir().unwrap();
    for variant in ["deepseek-v3", "qwen2", "llama3"] {
        let ours = quantize(variant, "q4_k_m", tmp.path());
        let theirs = fixtures()
            .join("gguf-models")
            .join(format!("{variant}.q4_k_m.gguf"));
        assert_same(&ours, &theirs, true, &[]);
    }
}

/// Largest absolute difference divided by the spread (max - min) of the reference.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let max = expected.max_all().unwrap().to_scalar::<f32>().unwrap();
    let min = expected.min_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    diff.to_scalar::<f32>().unwrap() / (max - min).max(1e-12)
}

fn all_logits(path: &Path, ids: &[u32]) -> Tensor {
    let mut model =
        Model::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    model.set_cache_format(CacheFormat::F32).unwrap();
    let mut cache = model.new_cache(None).unwrap();
    model.forward(ids, &mut cache, Logits::All).unwrap()
}

#[test]
fn written_files_give_the_checkpoints_logits() {
    let tmp = tempfile::tempdir().unwrap();
    // Error budgets per position, as a fraction of the spread of the checkpoint's logits: float types
    // are exact up to f16 rounding (measured <= 3e-7); Q8_0 measured up to 2e-2 on these random-weight
    // fixtures, and Q4_K_M (mostly Q5_0 here: the fixtures' rows are not whole 256-blocks) up to 2.1e-1,
    // about the 16x of four fewer bits. Quantized kernels also round activations to 8 bits, as
    // llama.cpp does; where that flips a MoE routing decision, the position moves as far as choosing
    // another expert does, so a tenth of the positions may exceed a quantized type's budget.
    let budget = |ty: &str| match ty {
        "f32" | "f16" => 1e-4,
        "q8_0" => 3e-2,
        _ => 3e-1,
    };
    for variant in ["deepseek-v2-lite", "deepseek-v3", "qwen2", "llama3"] {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(model_dir(variant).join("golden.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = golden["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let reference = all_logits(&model_dir(variant), &ids);
        for ty in ["f32", "f16", "q8_0", "q4_k_m"] {
            let path = quantize(variant, ty, tmp.path());
            let logits = all_logits(&path, &ids);
            let errors: Vec<f32> = (0..ids.len())
                .map(|p| relative_error(&logits.get(p).unwrap(), &reference.get(p).unwrap()))
                .collect();
            let outside = errors.iter().filter(|&&e| e >= budget(ty)).count();
            let allowed = if ty.starts_with('f') {
                0
            } else {
                ids.len() / 10
            };
            eprintln!("{variant} {ty}: per-position errors {errors:?}");
            assert!(
                outside <= allowed,
                "{variant} {ty}: {outside} of {} positions differ by more than {:e}: {errors:?}",
                ids.len(),
                budget(ty)
            );
        }
    }
}

/// A copy of `variant` with the deepseek-v3 fixture's tokenizer cut down to `vocab` ids (vocabulary,
/// added tokens and the merges among what is left), for checkpoints that ship without one.
fn with_small_tokenizer(variant: &str, vocab: u64, dir: &Path) -> PathBuf {
    let out = dir.join(variant);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(model_dir(variant)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let source = model_dir("deepseek-v3");
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("tokenizer.json")).unwrap())
            .unwrap();
    let kept: serde_json::Map<String, Value> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| id.as_u64().unwrap() < vocab)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let parts: Vec<String> = match m {
                Value::String(s) => s.split(' ').map(str::to_owned).collect(),
                Value::Array(p) => p.iter().map(|x| x.as_str().unwrap().to_owned()).collect(),
                _ => unreachable!(),
            };
            parts.iter().all(|p| kept.contains_key(p)) && kept.contains_key(&parts.concat())
        })
        .cloned()
        .collect();
    let added: Vec<Value> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"].as_u64().unwrap() < vocab)
        .cloned()
        .collect();
    tok["model"]["vocab"] = Value::Object(kept);
    tok["model"]["merges"] = Value::Array(merges);
    tok["added_tokens"] = Value::Array(added);
    std::fs::write(out.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(
        source.join("tokenizer_config.json"),
        out.join("tokenizer_config.json"),
    )
    .unwrap();
    out
}

#[test]
fn fp8_and_transformers_5_checkpoints_convert() {
    // DeepSeek's FP8 release (block-scaled e4m3, dequantized on the way) and transformers 5's form
    // (fused experts `gate_up_proj`, `rope_parameters`): written as f32, the logits of the checkpoint.
    let tmp = tempfile::tempdir().unwrap();
    let transformers = with_small_tokenizer("deepseek-v3-transformers", 300, tmp.path());
    for (dir, reference) in [
        (model_dir("deepseek-v3-fp8"), model_dir("deepseek-v3-fp8")),
        (transformers, model_dir("deepseek-v3-transformers")),
    ] {
        let out = tmp.path().join("out.f32.gguf");
        let run = tiefsee(&[
            "quantize",
            "--model",
            dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--type",
            "f32",
        ]);
        assert!(run.status.success(), "{}: {}", dir.display(), stderr(&run));
        let ids = [0u32, 5, 17, 42, 99, 123, 250];
        let err = relative_error(&all_logits(&out, &ids), &all_logits(&reference, &ids));
        assert!(
            err < 1e-5,
            "{}: logits differ by {err:e} of their spread",
            dir.display()
        );
    }
}

#[test]
fn q4_k_m_follows_llama_quantizes_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let path = quantize("qwen2", "q4_k_m", tmp.path());
    let file = GgufFile::open(&path).unwrap();
    let ty = |n: &str| file.tensor(n).unwrap().info.ggml_type().name();
    // qwen2 fixture: hidden 96 (not whole 256-blocks, so Q4_K falls back to Q5_0 and Q6_K to Q8_0),
    // ffn_down rows of 224 (neither: Q5_0 is 32-blocks), tied embeddings (token_embd takes output's Q8_0).
    assert_eq!(ty("token_embd.weight"), "Q8_0");
    assert_eq!(ty("blk.0.attn_q.weight"), "Q5_0");
    assert_eq!(ty("blk.0.attn_v.weight"), "Q5_0"); // use_more_bits(0, 2) is false
    assert_eq!(ty("blk.1.attn_v.weight"), "Q8_0"); // Q6_K, fallen back
    assert_eq!(ty("blk.0.ffn_down.weight"), "Q5_0");
    assert_eq!(ty("blk.1.ffn_down.weight"), "Q8_0"); // Q6_K (last eighth), fallen back
    assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
    assert_eq!(ty("blk.0.attn_q.bias"), "F32");
    assert_eq!(
        file.metadata().get("general.file_type"),
        Some(&MetadataValue::U32(15))
    );
}

#[test]
fn bad_quantize_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let out = out.to_str().unwrap();
    let missing = tmp.path().join("no-such-model");
    let run = tiefsee(&[
        "quantize",
        "--model",
        missing.to_str().unwrap(),
        "--out",
        out,
        "--type",
        "q8_0",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("no-such-model") && stderr(&run).contains("does not exist"),
        "{}",
        stderr(&run)
    );

    let mistral = tmp.path().join("mistral");
    std::fs::create_dir(&mistral).unwrap();
    std::fs::write(
        mistral.join("config.json"),
        r#"{"architectures": ["MistralForCausalLM"]}"#,
    )
    .unwrap();
    let run = tiefsee(&[
        "quantize",
        "--model",
        mistral.to_str().unwrap(),
        "--out",
        out,
        "--type",
        "q8_0",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("MistralForCausalLM"),
        "{}",
        stderr(&run)
    );

    let no_tokenizer = tmp.path().join("no-tokenizer");
    std::fs::create_dir(&no_tokenizer).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir("qwen2").join(f), no_tokenizer.join(f)).unwrap();
    }
    let run = tiefsee(&[
        "quantize",
        "--model",
        no_tokenizer.to_str().unwrap(),
        "--out",
        out,
        "--type",
        "f16",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("tokenizer.json: file not found"),
        "{}",
        stderr(&run)
    );

    let gguf = fixtures().join("gguf-models").join("qwen2.f16.gguf");
    let run = tiefsee(&[
        "quantize",
        "--model",
        gguf.to_str().unwrap(),
        "--out",
        out,
        "--type",
        "q8_0",
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("is a file"), "{}", stderr(&run));

    let qwen = model_dir("qwen2");
    let run = tiefsee(&[
        "quantize",
        "--model",
        qwen.to_str().unwrap(),
        "--out",
        out,
        "--type",
        "q3_k_s",
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        stderr(&run).contains("unknown type \"q3_k_s\"") && stderr(&run).contains("q4_k_m"),
        "{}",
        stderr(&run)
    );
    assert!(!Path::new(out).exists());
}

fn bench(args: &[&str]) -> Output {
    let model = model_dir("qwen2");
    let mut all = vec!["bench", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    tiefsee(&all)
}

#[test]
fn bench_reports_rates_as_json() {
    let out = bench(&[
        "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--depth", "8", "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["pp_tps", "tg_tps"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(v["threads"], 1);
    assert_eq!(
        (v["p"].clone(), v["n"].clone(), v["depth"].clone()),
        (16.into(), 4.into(), 8.into())
    );
    assert_eq!(v["pp_samples"].as_array().unwrap().len(), 2);
    assert!(v["kv_bytes_per_token"].as_u64().unwrap() > 0);
    assert!(v["model"].as_str().unwrap().ends_with("qwen2"));

    // Sequences decoded together, each at the depth: all their tokens counted, no roofline (weights
    // are shared between them).
    let out = bench(&[
        "-p",
        "0",
        "-n",
        "3",
        "-r",
        "1",
        "--depth",
        "8",
        "--parallel",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["parallel"], 4);
    assert!(v["tg_tps"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["tg_roofline_tps"].is_null(), "{v}");
    let table = bench(&["-p", "0", "-n", "2", "-r", "1", "--parallel", "3"]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(String::from_utf8_lossy(&table.stdout).contains("tg2 x3"));

    let table = bench(&["-p", "8", "-n", "0", "-r", "1"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("pp8") && !text.contains("tg0"), "{text}");
}

#[test]
fn bench_refuses_bad_values() {
    for (args, needle) in [
        (&["-p", "0", "-n", "0"][..], "nothing to measure"),
        (&["-r", "0"][..], "-r must be at least 1"),
        (&["-t", "0"][..], "-t must be at least 1"),
        (&["--parallel", "0"][..], "--parallel must be at least 1"),
        (&["-p", "600"][..], "context"),
    ] {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let out = bench(&["-p", "-3"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
