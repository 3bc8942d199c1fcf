//! The stream guard: an HTTP relay that ends every broken stream with an
//! OpenAI error event instead of a dropped connection.
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
//! The guard's own answers (its upstream unreachable, a request without a
//! target cluster) are OpenAI errors too; every other answer passes untouched.

use crate::sse::{CompleteEvents, DEFAULT_MAX_EVENT_BYTES};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::net::TcpListener;

/// Relays requests to one upstream (Envoy's inner listener).
pub struct StreamGuard {
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
}

impl StreamGuard {
    pub fn new(upstream: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        // Events are small writes: don't let Nagle hold them back.
        connector.set_nodelay(true);
        StreamGuard { client: Client::builder(TokioExecutor::new()).build(connector), upstream }
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        let guard = Arc::new(self);
        loop {
            let (socket, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "stream guard: accept failed");
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let guard = Arc::clone(&guard);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let guard = Arc::clone(&guard);
                    async move { Ok::<_, Infallible>(guard.relay(request).await) }
                });
                // A client that goes away mid-answer is routine, not an error.
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(socket), service).await;
            });
        }
    }

    async fn relay(&self, request: Request<Incoming>) -> Response<GuardedBody> {
        let (mut parts, body) = request.into_parts();
        let Some(cluster) = parts.headers.remove(headers::STREAM_CLUSTER) else {
            return error_response(GatewayError::new(
                500,
                "server_error",
                "The gateway routed a stream without naming its backend; check the filter's stream_guard_cluster setting."
                    .into(),
                None,
                Some("gateway_misconfigured"),
            ));
        };
        parts.headers.insert(HeaderName::from_static(headers::CLUSTER), cluster);
        remove_hop_by_hop(&mut parts.headers);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match Uri::try_from(format!("http://{}{path}", self.upstream)) {
            Ok(uri) => uri,
            Err(_) => {
                return error_response(GatewayError::invalid_request(
                    "The request path is not valid.".into(),
                    None,
                    None,
                ))
            }
        };
        let request_id = parts.headers.get("x-request-id").cloned();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => guard_response(response, request_id),
            Err(e) => {
                tracing::warn!(error = %e, "stream guard: upstream listener unreachable");
                error_response(GatewayError::new(
                    503,
                    "server_error",
                    "The gateway could not reach its routing listener; try again.".into(),
                    None,
                    Some("gateway_unavailable"),
                ))
            }
        }
    }
}

/// Headers about one connection, which a relay must not pass on.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    for name in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

fn guard_response(response: Response<Incoming>, request_id: Option<HeaderValue>) -> Response<GuardedBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let events = (parts.status.is_success() && is_event_stream(&parts.headers)).then(|| {
        // The guard may add an event, so the length is no longer known.
        parts.headers.remove(CONTENT_LENGTH);
        CompleteEvents::new(DEFAULT_MAX_EVENT_BYTES)
    });
    let body = GuardedBody { state: State::Relaying(body), events, request_id };
    Response::from_parts(parts, body)
}

fn error_response(error: GatewayError) -> Response<GuardedBody> {
    let mut response =
        Response::new(GuardedBody { state: State::Last(Bytes::from(error.to_json())), events: None, request_id: None });
    *response.status_mut() = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The error event that ends a stream the backend broke off.
pub fn interruption(reason: &dyn std::fmt::Display) -> GatewayError {
    GatewayError::new(
        502,
        "server_error",
        format!("The backend stopped in the middle of this stream ({reason}); the response is incomplete."),
        None,
        Some("stream_interrupted"),
    )
}

/// A relayed answer's body. Event streams go on whole events at a time and
/// end with an error event if the upstream breaks; other bodies pass as they are.
pub struct GuardedBody {
    state: State,
    events: Option<CompleteEvents>,
    request_id: Option<HeaderValue>,
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
            let State::Relaying(upstream) = &mut this.state else {
                return Poll::Ready(match std::mem::replace(&mut this.state, State::Done) {
                    State::Last(last) if !last.is_empty() => Some(Ok(Frame::data(last))),
                    _ => None,
                });
            };
            let frame = ready!(Pin::new(upstream).poll_frame(cx));
            let Some(events) = &mut this.events else {
                return Poll::Ready(frame);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let complete = events.push(data);
                        if !complete.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(complete))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => {
                    tracing::warn!(request_id = ?this.request_id, error = %e, "stream interrupted by the backend");
                    this.state = State::Last(events.interrupt(&interruption(&e)));
                }
                None => this.state = State::Last(events.finish()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.events) {
            (State::Relaying(upstream), None) => upstream.size_hint(),
            (State::Last(last), _) => SizeHint::with_exact(last.len() as u64),
            (State::Done, _) => SizeHint::with_exact(0),
            (State::Relaying(_), Some(_)) => SizeHint::default(),
        }
    }
}
