//! Batched forward passes over a paged cache give exactly what one sequence at a time gives:
//! chunked prefills, decodes and shared prefix blocks mixed in one step.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use tiefsee_model::{CacheFormat, Logits, Model, Result, Segment};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn reference(model: &Model, ids: &[u32]) -> Result<Tensor> {
    let mut cache = model.new_cache(None)?;
    model.forward(ids, &mut cache, Logits::All)
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "{what}: max difference {diff}");
}

#[test]
fn paged_batches_equal_single_sequences() -> Result<()> {
    for name in ["deepseek-v2-lite", "deepseek-v3", "qwen2", "llama3"] {
        // An exact cache: batching changes float rounding, which bf16 rows would magnify.
        let mut model = Model::load(&fixture(name), &Device::Cpu)?;
        model.set_cache_format(CacheFormat::F32)?;
        let a: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 97 + 1).collect();
        let b: Vec<u32> = (0..6).map(|i| (i * 11 + 5) % 89 + 2).collect();
        // d shares a's first 8 tokens (two full blocks of 4), then diverges.
        let mut d = a[..8].to_vec();
        d.extend([40, 41, 42]);
        let (ref_a, ref_b, ref_d) = (
            reference(&model, &a)?,
            reference(&model, &b)?,
            reference(&model, &d)?,
        );

        // Interleaved, non-contiguous slots: a gets blocks 5, 1, 7, 3; b gets 2, 6; d shares a's
        // first two blocks and owns block 0.
        let block = |b: usize| (b * 4..b * 4 + 4).collect::<Vec<usize>>();
        let table = |blocks: &[usize]| blocks.iter().flat_map(|&b| block(b)).collect::<Vec<_>>();
        let (table_a, table_b, table_d) = (table(&[5, 1, 7, 3]), table(&[2, 6]), table(&[5, 1, 0]));
        let mut cache = model.new_paged_cache(32)?;

        // Step 1: a's first chunk (no logits) and all of b but its last token.
        let step1 = [
            Segment {
                tokens: &a[..5],
                start: 0,
                logits: None,
            },
            Segment {
                tokens: &b[..5],
                start: 0,
                logits: Some(Logits::All),
            },
        ];
        let out = model.forward_paged(&step1, &mut cache, vec![&table_a, &table_b])?;
        assert!(out[0].is_none());
        assert_close(
            out[1].as_ref().unwrap(),
            &ref_b.narrow(0, 0, 5)?,
            "b prefill",
        );

        // Step 2: the rest of a, and b decoding one token.
        let step2 = [
            Segment {
                tokens: &a[5..],
                start: 5,
                logits: Some(Logits::All),
            },
            Segment {
                tokens: &b[5..],
                start: 5,
                logits: Some(Logits::Last),
            },
        ];
        let out = model.forward_paged(&step2, &mut cache, vec![&table_a, &table_b])?;
        assert_close(
            out[0].as_ref().unwrap(),
            &ref_a.narrow(0, 5, 8)?,
            "a second chunk",
        );
        assert_close(
            out[1].as_ref().unwrap(),
            &ref_b.narrow(0, 5, 1)?,
            "b decode",
        );

        // Step 3: d computes only what follows the shared prefix.
        let step3 = [Segment {
            tokens: &d[8..],
            start: 8,
            logits: Some(Logits::All),
        }];
        let out = model.forward_paged(&step3, &mut cache, vec![&table_d])?;
        assert_close(
            out[0].as_ref().unwrap(),
            &ref_d.narrow(0, 8, 3)?,
            "d after shared prefix",
        );
    }
    Ok(())
}

#[test]
fn paged_slot_tables_are_checked() -> Result<()> {
    let model = Model::load(&fixture("qwen2"), &Device::Cpu)?;
    let mut cache = model.new_paged_cache(4)?;
    let tokens = [1u32, 2, 3];
    let short = [0usize, 1];
    let segment = [Segment {
        tokens: &tokens,
        start: 0,
        logits: Some(Logits::Last),
    }];
    assert!(
        model
            .forward_paged(&segment, &mut cache, vec![&short])
            .is_err()
    );
    let outside = [0usize, 1, 9];
    assert!(
        model
            .forward_paged(&segment, &mut cache, vec![&outside])
            .is_err()
    );
    Ok(())
}
