//! The gate's routes on the admin port, which only the gateway's Envoy calls
//! (with the internal token, where one is configured):
//!
//! - `POST /v1/gate`: a [`GateRequest`]; answered `200` with the verdict's
//!   line and, for a replay, the bytes after it; `503` (`budgets_unavailable`)
//!   when the budgets' store did not answer, so the filter follows
//!   `budgets.on_failure`. A cache store that does not answer is never an
//!   error here: the verdict goes on without it.
//! - `POST /v1/gate/store`: a [`StoreRequest`]'s line, then the answer's
//!   bytes; answered `204` once kept (a store that failed is logged and
//!   counted: the filter does not wait for this answer).
//!
//! Errors are OpenAI envelopes.

use crate::gate::{valid_ticket, Gate};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use modelgate_proto::clock;
use modelgate_proto::error::{ErrorType, GatewayError};
use modelgate_proto::gate::{self, GateRequest, StoreRequest, GATE_PATH, GATE_STORE_PATH};
use modelgate_runtime::internal_token::InternalToken;
use std::sync::Arc;

/// Largest call: a request body as large as the filter takes, or a kept
/// answer (`cache.max_entry_bytes`), with room for the line before it.
const MAX_BODY: usize = 64 << 20;

/// The gate's routes, serving only callers presenting `token`.
pub fn router(gate: Arc<Gate>, token: InternalToken) -> Router {
    Router::new()
        .route(GATE_PATH, post(post_gate).fallback(only_post))
        .route(GATE_STORE_PATH, post(post_store).fallback(only_post))
        .with_state(gate)
        .route_layer(middleware::from_fn_with_state(Arc::new(token), only_envoy))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

async fn only_envoy(State(token): State<Arc<InternalToken>>, request: axum::extract::Request, next: Next) -> Response {
    match token.check(request.headers().get(modelgate_proto::headers::INTERNAL_TOKEN).map(HeaderValue::as_bytes)) {
        Ok(()) => next.run(request).await,
        Err(refused) => error_response(&refused),
    }
}

async fn post_gate(State(gate): State<Arc<Gate>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection),
    };
    let ask: GateRequest = match serde_json::from_slice(&body) {
        Ok(ask) => ask,
        Err(e) => return error_response(&GatewayError::unparsable_json(&e)),
    };
    if !ask.budgets.is_empty() && ask.reservation.is_empty() {
        let message = "Invalid 'reservation': a request with budgets names its reservation.".to_string();
        return error_response(&GatewayError::invalid_value("reservation", message));
    }
    match gate.decide(&ask, clock::unix_millis()).await {
        Ok((verdict, bytes)) => {
            let answer = gate::join_line(&verdict, &bytes);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], answer).into_response()
        }
        Err(unavailable) => {
            tracing::warn!(request_id = ask.request_id.as_str(), error = %unavailable.0, "budget store unavailable");
            error_response(&budgets_unavailable())
        }
    }
}

/// The gate's 503 when the budgets' store does not answer; the filter
/// answers its client by `budgets.on_failure`, never with this.
fn budgets_unavailable() -> GatewayError {
    let message = "The budgets' store is unavailable; try again shortly.".to_string();
    GatewayError::from_backend(503, ErrorType::Server, None, message)
}

async fn post_store(State(gate): State<Arc<Gate>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection),
    };
    let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    let request: StoreRequest = match serde_json::from_slice(&body[..end]) {
        Ok(request) => request,
        Err(e) => return error_response(&GatewayError::unparsable_json(&e)),
    };
    if !valid_ticket(&request.ticket) {
        let message = "Invalid 'ticket': not one the gate handed out.".to_string();
        return error_response(&GatewayError::invalid_value("ticket", message));
    }
    gate.keep(&request, body.get(end + 1..).unwrap_or_default(), clock::unix_millis()).await;
    StatusCode::NO_CONTENT.into_response()
}

async fn only_post(method: Method, uri: Uri) -> Response {
    let mut response = error_response(&GatewayError::method_not_allowed(method.as_str(), uri.path(), "POST"));
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

fn body_error(rejection: &BytesRejection) -> Response {
    let error = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        GatewayError::body_too_large(Some(MAX_BODY))
    } else {
        GatewayError::invalid_request(format!("Could not read the request body: {rejection}."))
    };
    error_response(&error)
}

fn error_response(error: &GatewayError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], error.to_json()).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
