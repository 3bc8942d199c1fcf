//! Reads the fields routing depends on from a JSON request body: `model`,
//! `stream` (streams go through the stream guard) and `stream_options` (the
//! gateway asks for a stream's usage when the client did not); and, for token
//! limits, the answer's bound (`max_completion_tokens`, `max_tokens`, the
//! Responses API's `max_output_tokens`) and where the prompt lies (`messages`,
//! `prompt`, `input`).
//!
//! The body is parsed once, in full (so malformed JSON is refused), but only
//! these two values are kept: every other value is skipped without being built.
//! When a key appears more than once the last one wins, as it does for the
//! Python and Go JSON decoders backends use, so routing and backend agree.

use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use modelgate_proto::limits::{self, TokenEstimate};
use modelgate_proto::params;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt;
use std::ops::Range;

/// What routing needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingFields {
    pub model: String,
    /// Where the value of `model` lies in the body, when the body names it
    /// once (a rename replaces it there; a body naming it twice is left to
    /// ext-proc, which keeps one).
    pub model_at: Option<Range<usize>>,
    /// `"stream": true`; absent, null and false are all a single answer.
    pub stream: bool,
    /// `stream_options` as sent, when it is an object.
    pub stream_options: Option<Map<String, Value>>,
    /// Where the value of `stream_options` lies in the body, when it is there.
    pub stream_options_at: Option<Range<usize>>,
    /// `max_completion_tokens`, else `max_tokens` (the older name, and the Messages API's), when a whole number.
    pub max_tokens: Option<u64>,
    /// The Responses API's `max_output_tokens`, when a whole number.
    pub max_output_tokens: Option<u64>,
    /// Where the prompt (`messages`, `prompt`, or an embedding's `input`) lies in the body.
    pub prompt_at: Option<Range<usize>>,
    /// The prompt is an `input`: an embedding's (whose answer generates nothing), or a Responses request's.
    pub embedding: bool,
}

impl RoutingFields {
    /// The client asked for a stream's usage chunk.
    pub fn asks_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.get("include_usage")) == Some(&Value::Bool(true))
    }

    /// The tokens the request to `endpoint` in `body` (the body these fields were read from) may take.
    pub fn token_estimate(&self, body: &[u8], endpoint: Endpoint) -> TokenEstimate {
        // Counting a prompt's tokens uses none: the answer has no usage to settle a reservation with.
        if endpoint == Endpoint::CountTokens {
            return TokenEstimate { prompt: 0, completion: Some(0) };
        }
        let prompt = self.prompt_at.clone().and_then(|at| body.get(at)).map_or(0, limits::prompt_tokens);
        let completion = match endpoint {
            Endpoint::Responses => self.max_output_tokens,
            _ => self.max_tokens.or(self.embedding.then_some(0)),
        };
        TokenEstimate { prompt, completion }
    }
}

/// The routing fields of a request body, or the 400 to answer with.
pub fn read_routing_fields(body: &[u8]) -> Result<RoutingFields, GatewayError> {
    // serde_json does not check the UTF-8 of values it skips; the backend would.
    let body = std::str::from_utf8(body)
        .map_err(|e| GatewayError::invalid_request(format!("The request body is not valid UTF-8 ({e}).")))?;
    let found: Fields = serde_json::from_str(body).map_err(|e| {
        if e.is_data() {
            GatewayError::invalid_request("The request body must be a JSON object.".into())
        } else {
            GatewayError::unparsable_json(&e)
        }
    })?;
    // A borrowed raw value is a slice of `body` itself.
    let span = |raw: &RawValue| {
        let start = (raw.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
        start..start + raw.get().len()
    };
    let stream_options = match found.stream_options.map(|raw| serde_json::from_str::<Value>(raw.get())) {
        Some(Ok(Value::Object(options))) => Some(options),
        _ => None,
    };
    let max_tokens = |value: Option<Value>| value.and_then(|v| v.as_u64());
    Ok(RoutingFields {
        model: params::model(found.model.map(RawValue::get))?,
        model_at: found.model.filter(|_| found.models == 1).map(span),
        stream: stream(found.stream)?,
        stream_options,
        stream_options_at: found.stream_options.map(span),
        max_tokens: max_tokens(found.max_completion_tokens).or(max_tokens(found.max_tokens)),
        max_output_tokens: max_tokens(found.max_output_tokens),
        prompt_at: found.prompt.map(|(_, raw)| span(raw)),
        embedding: found.prompt.is_some_and(|(name, _)| name == Prompt::Input),
    })
}

/// Which member carried the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prompt {
    Messages,
    Text,
    Input,
}

