//! Broken or missing files give errors that name the file and the problem; nothing panics.

use std::path::{Path, PathBuf};

use serde_json::json;
use tiefsee_tokenizer::{ChatTemplate, Error, Message, RenderOptions, Tokenizer};

fn fixture_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer")
        .join(family)
}

/// A temp copy of a fixture tokenizer directory, to break one file of it.
fn copy_of(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir(family)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Missing { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tokenizer.json") && message.contains("file not found"),
        "{message}"
    );
}

#[test]
fn malformed_tokenizer_json_says_where() {
    let dir = copy_of("qwen2");
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"version\": \"1.0\",\n  \"model\": [1, 2,\n}",
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("tokenizer.json: malformed JSON") && message.contains("line 3"),
        "{message}"
    );
}

#[test]
fn json_that_is_no_tokenizer_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"model": {"type": "NoSuchModel"}}"#,
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("tokenizer.json: not a usable tokenizer"),
        "{err}"
    );
}

#[test]
fn malformed_config_files_name_file_and_field() {
    let dir = copy_of("llama3");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": ").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("tokenizer_config.json: malformed JSON"),
        "{err}"
    );

    let dir = copy_of("llama3");
    edit_config(dir.path(), |c| {
        c.insert("eos_token".into(), json!(5));
    });
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("tokenizer_config.json: field `eos_token`"),
        "{message}"
    );

    let dir = copy_of("llama3");
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "end"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("generation_config.json: field `eos_token_id`"),
        "{err}"
    );
}

#[test]
fn generation_config_eos_may_be_an_int_or_a_list() {
    let dir = copy_of("llama3");
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let eot = tok.token_id("<|eot_id|>").unwrap();
    assert_eq!(tok.eos_ids()[0], eot);
    assert_eq!(tok.eos_ids().len(), 3);

    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 641}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[eot, 641]);

    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_ids(), &[eot]);
}

#[test]
fn template_syntax_error_shows_the_line() {
    let source = "{% for m in messages %}\n{{ m.content }\n{% endfor %}";
    let err = ChatTemplate::new(source, "inline").unwrap_err();
    match &err {
        Error::TemplateSyntax { line, text, .. } => {
            assert_eq!(*line, 2);
            assert_eq!(text, "{{ m.content }");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("chat template (inline): syntax error on line 2"),
        "{message}"
    );
    assert!(message.contains("2 | {{ m.content }"), "{message}");
}

#[test]
fn broken_template_in_a_model_dir_still_allows_encoding() {
    let dir = copy_of("deepseek-v3");
    edit_config(dir.path(), |c| {
        c.insert("chat_template".into(), json!("{{ bos_token }}\n{% if %}"));
    });
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(!tok.encode("Grüße", true).unwrap().is_empty());
    let err = tok
        .apply_chat_template(&[Message::user("hi")], true)
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("tokenizer_config.json `chat_template`") && message.contains("line 2"),
        "{message}"
    );
}

#[test]
fn raise_exception_surfaces_the_template_message() {
    let source = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                  {{ raise_exception('Only user and assistant roles are supported, not ' + m.role + '!') }}\
                  {% endif %}{{ m.content }}{% endfor %}";
    let template = ChatTemplate::new(source, "strict.jinja").unwrap();
    assert_eq!(
        template.render(&[Message::user("ok")], false).unwrap(),
        "ok"
    );
    let err = template
        .render(&[Message::new("tool", "x")], false)
        .unwrap_err();
    match &err {
        Error::TemplateRaised { message, .. } => {
            assert_eq!(
                message,
                "Only user and assistant roles are supported, not tool!"
            );
        }
        other => panic!("expected TemplateRaised, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "chat template (strict.jinja) raised: Only user and assistant roles are supported, not tool!"
    );
}

#[test]
fn render_errors_name_the_line() {
    let template = ChatTemplate::new("ok\n{{ messages | no_such_filter }}", "inline").unwrap();
    let err = template.render(&[Message::user("x")], false).unwrap_err();
    assert!(
        matches!(err, Error::TemplateRender { line: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("unknown filter"), "{err}");
    let template = ChatTemplate::new("line 1\n{{ 1 + messages }}", "inline").unwrap();
    let err = template.render(&[Message::user("x")], false).unwrap_err();
    assert!(
        matches!(err, Error::TemplateRender { line: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn missing_chat_template_is_an_error_not_a_panic() {
    let tok = Tokenizer::from_file(fixture_dir("qwen2").join("tokenizer.json")).unwrap();
    assert!(!tok.encode("hallo", true).unwrap().is_empty());
    let err = tok
        .apply_chat_template(&[Message::user("hi")], true)
        .unwrap_err();
    assert!(matches!(err, Error::NoChatTemplate(_)), "{err:?}");

    let dir = copy_of("qwen2");
    edit_config(dir.path(), |c| {
        c.remove("chat_template");
    });
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("neither chat_template.jinja nor"),
        "{err}"
    );
}

#[test]
fn template_lists_use_default_or_tool_use() {
    let dir = copy_of("qwen2");
    edit_config(dir.path(), |c| {
        c.insert(
            "chat_template".into(),
            json!([{"name": "tool_use", "template": "tools:{{ tools|length }}"}, {"name": "default", "template": "plain:{{ messages|length }}"}]),
        );
    });
    let template = ChatTemplate::from_dir(dir.path()).unwrap();
    let messages = [Message::user("hi")];
    assert_eq!(template.render(&messages, false).unwrap(), "plain:1");
    let tools = [json!({"type": "function"})];
    let options = RenderOptions {
        tools: Some(&tools),
        ..RenderOptions::default()
    };
    assert_eq!(
        template.render_with(&messages, false, &options).unwrap(),
        "tools:1"
    );

    edit_config(dir.path(), |c| {
        c.insert(
            "chat_template".into(),
            json!([{"name": "rag", "template": "x"}]),
        );
    });
    let err = ChatTemplate::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("none named \"default\""), "{err}");
}

#[test]
fn chat_template_jinja_file_takes_priority() {
    let dir = copy_of("qwen2");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ eos_token }}|{{ messages[0].content }}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let text = tok
        .chat_template()
        .unwrap()
        .render(&[Message::user("hi")], true)
        .unwrap();
    assert_eq!(text, "<|im_end|>|hi");
}

#[test]
fn reasoning_is_visible_under_both_names() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{{ m.thinking }}|{{ m.reasoning_content }}|{{ m|tojson }};{% endfor %}",
        "inline",
    )
    .unwrap();
    let mut answer = Message::assistant("4");
    answer.reasoning_content = Some("2+2".into());
    let mut tool_turn = Message::new("assistant", "x");
    tool_turn.content = None;
    tool_turn.extra.insert("tool_calls".into(), json!(null));
    tool_turn.extra.insert("name".into(), json!("f"));
    let text = template.render(&[answer, tool_turn], false).unwrap();
    assert_eq!(
        text,
        r#"2+2|2+2|{"thinking": "2+2", "role": "assistant", "content": "4", "reasoning_content": "2+2"};||{"role": "assistant", "name": "f"};"#
    );
}
