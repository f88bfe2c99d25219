//! `tiefsee perplexity`: how well a model predicts a text file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct PerplexityArgs {
    /// Checkpoint folder or GGUF file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// UTF-8 text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens (the model's context, at most 4096, by default).
    #[arg(long)]
    ctx: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: crate::common::CacheArgs,
}

pub fn perplexity(args: PerplexityArgs) -> anyhow::Result<()> {
    let dir = crate::model_dir(args.model)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {} as UTF-8 text", args.file.display()))?;
    let loaded = crate::common::load(&dir, &args.cache)?;
    let tokens = loaded.tokenizer.encode(&text, true)?;
    if tokens.len() < 2 {
        anyhow::bail!(
            "{} holds {} token(s); perplexity needs at least 2",
            args.file.display(),
            tokens.len()
        );
    }
    let max = loaded.model.config().max_position_embeddings();
    let ctx = match args.ctx {
        Some(0 | 1) => anyhow::bail!("--ctx must be at least 2"),
        Some(ctx) if ctx > max => {
            anyhow::bail!("--ctx {ctx} exceeds the model's context of {max} tokens")
        }
        Some(ctx) => ctx,
        None => max.min(4096),
    };
    let started = std::time::Instant::now();
    let result = tiefsee_engine::perplexity(&loaded.model, &tokens, ctx)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} scored, {} window(s) of {} tokens) in {:.2}s",
            result.perplexity,
            result.tokens,
            result.scored,
            result.windows,
            ctx,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
