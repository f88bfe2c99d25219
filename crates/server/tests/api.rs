//! The HTTP API end to end on a fixture model: requests through the router, the engine thread and
//! the paged model, checked against the single-sequence generation loop and the API's contracts.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tiefsee_engine::scheduler::SchedulerConfig;
use tiefsee_engine::{GenerateOptions, Sampler, SamplingParams, Session};
use tiefsee_model::Model;
use tiefsee_server::{AppState, router};
use tiefsee_tokenizer::{Message, Tokenizer};
use tower::ServiceExt;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn state(name: &str, api_key: Option<&str>, max_waiting: usize) -> AppState {
    state_with_context(name, api_key, max_waiting, 128)
}

fn state_with_context(
    name: &str,
    api_key: Option<&str>,
    max_waiting: usize,
    context: usize,
) -> AppState {
    let dir = fixture(name);
    let model = Model::load(&dir, &candle_core::Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let scheduler = SchedulerConfig {
        num_blocks: 4 * context / 4 + 8,
        block_size: 4,
        context,
        max_step_tokens: 64,
        max_running: 4,
        max_waiting,
    };
    AppState::start(
        model,
        tokenizer,
        name.into(),
        api_key.map(Into::into),
        scheduler,
    )
    .unwrap()
}

async fn post(
    state: &AppState,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = router(state.clone())
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// What greedy decoding of the chat prompt gives through the plain single-sequence loop.
fn greedy_reference(name: &str, user: &str, max_tokens: usize) -> String {
    let dir = fixture(name);
    let model = Model::load(&dir, &candle_core::Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let prompt = tokenizer
        .apply_chat_template(&[Message::user(user)], true)
        .unwrap();
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    });
    let options = GenerateOptions {
        max_tokens,
        stop_ids: tokenizer.eos_ids().to_vec(),
    };
    let mut ids = Vec::new();
    Session::new(&model, None)
        .generate(&prompt, &options, &mut sampler, |t| {
            ids.push(t);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    tokenizer.decode(&ids, true).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_matches_plain_generation_and_reports_usage() {
    let state = state("deepseek-v3", None, 8);
    let body = json!({"messages": [{"role": "user", "content": "Grüße!"}], "max_tokens": 10, "temperature": 0});
    let (status, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let reply = json_of(&bytes);
    assert_eq!(reply["object"], "chat.completion");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, greedy_reference("deepseek-v3", "Grüße!", 10));
    let usage = &reply["usage"];
    assert_eq!(usage["completion_tokens"].as_u64().unwrap(), 10);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 10
    );
    assert_eq!(
        usage["prompt_cache_hit_tokens"].as_u64().unwrap()
            + usage["prompt_cache_miss_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_sends_the_same_text_then_usage_and_done() {
    let state = state("deepseek-v3", None, 8);
    let body = json!({"messages": [{"role": "user", "content": "Grüße!"}], "max_tokens": 10, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}});
    let (status, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(bytes).unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e.as_bytes()))
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, greedy_reference("deepseek-v3", "Grüße!", 10));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_prompt_hits_the_prefix_cache() {
    let state = state("qwen2", None, 8);
    let long = "Die Straße ist breit und die Sonne scheint über München.";
    let body =
        json!({"messages": [{"role": "user", "content": long}], "max_tokens": 2, "temperature": 0});
    let (_, first) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    let (_, second) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    let (first, second) = (json_of(&first), json_of(&second));
    assert_eq!(first["usage"]["prompt_cache_hit_tokens"], 0, "{first}");
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let hits = second["usage"]["prompt_cache_hit_tokens"].as_u64().unwrap();
    // Every full block of 4 tokens is shared (the last token is always recomputed for its logits).
    assert!(
        hits >= (prompt - 1) / 4 * 4 - 4 && hits < prompt,
        "{hits} of {prompt}"
    );
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let state = state("deepseek-v3", Some("sekret"), 8);
    let cases = [
        ("{not json", None),
        (
            r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#,
            Some("messages[0].role"),
        ),
        (r#"{"messages": []}"#, Some("messages")),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
            Some("temperature"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            Some("messages[0].content"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#,
            Some("n"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "top_p": 7}"#,
            Some("top_p"),
        ),
    ];
    for (body, param) in cases {
        let (status, bytes) = post(&state, "/v1/chat/completions", body, Some("sekret")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let error = json_of(&bytes);
        assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{body}");
        }
    }
    let long_prompt = json!({"messages": [{"role": "user", "content": "wort ".repeat(200)}]});
    let (status, bytes) = post(
        &state,
        "/v1/chat/completions",
        &long_prompt.to_string(),
        Some("sekret"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let (status, _) = post(&state, "/v1/chat/completions", r#"{"messages": []}"#, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post(
        &state,
        "/v1/chat/completions",
        r#"{"messages": []}"#,
        Some("wrong"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let huge = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(5 << 20)
    );
    let (status, _) = post(&state, "/v1/chat/completions", &huge, Some("sekret")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // The server still serves after all that.
    let ok = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, _) = post(
        &state,
        "/v1/chat/completions",
        &ok.to_string(),
        Some("sekret"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_and_others_complete() {
    let state = state("deepseek-v3", None, 1);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}).to_string();
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let (state, body) = (state.clone(), body.clone());
            tokio::spawn(async move { post(&state, "/v1/chat/completions", &body, None).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let busy = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + busy, 12, "{statuses:?}");
    assert!(ok >= 1 && busy >= 1, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_stream_frees_its_blocks() {
    let state = state("deepseek-v3", None, 8);
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": true});
    let response = router(state.clone())
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    // The engine notices within a step or two and cancels the request.
    let mut cancelled = false;
    for _ in 0..200 {
        let metrics = state.metrics.render();
        if metrics.contains("tiefsee_requests_cancelled_total 1")
            && metrics.contains("tiefsee_kv_blocks_in_use 0")
        {
            cancelled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(cancelled, "{}", state.metrics.render());
    let ok = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, _) = post(&state, "/v1/chat/completions", &ok.to_string(), None).await;
    assert_eq!(status, StatusCode::OK);
}

/// The deepseek-v3 fixture with DeepSeek-R1's chat template, which opens `<think>` in the prompt.
fn r1_state() -> (tempfile::TempDir, AppState) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("deepseek-v3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let r1 = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/templates/deepseek-r1.jinja");
    config["chat_template"] = json!(std::fs::read_to_string(r1).unwrap());
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model = Model::load(dir.path(), &candle_core::Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let scheduler = SchedulerConfig {
        num_blocks: 64,
        block_size: 4,
        context: 128,
        max_step_tokens: 64,
        max_running: 4,
        max_waiting: 8,
    };
    let state = AppState::start(model, tokenizer, "r1".into(), None, scheduler).unwrap();
    (dir, state)
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_template_output_is_reasoning_until_think_closes() {
    let (_dir, state) = r1_state();
    let body = json!({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8, "temperature": 0});
    let (status, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK);
    let reply = json_of(&bytes);
    let message = &reply["choices"][0]["message"];
    // The random model never writes </think>: everything it says is reasoning.
    assert_eq!(message["content"], "");
    assert!(
        !message["reasoning_content"].as_str().unwrap().is_empty(),
        "{reply}"
    );
    assert_eq!(
        reply["usage"]["completion_tokens_details"]["reasoning_tokens"],
        8
    );

    let stream = json!({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8, "temperature": 0, "stream": true});
    let (_, bytes) = post(&state, "/v1/chat/completions", &stream.to_string(), None).await;
    let text = String::from_utf8(bytes).unwrap();
    let reasoning: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            json_of(e.as_bytes())["choices"][0]["delta"]["reasoning_content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(reasoning, message["reasoning_content"].as_str().unwrap());
}
