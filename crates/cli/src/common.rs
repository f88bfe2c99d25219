//! What the generating commands share: loading a checkpoint with its tokenizer, sampling flags,
//! and streaming generated tokens to the terminal as text.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use tiefsee_engine::{GenerateOptions, GenerationStats, Sampler, SamplingParams, Session};
use tiefsee_model::{CacheFormat, Model};
use tiefsee_tokenizer::{StopStrings, Tokenizer};

/// A checkpoint ready to generate: weights plus tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

/// How the KV cache stores its rows (`--cache-type`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default)]
pub enum CacheType {
    /// 4 bytes per value: exact.
    F32,
    /// 2 bytes per value (the default).
    #[default]
    Bf16,
    /// 8-bit values with one f32 scale per 32 (1.125 bytes per value).
    Q8,
}

/// The `--cache-type` flag of every command that runs the model.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// KV cache storage: f32, bf16 or q8 (8-bit).
    #[arg(long, value_enum, default_value_t)]
    pub cache_type: CacheType,
}

impl CacheArgs {
    /// Loads the model of a checkpoint folder or GGUF file with this cache format.
    pub fn load_model(&self, dir: &Path) -> anyhow::Result<Model> {
        let mut model = Model::load(dir, &Device::Cpu)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        model.set_cache_format(match self.cache_type {
            CacheType::F32 => CacheFormat::F32,
            CacheType::Bf16 => CacheFormat::Bf16,
            CacheType::Q8 => CacheFormat::Q8,
        })?;
        Ok(model)
    }
}

/// Loads the model (with the cache format of `cache`) and tokenizer of a checkpoint folder or of a
/// GGUF file.
pub fn load(dir: &Path, cache: &CacheArgs) -> anyhow::Result<Loaded> {
    let model = cache.load_model(dir)?;
    let tokenizer = if tiefsee_model::gguf::is_gguf(dir) {
        Tokenizer::from_gguf(dir)
    } else {
        Tokenizer::from_dir(dir)
    }
    .with_context(|| format!("cannot load the tokenizer in {}", dir.display()))?;
    Ok(Loaded {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
    })
}

/// Sampling and length flags shared by `run` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 disables).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0 disables).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens among the last 64 (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed; drawn at random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Stop when this text appears (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Context length in tokens (the model's maximum by default).
    #[arg(long)]
    pub ctx: Option<usize>,
}

impl SamplingArgs {
    /// Checks the flags and builds the sampler.
    pub fn sampler(&self) -> anyhow::Result<Sampler> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{what}"))
            }
        };
        check(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "--temperature must be >= 0",
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "--top-p must be in (0, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "--min-p must be in [0, 1]",
        )?;
        check(self.repeat_penalty > 0.0, "--repeat-penalty must be > 0")?;
        check(self.ctx != Some(0), "--ctx must be at least 1")?;
        let seed = self.seed.unwrap_or_else(rand_seed);
        Ok(Sampler::new(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed,
        }))
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Generates after `prompt`, printing text to stdout as it completes; returns the text and stats.
pub fn stream_answer(
    loaded: &Loaded,
    session: &mut Session,
    prompt: &[u32],
    args: &SamplingArgs,
    sampler: &mut Sampler,
    interrupted: &dyn Fn() -> bool,
) -> anyhow::Result<(String, GenerationStats)> {
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        stop_ids: loaded.tokenizer.eos_ids().to_vec(),
    };
    let mut decoder = loaded.tokenizer.stream(true);
    let mut stops = StopStrings::new(args.stop.clone());
    let mut text = String::new();
    let mut failure = None;
    let mut stdout = std::io::stdout().lock();
    let mut emit = |piece: &str, text: &mut String| -> std::io::Result<()> {
        text.push_str(piece);
        stdout.write_all(piece.as_bytes())?;
        stdout.flush()
    };
    let stats = session.generate(prompt, &options, sampler, |token| {
        let step = decoder
            .push(token)
            .map_err(anyhow::Error::from)
            .and_then(|piece| {
                let (ready, stopped) = stops.push(&piece);
                emit(&ready, &mut text)?;
                Ok(stopped)
            });
        match step {
            Ok(false) if !interrupted() => ControlFlow::Continue(()),
            Ok(_) => ControlFlow::Break(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !stops.stopped() {
        let rest = decoder.finish()?;
        let (ready, _) = stops.push(&rest);
        emit(&ready, &mut text)?;
        emit(&stops.flush(), &mut text)?;
    }
    Ok((text, stats))
}

/// Prints generation statistics to stderr, as llama.cpp does after a run.
pub fn print_stats(loaded: &Loaded, stats: &GenerationStats) {
    let info = loaded.model.info();
    eprintln!(
        "\n[prompt {} tokens ({} computed) at {:.1} tok/s | generated {} tokens at {:.1} tok/s | stop: {:?} | KV cache {} {} bytes/token ({} for full MHA), {} bytes in use]",
        stats.prompt_tokens,
        stats.prefilled_tokens,
        stats.prefill_tps(),
        stats.generated_tokens,
        stats.decode_tps(),
        stats.stop,
        info.cache_dtype,
        info.kv_bytes_per_token,
        info.kv_bytes_per_token_mha,
        stats.cache_bytes,
    );
}
