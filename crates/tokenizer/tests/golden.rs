//! Golden tests against transformers 5: ids, decodes and chat-template renders must be identical.
//! Fixtures and the script that made them: tests/fixtures/make_templates.py (tokenizers from
//! tests/fixtures/fixture_tokenizer.py, templates as published in tests/fixtures/templates/*.jinja).

use std::path::PathBuf;

use serde_json::{Map, Value};
use tiefsee_tokenizer::{ChatTemplate, Error, Message, RenderOptions, Tokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_json(relative: &str) -> Value {
    let path = fixtures().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn load(family: &str) -> Tokenizer {
    Tokenizer::from_dir(fixtures().join("tokenizer").join(family)).expect("fixture tokenizer loads")
}

/// Collects mismatches so one run reports all of them.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn check<T: PartialEq + std::fmt::Debug>(&mut self, what: String, got: T, want: T) {
        if got != want {
            self.0
                .push(format!("{what}:\n   got {got:?}\n  want {want:?}"));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} mismatches:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

#[test]
fn encode_and_decode_match_transformers() {
    let families = read_json("tokenizer/cases.json");
    let mut bad = Mismatches::default();
    for (family, data) in families.as_object().expect("families") {
        let tok = load(family);
        bad.check(
            format!("{family} vocab_size"),
            tok.vocab_size() as u64,
            data["vocab_size"].as_u64().unwrap(),
        );
        bad.check(
            format!("{family} bos_id"),
            tok.bos_id(),
            data["bos_id"].as_u64().map(|v| v as u32),
        );
        bad.check(
            format!("{family} eos_ids"),
            tok.eos_ids().to_vec(),
            ids(&data["eos_ids"]),
        );
        for case in data["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let with = tok.encode(text, true).unwrap();
            bad.check(
                format!("{family} encode({text:?})"),
                &with,
                &ids(&case["ids"]),
            );
            let without = tok.encode(text, false).unwrap();
            bad.check(
                format!("{family} encode({text:?}, no special)"),
                &without,
                &ids(&case["ids_no_special"]),
            );
            let want_ids = ids(&case["ids"]);
            bad.check(
                format!("{family} decode({text:?})"),
                tok.decode(&want_ids, false).unwrap().as_str(),
                case["decoded"].as_str().unwrap(),
            );
            bad.check(
                format!("{family} decode({text:?}, skip special)"),
                tok.decode(&want_ids, true).unwrap().as_str(),
                case["decoded_skip_special"].as_str().unwrap(),
            );
        }
        // Prefixes cut characters in half: the decoder's U+FFFD must appear exactly where Python's does.
        for prefix in data["prefix_decodes"].as_array().unwrap() {
            let all = ids(&prefix["ids"]);
            for (n, want) in prefix["decoded"].as_array().unwrap().iter().enumerate() {
                bad.check(
                    format!("{family} decode({:?})", &all[..n]),
                    tok.decode(&all[..n], false).unwrap().as_str(),
                    want.as_str().unwrap(),
                );
            }
        }
    }
    bad.assert_none();
}

#[test]
fn chat_templates_match_transformers() {
    let cases = read_json("templates/cases.json");
    let mut bad = Mismatches::default();
    let mut tokenizers = std::collections::HashMap::new();
    for case in cases["cases"].as_array().unwrap() {
        let family = case["family"].as_str().unwrap();
        let tok = tokenizers
            .entry(family.to_string())
            .or_insert_with(|| load(family));
        let label = format!(
            "{} {} add_generation_prompt={}",
            case["template"].as_str().unwrap(),
            case["name"].as_str().unwrap(),
            case["add_generation_prompt"]
        );
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let tools: Option<Vec<Value>> = case.get("tools").and_then(|t| t.as_array().cloned());
        let variables: Option<Map<String, Value>> =
            case.get("variables").and_then(|v| v.as_object().cloned());
        let options = RenderOptions {
            tools: tools.as_deref(),
            documents: None,
            variables: variables.as_ref(),
        };
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok
            .chat_template()
            .unwrap()
            .render_with(&messages, agp, &options);
        if let Some(want) = case.get("error").and_then(Value::as_str) {
            match rendered {
                Err(Error::TemplateRaised { message, .. }) => {
                    bad.check(label, message.as_str(), want)
                }
                other => bad.0.push(format!(
                    "{label}: expected raise_exception({want:?}), got {other:?}"
                )),
            }
            continue;
        }
        match rendered {
            Ok(text) => bad.check(
                format!("{label} text"),
                text.as_str(),
                case["text"].as_str().unwrap(),
            ),
            Err(e) => bad.0.push(format!("{label}: {e}")),
        }
        match tok.apply_chat_template_with(&messages, agp, &options) {
            Ok(got) => bad.check(format!("{label} ids"), got, ids(&case["ids"])),
            Err(e) => bad.0.push(format!("{label}: {e}")),
        }
    }
    bad.assert_none();
}

#[test]
fn python_isms_match_transformers_jinja_environment() {
    let cases = read_json("templates/cases.json");
    let mut bad = Mismatches::default();
    for snippet in cases["snippets"].as_array().unwrap() {
        let source = snippet["template"].as_str().unwrap();
        let variables = snippet["variables"].as_object().unwrap();
        let options = RenderOptions {
            variables: Some(variables),
            ..RenderOptions::default()
        };
        let got =
            ChatTemplate::new(source, "snippet").and_then(|t| t.render_with(&[], false, &options));
        match got {
            Ok(text) => bad.check(
                format!("{source:?}"),
                text.as_str(),
                snippet["text"].as_str().unwrap(),
            ),
            Err(e) => bad.0.push(format!("{source:?}: {e}")),
        }
    }
    bad.assert_none();
}

#[test]
fn template_file_renders_like_the_tokenizer_config_copy() {
    // The .jinja files are the published templates; the fixture configs embed them verbatim.
    let source = std::fs::read_to_string(fixtures().join("templates/deepseek-r1.jinja")).unwrap();
    let mut template = ChatTemplate::new(&source, "deepseek-r1.jinja").unwrap();
    template.set_special_token("bos_token", "<｜begin▁of▁sentence｜>");
    template.set_special_token("eos_token", "<｜end▁of▁sentence｜>");
    let messages = [
        Message::system("Sei kurz."),
        Message::user("Grüß dich!"),
        Message::assistant("<think>\nHöflich sein.\n</think>\n\nHallo!"),
        Message::user("Und jetzt?"),
    ];
    let from_file = template.render(&messages, true).unwrap();
    let from_dir = ChatTemplate::from_dir(fixtures().join("tokenizer/deepseek-r1"))
        .unwrap()
        .render(&messages, true)
        .unwrap();
    assert_eq!(from_file, from_dir);
    assert_eq!(
        from_file,
        "<｜begin▁of▁sentence｜>Sei kurz.<｜User｜>Grüß dich!<｜Assistant｜>\n\nHallo!<｜end▁of▁sentence｜>\
         <｜User｜>Und jetzt?<｜Assistant｜><think>\n"
    );
}

#[test]
fn tokenizer_and_template_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
    shareable::<ChatTemplate>();
}
