//! An Anthropic backend's answer, streamed in arbitrary pieces or whole,
//! translated to OpenAI's.
//!
//! Invariants: the stream the client gets is well-formed OpenAI SSE (each
//! event one `data:` line of a JSON chunk or error, or `[DONE]`), whatever the
//! cuts the same (but for the `created` second); a whole answer becomes JSON
//! (a completion, or an OpenAI error envelope), or is passed on untouched for
//! the error normaliser when it is not JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dialects::dialect::ResponseContext;
use modelgate_fuzz::{assert_chunk_or_error, assert_envelope, comparable, openai_events, Cut};
use modelgate_proto::backend::Dialect;
use modelgate_proto::endpoint::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let mut context = ResponseContext::new(Dialect::Anthropic, Endpoint::ChatCompletions);
    context.include_usage = mode & 1 == 1;
    if mode & 2 == 0 {
        let cut = Cut::new(data);
        let pieces = cut.pieces();
        let streamed = |pieces: &[&[u8]]| {
            let mut translation = context.translator().expect("Anthropic answers are translated");
            let plan = translation.plan(200, b"text/event-stream; charset=utf-8");
            assert!(plan.streamed);
            let mut out = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                out.extend(translation.stream(piece, i + 1 == pieces.len()));
            }
            openai_events(&out)
        };
        let events = streamed(&pieces);
        for event in &events {
            assert_chunk_or_error(event, "chat.completion.chunk");
        }
        let whole = streamed(&[cut.stream]);
        assert_eq!(comparable(events, None), comparable(whole, None), "the translation depends on the cuts");
        return;
    }
    let status = if mode & 4 == 0 { 200 } else { [400, 401, 404, 429, 500, 529][usize::from(mode >> 3) % 6] };
    let mut translation = context.translator().expect("Anthropic answers are translated");
    let plan = translation.plan(status, b"application/json");
    assert!(!plan.streamed);
    assert_ne!(plan.status, 529, "OpenAI clients know no 529");
    let out = translation.whole(status, data);
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert_eq!(out, data, "what is not JSON is left to the error normaliser");
        return;
    };
    if status == 200 {
        let completion: serde_json::Value = serde_json::from_slice(&out).expect("a completion is JSON");
        assert_eq!(completion["object"], "chat.completion");
        assert!(completion["usage"]["total_tokens"].is_u64());
    } else if out != data || answer.get("error").is_some_and(|e| e.is_object()) {
        assert_envelope(&out);
    }
});
