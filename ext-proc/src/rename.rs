//! Rewrites the `model` of a JSON request body.
//!
//! Only the top-level keys are parsed; every other value is copied through
//! byte for byte, so a large `messages` array costs a scan, not a rebuild.
//! Key order is kept, and a duplicated `model` collapses to the new one.

use indexmap::IndexMap;
use serde_json::value::RawValue;

/// The body with `model` set to `model`, or why it could not be rewritten.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, serde_json::Error> {
    let mut fields: IndexMap<String, &RawValue> = serde_json::from_slice(body)?;
    let model = serde_json::value::to_raw_value(model)?;
    fields.insert("model".to_string(), &model);
    serde_json::to_vec(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    #[test]
    fn only_the_model_changes_and_order_is_kept() {
        let body = br#"{"messages":[{"role":"user","content":"say \"hi\""}],"model":"gpt-4o-mini","temperature":0.5e0,"stream":true}"#;
        let out = rewrite_model(body, "llama-3.1-8b").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"messages":[{"role":"user","content":"say \"hi\""}],"model":"llama-3.1-8b","temperature":0.5e0,"stream":true}"#
        );
    }

    #[test]
    fn a_missing_model_is_added_and_duplicates_collapse() {
        let out: Value = serde_json::from_slice(&rewrite_model(br#"{"n":1}"#, "m").unwrap()).unwrap();
        assert_eq!(out, json!({"n": 1, "model": "m"}));
        let out = rewrite_model(br#"{"model":"a","x":1,"model":"b"}"#, "m\"q").unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), r#"{"model":"m\"q","x":1}"#);
    }

    #[test]
    fn non_objects_are_errors() {
        for body in [&b"[1]"[..], b"", b"{", b"\"x\"", b"{\"a\":1} x"] {
            assert!(rewrite_model(body, "m").is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = rewrite_model(&body, "m");
        }

        #[test]
        fn rewritten_bodies_are_the_same_json_but_for_model(
            fields in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..6),
            model in "\\PC{0,20}",
        ) {
            let mut original = serde_json::Map::new();
            for (k, v) in &fields { original.insert(k.clone(), json!(v)); }
            original.insert("model".into(), json!("old"));
            let out: Value = serde_json::from_slice(&rewrite_model(&serde_json::to_vec(&original).unwrap(), &model).unwrap()).unwrap();
            original.insert("model".into(), json!(model));
            prop_assert_eq!(out, Value::Object(original));
        }
    }
}
