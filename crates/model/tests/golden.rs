//! Golden tests: every fixture checkpoint against the logits and greedy tokens transformers computed
//! (tests/fixtures/make_models.py), plus the equivalences the fast paths rely on.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use tiefsee_model::{CacheFormat, Logits, MlaPath, Model, Result};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The committed fixtures, plus every checkpoint folder (with a golden.json) under the folders
/// listed in `TIEFSEE_EXTRA_FIXTURES` (colon-separated), made by the same script elsewhere.
fn variants() -> Vec<PathBuf> {
    let mut roots = vec![fixture("")];
    if let Ok(extra) = std::env::var("TIEFSEE_EXTRA_FIXTURES") {
        roots.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    let mut dirs: Vec<PathBuf> = roots
        .iter()
        .flat_map(|root| std::fs::read_dir(root).expect("fixture folder"))
        .map(|entry| entry.expect("fixture entry").path())
        .filter(|dir| dir.join("golden.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 6, "fixtures missing: {dirs:?}");
    dirs
}

fn is_deepseek(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .expect("config.json")
        .contains("\"Deepseek")
}

#[derive(Deserialize)]
struct Golden {
    prompt_ids: Vec<u32>,
    greedy_new_ids: Vec<u32>,
}

fn golden(dir: &Path) -> (Golden, Tensor) {
    let json = std::fs::read_to_string(dir.join("golden.json")).expect("golden.json");
    let golden: Golden = serde_json::from_str(&json).expect("golden.json fields");
    let tensors = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        .expect("golden.safetensors");
    (golden, tensors["logits"].clone())
}

/// The model with an exact (f32) cache, as the oracle computes.
fn load(dir: &Path) -> Model {
    let mut model =
        Model::load(dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    model.set_cache_format(CacheFormat::F32).expect("f32 cache");
    model
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

fn full_logits(model: &Model, ids: &[u32]) -> Result<Tensor> {
    let mut cache = model.new_cache(None)?;
    model.forward(ids, &mut cache, Logits::All)
}

#[test]
fn logits_match_transformers() -> Result<()> {
    for dir in variants() {
        let (golden, expected) = golden(&dir);
        let logits = full_logits(&load(&dir), &golden.prompt_ids)?;
        let err = relative_error(&logits, &expected);
        eprintln!("{}: logits within {err:.1e} of their spread", dir.display());
        assert!(
            err < 1e-4,
            "{}: logits differ by {err:e} of their spread",
            dir.display()
        );
    }
    Ok(())
}

#[test]
fn greedy_continuations_match_transformers() -> Result<()> {
    for dir in variants() {
        let (golden, _) = golden(&dir);
        let model = load(&dir);
        let mut cache = model.new_cache(None)?;
        let mut logits = model.forward(&golden.prompt_ids, &mut cache, Logits::Last)?;
        let mut generated = Vec::new();
        while generated.len() < golden.greedy_new_ids.len() {
            let token = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            generated.push(token);
            logits = model.forward(&[token], &mut cache, Logits::Last)?;
        }
        assert_eq!(generated, golden.greedy_new_ids, "{}", dir.display());
    }
    Ok(())
}

#[test]
fn cached_decoding_equals_one_full_pass() -> Result<()> {
    for dir in variants() {
        let (golden, _) = golden(&dir);
        let model = load(&dir);
        let ids = &golden.prompt_ids;
        let full = full_logits(&model, ids)?;
        // Prefill a few tokens, then feed the rest one by one.
        let mut cache = model.new_cache(None)?;
        let mut rows = vec![model.forward(&ids[..5], &mut cache, Logits::All)?];
        for &id in &ids[5..] {
            rows.push(model.forward(&[id], &mut cache, Logits::All)?);
        }
        let stepped = Tensor::cat(&rows, 0)?;
        let err = relative_error(&stepped, &full);
        assert!(
            err < 1e-5,
            "{}: cached differs from full by {err:e}",
            dir.display()
        );
    }
    Ok(())
}

#[test]
fn absorbed_mla_equals_naive_mla() -> Result<()> {
    for dir in variants().into_iter().filter(|d| is_deepseek(d)) {
        let (golden, _) = golden(&dir);
        let mut model = load(&dir);
        let ids = &golden.prompt_ids;
        let absorbed = full_logits(&model, ids)?;
        let mut cache = model.new_cache(None)?;
        let absorbed_step = {
            model.forward(&ids[..ids.len() - 1], &mut cache, Logits::Last)?;
            model.forward(&ids[ids.len() - 1..], &mut cache, Logits::Last)?
        };
        model
            .as_deepseek_mut()
            .expect("a DeepSeek model")
            .set_mla_path(MlaPath::Naive);
        let naive = full_logits(&model, ids)?;
        let mut cache = model.new_cache(None)?;
        model.forward(&ids[..ids.len() - 1], &mut cache, Logits::Last)?;
        let naive_step = model.forward(&ids[ids.len() - 1..], &mut cache, Logits::Last)?;
        let err = relative_error(&absorbed, &naive);
        assert!(
            err < 1e-5,
            "{}: absorbed differs from naive by {err:e}",
            dir.display()
        );
        let err = relative_error(&absorbed_step, &naive_step);
        assert!(
            err < 1e-5,
            "{}: cached absorbed differs from naive by {err:e}",
            dir.display()
        );
    }
    Ok(())
}

#[test]
fn latent_cache_holds_only_the_latent() -> Result<()> {
    let mut model = load(&fixture("deepseek-v3"));
    let tiefsee_model::ModelConfig::DeepSeek(cfg) = model.config().clone() else {
        panic!("deepseek-v3 is a DeepSeek config");
    };
    let values = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers;
    let rows = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
    let q8 = if rows % 32 == 0 {
        Some(values + 4 * values / 32)
    } else {
        None
    };
    for (format, per_token) in [
        (CacheFormat::F32, Some(4 * values)),
        (CacheFormat::Bf16, Some(2 * values)),
        (CacheFormat::Q8, q8),
    ] {
        let Some(per_token) = per_token else {
            let err = model.set_cache_format(format).unwrap_err();
            assert!(err.to_string().contains("blocks of 32"), "{err}");
            continue;
        };
        model.set_cache_format(format)?;
        assert_eq!(model.info().kv_bytes_per_token, per_token as u64);
        let mut cache = model.new_cache(None)?;
        model.forward(&[3, 4, 5, 6, 7], &mut cache, Logits::Last)?;
        assert_eq!(cache.bytes(), 5 * per_token, "{format:?}");
        // Memory is allocated ahead and stays flat while tokens arrive within it.
        let allocated = cache.allocated_bytes();
        for t in 0..50 {
            model.forward(&[8 + t], &mut cache, Logits::Last)?;
        }
        assert_eq!(cache.allocated_bytes(), allocated, "{format:?}");
    }
    Ok(())
}

/// The default bf16 cache and the 8-bit one round what attention reads; per position, the logits stay
/// close to the oracle's (f32 golden), except where the rounding flips a MoE routing decision, which
/// moves that position as far as choosing another expert does: at most a tenth of the positions may.
#[test]
fn rounded_caches_stay_close_to_transformers() -> Result<()> {
    for dir in variants() {
        let (golden, expected) = golden(&dir);
        let mut model = load(&dir);
        for (format, budget) in [(CacheFormat::Bf16, 1e-2), (CacheFormat::Q8, 3e-2)] {
            if model.set_cache_format(format).is_err() {
                continue; // rows that are not whole q8 blocks (asserted above)
            }
            let logits = full_logits(&model, &golden.prompt_ids)?;
            let positions = golden.prompt_ids.len();
            let errors: Vec<f32> = (0..positions)
                .map(|p| relative_error(&logits.get(p).unwrap(), &expected.get(p).unwrap()))
                .collect();
            let outside = errors.iter().filter(|&&e| e >= budget).count();
            eprintln!("{}: {format:?} cache, errors {errors:?}", dir.display());
            assert!(
                outside * 10 <= positions,
                "{}: {format:?} cache: {outside} of {positions} positions differ by more than {budget:e}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// A safetensors checkpoint's float matrices are multiplied where they lie: the bf16, f16 and f32
/// fixtures' projections come back as matrices of their stored type over the file's bytes (which
/// the golden tests above then run through), and a wrong shape is an error naming the tensor.
#[test]
fn float_safetensors_matrices_are_read_in_place() {
    use tiefsee_gguf::GgmlType;
    use tiefsee_model::weights::Checkpoint;
    for (dir, name, shape, ty) in [
        (
            "llama3",
            "model.layers.0.self_attn.q_proj.weight",
            [128, 128],
            GgmlType::BF16,
        ),
        (
            "qwen2",
            "model.layers.0.mlp.down_proj.weight",
            [0, 0],
            GgmlType::F16,
        ),
        (
            "deepseek-v2",
            "model.layers.0.self_attn.o_proj.weight",
            [0, 0],
            GgmlType::F32,
        ),
    ] {
        let checkpoint = Checkpoint::open(&fixture(dir), &Device::Cpu).unwrap();
        let shape = if shape[0] == 0 {
            checkpoint.shape_of(name).unwrap().to_vec()
        } else {
            shape.to_vec()
        };
        let matrix = checkpoint
            .get_quantized(name, &shape)
            .unwrap()
            .unwrap_or_else(|| panic!("{dir}: {name} not read in place"));
        assert_eq!(matrix.ty(), Some(ty), "{dir}: {name}");
        assert_eq!([matrix.rows(), matrix.cols()], [shape[0], shape[1]]);
        let dense = checkpoint.get(name, &shape).unwrap();
        let row: Vec<f32> = dense.get(1).unwrap().to_vec1().unwrap();
        let mut decoded = vec![0f32; shape[1]];
        matrix.dequantize_row(1, &mut decoded);
        assert_eq!(row, decoded, "{dir}: {name} row 1");
        let wrong = [shape[0] + 1, shape[1]];
        let err = checkpoint.get_quantized(name, &wrong).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// DeepSeek's FP8 matrices stay one byte per weight in the memory map, their `weight_scale_inv` grid
/// beside them: every row decodes to what candle's own e4m3 conversion times the block scale gives
/// (`Checkpoint::get`), partial blocks and all; an e4m3 tensor in a checkpoint that does not declare
/// block-scaled FP8 is an error naming it.
#[test]
fn fp8_matrices_are_read_in_place() {
    use tiefsee_model::weights::Checkpoint;
    let dir = fixture("deepseek-v3-fp8");
    let plain = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let checkpoint = Checkpoint::open(&dir, &Device::Cpu)
        .unwrap()
        .with_fp8_block_size(Some([128, 128]));
    for name in [
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        let shape = checkpoint.shape_of(name).unwrap().to_vec();
        let matrix = checkpoint
            .get_quantized(name, &shape)
            .unwrap()
            .unwrap_or_else(|| panic!("{name} not read in place"));
        assert_eq!(matrix.ty(), None, "{name}");
        assert_eq!(
            matrix.data().len(),
            shape[0] * shape[1],
            "{name}: one byte per weight"
        );
        let dense: Vec<Vec<f32>> = checkpoint.get(name, &shape).unwrap().to_vec2().unwrap();
        let mut decoded = vec![0f32; shape[1]];
        for (r, row) in dense.iter().enumerate() {
            matrix.dequantize_row(r, &mut decoded);
            assert_eq!(row, &decoded, "{name} row {r}");
        }
        let err = plain.get_quantized(name, &shape).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}
