//! Which backend of a model's fallback chain an attempt reached. Envoy tells
//! ext_proc, running as the chain cluster's upstream filter, through the
//! `xds.upstream_host_metadata` attribute: the chosen endpoint's metadata, as
//! protobuf text, where the endpoint names its backend under
//! `filter_metadata.modelgate.backend`.

use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use std::collections::HashMap;

/// The attribute ext_proc must be configured to ask for (`request_attributes`).
pub const HOST_METADATA: &str = "xds.upstream_host_metadata";

/// The backend the attempt's endpoint names, if Envoy sent its metadata.
pub fn attempt_backend(attributes: &HashMap<String, Struct>) -> Option<String> {
    let text = attributes.values().find_map(|s| match s.fields.get(HOST_METADATA)?.kind.as_ref()? {
        Kind::StringValue(text) => Some(text),
        _ => None,
    })?;
    backend_in(text)
}

/// `filter_metadata.modelgate.backend` in metadata written as protobuf text:
/// `filter_metadata { key: "modelgate" value { fields { key: "backend" value { string_value: "pool" } } } }`.
fn backend_in(text: &str) -> Option<String> {
    let ours = &text[text.find(r#"key: "modelgate""#)?..];
    let field = &ours[ours.find(r#"key: "backend""#)?..];
    let value = &field[field.find(r#"string_value: ""#)? + r#"string_value: ""#.len()..];
    let mut backend = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(backend),
            '\\' => backend.push(chars.next()?),
            c => backend.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value;
    use proptest::prelude::*;

    #[test]
    fn the_backend_is_read_from_envoys_text_of_the_hosts_metadata() {
        // As Envoy 1.40 sends it.
        let text = r#"filter_metadata { key: "envoy.lb" value { fields { key: "zone" value { string_value: "a" } } } } filter_metadata { key: "modelgate" value { fields { key: "backend" value { string_value: "llama-pool" } } } } "#;
        let attributes = HashMap::from([(
            "envoy.filters.http.ext_proc".to_string(),
            Struct {
                fields: [(HOST_METADATA.to_string(), Value { kind: Some(Kind::StringValue(text.into())) })].into(),
            },
        )]);
        assert_eq!(attempt_backend(&attributes).as_deref(), Some("llama-pool"));
        assert_eq!(backend_in(r#"filter_metadata { key: "modelgate" value { fields { key: "backend" value { string_value: "a\"b" } } } }"#).as_deref(), Some("a\"b"));
        assert_eq!(backend_in(r#"filter_metadata { key: "other" value { } }"#), None);
        assert_eq!(attempt_backend(&HashMap::new()), None);
    }

    proptest! {
        #[test]
        fn any_text_is_read_without_panicking(text in ".*", cut in 0usize..200) {
            let _ = backend_in(&text);
            let full = r#"key: "modelgate" value { fields { key: "backend" value { string_value: "abc" } } }"#;
            let _ = backend_in(&full[..cut.min(full.len())]);
        }
    }
}
