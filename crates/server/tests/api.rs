//! The HTTP API end to end on a fixture model: requests through the router, the engine thread and
//! the paged model, checked against the single-sequence generation loop and the API's contracts.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tiefsee_engine::scheduler::SchedulerConfig;
use tiefsee_engine::{GenerateOptions, Sampler, SamplingParams, Session};
use tiefsee_model::{Logits, Model};
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

/// Posts without a key, asserts 200 OK (showing the body otherwise) and parses the JSON reply.
async fn post_ok(state: &AppState, path: &str, body: &str) -> Value {
    let (status, bytes) = post(state, path, body, None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    json_of(&bytes)
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
        .expect("a cache")
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
    let reply = post_ok(&state, "/v1/chat/completions", &body.to_string()).await;
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
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 0}"#,
            Some("n"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 100}"#,
            Some("n"),
        ),
        // Eight choices of 100 tokens do not fit the pool of 136 blocks of 4 tokens.
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "n": 8, "max_tokens": 100}"#,
            Some("n"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}"#,
            Some("top_logprobs"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}"#,
            Some("top_logprobs"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}"#,
            Some("logprobs"),
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
    for (body, param) in [
        (r#"{"prompt": "hi", "logprobs": 21}"#, "logprobs"),
        (r#"{"prompt": "hi", "logprobs": true}"#, "logprobs"),
        (r#"{"prompt": "hi", "n": 17}"#, "n"),
    ] {
        let (status, bytes) = post(&state, "/v1/completions", body, Some("sekret")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(json_of(&bytes)["error"]["param"], param, "{body}");
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

/// The `data:` payloads of an SSE body, checked to end with `[DONE]`, as JSON.
fn sse_chunks(bytes: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e.as_bytes()))
        .collect()
}

fn metric(state: &AppState, name: &str) -> u64 {
    let rendered = state.metrics.render();
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {rendered}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_choices_equal_one_choice_and_share_the_prompt_cache() {
    let state = state("deepseek-v3", None, 8);
    let body = json!({"messages": [{"role": "user", "content": "Grüße aus München!"}], "max_tokens": 6, "temperature": 0, "n": 3});
    let reply = post_ok(&state, "/v1/chat/completions", &body.to_string()).await;
    let expected = greedy_reference("deepseek-v3", "Grüße aus München!", 6);
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], expected.as_str(), "{reply}");
    }
    // The prompt counts once, the completions add up; choice 0 found nothing cached.
    let usage = &reply["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    let single = json!({"messages": [{"role": "user", "content": "Grüße aus München!"}], "max_tokens": 6, "temperature": 0});
    let (_, one) = post(&state, "/v1/chat/completions", &single.to_string(), None).await;
    let one = json_of(&one);
    assert_eq!(one["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(one["usage"]["prompt_tokens"].as_u64().unwrap(), prompt);
    assert_eq!(
        completion,
        3 * one["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(usage["prompt_cache_hit_tokens"], 0);
    // Choices 1 and 2 found every full block of 4 prompt tokens the first computed (all but the
    // last token is reusable), and so did the single request after them.
    let shared = (prompt - 1) / 4 * 4;
    assert_eq!(
        one["usage"]["prompt_cache_hit_tokens"].as_u64().unwrap(),
        shared
    );
    assert_eq!(
        metric(&state, "tiefsee_prefix_cache_hit_tokens_total"),
        3 * shared
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_choices_are_reproducible_and_differ() {
    let state = state("deepseek-v3", None, 8);
    let texts = |reply: &Value| -> Vec<String> {
        reply["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_owned())
            .collect()
    };
    let body =
        json!({"prompt": "Es war einmal", "max_tokens": 8, "temperature": 1.0, "seed": 42, "n": 3});
    let (status, first) = post(&state, "/v1/completions", &body.to_string(), None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&first)
    );
    let (_, second) = post(&state, "/v1/completions", &body.to_string(), None).await;
    let (first, second) = (texts(&json_of(&first)), texts(&json_of(&second)));
    assert_eq!(first, second);
    assert!(
        first[0] != first[1] && first[1] != first[2] && first[0] != first[2],
        "{first:?}"
    );
    // Choice 0 is what the same request for one choice gives.
    let one = json!({"prompt": "Es war einmal", "max_tokens": 8, "temperature": 1.0, "seed": 42});
    let (_, one) = post(&state, "/v1/completions", &one.to_string(), None).await;
    assert_eq!(texts(&json_of(&one)), vec![first[0].clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_choices_each_arrive_whole_and_finish() {
    let state = state("deepseek-v3", None, 8);
    let mut body = json!({"messages": [{"role": "user", "content": "Grüße!"}], "max_tokens": 8,
        "temperature": 1.0, "seed": 7, "n": 3});
    let (_, whole) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    let whole = json_of(&whole);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_chunks(&bytes);
    let mut content = vec![String::new(); 3];
    let mut roles = [0; 3];
    let mut finishes = [0; 3];
    for chunk in &chunks[..chunks.len() - 1] {
        let choices = chunk["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1, "{chunk}");
        let c = &choices[0];
        let i = c["index"].as_u64().unwrap() as usize;
        assert_eq!(finishes[i], 0, "choice {i} sent a delta after finishing");
        content[i] += c["delta"]["content"].as_str().unwrap_or("");
        roles[i] += usize::from(c["delta"]["role"] == "assistant");
        finishes[i] += usize::from(!c["finish_reason"].is_null());
    }
    assert_eq!((roles, finishes), ([1; 3], [1; 3]));
    for (i, text) in content.iter().enumerate() {
        assert_eq!(whole["choices"][i]["message"]["content"], text.as_str());
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][field], whole["usage"][field], "{field}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_cancels_every_choice() {
    let state = state("deepseek-v3", None, 8);
    // Eight choices: four run (max_running), four wait, and all go when the client does.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "temperature": 0, "n": 8, "stream": true});
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
    assert!(body.frame().await.unwrap().unwrap().is_data());
    drop(body);
    let mut cancelled = false;
    for _ in 0..200 {
        if metric(&state, "tiefsee_requests_cancelled_total") == 8
            && metric(&state, "tiefsee_kv_blocks_in_use") == 0
            && metric(&state, "tiefsee_queue_depth") == 0
        {
            cancelled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(cancelled, "{}", state.metrics.render());
}

/// log_softmax of the model's own logits (no paged cache, no engine) after each prefix of `ids`,
/// for the last `generated` positions: (generated, vocab).
fn reference_logprobs(name: &str, ids: &[u32], generated: usize) -> Vec<Vec<f64>> {
    let model = Model::load(&fixture(name), &candle_core::Device::Cpu).unwrap();
    let mut cache = model.new_cache(None).unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(ids, &mut cache, Logits::All)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap();
    // The logits at position p predict token p + 1.
    logits[ids.len() - 1 - generated..ids.len() - 1]
        .iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z = row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            row.iter().map(|&l| l as f64 - z).collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn logprobs_are_the_models_log_softmax() {
    let name = "deepseek-v3";
    let state = state(name, None, 8);
    let tokenizer = Tokenizer::from_dir(fixture(name)).unwrap();
    let prompt = tokenizer
        .apply_chat_template(&[Message::user("Grüße!")], true)
        .unwrap();
    let mut body = json!({"messages": [{"role": "user", "content": "Grüße!"}], "max_tokens": 8,
        "temperature": 0, "logprobs": true, "top_logprobs": 5});
    let reply = post_ok(&state, "/v1/chat/completions", &body.to_string()).await;
    let content = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let completion = reply["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(content.len(), completion);
    // The tokens' text, decoded one by one, makes the answer.
    let text: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(reply["choices"][0]["message"]["content"], text.as_str());

    // Recover the ids greedy decoding chose and score them with the plain forward pass.
    let mut ids = prompt.clone();
    let reference = {
        let model = Model::load(&fixture(name), &candle_core::Device::Cpu).unwrap();
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        });
        let options = GenerateOptions {
            max_tokens: 8,
            stop_ids: tokenizer.eos_ids().to_vec(),
        };
        Session::new(&model, None)
            .expect("a cache")
            .generate(&prompt, &options, &mut sampler, |t| {
                ids.push(t);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        reference_logprobs(name, &ids, completion)
    };
    for (j, entry) in content.iter().enumerate() {
        let id = ids[prompt.len() + j];
        assert_eq!(entry["token"], tokenizer.decode(&[id], false).unwrap());
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, entry["token"].as_str().unwrap().as_bytes());
        let logprob = entry["logprob"].as_f64().unwrap();
        assert!(
            (logprob - reference[j][id as usize]).abs() < 1e-3,
            "{j}: {logprob} vs {}",
            reference[j][id as usize]
        );
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        let tops: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tops.windows(2).all(|w| w[0] >= w[1]), "{tops:?}");
        // Greedy picked the most likely token.
        assert_eq!(logprob, tops[0]);
        let mut sorted = reference[j].clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (got, want) in tops.iter().zip(&sorted) {
            assert!((got - want).abs() < 1e-3, "{j}: {got} vs {want}");
        }
    }

    // Later requests find the prompt cached, which changes the arithmetic in the last bits.
    let close = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4;

    // Streamed, the same entries arrive with the deltas.
    body["stream"] = json!(true);
    let (_, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    let streamed: Vec<Value> = sse_chunks(&bytes)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), content.len());
    for (s, c) in streamed.iter().zip(content) {
        assert_eq!((&s["token"], &s["bytes"]), (&c["token"], &c["bytes"]));
        assert!(close(&s["logprob"], &c["logprob"]), "{s} vs {c}");
        let (st, ct) = (
            s["top_logprobs"].as_array().unwrap(),
            c["top_logprobs"].as_array().unwrap(),
        );
        assert_eq!(st.len(), ct.len());
        for (a, b) in st.iter().zip(ct) {
            assert_eq!(a["token"], b["token"]);
            assert!(close(&a["logprob"], &b["logprob"]), "{a} vs {b}");
        }
    }

    // Completions: OpenAI's legacy shape, the same numbers.
    let legacy = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let legacy = post_ok(&state, "/v1/completions", &legacy.to_string()).await;
    let lp = &legacy["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), completion);
    let mut offset = 0;
    for (j, entry) in content.iter().enumerate() {
        assert_eq!(tokens[j], entry["token"]);
        assert!(close(&lp["token_logprobs"][j], &entry["logprob"]));
        assert_eq!(lp["text_offset"][j], offset);
        offset += entry["token"].as_str().unwrap().chars().count();
        let top = lp["top_logprobs"][j].as_object().unwrap();
        assert!((1..=2).contains(&top.len()), "{top:?}");
        assert!(close(
            &top[entry["token"].as_str().unwrap()],
            &entry["logprob"]
        ));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_logprobs_cover_the_answer_only() {
    let (_dir, state) = r1_state();
    let body = json!({"messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 8,
        "temperature": 0, "logprobs": true});
    let (_, bytes) = post(&state, "/v1/chat/completions", &body.to_string(), None).await;
    let reply = json_of(&bytes);
    // The random model never closes </think>: every token is reasoning, none has logprobs.
    assert_eq!(reply["choices"][0]["logprobs"], json!({"content": []}));
}

/// Every two-character window of a greedy completion, used as a stop string, cuts the same completion
/// right before its first occurrence with finish reason "stop", even where the window only completes
/// in the text flushed at the end (an unfinished character shown as U+FFFD).
#[tokio::test(flavor = "multi_thread")]
async fn any_window_of_the_text_works_as_a_stop_string() {
    let state = state("deepseek-v3", None, 8);
    let complete = |stop: Option<String>| {
        let state = state.clone();
        async move {
            let mut body = json!({"prompt": "Es war einmal", "max_tokens": 24, "temperature": 0});
            if let Some(stop) = stop {
                body["stop"] = json!([stop]);
            }
            let reply = post_ok(&state, "/v1/completions", &body.to_string()).await;
            let choice = &reply["choices"][0];
            (
                choice["text"].as_str().unwrap().to_owned(),
                choice["finish_reason"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (text, _) = complete(None).await;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "too short to test: {text:?}");
    for window in chars.windows(2) {
        let stop: String = window.iter().collect();
        let (cut, finish) = complete(Some(stop.clone())).await;
        assert_eq!(finish, "stop", "stop {stop:?} in {text:?}");
        assert_eq!(cut, text[..text.find(&stop).unwrap()], "stop {stop:?}");
    }
}
