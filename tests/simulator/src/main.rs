//! modelgate's backend simulator: an OpenAI/vLLM-like server with
//! configurable latency and failures, used by `make run`, the tests and the
//! benchmarks in place of a GPU.

mod anthropic;
mod call;
mod failure;
mod generate;
mod journal;
mod metrics;
mod ollama;
mod openai;
mod settings;

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use std::sync::Arc;

pub struct Sim {
    settings: settings::Settings,
    metrics: metrics::Metrics,
    journal: journal::Journal,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let settings = settings::Settings::parse();
    let listen = settings.listen;
    let name = HeaderValue::from_str(&settings.name).map_err(std::io::Error::other)?;
    let sim = Arc::new(Sim { settings, metrics: metrics::Metrics::default(), journal: journal::Journal::default() });
    let app = Router::new()
        .merge(openai::routes())
        .merge(anthropic::routes())
        .merge(ollama::routes())
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(metrics_text))
        .route("/sim/requests", get(requests))
        .fallback(|| async { failure::vllm_error(404, "Not Found") })
        .layer(axum::middleware::map_response(move |mut response: Response| {
            let name = name.clone();
            async move {
                response.headers_mut().insert("x-sim-backend", name);
                response
            }
        }))
        .with_state(sim);
    // Without TCP_NODELAY, small SSE chunks wait on the client's delayed ACK (~40 ms).
    let listener = tokio::net::TcpListener::bind(listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    eprintln!("modelgate-simulator listening on {listen}");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await
}

async fn metrics_text(State(sim): State<Arc<Sim>>) -> Response {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], sim.metrics.encode())
        .into_response()
}

async fn requests(State(sim): State<Arc<Sim>>) -> Response {
    Json(serde_json::json!({"name": sim.settings.name, "requests": sim.journal.snapshot()})).into_response()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
