//! Quantized matmul throughput, ours against candle's on the same weight bytes.
//!
//! `nice -n 10 cargo bench -p tiefsee-kernels` (add `-- quick` for fewer shapes, `-- Q4_K` for one type,
//! `-- ours` to skip candle, `-- decode` for one token only, `-- 2048x2048` for one shape). For each weight type
//! and shape: milliseconds per call, GB/s of weight bytes streamed and GFLOP/s (2 rows cols tokens /
//! time). Each figure is the best of several timed runs, since a shared 2-core VM is noisy. Weights
//! are random bytes with a fixed, finite block scale: the kernels' speed does not depend on the values,
//! and quantizing hundreds of millions of values first would take longer than the benchmark.
//!
//! `-- experts` (or a full run) also times one decode step's experts of a DeepSeek-V2-Lite MoE layer:
//! 18 Q8_0 matrices (gate and up 1408x2048, down 2048x1408, of 6 experts) one call at a time against
//! two batches (all gates and ups, then all downs) as `Moe` runs them.

use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Module, Tensor};
use tiefsee_gguf::GgmlType;
use tiefsee_kernels::{MatmulJob, QMatrix, WeightBytes, matmul_batch};

/// Random bytes (xorshift) shaped as `rows` rows of `ty`, every f16 block scale set to a small value
/// (float types: a sine, since random bits would hold NaNs and subnormals).
fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        return tiefsee_gguf::quantize(ty, &values).expect("float weights");
    }
    let n = rows * cols / ty.block_size();
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut bytes: Vec<u8> = (0..n * ty.type_size())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let scale_at: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!("no benchmark for {ty:?}"),
    };
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &at in scale_at {
            block[at..at + 2].copy_from_slice(&scale);
        }
    }
    bytes
}

fn candle_dtype(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        _ => unreachable!("no benchmark for {ty:?}"),
    }
}

/// Best time per call of `f` over `runs` runs of calls filling about `budget` each (after a warm-up):
/// many short runs, so that some fall between the bursts of other work on a shared machine.
fn best_of(runs: usize, budget: Duration, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_micros(1));
    let iters = (budget.as_secs_f64() / once.as_secs_f64()).clamp(1.0, 10_000.0) as u32;
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .min()
        .unwrap_or(once)
}

