//! DeepSeekMoE routing on hand-built cases whose answers are computed by hand here, and a MoE
//! layer with hand-built experts checked against a scalar evaluation of the same formula.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use tiefsee_model::config::{DeepSeekVersion, ModelConfig, ScoringFunc, TopkMethod};
use tiefsee_model::deepseek::moe::{Moe, Router};
use tiefsee_model::weights::Checkpoint;

fn router(version: DeepSeekVersion, scoring: ScoringFunc, method: TopkMethod) -> Router {
    Router {
        version,
        scoring,
        method,
        top_k: 2,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        correction_bias: None,
    }
}

/// Logits whose softmax is exactly `probs` (they sum to 1).
fn logits_for(probs: &[f32]) -> Vec<f32> {
    probs.iter().map(|p| p.ln()).collect()
}

fn assert_routing(actual: &[(usize, f32)], expected: &[(usize, f32)]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!(a.0, e.0, "{actual:?} vs {expected:?}");
        assert!((a.1 - e.1).abs() < 1e-5, "{actual:?} vs {expected:?}");
    }
}

#[test]
fn greedy_softmax_scales_by_routed_scaling_factor() {
    let mut r = router(
        DeepSeekVersion::V2,
        ScoringFunc::Softmax,
        TopkMethod::Greedy,
    );
    r.routed_scaling_factor = 2.0;
    let got = r.route(&logits_for(&[0.1, 0.2, 0.3, 0.4]));
    assert_routing(&got, &[(3, 0.8), (2, 0.6)]);
}

#[test]
fn group_limited_greedy_stays_in_the_best_groups() {
    // Two groups of four; the best group (by its best expert, 0.30) is group 0, so expert 4 (0.25)
    // is excluded although it is second overall.
    let probs = [0.30, 0.06, 0.05, 0.04, 0.25, 0.24, 0.03, 0.03];
    let mut r = router(
        DeepSeekVersion::V2,
        ScoringFunc::Softmax,
        TopkMethod::GroupLimitedGreedy,
    );
    r.n_group = 2;
    r.topk_group = 1;
    assert_routing(&r.route(&logits_for(&probs)), &[(0, 0.30), (1, 0.06)]);
    // Greedy would take experts 0 and 4.
    let greedy = router(
        DeepSeekVersion::V2,
        ScoringFunc::Softmax,
        TopkMethod::Greedy,
    );
    assert_routing(&greedy.route(&logits_for(&probs)), &[(0, 0.30), (4, 0.25)]);
}

#[test]
fn v2_normalizes_instead_of_scaling() {
    let probs = [0.30, 0.06, 0.05, 0.04, 0.25, 0.24, 0.03, 0.03];
    let mut r = router(
        DeepSeekVersion::V2,
        ScoringFunc::Softmax,
        TopkMethod::GroupLimitedGreedy,
    );
    r.n_group = 2;
    r.topk_group = 1;
    r.norm_topk_prob = true;
    r.routed_scaling_factor = 2.5;
    assert_routing(
        &r.route(&logits_for(&probs)),
        &[(0, 0.30 / 0.36), (1, 0.06 / 0.36)],
    );
}

#[test]
fn noaux_tc_selects_with_the_bias_and_weights_without_it() {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    let mut r = router(
        DeepSeekVersion::V3,
        ScoringFunc::Sigmoid,
        TopkMethod::NoauxTc,
    );
    r.n_group = 2;
    r.topk_group = 1;
    r.norm_topk_prob = true;
    r.routed_scaling_factor = 2.5;
    // Scores 0.5, 0.731, 0.881, 0.269; biased 1.0, 0.731, 0.281, 0.269. Group 0 (sum of its two best,
    // 1.731) beats group 1 (0.550), so experts 0 and 1 are chosen although expert 2 scores highest.
    r.correction_bias = Some(vec![0.5, 0.0, -0.6, 0.0]);
    let logits = [0.0, 1.0, 2.0, -1.0];
    let (s0, s1) = (sigmoid(0.0), sigmoid(1.0));
    let expected = [(0, 2.5 * s0 / (s0 + s1)), (1, 2.5 * s1 / (s0 + s1))];
    assert_routing(&r.route(&logits), &expected);
    // Without the bias, the best experts win: 2 and 1.
    r.correction_bias = Some(vec![0.0; 4]);
    r.n_group = 1;
    let (s1, s2) = (sigmoid(1.0), sigmoid(2.0));
    assert_routing(
        &r.route(&logits),
        &[(2, 2.5 * s2 / (s1 + s2)), (1, 2.5 * s1 / (s1 + s2))],
    );
}

