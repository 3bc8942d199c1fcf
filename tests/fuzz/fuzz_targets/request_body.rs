//! The filter's reading of a client's request body: the routing fields
//! (`model`, `stream`, `stream_options`), the route, and the edit that asks a
//! stream's backend for usage when the gateway counts tokens.
//!
//! Invariants: a refusal is exactly OpenAI's envelope with a 4xx; where
//! `stream_options` lies is where its value is; the edited body is JSON that
//! routes the same, asks for usage, and keeps every other member; the
//! Responses and Messages APIs' bodies are never edited.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_filter::request::on_request_body;
use modelgate_filter::routing_fields::read_routing_fields;
use modelgate_fuzz::assert_envelope;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::routing::Router;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

thread_local! {
    // Accounting on: a stream that does not ask for usage is made to.
    static ROUTER: Router = Router::from_json(
        br#"{"accounting": {"cluster": "admin"},
            "backends": {"a": {"cluster": "ca"}, "b": {"cluster": "cb"}},
            "models": [{"match": "llama-*", "backend": "a"}, {"match": "*", "backend": "b"}]}"#,
    ).expect("a valid configuration");
}

fuzz_target!(|body: &[u8]| {
    let fields = read_routing_fields(body);
    for endpoint in [Endpoint::Responses, Endpoint::Messages, Endpoint::CountTokens] {
        if let Ok(routing) = ROUTER.with(|r| on_request_body(r, body, None, endpoint)) {
            assert!(routing.body_edit.is_none() && !routing.usage_unasked, "{endpoint:?}'s body was edited");
        }
    }
    let routing = match ROUTER.with(|r| on_request_body(r, body, None, Endpoint::ChatCompletions)) {
        Ok(routing) => routing,
        Err(reply) => {
            assert!((400..500).contains(&reply.status), "{}", reply.status);
            assert_envelope(&reply.body);
            return;
        }
    };
    let fields = fields.expect("a routed body has routing fields");
    assert_eq!((&routing.model, routing.stream), (&fields.model, fields.stream));
    assert!(!routing.model.is_empty());
    if let Some(at) = &fields.stream_options_at {
        let raw = body.get(at.clone()).expect("stream_options lies inside the body");
        serde_json::from_slice::<IgnoredAny>(raw).expect("stream_options' value is JSON");
        if let Some(options) = &fields.stream_options {
            assert_eq!(serde_json::from_slice::<Map<String, Value>>(raw).ok().as_ref(), Some(options));
        }
    }
    assert_eq!(routing.usage_unasked, fields.stream && !fields.asks_usage());
    let Some(edit) = routing.body_edit else {
        return;
    };
    let edited = edit.apply(body);
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(&edited) {
        panic!("edited body is not JSON ({e}): {:?}", String::from_utf8_lossy(&edited));
    }
    let again = read_routing_fields(&edited).expect("the edited body routes");
    assert_eq!((again.model.as_str(), again.stream), (fields.model.as_str(), fields.stream));
    assert!(again.asks_usage(), "the edited body asks for usage");
    // Numbers past f64's range are JSON all the same, but no `Value`: those bodies are checked above only.
    let Ok(Value::Object(mut before)) = serde_json::from_slice::<Value>(body) else { return };
    let after: Map<String, Value> = serde_json::from_slice(&edited).expect("as JSON as the body");
    let options = before.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    options["include_usage"] = Value::Bool(true);
    assert!(same(&Value::Object(before), &Value::Object(after)), "the edit changed more than stream_options");
});

/// Equal JSON, but that a decimal may differ in its last place: serde_json
/// parses decimals fast rather than exactly, so the `stream_options` the
/// filter writes back may read one unit in the last place off.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()) * 4.0
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}
