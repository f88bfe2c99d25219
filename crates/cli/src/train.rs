//! `tiefsee train pretrain | grpo`: train a small DeepSeek model from scratch, then improve its
//! reasoning with GRPO. Ctrl-C saves a checkpoint before stopping; running the same command again
//! resumes from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Subcommand};
use tiefsee_train::config::{GrpoRunConfig, PretrainConfig};

/// The training phases.
#[derive(Subcommand)]
pub enum TrainCommand {
    /// Pretrain a model from scratch on the synthetic task corpus.
    Pretrain(PretrainArgs),
    /// Improve a pretrained model's reasoning with GRPO and rule-based rewards.
    Grpo(GrpoArgs),
}

/// Flags of `tiefsee train grpo`.
#[derive(Args)]
pub struct GrpoArgs {
    /// The checkpoint to start from (a folder written by `train pretrain`, e.g. RUN/checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The run's JSON config (group size, rewards, loss options, optimizer); see configs/.
    #[arg(long)]
    config: PathBuf,
    /// Run folder: checkpoint in OUT/checkpoint, per-step log in OUT/metrics.csv, curves in
    /// OUT/metrics.png. An existing checkpoint of the same run is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Override the config's seed (for repeated runs).
    #[arg(long)]
    seed: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Flags of `tiefsee train pretrain`.
#[derive(Args)]
pub struct PretrainArgs {
    /// The run's JSON config (model, task, corpus, optimizer); see configs/.
    #[arg(long)]
    config: PathBuf,
    /// Run folder: the checkpoint goes to OUT/checkpoint, the log to OUT/metrics.csv. An existing
    /// checkpoint of the same config is resumed.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A flag set by the first Ctrl-C (the run then saves and stops); a second one exits at once.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let handler = stop.clone();
    ctrlc::set_handler(move || {
        if handler.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (saving a checkpoint); Ctrl-C again to abort");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

/// Runs one `tiefsee train` subcommand.
pub fn train(command: TrainCommand) -> anyhow::Result<()> {
    match command {
        TrainCommand::Pretrain(args) => {
            let cfg = PretrainConfig::read(&args.config)?;
            let stop = stop_flag()?;
            let report = tiefsee_train::pretrain::pretrain(&cfg, &args.out, &stop, !args.quiet)?;
            eprintln!(
                "{} after {} of {} steps: loss {}, MFU {:.1}% of this machine's measured f32 matmul rate; checkpoint {}",
                if report.interrupted {
                    "stopped"
                } else {
                    "done"
                },
                report.steps,
                cfg.steps,
                report.loss.map_or("-".to_string(), |l| format!("{l:.4}")),
                100.0 * report.mfu,
                report.checkpoint.display()
            );
            Ok(())
        }
        TrainCommand::Grpo(args) => {
            let mut cfg = GrpoRunConfig::read(&args.config)?;
            if let Some(seed) = args.seed {
                cfg.seed = seed;
            }
            let stop = stop_flag()?;
            let report = tiefsee_train::rl::grpo(&args.model, &cfg, &args.out, &stop, !args.quiet)?;
            let pct = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a));
            eprintln!(
                "{} after {} of {} steps: held-out greedy accuracy {} at the start, {} now; checkpoint {}",
                if report.interrupted {
                    "stopped"
                } else {
                    "done"
                },
                report.steps,
                cfg.steps,
                pct(report.eval_start),
                pct(report.eval_end),
                report.checkpoint.display()
            );
            Ok(())
        }
    }
}
