//! tiefsee's HTTP server: the OpenAI API in DeepSeek's dialect over the continuous-batching engine.
//!
//! The server speaks HTTP and never touches tensors: requests become token ids here, the engine
//! thread ([`worker`]) batches them, and tokens come back to be decoded and streamed.

pub mod api;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod page;
pub mod routes;
pub mod worker;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tiefsee_engine::scheduler::SchedulerConfig;
use tiefsee_model::Model;
use tiefsee_tokenizer::Tokenizer;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::worker::Submit;

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub tokenizer: Arc<Tokenizer>,
    pub submit: mpsc::UnboundedSender<Submit>,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub api_key: Option<String>,
    /// Tokens one sequence may hold.
    pub context: usize,
    pub vocab_size: usize,
    pub created: u64,
}

impl AppState {
    /// Starts the engine thread for `model` and returns the state the routes share.
    pub fn start(
        model: Model,
        tokenizer: Tokenizer,
        model_name: String,
        api_key: Option<String>,
        scheduler: SchedulerConfig,
    ) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let vocab_size = model.config().vocab_size();
        let context = scheduler.context;
        let submit = worker::spawn(model, scheduler, metrics.clone())?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            submit,
            metrics,
            model_name,
            api_key,
            context,
            vocab_size,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }
}

/// All routes: the API under `/v1` (behind the API key, if one is set), health and metrics.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(api)
        .route("/", get(page::index))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::Unauthorized(
                "missing or wrong API key (Authorization: Bearer KEY)".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Serves until Ctrl-C or SIGTERM; running streams are finished before the server exits.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: finishing running requests");
}
