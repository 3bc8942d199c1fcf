//! The usage readers over an answer cut anywhere: `UsageReader` (finds the
//! `usage` of a whole answer or a stream it does not change) and
//! `UnaskedUsage` (removes the usage chunk and the `"usage":null` members a
//! client did not ask for).
//!
//! Invariants: the usage found and the bytes passed on do not depend on the
//! cuts; nothing is added to the stream; a stream without a `"usage"` member
//! passes untouched; a JSON event stays JSON once its `"usage":null` is gone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_fuzz::Cut;
use modelgate_proto::usage::{UnaskedUsage, UsageReader};

fn read(pieces: &[&[u8]]) -> Option<modelgate_proto::usage::Usage> {
    let mut reader = UsageReader::default();
    for piece in pieces {
        reader.feed(piece);
    }
    reader.usage()
}

fn unasked(pieces: &[&[u8]]) -> (Vec<u8>, Option<modelgate_proto::usage::Usage>) {
    let mut filter = UnaskedUsage::default();
    let mut out = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        out.extend(filter.pass(piece, i + 1 == pieces.len()));
    }
    (out, filter.usage())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    if mode & 1 == 0 {
        // One chunk's JSON as an event: what is passed on must still parse.
        let Ok(serde_json::Value::Object(_)) = serde_json::from_slice(data) else { return };
        let event = [b"data: ", data, b"\n\n"].concat();
        let (out, _) = unasked(&[&event]);
        if !out.is_empty() {
            let json = out.strip_prefix(b"data: ").and_then(|o| o.strip_suffix(b"\n\n")).expect("one event");
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(json) {
                panic!("{e}: {:?} became {:?}", String::from_utf8_lossy(data), String::from_utf8_lossy(json));
            }
        }
        return;
    }
    let cut = Cut::new(data);
    let pieces = cut.pieces();
    assert_eq!(read(&pieces), read(&[cut.stream]), "the usage read depends on the cuts");
    let (out, usage) = unasked(&pieces);
    assert_eq!((out.clone(), usage), unasked(&[cut.stream]), "the stream passed on depends on the cuts");
    assert!(out.len() <= cut.stream.len(), "bytes were added");
    if !cut.stream.windows(7).any(|w| w == b"\"usage\"") {
        assert_eq!(out, cut.stream, "a stream without usage passes untouched");
    }
});
