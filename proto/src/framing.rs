//! Stream framing: where one server-sent event or one NDJSON line ends, and
//! the error event that ends a stream the gateway cannot pass on whole.
//!
//! An SSE event ends at a blank line, and a line ends at LF, CR or CRLF (the
//! WHATWG event-stream grammar); an NDJSON record ends at LF. Bytes arrive in
//! chunks cut anywhere, so [`CompleteEvents`] hands on only whole events (or
//! lines) and carries the rest over to the next chunk: a reader downstream
//! never sees half an event, and the stream can be ended cleanly at any moment.
//!
//! One framer for every reader of a stream: the stream guard, the dialects'
//! translations (in ext-proc) and the filter's usage stripping (in wasm).

use crate::client_api::ClientApi;
use crate::error::GatewayError;
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;

/// How a stream is cut into records. A dialect names the framing of its
/// streamed answers; a new one (a binary event stream, say) is a variant here,
/// its content-type, its boundaries and its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events, ended by a blank line.
    Sse,
    /// Newline-delimited JSON, one record per line.
    Ndjson,
}

impl Framing {
    /// The framing of a body with this content-type; `None` for a body that is not a stream.
    pub fn from_content_type(content_type: &[u8]) -> Option<Self> {
        let content_type = content_type.trim_ascii_start();
        [Framing::Sse, Framing::Ndjson].into_iter().find(|framing| {
            let media_type = framing.content_type().as_bytes();
            content_type.get(..media_type.len()).is_some_and(|start| start.eq_ignore_ascii_case(media_type))
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Framing::Sse => "text/event-stream",
            Framing::Ndjson => "application/x-ndjson",
        }
    }

    /// The records of `complete` (whole records, as [`CompleteEvents`] passes
    /// them on): each event's data, or each line that is not blank.
    pub fn records(self, complete: &[u8]) -> Vec<Cow<'_, [u8]>> {
        match self {
            Framing::Sse => event_data(complete).into_iter().map(Cow::Owned).collect(),
            Framing::Ndjson => {
                complete.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()).map(Cow::Borrowed).collect()
            }
        }
    }
}

/// Finds event boundaries in a byte stream fed in pieces.
#[derive(Debug, Clone)]
struct BoundaryScanner {
    framing: Framing,
    /// No byte of the current line seen yet.
    at_line_start: bool,
    /// The previous byte was a CR, so an LF now belongs to it.
    after_cr: bool,
}

impl BoundaryScanner {
    fn new(framing: Framing) -> Self {
        BoundaryScanner { framing, at_line_start: true, after_cr: false }
    }

    /// Scans `chunk`, which follows every chunk scanned before, and returns
    /// the length of its prefix that ends at the last event boundary in it.
    fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        if self.framing == Framing::Ndjson {
            return chunk.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
        }
        let mut last = None;
        for (i, &byte) in chunk.iter().enumerate() {
            match byte {
                b'\n' if self.after_cr => {
                    // The LF of a CRLF whose CR already ended a line (and maybe an event).
                    self.after_cr = false;
                    if last == Some(i) {
                        last = Some(i + 1);
                    }
                }
                b'\n' | b'\r' => {
                    if self.at_line_start {
                        last = Some(i + 1);
                    }
                    self.at_line_start = true;
                    self.after_cr = byte == b'\r';
                }
                _ => {
                    self.at_line_start = false;
                    self.after_cr = false;
                }
            }
        }
        last
    }
}

/// Each event of `complete`, whole events as [`CompleteEvents`] passes them
/// on, with its blank line; the last one may be unfinished (a stream's end).
pub fn sse_events(complete: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = complete;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut at_line_start = true;
        let mut end = rest.len();
        let mut i = 0;
        while i < rest.len() {
            let byte = rest[i];
            i += 1;
            if byte == b'\n' || byte == b'\r' {
                if byte == b'\r' && rest.get(i) == Some(&b'\n') {
                    i += 1;
                }
                if at_line_start {
                    end = i;
                    break;
                }
                at_line_start = true;
            } else {
                at_line_start = false;
            }
        }
        let (event, after) = rest.split_at(end);
        rest = after;
        Some(event)
    })
}

