//! [`GuardedBody`]: a relayed answer's body, passing a stream on whole
//! events at a time and ending a broken one with an error event.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use modelgate_dialects::dialect::ResponseTranslator;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::{error_event_in, CompleteEvents};
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A relayed answer's body. Event streams go on whole events at a time and
/// end with an error event if the upstream breaks, an event is too long or the
/// shutdown deadline passes; other bodies pass as they are.
pub struct GuardedBody {
    state: State,
    /// The start of the upstream body, read before the answer was relayed (a fallback chain's check that its stream began).
    first: Option<Bytes>,
    /// How a stream's pieces are read; `None` for a body that passes as it is.
    reader: Option<StreamReader>,
    request_id: Option<HeaderValue>,
    /// A stream's end at the shutdown deadline.
    cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The client's API: its error event ends a broken stream.
    api: ClientApi,
}

/// How a guarded stream is read: each stream is framed once, by one of them.
pub enum StreamReader {
    /// Relayed as it is, whole events at a time.
    Events(CompleteEvents),
    /// Translated to OpenAI's from another dialect; the translation frames the
    /// pieces itself and ends the stream with an error event on an event it
    /// cannot hold or read.
    Translated(Box<dyn ResponseTranslator>),
}

impl GuardedBody {
    /// A body of these bytes only.
    pub(crate) fn last(bytes: Bytes) -> Self {
        GuardedBody {
            state: State::Last(bytes),
            first: None,
            reader: None,
            request_id: None,
            cut: None,
            api: ClientApi::Openai,
        }
    }

    /// The body of `upstream`, whose start `first` was already read from it:
    /// read by `reader` when it is a stream, and ended when `cut` resolves.
    pub(crate) fn relaying(
        upstream: Incoming,
        first: Option<Bytes>,
        reader: Option<StreamReader>,
        request_id: Option<HeaderValue>,
        cut: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        api: ClientApi,
    ) -> Self {
        GuardedBody { state: State::Relaying(upstream), first, reader, request_id, cut, api }
    }

    /// Ends a stream early: `complete` (whole events, or a translation's
    /// output) goes on, then the error event of the client's API (a
    /// translation's output is OpenAI's chat), in the stream's own framing
    /// when relayed as it is. A translation's unfinished event is simply never read.
    fn end_with(&mut self, complete: Bytes, error: &GatewayError) {
        tracing::warn!(request_id = ?self.request_id, reason = error.message, "stream guard: ending a stream early");
        let last = match &mut self.reader {
            Some(StreamReader::Translated(_)) => [&complete[..], &error_event_in(self.api, error)].concat(),
            Some(StreamReader::Events(events)) => [&complete[..], &events.interrupt_in(self.api, error)].concat(),
            None => complete.to_vec(),
        };
        self.state = State::Last(Bytes::from(last));
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
            let Some(reader) = &mut this.reader else {
                return Poll::Ready(frame);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match reader {
                        StreamReader::Events(events) => match events.push(data) {
                            Ok(complete) => {
                                if !complete.is_empty() {
                                    return Poll::Ready(Some(Ok(Frame::data(complete))));
                                }
                            }
                            Err(long) => {
                                let error = GatewayError::stream_event_too_large(events.max_event_bytes());
                                this.end_with(long.complete, &error);
                            }
                        },
                        StreamReader::Translated(translation) => {
                            let translated = Bytes::from(translation.stream(&data, false));
                            if translation.ended() {
                                // It ended the stream with its error event: nothing more is read.
                                this.state = State::Last(translated);
                            } else if !translated.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(translated))));
                            }
                        }
                    },
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => this.end_with(Bytes::new(), &GatewayError::interrupted(&e)),
                None => {
                    this.state = State::Last(match reader {
                        StreamReader::Events(events) => events.finish(),
                        StreamReader::Translated(translation) => Bytes::from(translation.stream(&[], true)),
                    });
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, &self.reader) {
            (State::Relaying(upstream), None) if self.first.is_none() => upstream.size_hint(),
            (State::Last(last), _) => SizeHint::with_exact(last.len() as u64),
            (State::Done, _) => SizeHint::with_exact(0),
            (State::Relaying(_), _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::server::StreamGuard;
    use crate::testing::*;
    use std::time::Duration;
    use tokio::net::TcpListener;

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
    async fn a_translated_stream_with_an_event_over_the_limit_ends_at_once_with_the_error_event() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{}}}\n\n";
        let long = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"0123456789012345678901234567890123456789";
        // The backend holds its stream open: the guard must end it without waiting for the rest.
        let (upstream, _never) = upstream_streaming(Box::leak(format!("{start}{long}").into_boxed_str())).await;
        let guard = StreamGuard::new(upstream).with_max_event_bytes(start.len());
        let answer =
            tokio::time::timeout(Duration::from_secs(10), request_through(guard, ANTHROPIC, CHAT)).await.unwrap();
        assert!(answer.contains(r#""role":"assistant""#), "{answer}");
        assert!(answer.contains(r#""code":"stream_event_too_large"}}"#) && !answer.contains("0123"), "{answer}");
        assert!(answer.ends_with("\n\n\r\n0\r\n\r\n"), "no clean end of the chunked body: {answer:?}");
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
}
