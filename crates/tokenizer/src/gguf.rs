//! A tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`), built as a `tokenizers` tokenizer that
//! gives llama.cpp's ids (`src/llama-vocab.cpp`, BPE vocabularies, `tokenizer.ggml.model = "gpt2"`).
//!
//! - The vocabulary is `tokenizer.ggml.tokens` by id; merges are `tokenizer.ggml.merges`, each split at its
//!   first space after the first character, as llama.cpp splits them.
//! - The pre-tokenizer is named by `tokenizer.ggml.pre`; [`pre_tokenizer`] gives llama.cpp's regex splits for
//!   each name (its adapted forms: ASCII-only case folding of contractions instead of `(?i:...)`), then the
//!   GPT-2 byte-level mapping. llama.cpp applies no normalizer (Qwen2's tokenizer.json has NFC).
//! - Token types (`tokenizer.ggml.token_type`): control tokens (3) become special added tokens and
//!   user-defined tokens (4) plain added tokens, both matched in the text before BPE, as llama.cpp does with
//!   special-token parsing on; unused (5) ids are left out (never produced, decoded to nothing).
//! - BOS is prepended when `tokenizer.ggml.add_bos_token` says so (llama.cpp's default for `llama-bpe` is
//!   true, else false); EOS ids are llama.cpp's end-of-generation set: `eos`, `eot`, `eom` ids and the
//!   tokens it recognizes by text (`<|im_end|>`, `<|eot_id|>`, ...).
//! - Decoding is byte-level; llama.cpp's `clean_spaces` post-processing is not applied (transformers 5 does
//!   not apply it to BPE tokenizers either).

use std::path::Path;

use serde_json::{Value, json};
use tiefsee_gguf::{GgufFile, Metadata, MetadataArray};

use crate::error::{Error, Result};

/// ggml token types (`enum llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Token texts llama.cpp treats as end of generation wherever they occur (`llama_vocab::impl::load`),
/// the ones of the families tiefsee runs.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
];

/// The contraction-first split of Llama 3 and Qwen2 (llama.cpp's adapted form); `{digits}` is `{1,3}`
/// for Llama 3 and empty for Qwen2.
fn llama3_style(digits: &str) -> String {
    format!(
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{{L}}\\p{{N}}]?\\p{{L}}+|\\p{{N}}{digits}| ?[^\\s\\p{{L}}\\p{{N}}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    )
}

/// llama.cpp's regex splits for a `tokenizer.ggml.pre` name and whether it skips merges for words that
/// are whole tokens (`ignore_merges`); `None` for a name tiefsee does not know.
pub fn pre_tokenizer(name: &str) -> Option<(Vec<String>, bool)> {
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Some(match name {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            (vec![llama3_style("{1,3}")], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (vec![llama3_style("")], false),
        // Escaped characters are ones Unicode normalization would replace (U+1F7D -> U+03CE, U+212A
        // -> K, ...): spelled out, an editor that normalizes cannot change the pattern.
        "deepseek-llm" => (
            owned(&[
                "[\r\n]",
                "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1F7D}ᾀ-ᾴᾶ-ᾼ\u{1FBE}ῂ-ῄῆ-ῌῐ-\u{1FD3}ῖ-\u{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
                "\\s+$",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}+",
            ]),
            false,
        ),
        "deepseek-coder" => (
            owned(&[
                "[\r\n]",
                "\\s?\\p{L}+",
                "\\s?\\p{P}+",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}",
            ]),
            false,
        ),
        "deepseek-v3" => (
            owned(&[
                "\\p{N}{1,3}",
                "[一-龥\u{3040}-ゟ゠-ヿ]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
            ]),
            false,
        ),
        _ => return None,
    })
}

/// What a tokenizer needs from a GGUF file.
pub struct GgufVocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// `(name, text)` of the named special tokens, for the chat template (`bos_token`, `eos_token`).
    pub named: Vec<(String, String)>,
    pub chat_template: Option<String>,
}

fn invalid(path: &Path, field: &str, problem: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        field: field.to_owned(),
        problem: problem.into(),
    }
}

fn gguf_error(path: &Path, e: tiefsee_gguf::GgufError) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// An optional token id (any integer type), checked against the vocabulary.
fn token_id(md: &Metadata, path: &Path, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    use tiefsee_gguf::MetadataValue as V;
    let id = match md.get(key) {
        None => return Ok(None),
        Some(V::U32(v)) => i64::from(*v),
        Some(V::I32(v)) => i64::from(*v),
        Some(V::U64(v)) => i64::try_from(*v).unwrap_or(-1),
        Some(V::I64(v)) => *v,
        Some(other) => {
            return Err(invalid(
                path,
                key,
                format!("expected an integer, found a {}", other.type_description()),
            ));
        }
    };
    // llama.cpp writes -1 (as u32: 0xFFFFFFFF) for "none".
    if id < 0 || id == i64::from(u32::MAX) {
        return Ok(None);
    }
    if id as usize >= n_tokens {
        return Err(invalid(
            path,
            key,
            format!("id {id} is outside the {n_tokens} tokens"),
        ));
    }
    Ok(Some(id as u32))
}

