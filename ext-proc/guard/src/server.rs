//! The guard's server: [`StreamGuard`], its accept loop, and its drain on shutdown.

use crate::guarded_body::GuardedBody;
use crate::retry_budget::RetryBudget;
use crate::upstream::{upstream_client, Upstream, UpstreamBody};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use modelgate_dialects::credentials::KeySources;
use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
use modelgate_runtime::health;
use modelgate_runtime::internal_token::InternalToken;
use modelgate_runtime::process::Shutdown;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The default of `--max-headers`: the most headers a request or an answer
/// may have. Above Envoy's `max_headers_count` on the OpenAI listener (100,
/// Envoy's default), with room for the headers the gateway adds on the way,
/// so every request Envoy lets in is relayed.
pub const DEFAULT_MAX_HEADERS: usize = 200;

/// The most bytes of headers a request over HTTP/2 may have: about what the
/// HTTP/1 side reads (hyper's read buffer), far above Envoy's default limit
/// on a request's headers (60 KiB), so every request Envoy lets in is relayed.
const MAX_HTTP2_HEADER_BYTES: u32 = 400 * 1024;

/// Relays requests to one upstream (Envoy's inner listener).
pub struct StreamGuard {
    pub(crate) client: Client<HttpConnector, UpstreamBody>,
    pub(crate) upstream: Upstream,
    /// Bounds the retries of fallback chains.
    pub(crate) budget: RetryBudget,
    /// The key sources the guard may read; none unless given.
    pub(crate) keys: KeySources,
    /// What callers must present; nothing unless given.
    pub(crate) token: InternalToken,
    /// The most headers a relayed request or answer may have.
    max_headers: usize,
    /// The most of one unfinished event (or NDJSON line) held; an event that outgrows it ends the stream.
    pub(crate) max_event_bytes: usize,
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
    pub fn new(upstream: impl Into<Upstream>) -> Self {
        StreamGuard {
            client: upstream_client(DEFAULT_MAX_HEADERS),
            upstream: upstream.into(),
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
        self.serve_until(listener, Shutdown::never(), Duration::MAX).await;
    }

    /// Serves until `shutdown` is asked for, then drains: new connections are
    /// refused, each open connection closes once its answer is done, and
    /// streams still open after `deadline` end with an error event.
    pub async fn serve_until(self, listener: TcpListener, shutdown: Shutdown, deadline: Duration) {
        let guard = Arc::new(self);
        // Each connection holds a sender; all of them gone means all connections closed.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        let serving = {
            let guard = Arc::clone(&guard);
            let all_closed = &mut all_closed;
            let asked = shutdown.asked();
            let probed = shutdown.clone();
            async move {
                tokio::pin!(asked);
                loop {
                    let accepted = tokio::select! {
                        () = &mut asked => break,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted {
                        Ok((socket, _)) => guard.serve_connection(socket, open.clone(), probed.clone()),
                        Err(e) => tracing::warn!(error = %e, "stream guard: accept failed"),
                    }
                }
                drop(listener);
                drop(open);
                guard.stopping.send_replace(Stop::Draining);
                tracing::info!(
                    deadline_secs = deadline.as_secs(),
                    "stream guard: refusing new connections, draining open streams"
                );
                all_closed.recv().await;
            }
        };
        if shutdown.drain(serving, deadline).await.is_none() {
            tracing::warn!("stream guard: ending the streams still open at the shutdown deadline");
            guard.stopping.send_replace(Stop::Cut);
            let _ = tokio::time::timeout(CUT_GRACE, all_closed.recv()).await;
        }
    }

    /// Serves one connection in its own task, which holds `open` until the connection closes;
    /// probes are answered from `shutdown`'s state.
    fn serve_connection(self: &Arc<Self>, socket: TcpStream, open: mpsc::Sender<()>, shutdown: Shutdown) {
        let _ = socket.set_nodelay(true);
        // Subscribed before any shutdown, so none is missed.
        let mut stopping = self.stopping.subscribe();
        let guard = Arc::clone(self);
        let max_headers = guard.max_headers;
        tokio::spawn(async move {
            let _open = open;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let guard = Arc::clone(&guard);
                let probe = match *request.method() {
                    Method::GET => health::probe(request.uri().path(), &shutdown),
                    _ => None,
                };
                async move {
                    Ok::<_, Infallible>(match probe {
                        Some(answer) => probe_response(answer),
                        None => guard.relay(request).await,
                    })
                }
            });
            // HTTP/1.1, or HTTP/2 (prior knowledge), in which a stream's usage trailer always reaches Envoy.
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().max_headers(max_headers);
            // Envoy's circuit breakers bound the streams at once, not a connection's setting.
            builder.http2().max_header_list_size(MAX_HTTP2_HEADER_BYTES).max_concurrent_streams(None);
            let connection = builder.serve_connection(TokioIo::new(socket), service);
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

    /// Resolves when streams must end now: the shutdown deadline has passed.
    pub(crate) fn cut(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
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
}

/// A probe's answer, given without the internal token: it reveals nothing.
fn probe_response((status, body): health::Answer) -> Response<GuardedBody> {
    let mut response = Response::new(GuardedBody::last(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use modelgate_runtime::internal_token::InternalToken;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    /// A guard that serves until the sender fires, then drains for `deadline`.
    async fn guard_until(
        upstream: SocketAddr,
        deadline: Duration,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async move {
            let _ = stopped.await;
        });
        let serving = tokio::spawn(StreamGuard::new(upstream).serve_until(listener, shutdown, deadline));
        (addr, stop, serving)
    }

    /// True once nothing accepts connections at `addr` (the guard lets go of its listener soon after the signal).
    async fn refuses_connections(addr: SocketAddr) -> bool {
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
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

    /// The raw answer of the guard at `addr` to a GET of `path` without any token.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn probes_are_answered_without_the_token_and_readiness_fails_through_the_drain_delay() {
        let never = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::after(
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(3600),
        );
        let guard = StreamGuard::new(never).with_token(InternalToken::new("tok"));
        tokio::spawn(guard.serve_until(listener, shutdown.clone(), Duration::from_secs(60)));

        let live = get(addr, "/healthz").await;
        assert!(live.starts_with("HTTP/1.1 200") && live.ends_with(r#"{"status":"alive"}"#), "{live}");
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with(r#"{"status":"ready"}"#), "{ready}");
        assert!(ready.contains("content-type: application/json"), "{ready}");
        // Every other path still asks for the token.
        let other = get(addr, "/readyz/more").await;
        assert!(other.starts_with("HTTP/1.1 401"), "{other}");

        stop.send(()).unwrap();
        while shutdown.ready() {
            tokio::task::yield_now().await;
        }
        // Unready, yet still accepting: Kubernetes stops sending before the listener closes.
        let draining = get(addr, "/readyz").await;
        assert!(draining.starts_with("HTTP/1.1 503") && draining.ends_with(r#"{"status":"draining"}"#), "{draining}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
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
}