#[test]
fn v3_group_score_is_the_sum_of_the_two_best() {
    // Group 0 has the single best expert (0.9) but group 1's two best sum higher (0.8 + 0.7).
    let inverse_sigmoid = |p: f32| (p / (1.0 - p)).ln();
    let logits: Vec<f32> = [0.9, 0.1, 0.8, 0.7]
        .iter()
        .map(|&p| inverse_sigmoid(p))
        .collect();
    let mut r = router(
        DeepSeekVersion::V3,
        ScoringFunc::Sigmoid,
        TopkMethod::NoauxTc,
    );
    r.n_group = 2;
    r.topk_group = 1;
    r.correction_bias = Some(vec![0.0; 4]);
    assert_routing(&r.route(&logits), &[(2, 0.8), (3, 0.7)]);
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn moe_layer_with_hand_built_experts() {
    // hidden 2, experts of width 1, top-1 softmax routing, one shared expert.
    let config = r#"{
        "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 4, "hidden_size": 2,
        "intermediate_size": 2, "moe_intermediate_size": 1, "num_hidden_layers": 1,
        "num_attention_heads": 1, "kv_lora_rank": 2, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
        "v_head_dim": 2, "n_routed_experts": 2, "n_shared_experts": 1, "num_experts_per_tok": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "routed_scaling_factor": 1.0,
        "max_position_embeddings": 16
    }"#;
    let ModelConfig::DeepSeek(cfg) = ModelConfig::from_json_str(config).unwrap() else {
        panic!("a DeepSeek config")
    };
    let dev = Device::Cpu;
    let t =
        |rows: usize, cols: usize, v: &[f32]| Tensor::from_slice(v, (rows, cols), &dev).unwrap();
    let tensors: HashMap<String, Tensor> = [
        ("mlp.gate.weight", t(2, 2, &[1., 0., 0., 1.])),
        ("mlp.experts.0.gate_proj.weight", t(1, 2, &[1., 0.])),
        ("mlp.experts.0.up_proj.weight", t(1, 2, &[1., 1.])),
        ("mlp.experts.0.down_proj.weight", t(2, 1, &[1., 2.])),
        ("mlp.experts.1.gate_proj.weight", t(1, 2, &[0., 1.])),
        ("mlp.experts.1.up_proj.weight", t(1, 2, &[0., 2.])),
        ("mlp.experts.1.down_proj.weight", t(2, 1, &[-1., 1.])),
        ("mlp.shared_experts.gate_proj.weight", t(1, 2, &[1., 1.])),
        ("mlp.shared_experts.up_proj.weight", t(1, 2, &[1., 0.])),
        ("mlp.shared_experts.down_proj.weight", t(2, 1, &[1., 1.])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let checkpoint = Checkpoint::open(dir.path(), &dev).unwrap();
    let moe = Moe::load(&checkpoint.pp("mlp"), &cfg).unwrap();

    let x = [[2.0f64, 0.0], [0.0, 3.0], [1.0, 1.5]];
    let input = Tensor::from_slice(
        &x.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(),
        (3, 2),
        &dev,
    )
    .unwrap();
    let got: Vec<Vec<f32>> = moe.forward(&input).unwrap().to_vec2().unwrap();

    for (row, out) in x.iter().zip(&got) {
        let [a, b] = *row;
        // Router logits equal the input; softmax over two experts, top-1.
        let p0 = a.exp() / (a.exp() + b.exp());
        let (expert, weight) = if p0 >= 0.5 { (0, p0) } else { (1, 1.0 - p0) };
        let routed = match expert {
            0 => {
                let h = silu(a) * (a + b);
                [h, 2.0 * h]
            }
            _ => {
                let h = silu(b) * (2.0 * b);
                [-h, h]
            }
        };
        let shared = silu(a + b) * a;
        for k in 0..2 {
            let expected = weight * routed[k] + shared;
            assert!(
                (out[k] as f64 - expected).abs() < 1e-5 * expected.abs().max(1.0),
                "{row:?}: {out:?}, expected component {k} = {expected}"
            );
        }
    }
}

#[test]
fn config_validation_names_the_field() {
    let err = ModelConfig::from_json_str(
        r#"{"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 4, "hidden_size": 2,
        "intermediate_size": 2, "moe_intermediate_size": 1, "num_hidden_layers": 1,
        "num_attention_heads": 1, "kv_lora_rank": 2, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2,
        "v_head_dim": 2, "n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 4,
        "topk_group": 1, "max_position_embeddings": 16}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("n_group"), "{err}");
    let err = ModelConfig::from_json_str(
        r#"{"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 4, "hidden_size": 2,
        "intermediate_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1,
        "kv_lora_rank": 2, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2,
        "max_position_embeddings": 16, "rope_scaling": {"type": "dynamic", "factor": 2.0}}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("rope_scaling"), "{err}");
}
