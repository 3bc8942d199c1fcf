//! What the fuzz targets share: cutting an input into the pieces a network
//! delivers, and the checks of what the gateway sends a client. Nothing here
//! parses what the gateway parses: the targets call the gateway's own code.

use serde_json::Value;

/// An input read as a byte stream cut into pieces: the first byte says how
/// many cuts (0 to 7), the next bytes how long each piece before a cut is,
/// and the rest is the stream. The fuzzer steers the cuts like the bytes.
pub struct Cut<'a> {
    lengths: &'a [u8],
    pub stream: &'a [u8],
}

impl<'a> Cut<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let Some((&first, rest)) = data.split_first() else {
            return Cut { lengths: &[], stream: &[] };
        };
        let cuts = usize::from(first & 7).min(rest.len());
        let (lengths, stream) = rest.split_at(cuts);
        Cut { lengths, stream }
    }

    /// The stream in pieces (some maybe empty), which joined are the stream.
    pub fn pieces(&self) -> Vec<&'a [u8]> {
        let mut rest = self.stream;
        let mut pieces = Vec::new();
        for &length in self.lengths {
            let (piece, after) = rest.split_at(usize::from(length).min(rest.len()));
            pieces.push(piece);
            rest = after;
        }
        pieces.push(rest);
        pieces
    }
}

/// Asserts `body` is exactly OpenAI's error envelope:
/// `{"error":{"message":string,"type":string,"param":string|null,"code":string|null}}`.
pub fn assert_envelope(body: &[u8]) {
    let envelope: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    let object = envelope.as_object().expect("error body is an object");
    assert_eq!(object.len(), 1, "envelope has only `error`: {envelope}");
    assert_error_object(&envelope["error"]);
}

fn assert_error_object(error: &Value) {
    let error = error.as_object().unwrap_or_else(|| panic!("`error` is an object: {error}"));
    assert_eq!(error.len(), 4, "error has message, type, param, code: {error:?}");
    assert!(error["message"].is_string(), "message is a string: {error:?}");
    assert!(error["type"].as_str().is_some_and(|t| !t.is_empty()), "type is a string: {error:?}");
    assert!(matches!(error["param"], Value::String(_) | Value::Null), "param: {error:?}");
    assert!(matches!(error["code"], Value::String(_) | Value::Null), "code: {error:?}");
}

/// One event of an OpenAI stream as a client reads it.
#[derive(Debug, PartialEq)]
pub enum Event {
    Json(Value),
    Done,
}

/// Asserts `out` is a well-formed OpenAI stream (every event one
/// `data: <payload>` line and a blank line, the payload `[DONE]` or a JSON
/// object on one line) and returns its events.
pub fn openai_events(out: &[u8]) -> Vec<Event> {
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("stream is not UTF-8 ({e}): {out:?}"));
    let mut events = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (event, after) =
            rest.split_once("\n\n").unwrap_or_else(|| panic!("unterminated event {rest:?} in {text:?}"));
        let payload =
            event.strip_prefix("data: ").unwrap_or_else(|| panic!("event without `data: ` {event:?} in {text:?}"));
        assert!(!payload.contains(['\n', '\r']), "event spans lines: {event:?} in {text:?}");
        if payload == "[DONE]" {
            events.push(Event::Done);
        } else {
            let value: Value = serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("event is not JSON ({e}): {payload:?} in {text:?}"));
            assert!(value.is_object(), "event is not an object: {payload:?}");
            events.push(Event::Json(value));
        }
        rest = after;
    }
    events
}

/// Asserts `event` is a chunk of kind `object` (`chat.completion.chunk`,
/// `text_completion`) or an error event.
pub fn assert_chunk_or_error(event: &Event, object: &str) {
    let Event::Json(value) = event else { return };
    if value.get("error").is_some() {
        assert!(value.get("object").is_none(), "an error event is not a chunk: {value}");
        return;
    }
    assert_eq!(value["object"], object, "chunk kind: {value}");
    assert!(value["choices"].is_array(), "chunk has choices: {value}");
    assert!(value["created"].is_u64(), "chunk has created: {value}");
}

/// The events with what differs from one run to the next left out: the
/// `created` second, and an id the gateway made up (`made_up_id`), which
/// also names tool calls.
pub fn comparable(events: Vec<Event>, made_up_id: Option<&str>) -> Vec<Event> {
    events
        .into_iter()
        .map(|event| match event {
            Event::Json(mut value) => {
                if let Some(object) = value.as_object_mut() {
                    object.remove("created");
                }
                if let Some(id) = made_up_id {
                    value = serde_json::from_str(&value.to_string().replace(id, "ID")).expect("still JSON");
                }
                Event::Json(value)
            }
            Event::Done => Event::Done,
        })
        .collect()
}

/// The id of the first chunk, if it has one.
pub fn first_id(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::Json(v) => v["id"].as_str().map(str::to_string),
        Event::Done => None,
    })
}
