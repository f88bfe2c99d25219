//! The inference model is also the training model: built from trainable variables and run as training
//! runs it (naive MLA, no cache), one backward pass reaches every parameter (composed norms, RoPE and
//! routing weights; candle-nn's fused ops would pass no gradient), and the gradient agrees with finite
//! differences.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor, Var};
use tiefsee_model::{Checkpoint, Logits, MlaPath, Model, ModelConfig, Segment, Uncached};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The fixture's parameters as f64 variables (the MTP layer and the selection-only routing bias
/// excluded: neither takes part in the main model's loss).
fn variables(name: &str) -> (ModelConfig, HashMap<String, Var>) {
    let dir = fixture(name);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vars = tensors
        .into_iter()
        .filter(|(n, _)| {
            !n.starts_with("model.layers.3.") && !n.ends_with("e_score_correction_bias")
        })
        .map(|(n, t)| {
            (
                n,
                Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap(),
            )
        })
        .collect();
    (config, vars)
}

fn model_of(config: &ModelConfig, vars: &HashMap<String, Var>, bias_from: &str) -> Model {
    let mut tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    // The routing bias is a buffer, not a parameter: taken from the checkpoint as it is.
    let stored =
        candle_core::safetensors::load(fixture(bias_from).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, t) in stored
        .into_iter()
        .filter(|(n, _)| n.ends_with("e_score_correction_bias"))
    {
        tensors.insert(name, t);
    }
    let mut model = Model::from_checkpoint(
        config.clone(),
        &Checkpoint::from_tensors(tensors, &Device::Cpu),
    )
    .unwrap();
    model
        .as_deepseek_mut()
        .unwrap()
        .set_mla_path(MlaPath::Naive);
    model
}

/// Mean next-token cross-entropy over `tokens`, as a differentiable scalar.
fn loss(model: &Model, tokens: &[u32]) -> Tensor {
    let segment = Segment {
        tokens: &tokens[..tokens.len() - 1],
        start: 0,
        logits: Some(Logits::All),
    };
    let logits = model
        .forward_batch(&[segment], &mut Uncached)
        .unwrap()
        .remove(0)
        .unwrap();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let targets = Tensor::new(&tokens[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    log_probs
        .gather(&targets, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
}

fn tokens() -> Vec<u32> {
    (0..48u32).map(|i| (i * 37 + 11) % 700).collect()
}

#[test]
fn every_parameter_receives_a_gradient() {
    let (config, vars) = variables("deepseek-v3");
    let model = model_of(&config, &vars, "deepseek-v3");
    let grads = loss(&model, &tokens()).backward().unwrap();
    let mut missing = Vec::new();
    for (name, var) in &vars {
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
    missing.sort();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn gradient_matches_finite_differences() {
    let (config, vars) = variables("deepseek-v3");
    let tokens = tokens();
    let model = model_of(&config, &vars, "deepseek-v3");
    let grads = loss(&model, &tokens).backward().unwrap();
    // One entry each of an MLA projection, the router and a routed expert.
    for (name, flat) in [
        ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", 5usize),
        ("model.layers.1.self_attn.kv_b_proj.weight", 17),
        ("model.layers.2.mlp.gate.weight", 3),
        ("model.layers.2.mlp.experts.1.down_proj.weight", 7),
    ] {
        let var = &vars[name];
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[flat];
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| {
            let mut values = original.clone();
            values[flat] += delta;
            var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let shifted = model_of(&config, &vars, "deepseek-v3");
            loss(&shifted, &tokens).to_scalar::<f32>().unwrap()
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&Tensor::from_vec(original, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        let scale = analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(
            (analytic - numeric).abs() / scale < 0.05,
            "{name}[{flat}]: backprop {analytic} vs finite difference {numeric}"
        );
    }
}
