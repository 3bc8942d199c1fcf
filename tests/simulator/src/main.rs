//! modelgate's backend simulator: an OpenAI/vLLM-like server with
//! configurable latency and failures, used by `make run`, the tests and the
//! benchmarks in place of a GPU.

mod anthropic;
mod call;
mod engine;
mod failure;
mod gates;
mod generate;
mod journal;
mod metrics;
mod ollama;
mod openai;
mod reply;
mod responses;
mod settings;
mod tokenizer;
mod vllm;

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
    engine: Arc<engine::Engine>,
    metrics: metrics::Metrics,
    journal: journal::Journal,
    adapters: vllm::Adapters,
    gates: gates::Gates,
    responses: responses::Store,
}

impl Sim {
    /// How `model` is served here: a base model (any, when none is configured),
    /// or a loaded LoRA adapter on the first base model.
    pub fn served(&self, model: &str) -> Option<call::Served> {
        let models = &self.settings.models;
        if models.is_empty() || models.iter().any(|m| m == model) {
            return Some(call::Served { base: model.to_string(), adapter: None });
        }
        self.adapters.path(model)?;
        Some(call::Served { base: self.parent_model().to_string(), adapter: Some(model.to_string()) })
    }

    /// Holds a stream at its request's gate, if it names one, before token `i` (the second).
    pub async fn hold(&self, behaviour: &settings::Behaviour, i: usize) {
        if let (1, Some(gate)) = (i, &behaviour.gate) {
            self.gates.pass(gate).await;
        }
    }

    /// The base model adapters are loaded onto.
    pub fn parent_model(&self) -> &str {
        self.settings.models.first().map_or(self.settings.name.as_str(), String::as_str)
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let settings = settings::Settings::parse();
    let listen = settings.listen;
    let name = HeaderValue::from_str(&settings.name).map_err(std::io::Error::other)?;
    let sim = Arc::new(Sim {
        engine: engine::Engine::new(settings.engine()),
        metrics: metrics::Metrics::new(settings.max_loras),
        settings,
        journal: journal::Journal::default(),
        adapters: vllm::Adapters::default(),
        gates: gates::Gates::default(),
        responses: responses::Store::default(),
    });
    let app = Router::new()
        .merge(openai::routes())
        .merge(anthropic::routes())
        .merge(ollama::routes())
        .merge(vllm::routes())
        .merge(responses::routes())
        .merge(gates::routes())
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
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        sim.metrics.encode(&sim.engine.snapshot(), &sim.settings.models),
    )
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
