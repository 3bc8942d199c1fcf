//! What a request's body tells the picker, read in one pass: the model it
//! asks for, and the prompt (the raw JSON of `messages`, `prompt` or
//! `input`), whose bytes the prefix index hashes as they are.

use modelgate_proto::error::GatewayError;
use modelgate_proto::params;
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, PartialEq)]
pub struct PickFields<'a> {
    pub model: String,
    pub prompt: &'a [u8],
}

/// The fields read; every other one is skipped unread.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

/// The model and the prompt's bytes. The prompt is the JSON as sent: SDKs
/// serialise a shared system prompt identically, so equal prefixes are equal
/// bytes without re-encoding anything.
pub fn pick_fields(body: &[u8]) -> Result<PickFields<'_>, GatewayError> {
    let fields: Fields = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => GatewayError::invalid_request(format!("Invalid request body: {e}.")),
        _ => GatewayError::unparsable_json(&e),
    })?;
    let model = params::model(fields.model.map(RawValue::get))?;
    let prompt = fields.messages.or(fields.prompt).or(fields.input).map_or(&[][..], |raw| raw.get().as_bytes());
    Ok(PickFields { model, prompt })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_the_model_and_the_raw_prompt() {
        let body = br#"{"model":"qwen3-8b","stream":true,"messages":[{"role":"system","content":"Be brief."}, {"role":"user","content":"hi"}]}"#;
        let fields = pick_fields(body).unwrap();
        assert_eq!(fields.model, "qwen3-8b");
        assert_eq!(fields.prompt, br#"[{"role":"system","content":"Be brief."}, {"role":"user","content":"hi"}]"#);

        let completion = pick_fields(br#"{"prompt":"Once upon","model":"m\u0031"}"#).unwrap();
        assert_eq!((completion.model.as_str(), completion.prompt), ("m1", &br#""Once upon""#[..]));
        let embedding = pick_fields(br#"{"model":"e","input":["a","b"]}"#).unwrap();
        assert_eq!(embedding.prompt, br#"["a","b"]"#);
        assert_eq!(pick_fields(br#"{"model":"m"}"#).unwrap().prompt, b"");
    }

    #[test]
    fn a_bad_body_is_an_openai_error() {
        let status = |body: &[u8]| pick_fields(body).unwrap_err().status;
        assert_eq!(status(b"not json"), 400);
        assert_eq!(status(br#"{"messages":[]}"#), 400);
        assert_eq!(status(br#"{"model":""}"#), 400);
        assert_eq!(status(br#"[1]"#), 400);
        let wrong = pick_fields(br#"{"model":7}"#).unwrap_err();
        assert_eq!((wrong.status, wrong.param.as_deref()), (400, Some("model")));
        assert_eq!(status(br#"{"model":"a","model":"b"}"#), 400);
    }

    proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = pick_fields(&body);
        }

        #[test]
        fn never_panics_on_near_json(body in r#"\{("(model|messages|prompt|input|x)":(\"[a-z\\\\u0-9]{0,6}\"|\[[0-9,\"a{}\]]{0,8}\]|[0-9.e-]{1,5}|null|true|\{\}),?){0,4}\}?"#) {
            let _ = pick_fields(body.as_bytes());
        }
    }
}
