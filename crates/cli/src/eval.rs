//! `tiefsee eval`: held-out accuracy of a trained model on its task (greedy, pass@1, pass@k,
//! maj@k, by difficulty).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use tiefsee_model::Model;
use tiefsee_tokenizer::Tokenizer;
use tiefsee_train::config::TaskSpec;
use tiefsee_train::eval::{EvalOptions, evaluate};

/// Flags of `tiefsee eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// The checkpoint folder (default: the shipped models/mini-r1).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Task name (arithmetic, addition, subtraction, multiplication); default: the task recorded
    /// beside the checkpoint in task.json.
    #[arg(long)]
    task: Option<String>,
    /// Held-out problems to evaluate.
    #[arg(long, default_value_t = 500)]
    problems: usize,
    /// Samples per problem for pass@1, pass@k and maj@k (0: greedy only).
    #[arg(short = 'k', long, default_value_t = 8)]
    samples: usize,
    /// Temperature of those samples.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed of those samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generation budget per completion, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `tiefsee eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let dir = crate::model_dir(args.model)?;
    let task = match &args.task {
        Some(name) => TaskSpec::named(name)?,
        None => tiefsee_train::checkpoint::read_task(&dir)?,
    };
    if args.problems == 0 {
        anyhow::bail!("--problems must be at least 1");
    }
    let model = Model::load(&dir, &Device::Cpu)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(&dir)
        .with_context(|| format!("cannot load the tokenizer in {}", dir.display()))?;
    let options = EvalOptions {
        problems: args.problems,
        samples: args.samples,
        temperature: args.temperature,
        seed: args.seed,
        max_tokens: args.max_tokens,
    };
    let report = evaluate(&model, &tokenizer, &task, &options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    println!(
        "task {} ({} held-out problems)",
        report.task, report.problems
    );
    println!("greedy accuracy   {}", pct(report.accuracy));
    println!("well formatted    {}", pct(report.format));
    println!("thinks            {}", pct(report.thinking));
    println!(
        "mean length       {:.1} tokens",
        report.mean_completion_tokens
    );
    if let (Some(p1), Some(pk), Some(mk)) = (report.pass_at_1, report.pass_at_k, report.maj_at_k) {
        let k = report.k;
        println!("pass@1 (k={k})     {}", pct(p1));
        println!("pass@{k}            {}", pct(pk));
        println!("maj@{k}             {}", pct(mk));
    }
    for level in &report.by_difficulty {
        println!(
            "  {} digits: {} ({} problems)",
            level.digits,
            pct(level.accuracy),
            level.problems
        );
    }
    Ok(())
}