/// Timed runs per measurement.
const RUNS: usize = 12;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let ours_only = args.iter().any(|a| a == "ours");
    let decode_only = args.iter().any(|a| a == "decode");
    let only_shape = args
        .iter()
        .find(|a| a.contains('x') && a.starts_with(|c: char| c.is_ascii_digit()));
    let experts_only = args.iter().any(|a| a == "experts");
    let only_type = args
        .iter()
        .find_map(|a| GgmlType::ALL.into_iter().find(|t| t.name() == a));
    let only_fp8 = args.iter().any(|a| a == "FP8");
    println!(
        "isa {}, {} threads",
        tiefsee_kernels::cpu::isa().name(),
        rayon::current_num_threads()
    );
    println!(
        "{:<5} {:>13} {:>4} | {:>9} {:>7} {:>7} | {:>9} {:>7} {:>7} | {:>6}",
        "type",
        "rows x cols",
        "tok",
        "ours ms",
        "GB/s",
        "GFLOP/s",
        "candle ms",
        "GB/s",
        "GFLOP/s",
        "speedup"
    );
    if experts_only || (!quick && only_shape.is_none() && only_type.is_none() && !only_fp8) {
        bench_experts();
    }
    if experts_only {
        return;
    }
    let types = [
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_0,
        GgmlType::Q4_0,
        GgmlType::Q5_K,
        GgmlType::BF16,
        GgmlType::F16,
    ];
    let shapes: &[(usize, usize, &[usize])] = if quick {
        &[(2048, 2048, &[1, 128]), (10944, 2048, &[1, 128])]
    } else {
        &[
            (1408, 2048, &[1, 4]),
            // An expert's down projection in DeepSeek-V2-Lite: K-quants fall back to Q5_0 / Q8_0 there.
            (2048, 1408, &[1, 4, 16]),
            (2048, 2048, &[1, 16, 32, 128, 512]),
            (10944, 2048, &[1, 16, 128, 512]),
            (2048, 10752, &[1, 16, 128]),
            (8192, 8192, &[1, 16]),
        ]
    };
    for ty in types
        .into_iter()
        .filter(|&t| !only_fp8 && only_type.is_none_or(|o| o == t))
    {
        let wanted = |&&(rows, cols, _): &&(usize, usize, &[usize])| {
            cols % ty.block_size() == 0 && only_shape.is_none_or(|s| *s == format!("{rows}x{cols}"))
        };
        for &(rows, cols, token_counts) in shapes.iter().filter(wanted) {
            let bytes = weights(ty, rows, cols);
            let qt = qtensor_from_ggml(candle_dtype(ty), &bytes, vec![rows, cols], &Device::Cpu)
                .expect("candle tensor");
            let candle = QMatMul::from_qtensor(qt).expect("candle matmul");
            let ours = QMatrix::new(ty, rows, cols, WeightBytes::from_vec(bytes)).expect("matrix");
            let weight_gb = (ours.row_bytes() * rows) as f64 / 1e9;
            for &tokens in token_counts.iter().filter(|&&t| !decode_only || t == 1) {
                let x = activations(tokens, cols);
                let (t_ours, out) = time_ours(&ours, &x, quick);
                let budget = Duration::from_millis(if quick { 20 } else { 50 });
                let rates = |t: Duration| rates(weight_gb, rows * cols * tokens, t);
                let theirs = if ours_only {
                    String::new()
                } else {
                    let xt = Tensor::from_slice(&x, (tokens, cols), &Device::Cpu).expect("tensor");
                    let t_candle = best_of(RUNS, budget, || {
                        candle.forward(&xt).expect("candle forward");
                    });
                    // Same weights and activations: the two agree to 8-bit activation precision.
                    let y: Vec<f32> = candle
                        .forward(&xt)
                        .and_then(|y| y.flatten_all()?.to_vec1())
                        .expect("candle output");
                    let scale = y.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                    let diff = out
                        .iter()
                        .zip(&y)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    let speedup = t_candle.as_secs_f64() / t_ours.as_secs_f64();
                    let disagree = if diff > 1e-3 * scale {
                        format!("  (max diff {diff:e} of {scale:e})")
                    } else {
                        String::new()
                    };
                    format!(" | {} | {speedup:>5.2}x{disagree}", rates(t_candle))
                };
                println!(
                    "{:<5} {:>13} {:>4} | {}{theirs}",
                    format!("{ty:?}"),
                    format!("{rows}x{cols}"),
                    tokens,
                    rates(t_ours),
                );
            }
        }
    }
    if only_fp8 || only_type.is_none() {
        bench_fp8(shapes, only_shape, quick, decode_only);
    }
}

