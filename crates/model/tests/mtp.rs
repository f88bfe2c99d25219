//! The multi-token-prediction layer against a reference built from transformers' own decoder layer
//! (tests/fixtures/make_mtp_golden.py), and the training forward pass against the inference one.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tiefsee_model::{CacheFormat, Logits, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// Largest absolute difference divided by the spread (std) of the reference.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mean = want.mean_all().unwrap();
    let std = want
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / std
}

#[test]
fn mtp_logits_match_the_reference() {
    let dir = fixture("deepseek-v3");
    let golden = candle_core::safetensors::load(dir.join("mtp_golden.safetensors"), &Device::Cpu)
        .expect("mtp golden");
    let ids: Vec<u32> = golden["prompt_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    let model = Model::load(&dir, &Device::Cpu).expect("load");
    let deepseek = model.as_deepseek().expect("a DeepSeek model");
    assert_eq!(deepseek.mtp_layers().len(), 1);
    let out = deepseek.forward_train(&[&ids], true).expect("forward");
    assert_eq!(out.mtp_logits.len(), 1);
    let err = relative_error(&out.mtp_logits[0], &golden["mtp_logits"]);
    println!("MTP logits: max |diff| / std = {err:.2e}");
    assert!(err < 1e-4, "MTP logits differ: {err}");
}

#[test]
fn training_forward_equals_inference_forward() {
    let dir = fixture("deepseek-v3");
    let mut model = Model::load(&dir, &Device::Cpu).expect("load");
    model.set_cache_format(CacheFormat::F32).expect("f32 cache");
    let a: Vec<u32> = (0..37u32).map(|i| (i * 53 + 7) % 700).collect();
    let b: Vec<u32> = (0..12u32).map(|i| (i * 29 + 3) % 700).collect();
    let train = model
        .as_deepseek()
        .unwrap()
        .forward_train(&[&a, &b], true)
        .expect("train forward");
    for (offset, seq) in [(0, &a), (a.len(), &b)] {
        let mut cache = model.new_cache(None).expect("a cache");
        let want = model
            .forward(seq, &mut cache, Logits::All)
            .expect("forward");
        let got = train.logits.narrow(0, offset, seq.len()).unwrap();
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "training logits differ from inference: {err}");
    }
    // MTP rows: each sequence loses its last position.
    assert_eq!(
        train.mtp_logits[0].dims(),
        &[a.len() - 1 + b.len() - 1, 704]
    );
    // Routing of both MoE layers of the main model and of the MTP block, top-3 per token.
    let layers: Vec<usize> = train.routing.iter().map(|(l, _)| *l).collect();
    assert_eq!(layers, vec![1, 2, 3]);
    let (_, trace) = &train.routing[0];
    assert_eq!(trace.chosen.len(), (a.len() + b.len()) * 3);
    assert_eq!(trace.scores.dims(), &[a.len() + b.len(), 8]);
    // Sigmoid scoring: every affinity lies in (0, 1).
    let scores: Vec<Vec<f32>> = trace.scores.to_vec2().unwrap();
    assert!(scores.iter().flatten().all(|&s| s > 0.0 && s < 1.0));
}
