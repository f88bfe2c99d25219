//! GGUF models against the safetensors checkpoints they were converted from: llama.cpp's own converter
//! turned each fixture into GGUF (tests/fixtures/make_gguf_models.py), so equal logits show that
//! metadata, tensor names, layouts and permutations are all read back as llama.cpp wrote them.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tiefsee_model::config::RopeScaling;
use tiefsee_model::{CacheFormat, Checkpoint, Logits, Model, ModelConfig, ModelError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gguf(name: &str) -> PathBuf {
    root().join("gguf-models").join(name)
}

fn prompt_ids(variant: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(root().join("models").join(variant).join("golden.json"))
        .expect("golden.json");
    let golden: serde_json::Value = serde_json::from_str(&text).expect("golden.json parses");
    golden["prompt_ids"]
        .as_array()
        .expect("prompt_ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn logits(model: &Model, ids: &[u32]) -> Tensor {
    let mut cache = model.new_cache(None).expect("a cache");
    model
        .forward(ids, &mut cache, Logits::All)
        .expect("forward")
}

/// Largest absolute difference divided by the spread (max - min) of the reference.
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let spread = (expected.max_all().unwrap().to_scalar::<f32>().unwrap()
        - expected.min_all().unwrap().to_scalar::<f32>().unwrap())
    .max(1e-12);
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    diff.to_scalar::<f32>().unwrap() / spread
}

/// A model with an exact (f32) cache, so that comparisons see the weights' differences only.
fn load(path: &Path) -> Model {
    let mut model =
        Model::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    model.set_cache_format(CacheFormat::F32).expect("f32 cache");
    model
}

/// Greedy continuation through the KV cache.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache(None).expect("a cache");
    let mut logits = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let token = logits.squeeze(0).unwrap().argmax(0).unwrap();
        let token = token.to_scalar::<u32>().unwrap();
        out.push(token);
        logits = model.forward(&[token], &mut cache, Logits::Last).unwrap();
    }
    out
}

fn assert_same_model(gguf_file: &str, reference: &Model, variant: &str) {
    let model = load(&gguf(gguf_file));
    let ids = prompt_ids(variant);
    let err = relative_error(&logits(&model, &ids), &logits(reference, &ids));
    eprintln!("{gguf_file}: logits within {err:.1e} of their spread");
    assert!(
        err < 1e-4,
        "{gguf_file}: logits differ by {err:e} of their spread"
    );
    assert_eq!(
        greedy(&model, &ids, 12),
        greedy(reference, &ids, 12),
        "{gguf_file}: greedy tokens"
    );
}

#[test]
fn converted_files_give_the_logits_of_their_checkpoints() {
    for (file, variant) in [
        ("deepseek-v2-lite.f32.gguf", "deepseek-v2-lite"),
        ("deepseek-v2-lite.kvb.f32.gguf", "deepseek-v2-lite"),
        ("deepseek-v3.f16.gguf", "deepseek-v3"),
        ("qwen2.f16.gguf", "qwen2"),
        ("llama3.bf16.gguf", "llama3"),
    ] {
        let reference = load(&root().join("models").join(variant));
        assert_same_model(file, &reference, variant);
    }
}

/// GGUF stores only `0.1 * mscale_all_dim` of YaRN, and llama.cpp computes as if `mscale` were equal
/// to it. The deepseek-v2 fixture has mscale 1.0 != mscale_all_dim 0.8 (to exercise transformers'
/// cos/sin factor), so its GGUF equals the checkpoint with `mscale` set to 0.8.
#[test]
fn deepseek_v2_gguf_equals_the_checkpoint_with_llama_cpp_yarn() {
    let dir = root().join("models/deepseek-v2");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["rope_scaling"]["mscale"] = json["rope_scaling"]["mscale_all_dim"].clone();
    let config = ModelConfig::from_json_str(&json.to_string()).unwrap();
    let checkpoint = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let mut reference = Model::from_checkpoint(config, &checkpoint).unwrap();
    reference.set_cache_format(CacheFormat::F32).unwrap();
    assert_same_model("deepseek-v2.f32.gguf", &reference, "deepseek-v2");
}

