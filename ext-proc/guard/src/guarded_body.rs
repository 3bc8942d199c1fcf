//! [`GuardedBody`]: a relayed answer's body, passing a stream on whole
//! events at a time and ending a broken one with an error event.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use modelgate_dialects::dialect::ResponseTranslator;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::{error_event_in, CompleteEvents};
use modelgate_proto::headers;
use modelgate_proto::usage::UsageWatch;
use modelgate_proto::usage_trailer::{keep_gap, UsageTrailer};
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

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
    /// Where the filter asked for it: the stream's usage, read (and removed if
    /// unasked) from what goes on, and sent as a trailer at the end.
    usage: Option<TrailedUsage>,
}

/// A stream whose usage the filter asked for: read (and removed where the
/// client did not ask for it) as its pieces go on, the gaps between the
/// pieces timed, and all of it sent to the filter in the usage trailer.
pub struct TrailedUsage {
    watch: UsageWatch,
    last_piece: Option<Instant>,
    gaps_us: Vec<u64>,
}

fn watched(usage: &mut Option<TrailedUsage>, piece: Bytes, last: bool) -> Bytes {
    match usage {
        Some(usage) => usage.pass(piece, last),
        None => piece,
    }
}

impl TrailedUsage {
    /// What the filter's [`headers::USAGE`] asks for, if anything.
    pub fn asked(value: Option<&HeaderValue>) -> Option<Self> {
        let watch = UsageWatch::named(value?.as_bytes())?;
        Some(TrailedUsage { watch, last_piece: None, gaps_us: Vec::new() })
    }

    /// The bytes to send on for `piece`, `last` for the stream's final piece.
    fn pass(&mut self, piece: Bytes, last: bool) -> Bytes {
        if !piece.is_empty() {
            let now = Instant::now();
            if let Some(previous) = self.last_piece.replace(now) {
                keep_gap(&mut self.gaps_us, now.duration_since(previous).as_micros() as u64);
            }
        }
        match self.watch.pass(&piece, last) {
            Some(changed) => Bytes::from(changed),
            None => piece,
        }
    }

    fn trailers(&self) -> HeaderMap {
        let value = UsageTrailer::encode(self.watch.usage(), &self.gaps_us);
        let mut trailers = HeaderMap::new();
        // Digits, commas, spaces and `none`: always a valid value.
        if let Ok(value) = HeaderValue::from_str(&value) {
            trailers.insert(HeaderName::from_static(headers::USAGE_TRAILER), value);
        }
        trailers
    }
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
            usage: None,
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
        GuardedBody { state: State::Relaying(upstream), first, reader, request_id, cut, api, usage: None }
    }

    /// Reads the stream's usage as asked, and ends it with the usage trailer
    /// (only an event stream: it is read event by event).
    pub(crate) fn with_usage(mut self, usage: Option<TrailedUsage>) -> Self {
        self.usage = usage.filter(|_| self.reader.is_some());
        self
    }

    /// True when it ends with the usage trailer.
    pub(crate) fn sends_usage_trailer(&self) -> bool {
        self.usage.is_some()
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
    /// The usage trailer, after the last piece.
    Trailers(HeaderMap),
    Done,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if !matches!(this.state, State::Relaying(_)) {
                match std::mem::replace(&mut this.state, State::Done) {
                    State::Last(last) => {
                        let last = watched(&mut this.usage, last, true);
                        if let Some(usage) = this.usage.take() {
                            this.state = State::Trailers(usage.trailers());
                        }
                        if !last.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(last))));
                        }
                        continue;
                    }
                    State::Trailers(trailers) => return Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    _ => return Poll::Ready(None),
                }
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
                                let complete = watched(&mut this.usage, complete, false);
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
                            } else {
                                let translated = watched(&mut this.usage, translated, false);
                                if !translated.is_empty() {
                                    return Poll::Ready(Some(Ok(Frame::data(translated))));
                                }
                            }
                        }
                    },
                    Err(trailers) => {
                        // The upstream's own trailers end the stream: the usage trailer joins them.
                        let usage = this.usage.take().map(|usage| usage.trailers());
                        return Poll::Ready(Some(Ok(match (trailers.into_trailers(), usage) {
                            (Ok(mut theirs), Some(ours)) => {
                                theirs.extend(ours);
                                Frame::trailers(theirs)
                            }
                            (Ok(theirs), None) => Frame::trailers(theirs),
                            (Err(other), _) => other,
                        })));
                    }
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
            (State::Trailers(_) | State::Done, _) => SizeHint::with_exact(0),
            (State::Relaying(_), _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::server::StreamGuard;
    use crate::testing::*;
    use modelgate_proto::usage::Usage;
    use modelgate_proto::usage_trailer::UsageTrailer;
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
    async fn a_stream_asked_for_its_usage_over_http2_ends_with_the_usage_trailer_and_loses_the_unasked_usage() {
        let events = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let upstream: &'static str = format!("{head}{:x}\r\n{events}\r\n0\r\n\r\n", events.len()).leak();
        let asked = [("x-modelgate-stream-cluster", "pool"), ("x-modelgate-usage", "unasked")];
        let (upstream_addr, received) = upstream_answering(upstream.as_bytes()).await;
        let (head, body, trailers) = http2_request_through(StreamGuard::new(upstream_addr), &asked, "{}").await;
        assert_eq!(head.headers["trailer"], "modelgate-usage", "{head:?}");
        assert_eq!(body, "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n");
        let trailer = trailers.expect("the usage trailer")["modelgate-usage"].to_str().unwrap().to_owned();
        let trailer = UsageTrailer::parse(trailer.as_bytes());
        assert_eq!(trailer.usage, Some(Usage { prompt_tokens: 3, completion_tokens: 2 }));
        let received = received.await.unwrap();
        assert!(received.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "{received}");
        assert!(received.contains("host: x\r\n"), "the host goes on: {received}");
        assert!(!received.contains("x-modelgate-usage"), "{received}");

        // Over HTTP/1.1, where a proxy's setting may drop trailers, the usage is left to the filter.
        let asked = "x-modelgate-stream-cluster: pool\r\nx-modelgate-usage: unasked\r\nte: trailers\r\n";
        let answer = request_through_guard(upstream_writing(upstream.as_bytes()).await, asked, "").await;
        assert!(!answer.contains("trailer:") && !answer.contains("modelgate-usage"), "{answer}");
        assert!(answer.contains("\"usage\":{\"prompt_tokens\":3"), "{answer}");
        assert!(answer.ends_with("\r\n0\r\n\r\n"), "{answer}");
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
