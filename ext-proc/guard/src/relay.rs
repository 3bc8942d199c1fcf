//! The stream guard: an HTTP relay that ends every broken stream with an
//! OpenAI error event instead of a dropped connection.
//!
//! NDJSON streams (Ollama's) are guarded the same way, ending with Ollama's own
//! `{"error": "..."}` line, which the translation turns into OpenAI's event.
//!
//! When a backend dies after its `200` has gone out, Envoy can only reset the
//! client's stream: no filter gets a say after an upstream reset. So the
//! filter sends streaming requests here, and the guard passes them to a second
//! Envoy listener that routes them as usual (load balancing, health, retries
//! before the first byte). The answer is relayed event by event; if the
//! connection breaks mid-stream, the guard drops the unfinished event, writes
//! `data: {"error":{...}}` and ends the response cleanly. The client's SDK then
//! raises `APIError` with that error, after every chunk that was sent.
//!
//! A stream whose backend needs its requests rewritten (another dialect, a
//! renamed model, an API key, defaults) is rewritten here too, as ext_proc
//! would rewrite it, and its answer translated event by event as it passes
//! (the filter then hands the guard the backend's profile in
//! [`headers::STREAM_BACKEND`] and does not engage ext_proc): the events pass
//! through the guard anyway, and ext_proc would cost two gRPC round trips
//! before the request leaves and one for every piece of the answer.
//!
//! The guard's own answers (its upstream unreachable, a request without a
//! target cluster) are OpenAI errors too; every other answer passes untouched.
//!
//! What reaches the guard is trusted only as far as its own configuration
//! says: with an internal token configured, a request without it is refused;
//! keys are read only from the sources it was started with; and a client's
//! `x-envoy-*` headers are dropped, since the inner listener must route the
//! stream as configured, not as they ask (retries, timeouts, hedging).
//!
//! A stream is never dropped silently: an event longer than the guard holds
//! ends it with an error event too, and so does a shutdown. On SIGTERM the
//! guard stops accepting connections, lets open streams finish until a
//! deadline, and ends those still open then with an error event.

use crate::retry_budget::RetryBudget;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use modelgate_dialects::call::BackendCall;
use modelgate_dialects::credentials::KeySources;
use modelgate_dialects::dialect::ResponseTranslation;
use modelgate_proto::chain::{Chain, Member};
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::framing::{error_event, CompleteEvents, Framing, DEFAULT_MAX_EVENT_BYTES};
use modelgate_proto::headers;
use modelgate_runtime::internal_token::InternalToken;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// A relayed request's body: the client's as it comes, or rewritten for its backend.
type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// The default of `--max-headers`: the most headers a request or an answer
/// may have. Above Envoy's `max_headers_count` on the OpenAI listener (100,
/// Envoy's default), with room for the headers the gateway adds on the way,
/// so every request Envoy lets in is relayed.
pub const DEFAULT_MAX_HEADERS: usize = 200;

/// Relays requests to one upstream (Envoy's inner listener).
pub struct StreamGuard {
    client: Client<HttpConnector, UpstreamBody>,
    upstream: SocketAddr,
    /// Bounds the retries of fallback chains.
    budget: RetryBudget,
    /// The key sources the guard may read; none unless given.
    keys: KeySources,
    /// What callers must present; nothing unless given.
    token: InternalToken,
    /// The most headers a relayed request or answer may have.
    max_headers: usize,
    /// The most of one unfinished event (or NDJSON line) held; an event that outgrows it ends the stream.
    max_event_bytes: usize,
    /// How far a shutdown has come; open streams watch it.
    stopping: watch::Sender<Stop>,
}

/// The guard's shutdown, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Serving,
    /// No new connections; open streams may finish.
    Draining,
    /// The deadline passed: streams still open end now, with an error event.
    Cut,
}

/// The time streams cut at the deadline get to write their error event.
const CUT_GRACE: Duration = Duration::from_secs(1);

impl StreamGuard {
    pub fn new(upstream: SocketAddr) -> Self {
        StreamGuard {
            client: upstream_client(DEFAULT_MAX_HEADERS),
            upstream,
            budget: RetryBudget::default(),
            keys: KeySources::default(),
            token: InternalToken::default(),
            max_headers: DEFAULT_MAX_HEADERS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            stopping: watch::Sender::new(Stop::Serving),
        }
    }

    /// Lets the guard read backends' keys from `keys`.
    pub fn with_keys(self, keys: KeySources) -> Self {
        StreamGuard { keys, ..self }
    }

    /// Serves only callers that present `token`.
    pub fn with_token(self, token: InternalToken) -> Self {
        StreamGuard { token, ..self }
    }

    /// Relays requests and answers of up to `max_headers` headers.
    pub fn with_max_headers(self, max_headers: usize) -> Self {
        StreamGuard { client: upstream_client(max_headers), max_headers, ..self }
    }

    /// The same, holding up to `max_event_bytes` of an unfinished event.
    pub fn with_max_event_bytes(mut self, max_event_bytes: usize) -> Self {
        self.max_event_bytes = max_event_bytes;
        self
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        self.serve_until(listener, std::future::pending(), Duration::MAX).await;
    }

