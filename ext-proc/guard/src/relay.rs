//! One request relayed: checked, pointed at its cluster (rewritten for its
//! backend when it has a profile), sent to Envoy's inner listener, and its
//! answer guarded. A request for a model with fallbacks goes to [`crate::chain`].

use crate::answer::{error_response, guard_response, not_a_stream, stream_framing};
use crate::guarded_body::{GuardedBody, TrailedUsage};
use crate::rewrite::rewrite;
use crate::server::StreamGuard;
use crate::upstream::{log_listener_unreachable, remove_hop_by_hop};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use hyper::{Request, Response, Uri, Version};
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;

impl StreamGuard {
    pub(crate) async fn relay(&self, request: Request<Incoming>) -> Response<GuardedBody> {
        let (mut parts, body) = request.into_parts();
        // A Messages stream to Anthropic comes as it is: its errors are Anthropic's.
        let api = ClientApi::of_path(parts.uri.path().as_bytes());
        if let Err(e) = self.intake(&mut parts.headers) {
            return error_response(e, api);
        }
        // Only over HTTP/2 can no setting of Envoy's drop the trailer the usage would come in.
        let asked = parts.headers.remove(headers::USAGE);
        let usage = TrailedUsage::asked(asked.as_ref().filter(|_| parts.version == Version::HTTP_2));
        if let Some(chain) = parts.headers.remove(headers::CHAIN) {
            return self.relay_chain(parts, body, chain.as_bytes(), api, usage).await;
        }
        let Some(cluster) = parts.headers.remove(headers::STREAM_CLUSTER) else {
            return error_response(GatewayError::stream_without_cluster(), api);
        };
        parts.headers.insert(HeaderName::from_static(headers::CLUSTER), cluster);
        remove_hop_by_hop(&mut parts.headers);
        let (body, translation) = match parts.headers.remove(headers::STREAM_BACKEND) {
            None => (Either::Left(body), None),
            Some(profile) => {
                match rewrite(&mut parts, body, profile.as_bytes(), &self.keys, self.max_event_bytes).await {
                    Ok(rewritten) => rewritten,
                    Err(e) => return error_response(e, api),
                }
            }
        };
        if let Err(e) = self.point_upstream(&mut parts) {
            return error_response(e, api);
        }
        let request_id = parts.headers.get("x-request-id").cloned();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) if response.status().is_success() && stream_framing(response.headers()).is_none() => {
                not_a_stream(response.headers(), request_id, api)
            }
            Ok(response) => guard_response(self, response, None, translation, request_id, api, usage).await,
            Err(e) => error_response(log_listener_unreachable(&e), api),
        }
    }

    /// Checks a request's token, and drops what the inner listener must not see from it: the
    /// token, and `x-envoy-*` headers, which Envoy would obey from a caller it took as internal.
    pub(crate) fn intake(&self, request_headers: &mut HeaderMap) -> Result<(), GatewayError> {
        self.token.check(request_headers.get(headers::INTERNAL_TOKEN).map(HeaderValue::as_bytes))?;
        request_headers.remove(headers::INTERNAL_TOKEN);
        let envoys: Vec<HeaderName> =
            request_headers.keys().filter(|name| name.as_str().starts_with("x-envoy-")).cloned().collect();
        for name in envoys {
            request_headers.remove(name);
        }
        Ok(())
    }

    /// Points a request at Envoy's inner listener, keeping its path and its host: a request
    /// Envoy sent over HTTP/2 names its host only in the URI, and goes on over HTTP/1.1.
    pub(crate) fn point_upstream(&self, parts: &mut hyper::http::request::Parts) -> Result<(), GatewayError> {
        if let (false, Some(authority)) = (parts.headers.contains_key(HOST), parts.uri.authority()) {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, host);
            }
        }
        parts.version = Version::HTTP_11;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(format!("http://{}{path}", self.upstream))
            .map_err(|_| GatewayError::invalid_request("The request path is not valid.".into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use modelgate_dialects::credentials::KeySources;
    use modelgate_runtime::internal_token::InternalToken;
    use tokio::net::TcpListener;

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

    /// What a client of the Messages API at `path` gets through the guard from `upstream`, raw.
    async fn messages_through_guard(upstream: std::net::SocketAddr, path: &str, cluster: bool) -> String {
        let headers = if cluster { "x-modelgate-stream-cluster: claude\r\n" } else { "" };
        let body = r#"{"model":"claude","max_tokens":5,"messages":[],"stream":true}"#;
        request_to(StreamGuard::new(upstream), path, headers, body).await
    }

    #[tokio::test]
    async fn on_anthropics_api_a_broken_stream_ends_with_its_error_event_and_the_guards_errors_are_its_envelope() {
        let cut = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "2e\r\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: message\r\n"
        );
        let answer =
            messages_through_guard(upstream_writing(cut.as_bytes()).await, "/v1/messages?beta=true", true).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("event: ping\ndata: {\"type\":\"ping\"}\n\n"), "{answer}");
        let error = "event: error\ndata: {\"error\":{\"message\":\"The backend stopped in the middle of this stream";
        assert!(answer.contains(error) && answer.contains(r#""type":"api_error"},"type":"error"}"#), "{answer}");
        assert!(!answer.contains("event: message\n") && !answer.contains("\"code\""), "{answer}");

        let whole = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let answer = messages_through_guard(upstream_writing(whole.as_bytes()).await, "/v1/messages", true).await;
        assert!(answer.contains("event: error\ndata: {\"error\":{\"message\":\"The backend answered with a success of type `application/json`"), "{answer}");

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let answer = messages_through_guard(closed, "/v1/messages", true).await;
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("x-should-retry: true"), "{answer}");
        assert!(answer.ends_with(r#""type":"api_error"},"type":"error"}"#), "{answer}");
        let answer = messages_through_guard(closed, "/v1/messages/count_tokens", false).await;
        assert!(answer.starts_with("HTTP/1.1 500") && answer.ends_with(r#""type":"api_error"},"type":"error"}"#));
        // OpenAI's API is as it was.
        let answer = messages_through_guard(closed, "/v1/chat/completions", true).await;
        assert!(answer.contains(r#""code":"gateway_unavailable""#), "{answer}");
    }

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
    async fn a_request_the_backend_cannot_honour_is_refused_without_calling_it() {
        let never = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let answer = request_through_guard(never, ANTHROPIC, r#"{"model":"c","messages":[],"n":3}"#).await;
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("x-should-retry: false"), "{answer}");
        assert!(answer.contains(r#""param":"n","code":"unsupported_parameter""#), "{answer}");
        let broken = "x-modelgate-stream-cluster: x\r\nx-modelgate-stream-backend: {\"dialect\":\"klingon\"}\r\n";
        let answer = request_through_guard(never, broken, CHAT).await;
        assert!(answer.starts_with("HTTP/1.1 500") && answer.contains(r#""code":"gateway_misconfigured""#), "{answer}");
    }

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
    async fn an_upstream_named_by_host_is_resolved_and_relayed_to() {
        let (upstream, received) = upstream_answering(STREAMED.as_bytes()).await;
        let named: crate::upstream::Upstream = format!("localhost:{}", upstream.port()).parse().unwrap();
        let answer = request_through(StreamGuard::new(named), "x-modelgate-stream-cluster: pool\r\n", "{}").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(received.await.unwrap().starts_with("POST "));
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
