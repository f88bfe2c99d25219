//! `tiefsee quantize`: a Hugging Face checkpoint folder to a GGUF file as llama.cpp's converter (f32,
//! f16) or converter plus `llama-quantize` (q8_0, q4_k_m) would write it; see
//! `tiefsee_model::gguf::export` for the layout and `tiefsee_model::gguf::mix` for the types.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tiefsee_model::Checkpoint;
use tiefsee_model::ModelConfig;
use tiefsee_model::gguf::export;
use tiefsee_model::gguf::mix::FileType;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Tensor type mix: f32, f16, q8_0 or q4_k_m (llama.cpp's names).
    #[arg(long = "type", value_parser = parse_type)]
    ty: FileType,
}

fn parse_type(name: &str) -> Result<FileType, String> {
    FileType::parse(name).ok_or_else(|| {
        let known: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type {name:?}; tiefsee writes {}", known.join(", "))
    })
}

pub fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let dir = &args.model;
    if !dir.exists() {
        bail!("model folder {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "{} is a file: quantize reads a Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json)",
            dir.display()
        );
    }
    let cannot = || format!("cannot convert the checkpoint in {}", dir.display());
    let config = ModelConfig::from_dir(dir).with_context(cannot)?;
    // DeepSeek's FP8 release: weights are dequantized with their block scales, as for inference.
    let fp8 = match &config {
        ModelConfig::DeepSeek(c) => c.fp8_block_size,
        ModelConfig::Llama(_) => None,
    };
    let checkpoint = Checkpoint::open(dir, &Device::Cpu)
        .with_context(cannot)?
        .with_fp8_block_size(fp8);
    let vocab = tiefsee_tokenizer::gguf_vocab_metadata(dir, config.vocab_size())
        .with_context(|| format!("cannot convert the tokenizer in {}", dir.display()))?;
    let plan = export::plan(dir, &checkpoint, args.ty, vocab).with_context(cannot)?;

    // Write beside the target and rename at the end: a failed run leaves no half-written model.
    let partial = args.out.with_extension("gguf.part");
    let bar = ProgressBar::new(plan.tensors.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let written = export::write(&plan, &checkpoint, &partial, |i, t| {
        bar.set_position(i as u64);
        bar.set_message(format!("{} {}", t.name, t.ggml_type));
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("cannot write {}", args.out.display()));
    }
    bar.finish_and_clear();
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("cannot move {} into place", partial.display()))?;

    let mut counts: Vec<(String, usize)> = Vec::new();
    for t in &plan.tensors {
        let name = t.ggml_type.name().to_owned();
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    let size = std::fs::metadata(&args.out).map_or(0, |m| m.len());
    let types: Vec<String> = counts.iter().map(|(n, c)| format!("{c} {n}")).collect();
    eprintln!(
        "wrote {} ({}, {:.1} MiB): {} tensors ({})",
        args.out.display(),
        args.ty.name(),
        size as f64 / (1024.0 * 1024.0),
        plan.tensors.len(),
        types.join(", ")
    );
    Ok(())
}
