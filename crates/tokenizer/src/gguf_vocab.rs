//! A checkpoint folder's tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), the
//! keys and values llama.cpp's `convert_hf_to_gguf.py` writes for a BPE vocabulary, in its order.
//!
//! Follows `TextModel.get_vocab_base` / `_set_vocab_gpt2` (conversion/base.py) and `gguf.SpecialVocab`
//! (gguf-py/gguf/vocab.py) of llama.cpp as vendored in llama-cpp-python 0.3.36:
//! - `tokens` by id up to `vocab_size`; an id with no token is `[PAD{id}]`, type UNUSED (5); added
//!   tokens are CONTROL (3) when special or when they look special (`<|...|>`, `<｜...｜>`), else
//!   USER_DEFINED (4, with `▁` written as a space); all others NORMAL (1).
//! - `merges` from `tokenizer.json` (pairs joined by a space; a space inside a pair is written `Ġ`).
//! - special token ids from `tokenizer_config.json` (`bos_token`, ... looked up among the added tokens),
//!   then `config.json` (`bos_token_id`, ...); `add_bos_token` & co. from the tokenizer's post-processor
//!   (`ByteLevel`, `TemplateProcessing`) and then `tokenizer_config.json`.
//!
//! Departures: the converter names the pre-tokenizer (`tokenizer.ggml.pre`) by hashing the ids of a test
//! text; here it is recognized by the first regex split of `tokenizer.json`'s pre-tokenizer (the same
//! splits that llama.cpp implements under that name; Qwen2's splits with DeepSeek's special tokens are
//! `deepseek-r1-qwen`, as the converter names DeepSeek-R1-Distill-Qwen), and the families tiefsee runs are
//! the only ones known. Non-normalized added tokens are written as they are (the converter round-trips them through
//! transformers, which leaves the ones of these families unchanged). A list of named chat templates is
//! not supported.

use std::path::Path;

use serde_json::Value;
use tiefsee_gguf::{MetadataArray, MetadataValue};

use crate::error::{Error, Result};

/// ggml token types (`enum llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The first regex split of each pre-tokenizer family, and llama.cpp's name for it
/// (`src/llama-vocab.cpp`: deepseek-llm, deepseek-v3, llama-bpe -> LLAMA3, qwen2 -> QWEN2).
const PRE_BY_FIRST_REGEX: &[(&str, &str)] = &[
    ("[\r\n]", "deepseek-llm"),
    ("\\p{N}{1,3}", "deepseek-v3"),
    (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        "llama-bpe",
    ),
    (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
        "qwen2",
    ),
];

