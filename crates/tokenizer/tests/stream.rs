//! Streamed decoding: ids pushed one at a time come out as whole characters, and the pieces add up to
//! the full decode. The full `decode` is the oracle.

use std::path::PathBuf;

use serde_json::json;
use tiefsee_tokenizer::Tokenizer;

const TEXTS: [&str; 5] = [
    "Grüße aus München! Äpfel, Öl, Übermut, ß.",
    "我们今天学习中文。北京欢迎你！日本語のテキスト。",
    "Emoji 😀🎉 👍🏽 🇩🇪 ❤️ 🤖 done",
    "Mixed: Ünïcödé 中文 and English 123 😀\n\ttabs  and  spaces",
    "Привет, мир! مرحبا नमस्ते",
];

fn fixture(family: &str) -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer")
        .join(family);
    Tokenizer::from_dir(dir).expect("fixture tokenizer loads")
}

/// Push every id; returns the pieces, checking none carries a replacement character the full text lacks.
fn stream_all(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
    let full = tok.decode(ids, skip_special_tokens).unwrap();
    let mut stream = tok.stream(skip_special_tokens);
    let mut pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    pieces.push(stream.finish().unwrap());
    if !full.contains('\u{FFFD}') {
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} has a broken character ({full:?})"
            );
        }
    }
    assert_eq!(pieces.concat(), full, "pieces {pieces:?}");
    pieces
}

#[test]
fn byte_level_families_stream_whole_characters() {
    for family in [
        "deepseek-v3",
        "deepseek-v2",
        "qwen2",
        "llama3",
        "r1-distill-qwen",
        "r1-distill-llama",
    ] {
        let tok = fixture(family);
        let mut held_back = 0;
        for text in TEXTS {
            let ids = tok.encode(text, true).unwrap();
            let pieces = stream_all(&tok, &ids, false);
            stream_all(&tok, &ids, true);
            held_back += pieces[..ids.len()].iter().filter(|p| p.is_empty()).count();
        }
        // The tiny vocabularies spell most non-ASCII characters byte by byte: the split path is exercised.
        assert!(
            held_back > 10,
            "{family}: only {held_back} ids completed no character"
        );
    }
}

#[test]
fn special_tokens_stream_and_can_be_skipped() {
    let tok = fixture("deepseek-r1");
    let text = "<｜User｜>Grüß dich<｜Assistant｜><think>\nDenken…\n</think>\n\n你好 😀<｜end▁of▁sentence｜>";
    let ids = tok.encode(text, true).unwrap();
    let shown = stream_all(&tok, &ids, false).concat();
    assert_eq!(shown, format!("<｜begin▁of▁sentence｜>{text}"));
    let skipped = stream_all(&tok, &ids, true).concat();
    // <think> is not a special token in DeepSeek's tokenizer, so it stays.
    assert_eq!(skipped, "Grüß dich<think>\nDenken…\n</think>\n\n你好 😀");
}

#[test]
fn unfinished_character_is_held_then_flushed_by_finish() {
    let tok = fixture("deepseek-v3");
    let ids = tok.encode("😀", false).unwrap();
    assert!(
        ids.len() > 1,
        "the emoji should take several byte tokens, got {ids:?}"
    );
    let mut stream = tok.stream(false);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(stream.push(id).unwrap(), "");
    }
    // Ending mid-character gives what decode gives: the replacement character.
    let flushed = stream.finish().unwrap();
    assert_eq!(flushed, tok.decode(&ids[..ids.len() - 1], false).unwrap());
    assert!(flushed.contains('\u{FFFD}'));
    // After finish the decoder starts afresh.
    let mut text = String::new();
    for &id in &ids {
        text += &stream.push(id).unwrap();
    }
    text += &stream.finish().unwrap();
    assert_eq!(text, "😀");
}

/// A SentencePiece-style tokenizer (Llama 2 layout): `▁` for spaces, `<0xNN>` byte-fallback tokens, and a
/// decoder that strips the leading space of the whole text.
fn byte_fallback_tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let mut vocab = serde_json::Map::new();
    for (i, token) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(token.to_string(), json!(i));
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let plain = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'";
    for (i, c) in plain.chars().enumerate() {
        vocab.insert(c.to_string(), json!(259 + i));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&tokenizer).unwrap()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    (dir, tok)
}

#[test]
fn byte_fallback_tokenizer_streams_whole_characters() {
    let (_dir, tok) = byte_fallback_tokenizer();
    for text in TEXTS {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "BOS first");
        assert!(
            ids.iter().any(|&id| (3..259).contains(&id)),
            "byte fallback used for {text:?}"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        stream_all(&tok, &ids, true);
        stream_all(&tok, &ids, false);
    }
}
