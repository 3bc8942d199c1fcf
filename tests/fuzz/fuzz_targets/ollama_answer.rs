//! An Ollama backend's answer, NDJSON lines in arbitrary pieces or whole,
//! translated to OpenAI's, on each endpoint.
//!
//! Invariants: the stream the client gets is well-formed OpenAI SSE, the same
//! whatever the cuts (but for the id the gateway makes up and the `created`
//! second); a whole answer becomes JSON of the endpoint's kind, an OpenAI
//! error envelope, or is passed on untouched when it is not JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dialects::dialect::ResponseContext;
use modelgate_fuzz::{assert_chunk_or_error, assert_envelope, comparable, first_id, openai_events, Cut};
use modelgate_proto::backend::Dialect;
use modelgate_proto::endpoint::Endpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let endpoint = [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings][usize::from(mode & 3) % 3];
    let mut context = ResponseContext::new(Dialect::Ollama, endpoint);
    context.include_usage = mode & 4 != 0;
    context.base64 = mode & 8 != 0;
    context.model = serde_json::json!("llama3");
    if mode & 16 == 0 && endpoint != Endpoint::Embeddings {
        let cut = Cut::new(data);
        let pieces = cut.pieces();
        let object = if endpoint == Endpoint::ChatCompletions { "chat.completion.chunk" } else { "text_completion" };
        let streamed = |pieces: &[&[u8]]| {
            let mut translation = context.translator().expect("Ollama answers are translated");
            assert!(translation.plan(200, b"application/x-ndjson").streamed);
            let mut out = Vec::new();
            for (i, piece) in pieces.iter().enumerate() {
                out.extend(translation.stream(piece, i + 1 == pieces.len()));
            }
            let events = openai_events(&out);
            for event in &events {
                assert_chunk_or_error(event, object);
            }
            let id = first_id(&events);
            comparable(events, id.as_deref())
        };
        assert_eq!(streamed(&pieces), streamed(&[cut.stream]), "the translation depends on the cuts");
        return;
    }
    let status = if mode & 32 == 0 { 200 } else { [400, 404, 500, 503][usize::from(mode >> 6)] };
    let mut translation = context.translator().expect("Ollama answers are translated");
    assert!(!translation.plan(status, b"application/json").streamed);
    let out = translation.whole(status, data);
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else {
        assert_eq!(out, data, "what is not JSON is left to the error normaliser");
        return;
    };
    if status == 200 {
        let value: serde_json::Value = serde_json::from_slice(&out).expect("an answer is JSON");
        let object = match endpoint {
            Endpoint::ChatCompletions => "chat.completion",
            Endpoint::Completions => "text_completion",
            Endpoint::Embeddings => "list",
            _ => {
                unreachable!("only model-routed endpoints are fuzzed")
            }
        };
        assert_eq!(value["object"], object);
        assert!(value["usage"]["total_tokens"].is_u64());
    } else if answer["error"].is_string() {
        assert_envelope(&out);
    } else {
        assert_eq!(out, data);
    }
});