/// Deterministic activations of `tokens` tokens of `cols` values in [-1, 1).
fn activations(tokens: usize, cols: usize) -> Vec<f32> {
    (0..tokens * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Best time of `m` times `x` (see [`best_of`]), and the product.
fn time_ours(m: &QMatrix, x: &[f32], quick: bool) -> (Duration, Vec<f32>) {
    let mut out = vec![0f32; x.len() / m.cols() * m.rows()];
    let budget = Duration::from_millis(if quick { 20 } else { 50 });
    let t = best_of(RUNS, budget, || m.matmul(x, &mut out).expect("matmul"));
    (t, out)
}

/// Milliseconds, GB/s of `weight_gb` and GFLOP/s of `macs` multiply-adds for a call taking `t`.
fn rates(weight_gb: f64, macs: usize, t: Duration) -> String {
    let secs = t.as_secs_f64();
    format!(
        "{:>9.3} {:>7.1} {:>7.1}",
        secs * 1e3,
        weight_gb / secs,
        2.0 * macs as f64 / 1e9 / secs
    )
}

/// DeepSeek's FP8 weights (one byte per weight, a scale per 128 x 128 block) over the same shapes;
/// ours only, since candle has no FP8 product. Random bytes, the two NaN codes excluded.
fn bench_fp8(
    shapes: &[(usize, usize, &[usize])],
    only_shape: Option<&String>,
    quick: bool,
    decode_only: bool,
) {
    let wanted = |&&(rows, cols, _): &&(usize, usize, &[usize])| {
        only_shape.is_none_or(|s| *s == format!("{rows}x{cols}"))
    };
    for &(rows, cols, token_counts) in shapes.iter().filter(wanted) {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let bytes: Vec<u8> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s as u8) & !0x40
            })
            .collect();
        let scales = vec![0.01f32; rows.div_ceil(128) * cols.div_ceil(128)];
        let ours = QMatrix::fp8(rows, cols, WeightBytes::from_vec(bytes), scales, [128, 128])
            .expect("matrix");
        let weight_gb = (rows * cols) as f64 / 1e9;
        for &tokens in token_counts.iter().filter(|&&t| !decode_only || t == 1) {
            let (t_ours, _) = time_ours(&ours, &activations(tokens, cols), quick);
            println!(
                "{:<5} {:>13} {:>4} | {}",
                "FP8",
                format!("{rows}x{cols}"),
                tokens,
                rates(weight_gb, rows * cols * tokens, t_ours),
            );
        }
    }
}

/// One token through 6 experts' gate and up (1408x2048), then their down (2048x1408), all Q8_0: 18
/// calls against two batches. Gates and ups share their input, as in a MoE layer.
fn bench_experts() {
    let ty = GgmlType::Q8_0;
    let (inter, hidden, experts) = (1408, 2048, 6);
    let matrix = |rows, cols| {
        QMatrix::new(
            ty,
            rows,
            cols,
            WeightBytes::from_vec(weights(ty, rows, cols)),
        )
        .expect("matrix")
    };
    let gate_up: Vec<QMatrix> = (0..2 * experts).map(|_| matrix(inter, hidden)).collect();
    let down: Vec<QMatrix> = (0..experts).map(|_| matrix(hidden, inter)).collect();
    let x: Vec<f32> = (0..hidden)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let h: Vec<Vec<f32>> = (0..experts)
        .map(|e| {
            (0..inter)
                .map(|i| ((i * 31 + e) % 100) as f32 / 50.0 - 1.0)
                .collect()
        })
        .collect();
    let mut mid = vec![vec![0f32; inter]; 2 * experts];
    let mut out = vec![vec![0f32; hidden]; experts];
    let budget = Duration::from_millis(100);
    let one_by_one = best_of(RUNS, budget, || {
        for (m, o) in gate_up.iter().zip(&mut mid) {
            m.matmul(&x, o).expect("matmul");
        }
        for ((m, h), o) in down.iter().zip(&h).zip(&mut out) {
            m.matmul(h, o).expect("matmul");
        }
    });
    let batched = best_of(RUNS, budget, || {
        let mut jobs: Vec<MatmulJob> = gate_up
            .iter()
            .zip(&mut mid)
            .map(|(matrix, out)| MatmulJob { matrix, x: &x, out })
            .collect();
        matmul_batch(&mut jobs).expect("batch");
        let mut jobs: Vec<MatmulJob> = down
            .iter()
            .zip(&h)
            .zip(&mut out)
            .map(|((matrix, x), out)| MatmulJob { matrix, x, out })
            .collect();
        matmul_batch(&mut jobs).expect("batch");
    });
    let gb = (gate_up.iter().chain(&down))
        .map(|m| m.row_bytes() * m.rows())
        .sum::<usize>() as f64
        / 1e9;
    for (name, t) in [("18 calls", one_by_one), ("2 batches", batched)] {
        let secs = t.as_secs_f64();
        println!(
            "experts {name:<9}: {:>7.3} ms {:>6.1} GB/s",
            secs * 1e3,
            gb / secs
        );
    }
}