#[test]
fn metadata_maps_to_the_checkpoint_config() {
    let (config, _) =
        tiefsee_model::gguf::open(&gguf("deepseek-v3.f16.gguf"), &Device::Cpu).unwrap();
    let expected = ModelConfig::from_dir(&root().join("models/deepseek-v3")).unwrap();
    let (ModelConfig::DeepSeek(c), ModelConfig::DeepSeek(e)) = (&config, &expected) else {
        panic!("not DeepSeek: {config:?}");
    };
    assert_eq!(c.version, e.version);
    assert_eq!(
        (
            c.q_lora_rank,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim
        ),
        (
            e.q_lora_rank,
            e.kv_lora_rank,
            e.qk_nope_head_dim,
            e.qk_rope_head_dim,
            e.v_head_dim
        )
    );
    assert_eq!(
        (
            c.n_routed_experts,
            c.n_shared_experts,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group
        ),
        (
            e.n_routed_experts,
            e.n_shared_experts,
            e.num_experts_per_tok,
            e.n_group,
            e.topk_group
        )
    );
    assert_eq!(
        (c.topk_method, c.scoring_func),
        (e.topk_method, e.scoring_func)
    );
    assert_eq!(
        (c.norm_topk_prob, c.routed_scaling_factor),
        (e.norm_topk_prob, e.routed_scaling_factor)
    );
    assert_eq!(c.first_k_dense_replace, e.first_k_dense_replace);
    assert_eq!(
        (c.rms_norm_eps, c.rope_theta),
        (e.rms_norm_eps, e.rope_theta)
    );
    assert_eq!(c.softmax_scale(), e.softmax_scale());
    // The converter drops the MTP layer (llama.cpp does not run it yet).
    assert_eq!(c.num_nextn_predict_layers, 0);

    let (llama, _) = tiefsee_model::gguf::open(&gguf("llama3.bf16.gguf"), &Device::Cpu).unwrap();
    let ModelConfig::Llama(l) = llama else {
        panic!("not Llama")
    };
    // Llama 3.1 scaling arrives as llama.cpp's per-frequency divisors: of the 8 frequencies of the
    // fixture, 2 kept, 1 blended, 5 divided by 8 (tests/fixtures/README.md).
    let RopeScaling::Factors(factors) = &l.rope_scaling else {
        panic!("{:?}", l.rope_scaling)
    };
    assert_eq!(factors.len(), 8);
    assert_eq!(factors.iter().filter(|&&f| f == 1.0).count(), 2);
    assert_eq!(factors.iter().filter(|&&f| f == 8.0).count(), 5);
}

#[test]
fn info_counts_the_same_parameters() {
    for (file, variant) in [
        ("deepseek-v2-lite.f32.gguf", "deepseek-v2-lite"),
        ("deepseek-v2-lite.kvb.f32.gguf", "deepseek-v2-lite"),
        ("qwen2.f16.gguf", "qwen2"),
        ("llama3.bf16.gguf", "llama3"),
    ] {
        let from_gguf = load(&gguf(file)).info().clone();
        let from_dir = load(&root().join("models").join(variant)).info().clone();
        assert_eq!(from_gguf.total_params, from_dir.total_params, "{file}");
        assert_eq!(from_gguf.active_params, from_dir.active_params, "{file}");
        assert_eq!(
            from_gguf.kv_bytes_per_token, from_dir.kv_bytes_per_token,
            "{file}"
        );
    }
}

/// The weight bytes a decoded token reads, counted from the file's own tensor table: everything but the
/// input embedding (unless the head is tied to it) and, of each stacked expert tensor, the share of the
/// experts a token does not visit.
#[test]
fn info_counts_the_weight_bytes_a_token_reads() {
    for file in [
        "deepseek-v3.q8_0.gguf",
        "deepseek-v3.q4_k_m.gguf",
        "qwen2.q8_0.gguf",
    ] {
        let path = gguf(file);
        let model = load(&path);
        let (experts, top_k) = match model.config() {
            ModelConfig::DeepSeek(c) => (c.n_routed_experts, c.num_experts_per_tok),
            ModelConfig::Llama(_) => (1, 1),
        };
        let has_head = tiefsee_gguf::GgufFile::open(&path)
            .unwrap()
            .contains_tensor("output.weight");
        let expected: usize = tiefsee_gguf::GgufFile::open(&path)
            .unwrap()
            .tensor_infos()
            .iter()
            .map(|t| match t.name() {
                "token_embd.weight" if has_head => 0,
                "rope_freqs.weight" => 0,
                n if n.contains("_exps.") => t.n_bytes() / experts * top_k,
                _ => t.n_bytes(),
            })
            .sum();
        assert_eq!(
            model.info().weight_bytes_per_token,
            expected as u64,
            "{file}"
        );
    }
}

