//! Error answers from a backend (any body) or from Envoy itself (any
//! `response.code_details`), rewritten as OpenAI error envelopes.
//!
//! Invariants: what is rewritten is exactly OpenAI's envelope, and the
//! normaliser takes its own output as final (normalising twice changes
//! nothing); a quoted non-JSON body is bounded. On Anthropic's API, what the
//! client gets is Anthropic's envelope, and final too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_fuzz::assert_envelope;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error_normalize::{normalize, normalize_in, Origin};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, rest @ ..] = data else { return };
    let status = 400 + u16::from_le_bytes([*a, *b]) % 200;
    let attempts = u32::from(c & 3) + 1;
    let (origin, body) = if c & 4 == 0 {
        (Origin::Backend { attempts }, rest)
    } else {
        // Envoy's details, then its body, split at the first NUL.
        let at = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let Ok(details) = std::str::from_utf8(&rest[..at]) else { return };
        (Origin::Envoy { details, attempts }, rest.get(at + 1..).unwrap_or_default())
    };
    let anthropic = normalize_in(ClientApi::Anthropic, status, origin, body).map_or(body.to_vec(), |r| r.body);
    let envelope: serde_json::Value = serde_json::from_slice(&anthropic).expect("Anthropic's envelope is JSON");
    assert!(
        envelope["type"] == "error" && envelope["error"]["type"].is_string() && envelope["error"]["message"].is_string(),
        "not Anthropic's envelope: {envelope}"
    );
    assert_eq!(normalize_in(ClientApi::Anthropic, status, origin, &anthropic), None, "normalised twice: {envelope}");
    let Some(rewritten) = normalize(status, origin, body) else {
        // Left as it is: it is an envelope already.
        let value: serde_json::Value = serde_json::from_slice(body).expect("kept as it is only if JSON");
        assert!(value["error"].is_object(), "kept as it is only if an envelope: {value}");
        return;
    };
    assert_envelope(&rewritten.body);
    let again = [Origin::Backend { attempts: 1 }, Origin::Envoy { details: "via_upstream", attempts: 1 }];
    for origin in again {
        assert_eq!(normalize(status, origin, &rewritten.body), None, "normalised twice: {:?}", rewritten);
    }
    // Envoy's details (its own words, not a client's or a backend's) may be quoted whole.
    if matches!(origin, Origin::Backend { .. }) && serde_json::from_slice::<serde_json::Value>(body).is_err() {
        let envelope: serde_json::Value = serde_json::from_slice(&rewritten.body).expect("JSON");
        let message = envelope["error"]["message"].as_str().expect("a message");
        assert!(message.chars().count() < 600, "a quoted body is bounded: {message}");
    }
});
