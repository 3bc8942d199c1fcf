//! OpenAI-dialect backends (vLLM, SGLang, OpenAI itself): only the model name,
//! absent defaults and the key change, and answers pass untouched (the
//! [`RequestTranslator`] defaults: a bearer key, no answer translation).
//!
//! Only the top-level keys are parsed; every other value is copied through
//! byte for byte, so a large `messages` array costs a scan, not a rebuild.
//! Key order is kept, and a duplicated key collapses to one.

use crate::dialect::{BackendRequest, RequestTranslator};
use indexmap::IndexMap;
use modelgate_proto::backend::BackendProfile;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use serde_json::value::RawValue;

/// An OpenAI request as the backend's: renamed and with its defaults.
pub struct OpenaiRequest {
    profile: BackendProfile,
}

impl OpenaiRequest {
    /// Every endpoint is the backend's own.
    pub fn new(profile: BackendProfile, _: Endpoint) -> Result<Self, GatewayError> {
        Ok(OpenaiRequest { profile })
    }
}

impl RequestTranslator for OpenaiRequest {
    fn request(&mut self, body: &[u8]) -> Result<BackendRequest, GatewayError> {
        // A backend that only needs its key gets the client's body as it is.
        let unchanged = self.profile.model.is_none() && self.profile.defaults.is_empty();
        let body = if unchanged {
            None
        } else {
            Some(rewrite(body, &self.profile).map_err(|e| GatewayError::unparsable_json(&e))?)
        };
        Ok(BackendRequest { path: None, body })
    }
}

/// The body with `model` replaced (if the profile renames) and the profile's
/// defaults added where the client set nothing.
pub fn rewrite(body: &[u8], profile: &BackendProfile) -> Result<Vec<u8>, serde_json::Error> {
    let mut fields: IndexMap<String, &RawValue> = serde_json::from_slice(body)?;
    let model = profile.model.as_deref().map(serde_json::value::to_raw_value).transpose()?;
    if let Some(model) = &model {
        fields.insert("model".to_string(), model);
    }
    let defaults: Vec<(String, Box<RawValue>)> = profile
        .defaults
        .iter()
        .filter(|(key, _)| !fields.contains_key(key.as_str()))
        .map(|(key, value)| Ok((key.clone(), serde_json::value::to_raw_value(value)?)))
        .collect::<Result<_, serde_json::Error>>()?;
    for (key, value) in &defaults {
        fields.insert(key.clone(), value);
    }
    serde_json::to_vec(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn renamed(model: &str) -> BackendProfile {
        BackendProfile { model: Some(model.into()), ..Default::default() }
    }

    #[test]
    fn only_the_model_changes_and_order_is_kept() {
        let body = br#"{"messages":[{"role":"user","content":"say \"hi\""}],"model":"gpt-4o-mini","temperature":0.5e0,"stream":true}"#;
        let out = rewrite(body, &renamed("llama-3.1-8b")).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"messages":[{"role":"user","content":"say \"hi\""}],"model":"llama-3.1-8b","temperature":0.5e0,"stream":true}"#
        );
    }

    #[test]
    fn a_missing_model_is_added_and_duplicates_collapse() {
        let out: Value = serde_json::from_slice(&rewrite(br#"{"n":1}"#, &renamed("m")).unwrap()).unwrap();
        assert_eq!(out, json!({"n": 1, "model": "m"}));
        let out = rewrite(br#"{"model":"a","x":1,"model":"b"}"#, &renamed("m\"q")).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"model":"m\"q","x":1}"#);
    }

    #[test]
    fn defaults_fill_only_what_the_client_left_out() {
        let profile = BackendProfile {
            defaults: json!({"max_tokens": 256, "temperature": 0.2}).as_object().cloned().unwrap(),
            ..Default::default()
        };
        let out = rewrite(br#"{"model":"m","temperature":0.9}"#, &profile).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"model":"m","temperature":0.9,"max_tokens":256}"#);
    }

    #[test]
    fn non_objects_are_errors() {
        for body in [&b"[1]"[..], b"", b"{", b"\"x\"", b"{\"a\":1} x"] {
            assert!(rewrite(body, &renamed("m")).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = rewrite(&body, &renamed("m"));
        }

        #[test]
        fn rewritten_bodies_are_the_same_json_but_for_model(
            fields in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..6),
            model in "\\PC{0,20}",
        ) {
            let mut original = serde_json::Map::new();
            for (k, v) in &fields { original.insert(k.clone(), json!(v)); }
            original.insert("model".into(), json!("old"));
            let out: Value =
                serde_json::from_slice(&rewrite(&serde_json::to_vec(&original).unwrap(), &renamed(&model)).unwrap()).unwrap();
            original.insert("model".into(), json!(model));
            prop_assert_eq!(out, Value::Object(original));
        }
    }
}
