//! The pools' operations on ext-proc's admin port, for the filter:
//!
//! - `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`: an admin
//!   key's LoRA operation ([`crate::operations`]), which the filter let through;
//! - `GET /v1/pools/models`: the models each discovering pool's replicas
//!   serve ([`PoolModels`]), which the filter merges into `/v1/models`;
//! - `GET /v1/pools`: each pool as the picker sees it (settings, and each
//!   replica's readiness, last metrics, requests in flight, picks, models),
//!   for operators.
//!
//! Only a caller presenting the internal token is served, as on the rest of the port.

use crate::operations::{self, Action, Http, Operation};
use crate::Pools;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::headers::{self, INTERNAL_TOKEN};
use modelgate_proto::models::{PoolModels, POOL_MODELS_PATH};
use modelgate_runtime::internal_token::InternalToken;
use std::sync::Arc;
use std::time::Instant;

/// Largest operation body: vLLM's is a name and a path.
const MAX_OPERATION_BYTES: usize = 64 << 10;

struct Api {
    pools: Arc<Pools>,
    replicas: Arc<Http>,
    token: InternalToken,
}

/// The routes, serving only callers presenting the internal token.
pub fn router(pools: Arc<Pools>, token: InternalToken) -> Router {
    let api = Arc::new(Api { pools, replicas: Arc::new(Http::default()), token });
    Router::new()
        .route("/v1/load_lora_adapter", post(load))
        .route("/v1/unload_lora_adapter", post(unload))
        .route(POOL_MODELS_PATH, get(pool_models))
        .route("/v1/pools", get(snapshot))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&api), only_envoy))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_OPERATION_BYTES))
        .with_state(api)
}

async fn only_envoy(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    match api.token.check(request.headers().get(INTERNAL_TOKEN).map(HeaderValue::as_bytes)) {
        Ok(()) => next.run(request).await,
        Err(refused) => error_response(&refused),
    }
}

async fn load(State(api): State<Arc<Api>>, request: Request) -> Response {
    operate(&api, Action::Load, request).await
}

async fn unload(State(api): State<Arc<Api>>, request: Request) -> Response {
    operate(&api, Action::Unload, request).await
}

async fn operate(api: &Api, action: Action, request: Request) -> Response {
    // Who asked: the admin key's name, as the filter said it.
    let by = request.headers().get(headers::OWNER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_OPERATION_BYTES).await else {
        return error_response(&GatewayError::body_too_large(Some(MAX_OPERATION_BYTES)));
    };
    let operation = match Operation::parse(action, &body, &api.pools) {
        Ok(operation) => operation,
        Err(refused) => return error_response(&refused),
    };
    tracing::info!(by = by.as_deref().unwrap_or(""), lora_name = %operation.lora_name, ?action, "LoRA operation asked");
    let report = operations::run(&api.pools, operation, Arc::clone(&api.replicas)).await;
    let (status, body) = report.to_answer();
    json_response(status, Bytes::from(body), None)
}

async fn pool_models(State(api): State<Arc<Api>>) -> Json<PoolModels> {
    let pools = api.pools.iter().filter(|pool| pool.config().discover_models);
    Json(PoolModels { pools: pools.map(|pool| (pool.name().to_string(), pool.models())).collect() })
}

async fn snapshot(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    let now = Instant::now();
    let pools: Vec<_> = api.pools.iter().map(|pool| pool.snapshot(now)).collect();
    Json(serde_json::json!({"object": "list", "data": pools}))
}

fn error_response(error: &GatewayError) -> Response {
    json_response(error.status, Bytes::from(error.to_json()), error.should_retry())
}

fn json_response(status: u16, body: Bytes, should_retry: Option<bool>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some((name, value)) = retry_header(should_retry) {
        response.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use serde_json::Value;
    use tower::ServiceExt;

    fn app() -> Router {
        let pools = Pools::from_json(
            br#"{"pools": {"vp": {"replicas": ["127.0.0.1:1"], "discover_models": true},
                           "plain": {"replicas": ["127.0.0.1:2"]}}}"#,
        )
        .unwrap();
        pools.get("vp").unwrap().replicas()[0].update(|s| s.models = Some(["base".to_string()].into()));
        router(Arc::new(pools), InternalToken::new("tok"))
    }

    async fn call(request: axum::http::Request<Body>) -> (StatusCode, Value) {
        let answer = app().oneshot(request).await.unwrap();
        let status = answer.status();
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn request(method: &str, path: &str, token: Option<&str>, body: &str) -> axum::http::Request<Body> {
        let mut builder = axum::http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header(INTERNAL_TOKEN, token);
        }
        builder.body(Body::from(body.to_string())).unwrap()
    }

    #[tokio::test]
    async fn only_envoy_is_served() {
        for (method, path) in [("GET", POOL_MODELS_PATH), ("GET", "/v1/pools"), ("POST", "/v1/load_lora_adapter")] {
            let (status, body) = call(request(method, path, None, "{}")).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("invalid_internal_token"))
            );
        }
    }

    #[tokio::test]
    async fn discovering_pools_list_their_models() {
        let (status, body) = call(request("GET", POOL_MODELS_PATH, Some("tok"), "")).await;
        assert_eq!(status, StatusCode::OK);
        // Its replica has no fresh metrics: it serves nothing the picker would pick.
        assert_eq!(body, serde_json::json!({"pools": {"vp": []}}));
    }

    #[tokio::test]
    async fn the_snapshot_lists_every_pool_and_its_replicas() {
        let (status, body) = call(request("GET", "/v1/pools", Some("tok"), "")).await;
        assert_eq!((status, body["object"].as_str()), (StatusCode::OK, Some("list")));
        let names: Vec<&str> = body["data"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["plain", "vp"]);
        assert_eq!(body["data"][1]["replicas"][0]["ready"], false, "never scraped");
    }

    #[tokio::test]
    async fn a_bad_operation_is_refused_in_openais_envelope() {
        let (status, body) = call(request("POST", "/v1/load_lora_adapter", Some("tok"), r#"{"lora_name": "a"}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "lora_path");
        let (status, body) =
            call(request("POST", "/v1/unload_lora_adapter", Some("tok"), r#"{"lora_name": "a", "pool": "x"}"#)).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("pool")));
    }
}