    /// Serves until `shutdown` resolves, then drains: new connections are
    /// refused, each open connection closes once its answer is done, and
    /// streams still open after `deadline` end with an error event.
    pub async fn serve_until(self, listener: TcpListener, shutdown: impl Future<Output = ()>, deadline: Duration) {
        let guard = Arc::new(self);
        // Each connection holds a sender; all of them gone means all connections closed.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let socket = match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "stream guard: accept failed");
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            // Subscribed before any shutdown, so none is missed.
            let mut stopping = guard.stopping.subscribe();
            let open = open.clone();
            let guard = Arc::clone(&guard);
            let max_headers = guard.max_headers;
            tokio::spawn(async move {
                let _open = open;
                let service = hyper::service::service_fn(move |request| {
                    let guard = Arc::clone(&guard);
                    async move { Ok::<_, Infallible>(guard.relay(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .max_headers(max_headers)
                    .serve_connection(TokioIo::new(socket), service);
                tokio::pin!(connection);
                // A client that goes away mid-answer is routine, not an error.
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stopping.changed() => {}
                }
                // Draining: the answer under way finishes, then the connection closes.
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            });
        }
        drop(listener);
        drop(open);
        guard.stopping.send_replace(Stop::Draining);
        tracing::info!(
            deadline_secs = deadline.as_secs(),
            "stream guard: refusing new connections, draining open streams"
        );
        if tokio::time::timeout(deadline, all_closed.recv()).await.is_err() {
            tracing::warn!("stream guard: ending the streams still open at the shutdown deadline");
            guard.stopping.send_replace(Stop::Cut);
            let _ = tokio::time::timeout(CUT_GRACE, all_closed.recv()).await;
        }
    }

    /// Resolves when streams must end now: the shutdown deadline has passed.
    fn cut(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut stopping = self.stopping.subscribe();
        Box::pin(async move {
            loop {
                let cut = *stopping.borrow_and_update() == Stop::Cut;
                if cut {
                    return;
                }
                if stopping.changed().await.is_err() {
                    // The guard is gone without a shutdown (a test's): nothing will cut.
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    async fn relay(&self, request: Request<Incoming>) -> Response<GuardedBody> {
        let (mut parts, body) = request.into_parts();
        if let Err(e) = self.intake(&mut parts.headers) {
            return error_response(e);
        }
        if let Some(chain) = parts.headers.remove(headers::CHAIN) {
            return self.relay_chain(parts, body, chain.as_bytes()).await;
        }
        let Some(cluster) = parts.headers.remove(headers::STREAM_CLUSTER) else {
            return error_response(GatewayError::stream_without_cluster());
        };
        parts.headers.insert(HeaderName::from_static(headers::CLUSTER), cluster);
        remove_hop_by_hop(&mut parts.headers);
        let (body, translation) = match parts.headers.remove(headers::STREAM_BACKEND) {
            None => (Either::Left(body), None),
            Some(profile) => {
                match rewrite(&mut parts, body, profile.as_bytes(), &self.keys, self.max_event_bytes).await {
                    Ok(rewritten) => rewritten,
                    Err(e) => return error_response(e),
                }
            }
        };
        if let Err(e) = self.point_upstream(&mut parts) {
            return error_response(e);
        }
        let request_id = parts.headers.get("x-request-id").cloned();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) if response.status().is_success() && stream_framing(response.headers()).is_none() => {
                not_a_stream(response.headers(), request_id)
            }
            Ok(response) => guard_response(self, response, None, translation, request_id).await,
            Err(e) => error_response(log_listener_unreachable(&e)),
        }
    }

    /// Checks a request's token, and drops what the inner listener must not see from it: the
    /// token, and `x-envoy-*` headers, which Envoy would obey from a caller it took as internal.
    fn intake(&self, request_headers: &mut HeaderMap) -> Result<(), GatewayError> {
        self.token.check(request_headers.get(headers::INTERNAL_TOKEN).map(HeaderValue::as_bytes))?;
        request_headers.remove(headers::INTERNAL_TOKEN);
        let envoys: Vec<HeaderName> =
            request_headers.keys().filter(|name| name.as_str().starts_with("x-envoy-")).cloned().collect();
        for name in envoys {
            request_headers.remove(name);
        }
        Ok(())
    }

    /// Points a request at Envoy's inner listener, keeping its path.
    fn point_upstream(&self, parts: &mut hyper::http::request::Parts) -> Result<(), GatewayError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(format!("http://{}{path}", self.upstream))
            .map_err(|_| GatewayError::invalid_request("The request path is not valid.".into()))?;
        Ok(())
    }

    /// A request for a model with fallbacks: its backends are tried in turn
    /// until one answers with something other than a retryable failure, or
    /// the chain or the retry budget runs out. Once an answer is relayed,
    /// nothing is retried: a stream that breaks ends with an error event.
    /// The budget counts requests and retries until their answer's headers
    /// are in: it bounds the extra attempts, not the streams they start.
    async fn relay_chain(
        &self,
        mut parts: hyper::http::request::Parts,
        body: Incoming,
        chain: &[u8],
    ) -> Response<GuardedBody> {
        let chain = match Chain::from_header(chain) {
            Ok(chain) if !chain.members.is_empty() => chain,
            Ok(_) => {
                return error_response(modelgate_dialects::call::log_misconfiguration(
                    &"a fallback chain without backends",
                ))
            }
            Err(e) => return error_response(modelgate_dialects::call::log_misconfiguration(&e)),
        };
        remove_hop_by_hop(&mut parts.headers);
        if let Err(e) = self.point_upstream(&mut parts) {
            return error_response(e);
        }
        let whole = match read_body(body).await {
            Ok(whole) => whole,
            Err(e) => return error_response(e),
        };
        let request_id = parts.headers.get("x-request-id").cloned();
        // Whole requests of a model with fallbacks come this way too: only a stream's answer must be one.
        let streamed = asks_for_stream(&whole);
        // A backend that cannot take this request (an endpoint or parameter its dialect lacks, a
        // key it cannot read) is left out: it is no attempt, and no failure of its hides another's.
        let mut prepared = Vec::with_capacity(chain.members.len());
        let mut unfit = None;
        for member in &chain.members {
            match prepare(&parts, &whole, member, &self.keys, self.max_event_bytes) {
                Ok(attempt) => prepared.push((member, attempt)),
                Err(e) => {
                    tracing::info!(request_id = ?request_id, backend = member.backend, reason = e.message, "failover: this backend cannot take the request");
                    unfit.get_or_insert(e);
                }
            }
        }
        let Some(last) = prepared.len().checked_sub(1) else {
            return error_response(
                unfit.unwrap_or_else(|| modelgate_dialects::call::log_misconfiguration(&"an empty fallback chain")),
            );
        };
        let _in_flight = self.budget.enter();
        let per_try = Duration::from_millis(chain.failover.per_try_timeout_ms);
        // One retry slot per request, taken at its first retry: a request is retrying or it is not.
        let mut retrying = None;
        for (index, (member, attempt)) in prepared.into_iter().enumerate() {
            let is_last = index == last;
            let outcome = self.send(attempt, (!is_last).then_some(per_try)).await;
            let mut may_retry = || {
                !is_last && {
                    if retrying.is_none() {
                        retrying = self
                            .budget
                            .try_retry(chain.failover.retry_budget_percent, chain.failover.min_retry_concurrency);
                    }
                    retrying.is_some()
                }
            };
            let answer = match outcome {
                Ok((response, translation)) => {
                    let status = response.status().as_u16();
                    if chain.retries_on(status) && may_retry() {
                        tracing::info!(request_id = ?request_id, backend = member.backend, status, "failover: trying the next backend");
                        continue;
                    }
                    // A stream counts as answered once its first bytes are in: a backend that
                    // sends its headers and dies before any event can still be left for the next.
                    let streams = response.status().is_success() && stream_framing(response.headers()).is_some();
                    if streamed && response.status().is_success() && !streams {
                        return served_by(not_a_stream(response.headers(), request_id), &member.backend, index + 1);
                    }
                    let (response, first) = if streams && !is_last {
                        match first_bytes(response, per_try).await {
                            Ok(started) => started,
                            Err(failed) => {
                                if may_retry() {
                                    tracing::info!(request_id = ?request_id, backend = member.backend, reason = failed.message, "failover: trying the next backend");
                                    continue;
                                }
                                return served_by(error_response(failed), &member.backend, index + 1);
                            }
                        }
                    } else {
                        (response, None)
                    };
                    guard_response(self, response, first, translation, request_id.clone()).await
                }
                Err(failed) => {
                    if may_retry() {
                        tracing::info!(request_id = ?request_id, backend = member.backend, reason = failed.message, "failover: trying the next backend");
                        continue;
                    }
                    error_response(failed)
                }
            };
            return served_by(answer, &member.backend, index + 1);
        }
        // Unreachable: the last attempt always answers; kept total for the type.
        error_response(modelgate_dialects::call::log_misconfiguration(&"a fallback chain ended without an answer"))
    }

    /// Sends one prepared attempt: its answer (headers in) and the answer's
    /// translation, or why it failed before answering. `per_try` bounds the
    /// wait for the answer's headers (for a whole answer, the whole answer);
    /// the last backend of a chain has none, as there is nothing to move on to.
    async fn send(
        &self,
        attempt: Attempt,
        per_try: Option<Duration>,
    ) -> Result<(Response<Incoming>, Option<Box<dyn ResponseTranslation>>), GatewayError> {
        let Attempt { request, translation } = attempt;
        let sent = self.client.request(request);
        let answered = match per_try {
            Some(per_try) => tokio::time::timeout(per_try, sent)
                .await
                .map_err(|_| GatewayError::no_answer_within(per_try.as_millis()))?,
            None => sent.await,
        };
        answered.map(|response| (response, translation)).map_err(|e| log_listener_unreachable(&e))
    }
}

/// The client relaying to Envoy's inner listener.
fn upstream_client(max_headers: usize) -> Client<HttpConnector, UpstreamBody> {
    let mut connector = HttpConnector::new();
    // Events are small writes: don't let Nagle hold them back.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).http1_max_headers(max_headers).build(connector)
}

/// A stream's answer once its first bytes are in (`None` for a stream that
/// ended at once), or why it failed before any: it broke, or sent nothing within `per_try`.
async fn first_bytes(
    response: Response<Incoming>,
    per_try: Duration,
) -> Result<(Response<Incoming>, Option<Bytes>), GatewayError> {
    let (parts, mut body) = response.into_parts();
    let first = match tokio::time::timeout(per_try, body.frame()).await {
        Ok(Some(Ok(frame))) => frame.into_data().ok(),
        Ok(None) => None,
        Ok(Some(Err(e))) => return Err(GatewayError::interrupted(&e)),
        Err(_) => return Err(GatewayError::no_stream_within(per_try.as_millis())),
    };
    Ok((Response::from_parts(parts, body), first))
}

/// One backend's request of a chain, ready to send, and its answer's translation.
struct Attempt {
    request: Request<UpstreamBody>,
    translation: Option<Box<dyn ResponseTranslation>>,
}

/// The request for `member`: the client's, to the member's cluster, rewritten for its backend.
fn prepare(
    parts: &hyper::http::request::Parts,
    whole: &Bytes,
    member: &Member,
    keys: &KeySources,
    max_event_bytes: usize,
) -> Result<Attempt, GatewayError> {
    let mut request = Request::builder().method(parts.method.clone()).uri(parts.uri.clone()).version(parts.version);
    if let Some(headers) = request.headers_mut() {
        headers.clone_from(&parts.headers);
    }
    let (mut parts, ()) =
        request.body(()).map_err(|e| modelgate_dialects::call::log_misconfiguration(&e))?.into_parts();
    let cluster = HeaderValue::try_from(member.cluster.as_str()).map_err(|_| unusable_header(headers::CLUSTER))?;
    parts.headers.insert(HeaderName::from_static(headers::CLUSTER), cluster);
    let (body, translation) = match &member.profile {
        Some(profile) => {
            let mut call = BackendCall::for_profile(profile.clone(), parts.uri.path().as_bytes(), None, keys)?;
            let body = apply_rewrite(&mut parts, &mut call, whole.clone())?;
            (body, call.response_translation(max_event_bytes))
        }
        None => (whole.clone(), None),
    };
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(Attempt { request: Request::from_parts(parts, Either::Right(Full::new(body))), translation })
}

/// Says on an answer which backend of a chain served it, after how many attempts.
fn served_by(mut answer: Response<GuardedBody>, backend: &str, attempts: usize) -> Response<GuardedBody> {
    if let Ok(backend) = HeaderValue::try_from(backend) {
        answer.headers_mut().insert(headers::SERVED_BY, backend);
    }
    answer.headers_mut().insert(headers::ATTEMPTS, HeaderValue::from(attempts));
    answer
}

/// Logs that Envoy's inner listener cannot be reached, and returns the guard's answer.
fn log_listener_unreachable(e: &dyn std::fmt::Display) -> GatewayError {
    tracing::warn!(error = %e, "stream guard: upstream listener unreachable");
    GatewayError::gateway_unavailable()
}

/// The most of a request body read to rewrite it. The filter has already
/// refused bodies over its `max_request_body_bytes`; this only bounds memory.
const MAX_REQUEST_BYTES: usize = 256 << 20;

/// Rewrites a request for its backend, as ext_proc would (body, path, key,
/// headers), and returns its body and its answer's translation.
async fn rewrite(
    parts: &mut hyper::http::request::Parts,
    body: Incoming,
    profile: &[u8],
    keys: &KeySources,
    max_event_bytes: usize,
) -> Result<(UpstreamBody, Option<Box<dyn ResponseTranslation>>), GatewayError> {
    let client_key = headers::CLIENT_KEYS.iter().find_map(|name| parts.headers.get(*name)).map(HeaderValue::as_bytes);
    let mut call = BackendCall::start(profile, parts.uri.path().as_bytes(), client_key, keys)?;
    let whole = read_body(body).await?;
    let body = apply_rewrite(parts, &mut call, whole)?;
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok((Either::Right(Full::new(body)), call.response_translation(max_event_bytes)))
}

/// A request body, whole.
async fn read_body(body: Incoming) -> Result<Bytes, GatewayError> {
    match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(GatewayError::invalid_request(format!("The request body could not be read ({e})."))),
    }
}

/// The backend's request for the client's body `whole`: `parts` changed as
/// the call says (path, key, headers), and the body to send.
fn apply_rewrite(
    parts: &mut hyper::http::request::Parts,
    call: &mut BackendCall,
    whole: Bytes,
) -> Result<Bytes, GatewayError> {
    let upstream = call.request(&whole)?;
    for name in upstream.headers.remove {
        parts.headers.remove(name);
    }
    for (name, value) in upstream.headers.set {
        if name == ":path" {
            let path = parts.uri.authority().map_or(value.clone(), |authority| format!("http://{authority}{value}"));
            parts.uri = Uri::try_from(path).map_err(|_| unusable_header(name))?;
        } else {
            let value = HeaderValue::try_from(value).map_err(|_| unusable_header(name))?;
            parts.headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(upstream.body.map_or(whole, Bytes::from))
}

/// A header for the backend that HTTP cannot carry (a key file with a line break inside, say).
fn unusable_header(name: &str) -> GatewayError {
    modelgate_dialects::call::log_misconfiguration(&format!(
        "the rewritten {name} header is not a valid HTTP header value"
    ))
}

/// Headers about one connection, which a relay must not pass on.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    for name in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
}

/// The framing of a streamed answer: server-sent events, or Ollama's NDJSON.
fn stream_framing(headers: &HeaderMap) -> Option<Framing> {
    let content_type = headers.get(CONTENT_TYPE)?.to_str().ok()?.trim_start().to_ascii_lowercase();
    if content_type.starts_with("text/event-stream") {
        Some(Framing::Sse)
    } else if content_type.starts_with("application/x-ndjson") {
        Some(Framing::Ndjson)
    } else {
        None
    }
}

/// The answer as the client gets it: a stream event by event (translated if
/// asked), a whole answer to translate read first, anything else as it is.
/// `first` is the start of the body, already read from `response`.
async fn guard_response(
    guard: &StreamGuard,
    response: Response<Incoming>,
    first: Option<Bytes>,
    mut translation: Option<Box<dyn ResponseTranslation>>,
    request_id: Option<HeaderValue>,
) -> Response<GuardedBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let framing = stream_framing(&parts.headers).filter(|_| parts.status.is_success());
    if let Some(translation) = &mut translation {
        let status = parts.status.as_u16();
        let plan = translation.plan(status, parts.headers.get(CONTENT_TYPE).map_or(b"", |c| c.as_bytes()));
        parts.status = StatusCode::from_u16(plan.status).unwrap_or(parts.status);
        if let Some(content_type) = plan.content_type {
            parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        if !plan.streamed {
            return translate_whole(parts, body, status, translation.as_mut()).await;
        }
    }
    let events = framing.map(|framing| {
        // The guard may add an event, so the length is no longer known.
        parts.headers.remove(CONTENT_LENGTH);
        CompleteEvents::new(framing, guard.max_event_bytes)
    });
    let translation = translation.filter(|_| events.is_some());
    let cut = events.as_ref().map(|_| guard.cut());
    let body = GuardedBody { state: State::Relaying(body), first, events, translation, request_id, cut };
    Response::from_parts(parts, body)
}

/// A stream's answer for a success that is not a stream (a whole answer, an
/// empty body): an event stream of one error event, as for a broken stream.
/// Whether a client's JSON body asks for a stream (`"stream": true`).
fn asks_for_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: bool,
    }
    serde_json::from_slice::<Stream>(body).is_ok_and(|b| b.stream)
}

fn not_a_stream(headers: &HeaderMap, request_id: Option<HeaderValue>) -> Response<GuardedBody> {
    let content_type = headers.get(CONTENT_TYPE).map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned());
    tracing::warn!(request_id = ?request_id, content_type, "stream guard: the backend answered a stream without one");
    let what = match content_type {
        Some(content_type) => format!("a success of type `{content_type}` where a stream of events was asked for"),
        None => "a success without content where a stream of events was asked for".to_string(),
    };
    let event = error_event(&GatewayError::bad_answer(&what));
    let mut response = Response::new(GuardedBody::last(Bytes::from(event)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// The most of a whole answer read to translate it; answers to streaming
/// requests that do not stream are errors, far smaller than this.
const MAX_WHOLE_ANSWER_BYTES: usize = 16 << 20;

/// A whole answer (an error, or a backend that ignored `stream`), read and translated.
async fn translate_whole(
    mut parts: hyper::http::response::Parts,
    body: Incoming,
    status: u16,
    translation: &mut dyn ResponseTranslation,
) -> Response<GuardedBody> {
    let whole = match Limited::new(body, MAX_WHOLE_ANSWER_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "stream guard: the backend's answer could not be read");
            return error_response(GatewayError::interrupted(&e));
        }
    };
    let body = Bytes::from(translation.whole(status, &whole));
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, GuardedBody::last(body))
}

fn error_response(error: GatewayError) -> Response<GuardedBody> {
    let mut response = Response::new(GuardedBody::last(Bytes::from(error.to_json())));
    *response.status_mut() = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((name, value)) = retry_header(error.should_retry()) {
        response.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A relayed answer's body. Event streams go on whole events at a time and
/// end with an error event if the upstream breaks, an event is too long or the
/// shutdown deadline passes; other bodies pass as they are.
pub struct GuardedBody {
    state: State,
    /// The start of the upstream body, read before the answer was relayed (a fallback chain's check that its stream began).
    first: Option<Bytes>,
    events: Option<CompleteEvents>,
    /// Turns the stream's whole events into OpenAI's, when the backend speaks another dialect.
    translation: Option<Box<dyn ResponseTranslation>>,
    request_id: Option<HeaderValue>,
    /// A stream's end at the shutdown deadline.
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl GuardedBody {
    /// A body of these bytes only.
    fn last(bytes: Bytes) -> Self {
        GuardedBody {
            state: State::Last(bytes),
            first: None,
            events: None,
            translation: None,
            request_id: None,
            cut: None,
        }
    }

    /// Ends a stream early: `complete` (whole events) goes on, then the error
    /// event, in OpenAI's dialect whatever the backend's (a translation's
    /// output is OpenAI's), or in the stream's own framing when relayed as it is.
    fn end_with(&mut self, complete: Bytes, error: &GatewayError) {
        tracing::warn!(request_id = ?self.request_id, reason = error.message, "stream guard: ending a stream early");
        let last = match (&mut self.translation, &mut self.events) {
            (Some(translation), _) => [translation.stream(&complete, false), error_event(error)].concat(),
            (None, Some(events)) => [&complete[..], &events.interrupt(error)].concat(),
            (None, None) => complete.to_vec(),
        };
        self.state = State::Last(Bytes::from(last));
    }
}

/// `events` in OpenAI's dialect; `end` on the stream's last events.
fn translated(translation: &mut Option<Box<dyn ResponseTranslation>>, events: Bytes, end: bool) -> Bytes {
    match translation {
        Some(translation) => Bytes::from(translation.stream(&events, end)),
        None => events,
    }
}

enum State {
    Relaying(Incoming),
    /// One last piece to send, then the end.
    Last(Bytes),
    Done,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if !matches!(this.state, State::Relaying(_)) {
                return Poll::Ready(match std::mem::replace(&mut this.state, State::Done) {
                    State::Last(last) if !last.is_empty() => Some(Ok(Frame::data(last))),
                    _ => None,
                });
            }
            if this.cut.as_mut().is_some_and(|cut| cut.as_mut().poll(cx).is_ready()) {
                this.cut = None;
                this.end_with(Bytes::new(), &GatewayError::shutting_down());
                continue;
            }
            let State::Relaying(upstream) = &mut this.state else { continue };
            let frame = match this.first.take() {
                Some(first) => Some(Ok(Frame::data(first))),
                None => ready!(Pin::new(upstream).poll_frame(cx)),
            };
            let Some(events) = &mut this.events else {
                return Poll::Ready(frame);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match events.push(data) {
                        Ok(complete) => {
                            let complete = translated(&mut this.translation, complete, false);
                            if !complete.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(complete))));
                            }
                        }
                        Err(long) => {
                            let error = GatewayError::stream_event_too_large(events.max_event_bytes());
                            this.end_with(long.complete, &error);
                        }
                    },
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => this.end_with(Bytes::new(), &GatewayError::interrupted(&e)),
                None => this.state = State::Last(translated(&mut this.translation, events.finish(), true)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.events) {
            (State::Relaying(upstream), None) if self.first.is_none() => upstream.size_hint(),
            (State::Last(last), _) => SizeHint::with_exact(last.len() as u64),
            (State::Done, _) => SizeHint::with_exact(0),
            (State::Relaying(_), _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot upstream that reads a request (head, and body by its
    /// content-length) and writes `response` raw, then closes. The request
    /// it read comes back on the receiver.
    async fn upstream_answering(response: &'static [u8]) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let complete = |r: &[u8]| {
                let text = String::from_utf8_lossy(r);
                let Some(end) = text.find("\r\n\r\n") else { return false };
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.parse().unwrap()))
                    .unwrap_or(0usize);
                r.len() >= end + 4 + length
            };
            while !complete(&request) {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8(request).unwrap());
            socket.write_all(response).await.unwrap();
        });
        (addr, rx)
    }

