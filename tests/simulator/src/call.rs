//! What every simulated endpoint does first, whatever API it speaks: read the
//! JSON body, record the request, apply the per-request behaviour and any
//! injected failure, and check the model. Each face words its errors its own way.

use crate::engine::{Running, Work};
use crate::failure::ErrorFormat;
use crate::settings::Behaviour;
use crate::Sim;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// An API the simulator speaks, as far as its errors go.
pub trait Face: Send + Sync + 'static {
    /// An error answer in this API's shape.
    fn error(status: u16, message: &str) -> Response;
    /// A simulated failure, shaped by the request's behaviour where the API allows.
    fn injected(status: u16, behaviour: &Behaviour) -> Response;
}

/// A request that passed the checks every endpoint shares.
pub struct Call<F> {
    pub body: Value,
    pub headers: HeaderMap,
    pub model: String,
    pub served: Served,
    pub behaviour: Behaviour,
    face: PhantomData<F>,
}

impl<F: Face> FromRequest<Arc<Sim>> for Call<F> {
    type Rejection = Response;

    async fn from_request(request: Request, sim: &Arc<Sim>) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| F::error(400, &e.to_string()))?;
        begin(sim, &parts.uri, parts.headers, &bytes).await
    }
}

#[allow(clippy::result_large_err)] // an error here is the finished answer, built once per request
async fn begin<F: Face>(sim: &Sim, uri: &Uri, headers: HeaderMap, bytes: &Bytes) -> Result<Call<F>, Response> {
    let body: Value = serde_json::from_slice(bytes).map_err(|e| F::error(400, &format!("invalid JSON body: {e}")))?;
    sim.journal.record(uri.path(), &headers, &body);
    let behaviour = sim.settings.behaviour(&headers);
    if let Some(status) = behaviour.injected_failure() {
        let failure = F::injected(status, &behaviour);
        let accepts_gzip =
            headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("gzip"));
        return Err(if behaviour.gzip_errors && accepts_gzip {
            crate::failure::gzipped(failure).await
        } else {
            failure
        });
    }
    let model = body["model"].as_str().ok_or_else(|| F::error(400, "`model` is required"))?.to_string();
    let served = sim.served(&model).ok_or_else(|| F::error(404, &format!("The model `{model}` does not exist.")))?;
    Ok(Call { body, headers, model, served, behaviour, face: PhantomData })
}

impl<F: Face> Call<F> {
    /// A field the request must carry, or the face's 400.
    #[allow(clippy::result_large_err)] // as for `begin`
    pub fn required(&self, field: &str) -> Result<&Value, Response> {
        match &self.body[field] {
            Value::Null => Err(F::error(400, &format!("`{field}` is required"))),
            value => Ok(value),
        }
    }

    /// How many tokens to generate, and whether `max_tokens` (or the
    /// OpenAI `max_completion_tokens`) cut generation short.
    pub fn planned_tokens(&self) -> (u32, bool) {
        let limit = self.body["max_completion_tokens"].as_u64().or_else(|| self.body["max_tokens"].as_u64());
        match limit {
            Some(limit) if limit < u64::from(self.behaviour.output_tokens) => (limit as u32, true),
            _ => (self.behaviour.output_tokens, false),
        }
    }
}

impl<F> Call<F> {
    /// What the engine is asked to do for this request.
    pub fn work(&self, prompt: Vec<u32>) -> Work {
        let max_output = self.behaviour.output_tokens;
        Work { model: self.served.base.clone(), adapter: self.served.adapter.clone(), prompt, max_output }
    }
}

/// How a requested model is served: by the base model, or with a LoRA adapter on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub base: String,
    pub adapter: Option<String>,
}

/// One request on the engine: admitted, timed by the engine's load, and
/// counted in the metrics. Its place in the batch is given back when dropped.
pub struct Job<'a> {
    sim: &'a Sim,
    running: Running,
    model: String,
    prompt: u32,
}

impl Sim {
    /// Waits for the engine to admit `work`.
    pub async fn run(&self, work: Work) -> Job<'_> {
        let prompt = work.prompt.len() as u32;
        let model = work.model.clone();
        let running = self.engine.start(work).await;
        self.metrics.scheduled(&model, prompt, running.cached_tokens(prompt));
        Job { sim: self, running, model, prompt }
    }
}

impl Job<'_> {
    /// Time to the first token, from admission: the base time plus the prefill of uncached tokens.
    pub fn first_token(&self, behaviour: &Behaviour) -> Duration {
        self.sim.engine.prefill(&self.running, behaviour.ttft)
    }

    /// Time to the next token, with the batch as it is now.
    pub fn next_token(&self, behaviour: &Behaviour) -> Duration {
        self.sim.engine.inter_token(behaviour.itl)
    }

    /// The time a non-streamed answer of `tokens` tokens takes.
    pub fn whole(&self, behaviour: &Behaviour, tokens: u32) -> Duration {
        self.first_token(behaviour) + self.next_token(behaviour) * tokens.saturating_sub(1)
    }

    /// Records the finished request's tokens.
    pub fn finish(&self, generated: u32) {
        self.sim.metrics.finished(&self.model, self.prompt, generated);
    }
}

/// The nominal time an answer of `tokens` tokens takes, on an idle engine.
pub fn generation_time(behaviour: &Behaviour, tokens: u32) -> Duration {
    behaviour.ttft + behaviour.itl * tokens.saturating_sub(1)
}

pub fn now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// Waits `d`; no time at all for zero, where tokio's timer would still wait for
/// its next millisecond tick and blur every latency the benchmark measures.
pub async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// The writing end of a streamed answer's body: each item is the next piece,
/// or an error, which drops the connection as a crashing engine would.
pub type Pieces = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// A streamed answer of `content_type` whose body `write` produces, on its own
/// task, as its pieces fall due.
pub fn streamed<F>(content_type: &'static str, write: impl FnOnce(Pieces) -> F) -> Response
where
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(write(tx));
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if content_type == "text/event-stream" {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}

/// Waits until the token after an abort would be due: the crash comes then,
/// and the pieces already sent have time to leave before it.
pub async fn until_abort(behaviour: &Behaviour) {
    tokio::time::sleep(behaviour.itl.max(Duration::from_millis(20))).await;
}

/// The last piece of an aborted stream: the API's own in-stream error, or
/// with the `reset` error format none at all (the connection drops).
pub fn abort_piece(behaviour: &Behaviour, in_band: Result<Bytes, std::io::Error>) -> Result<Bytes, std::io::Error> {
    match behaviour.error_format {
        ErrorFormat::Reset => Err(std::io::Error::other("simulated abort")),
        _ => in_band,
    }
}
