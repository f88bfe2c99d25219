//! `tiefsee run`: one prompt in, the generated text streamed to stdout, statistics to stderr.

use std::path::PathBuf;

use clap::Args;
use tiefsee_engine::Session;
use tiefsee_tokenizer::Message;

use crate::common::{self, CacheArgs, SamplingArgs};

#[derive(Args)]
pub struct RunArgs {
    /// Checkpoint folder or GGUF file (models/mini-r1 by default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt: a user message, or with --raw the text to continue.
    #[arg(long)]
    prompt: String,
    /// Continue the prompt as plain text instead of applying the chat template.
    #[arg(long)]
    raw: bool,
    /// System message placed before the prompt (chat mode only).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.prompt.is_empty() {
        anyhow::bail!("the prompt is empty: give some text with --prompt");
    }
    if args.raw && args.system.is_some() {
        anyhow::bail!("--system needs the chat template; it cannot be used with --raw");
    }
    let mut sampler = args.sampling.sampler()?;
    let loaded = common::load(&crate::model_dir(args.model)?, &args.cache)?;
    let prompt = if args.raw {
        loaded.tokenizer.encode(&args.prompt, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(args.prompt));
        loaded
            .tokenizer
            .apply_chat_template(&messages, true)
            .map_err(|e| anyhow::anyhow!("{e} (use --raw to continue plain text)"))?
    };
    let mut session = Session::new(&loaded.model, args.sampling.ctx)?;
    let (_, stats) = common::stream_answer(
        &loaded,
        &mut session,
        &prompt,
        &args.sampling,
        &mut sampler,
        &|| false,
    )?;
    common::print_stats(&loaded, &stats);
    Ok(())
}
