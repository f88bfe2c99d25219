//! `tiefsee info`: what a checkpoint is and what it costs to run.

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct InfoArgs {
    /// Checkpoint folder (config.json + safetensors) or GGUF file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cache: crate::common::CacheArgs,
}

pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let dir = crate::model_dir(args.model)?;
    let model = args.cache.load_model(&dir)?;
    let info = model.info();
    if args.json {
        println!("{}", serde_json::to_string(info)?);
        return Ok(());
    }
    let millions = |n: u64| format!("{:.3}M", n as f64 / 1e6);
    println!("architecture            {}", info.architecture);
    println!("layers                  {}", info.layers);
    println!("vocabulary              {}", info.vocab_size);
    println!("context length          {}", info.context_length);
    println!(
        "total parameters        {} ({})",
        info.total_params,
        millions(info.total_params)
    );
    println!(
        "active per token        {} ({})",
        info.active_params,
        millions(info.active_params)
    );
    if info.mtp_params > 0 {
        println!(
            "MTP parameters          {} ({})",
            info.mtp_params,
            millions(info.mtp_params)
        );
    }
    println!("stored dtypes           {}", info.stored_dtypes.join(", "));
    println!(
        "weights read per token  {:.1} MB (as stored; what bounds decoding by memory bandwidth)",
        info.weight_bytes_per_token as f64 / 1e6
    );
    println!("KV cache dtype          {}", info.cache_dtype);
    println!(
        "KV cache per token      {} bytes (full multi-head attention would need {}, {:.1}x more)",
        info.kv_bytes_per_token,
        info.kv_bytes_per_token_mha,
        info.kv_bytes_per_token_mha as f64 / info.kv_bytes_per_token.max(1) as f64
    );
    Ok(())
}