/// Reads the vocabulary of `file` and builds the tokenizer.
pub fn read(file: &GgufFile) -> Result<GgufVocab> {
    let path = file.path();
    let md = file.metadata();
    let model = md
        .get_str("tokenizer.ggml.model")
        .map_err(|e| gguf_error(path, e))?;
    if model != "gpt2" {
        return Err(invalid(
            path,
            "tokenizer.ggml.model",
            format!("{model:?} is not supported: tiefsee reads BPE (\"gpt2\") vocabularies"),
        ));
    }
    let pre = match md.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => md
            .get_str("tokenizer.ggml.pre")
            .map_err(|e| gguf_error(path, e))?,
    };
    let Some((regexes, ignore_merges)) = pre_tokenizer(pre) else {
        return Err(invalid(
            path,
            "tokenizer.ggml.pre",
            format!(
                "pre-tokenizer {pre:?} is not supported: tiefsee knows deepseek-v3, deepseek-llm, deepseek-coder, qwen2 (deepseek-r1-qwen) and llama-bpe"
            ),
        ));
    };
    let tokens = md
        .get_str_array("tokenizer.ggml.tokens")
        .map_err(|e| gguf_error(path, e))?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(_) => match md
            .get_array("tokenizer.ggml.token_type")
            .map_err(|e| gguf_error(path, e))?
        {
            MetadataArray::I32(v) => v.clone(),
            MetadataArray::U32(v) => v.iter().map(|&t| t as i32).collect(),
            other => {
                return Err(invalid(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("expected integers, found {:?}", other.element_type()),
                ));
            }
        },
    };
    if types.len() != tokens.len() {
        return Err(invalid(
            path,
            "tokenizer.ggml.token_type",
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let merges = md
        .get_str_array("tokenizer.ggml.merges")
        .map_err(|e| gguf_error(path, e))?;
    let n = tokens.len();
    let bos = token_id(md, path, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(md, path, "tokenizer.ggml.eos_token_id", n)?;
    let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
        None => ignore_merges, // llama.cpp: true for the llama3 family, false for other BPE vocabularies
        Some(_) => md
            .get_bool("tokenizer.ggml.add_bos_token")
            .map_err(|e| gguf_error(path, e))?,
    };

    let mut vocab = serde_json::Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, (text, &ty)) in tokens.iter().zip(&types).enumerate() {
        // Unused ids (the converter's `[PAD{id}]` fillers up to the model's vocabulary size) are left
        // out: llama.cpp never produces them from text and decodes them to nothing.
        if ty == TOKEN_UNUSED {
            continue;
        }
        vocab.entry(text.clone()).or_insert(json!(id));
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": text, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_CONTROL,
            }));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            // llama.cpp: split at the first space after the first character.
            let split = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            match split {
                Some(i) => json!([&m[..i], &m[i + 1..]]),
                None => json!([m, ""]),
            }
        })
        .collect();
    let mut pretokenizers: Vec<Value> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretokenizers.push(
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
    );
    let post_processor = match (add_bos, bos) {
        (true, Some(bos)) => {
            let text = &tokens[bos as usize];
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}},
            })
        }
        _ => Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    });
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
            Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("the vocabulary in its metadata does not build: {e}"),
            }
        })?;

    // End of generation as llama.cpp decides it.
    let mut eog: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token_id(md, path, key, n)?
            && !eog.contains(&id)
        {
            eog.push(id);
        }
    }
    for (id, (text, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty != TOKEN_UNUSED && EOG_TEXTS.contains(&text.as_str()) && !eog.contains(&(id as u32)) {
            eog.push(id as u32);
        }
    }
    let mut named = Vec::new();
    if let Some(bos) = bos {
        named.push(("bos_token".to_owned(), tokens[bos as usize].clone()));
    }
    if let Some(eos) = eos {
        named.push(("eos_token".to_owned(), tokens[eos as usize].clone()));
    }
    let chat_template = match md.get("tokenizer.chat_template") {
        None => None,
        Some(_) => Some(
            md.get_str("tokenizer.chat_template")
                .map_err(|e| gguf_error(path, e))?
                .to_owned(),
        ),
    };
    Ok(GgufVocab {
        tokenizer,
        bos,
        eos: eog,
        named,
        chat_template,
    })
}
