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

use crate::budgets::valid_reservation;
use crate::error_answers::{body_error, error_response, method_not_allowed};
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
use modelgate_proto::error::GatewayError;
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
        Err(rejection) => return body_error(&rejection, MAX_BODY),
    };
    let ask: GateRequest = match serde_json::from_slice(&body) {
        Ok(ask) => ask,
        Err(e) => return error_response(&GatewayError::unparsable_json(&e)),
    };
    if !ask.budgets.is_empty() && !valid_reservation(&ask.reservation) {
        let message = "Invalid 'reservation': a request with budgets names its reservation, 1 to 64 letters, \
                       digits, '-' or '_'."
            .to_string();
        return error_response(&GatewayError::invalid_value("reservation", message));
    }
    let started = std::time::Instant::now();
    match gate.decide(&ask, clock::unix_millis()).await {
        Ok((verdict, bytes)) => {
            // Measured from here, after the call reached ext-proc: a verdict late by this measure is surely late.
            if ask.timeout_ms > 0 && started.elapsed() >= std::time::Duration::from_millis(ask.timeout_ms) {
                gate.abandon(&ask, &verdict, clock::unix_millis()).await;
            }
            let answer = gate::join_line(&verdict, &bytes);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], answer).into_response()
        }
        Err(unavailable) => {
            tracing::warn!(request_id = ask.request_id.as_str(), error = %unavailable.0, "budget store unavailable");
            error_response(&GatewayError::budgets_unavailable())
        }
    }
}

async fn post_store(State(gate): State<Arc<Gate>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection, MAX_BODY),
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
    method_not_allowed(&method, &uri, "POST")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budgets::Budgets;
    use crate::cache::{Memory, Store};
    use axum::body::Body;
    use modelgate_proto::gate::{GateVerdict, StoreTicket};
    use modelgate_proto::headers::INTERNAL_TOKEN;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    const TOKEN: &str = "s3cret";

    /// The routes, and the budgets' directory, removed with it.
    fn app() -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let budgets = Budgets::open(dir.path(), None, std::time::Duration::from_secs(1)).unwrap();
        let gate = Gate::new(Store::Memory(Memory::new(1 << 20)), Arc::new(budgets));
        (router(Arc::new(gate), InternalToken::new(TOKEN)), dir)
    }

    async fn call(app: &Router, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let mut builder = axum::http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header(INTERNAL_TOKEN, token);
        }
        let answer = app.clone().oneshot(builder.body(Body::from(body)).unwrap()).await.unwrap();
        let status = answer.status();
        (status, axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap().to_vec())
    }

    fn error_of(body: &[u8]) -> Value {
        serde_json::from_slice::<Value>(body).unwrap()["error"].clone()
    }

    fn gate_call(body: &str) -> Vec<u8> {
        let ask = GateRequest {
            request_id: "r".into(),
            owner: "alice".into(),
            path: "/v1/chat/completions".into(),
            model: "m".into(),
            idempotency: Some(gate::IdempotencyAsk { key: "k".into(), window_secs: 60 }),
            ..GateRequest::default()
        };
        ask.to_call_body(body.as_bytes())
    }

    #[tokio::test]
    async fn only_envoy_is_served() {
        let (app, _budgets) = app();
        for path in [GATE_PATH, GATE_STORE_PATH] {
            for token in [None, Some("wrong")] {
                let (status, body) = call(&app, "POST", path, token, b"{}".to_vec()).await;
                assert_eq!(
                    (status, error_of(&body)["code"].clone()),
                    (StatusCode::UNAUTHORIZED, json!("invalid_internal_token"))
                );
            }
            let (status, _) = call(&app, "GET", path, Some(TOKEN), Vec::new()).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        }
    }

    #[tokio::test]
    async fn a_request_is_claimed_then_its_repeat_refused_then_replayed() {
        let (app, _budgets) = app();
        let (status, body) = call(&app, "POST", GATE_PATH, Some(TOKEN), gate_call(r#"{"model":"m"}"#)).await;
        assert_eq!(status, StatusCode::OK);
        let (verdict, rest) = gate::split_answer(&body).unwrap();
        assert!(rest.is_empty());
        let GateVerdict::Proceed { ticket: Some(ticket), .. } = verdict else { panic!("{verdict:?}") };

        let (_, body) = call(&app, "POST", GATE_PATH, Some(TOKEN), gate_call(r#"{"model":"m"}"#)).await;
        assert!(matches!(gate::split_answer(&body).unwrap().0, GateVerdict::Refuse { .. }));

        let ended = StoreRequest {
            request_id: "r".into(),
            ticket,
            complete: true,
            status: 201,
            content_type: "application/json".into(),
            stream: false,
            usage: None,
        };
        let (status, body) =
            call(&app, "POST", GATE_STORE_PATH, Some(TOKEN), gate::join_line(&ended, b"{\"id\":1}\n")).await;
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (_, body) = call(&app, "POST", GATE_PATH, Some(TOKEN), gate_call(r#"{ "model" : "m" }"#)).await;
        let (verdict, rest) = gate::split_answer(&body).unwrap();
        assert!(matches!(verdict, GateVerdict::Replay { status: 201, .. }), "{verdict:?}");
        assert_eq!(rest, b"{\"id\":1}\n");
    }

    #[tokio::test]
    async fn calls_of_another_shape_are_refused_by_name() {
        let (app, _budgets) = app();
        let (status, body) = call(&app, "POST", GATE_PATH, Some(TOKEN), b"{\"owner\":".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
        let budgeted = GateRequest { budgets: vec![gate::BudgetCandidate::default()], ..GateRequest::default() };
        let (status, body) = call(&app, "POST", GATE_PATH, Some(TOKEN), budgeted.to_call_body(b"{}")).await;
        assert_eq!((status, error_of(&body)["param"].clone()), (StatusCode::BAD_REQUEST, json!("reservation")));

        let forged = StoreRequest {
            request_id: "r".into(),
            ticket: StoreTicket { claim: Some("idem:../../x/00/00".into()), ..StoreTicket::default() },
            complete: false,
            status: 200,
            content_type: String::new(),
            stream: false,
            usage: None,
        };
        let (status, body) = call(&app, "POST", GATE_STORE_PATH, Some(TOKEN), gate::join_line(&forged, b"")).await;
        assert_eq!((status, error_of(&body)["param"].clone()), (StatusCode::BAD_REQUEST, json!("ticket")));
        let (status, _) = call(&app, "POST", GATE_STORE_PATH, Some(TOKEN), b"not json\n".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
