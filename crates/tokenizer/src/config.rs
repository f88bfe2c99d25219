//! `tokenizer_config.json` and `generation_config.json`: the parts of them a tokenizer needs.
//!
//! Read leniently, the way transformers reads them: every field is optional, special tokens are either a
//! string or a serialized `AddedToken` (`{"__type": "AddedToken", "content": ..., "normalized": ...}`),
//! `chat_template` is a string or a list of `{name, template}`, and `eos_token_id` an int or a list.
//! A field of the wrong type is an error that names the file and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The special-token attributes transformers knows by name (`SPECIAL_TOKENS_ATTRIBUTES`), in its order.
/// Chat templates see each one that is set as a variable of the same name (`bos_token`, ...).
pub const NAMED_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A special token as `tokenizer_config.json` declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecialToken {
    pub content: String,
    pub lstrip: bool,
    pub rstrip: bool,
    pub single_word: bool,
    /// transformers re-adds named special tokens with `normalized=False` unless the config spells it out.
    pub normalized: bool,
}

/// The chat template(s) a config declares.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateSource {
    Single(String),
    /// `[{name, template}, ...]`; transformers uses "default" (or "tool_use" when tools are passed).
    Named(Vec<(String, String)>),
}

/// What we use from `tokenizer_config.json`.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    /// `(attribute, token)` for each named special token that is set, e.g. `("bos_token", <｜begin▁of▁sentence｜>)`.
    pub named: Vec<(String, SpecialToken)>,
    /// `additional_special_tokens` / `extra_special_tokens`.
    pub extra: Vec<SpecialToken>,
    pub chat_template: Option<TemplateSource>,
}

impl TokenizerConfig {
    /// Parse `path`; `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let Some(json) = read_json(path)? else {
            return Ok(None);
        };
        let Value::Object(map) = &json else {
            return Err(config_error(path, "<root>", "expected a JSON object"));
        };
        let mut config = TokenizerConfig::default();
        for name in NAMED_SPECIAL_TOKENS {
            if let Some(token) = special_token(path, name, map.get(name))? {
                config.named.push((name.to_string(), token));
            }
        }
        for field in ["additional_special_tokens", "extra_special_tokens"] {
            match map.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for item in items {
                        if let Some(token) = special_token(path, field, Some(item))? {
                            config.extra.push(token);
                        }
                    }
                }
                // transformers 5 also allows a dict of named extra tokens ({"image_token": "<image>"}).
                Some(Value::Object(named)) => {
                    for item in named.values() {
                        if let Some(token) = special_token(path, field, Some(item))? {
                            config.extra.push(token);
                        }
                    }
                }
                Some(_) => return Err(config_error(path, field, "expected a list of tokens")),
            }
        }
        config.chat_template = match map.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(TemplateSource::Single(s.clone())),
            Some(Value::Array(items)) => {
                let mut named = Vec::with_capacity(items.len());
                for item in items {
                    let name = item.get("name").and_then(Value::as_str);
                    let template = item.get("template").and_then(Value::as_str);
                    match (name, template) {
                        (Some(n), Some(t)) => named.push((n.to_string(), t.to_string())),
                        _ => {
                            return Err(config_error(
                                path,
                                "chat_template",
                                "list entries must be {\"name\": string, \"template\": string}",
                            ));
                        }
                    }
                }
                Some(TemplateSource::Named(named))
            }
            Some(_) => {
                return Err(config_error(
                    path,
                    "chat_template",
                    "expected a string or a list of {name, template}",
                ));
            }
        };
        Ok(Some(config))
    }

    /// The content of a named special token (`"bos_token"`, ...), if set.
    pub fn token(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.content.as_str())
    }
}

/// `eos_token_id` from `generation_config.json` (an int or a list); empty when absent.
pub fn generation_eos_ids(path: &Path) -> Result<Vec<u32>> {
    let Some(json) = read_json(path)? else {
        return Ok(Vec::new());
    };
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                config_error(path, "eos_token_id", "expected a token id or a list of ids")
            })
    };
    match json.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

/// Read and parse a JSON file; `Ok(None)` when it does not exist.
pub fn read_json(path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Read a UTF-8 file; `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn special_token(path: &Path, field: &str, value: Option<&Value>) -> Result<Option<SpecialToken>> {
    let flag = |v: &serde_json::Map<String, Value>, key: &str, default: bool| {
        v.get(key).and_then(Value::as_bool).unwrap_or(default)
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(SpecialToken {
            content: s.clone(),
            lstrip: false,
            rstrip: false,
            single_word: false,
            normalized: false,
        })),
        Some(Value::Object(map)) => match map.get("content").and_then(Value::as_str) {
            Some(content) => Ok(Some(SpecialToken {
                content: content.to_string(),
                lstrip: flag(map, "lstrip", false),
                rstrip: flag(map, "rstrip", false),
                single_word: flag(map, "single_word", false),
                normalized: flag(map, "normalized", false),
            })),
            None => Err(config_error(
                path,
                field,
                "token object without a string `content`",
            )),
        },
        Some(other) => Err(config_error(
            path,
            field,
            &format!("expected a string or a token object, found {other}"),
        )),
    }
}

fn config_error(path: &Path, field: &str, problem: &str) -> Error {
    Error::Config {
        path: PathBuf::from(path),
        field: field.to_string(),
        problem: problem.to_string(),
    }
}