fn stream(value: Option<&RawValue>) -> Result<bool, GatewayError> {
    match value.map(RawValue::get) {
        None | Some("null" | "false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(GatewayError::invalid_type("stream", "a boolean", Some(params::type_name(other)))),
    }
}

/// The values of `model`, `stream` and `stream_options` in a JSON object;
/// anything but an object is a data error.
struct Fields<'de> {
    model: Option<&'de RawValue>,
    /// How many times the object names `model`.
    models: usize,
    stream: Option<&'de RawValue>,
    stream_options: Option<&'de RawValue>,
    max_completion_tokens: Option<Value>,
    max_tokens: Option<Value>,
    max_output_tokens: Option<Value>,
    prompt: Option<(Prompt, &'de RawValue)>,
}

impl<'de> serde::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields {
            model: None,
            models: 0,
            stream: None,
            stream_options: None,
            max_completion_tokens: None,
            max_tokens: None,
            max_output_tokens: None,
            prompt: None,
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Model => {
                    fields.model = Some(map.next_value::<&'de RawValue>()?);
                    fields.models += 1;
                }
                Key::Stream => fields.stream = Some(map.next_value::<&'de RawValue>()?),
                Key::StreamOptions => fields.stream_options = Some(map.next_value::<&'de RawValue>()?),
                Key::MaxCompletionTokens => fields.max_completion_tokens = Some(map.next_value::<Value>()?),
                Key::MaxTokens => fields.max_tokens = Some(map.next_value::<Value>()?),
                Key::MaxOutputTokens => fields.max_output_tokens = Some(map.next_value::<Value>()?),
                Key::Prompt(prompt) => fields.prompt = Some((prompt, map.next_value::<&'de RawValue>()?)),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A member's name, told apart as it is read: no name is copied out of the body.
enum Key {
    Model,
    Stream,
    StreamOptions,
    MaxCompletionTokens,
    MaxTokens,
    MaxOutputTokens,
    Prompt(Prompt),
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member's name")
    }

    /// Called for every name, escaped or not: an escaped one is given unescaped.
    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(match name {
            "model" => Key::Model,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "max_completion_tokens" => Key::MaxCompletionTokens,
            "max_tokens" => Key::MaxTokens,
            "max_output_tokens" => Key::MaxOutputTokens,
            "messages" => Key::Prompt(Prompt::Messages),
            "prompt" => Key::Prompt(Prompt::Text),
            "input" => Key::Prompt(Prompt::Input),
            _ => Key::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::error::{ErrorCode, ErrorType};
    use proptest::prelude::*;

    fn err(body: &str) -> GatewayError {
        read_routing_fields(body.as_bytes()).unwrap_err()
    }

    fn read_model(body: &[u8]) -> Result<String, GatewayError> {
        read_routing_fields(body).map(|fields| fields.model)
    }

    #[test]
    fn reads_the_model_and_ignores_the_rest() {
        let body = r#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"llama-3","stream":true}"#;
        assert_eq!(read_model(body.as_bytes()).unwrap(), "llama-3");
        assert_eq!(read_model(br#"{"model":"a\u00e9\"b"}"#).unwrap(), "a\u{e9}\"b");
        assert_eq!(read_model(br#"{"mod\u0065l":"m"}"#).unwrap(), "m", "a name is read as a backend reads it");
    }

    #[test]
    fn stream_is_read_and_must_be_a_boolean() {
        let stream = |body: &str| read_routing_fields(body.as_bytes()).map(|f| f.stream);
        assert_eq!(stream(r#"{"model":"m","stream":true}"#), Ok(true));
        for off in [r#"{"model":"m"}"#, r#"{"model":"m","stream":false}"#, r#"{"model":"m","stream":null}"#] {
            assert_eq!(stream(off), Ok(false), "{off}");
        }
        for (body, words) in
            [(r#"{"model":"m","stream":"yes"}"#, "got a string"), (r#"{"model":"m","stream":1}"#, "got an integer")]
        {
            let e = err(body);
            assert_eq!((e.status, e.param.as_deref(), e.code), (400, Some("stream"), Some(ErrorCode::InvalidType)));
            assert!(e.message.contains(words), "{}", e.message);
        }
    }

    #[test]
    fn a_request_for_the_usage_chunk_is_read() {
        let fields = |body: &str| read_routing_fields(body.as_bytes()).unwrap();
        assert!(fields(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).asks_usage());
        for unasked in [
            r#"{"model":"m","stream":true}"#,
            r#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#,
            r#"{"model":"m","stream_options":null}"#,
        ] {
            assert!(!fields(unasked).asks_usage(), "{unasked}");
        }
        assert_eq!(
            fields(r#"{"model":"m","stream_options":{"x":1}}"#).stream_options,
            serde_json::json!({"x": 1}).as_object().cloned()
        );
    }

    #[test]
    fn what_the_request_may_take_in_tokens_is_read() {
        let estimate_for = |body: &str, endpoint| {
            read_routing_fields(body.as_bytes()).unwrap().token_estimate(body.as_bytes(), endpoint)
        };
        let estimate = |body: &str| estimate_for(body, Endpoint::ChatCompletions);
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":5}"#;
        assert_eq!(estimate(chat), TokenEstimate { prompt: 9, completion: Some(5) });
        // `max_completion_tokens` is the newer name of the same bound, and wins.
        let both = r#"{"model":"m","max_completion_tokens":7,"max_tokens":5,"prompt":"abcd"}"#;
        assert_eq!(estimate(both), TokenEstimate { prompt: 2, completion: Some(7) });
        let unbounded = r#"{"model":"m","prompt":"abcd","max_tokens":"5"}"#;
        assert_eq!(estimate(unbounded), TokenEstimate { prompt: 2, completion: None }, "not a number: not a bound");
        assert_eq!(estimate(r#"{"model":"m","input":["abcdefgh"]}"#), TokenEstimate { prompt: 3, completion: Some(0) });
        assert_eq!(estimate(r#"{"model":"m"}"#), TokenEstimate { prompt: 0, completion: None });
        // The Responses API bounds its answer with `max_output_tokens`; its `input` is a prompt, not an embedding's.
        let responses = r#"{"model":"m","input":"abcdefgh","max_output_tokens":9,"max_tokens":1}"#;
        assert_eq!(estimate_for(responses, Endpoint::Responses), TokenEstimate { prompt: 3, completion: Some(9) });
        let unbounded = r#"{"model":"m","input":"abcdefgh"}"#;
        assert_eq!(estimate_for(unbounded, Endpoint::Responses), TokenEstimate { prompt: 3, completion: None });
        // The Messages API's is `max_tokens`.
        let messages = r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":5}"#;
        assert_eq!(estimate_for(messages, Endpoint::Messages), TokenEstimate { prompt: 9, completion: Some(5) });
    }

    #[test]
    fn the_last_duplicate_model_wins() {
        assert_eq!(read_model(br#"{"model":"a","model":"b"}"#).unwrap(), "b");
    }

    #[test]
    fn the_model_is_found_in_place_only_when_named_once() {
        let body = br#"{"messages":[],"model" : "a\"b","n":1}"#;
        let at = read_routing_fields(body).unwrap().model_at.unwrap();
        assert_eq!(&body[at], br#""a\"b""#);
        assert_eq!(read_routing_fields(br#"{"model":"a","model":"b"}"#).unwrap().model_at, None);
    }

    #[test]
    fn malformed_bodies_get_400_without_param() {
        for body in ["", "not json", "{\"model\":\"a\"", "{\"model\":\"a\"} trailing", "[\"model\"]", "\"model\"", "42"]
        {
            let e = err(body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.kind, ErrorType::InvalidRequest);
            assert_eq!(e.param, None, "{body}");
        }
        assert!(err("[1]").message.contains("must be a JSON object"));
        assert!(err("{").message.contains("could not parse the JSON body"));
    }

    #[test]
    fn missing_or_ill_typed_model_names_the_param() {
        for (body, code, words) in [
            ("{}", ErrorCode::MissingRequiredParameter, "Missing required parameter: 'model'."),
            (r#"{"model":null}"#, ErrorCode::MissingRequiredParameter, "Missing required"),
            (
                r#"{"model":""}"#,
                ErrorCode::EmptyString,
                "Invalid 'model': empty string. Expected a string with minimum length 1.",
            ),
            (
                r#"{"model":7}"#,
                ErrorCode::InvalidType,
                "Invalid type for 'model': expected a string, but got an integer instead.",
            ),
            (r#"{"model":1.5}"#, ErrorCode::InvalidType, "got a decimal"),
            (r#"{"model":["a"]}"#, ErrorCode::InvalidType, "got an array"),
            (r#"{"model":{"a":1}}"#, ErrorCode::InvalidType, "got an object"),
            (r#"{"model":true}"#, ErrorCode::InvalidType, "got a boolean"),
        ] {
            let e = err(body);
            assert_eq!((e.status, e.param.as_deref(), e.code), (400, Some("model"), Some(code)), "{body}");
            assert!(e.message.contains(words), "{body}: {}", e.message);
        }
    }

    #[test]
    fn deep_nesting_and_invalid_utf8_are_refused_not_crashed() {
        // Skipped values are walked without recursion, so depth costs no stack.
        let deep_elsewhere = format!("{{\"model\":\"m\",\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(read_model(deep_elsewhere.as_bytes()).unwrap(), "m");
        let deep_model = format!("{{\"model\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(err(&deep_model).message.contains("got an array"));
        for body in [&b"{\"model\":\"\xff\xfe\"}"[..], b"{\"x\":\"\xc3\x28\",\"model\":\"m\"}"] {
            let e = read_routing_fields(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains("not valid UTF-8"), "{}", e.message);
        }
    }

    #[test]
    fn huge_strings_are_read_or_refused_without_trouble() {
        let huge = "m".repeat(4 * 1024 * 1024);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{huge}"}}],"model":"{huge}"}}"#);
        assert_eq!(read_model(body.as_bytes()).unwrap().len(), huge.len());
        let unterminated = format!(r#"{{"model":"{huge}"#);
        assert_eq!(err(&unterminated).status, 400);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_model(&body);
        }

        #[test]
        fn every_truncation_of_a_valid_body_is_handled(cut in 0usize..80) {
            let body = br#"{"model":"llama-3","messages":[{"role":"user","content":"hello"}],"n":2}"#;
            let cut = cut.min(body.len());
            let result = read_model(&body[..cut]);
            prop_assert_eq!(result.is_ok(), cut == body.len());
        }

        #[test]
        fn any_string_model_round_trips(model in "\\PC{1,64}") {
            let body = serde_json::to_vec(&serde_json::json!({"model": model, "x": [1, {"y": null}]})).unwrap();
            let fields = read_routing_fields(&body).unwrap();
            let at = fields.model_at.unwrap();
            prop_assert_eq!(serde_json::from_slice::<String>(&body[at]).unwrap(), model.clone());
            prop_assert_eq!(fields.model, model);
        }
    }
}
