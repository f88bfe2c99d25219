//! `tiefsee bench`: prompt-processing (pp) and text-generation (tg) speed, measured as llama.cpp's
//! `llama-bench` does so the two can be compared on the same file.
//!
//! Like llama-bench: random token ids (the model's speed does not depend on them), one warm-up run of
//! each test first (candle repacks quantized weights on first use), then `-r` timed repetitions, each
//! on a fresh cache holding `--depth` tokens that are not timed; pp is one forward pass over `-p` tokens
//! with logits for the last one only, tg is `-n` forward passes of one token each. Reported: mean and
//! standard deviation of the per-repetition tokens/s. With `--parallel N`, tg decodes N sequences at
//! once (one token of each per step, through the paged cache, as the server batches them) and reports
//! the tokens of all of them per second, as `llama-batched-bench` does.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tiefsee_model::{Logits, Segment};

#[derive(Args)]
pub struct BenchArgs {
    /// Checkpoint folder (config.json + safetensors) or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Prompt tokens processed in one pass (0 skips the test).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time (0 skips the test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Threads for the matrix products (all cores by default).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Tokens already in the cache before each test (not timed).
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Sequences decoded together in tg (as `llama-batched-bench`'s parallel sequences): each step
    /// feeds one token of every sequence through the paged cache, as the server's continuous batching
    /// does; tg reports all sequences' tokens per second.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: crate::common::CacheArgs,
}

/// Mean and sample standard deviation, as llama-bench reports them.
fn mean_std(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    if samples.len() < 2 {
        return (mean, 0.0);
    }
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Refuses flag values that measure nothing.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    if args.n_prompt == 0 && args.n_gen == 0 {
        bail!("-p and -n are both 0: nothing to measure");
    }
    if args.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    if args.threads == Some(0) {
        bail!("-t must be at least 1");
    }
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    Ok(())
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    check(&args)?;
    let model = args.cache.load_model(&args.model)?;
    let info = model.info().clone();
    let longest = args.depth + args.n_prompt.max(args.n_gen);
    if longest > info.context_length {
        bail!(
            "--depth {} plus {} tokens need a context of {longest}, the model's is {}",
            args.depth,
            args.n_prompt.max(args.n_gen),
            info.context_length
        );
    }
    let threads = rayon::current_num_threads();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let vocab = info.vocab_size as u32;
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let depth_tokens = random_tokens(args.depth);
    let prompt = random_tokens(args.n_prompt);
    // One stream of input tokens per sequence: sequences fed the same tokens would have the same
    // hidden states, and an MoE would route them all to the same experts.
    let gen_tokens: Vec<Vec<u32>> = (0..args.parallel)
        .map(|_| random_tokens(args.n_gen.max(1)))
        .collect();

    // The depth tokens are run once; every test starts from a copy of that cache.
    let mut at_depth = model.new_cache(Some(longest))?;
    if !depth_tokens.is_empty() {
        model.forward(&depth_tokens, &mut at_depth, Logits::Last)?;
    }
    let fresh = |_extra: usize| -> anyhow::Result<_> { Ok(at_depth.clone()) };
    let run_pp = || -> anyhow::Result<f64> {
        let mut cache = fresh(prompt.len())?;
        let start = Instant::now();
        model.forward(&prompt, &mut cache, Logits::Last)?;
        Ok(prompt.len() as f64 / start.elapsed().as_secs_f64())
    };
    // With --parallel, every sequence owns `longest` consecutive slots of one paged cache, each
    // prefilled with the depth tokens once.
    let parallel = args.parallel;
    let tables: Vec<Vec<usize>> = (0..parallel)
        .map(|i| (i * longest..(i + 1) * longest).collect())
        .collect();
    let table_refs = || tables.iter().map(Vec::as_slice).collect::<Vec<_>>();
    let paged_at_depth = if parallel > 1 {
        let mut cache = model.new_paged_cache(parallel * longest)?;
        if !depth_tokens.is_empty() {
            for table in &tables {
                let segment = Segment {
                    tokens: &depth_tokens,
                    start: 0,
                    logits: None,
                };
                model.forward_paged(&[segment], &mut cache, vec![table.as_slice()])?;
            }
        }
        Some(cache)
    } else {
        None
    };
    let run_tg = |n: usize| -> anyhow::Result<f64> {
        let Some(paged) = &paged_at_depth else {
            let mut cache = fresh(n)?;
            let start = Instant::now();
            for &t in &gen_tokens[0][..n] {
                model.forward(&[t], &mut cache, Logits::Last)?;
            }
            return Ok(n as f64 / start.elapsed().as_secs_f64());
        };
        let mut cache = paged.clone();
        let start = Instant::now();
        for step in 0..n {
            let segments: Vec<Segment> = gen_tokens
                .iter()
                .map(|tokens| Segment {
                    tokens: &tokens[step..step + 1],
                    start: args.depth + step,
                    logits: Some(Logits::Last),
                })
                .collect();
            model.forward_paged(&segments, &mut cache, table_refs())?;
        }
        Ok((n * parallel) as f64 / start.elapsed().as_secs_f64())
    };

    let mut pp = Vec::new();
    if args.n_prompt > 0 {
        run_pp()?; // warm-up
        for _ in 0..args.repetitions {
            pp.push(run_pp()?);
        }
    }
    let mut tg = Vec::new();
    if args.n_gen > 0 {
        run_tg(1)?; // warm-up, as llama-bench: one token
        for _ in 0..args.repetitions {
            tg.push(run_tg(args.n_gen)?);
        }
    }

    let stat = |s: &[f64]| (!s.is_empty()).then(|| mean_std(s));
    let (pp_stat, tg_stat) = (stat(&pp), stat(&tg));
    // The memory-bandwidth roofline of decoding: every weight a token uses plus the cache rows it
    // attends to (on average over the test), read once per token at the machine's read bandwidth.
    // (Sequences decoded together share the weights they read: no such bound applies to them.)
    let roofline = (args.n_gen > 0 && parallel == 1).then(|| {
        let bandwidth = read_bandwidth();
        let kv_rows = args.depth as f64 + (args.n_gen as f64 + 1.0) / 2.0;
        let bytes = info.weight_bytes_per_token as f64 + info.kv_bytes_per_token as f64 * kv_rows;
        (bandwidth, bytes, bandwidth / bytes)
    });
    let size_bytes = std::fs::metadata(&args.model)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    if args.json {
        let out = json!({
            "model": args.model.display().to_string(),
            "architecture": info.architecture,
            "stored_dtypes": info.stored_dtypes,
            "size_bytes": size_bytes,
            "params": info.total_params,
            "threads": threads,
            "p": args.n_prompt,
            "n": args.n_gen,
            "depth": args.depth,
            "parallel": parallel,
            "repetitions": args.repetitions,
            "pp_tps": pp_stat.map(|s| s.0),
            "pp_tps_std": pp_stat.map(|s| s.1),
            "tg_tps": tg_stat.map(|s| s.0),
            "tg_tps_std": tg_stat.map(|s| s.1),
            "pp_samples": pp,
            "tg_samples": tg,
            "kv_bytes_per_token": info.kv_bytes_per_token,
            "cache_dtype": info.cache_dtype,
            "weight_bytes_per_token": info.weight_bytes_per_token,
            "decode_bytes_per_token": roofline.map(|r| r.1),
            "read_bandwidth_gbs": roofline.map(|r| r.0 / 1e9),
            "tg_roofline_tps": roofline.map(|r| r.2),
            "tg_roofline_fraction": roofline.zip(tg_stat).map(|(r, t)| t.0 / r.2),
        });
        println!("{out}");
        return Ok(());
    }
    let model_name = args.model.file_name().map_or_else(
        || args.model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let depth_label = if args.depth > 0 {
        format!(" @ d{}", args.depth)
    } else {
        String::new()
    };
    println!(
        "| {:<32} | {:>10} | {:>7} | {:>16} | {:>20} |",
        "model", "params", "threads", "test", "t/s"
    );
    println!(
        "| {:-<32} | {:->10} | {:->7} | {:->16} | {:->20} |",
        "", "", "", "", ""
    );
    let parallel_label = if parallel > 1 {
        format!(" x{parallel}")
    } else {
        String::new()
    };
    let rows = [
        (format!("pp{}{depth_label}", args.n_prompt), pp_stat),
        (
            format!("tg{}{parallel_label}{depth_label}", args.n_gen),
            tg_stat,
        ),
    ];
    for (test, stat) in rows {
        if let Some((mean, std)) = stat {
            println!(
                "| {:<32} | {:>10} | {:>7} | {:>16} | {:>20} |",
                model_name,
                format!("{:.2} M", info.total_params as f64 / 1e6),
                threads,
                test,
                format!("{mean:.2} ± {std:.2}")
            );
        }
    }
    if let (Some((bandwidth, bytes, limit)), Some((tg, _))) = (roofline, tg_stat) {
        println!(
            "\ndecode reads {:.1} MB per token; at the {:.1} GB/s measured here that allows {limit:.2} t/s: tg is {:.0}% of that roofline",
            bytes / 1e6,
            bandwidth / 1e9,
            100.0 * tg / limit
        );
    }
    Ok(())
}

/// The machine's memory read bandwidth in bytes per second with rayon's threads: the best of a few
/// passes summing a 1 GiB buffer (far larger than any cache) in parallel.
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const BYTES: usize = 1 << 30;
    let buffer: Vec<u64> = (0..BYTES / 8).into_par_iter().map(|i| i as u64).collect();
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let sum: u64 = buffer
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
            BYTES as f64 / start.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
    }
}
