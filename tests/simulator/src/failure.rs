//! Error answers in the shapes real backends and the boxes in front of them
//! send, for testing that the gateway turns each into an OpenAI error.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorFormat {
    /// vLLM's current shape: `{"error":{...,"code":<status as integer>}}`.
    Vllm,
    /// Older vLLM: `{"object":"error","message":...,"code":<integer>}`.
    VllmFlat,
    /// Exactly OpenAI's envelope.
    Openai,
    /// A load balancer's HTML error page.
    Html,
    /// Plain text.
    Text,
    /// No body at all.
    Empty,
    /// No answer at all: the connection drops before the status line, as when a backend crashes.
    Reset,
}

impl ErrorFormat {
    pub fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, true).ok()
    }
}

/// vLLM's error answer.
pub fn vllm_error(status: u16, message: &str) -> Response {
    failure(status, message, ErrorFormat::Vllm, None)
}

fn vllm_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        404 => "NotFoundError",
        429 => "RateLimitError",
        _ => "InternalServerError",
    }
}

/// An error answer with `status` in `format`, with a `retry-after` if given.
pub fn failure(status: u16, message: &str, format: ErrorFormat, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = status.as_u16();
    let mut response = match format {
        ErrorFormat::Vllm => {
            Json(json!({"error": {"message": message, "type": vllm_type(code), "param": null, "code": code}}))
                .into_response()
        }
        ErrorFormat::VllmFlat => {
            Json(json!({"object": "error", "message": message, "type": vllm_type(code), "param": null, "code": code}))
                .into_response()
        }
        ErrorFormat::Openai => {
            Json(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "simulated"}}))
                .into_response()
        }
        ErrorFormat::Html => (
            [(header::CONTENT_TYPE, "text/html")],
            format!(
                "<html><head><title>{code} {}</title></head><body><center>nginx</center></body></html>",
                status.canonical_reason().unwrap_or("Error")
            ),
        )
            .into_response(),
        ErrorFormat::Text => ([(header::CONTENT_TYPE, "text/plain")], message.to_string()).into_response(),
        ErrorFormat::Empty => ().into_response(),
        ErrorFormat::Reset => {
            // A body that fails before its first byte makes hyper drop the connection
            // without writing the response head.
            let failing = tokio_stream::once(Err::<axum::body::Bytes, _>(std::io::Error::other("simulated reset")));
            return axum::body::Body::from_stream(failing).into_response();
        }
    };
    *response.status_mut() = status;
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    }
    response
}
