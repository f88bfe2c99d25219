//! A model's own Jinja chat template, rendered the way transformers' `apply_chat_template` renders it.
//!
//! Follows transformers 5 (`utils/chat_template_utils.py`, `PreTrainedTokenizerBase.apply_chat_template`):
//! - the environment has `trim_blocks` and `lstrip_blocks`, loop controls, no auto-escaping, and the helpers
//!   transformers installs: `raise_exception(msg)`, `strftime_now(fmt)`, and `tojson` redefined as
//!   `json.dumps(x, ensure_ascii=False, ...)` (Jinja's own escapes HTML and sorts nothing);
//! - the template sees `messages`, `tools` and `documents` (`none` unless given), `add_generation_prompt`,
//!   every named special token of the tokenizer config that is set (`bos_token`, `eos_token`, ...) as a
//!   string, and any extra keyword variables, which override the special tokens;
//! - message keys whose value is null are dropped, and a message's reasoning (`reasoning_content`,
//!   `thinking` or `reasoning`) is copied under both `thinking` and `reasoning_content`;
//! - the template comes from `chat_template.jinja` beside the tokenizer if present, else from
//!   `tokenizer_config.json` (`chat_template`: a string, or a list of `{name, template}` of which
//!   "default" is used, or "tool_use" when tools are passed and it exists).
//!
//! Jinja2 is Python and minijinja is Rust: Python string methods (`.split`, `.strip`, `.startswith`, ...)
//! come from minijinja-contrib's pycompat, and printed values are spelled as Python prints them
//! (`True`, `None`, `{'a': 1}`; see `pyfmt`). Not mirrored: `continue_final_message`,
//! `sanitize_control_tokens`, assistant masks, and the `~` operator's spelling of non-string values.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Map;

use crate::config::{TemplateSource, TokenizerConfig, read_optional};
use crate::error::{Error, Result};
use crate::pyfmt;

/// One chat message. Serializes as transformers expects a message dict; fields other than these
/// (`tool_calls`, `name`, `tool_call_id`, ...) go in `extra` and reach the template unchanged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// Absent (not `""`) for e.g. an assistant turn that only calls tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The reasoning of an earlier assistant turn, for templates that render or strip it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, serde_json::Value>,
}

impl Message {
    /// A message with `role` and text `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: Some(content.into()),
            ..Message::default()
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// The message as the dict transformers hands to the template (nulls dropped, reasoning aliased).
    fn to_template_dict(&self) -> Map<String, serde_json::Value> {
        let mut dict = Map::new();
        dict.insert("role".into(), self.role.clone().into());
        if let Some(content) = &self.content {
            dict.insert("content".into(), content.clone().into());
        }
        if let Some(reasoning) = &self.reasoning_content {
            dict.insert("reasoning_content".into(), reasoning.clone().into());
        }
        for (key, value) in &self.extra {
            if !value.is_null() {
                dict.insert(key.clone(), value.clone());
            }
        }
        // `_alias_reasoning_fields`: {"thinking": r, **message, "reasoning_content": r}.
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|key| dict.get(*key).cloned());
        match reasoning {
            Some(r) => {
                let mut aliased = Map::new();
                aliased.insert("thinking".into(), r.clone());
                aliased.extend(dict);
                aliased.insert("reasoning_content".into(), r);
                aliased
            }
            None => dict,
        }
    }
}

