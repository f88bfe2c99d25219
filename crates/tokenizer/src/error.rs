//! The crate's error type: every message names the file (or template) and the problem.

use std::path::PathBuf;

/// Everything that can go wrong loading a tokenizer or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required file is absent.
    #[error("{path}: file not found")]
    Missing { path: PathBuf },

    /// A file exists but could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// `tokenizer.json` is valid JSON but the `tokenizers` crate rejects it.
    #[error("{path}: not a usable tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// A field of a config file has a value we cannot use.
    #[error("{path}: field `{field}`: {problem}")]
    Config {
        path: PathBuf,
        field: String,
        problem: String,
    },

    /// The chat template does not parse; `line` is 1-based and `text` is that line of the template.
    #[error("chat template ({origin}): syntax error on line {line}: {message}\n  {line} | {text}")]
    TemplateSyntax {
        origin: String,
        line: usize,
        text: String,
        message: String,
    },

    /// The chat template called `raise_exception(message)`.
    #[error("chat template ({origin}) raised: {message}")]
    TemplateRaised { origin: String, message: String },

    /// Rendering failed for another reason (a type error, an unknown filter, ...).
    #[error("chat template ({origin}): render error on line {line}: {message}")]
    TemplateRender {
        origin: String,
        line: usize,
        message: String,
    },

    /// A chat template was needed but the model ships none (or several without a "default").
    #[error("no chat template: {0}")]
    NoChatTemplate(String),

    /// The `tokenizers` crate failed to encode or decode.
    #[error("tokenizer: {0}")]
    Codec(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
