//! The chat page at `/`: served as HTML, outside the API key, with its style and script inlined.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tiefsee_engine::scheduler::SchedulerConfig;
use tiefsee_model::Model;
use tiefsee_server::{AppState, router};
use tiefsee_tokenizer::Tokenizer;
use tower::ServiceExt;

#[tokio::test]
async fn index_serves_the_chat_page() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/deepseek-v3");
    let model = Model::load(&dir, &candle_core::Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let scheduler = SchedulerConfig {
        num_blocks: 16,
        block_size: 4,
        context: 32,
        max_step_tokens: 32,
        max_running: 1,
        max_waiting: 1,
    };
    // With a key set, the page itself must still load: the key is typed into the page.
    let state = AppState::start(
        model,
        tokenizer,
        "deepseek-v3".into(),
        Some("k".into()),
        scheduler,
    )
    .unwrap();
    let response = router(state)
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8(body.to_vec()).unwrap();
    assert!(page.contains("<title>tiefsee chat</title>"));
    assert!(
        page.contains("/v1/chat/completions"),
        "the script is inlined"
    );
}
