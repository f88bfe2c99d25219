//! `tiefsee`: run, chat with, score and inspect DeepSeek-family checkpoints from the command line.
//!
//! Generated text goes to stdout, streamed; statistics and errors go to stderr. Every failure is a
//! message naming the problem and a non-zero exit, never a panic.

mod bench;
mod chat;
mod common;
mod eval;
mod info;
mod perplexity;
mod quantize;
mod run;
mod serve;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Cheap DeepSeek-style inference.
#[derive(Parser)]
#[command(name = "tiefsee", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply (or a raw continuation) for one prompt.
    Run(run::RunArgs),
    /// Multi-turn chat in the terminal; Ctrl-C stops the current answer.
    Chat(chat::ChatArgs),
    /// Perplexity of a text file, like llama.cpp's perplexity tool.
    Perplexity(perplexity::PerplexityArgs),
    /// Architecture, parameter counts, dtype and KV-cache cost of a checkpoint.
    Info(info::InfoArgs),
    /// OpenAI- and DeepSeek-compatible HTTP API with continuous batching.
    Serve(serve::ServeArgs),
    /// Train a small DeepSeek model: pretraining, then GRPO.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Held-out accuracy of a trained model on its task.
    Eval(eval::EvalArgs),
    /// Write a checkpoint folder as a GGUF file (f32, f16, q8_0, q4_k_m) as llama.cpp would.
    Quantize(quantize::QuantizeArgs),
    /// Prompt-processing and generation speed, as llama.cpp's llama-bench measures it.
    Bench(bench::BenchArgs),
}

/// The checkpoint used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "models/mini-r1";

/// Resolves `--model`, falling back to the shipped default model: `models/mini-r1` under the
/// working directory, else in the repository this binary was built from.
pub fn model_dir(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = model {
        return Ok(path);
    }
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(DEFAULT_MODEL);
    [PathBuf::from(DEFAULT_MODEL), built_from]
        .into_iter()
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no --model given and the default model {DEFAULT_MODEL} is not here; pass --model PATH"
            )
        })
}

/// Fixes the matmul thread count once: `threads` if given, else `RAYON_NUM_THREADS`, else all cores.
/// candle asks for it on every matrix product and, unless `RAYON_NUM_THREADS` is set, re-derives it by
/// parsing /proc/cpuinfo each time: measured here, that halved decode speed.
fn pin_thread_count(threads: Option<usize>) {
    let count = match threads {
        Some(n) => n.to_string(),
        None if std::env::var_os("RAYON_NUM_THREADS").is_some() => return,
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string(),
    };
    // SAFETY: called in `main` right after argument parsing, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", count) };
}

/// The error and its causes, joined by `: `, leaving out a cause whose text an outer message
/// already quotes (many errors write their source into their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Bench(args) => args.threads.filter(|&n| n > 0),
        _ => None,
    };
    pin_thread_count(threads);
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::chat(args),
        Command::Perplexity(args) => perplexity::perplexity(args),
        Command::Info(args) => info::info(args),
        Command::Serve(args) => serve::serve(args),
        Command::Train(command) => train::train(command),
        Command::Eval(args) => eval::eval(args),
        Command::Quantize(args) => quantize::quantize(args),
        Command::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