/// Optional inputs of a render beyond the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions<'a> {
    /// Tool JSON schemas (`tools=` in transformers).
    pub tools: Option<&'a [serde_json::Value]>,
    /// Documents for retrieval-augmented templates (`documents=`).
    pub documents: Option<&'a [serde_json::Value]>,
    /// Extra template variables (transformers' `**kwargs`), e.g. `date_string` or `enable_thinking`.
    pub variables: Option<&'a Map<String, serde_json::Value>>,
}

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template names compiled into `env`: "default" and possibly "tool_use".
    has_tool_use: bool,
    /// Where the template came from, for error messages.
    origin: String,
    /// `("bos_token", "<｜begin▁of▁sentence｜>")`, ... as the template sees them.
    special_tokens: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `origin` names it in error messages (a path, or e.g. "inline").
    pub fn new(source: &str, origin: &str) -> Result<Self> {
        Self::compile(
            &TemplateSource::Single(source.to_string()),
            origin,
            Vec::new(),
        )
    }

    /// The template of the model in `dir`: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template`, with the special tokens that `tokenizer_config.json` names.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = TokenizerConfig::read(&config_path)?.unwrap_or_default();
        Self::from_config(dir, &config)
    }

    /// As `from_dir`, with the config already read.
    pub(crate) fn from_config(dir: &Path, config: &TokenizerConfig) -> Result<Self> {
        let special_tokens = config
            .named
            .iter()
            .map(|(name, token)| (name.clone(), token.content.clone()))
            .collect();
        let jinja_path = dir.join("chat_template.jinja");
        if let Some(source) = read_optional(&jinja_path)? {
            let origin = jinja_path.display().to_string();
            return Self::compile(&TemplateSource::Single(source), &origin, special_tokens);
        }
        let config_path = dir.join("tokenizer_config.json");
        match &config.chat_template {
            Some(source) => {
                let origin = format!("{} `chat_template`", config_path.display());
                Self::compile(source, &origin, special_tokens)
            }
            None => Err(Error::NoChatTemplate(format!(
                "{}: neither chat_template.jinja nor a `chat_template` in tokenizer_config.json",
                dir.display()
            ))),
        }
    }

    fn compile(
        source: &TemplateSource,
        origin: &str,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Self> {
        let mut env = environment();
        let mut has_tool_use = false;
        match source {
            TemplateSource::Single(text) => add_template(&mut env, DEFAULT, text, origin)?,
            TemplateSource::Named(named) => {
                let find = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t);
                let Some(default) = find(DEFAULT) else {
                    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(Error::NoChatTemplate(format!(
                        "{origin}: templates {names:?} but none named \"default\""
                    )));
                };
                add_template(&mut env, DEFAULT, default, &format!("{origin} \"default\""))?;
                if let Some(tool_use) = find(TOOL_USE) {
                    add_template(
                        &mut env,
                        TOOL_USE,
                        tool_use,
                        &format!("{origin} \"tool_use\""),
                    )?;
                    has_tool_use = true;
                }
            }
        }
        Ok(ChatTemplate {
            env,
            has_tool_use,
            origin: origin.to_string(),
            special_tokens,
        })
    }

    /// Set (or replace) a special-token variable such as `bos_token`.
    pub fn set_special_token(&mut self, name: &str, content: &str) {
        self.special_tokens.retain(|(n, _)| n != name);
        self.special_tokens
            .push((name.to_string(), content.to_string()));
    }

    /// Render `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// Render with tools, documents or extra variables.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        options: &RenderOptions<'_>,
    ) -> Result<String> {
        let mut vars: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(name, content)| (name.clone(), Value::from(content.as_str())))
            .collect();
        if let Some(extra) = options.variables {
            for (key, value) in extra {
                vars.retain(|(k, _)| k != key);
                vars.push((key.clone(), Value::from(Serde(value))));
            }
        }
        let dicts: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::Value::Object(m.to_template_dict()))
            .collect();
        let list = |items: Option<&[serde_json::Value]>| {
            items.map_or(Value::from(()), |v| Value::from(Serde(v)))
        };
        vars.push(("messages".into(), Value::from(Serde(&dicts))));
        vars.push(("tools".into(), list(options.tools)));
        vars.push(("documents".into(), list(options.documents)));
        vars.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));

        let name = if options.tools.is_some() && self.has_tool_use {
            TOOL_USE
        } else {
            DEFAULT
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| self.render_error(&e))?;
        template
            .render(Value::from_pairs(vars))
            .map_err(|e| self.render_error(&e))
    }

    fn render_error(&self, e: &minijinja::Error) -> Error {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(Raised(message)) = s.downcast_ref::<Raised>() {
                return Error::TemplateRaised {
                    origin: self.origin.clone(),
                    message: message.clone(),
                };
            }
            source = s.source();
        }
        Error::TemplateRender {
            origin: self.origin.clone(),
            line: e.line().unwrap_or(0),
            message: describe(e),
        }
    }
}

fn add_template(
    env: &mut Environment<'static>,
    name: &'static str,
    source: &str,
    origin: &str,
) -> Result<()> {
    env.add_template_owned(name, source.to_string())
        .map_err(|e| {
            let line = e.line().unwrap_or(0);
            let text = source
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or_default();
            Error::TemplateSyntax {
                origin: origin.to_string(),
                line,
                text: clip(text, 160),
                message: describe(&e),
            }
        })
}

/// The kind and detail of a minijinja error, without its debug dump.
fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

fn clip(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// The message a template passed to `raise_exception`, carried as the minijinja error's source.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The Jinja environment of transformers' `_cached_compile_jinja_template`, in minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are a valid syntax");
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, state, value| match pyfmt::py_str(value) {
        Some(text) => Ok(out.write_str(&text)?),
        None => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", |value: Value| match pyfmt::py_str(&value) {
        Some(text) => Value::from(text),
        None => Value::from(value.to_string()),
    });
    env.add_function(
        "raise_exception",
        |message: Value| -> std::result::Result<Value, minijinja::Error> {
            let message = message
                .as_str()
                .map_or_else(|| message.to_string(), str::to_string);
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(Raised(message)),
            )
        },
    );
    env.add_function("strftime_now", |format: &str| pyfmt::strftime_now(format));
    env
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// arguments positional or by keyword.
fn tojson(
    value: Value,
    positional: &[Value],
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if positional.len() > NAMES.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson() takes at most 5 arguments",
        ));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, name) in NAMES.iter().enumerate() {
        given[slot] = match (positional.get(slot), kwargs.get::<Option<Value>>(name)?) {
            (Some(_), Some(_)) => {
                return Err(minijinja::Error::new(
                    ErrorKind::TooManyArguments,
                    format!("tojson() got multiple values for argument '{name}'"),
                ));
            }
            (Some(arg), None) => Some(arg.clone()),
            (None, kwarg) => kwarg,
        };
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = given;
    let indent = indent.filter(|v| !v.is_none()).map(|v| match v.as_i64() {
        Some(n) => " ".repeat(n.max(0) as usize),
        None => v.as_str().map_or_else(|| v.to_string(), str::to_string),
    });
    let mut options = pyfmt::JsonOptions::new(indent);
    options.ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    options.sort_keys = sort_keys.is_some_and(|v| v.is_true());
    if let Some(separators) = separators.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] => {
                options.item_separator = item.to_string();
                options.key_separator = key.to_string();
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson(separators=...) expects (item_separator, key_separator)",
                ));
            }
        }
    }
    pyfmt::json_dumps(&value, &options).map(Value::from)
}