/// Passes an event stream on one whole event at a time.
#[derive(Debug)]
pub struct CompleteEvents {
    scanner: BoundaryScanner,
    /// The start of an event whose end has not arrived yet.
    pending: BytesMut,
    /// The most bytes of one event held back, so memory stays bounded
    /// whatever the backend sends; a longer event ends the stream.
    max_event_bytes: usize,
}

/// Far longer than any chat completion chunk, and than most tool calls a
/// backend sends in one record (Ollama sends a tool call whole, in one line).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 8 << 20;

/// An event grew past the framer's limit before it ended. The stream cannot
/// go on: what it completed before is in `complete`, and the start of the
/// long event in `rest`, for a reader that passes bytes on without framing.
#[derive(Debug)]
pub struct TooLong {
    pub complete: Bytes,
    pub rest: Bytes,
}

impl CompleteEvents {
    pub fn new(framing: Framing, max_event_bytes: usize) -> Self {
        CompleteEvents { scanner: BoundaryScanner::new(framing), pending: BytesMut::new(), max_event_bytes }
    }

    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// How much of an unfinished event is held back: never more than the limit.
    pub fn held_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Takes the next chunk of the stream and returns the events it completes
    /// (empty if none). A chunk of whole events is passed on without a copy.
    /// After [`TooLong`], the stream must end (see [`CompleteEvents::interrupt`]).
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, TooLong> {
        let end = self.scanner.scan(&chunk);
        let held = match end {
            Some(end) => chunk.len() - end,
            None => self.pending.len() + chunk.len(),
        };
        let complete = match end {
            Some(end) => self.take_with(&chunk.slice(..end)),
            None => Bytes::new(),
        };
        let rest = chunk.slice(end.unwrap_or(0)..);
        if held > self.max_event_bytes {
            return Err(TooLong { complete, rest: self.take_with(&rest) });
        }
        self.pending.extend_from_slice(&rest);
        Ok(complete)
    }

    /// What is held back followed by `more`, copied only if something was held.
    fn take_with(&mut self, more: &Bytes) -> Bytes {
        if self.pending.is_empty() {
            return more.clone();
        }
        self.pending.extend_from_slice(more);
        self.pending.split().freeze()
    }

    /// The stream ended normally: whatever is held back goes on as it is.
    pub fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    /// The whole records `piece` completes; with `end`, whatever is left too.
    pub fn take(&mut self, piece: &[u8], end: bool) -> Result<Vec<u8>, TooLong> {
        let mut complete = self.push(Bytes::copy_from_slice(piece))?.to_vec();
        if end {
            complete.extend_from_slice(&self.finish());
        }
        Ok(complete)
    }

    /// The stream broke or must end early: the unfinished event is dropped and
    /// `error` ends the stream in its place, so the reader gets a last record
    /// it can parse: OpenAI's error event, or for NDJSON (Ollama) an
    /// `{"error": "..."}` line.
    pub fn interrupt(&mut self, error: &GatewayError) -> Bytes {
        self.interrupt_in(ClientApi::Openai, error)
    }

    /// As [`CompleteEvents::interrupt`], with an event stream ended by `api`'s
    /// error event ([`error_event_in`]): Anthropic's on its Messages API.
    pub fn interrupt_in(&mut self, api: ClientApi, error: &GatewayError) -> Bytes {
        self.pending.clear();
        self.scanner = BoundaryScanner::new(self.scanner.framing);
        Bytes::from(match self.scanner.framing {
            Framing::Sse => error_event_in(api, error),
            Framing::Ndjson => error_line(error),
        })
    }
}

/// Ollama's own error record, `{"error": "..."}` and its newline.
fn error_line(error: &GatewayError) -> Vec<u8> {
    let mut line = serde_json::json!({"error": error.message}).to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The data of each event in `complete` (whole events, as [`CompleteEvents`]
/// passes them on): its `data:` lines joined by newlines. Events without data
/// (comments, pings with no data line) yield nothing.
pub fn event_data(complete: &[u8]) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    for line in lines(complete) {
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            match &mut data {
                Some(joined) => {
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                }
                None => data = Some(value.to_vec()),
            }
        }
    }
    events.extend(data);
    events
}