fn write_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(gguf("qwen2.f16.gguf")).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Replaces the first occurrence of `from` by `to` (same length) in a file's bytes.
fn replace(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    bytes[at..at + to.len()].copy_from_slice(to);
}

#[test]
fn bad_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |path: &Path| Model::load(path, &Device::Cpu).unwrap_err();

    // Unknown architecture: the value of general.architecture, same length.
    let path = write_variant(tmp.path(), "arch.gguf", |b| {
        replace(b, b"\x05\0\0\0\0\0\0\0qwen2", b"\x05\0\0\0\0\0\0\0qwen9")
    });
    let e = err(&path);
    assert!(
        matches!(e, ModelError::UnsupportedGgufArchitecture { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("\"qwen9\""), "{e}");

    // A missing metadata key: rename qwen2.block_count.
    let path = write_variant(tmp.path(), "key.gguf", |b| {
        replace(b, b"qwen2.block_count", b"qwen2.block_kount")
    });
    let e = err(&path);
    assert!(e.to_string().contains("qwen2.block_count"), "{e}");

    // An unknown tensor name.
    let path = write_variant(tmp.path(), "tensor.gguf", |b| {
        replace(b, b"blk.0.ffn_up.weight", b"blk.0.ffn_xx.weight")
    });
    let e = err(&path);
    assert!(matches!(e, ModelError::UnknownGgufTensor { .. }), "{e}");
    assert!(e.to_string().contains("blk.0.ffn_xx.weight"), "{e}");

    // Metadata that disagrees with the tensors: a wider feed-forward than stored.
    let path = write_variant(tmp.path(), "shape.gguf", |b| {
        let key = b"qwen2.feed_forward_length";
        let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        // u32 type tag, then the value 224.
        assert_eq!(&b[at..at + 8], &[4, 0, 0, 0, 224, 0, 0, 0]);
        b[at + 4] = 225;
    });
    let e = err(&path);
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("ffn_"), "{e}");

    // Truncated.
    let bytes = std::fs::read(gguf("qwen2.f16.gguf")).unwrap();
    let path = tmp.path().join("truncated.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&path);
    assert!(e.to_string().contains("truncated.gguf"), "{e}");
}

/// Q8_0 files (the converter's own quantization; rows not divisible by 32 stay F16/F32): expert slabs
/// are cut from the quantized bytes, so each must equal the same slab of the whole tensor dequantized.
/// The quantized kernels also round activations to 8 bits (as llama.cpp does): per position, logits
/// stay within 3e-2 of the spread of the checkpoint's (measured <= 2e-2), except where the small
/// perturbation flips a MoE routing decision, which moves that position's logits as far as choosing
/// another expert does (1 of 12 positions on deepseek-v3); at most a tenth of the positions may.
#[test]
fn q8_0_files_slice_quantized_experts_and_stay_close() {
    let path = gguf("deepseek-v3.q8_0.gguf");
    let file = tiefsee_gguf::GgufFile::open(&path).unwrap();
    let stacked = file.tensor("blk.1.ffn_gate_exps.weight").unwrap();
    assert_eq!(stacked.info.ggml_type(), tiefsee_gguf::GgmlType::Q8_0);
    let shape = stacked.info.shape(); // (experts, moe_inter, hidden)
    let whole = Tensor::from_vec(
        stacked.dequantize().unwrap(),
        shape.as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    let (_, checkpoint) = tiefsee_model::gguf::open(&path, &Device::Cpu).unwrap();
    for e in 0..shape[0] {
        let slab = checkpoint
            .get(
                &format!("model.layers.1.mlp.experts.{e}.gate_proj.weight"),
                &shape[1..],
            )
            .unwrap();
        let diff = (slab - whole.get(e).unwrap()).unwrap().abs().unwrap();
        assert_eq!(
            diff.max_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0,
            "expert {e}"
        );
    }
    for (file, variant, budget) in [
        ("qwen2.q8_0.gguf", "qwen2", 3e-2),
        ("deepseek-v3.q8_0.gguf", "deepseek-v3", 3e-2),
    ] {
        let reference = load(&root().join("models").join(variant));
        let ids = prompt_ids(variant);
        let model = load(&gguf(file));
        let (ours, theirs) = (logits(&model, &ids), logits(&reference, &ids));
        let errors: Vec<f32> = (0..ids.len())
            .map(|p| relative_error(&ours.get(p).unwrap(), &theirs.get(p).unwrap()))
            .collect();
        let outside = errors.iter().filter(|&&e| e >= budget).count();
        eprintln!("{file}: per-position logit errors {errors:?}");
        assert!(
            outside * 10 <= ids.len(),
            "{file}: {outside} of {} positions differ by more than {budget:e}: {errors:?}",
            ids.len()
        );
    }
}

/// The quantized MoE groups a batch's tokens per expert (each expert's weights read once for all of
/// them) and the kernels take tokens in groups: a prompt in one pass, the same prompt one token at a
/// time, and two prompts of one batch through the paged cache must give the same logits (up to float
/// summation order in attention).
#[test]
fn quantized_moe_batches_equal_tokens_one_at_a_time() {
    let model = load(&gguf("deepseek-v3.q8_0.gguf"));
    let ids = prompt_ids("deepseek-v3");
    let whole = logits(&model, &ids);
    let mut cache = model.new_cache(None).unwrap();
    let one_by_one: Vec<Tensor> = ids
        .iter()
        .map(|&id| model.forward(&[id], &mut cache, Logits::Last).unwrap())
        .collect();
    let one_by_one = Tensor::cat(&one_by_one, 0).unwrap();
    let errors: Vec<f32> = (0..ids.len())
        .map(|p| relative_error(&one_by_one.get(p).unwrap(), &whole.get(p).unwrap()))
        .collect();
    // The file's F16 projections run through an f32 matrix product whose rounding depends on the
    // number of rows, so queries differ in their last bits between the two; later layers quantize
    // their inputs to 8 bits, which absorbs that everywhere but where a value sits at a rounding step
    // (1 of 22 positions here). At most a tenth of the positions may differ more.
    let outside = errors.iter().filter(|&&e| e >= 1e-4).count();
    assert!(
        outside * 10 <= ids.len(),
        "one at a time vs one pass: {errors:?}"
    );

    // Two sequences in one batch: the second is the prompt reversed, so the experts see tokens of
    // both at different positions. Both are cut to 15 tokens: from 32 tokens in one product, the
    // legacy formats multiply in f32 instead of with 8-bit activations (see tiefsee_kernels), which
    // would change the results by the activations' rounding, not by a batching error.
    let ids = &ids[..15];
    let first = logits(&model, ids);
    let other: Vec<u32> = ids.iter().rev().copied().collect();
    let alone = logits(&model, &other);
    let mut paged = model.new_paged_cache(2 * ids.len()).unwrap();
    let tables: Vec<Vec<usize>> = vec![
        (0..ids.len()).collect(),
        (ids.len()..2 * ids.len()).collect(),
    ];
    let segments = [
        tiefsee_model::Segment {
            tokens: ids,
            start: 0,
            logits: Some(Logits::All),
        },
        tiefsee_model::Segment {
            tokens: &other,
            start: 0,
            logits: Some(Logits::All),
        },
    ];
    let together = model
        .forward_paged(
            &segments,
            &mut paged,
            tables.iter().map(Vec::as_slice).collect(),
        )
        .unwrap();
    for (got, expected) in together.iter().zip([&first, &alone]) {
        let got = got.as_ref().unwrap();
        for p in 0..ids.len() {
            let e = relative_error(&got.get(p).unwrap(), &expected.get(p).unwrap());
            assert!(
                e < 1e-5,
                "position {p}: batched with another sequence {e:e}"
            );
        }
    }
}
