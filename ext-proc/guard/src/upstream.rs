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
use std::net::SocketAddr;

/// Where the guard relays: Envoy's inner listener, as `host:port`. A name is
/// resolved for each new connection (in Kubernetes, a Service in front of the
/// Envoy pods), so the guard follows the name as its addresses change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream(String);

impl std::str::FromStr for Upstream {
    type Err = String;

    fn from_str(authority: &str) -> Result<Self, Self::Err> {
        if let Ok(address) = authority.parse::<SocketAddr>() {
            return Ok(address.into());
        }
        let refused = || format!("`{authority}` is not host:port");
        let (host, port) = authority.rsplit_once(':').ok_or_else(refused)?;
        let host_is_a_name = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        match port.parse::<u16>() {
            Ok(port) if port > 0 && host_is_a_name => Ok(Upstream(format!("{host}:{port}"))),
            _ => Err(refused()),
        }
    }
}

impl From<SocketAddr> for Upstream {
    fn from(address: SocketAddr) -> Self {
        Upstream(address.to_string())
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

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

#[cfg(test)]
mod tests {
    use super::Upstream;

    #[test]
    fn an_upstream_is_an_address_or_a_name_with_a_port() {
        let parsed = |s: &str| s.parse::<Upstream>().map(|u| u.to_string());
        assert_eq!(parsed("127.0.0.1:10001").unwrap(), "127.0.0.1:10001");
        assert_eq!(parsed("[::1]:10001").unwrap(), "[::1]:10001");
        let service = "modelgate-envoy-inner.envoy-gateway-system.svc.cluster.local:10001";
        assert_eq!(parsed(service).unwrap(), service);
        for wrong in
            ["", "envoy", "envoy:", ":10001", "envoy:0", "envoy:70000", "a/b:1", "user@envoy:1", "a..b:1", "::1:10001"]
        {
            assert!(parsed(wrong).is_err(), "{wrong} was taken");
        }
    }
}
