//! The answer the client gets: a stream guarded event by event, a whole
//! answer translated, and the guard's own errors.

use crate::guarded_body::{GuardedBody, StreamReader, TrailedUsage};
use crate::rewrite::apply_changes;
use crate::server::StreamGuard;
use crate::upstream::remove_hop_by_hop;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRAILER};
use hyper::{Response, StatusCode};
use modelgate_dialects::call::plan_answer;
use modelgate_dialects::dialect::ResponseTranslator;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::framing::{error_event_in, CompleteEvents, Framing};
use modelgate_proto::headers;

/// The framing of a streamed answer: server-sent events, or Ollama's NDJSON.
pub(crate) fn stream_framing(headers: &HeaderMap) -> Option<Framing> {
    Framing::from_content_type(headers.get(CONTENT_TYPE)?.as_bytes())
}

/// The answer as the client gets it: a stream event by event (translated if
/// asked), a whole answer to translate read first, anything else as it is.
/// `first` is the start of the body, already read from `response`; the
/// guard's errors are in the client's `api`.
pub(crate) async fn guard_response(
    guard: &StreamGuard,
    response: Response<Incoming>,
    first: Option<Bytes>,
    mut translation: Option<Box<dyn ResponseTranslator>>,
    request_id: Option<HeaderValue>,
    api: ClientApi,
    usage: Option<TrailedUsage>,
) -> Response<GuardedBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let framing = stream_framing(&parts.headers).filter(|_| parts.status.is_success());
    if let Some(translation) = &mut translation {
        let status = parts.status.as_u16();
        let content_type = parts.headers.get(CONTENT_TYPE).map_or(&b""[..], |c| c.as_bytes());
        let plan = plan_answer(translation.as_mut(), status, content_type);
        let client_status = &mut parts.status;
        let applied = apply_changes(&mut parts.headers, plan.headers, |_name, value| {
            *client_status = value.parse().ok().and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(*client_status);
            Ok(())
        });
        if let Err(e) = applied {
            return error_response(e, api);
        }
        if !plan.streamed {
            return translate_whole(parts, body, status, translation.as_mut(), api).await;
        }
    }
    let reader = framing.map(|framing| {
        // The guard may add an event, so the length is no longer known.
        parts.headers.remove(CONTENT_LENGTH);
        match translation {
            Some(translation) => StreamReader::Translated(translation),
            None => StreamReader::Events(CompleteEvents::new(framing, guard.max_event_bytes)),
        }
    });
    let cut = reader.as_ref().map(|_| guard.cut());
    let body = GuardedBody::relaying(body, first, reader, request_id, cut, api).with_usage(usage);
    if body.sends_usage_trailer() {
        // The filter's sign that the usage comes in the trailer, and that it need read no piece.
        parts.headers.insert(TRAILER, HeaderValue::from_static(headers::USAGE_TRAILER));
    }
    Response::from_parts(parts, body)
}

/// A stream's answer for a success that is not a stream (a whole answer, an
/// empty body): an event stream of one error event, as for a broken stream.
pub(crate) fn not_a_stream(
    headers: &HeaderMap,
    request_id: Option<HeaderValue>,
    api: ClientApi,
) -> Response<GuardedBody> {
    let content_type = headers.get(CONTENT_TYPE).map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned());
    tracing::warn!(request_id = ?request_id, content_type, "stream guard: the backend answered a stream without one");
    let what = match content_type {
        Some(content_type) => format!("a success of type `{content_type}` where a stream of events was asked for"),
        None => "a success without content where a stream of events was asked for".to_string(),
    };
    let event = error_event_in(api, &GatewayError::bad_answer(&what));
    let mut response = Response::new(GuardedBody::last(Bytes::from(event)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response
}

/// The most of a whole answer read to translate it; answers to streaming
/// requests that do not stream are errors, far smaller than this.
pub(crate) const MAX_WHOLE_ANSWER_BYTES: usize = 16 << 20;

/// A whole answer (an error, or a backend that ignored `stream`), read and translated.
pub(crate) async fn translate_whole(
    mut parts: hyper::http::response::Parts,
    body: Incoming,
    status: u16,
    translation: &mut dyn ResponseTranslator,
    api: ClientApi,
) -> Response<GuardedBody> {
    let whole = match Limited::new(body, MAX_WHOLE_ANSWER_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "stream guard: the backend's answer could not be read");
            return error_response(GatewayError::interrupted(&e), api);
        }
    };
    let body = Bytes::from(translation.whole(status, &whole));
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, GuardedBody::last(body))
}

/// The guard's own error answer, in the client's `api`.
pub(crate) fn error_response(error: GatewayError, api: ClientApi) -> Response<GuardedBody> {
    let mut response = Response::new(GuardedBody::last(Bytes::from(error.body_in(api))));
    *response.status_mut() = StatusCode::from_u16(error.status_in(api)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((name, value)) = retry_header(error.should_retry()) {
        response.headers_mut().insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use crate::testing::*;

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
    async fn errors_and_other_answers_pass_as_they_are() {
        let error = "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\n{}";
        let answer = through_guard(upstream_writing(error.as_bytes()).await, true).await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(answer.contains("retry-after: 3") && answer.contains("content-length: 2") && answer.ends_with("{}"));
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
}