/// `SpecialVocab`'s default special token kinds, in its order.
const SPECIAL_TYPES: &[&str] = &["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// A Python dict: insertion order kept, a key set again keeps its place.
#[derive(Default)]
struct OrderedMap<T>(Vec<(String, T)>);

impl<T> OrderedMap<T> {
    fn get(&self, key: &str) -> Option<&T> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn insert(&mut self, key: &str, value: T) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }
    fn set_default(&mut self, key: &str, value: T) {
        if self.get(key).is_none() {
            self.0.push((key.to_owned(), value));
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// The `tokenizer.*` metadata of the checkpoint in `dir`, whose embedding has `vocab_size` rows.
pub fn gguf_vocab_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, MetadataValue)>> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = read_json(&tokenizer_path)?.ok_or(Error::Missing {
        path: tokenizer_path.clone(),
    })?;
    let bad = |field: &str, problem: String| Error::Config {
        path: tokenizer_path.clone(),
        field: field.to_owned(),
        problem,
    };
    let model = &tokenizer["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(
            "model.type",
            format!(
                "{} is not supported: only BPE vocabularies convert to GGUF here",
                model["type"]
            ),
        ));
    }
    let pre = pre_tokenizer_name(&tokenizer).map_err(|p| bad("pre_tokenizer", p))?;

    // Tokens by id: the BPE vocabulary, then the added tokens (which may override ids).
    let mut by_id: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = by_id.get_mut(id as usize).ok_or_else(|| {
            bad(
                "model.vocab",
                format!("token {text:?} has id {id}, outside the model's {vocab_size} embeddings"),
            )
        })?;
        *slot = Some((text.to_owned(), ty));
        Ok(())
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("model.vocab", format!("id of {text:?} is not an integer")))?;
        place(id, text, NORMAL)?;
    }
    let added = tokenizer["added_tokens"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for token in &added {
        let (Some(id), Some(text)) = (token["id"].as_u64(), token["content"].as_str()) else {
            return Err(bad(
                "added_tokens",
                format!("entry without id or content: {token}"),
            ));
        };
        let (text, ty) = if token["special"].as_bool() == Some(true) || looks_special(text) {
            (text.to_owned(), CONTROL)
        } else {
            (text.replace('\u{2581}', " "), USER_DEFINED)
        };
        place(id, &text, ty)?;
    }
    let (tokens, types): (Vec<String>, Vec<i32>) = by_id
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip();

    let mut out: Vec<(String, MetadataValue)> = vec![
        (
            "tokenizer.ggml.model".into(),
            MetadataValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".into(),
            MetadataValue::String(pre.into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            MetadataValue::Array(MetadataArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            MetadataValue::Array(MetadataArray::I32(types)),
        ),
    ];
    let merges = merges(&model["merges"]).map_err(|p| bad("model.merges", p))?;
    if !merges.is_empty() {
        out.push((
            "tokenizer.ggml.merges".into(),
            MetadataValue::Array(MetadataArray::String(merges)),
        ));
    }
    let special = SpecialVocab::load(dir, &tokenizer, &added, vocab_size)?;
    let key_of = |kind: &str| match kind {
        "pad" => "padding".to_owned(),
        "sep" => "seperator".to_owned(), // sic: llama.cpp's key
        other => other.to_owned(),
    };
    for (kind, id) in special.ids.0 {
        out.push((
            format!("tokenizer.ggml.{}_token_id", key_of(&kind)),
            MetadataValue::U32(id),
        ));
    }
    for (kind, add) in special.add.0 {
        out.push((
            format!("tokenizer.ggml.add_{kind}_token"),
            MetadataValue::Bool(add),
        ));
    }
    if let Some(template) = special.chat_template {
        out.push((
            "tokenizer.chat_template".into(),
            MetadataValue::String(template),
        ));
    }
    Ok(out)
}

/// `TextModel.does_token_look_special`, for the families here.
fn looks_special(text: &str) -> bool {
    (text.starts_with("<|") && text.ends_with("|>"))
        || (text.starts_with("<｜") && text.ends_with("｜>"))
        || text == "<pad>"
}

fn pre_tokenizer_name(tokenizer: &Value) -> std::result::Result<&'static str, String> {
    let pre = &tokenizer["pre_tokenizer"];
    let first = match pre["type"].as_str() {
        Some("Sequence") => &pre["pretokenizers"][0],
        _ => pre,
    };
    let regex = first["pattern"]["Regex"].as_str().ok_or_else(|| {
        "no regex split: tiefsee converts byte-level BPE tokenizers of the DeepSeek, Qwen2 and Llama 3 families"
            .to_owned()
    })?;
    let name = PRE_BY_FIRST_REGEX
        .iter()
        .find(|(r, _)| *r == regex)
        .map(|(_, name)| *name);
    // DeepSeek-R1-Distill-Qwen: Qwen2's splits with DeepSeek's special tokens, which the converter's hash
    // names "deepseek-r1-qwen" (llama.cpp treats both names alike).
    let deepseek_bos = tokenizer["added_tokens"]
        .as_array()
        .is_some_and(|a| a.iter().any(|t| t["content"] == "<｜begin▁of▁sentence｜>"));
    let name = match name {
        Some("qwen2") if deepseek_bos => Some("deepseek-r1-qwen"),
        other => other,
    };
    name.ok_or_else(|| {
            format!(
                "unknown pre-tokenizer split {regex:?}: tiefsee knows those of deepseek-llm, deepseek-v3, llama-bpe and qwen2"
            )
        })
}

fn merges(merges: &Value) -> std::result::Result<Vec<String>, String> {
    let Some(list) = merges.as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &Value| {
                    v.as_str()
                        .map(|s| s.replace(' ', "\u{120}"))
                        .ok_or_else(|| format!("merge {m} is not a pair of strings"))
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            other => Err(format!("unknown merge format {other}")),
        })
        .collect()
}

/// What `gguf.SpecialVocab` gathers, in its insertion order.
#[derive(Default)]
struct SpecialVocab {
    ids: OrderedMap<u32>,
    add: OrderedMap<bool>,
    chat_template: Option<String>,
}

