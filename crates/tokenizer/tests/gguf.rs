//! Tokenizers read from GGUF metadata against the tokenizer.json they were converted from, and against
//! llama.cpp's own tokenization of the same GGUF where the fixture recorded it
//! (tests/fixtures/make_gguf_models.py, tests/fixtures/gguf-models/tokenize.json).

use std::path::PathBuf;

use serde_json::Value;
use tiefsee_tokenizer::{Message, Tokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("gguf-models/tokenize.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn ids_equal_tokenizer_json_and_llama_cpp() {
    let reference = reference();
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let tokenizers = reference["tokenizers"].as_object().unwrap();
    assert_eq!(tokenizers.len(), 7);
    let mut compared_llama_cpp = 0;
    for (name, entry) in tokenizers {
        let path = fixtures()
            .join("gguf-models")
            .join(entry["gguf"].as_str().unwrap());
        let tok = Tokenizer::from_gguf(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let from_dir = Tokenizer::from_dir(fixtures().join("tokenizer").join(name)).unwrap();
        for (i, text) in texts.iter().enumerate() {
            let got = tok.encode(text, true).unwrap();
            assert_eq!(got, ids(&entry["ids"][i]), "{name}: {text:?}");
            assert_eq!(
                got,
                from_dir.encode(text, true).unwrap(),
                "{name}: {text:?}"
            );
            if let Some(llama) = entry.get("llama_cpp_ids") {
                assert_eq!(got, ids(&llama[i]), "{name} vs llama.cpp: {text:?}");
                compared_llama_cpp += 1;
            }
            let without_bos = tok.encode(text, false).unwrap();
            assert_eq!(
                tok.decode(&without_bos, false).unwrap(),
                *text,
                "{name}: decode"
            );
        }
        assert_eq!(tok.bos_id(), from_dir.bos_id(), "{name}: bos");
    }
    eprintln!("{compared_llama_cpp} tokenizations compared with llama.cpp's");
}

#[test]
fn chat_template_and_special_tokens_come_from_metadata() {
    for (gguf, dir) in [
        ("tokenizer-deepseek-r1.gguf", "deepseek-r1"),
        ("tokenizer-qwen2.gguf", "qwen2"),
        ("tokenizer-llama3.gguf", "llama3"),
    ] {
        let tok = Tokenizer::from_gguf(fixtures().join("gguf-models").join(gguf)).unwrap();
        let from_dir = Tokenizer::from_dir(fixtures().join("tokenizer").join(dir)).unwrap();
        let messages = [
            Message::system("Be brief."),
            Message::user("Grüß dich!"),
            Message::assistant("Hallo."),
            Message::user("Wie geht's?"),
        ];
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            from_dir.apply_chat_template(&messages, true).unwrap(),
            "{gguf}"
        );
        // Every id the folder ends generation with, llama.cpp does too.
        for id in from_dir.eos_ids() {
            assert!(
                tok.eos_ids().contains(id),
                "{gguf}: eos {id} of {:?}",
                tok.eos_ids()
            );
        }
    }
}

#[test]
fn unknown_pre_tokenizer_is_named() {
    let src = fixtures().join("gguf-models/tokenizer-qwen2.gguf");
    let mut bytes = std::fs::read(src).unwrap();
    // The value of tokenizer.ggml.pre, "qwen2", replaced in place by a name llama.cpp does not know.
    let key = b"tokenizer.ggml.pre";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // u32 type tag (string = 8), u64 length 5, then the text.
    assert_eq!(&bytes[at..at + 17], b"\x08\0\0\0\x05\0\0\0\0\0\0\0qwen2");
    bytes[at + 12..at + 17].copy_from_slice(b"qwenX");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pre.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = Tokenizer::from_gguf(&path).unwrap_err().to_string();
    assert!(err.contains("\"qwenX\""), "{err}");
    assert!(err.contains("tokenizer.ggml.pre"), "{err}");
}

/// DeepSeek's pre-tokenizers are llama.cpp's regexes verbatim, and those are the tokenizer.json's.
#[test]
fn deepseek_regexes_are_the_tokenizer_json_ones() {
    for (pre, dir) in [
        ("deepseek-llm", "deepseek-v2"),
        ("deepseek-v3", "deepseek-v3"),
    ] {
        let text = std::fs::read_to_string(
            fixtures()
                .join("tokenizer")
                .join(dir)
                .join("tokenizer.json"),
        );
        let json: Value = serde_json::from_str(&text.unwrap()).unwrap();
        let splits: Vec<&str> = json["pre_tokenizer"]["pretokenizers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == "Split")
            .map(|p| p["pattern"]["Regex"].as_str().unwrap())
            .collect();
        let (regexes, _) = tiefsee_tokenizer::gguf::pre_tokenizer(pre).unwrap();
        assert_eq!(regexes, splits, "{pre}");
    }
}

/// The converter pads the vocabulary to the model's size with unused `[PAD{id}]` tokens; llama.cpp
/// decodes those ids to nothing, as the tokenizer.json (which lacks them) does.
#[test]
fn unused_padding_ids_decode_to_nothing() {
    let tok = Tokenizer::from_gguf(fixtures().join("gguf-models/deepseek-v3.f16.gguf")).unwrap();
    let hello = tok.encode("Hello", false).unwrap();
    let with_pad = [hello.clone(), vec![702], hello].concat();
    assert_eq!(tok.decode(&with_pad, false).unwrap(), "HelloHello");
    assert!(!tok.encode("[PAD702]", false).unwrap().contains(&702));
}
