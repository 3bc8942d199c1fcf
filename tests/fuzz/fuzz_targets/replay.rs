//! The response cache's replay: an answer as the filter hands it over (a
//! whole answer or a stream, on each cacheable endpoint) made whole, then
//! replayed whole and as a stream.
//!
//! Invariants: nothing panics; what is kept replays whole as the same JSON;
//! its stream is well-formed OpenAI SSE (one `data:` line of a chunk of the
//! endpoint's kind per event, `[DONE]` last) and assembles again into an
//! answer that replays and assembles into itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_fuzz::{openai_events, Event};
use modelgate_proto::replay::{replay, whole_answer};
use modelgate_proto::usage::Usage;

const PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let path = PATHS[usize::from(mode & 3) % PATHS.len()];
    let (stream, include_usage) = (mode & 4 != 0, mode & 8 != 0);
    let usage = (mode & 16 != 0).then_some(Usage { prompt_tokens: 3, completion_tokens: 4 });
    let Some(whole) = whole_answer(path, stream, bytes, usage.as_ref()) else { return };
    assert!(whole.is_object(), "{whole}");
    if usage.is_some() {
        assert!(whole["usage"].is_object(), "the usage read stands in: {whole}");
    }
    let (content_type, json) = replay(path, &whole, false, include_usage);
    assert_eq!(content_type, "application/json");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&json).expect("JSON"), whole);
    if path == PATHS[2] {
        assert_eq!(replay(path, &whole, true, include_usage).0, "application/json", "embeddings are never streamed");
        return;
    }
    let (content_type, sse) = replay(path, &whole, true, include_usage);
    assert_eq!(content_type, "text/event-stream");
    let events = openai_events(&sse);
    let object = if path == PATHS[0] { "chat.completion.chunk" } else { "text_completion" };
    let (last, chunks) = events.split_last().expect("events");
    assert!(matches!(last, Event::Done), "ends with [DONE]");
    for chunk in chunks {
        let Event::Json(value) = chunk else { panic!("[DONE] before the end") };
        // The answer's own members (`id`, `created`) are replayed as the backend wrote them.
        assert_eq!(value["object"], object, "chunk kind: {value}");
        assert!(value["choices"].is_array(), "chunk has choices: {value}");
        assert_eq!(value.get("usage").is_some(), include_usage, "usage only where asked: {value}");
    }
    let again = whole_answer(path, true, &sse, None).expect("a replayed stream is kept");
    let (_, twice) = replay(path, &again, true, true);
    assert_eq!(whole_answer(path, true, &twice, None), Some(again), "assembling is a fixpoint");
});