    async fn upstream_writing(response: &'static [u8]) -> SocketAddr {
        upstream_answering(response).await.0
    }

    /// What a client of the guard receives, raw, for a request relayed to `upstream`.
    async fn through_guard(upstream: SocketAddr, cluster_header: bool) -> String {
        let cluster = if cluster_header { "x-modelgate-stream-cluster: pool\r\n" } else { "" };
        request_through_guard(upstream, cluster, "").await
    }

    /// The same for a POST with these extra header lines and this body.
    async fn request_through_guard(upstream: SocketAddr, extra_headers: &str, body: &str) -> String {
        request_through(StreamGuard::new(upstream), extra_headers, body).await
    }

    /// The same, through a guard configured as given.
    async fn request_through(guard: StreamGuard, extra_headers: &str, body: &str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let guard_addr = listener.local_addr().unwrap();
        tokio::spawn(guard.serve(listener));
        let mut client = tokio::net::TcpStream::connect(guard_addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn a_stream_cut_inside_an_event_ends_with_the_error_event_and_a_clean_end() {
        let cut = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "17\r\ndata: 1\n\ndata: {\"choi\r\n"
        );
        let answer = through_guard(upstream_writing(cut.as_bytes()).await, true).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("data: 1\n\n"), "{answer}");
        assert!(!answer.contains("choi"), "half an event was passed on: {answer}");
        assert!(answer.contains(r#"data: {"error":{"message":"The backend stopped in the middle of this stream"#));
        assert!(answer.contains(r#""type":"server_error","param":null,"code":"stream_interrupted"}}"#));
        assert!(answer.ends_with("\n\n\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
    }

    #[tokio::test]
    async fn an_event_over_the_limit_ends_the_stream_with_the_error_event() {
        let mut long =
            String::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
        for chunk in ["data: 1\n\n", "data: 0123456789012345678901234", "56789\n\ndata: [DONE]\n\n", ""] {
            long += &format!("{:x}\r\n{chunk}\r\n", chunk.len());
        }
        let upstream = upstream_writing(Box::leak(long.into_boxed_str()).as_bytes()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let guard_addr = listener.local_addr().unwrap();
        tokio::spawn(StreamGuard::new(upstream).with_max_event_bytes(16).serve(listener));
        let answer = client_of(guard_addr).await.read_all().await;
        assert!(answer.contains("data: 1\n\n"), "{answer}");
        assert!(!answer.contains("0123") && !answer.contains("[DONE]"), "a piece of the long event went on: {answer}");
        assert!(answer.contains(r#""code":"stream_event_too_large"}}"#), "{answer}");
        assert!(answer.ends_with("\n\n\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
    }

    /// A client of the guard at `guard_addr` that has sent a stream request.
    async fn client_of(guard_addr: SocketAddr) -> Client {
        let mut socket = tokio::net::TcpStream::connect(guard_addr).await.unwrap();
        let request = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-modelgate-stream-cluster: pool\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        socket.write_all(request.as_bytes()).await.unwrap();
        Client { socket, received: Vec::new() }
    }

    struct Client {
        socket: tokio::net::TcpStream,
        received: Vec<u8>,
    }

    impl Client {
        /// Reads until `text` has arrived.
        async fn read_until(&mut self, text: &str) {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&self.received).contains(text) {
                let n = self.socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before {text:?}: {}", String::from_utf8_lossy(&self.received));
                self.received.extend_from_slice(&buf[..n]);
            }
        }

        /// Everything the guard sent, up to its end of the connection.
        async fn read_all(mut self) -> String {
            self.socket.read_to_end(&mut self.received).await.unwrap();
            String::from_utf8(self.received).unwrap()
        }
    }

    /// An upstream that answers one request with a stream's head and `first`
    /// event, then the rest when it is sent, or nothing more if it never is.
    async fn upstream_streaming(first: &'static str) -> (SocketAddr, tokio::sync::oneshot::Sender<&'static str>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (rest_tx, rest) = tokio::sync::oneshot::channel::<&'static str>();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            socket.write_all(format!("{head}{:x}\r\n{first}\r\n", first.len()).as_bytes()).await.unwrap();
            match rest.await {
                Ok(rest) => {
                    socket.write_all(format!("{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len()).as_bytes()).await.unwrap()
                }
                // Never finishes: holds the connection until the guard lets go of it.
                Err(_) => while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {},
            }
        });
        (addr, rest_tx)
    }

    /// A guard that serves until the sender fires, then drains for `deadline`.
    async fn guard_until(
        upstream: SocketAddr,
        deadline: Duration,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(StreamGuard::new(upstream).serve_until(
            listener,
            async move {
                let _ = stopped.await;
            },
            deadline,
        ));
        (addr, stop, serving)
    }

    /// True once nothing accepts connections at `addr` (the guard lets go of its listener soon after the signal).
    async fn refuses_connections(addr: SocketAddr) -> bool {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn on_shutdown_an_open_stream_finishes_within_the_deadline_and_new_connections_are_refused() {
        let (upstream, rest) = upstream_streaming("data: 1\n\n").await;
        let (guard_addr, stop, serving) = guard_until(upstream, Duration::from_secs(60)).await;
        let mut client = client_of(guard_addr).await;
        client.read_until("data: 1\n\n").await;
        stop.send(()).unwrap();
        assert!(refuses_connections(guard_addr).await, "the guard still accepts connections while draining");
        rest.send("data: 2\n\ndata: [DONE]\n\n").unwrap();
        let answer = client.read_all().await;
        assert!(answer.contains("data: 2\n\ndata: [DONE]\n\n") && !answer.contains("error"), "{answer:?}");
        assert!(answer.ends_with("\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
        // Once its last stream is done the guard stops, long before the deadline.
        tokio::time::timeout(Duration::from_secs(30), serving).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stream_still_open_at_the_shutdown_deadline_ends_with_the_error_event() {
        let (upstream, _never) = upstream_streaming("data: 1\n\ndata: {\"half").await;
        let (guard_addr, stop, serving) = guard_until(upstream, Duration::from_millis(200)).await;
        let mut client = client_of(guard_addr).await;
        client.read_until("data: 1\n\n").await;
        stop.send(()).unwrap();
        let answer = client.read_all().await;
        assert!(!answer.contains("half"), "{answer}");
        assert!(answer.contains(r#"data: {"error":{"message":"The gateway is shutting down"#), "{answer}");
        assert!(answer.contains(r#""code":"stream_interrupted"}}"#), "{answer}");
        assert!(answer.ends_with("\n\n\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_complete_stream_passes_unchanged() {
        let whole = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "17\r\ndata: 1\n\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        );
        let answer = through_guard(upstream_writing(whole.as_bytes()).await, true).await;
        assert!(answer.contains("data: 1\n\ndata: [DONE]\n\n"), "{answer}");
        assert!(!answer.contains("error"), "{answer}");
    }

    #[tokio::test]
    async fn a_success_that_is_not_a_stream_becomes_an_error_event() {
        let whole = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let answer = through_guard(upstream_writing(whole.as_bytes()).await, true).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && answer.contains("content-type: text/event-stream"),
            "{answer}"
        );
        assert!(answer
            .contains(r#"data: {"error":{"message":"The backend answered with a success of type `application/json`"#));
        assert!(answer.contains(r#""code":"bad_backend_answer"}}"#) && !answer.ends_with("{}"), "{answer}");
    }

    #[tokio::test]
    async fn a_request_with_more_headers_than_hyper_takes_by_default_is_relayed() {
        let (upstream, received) = upstream_answering(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 14\r\n\r\ndata: [DONE]\n\n",
        )
        .await;
        let headers: String = (0..150).map(|i| format!("x-extra-{i}: 1\r\n")).collect();
        let answer =
            request_through_guard(upstream, &format!("x-modelgate-stream-cluster: pool\r\n{headers}"), "").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(received.await.unwrap().contains("x-extra-149: 1"));
    }

    #[tokio::test]
    async fn errors_and_other_answers_pass_as_they_are() {
        let error = "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\n{}";
        let answer = through_guard(upstream_writing(error.as_bytes()).await, true).await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains("retry-after: 3") && answer.contains("content-length: 2") && answer.ends_with("{}"));
    }

    #[tokio::test]
    async fn the_guards_own_failures_are_openai_errors() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let answer = through_guard(closed, true).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("x-should-retry: true") && answer.contains(r#""code":"gateway_unavailable""#));

        let answer = through_guard(closed, false).await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains(r#""code":"gateway_misconfigured""#), "{answer}");
    }

    /// An upstream that answers each request (one a connection) with the
    /// response given for its `x-modelgate-cluster`, and keeps the requests.
    async fn upstream_by_cluster(
        answers: &'static [(&'static str, &'static str)],
    ) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&request).contains("\r\n\r\n{") || !request.ends_with(b"}") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8(request).unwrap();
                let cluster =
                    text.lines().find_map(|l| l.strip_prefix("x-modelgate-cluster: ")).unwrap_or("").to_string();
                kept.lock().unwrap().push(text);
                let response = answers.iter().find(|(c, _)| *c == cluster).map_or("", |(_, r)| r);
                let _ = socket.write_all(response.as_bytes()).await;
            }
        });
        (addr, seen)
    }

    const CHAIN: &str = concat!(
        r#"x-modelgate-chain: {"members":[{"backend":"a","cluster":"ca","profile":{"model":"m-a"}},"#,
        r#"{"backend":"b","cluster":"cb","profile":{"model":"m-b"}},{"backend":"c","cluster":"cc","profile":null}],"#,
        r#""failover":{"per_try_timeout_ms":500,"retry_on_status":[429,503],"retry_budget_percent":20,"min_retry_concurrency":10}}"#,
        "\r\n"
    );
    const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy";
    const ANSWERED: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";

    #[tokio::test]
    async fn a_chain_moves_on_from_a_retryable_failure_rewriting_each_attempt_for_its_backend() {
        let (upstream, seen) = upstream_by_cluster(&[("ca", UNAVAILABLE), ("cb", ANSWERED)]).await;
        let answer = request_through_guard(upstream, CHAIN, r#"{"model":"chained"}"#).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("modelgate-backend: b") && answer.contains("modelgate-attempts: 2"), "{answer}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].ends_with(r#"{"model":"m-a"}"#) && seen[1].ends_with(r#"{"model":"m-b"}"#), "{seen:?}");
        assert!(seen.iter().all(|r| !r.contains("x-modelgate-chain")), "the chain never reaches a backend");
    }

    #[tokio::test]
    async fn a_stream_that_dies_before_its_first_bytes_is_left_for_the_next_backend() {
        const DIES: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        const STREAMS: &str = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "17\r\ndata: 1\n\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        );
        let (upstream, seen) = upstream_by_cluster(&[("ca", DIES), ("cb", STREAMS)]).await;
        let answer = request_through_guard(upstream, CHAIN, r#"{"model":"chained"}"#).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("modelgate-backend: b") && answer.contains("modelgate-attempts: 2"), "{answer}");
        assert!(answer.contains("data: 1\n\ndata: [DONE]\n\n") && !answer.contains("error"), "{answer}");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_last_failure_is_answered_and_the_last_backend_has_no_per_try_timeout() {
        let (upstream, seen) =
            upstream_by_cluster(&[("ca", UNAVAILABLE), ("cb", UNAVAILABLE), ("cc", UNAVAILABLE)]).await;
        let answer = request_through_guard(upstream, CHAIN, r#"{"model":"chained"}"#).await;
        assert!(answer.starts_with("HTTP/1.1 503") && answer.ends_with("busy"), "{answer}");
        assert!(answer.contains("modelgate-backend: c") && answer.contains("modelgate-attempts: 3"), "{answer}");
        // The last backend passes the client's body untouched.
        assert!(seen.lock().unwrap()[2].ends_with(r#"{"model":"chained"}"#));

        // A backend that closes the connection without answering is left for the next.
        let (upstream, _) = upstream_by_cluster(&[("cb", ANSWERED)]).await;
        let answer = request_through_guard(upstream, CHAIN, r#"{"model":"chained"}"#).await;
        assert!(answer.contains("modelgate-backend: b") && answer.contains("modelgate-attempts: 2"), "{answer}");
    }

    #[tokio::test]
    async fn a_backend_silent_past_its_per_try_timeout_is_a_504_the_sdks_may_retry() {
        // An upstream that takes requests and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        // No retry budget: the first backend's timeout is the answer.
        let chain = concat!(
            r#"x-modelgate-chain: {"members":[{"backend":"a","cluster":"ca","profile":null},"#,
            r#"{"backend":"b","cluster":"cb","profile":null}],"failover":{"per_try_timeout_ms":50,"#,
            r#""retry_on_status":[503],"retry_budget_percent":0,"min_retry_concurrency":0}}"#,
            "\r\n"
        );
        let answer = request_through_guard(upstream, chain, r#"{"model":"chained"}"#).await;
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        assert!(answer.contains("x-should-retry: true") && answer.contains(r#""code":"backend_timeout""#), "{answer}");
    }

    /// The headers of a stream to an Anthropic backend, which the guard rewrites and translates.
    const ANTHROPIC: &str = "x-modelgate-stream-cluster: anthropic\r\nx-modelgate-stream-backend: {\"dialect\":\"anthropic\",\"model\":\"claude-x\",\"api_key\":\"passthrough\"}\r\nauthorization: Bearer sk-client\r\n";

    const CHAT: &str = r#"{"model":"claude","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

    #[tokio::test]
    async fn a_stream_in_another_dialect_is_translated_event_by_event() {
        let events = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
            events.len()
        );
        let (upstream, received) = upstream_answering(Box::leak(response.into_boxed_str()).as_bytes()).await;
        let answer = request_through_guard(upstream, ANTHROPIC, CHAT).await;
        let received = received.await.unwrap();
        assert!(received.starts_with("POST /v1/messages HTTP/1.1"), "{received}");
        assert!(received.contains("x-api-key: sk-client") && received.contains("anthropic-version: 2023-06-01"));
        assert!(!received.contains("authorization") && !received.contains("x-modelgate-stream-backend"), "{received}");
        assert!(received.contains("x-modelgate-cluster: anthropic"), "{received}");
        assert!(received.ends_with(r#""max_tokens":4096,"messages":[{"content":[{"text":"hi","type":"text"}],"role":"user"}],"model":"claude-x","stream":true}"#), "{received}");
        assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.contains("transfer-encoding: chunked"), "{answer}");
        assert!(!answer.contains("message_start"), "{answer}");
        assert!(answer.contains(r#""object":"chat.completion.chunk""#), "{answer}");
        assert!(answer.contains(r#""delta":{"content":"Hi"}"#), "{answer}");
        assert!(answer.contains(r#""finish_reason":"stop""#), "{answer}");
        assert!(answer.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_translated_stream_cut_midway_ends_with_the_openai_error_event() {
        let cut = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "21\r\nevent: message_start\ndata: {\"type\r\n"
        );
        let answer = request_through_guard(upstream_writing(cut.as_bytes()).await, ANTHROPIC, CHAT).await;
        let error = r#"data: {"error":{"message":"The backend stopped in the middle of this stream"#;
        assert!(answer.contains(error), "{answer}");
        assert!(!answer.contains("[DONE]") && !answer.contains("message_start"), "{answer}");
        assert!(answer.ends_with("\n\n\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
    }

    #[tokio::test]
    async fn a_whole_error_in_another_dialect_becomes_openais_with_its_status_and_length() {
        let overloaded = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let response = format!(
            "HTTP/1.1 529 Overloaded\r\ncontent-type: application/json\r\nretry-after: 2\r\ncontent-length: {}\r\n\r\n{overloaded}",
            overloaded.len()
        );
        let upstream = upstream_writing(Box::leak(response.into_boxed_str()).as_bytes()).await;
        let answer = request_through_guard(upstream, ANTHROPIC, CHAT).await;
        let expected = r#"{"error":{"message":"Overloaded","type":"server_error","param":null,"code":"overloaded"}}"#;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 2") && answer.contains(&format!("content-length: {}", expected.len())));
        assert!(answer.ends_with(expected), "{answer}");
    }

    #[tokio::test]
    async fn a_request_the_backend_cannot_honour_is_refused_without_calling_it() {
        let never = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let answer = request_through_guard(never, ANTHROPIC, r#"{"model":"c","messages":[],"n":3}"#).await;
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("x-should-retry: false"), "{answer}");
        assert!(answer.contains(r#""param":"n","code":"unsupported_parameter""#), "{answer}");
        let broken = "x-modelgate-stream-cluster: x\r\nx-modelgate-stream-backend: {\"dialect\":\"klingon\"}\r\n";
        let answer = request_through_guard(never, broken, CHAT).await;
        assert!(answer.starts_with("HTTP/1.1 500") && answer.contains(r#""code":"gateway_misconfigured""#), "{answer}");
    }

    const STREAMED: &str =
        concat!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 14\r\n\r\n", "data: [DONE]\n\n");

    #[tokio::test]
    async fn with_a_token_only_callers_presenting_it_are_relayed_and_the_token_goes_no_further() {
        let never = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let guard = || StreamGuard::new(never).with_token(InternalToken::new("tok"));
        for presented in ["", "x-modelgate-internal-token: wrong\r\n", "x-modelgate-internal-token: tok2\r\n"] {
            let headers = format!("x-modelgate-stream-cluster: pool\r\n{presented}");
            let answer = request_through(guard(), &headers, "{}").await;
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            assert!(answer.contains(r#""type":"invalid_request_error","param":null,"code":"invalid_internal_token""#));
        }
        let (upstream, received) = upstream_answering(STREAMED.as_bytes()).await;
        let guard = StreamGuard::new(upstream).with_token(InternalToken::new("tok"));
        let headers = "x-modelgate-stream-cluster: pool\r\nx-modelgate-internal-token: tok\r\n";
        let answer = request_through(guard, headers, "{}").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!received.await.unwrap().contains("x-modelgate-internal-token"));
    }

    #[tokio::test]
    async fn a_clients_envoy_headers_never_reach_the_inner_listener() {
        let (upstream, received) = upstream_answering(STREAMED.as_bytes()).await;
        let headers = concat!(
            "x-modelgate-stream-cluster: pool\r\n",
            "x-envoy-retry-on: 5xx\r\nx-envoy-max-retries: 5\r\nX-Envoy-Upstream-Rq-Timeout-Ms: 1\r\n",
            "x-envoy-hedge-on-per-try-timeout: true\r\nx-envoy-upstream-rq-per-try-timeout-ms: 1\r\n",
            "x-sim-ttft-ms: 5\r\n"
        );
        let answer = request_through_guard(upstream, headers, "{}").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let received = received.await.unwrap().to_ascii_lowercase();
        assert!(!received.contains("x-envoy-"), "{received}");
        assert!(received.contains("x-sim-ttft-ms: 5") && received.contains("x-modelgate-cluster: pool"), "{received}");
    }

    #[tokio::test]
    async fn a_key_source_the_guard_was_not_given_is_refused_without_calling_the_backend() {
        let never = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let naming = |source: &str| {
            format!("x-modelgate-stream-cluster: pool\r\nx-modelgate-stream-backend: {{\"api_key\":{source}}}\r\n")
        };
        for source in [r#"{"env":"HOME"}"#, r#"{"file":"/etc/hostname"}"#] {
            let guard = StreamGuard::new(never).with_keys(KeySources::new(vec!["OTHER".into()], &[]).unwrap());
            let answer = request_through(guard, &naming(source), CHAT).await;
            assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
            assert!(answer.contains(r#""code":"backend_key_unavailable""#), "{answer}");
        }
        // The same source, allowed, is read and sent.
        let (upstream, received) = upstream_answering(STREAMED.as_bytes()).await;
        let guard = StreamGuard::new(upstream).with_keys(KeySources::new(vec!["HOME".into()], &[]).unwrap());
        let answer = request_through(guard, &naming(r#"{"env":"HOME"}"#), CHAT).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let home = std::env::var("HOME").unwrap();
        assert!(received.await.unwrap().contains(&format!("authorization: Bearer {}", home.trim())));
    }
}
