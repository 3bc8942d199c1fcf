//! What every dialect's answer translation shares: the plan from status and
//! content-type, the loop that cuts a streamed answer into records in the
//! dialect's framing and ends it early on a record it cannot read, and the
//! writer of OpenAI chunks.

use crate::dialect::ResponsePlan;
use modelgate_proto::clock;
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::{error_event, CompleteEvents, Framing};
use serde::Serialize;
use serde_json::Value;

/// The plan for an answer from a backend whose streams come in `framing`:
/// a success in that framing streams, as OpenAI server-sent events; anything
/// else is whole JSON. The status is the backend's.
pub fn plan(status: u16, content_type: &[u8], framing: Framing) -> ResponsePlan {
    let streamed = (200..300).contains(&status) && Framing::from_content_type(content_type) == Some(framing);
    ResponsePlan {
        status,
        streamed,
        content_type: Some(if streamed { Framing::Sse.content_type() } else { "application/json" }),
    }
}

/// What a dialect makes of each record (an SSE event's data, an NDJSON line) of its streamed answer.
pub trait RecordTranslator {
    /// Writes the OpenAI events for one record: `record` parsed, `raw` as it came.
    fn translate(&mut self, record: &Value, raw: &[u8], out: &mut Vec<u8>);

    /// Writes the event that ends the stream early with `error`: OpenAI's
    /// error event, unless the client's API has its own.
    fn write_error(&mut self, error: &GatewayError, out: &mut Vec<u8>) {
        out.extend_from_slice(&error_event(error));
    }

    /// Writes what the end of an OpenAI stream means to the client's API:
    /// `data: [DONE]` is no JSON record. Only a translation of chat
    /// completions' own stream meets it.
    fn done(&mut self, _out: &mut Vec<u8>) {}

    /// Writes what the end of the backend's stream means when nothing ended
    /// it before (a translation whose API must always close its stream).
    fn end(&mut self, _out: &mut Vec<u8>) {}
}

/// A streamed answer turned into OpenAI events record by record. A record
/// that is not JSON, or one too long to hold, ends the stream with an error
/// event, so nothing the backend sent is dropped unsaid.
pub struct RecordStream<T> {
    records: CompleteEvents,
    framing: Framing,
    /// The stream was ended with an error event; whatever follows is dropped.
    ended: bool,
    translator: T,
}

impl<T: RecordTranslator> RecordStream<T> {
    pub fn new(framing: Framing, max_event_bytes: usize, translator: T) -> Self {
        RecordStream { records: CompleteEvents::new(framing, max_event_bytes), framing, ended: false, translator }
    }

    /// Whether the stream was ended with an error event.
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn translator(&self) -> &T {
        &self.translator
    }

    /// The OpenAI events for `piece`; `end` on the last.
    pub fn push(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        let (complete, too_long) = match self.records.take(piece, end) {
            Ok(complete) => (complete, None),
            Err(long) => {
                (long.complete.to_vec(), Some(GatewayError::stream_event_too_large(self.records.max_event_bytes())))
            }
        };
        for raw in self.framing.records(&complete) {
            if *raw == *b"[DONE]" {
                self.translator.done(&mut out);
                continue;
            }
            match serde_json::from_slice::<Value>(&raw) {
                Ok(record) => self.translator.translate(&record, &raw, &mut out),
                Err(e) => return self.end_with(out, &GatewayError::stream_unreadable(&e)),
            }
        }
        match too_long {
            Some(error) => self.end_with(out, &error),
            None => {
                if end {
                    self.translator.end(&mut out);
                }
                out
            }
        }
    }

    /// `out` followed by `error`'s event, the stream's last: how a translated
    /// stream ends early (an event too long to hold, one that cannot be read),
    /// logged once here.
    fn end_with(&mut self, mut out: Vec<u8>, error: &GatewayError) -> Vec<u8> {
        self.ended = true;
        tracing::warn!(reason = error.message, "ending a translated stream early");
        self.translator.write_error(error, &mut out);
        out
    }
}

/// A piece of an answer: translated when the plan streams it, passed on as it is otherwise.
pub fn push<T: RecordTranslator>(stream: &mut Option<RecordStream<T>>, piece: &[u8], end: bool) -> Vec<u8> {
    match stream {
        Some(stream) => stream.push(piece, end),
        None => piece.to_vec(),
    }
}

/// What every chunk of one translated OpenAI stream repeats, and how chunks are written.
pub struct StreamHead {
    id: Value,
    /// `chat.completion.chunk` or `text_completion`.
    object: &'static str,
    created: u64,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    include_usage: bool,
    /// `{"id":…,"object":…,"created":…,"model":…,`: every chunk's start, serialised once per stream.
    prefix: Vec<u8>,
}

impl StreamHead {
    pub fn new(object: &'static str, id: Value, model: Value, include_usage: bool) -> Self {
        let mut head =
            StreamHead { id: Value::Null, object, created: clock::unix_seconds(), include_usage, prefix: Vec::new() };
        head.identify(id, model);
        head
    }

    /// Sets the stream's id and model, for dialects that name them only in their first event.
    pub fn identify(&mut self, id: Value, model: Value) {
        self.prefix = format!(r#"{{"id":{id},"object":"{}","created":{},"model":{model},"#, self.object, self.created)
            .into_bytes();
        self.id = id;
    }

    pub fn id(&self) -> &Value {
        &self.id
    }

    /// Writes a chunk with one choice.
    pub fn write_choice(&self, out: &mut Vec<u8>, choice: Value) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(br#""choices":["#);
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &choice);
        out.push(b']');
        // With the usage chunk asked for, every other chunk says `usage: null`, as OpenAI's do.
        if self.include_usage {
            out.extend_from_slice(br#","usage":null"#);
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// Ends the stream: the usage chunk if it was asked for, then `[DONE]`.
    pub fn write_end(&self, out: &mut Vec<u8>, usage: impl Serialize) {
        if self.include_usage {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(br#""choices":[],"usage":"#);
            let _ = serde_json::to_writer(&mut *out, &usage);
            out.extend_from_slice(b"}\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_are_openai_chunks_in_openais_key_order() {
        let mut head = StreamHead::new("chat.completion.chunk", Value::Null, Value::Null, true);
        head.identify(json!("msg_1"), json!("claude-x"));
        let mut out = Vec::new();
        head.write_choice(&mut out, json!({"index": 0, "delta": {"content": "Hi \"there\""}}));
        head.write_end(&mut out, json!({"total_tokens": 3}));
        let created = head.created;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "data: {{\"id\":\"msg_1\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":\"claude-x\",\"choices\":[{{\"delta\":{{\"content\":\"Hi \\\"there\\\"\"}},\"index\":0}}],\"usage\":null}}\n\n\
                 data: {{\"id\":\"msg_1\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":\"claude-x\",\"choices\":[],\"usage\":{{\"total_tokens\":3}}}}\n\n\
                 data: [DONE]\n\n"
            )
        );
    }

    #[test]
    fn only_a_success_in_the_dialects_framing_streams() {
        assert!(plan(200, b"application/x-ndjson", Framing::Ndjson).streamed);
        assert!(!plan(200, b"text/event-stream", Framing::Ndjson).streamed);
        assert!(!plan(429, b"text/event-stream", Framing::Sse).streamed);
        assert_eq!(plan(429, b"text/event-stream", Framing::Sse).content_type, Some("application/json"));
    }
}
