//! The guard's side of Envoy's inner listener: the HTTP client that relays
//! to it, the request bodies it reads, and the headers a relay drops.

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use modelgate_proto::error::GatewayError;

/// A relayed request's body: the client's as it comes, or rewritten for its backend.
pub(crate) type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// The client relaying to Envoy's inner listener.
pub(crate) fn upstream_client(max_headers: usize) -> Client<HttpConnector, UpstreamBody> {
    let mut connector = HttpConnector::new();
    // Events are small writes: don't let Nagle hold them back.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).http1_max_headers(max_headers).build(connector)
}

/// Logs that Envoy's inner listener cannot be reached, and returns the guard's answer.
pub(crate) fn log_listener_unreachable(e: &dyn std::fmt::Display) -> GatewayError {
    tracing::warn!(error = %e, "stream guard: upstream listener unreachable");
    GatewayError::gateway_unavailable()
}

/// The most of a request body read to rewrite it. The filter has already
/// refused bodies over its `max_request_body_bytes`; this only bounds memory.
pub(crate) const MAX_REQUEST_BYTES: usize = 256 << 20;

/// A request body, whole.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, GatewayError> {
    match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(GatewayError::invalid_request(format!("The request body could not be read ({e})."))),
    }
}

/// Headers about one connection, which a relay must not pass on.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    for name in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
}
