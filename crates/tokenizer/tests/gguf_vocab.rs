//! A tokenizer folder written as GGUF metadata against what llama.cpp's converter wrote for it
//! (tests/fixtures/gguf-models/tokenizer-<name>.gguf, made by tests/fixtures/make_gguf_models.py): the same
//! `tokenizer.*` keys, in the same order, with the same values.

use std::path::PathBuf;

use tiefsee_gguf::{GgufFile, MetadataValue};
use tiefsee_tokenizer::gguf_vocab_metadata;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn vocab_metadata_equals_the_converters() {
    let names = [
        "deepseek-r1",
        "deepseek-v2",
        "deepseek-v3",
        "llama3",
        "qwen2",
        "r1-distill-llama",
        "r1-distill-qwen",
    ];
    for name in names {
        let file = GgufFile::open(
            fixtures()
                .join("gguf-models")
                .join(format!("tokenizer-{name}.gguf")),
        )
        .unwrap();
        let theirs: Vec<(&str, &MetadataValue)> = file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect();
        let n_tokens = file
            .metadata()
            .get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .len();
        let ours = gguf_vocab_metadata(&fixtures().join("tokenizer").join(name), n_tokens).unwrap();
        let keys = |v: Vec<&str>| v.join(", ");
        assert_eq!(
            keys(ours.iter().map(|(k, _)| k.as_str()).collect()),
            keys(theirs.iter().map(|(k, _)| *k).collect()),
            "{name}: keys"
        );
        for ((key, ours), (_, theirs)) in ours.iter().zip(&theirs) {
            if key == "tokenizer.ggml.pre" && name == "r1-distill-qwen" {
                // The fixture script named Qwen2's splits "qwen2"; the converter's hash of the real
                // tokenizer says "deepseek-r1-qwen", as tiefsee does (llama.cpp treats both alike).
                assert_eq!(ours, &MetadataValue::String("deepseek-r1-qwen".into()));
                continue;
            }
            assert_eq!(ours, *theirs, "{name}: {key}");
        }
    }
}
