//! What the guard's tests share: upstreams that answer as told, and clients of a guard.

use crate::server::StreamGuard;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A one-shot upstream that reads a request (head, and body by its
/// content-length) and writes `response` raw, then closes. The request
/// it read comes back on the receiver.
pub(crate) async fn upstream_answering(
    response: &'static [u8],
) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let request = read_request(&mut socket).await;
        let _ = tx.send(String::from_utf8(request).unwrap());
        socket.write_all(response).await.unwrap();
    });
    (addr, rx)
}

/// One request, read whole: its head, and its body by its content-length.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
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
    request
}

/// An upstream that answers one request with a stream's head and `first`
/// event, then the rest when it is sent, or nothing more if it never is.
pub(crate) async fn upstream_streaming(
    first: &'static str,
) -> (SocketAddr, tokio::sync::oneshot::Sender<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (rest_tx, rest) = tokio::sync::oneshot::channel::<&'static str>();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        read_request(&mut socket).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(format!("{head}{:x}\r\n{first}\r\n", first.len()).as_bytes()).await.unwrap();
        match rest.await {
            Ok(rest) => socket.write_all(format!("{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len()).as_bytes()).await.unwrap(),
            // Never finishes: holds the connection until the guard lets go of it.
            Err(_) => {
                let mut buf = [0u8; 4096];
                while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            }
        }
    });
    (addr, rest_tx)
}

pub(crate) async fn upstream_writing(response: &'static [u8]) -> SocketAddr {
    upstream_answering(response).await.0
}

/// What a client of the guard receives, raw, for a request relayed to `upstream`.
pub(crate) async fn through_guard(upstream: SocketAddr, cluster_header: bool) -> String {
    let cluster = if cluster_header { "x-modelgate-stream-cluster: pool\r\n" } else { "" };
    request_through_guard(upstream, cluster, "").await
}

/// The same for a POST with these extra header lines and this body.
pub(crate) async fn request_through_guard(upstream: SocketAddr, extra_headers: &str, body: &str) -> String {
    request_through(StreamGuard::new(upstream), extra_headers, body).await
}

/// The same, through a guard configured as given.
pub(crate) async fn request_through(guard: StreamGuard, extra_headers: &str, body: &str) -> String {
    request_to(guard, "/v1/chat/completions", extra_headers, body).await
}

/// The same, to `path`.
pub(crate) async fn request_to(guard: StreamGuard, path: &str, extra_headers: &str, body: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let guard_addr = listener.local_addr().unwrap();
    tokio::spawn(guard.serve(listener));
    let mut client = tokio::net::TcpStream::connect(guard_addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{extra_headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    String::from_utf8(answer).unwrap()
}

/// A client of the guard at `guard_addr` that has sent a stream request.
pub(crate) async fn client_of(guard_addr: SocketAddr) -> Client {
    let mut socket = tokio::net::TcpStream::connect(guard_addr).await.unwrap();
    let request = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-modelgate-stream-cluster: pool\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    socket.write_all(request.as_bytes()).await.unwrap();
    Client { socket, received: Vec::new() }
}

pub(crate) struct Client {
    socket: tokio::net::TcpStream,
    received: Vec<u8>,
}

impl Client {
    /// Reads until `text` has arrived.
    pub(crate) async fn read_until(&mut self, text: &str) {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&self.received).contains(text) {
            let n = self.socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {text:?}: {}", String::from_utf8_lossy(&self.received));
            self.received.extend_from_slice(&buf[..n]);
        }
    }

    /// Everything the guard sent, up to its end of the connection.
    pub(crate) async fn read_all(mut self) -> String {
        self.socket.read_to_end(&mut self.received).await.unwrap();
        String::from_utf8(self.received).unwrap()
    }
}

/// The headers of a stream to an Anthropic backend, which the guard rewrites and translates.
pub(crate) const ANTHROPIC: &str = "x-modelgate-stream-cluster: anthropic\r\nx-modelgate-stream-backend: {\"dialect\":\"anthropic\",\"model\":\"claude-x\",\"api_key\":\"passthrough\"}\r\nauthorization: Bearer sk-client\r\n";

pub(crate) const CHAT: &str = r#"{"model":"claude","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

pub(crate) const STREAMED: &str =
    concat!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 14\r\n\r\n", "data: [DONE]\n\n");

/// What a client of a guard over HTTP/2 (as Envoy is) gets for a POST with these
/// extra headers: the answer's head, its body, and its trailers.
pub(crate) async fn http2_request_through(
    guard: StreamGuard,
    extra_headers: &[(&str, &str)],
    body: &'static str,
) -> (hyper::http::response::Parts, String, Option<hyper::HeaderMap>) {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let guard_addr = listener.local_addr().unwrap();
    tokio::spawn(guard.serve(listener));
    let socket = tokio::net::TcpStream::connect(guard_addr).await.unwrap();
    let executor = hyper_util::rt::TokioExecutor::new();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(executor, hyper_util::rt::TokioIo::new(socket)).await.unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::post("http://x/v1/chat/completions");
    for (name, value) in extra_headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes()))).unwrap();
    let (parts, answer) = sender.send_request(request).await.unwrap().into_parts();
    let answer = answer.collect().await.unwrap();
    let trailers = answer.trailers().cloned();
    (parts, String::from_utf8(answer.to_bytes().to_vec()).unwrap(), trailers)
}
