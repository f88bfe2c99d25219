//! Tokenizer and chat templates for tiefsee: text in, token ids out, and back.
//!
//! - [`Tokenizer`]: a model directory's `tokenizer.json` (through the `tokenizers` crate) with its
//!   `tokenizer_config.json` and `generation_config.json`, encoding and decoding exactly as transformers 5;
//!   or the vocabulary in a GGUF file's metadata, encoding as llama.cpp ([`gguf`]); and the other way,
//!   a checkpoint's tokenizer as the GGUF metadata llama.cpp's converter writes ([`gguf_vocab_metadata`]).
//! - [`StreamDecoder`]: decoding one generated id at a time without ever emitting half a character.
//! - [`ChatTemplate`]: the model's own Jinja chat template, rendered byte-identical to transformers'
//!   `apply_chat_template` (minijinja plus the Python-isms transformers' Jinja2 environment has).
//! - [`ReasoningParser`] and [`StopStrings`]: text-level handling of generated output (`<think>` split
//!   into reasoning and answer; user stop strings).
//!
//! Golden tests compare against transformers on small tokenizers of each family; the script that made
//! them is `tests/fixtures/make_templates.py`.
//!
//! ```no_run
//! use tiefsee_tokenizer::{Message, Tokenizer};
//!
//! # fn main() -> tiefsee_tokenizer::Result<()> {
//! let tok = Tokenizer::from_dir("models/DeepSeek-R1")?;
//! let prompt = tok.apply_chat_template(&[Message::user("Grüß dich!")], true)?;
//! # let generated: Vec<u32> = prompt.clone();
//! let mut stream = tok.stream(true);
//! for id in generated {
//!     print!("{}", stream.push(id)?);
//! }
//! print!("{}", stream.finish()?);
//! # Ok(())
//! # }
//! ```

mod chat_template;
mod config;
mod error;
pub mod gguf;
mod gguf_vocab;
mod pyfmt;
mod reasoning;
mod stop;
mod stream;
mod tokenizer;

pub use chat_template::{ChatTemplate, Message, RenderOptions};
pub use error::{Error, Result};
pub use gguf_vocab::gguf_vocab_metadata;
pub use reasoning::{ReasoningDelta, ReasoningParser};
pub use stop::StopStrings;
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
