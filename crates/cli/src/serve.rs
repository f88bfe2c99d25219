//! `tiefsee serve`: the HTTP API over a continuous-batching engine with a paged latent cache.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tiefsee_engine::scheduler::SchedulerConfig;
use tiefsee_server::AppState;

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint folder or GGUF file (models/mini-r1 by default).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long)]
    api_key: Option<String>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Tokens one sequence may hold (the model's maximum, at most 4096, by default).
    #[arg(long)]
    ctx: Option<usize>,
    /// Requests that may wait for a slot; more are answered with 429.
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// Most tokens per engine step (decodes plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    max_step_tokens: usize,
    /// KV-cache blocks of 16 tokens (by default enough for max-seqs full contexts).
    #[arg(long)]
    kv_blocks: Option<usize>,
    #[command(flatten)]
    cache: crate::common::CacheArgs,
}

/// Token slots per cache block.
const BLOCK_SIZE: usize = 16;

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let loaded = crate::common::load(&crate::model_dir(args.model)?, &args.cache)?;
    let max = loaded.model.config().max_position_embeddings();
    let context = match args.ctx {
        Some(0) => anyhow::bail!("--ctx must be at least 1"),
        Some(ctx) if ctx > max => anyhow::bail!("--ctx {ctx} exceeds the model's context of {max}"),
        Some(ctx) => ctx,
        None => max.min(4096),
    };
    let num_blocks = args
        .kv_blocks
        .unwrap_or_else(|| (args.max_seqs * context).div_ceil(BLOCK_SIZE) + args.max_seqs);
    let scheduler = SchedulerConfig {
        num_blocks,
        block_size: BLOCK_SIZE,
        context,
        max_step_tokens: args.max_step_tokens,
        max_running: args.max_seqs,
        max_waiting: args.max_waiting,
    };
    let name = loaded
        .dir
        .file_name()
        .map_or("tiefsee".into(), |n| n.to_string_lossy().into_owned());
    let kv_per_token = loaded.model.info().kv_bytes_per_token;
    let state = AppState::start(
        loaded.model,
        loaded.tokenizer,
        name,
        args.api_key,
        scheduler,
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let bound = listener.local_addr()?;
        eprintln!(
            "tiefsee serving {} on http://{bound} ({num_blocks} KV blocks of {BLOCK_SIZE} tokens, {kv_per_token} bytes/token, context {context})",
            state.model_name
        );
        tiefsee_server::serve(listener, state).await?;
        anyhow::Ok(())
    })
}
