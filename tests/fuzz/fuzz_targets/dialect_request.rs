//! A client's request body translated for each dialect's backend (OpenAI's
//! rewrite, Anthropic's Messages API, Ollama's native API), on each endpoint,
//! with and without a profile that renames the model and sets defaults.
//!
//! Invariants: a body that is not a JSON object is refused; a refusal is an
//! OpenAI error with a 4xx status; a translated body is a JSON object with the
//! model the backend expects; what the answer's translation is told of the
//! request agrees with the request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_dialects::dialect::request_translator;
use modelgate_fuzz::assert_envelope;
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::endpoint::Endpoint;
use serde::de::IgnoredAny;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let dialect = [Dialect::Openai, Dialect::Anthropic, Dialect::Ollama][usize::from(mode & 3) % 3];
    let endpoint =
        [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings][usize::from(mode >> 2 & 3) % 3];
    let mut profile = BackendProfile { dialect, ..Default::default() };
    if mode & 16 != 0 {
        profile.model = Some("renamed".into());
        profile.defaults = json!({"max_tokens": 64, "temperature": 0.5, "options": {"num_ctx": 8192}})
            .as_object()
            .cloned()
            .expect("an object");
    }
    let renames = profile.model.is_some();
    let mut translation = match request_translator(profile, endpoint) {
        Ok(translation) => translation,
        Err(refusal) => {
            assert!(dialect == Dialect::Anthropic && endpoint != Endpoint::ChatCompletions);
            assert_eq!(refusal.status, 404);
            return;
        }
    };
    // Numbers past f64's range are JSON all the same: OpenAI's rewrite passes them on.
    let is_object = serde_json::from_slice::<BTreeMap<String, IgnoredAny>>(body).is_ok();
    match translation.request(body) {
        Ok(upstream) => {
            // Only OpenAI's passthrough takes a body it did not parse.
            assert!(
                is_object || (dialect == Dialect::Openai && upstream.body.is_none()),
                "took a body that is not a JSON object"
            );
            let Some(out) = upstream.body else {
                assert_eq!(dialect, Dialect::Openai);
                return;
            };
            let object = serde_json::from_slice::<BTreeMap<String, IgnoredAny>>(&out);
            assert!(object.is_ok(), "the backend's body is a JSON object: {:?}", String::from_utf8_lossy(&out));
            let Ok(out) = serde_json::from_slice::<Value>(&out) else { return };
            if renames {
                assert_eq!(out["model"], "renamed");
            }
            let Ok(request) = serde_json::from_slice::<Value>(body) else { return };
            if let Some(context) = translation.response_context() {
                assert_eq!(context.dialect, dialect);
                let asked = request.get("stream_options").is_some_and(|o| o["include_usage"] == true);
                assert_eq!(context.include_usage, asked, "the usage chunk was asked for: {request}");
            }
        }
        Err(refusal) => {
            assert!((400..500).contains(&refusal.status), "a refusal is a 4xx: {refusal:?}");
            assert_envelope(&refusal.to_json());
        }
    }
});