/// The lines of `bytes`, each ended by CRLF, LF or CR as the framing ends
/// them (a CR alone too), so the events read do not depend on where the
/// stream was cut; the last line may be unended.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let bytes = rest?;
        let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') else {
            rest = None;
            return Some(bytes);
        };
        let ending = if bytes[end..].starts_with(b"\r\n") { 2 } else { 1 };
        rest = Some(&bytes[end + ending..]);
        Some(&bytes[..end])
    })
}

/// Writes `data: <json>` and the blank line that ends the event.
pub fn write_data(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// `data: {"error":{...}}`, the event OpenAI sends when a stream fails after its 200.
pub fn error_event(error: &GatewayError) -> Vec<u8> {
    let mut event = Vec::new();
    write_data(&mut event, &error.to_json());
    event
}

/// The event a stream in `api` ends with when it fails after its 200:
/// OpenAI's [`error_event`], or Anthropic's `event: error` with its envelope.
pub fn error_event_in(api: ClientApi, error: &GatewayError) -> Vec<u8> {
    match api {
        ClientApi::Openai => error_event(error),
        ClientApi::Anthropic => {
            let mut event = b"event: error\n".to_vec();
            write_data(&mut event, &error.body_in(api));
            event
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &[u8] = b"data: {\"a\":1}\n\n: comment\n\nevent: x\r\ndata: 2\r\n\r\ndata: 3\r\rdata: [DONE]\n\n";

    fn feed(events: &mut CompleteEvents, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        chunks.iter().map(|c| events.push(Bytes::copy_from_slice(c)).unwrap().to_vec()).collect()
    }

    /// Splits STREAM at the given cut points and returns what is passed on for each piece.
    fn split_and_feed(cuts: &[usize]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(STREAM.len());
        let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &STREAM[w[0]..w[1]]).collect();
        let out = feed(&mut events, &pieces);
        (out, events.finish().to_vec())
    }

    fn is_boundary(prefix: &[u8]) -> bool {
        let mut scanner = BoundaryScanner::new(Framing::Sse);
        prefix.is_empty() || scanner.scan(prefix) == Some(prefix.len())
    }

    #[test]
    fn framings_are_known_by_content_type_and_cut_into_records() {
        assert_eq!(Framing::from_content_type(b" Text/Event-Stream; charset=utf-8"), Some(Framing::Sse));
        assert_eq!(Framing::from_content_type(b"application/x-ndjson"), Some(Framing::Ndjson));
        assert_eq!(Framing::from_content_type(b"application/json"), None);
        assert_eq!(Framing::Ndjson.records(b"{}\n\n {\"a\":1}\n"), [&b"{}"[..], b" {\"a\":1}"]);
        assert_eq!(Framing::Sse.records(b": x\n\ndata: 1\ndata: 2\n\n"), [&b"1\n2"[..]]);
    }

    #[test]
    fn whole_events_pass_without_waiting() {
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(feed(&mut events, &[b"data: 1\n\ndata: 2\n\n"]), vec![b"data: 1\n\ndata: 2\n\n".to_vec()]);
        assert!(events.finish().is_empty());
    }

    #[test]
    fn half_an_event_waits_for_its_end() {
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        let out = feed(&mut events, &[b"data: 1\n\ndata: {\"x", b"\":2}\n", b"\ndata"]);
        assert_eq!(out, vec![b"data: 1\n\n".to_vec(), vec![], b"data: {\"x\":2}\n\n".to_vec()]);
        assert_eq!(events.finish().as_ref(), b"data");
    }

    #[test]
    fn crlf_split_between_cr_and_lf_is_one_line_end() {
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        let out = feed(&mut events, &[b"data: 1\r", b"\n\r", b"\ndata: 2\r\n"]);
        // The event is complete at the second CR; the LF after it goes with the next event.
        assert_eq!(out.concat(), b"data: 1\r\n\r".to_vec());
        assert_eq!(events.finish().as_ref(), b"\ndata: 2\r\n");
    }

    #[test]
    fn an_interrupted_stream_ends_with_a_parsable_error_event() {
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        let sent = events.push(Bytes::from_static(b"data: 1\n\ndata: {\"choi")).unwrap();
        let error = GatewayError::interrupted(&"cut");
        let end = events.interrupt(&error);
        assert_eq!(sent.as_ref(), b"data: 1\n\n");
        let text = std::str::from_utf8(&end).unwrap();
        let json: serde_json::Value = serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap();
        assert_eq!(json["error"]["code"], "stream_interrupted");
        assert!(text.ends_with("\n\n"));
    }

    #[test]
    fn an_event_over_the_limit_ends_the_stream_after_the_events_before_it() {
        let mut events = CompleteEvents::new(Framing::Sse, 8);
        assert!(events.push(Bytes::from_static(b"data: 1\n\ndata")).unwrap().starts_with(b"data: 1"));
        let long = events.push(Bytes::from_static(b": 12\n\ndata: 123456")).unwrap_err();
        assert_eq!((long.complete.as_ref(), long.rest.as_ref()), (&b"data: 12\n\n"[..], &b"data: 123456"[..]));
        let end = events.interrupt(&GatewayError::stream_event_too_large(8));
        assert!(end.starts_with(b"data: {\"error\"") && end.ends_with(b"\n\n"));
        assert!(std::str::from_utf8(&end).unwrap().contains(r#""code":"stream_event_too_large""#));

        let mut lines = CompleteEvents::new(Framing::Ndjson, 8);
        assert!(lines.push(Bytes::from_static(b"{\"a\":")).unwrap().is_empty());
        let long = lines.push(Bytes::from_static(b"\"long\"")).unwrap_err();
        assert!(long.complete.is_empty() && long.rest.as_ref() == b"{\"a\":\"long\"");
    }

    #[test]
    fn an_event_of_exactly_the_limit_passes() {
        let mut events = CompleteEvents::new(Framing::Sse, 9);
        assert!(events.push(Bytes::from_static(b"data: 123")).unwrap().is_empty());
        assert_eq!(events.push(Bytes::from_static(b"\n\n")).unwrap().as_ref(), b"data: 123\n\n");
    }

    proptest! {
        #[test]
        fn any_split_passes_the_same_bytes_and_only_whole_events(
            cuts in proptest::collection::btree_set(0..STREAM.len(), 0..12)
        ) {
            let cuts: Vec<usize> = cuts.into_iter().collect();
            let (out, rest) = split_and_feed(&cuts);
            let passed: Vec<u8> = out.concat();
            prop_assert_eq!([passed.clone(), rest].concat(), STREAM.to_vec());
            let mut so_far = Vec::new();
            for piece in out {
                so_far.extend_from_slice(&piece);
                prop_assert!(is_boundary(&so_far), "passed on half an event: {:?}", String::from_utf8_lossy(&so_far));
            }
            // Everything up to the last boundary has been passed on.
            prop_assert_eq!(passed.len(), STREAM.len());
        }

        #[test]
        fn arbitrary_bytes_are_passed_on_in_order_until_an_event_is_too_long(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)
        ) {
            let mut events = CompleteEvents::new(Framing::Sse, 32);
            let mut out = Vec::new();
            let mut fed = 0;
            for chunk in &chunks {
                fed += chunk.len();
                match events.push(Bytes::copy_from_slice(chunk)) {
                    Ok(complete) => out.extend_from_slice(&complete),
                    Err(long) => {
                        out.extend_from_slice(&long.complete);
                        prop_assert!(long.rest.len() > 32);
                        out.extend_from_slice(&long.rest);
                        break;
                    }
                }
                prop_assert!(events.held_bytes() <= 32);
            }
            out.extend_from_slice(&events.finish());
            prop_assert_eq!(&out[..], &chunks.concat()[..fed]);
        }

        /// Any events, with any of the three line endings, cut anywhere: the
        /// same events come out, whole, and one over the limit ends the stream.
        #[test]
        fn events_with_any_line_ending_cut_anywhere_come_out_whole(
            events in proptest::collection::vec(("[a-z{}\":,]{0,24}", 0..3usize), 1..8),
            cuts in proptest::collection::btree_set(0usize..400, 0..10),
            max in 8usize..40,
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (data, ending) in &events {
                let eol: &[u8] = [&b"\n"[..], b"\r", b"\r\n"][*ending];
                let event = [b"data: ", data.as_bytes(), eol, eol].concat();
                expected.push(event.clone());
                stream.extend_from_slice(&event);
            }
            let mut framer = CompleteEvents::new(Framing::Sse, max);
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < stream.len()).collect();
            bounds.insert(0, 0);
            bounds.push(stream.len());
            let mut out = Vec::new();
            let mut too_long = false;
            for piece in bounds.windows(2).map(|w| &stream[w[0]..w[1]]) {
                match framer.push(Bytes::copy_from_slice(piece)) {
                    Ok(complete) => out.extend_from_slice(&complete),
                    Err(long) => {
                        out.extend_from_slice(&long.complete);
                        too_long = true;
                        break;
                    }
                }
            }
            if !too_long {
                out.extend_from_slice(&framer.finish());
            }
            // A CRLF cut between its CR and LF puts the LF at the start of the next event.
            let normalise = |e: &[u8]| e.iter().filter(|&&b| b != b'\n').copied().collect::<Vec<u8>>();
            let got: Vec<Vec<u8>> = sse_events(&out).map(normalise).filter(|e| !e.is_empty()).collect();
            let want: Vec<Vec<u8>> = expected.iter().map(|e| normalise(e)).collect();
            // Events of at most `max` bytes (an event's LF after a cut CR aside) are never too long.
            let fits = expected.iter().all(|e| e.len() < max);
            prop_assert!(!(fits && too_long));
            if too_long {
                prop_assert!(want.starts_with(&got), "{:?} is not a prefix of {:?}", got, want);
            } else {
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn event_data_joins_data_lines_and_skips_the_rest() {
        let events =
            event_data(b"event: a\ndata: 1\n\n: comment\n\nevent: ping\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]");
        assert_eq!(events, vec![b"1".to_vec(), b"x\ny".to_vec(), b"[DONE]".to_vec()]);
    }

    #[test]
    fn event_data_ends_lines_where_the_framing_does() {
        // A CR alone ends a line, so the data cannot depend on where the stream was cut.
        let stream = b"data: 1\r\rdata: 2\r\n\r\ndata: 3\r\r";
        assert_eq!(event_data(stream), vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
        let mut events = CompleteEvents::new(Framing::Sse, DEFAULT_MAX_EVENT_BYTES);
        let in_pieces: Vec<Vec<u8>> = stream
            .chunks(9)
            .flat_map(|piece| event_data(&events.push(Bytes::copy_from_slice(piece)).unwrap()))
            .collect();
        assert_eq!(in_pieces, event_data(stream));
    }

    #[test]
    fn ndjson_passes_whole_lines_and_ends_with_an_error_line() {
        let mut lines = CompleteEvents::new(Framing::Ndjson, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(lines.push(Bytes::from_static(b"{\"a\":1}\n{\"b\"")).unwrap().as_ref(), b"{\"a\":1}\n");
        assert_eq!(lines.push(Bytes::from_static(b":2}\n")).unwrap().as_ref(), b"{\"b\":2}\n");
        lines.push(Bytes::from_static(b"{\"c")).unwrap();
        let error = GatewayError::bad_answer("a cut");
        assert_eq!(lines.interrupt(&error).as_ref(), b"{\"error\":\"The backend answered with a cut.\"}\n");
    }

    #[test]
    fn every_single_cut_gives_identical_output() {
        for cut in 0..=STREAM.len() {
            let (out, rest) = split_and_feed(&[cut]);
            assert_eq!(out.concat(), STREAM.to_vec(), "cut at {cut}");
            assert!(rest.is_empty());
        }
    }
}
