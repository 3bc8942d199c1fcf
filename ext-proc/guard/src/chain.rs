//! A model with fallbacks: its chain's backends tried in turn within the retry budget.

use crate::answer::{error_response, guard_response, not_a_stream, stream_framing};
use crate::guarded_body::{GuardedBody, TrailedUsage};
use crate::rewrite::{apply_rewrite, unusable_header};
use crate::server::StreamGuard;
use crate::upstream::{log_listener_unreachable, read_body, remove_hop_by_hop, UpstreamBody};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::{Request, Response};
use modelgate_dialects::call::BackendCall;
use modelgate_dialects::credentials::KeySources;
use modelgate_dialects::dialect::ResponseTranslator;
use modelgate_proto::chain::{Chain, Member};
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;
use std::time::Duration;

impl StreamGuard {
    /// A request for a model with fallbacks: its backends are tried in turn
    /// until one answers with something other than a retryable failure, or
    /// the chain or the retry budget runs out. Once an answer is relayed,
    /// nothing is retried: a stream that breaks ends with an error event.
    /// The budget counts requests and retries until their answer's headers
    /// are in: it bounds the extra attempts, not the streams they start.
    pub(crate) async fn relay_chain(
        &self,
        mut parts: hyper::http::request::Parts,
        body: Incoming,
        chain: &[u8],
        api: ClientApi,
        mut usage: Option<TrailedUsage>,
    ) -> Response<GuardedBody> {
        let chain = match Chain::from_header(chain) {
            Ok(chain) if !chain.members.is_empty() => chain,
            Ok(_) => {
                return error_response(
                    modelgate_dialects::call::log_misconfiguration(&"a fallback chain without backends"),
                    api,
                )
            }
            Err(e) => return error_response(modelgate_dialects::call::log_misconfiguration(&e), api),
        };
        remove_hop_by_hop(&mut parts.headers);
        if let Err(e) = self.point_upstream(&mut parts) {
            return error_response(e, api);
        }
        let whole = match read_body(body).await {
            Ok(whole) => whole,
            Err(e) => return error_response(e, api),
        };
        let request_id = parts.headers.get("x-request-id").cloned();
        // Whole requests of a model with fallbacks come this way too: only a stream's answer must be one.
        let streamed = chain.stream;
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
                api,
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
                        return served_by(
                            not_a_stream(response.headers(), request_id, api),
                            &member.backend,
                            index + 1,
                        );
                    }
                    let (response, first) = if streams && !is_last {
                        match first_bytes(response, per_try).await {
                            Ok(started) => started,
                            Err(failed) => {
                                if may_retry() {
                                    tracing::info!(request_id = ?request_id, backend = member.backend, reason = failed.message, "failover: trying the next backend");
                                    continue;
                                }
                                return served_by(error_response(failed, api), &member.backend, index + 1);
                            }
                        }
                    } else {
                        (response, None)
                    };
                    guard_response(self, response, first, translation, request_id.clone(), api, usage.take()).await
                }
                Err(failed) => {
                    if may_retry() {
                        tracing::info!(request_id = ?request_id, backend = member.backend, reason = failed.message, "failover: trying the next backend");
                        continue;
                    }
                    error_response(failed, api)
                }
            };
            return served_by(answer, &member.backend, index + 1);
        }
        // Unreachable: the last attempt always answers; kept total for the type.
        error_response(modelgate_dialects::call::log_misconfiguration(&"a fallback chain ended without an answer"), api)
    }

    /// Sends one prepared attempt: its answer (headers in) and the answer's
    /// translation, or why it failed before answering. `per_try` bounds the
    /// wait for the answer's headers (for a whole answer, the whole answer);
    /// the last backend of a chain has none, as there is nothing to move on to.
    pub(crate) async fn send(
        &self,
        attempt: Attempt,
        per_try: Option<Duration>,
    ) -> Result<(Response<Incoming>, Option<Box<dyn ResponseTranslator>>), GatewayError> {
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

/// A stream's answer once its first bytes are in (`None` for a stream that
/// ended at once), or why it failed before any: it broke, or sent nothing within `per_try`.
pub(crate) async fn first_bytes(
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
pub(crate) struct Attempt {
    request: Request<UpstreamBody>,
    translation: Option<Box<dyn ResponseTranslator>>,
}

/// The request for `member`: the client's, to the member's cluster, rewritten for its backend.
pub(crate) fn prepare(
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
            let call = BackendCall::for_profile(profile.clone(), parts.uri.path().as_bytes(), None, keys)?;
            apply_rewrite(&mut parts, call, whole.clone(), max_event_bytes)?
        }
        None => {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(whole.len()));
            (whole.clone(), None)
        }
    };
    Ok(Attempt { request: Request::from_parts(parts, Either::Right(Full::new(body))), translation })
}

/// Says on an answer which backend of a chain served it, after how many attempts.
pub(crate) fn served_by(mut answer: Response<GuardedBody>, backend: &str, attempts: usize) -> Response<GuardedBody> {
    if let Ok(backend) = HeaderValue::try_from(backend) {
        answer.headers_mut().insert(headers::SERVED_BY, backend);
    }
    answer.headers_mut().insert(headers::ATTEMPTS, HeaderValue::from(attempts));
    answer
}

#[cfg(test)]
mod tests {
    use crate::testing::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

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
    async fn the_usage_trailer_of_a_chain_is_the_answering_backends() {
        const STREAMS: &str = concat!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            "5e\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        );
        let (upstream, _) = upstream_by_cluster(&[("ca", UNAVAILABLE), ("cb", STREAMS)]).await;
        let (chain, value) = CHAIN.trim_end().split_once(": ").unwrap();
        let asked = [(chain, value), ("x-modelgate-usage", "read")];
        let (head, body, trailers) =
            http2_request_through(crate::server::StreamGuard::new(upstream), &asked, r#"{"model":"chained"}"#).await;
        assert_eq!((head.headers["modelgate-backend"].to_str().unwrap(), head.status.as_u16()), ("b", 200));
        assert!(body.contains("\"completion_tokens\":1"), "the client asked for the usage: {body}");
        assert_eq!(
            trailers.expect("the usage trailer")["modelgate-usage"].to_str().unwrap().split(' ').next(),
            Some("4,1")
        );
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
}
