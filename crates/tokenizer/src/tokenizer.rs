//! A model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what the files beside it say.
//!
//! Mirrors transformers 5 (`TokenizersBackend`), which is what `AutoTokenizer` gives for these models:
//! - ids come from `tokenizer.json` as is, BOS included: its post-processor decides which special tokens
//!   `encode(text, add_special_tokens=true)` adds. transformers 5 drops `add_bos_token`/`add_eos_token`
//!   from `tokenizer_config.json` whenever `tokenizer.json` exists, so we ignore them too;
//! - the named special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, ...) and
//!   its `additional_special_tokens` are (re-)added as special tokens, as transformers' `_post_init` does;
//! - truncation and padding stored in `tokenizer.json` are off, as for a plain transformers `encode`;
//! - decoding is the `tokenizers` decoder alone: transformers 5 skips `clean_up_tokenization_spaces`
//!   for BPE models.
//!
//! End-of-sequence ids are `eos_token` of the config plus `eos_token_id` of `generation_config.json`.

use std::path::Path;

use tokenizers::AddedToken;

use crate::chat_template::{ChatTemplate, Message, RenderOptions};
use crate::config::{TokenizerConfig, generation_eos_ids};
use crate::error::{Error, Result};
use crate::stream::StreamDecoder;

/// Text <-> token ids for one model, with its chat template when it has one.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// The chat template, or why there is none usable (kept so that plain encoding still works).
    chat_template: std::result::Result<ChatTemplate, Error>,
}

impl Tokenizer {
    /// Load `tokenizer.json` from `dir`, with `tokenizer_config.json`, `generation_config.json` and
    /// `chat_template.jinja` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = TokenizerConfig::read(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let mut tokenizer = Self::build(&dir.join("tokenizer.json"), &config)?;
        for id in generation_eos_ids(&dir.join("generation_config.json"))? {
            if !tokenizer.eos.contains(&id) {
                tokenizer.eos.push(id);
            }
        }
        tokenizer.chat_template = ChatTemplate::from_config(dir, &config);
        Ok(tokenizer)
    }

    /// Load the tokenizer stored in a GGUF model file's metadata (see [`crate::gguf`]): llama.cpp's
    /// vocabulary, pre-tokenizer, BOS/EOS and `tokenizer.chat_template`.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = tiefsee_gguf::GgufFile::open(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_gguf_file(&file)
    }

    /// As [`Tokenizer::from_gguf`], for a file already open.
    pub fn from_gguf_file(file: &tiefsee_gguf::GgufFile) -> Result<Self> {
        let vocab = crate::gguf::read(file)?;
        let origin = format!("{} `tokenizer.chat_template`", file.path().display());
        let chat_template = match &vocab.chat_template {
            Some(source) => ChatTemplate::new(source, &origin).map(|mut template| {
                for (name, text) in &vocab.named {
                    template.set_special_token(name, text);
                }
                template
            }),
            None => Err(Error::NoChatTemplate(format!(
                "{}: no tokenizer.chat_template in its metadata",
                file.path().display()
            ))),
        };
        Ok(Tokenizer {
            inner: vocab.tokenizer,
            bos: vocab.bos,
            eos: vocab.eos,
            chat_template,
        })
    }

    /// Load a bare `tokenizer.json` (no config: no named BOS/EOS, no chat template).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::build(path.as_ref(), &TokenizerConfig::default())
    }

    fn build(path: &Path, config: &TokenizerConfig) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Missing {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // Parse the JSON ourselves first so that syntax errors say where they are.
        if let Err(source) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            return Err(Error::Json {
                path: path.to_path_buf(),
                source,
            });
        }
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Codec(e.to_string()))?;
        inner.with_padding(None);

        // transformers' `_post_init`: named and extra special tokens are added as special tokens
        // (an existing token keeps its id and becomes special).
        let special: Vec<AddedToken> = config
            .named
            .iter()
            .map(|(_, t)| t)
            .chain(&config.extra)
            .map(|t| {
                AddedToken::from(t.content.clone(), true)
                    .lstrip(t.lstrip)
                    .rstrip(t.rstrip)
                    .single_word(t.single_word)
                    .normalized(t.normalized)
            })
            .collect();
        inner.add_special_tokens(&special);

        let bos = config.token("bos_token").and_then(|t| inner.token_to_id(t));
        let eos = config
            .token("eos_token")
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            chat_template: Err(Error::NoChatTemplate(format!(
                "{}: loaded without its directory",
                path.display()
            ))),
        })
    }

    /// Token ids of `text`; `add_special_tokens` as transformers' (default there: true, which adds BOS
    /// where the tokenizer's post-processor does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Codec(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; invalid UTF-8 from partial characters becomes U+FFFD, as in transformers.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Codec(format!("decoding failed: {e}")))
    }

    /// A decoder that turns ids pushed one at a time into text, never splitting a UTF-8 character.
    pub fn stream(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special_tokens)
    }

    /// The id of `bos_token` from `tokenizer_config.json`, if it names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation: `eos_token` of the config, then `generation_config.json`'s `eos_token_id`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The id of a token given by its text (`"<think>"`), including added tokens.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The model's chat template, or why it has none (missing, or does not compile).
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template.as_ref().map_err(same_error)
    }

    /// transformers' `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`: render
    /// the template, then encode the text without adding special tokens (the template writes BOS itself).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.apply_chat_template_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// `apply_chat_template` with tools, documents or extra template variables.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        options: &RenderOptions<'_>,
    ) -> Result<Vec<u32>> {
        let text = self
            .chat_template()?
            .render_with(messages, add_generation_prompt, options)?;
        self.encode(&text, false)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("chat_template", &self.chat_template.as_ref().ok())
            .finish()
    }
}

/// The stored template error, handed out again (errors of a failed template load are all cloneable).
fn same_error(e: &Error) -> Error {
    match e {
        Error::TemplateSyntax {
            origin,
            line,
            text,
            message,
        } => Error::TemplateSyntax {
            origin: origin.clone(),
            line: *line,
            text: text.clone(),
            message: message.clone(),
        },
        other => Error::NoChatTemplate(other.to_string()),
    }
}
