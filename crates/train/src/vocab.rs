//! The tokenizer of models trained from scratch: byte-level BPE with no merges (every UTF-8 byte is
//! one token, so any text round-trips), DeepSeek's special tokens, and the tag tokens of the task.
//! Written as the `tokenizer.json` / `tokenizer_config.json` pair that `tiefsee` and transformers
//! load, with a DeepSeek-R1-style chat template whose generation prompt opens `<think>`.

use std::path::Path;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TrainError};

/// Beginning of a document.
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of a document and of an assistant turn.
pub const EOS: &str = "<｜end▁of▁sentence｜>";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
/// Tags that the model writes; ordinary (non-special) tokens so decoding keeps them.
const TAGS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// The number of ids: 256 bytes, then BOS, EOS, User, Assistant, then the four tags.
pub const VOCAB_SIZE: usize = 256 + 4 + TAGS.len();
/// Id of [`BOS`].
pub const BOS_ID: u32 = 256;
/// Id of [`EOS`].
pub const EOS_ID: u32 = 257;

/// DeepSeek-R1's template in miniature: system text after BOS, user and assistant turns, earlier
/// reasoning dropped from the history, and a generation prompt that opens `<think>`.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] }}\
{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}\
{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}\
{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}\
<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}\
{% if add_generation_prompt %}<｜Assistant｜><think>{% endif %}";

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are shifted
/// above 255 so that every byte is a visible character.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a Latin-1 character")
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("a Latin Extended character")
            }
        })
        .collect()
}

/// The tokenizer as a `tokenizers` object.
pub fn build() -> Result<Tokenizer> {
    let vocab: Vocab = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| TrainError::Generation(format!("building the tokenizer: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let special: Vec<AddedToken> = [BOS, EOS, USER, ASSISTANT]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&special);
    let tags: Vec<AddedToken> = TAGS.iter().map(|t| AddedToken::from(*t, false)).collect();
    tokenizer.add_tokens(&tags);
    Ok(tokenizer)
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into `dir`.
pub fn write(dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    let tokenizer_json = dir.join("tokenizer.json");
    build()?
        .save(&tokenizer_json, true)
        .map_err(|e| TrainError::Io {
            path: tokenizer_json.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": false,
        "add_eos_token": false,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, pretty(&config)).map_err(io(&path))?;
    let generation = serde_json::json!({
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "do_sample": true,
        "temperature": 0.6,
        "top_p": 0.95,
    });
    let path = dir.join("generation_config.json");
    std::fs::write(&path, pretty(&generation)).map_err(io(&path))?;
    Ok(())
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiefsee_tokenizer::Message;

    #[test]
    fn every_byte_is_one_token_and_text_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path()).expect("write");
        let tok = tiefsee_tokenizer::Tokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.vocab_size(), VOCAB_SIZE);
        let text = "345+789 Grüße\n\t<think>1</think><answer>x</answer>";
        let ids = tok.encode(text, false).expect("encode");
        // 22 ASCII characters and a newline and tab, "ü" and "ß" two bytes each, four tags.
        let tags: Vec<u32> = ["<think>", "</think>", "<answer>", "</answer>"]
            .iter()
            .map(|t| tok.token_id(t).expect("tag"))
            .collect();
        assert_eq!(tags, vec![260, 261, 262, 263]);
        assert_eq!(ids.iter().filter(|i| tags.contains(i)).count(), 4);
        assert_eq!(
            ids.len(),
            4 + text.len() - "<think></think><answer></answer>".len()
        );
        assert_eq!(tok.decode(&ids, false).expect("decode"), text);
        assert_eq!(ids[..3], [b'3' as u32, b'4' as u32, b'5' as u32]);
    }

    #[test]
    fn chat_template_opens_think_and_drops_old_reasoning() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path()).expect("write");
        let tok = tiefsee_tokenizer::Tokenizer::from_dir(dir.path()).expect("load");
        let messages = [
            Message::new("user", "1+2"),
            Message::new("assistant", "<think>1+2+0=3</think><answer>3</answer>"),
            Message::new("user", "2+2"),
        ];
        let text = tok
            .chat_template()
            .expect("template")
            .render(&messages, true)
            .expect("render");
        assert_eq!(
            text,
            "<｜begin▁of▁sentence｜><｜User｜>1+2<｜Assistant｜><answer>3</answer><｜end▁of▁sentence｜><｜User｜>2+2<｜Assistant｜><think>"
        );
        let ids = tok.apply_chat_template(&messages[..1], true).expect("ids");
        assert_eq!(
            ids,
            vec![BOS_ID, 258, b'1' as u32, b'+' as u32, b'2' as u32, 259, 260]
        );
        assert_eq!(tok.eos_ids(), &[EOS_ID]);
    }
}