impl SpecialVocab {
    fn load(dir: &Path, tokenizer: &Value, added: &[Value], n_vocab: usize) -> Result<Self> {
        let mut sv = Self::default();
        let mut config = read_json(&dir.join("tokenizer_config.json"))?;
        let text_of = |v: &Value| -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let cfg_token = |config: &Option<Value>, kind: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(format!("{kind}_token")))
                .and_then(text_of)
        };
        let special_bos = cfg_token(&config, "bos");
        let special_eos = cfg_token(&config, "eos");
        let special_sep = cfg_token(&config, "sep");
        let mut types: Vec<String> = SPECIAL_TYPES.iter().map(|s| s.to_string()).collect();
        let post = &tokenizer["post_processor"];
        let processors = match post["processors"].as_array() {
            Some(list) => list.clone(),
            None if post.is_object() => vec![post.clone()],
            None => Vec::new(),
        };
        for processor in &processors {
            match processor["type"].as_str() {
                Some("ByteLevel") => {
                    sv.add.set_default("bos", false);
                    sv.add.set_default("eos", false);
                }
                Some("RobertaProcessing") => {
                    for kind in ["bos", "eos", "sep"] {
                        sv.add.insert(kind, true);
                    }
                }
                Some("TemplateProcessing") => {
                    // The simple templates of these families: [BOS] A [EOS]?, pair A [sep] B.
                    let single = processor["single"].as_array().cloned().unwrap_or_default();
                    let id_at = |v: Option<&Value>| {
                        v.and_then(|t| t["SpecialToken"]["id"].as_str())
                            .map(str::to_owned)
                    };
                    let first = if single.len() > 1 {
                        id_at(single.first())
                    } else {
                        None
                    };
                    let last = if single.len() > 1 {
                        id_at(single.last())
                    } else {
                        None
                    };
                    if let Some(first) = &first {
                        let is_bos = match &special_bos {
                            Some(bos) => bos == first,
                            None => {
                                // No configured BOS: the template's leading token becomes it.
                                if let Some(Value::Object(c)) = config.as_mut() {
                                    c.insert("bos_token".into(), Value::String(first.clone()));
                                }
                                true
                            }
                        };
                        sv.add.insert("bos", is_bos);
                    }
                    if let Some(last) = &last {
                        if Some(last) != special_eos.as_ref() {
                            // The converter keeps the configured EOS as EOT and takes this one as EOS.
                            types.push("eot".into());
                            if let Some(Value::Object(c)) = config.as_mut() {
                                if let Some(eos) = &special_eos {
                                    c.insert("eot_token".into(), Value::String(eos.clone()));
                                }
                                c.insert("eos_token".into(), Value::String(last.clone()));
                            }
                        }
                        sv.add.insert("eos", true);
                    }
                    // Pair template `A [sep] [eos] B`: a separator is added when one sits between.
                    let pair = processor["pair"].as_array().cloned().unwrap_or_default();
                    let start = usize::from(first.is_some() && id_at(pair.first()) == first);
                    let stop =
                        pair.len() - usize::from(last.is_some() && id_at(pair.last()) == last);
                    let inner = pair.get(start..stop.max(start)).unwrap_or_default();
                    let seq = |v: Option<&Value>| {
                        v.and_then(|t| t["Sequence"]["id"].as_str().map(str::to_owned))
                    };
                    if inner.len() > 2
                        && seq(inner.first()).as_deref() == Some("A")
                        && seq(inner.last()).as_deref() == Some("B")
                    {
                        let middle = &inner[1..inner.len() - 1];
                        let separator = |v: Option<&Value>| {
                            let id = id_at(v);
                            id.is_some() && (id == special_sep || id == special_eos)
                        };
                        let add_sep = (separator(middle.first()) && last.is_none())
                            || (middle.len() == 2 && separator(middle.get(1)));
                        sv.add.insert("sep", add_sep);
                    }
                }
                _ => {}
            }
        }
        if let Some(config) = &config {
            let template = match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
            };
            sv.chat_template = template;
            for kind in &types {
                if let Some(Value::Bool(add)) = config.get(format!("add_{kind}_token")) {
                    sv.add.set_default(kind, *add);
                }
                let Some(text) = cfg_token(&Some(config.clone()), kind) else {
                    continue;
                };
                let id = added
                    .iter()
                    .find(|t| t["content"].as_str() == Some(text.as_str()))
                    .and_then(|t| t["id"].as_u64());
                sv.set_id(kind, id, n_vocab);
            }
        }
        if let Some(model_config) = read_json(&dir.join("config.json"))? {
            for kind in &types {
                let id = model_config
                    .get(format!("{kind}_token_id"))
                    .and_then(Value::as_u64);
                sv.set_id(kind, id, n_vocab);
            }
        }
        Ok(sv)
    }

    /// `SpecialVocab._set_special_token`: the first id found for a kind wins; out-of-range ids are
    /// skipped.
    fn set_id(&mut self, kind: &str, id: Option<u64>, n_vocab: usize) {
        if let Some(id) = id
            && (id as usize) < n_vocab
        {
            self.ids.set_default(kind, id as u32);
        }
    }
}
