use tiefsee_gguf::{GgmlType, quantize};
#[test]
fn scratch_compare_llamacpp() {
    let b = std::fs::read("/tmp/kq/in.f32").unwrap();
    let x: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for (ty, suffix) in [
        (GgmlType::Q2_K, "q2_K"),
        (GgmlType::Q3_K, "q3_K"),
        (GgmlType::Q4_K, "q4_K"),
        (GgmlType::Q5_K, "q5_K"),
        (GgmlType::Q6_K, "q6_K"),
        (GgmlType::Q8_K, "q8_K"),
        (GgmlType::Q4_0, "q4_0"),
        (GgmlType::Q4_1, "q4_1"),
        (GgmlType::Q5_0, "q5_0"),
        (GgmlType::Q5_1, "q5_1"),
        (GgmlType::Q8_0, "q8_0"),
    ] {
        let want = std::fs::read(format!("/tmp/kq/out.{suffix}")).unwrap();
        let got = quantize(ty, &x).unwrap();
        let ts = ty.type_size();
        let bad: Vec<usize> = got
            .chunks(ts)
            .zip(want.chunks(ts))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        println!(
            "{ty}: {} of {} blocks differ; first {:?}",
            bad.len(),
            got.len() / ts,
            bad.first()
        );
        if let Some(&i) = bad.first() {
            let a = &got[i * ts..(i + 1) * ts];
            let w = &want[i * ts..(i + 1) * ts];
            let diffs: Vec<usize> = (0..ts).filter(|&k| a[k] != w[k]).collect();
            println!("   differing bytes {:?}", &diffs[..diffs.len().min(20)]);
        }
    }
}
