//! SSE and NDJSON framing of a backend's stream, cut anywhere.
//!
//! Invariants: the bytes passed on and the rest held back are the stream, in
//! order; what is passed on ends at an event boundary and does not depend on
//! where the stream was cut; no more than the limit is ever held; each event's
//! data does not depend on the cuts either; an event longer than the limit
//! ends the stream (never passed on in pieces); and an interrupted stream
//! ends with a record the client can parse.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use modelgate_proto::framing::{event_data, CompleteEvents, Framing, DEFAULT_MAX_EVENT_BYTES};
use modelgate_fuzz::Cut;
use modelgate_proto::error::GatewayError;

/// Everything `events` passes on for `stream` pushed as one piece.
fn at_once(framing: Framing, stream: &[u8]) -> Vec<u8> {
    CompleteEvents::new(framing, DEFAULT_MAX_EVENT_BYTES).push(Bytes::copy_from_slice(stream)).map_or_else(|_| unreachable!("fuzz inputs are shorter than the real limit"), |b| b.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let framing = if mode & 1 == 0 { Framing::Sse } else { Framing::Ndjson };
    // Mostly the real limit; sometimes a tiny one, so long events end the stream.
    let limit = if mode & 2 == 0 { DEFAULT_MAX_EVENT_BYTES } else { usize::from(mode >> 2) };
    let cut = Cut::new(data);
    let mut events = CompleteEvents::new(framing, limit);
    let mut passed = Vec::new();
    let mut taken = 0;
    let mut per_push_data = Vec::new();
    for piece in cut.pieces() {
        let out = match events.push(Bytes::copy_from_slice(piece)) {
            Ok(out) => out,
            Err(too_long) => {
                // The events it completed, then the long one's start: together what was taken.
                assert!(limit < DEFAULT_MAX_EVENT_BYTES, "an event shorter than the real limit was refused");
                passed.extend_from_slice(&too_long.complete);
                passed.extend_from_slice(&too_long.rest);
                assert_eq!(passed, cut.stream[..taken + piece.len()], "the stream so far, in order");
                return;
            }
        };
        taken += piece.len();
        passed.extend_from_slice(&out);
        assert!(taken - passed.len() <= limit, "held {} bytes over the limit {limit}", taken - passed.len());
        if limit == DEFAULT_MAX_EVENT_BYTES {
            // Only whole events: passed at once, the same bytes go through whole.
            assert_eq!(at_once(framing, &passed), passed, "passed on part of an event");
            per_push_data.extend(event_data(&out));
        }
    }
    if limit == DEFAULT_MAX_EVENT_BYTES {
        // The same, but that the LF of a CRLF whose CR ended an event waits for the next piece.
        let whole = at_once(framing, cut.stream);
        let lf_waits = whole.ends_with(b"\r\n") && passed.len() + 1 == whole.len();
        assert!(passed == whole || lf_waits && whole.starts_with(&passed), "what is passed on depends on the cuts");
        if framing == Framing::Sse {
            assert_eq!(per_push_data, event_data(&passed), "event data depends on the cuts");
        }
    }
    if mode & 0x80 == 0 {
        passed.extend_from_slice(&events.finish());
        assert_eq!(passed, cut.stream, "the stream is passed on whole and in order");
        return;
    }
    // A reason with a quote and a line break, which the event must escape.
    let error = GatewayError::interrupted(&"cut \"short\"\n");
    passed.extend_from_slice(&events.interrupt(&error));
    match framing {
        Framing::Sse => {
            let last = event_data(&passed).pop().expect("an error event");
            assert_eq!(last, error.to_json(), "the stream ends with the error event");
        }
        Framing::Ndjson => {
            let body = passed.strip_suffix(b"\n").expect("a whole line");
            let line = body.rsplit(|&b| b == b'\n').next().unwrap_or(body);
            let value: serde_json::Value = serde_json::from_slice(line).expect("the last line is JSON");
            assert_eq!(value["error"], error.message);
        }
    }
});
