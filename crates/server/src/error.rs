//! API errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), with the HTTP
//! status decided here and nowhere else.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tiefsee_engine::scheduler::Rejected;

/// Everything a request can fail with, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `param` names the field at fault when known.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// The waiting queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// The engine stopped or failed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "authentication_error"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            Self::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        }
    }
}

impl ApiError {
    /// Why the engine refused a request, naming `prompt_field` when the prompt is at fault.
    pub fn rejected(rejected: Rejected, prompt_field: &str) -> Self {
        let message = rejected.to_string();
        match rejected {
            Rejected::QueueFull { .. } => Self::Overloaded(message),
            Rejected::EmptyPrompt | Rejected::PromptTooLong { .. } => {
                Self::field(prompt_field, message)
            }
            Rejected::ZeroMaxTokens | Rejected::ExceedsContext { .. } => {
                Self::field("max_tokens", message)
            }
            Rejected::Choices { .. } | Rejected::ChoicesExceedPool { .. } => {
                Self::field("n", message)
            }
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        let message = rejection.body_text();
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::TooLarge(message)
        } else {
            Self::BadRequest {
                message,
                param: None,
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_type();
        let param = match &self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": status.as_u16(),
            }
        });
        (status, Json(body)).into_response()
    }
}
