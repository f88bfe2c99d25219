//! `tiefsee chat`: a terminal conversation that keeps its history. Ctrl-C stops the answer being
//! generated and returns to the prompt; Ctrl-D or `/exit` leaves, `/clear` forgets the history.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use tiefsee_engine::Session;
use tiefsee_tokenizer::Message;

use crate::common::{self, CacheArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint folder or GGUF file (models/mini-r1 by default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// System message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Print generation statistics after each answer.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let mut sampler = args.sampling.sampler()?;
    let loaded = common::load(&crate::model_dir(args.model)?, &args.cache)?;
    loaded.tokenizer.chat_template()?;
    let generating = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (generating, interrupted) = (generating.clone(), interrupted.clone());
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                interrupted.store(true, Ordering::SeqCst);
            } else {
                eprint!("\n(Ctrl-D or /exit to leave)\n> ");
            }
        })?;
    }
    let mut history: Vec<Message> = args.system.into_iter().map(Message::system).collect();
    let mut session = Session::new(&loaded.model, args.sampling.ctx)?;
    eprintln!(
        "tiefsee chat with {} - Ctrl-C stops an answer, /clear forgets, Ctrl-D or /exit leaves",
        loaded.dir.display()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(Message::user(line));
        let prompt = loaded.tokenizer.apply_chat_template(&history, true)?;
        interrupted.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let answer = common::stream_answer(
            &loaded,
            &mut session,
            &prompt,
            &args.sampling,
            &mut sampler,
            &|| interrupted.load(Ordering::SeqCst),
        );
        generating.store(false, Ordering::SeqCst);
        println!();
        match answer {
            Ok((text, stats)) => {
                if args.verbose {
                    common::print_stats(&loaded, &stats);
                }
                history.push(Message::assistant(text));
            }
            Err(e) => {
                // Keep the conversation usable: forget the turn that failed.
                history.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}
