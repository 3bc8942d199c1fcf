//! The pools file's reference (docs/pools.md) held to the parser: a key left
//! out must read as the key set to its documented default (or be refused,
//! when documented as required, even conditionally; or read as null, when
//! documented as unset),
//! and every key the parser knows must be documented. Serde's own "unknown
//! field, expected one of ..." error lists those keys, so no list is kept here.

use modelgate_doc_check::{code, table};
use modelgate_pools::config::PoolsFile;
use serde_json::{json, Value};

const REFERENCE: &str = include_str!("../../../docs/pools.md");

fn base() -> Value {
    json!({"replicas": ["10.0.0.1:8000"]})
}

fn parsed(pool: &Value) -> Result<String, String> {
    let file = json!({"pools": {"p": pool}});
    PoolsFile::from_json(file.to_string().as_bytes()).map(|f| format!("{:?}", f.pools["p"]))
}

/// The documented keys with their default cells; `weights.<scorer>` becomes one key per scorer.
fn documented() -> Vec<(String, String)> {
    let scorers: Vec<String> = table(REFERENCE, "Scorers").iter().map(|row| name(&row["scorer"]).to_owned()).collect();
    let mut keys = Vec::new();
    for row in table(REFERENCE, "The pools file") {
        let key = name(&row["key"]);
        match key.strip_suffix("<scorer>") {
            Some(prefix) => keys.extend(scorers.iter().map(|s| (format!("{prefix}{s}"), row["default"].clone()))),
            None => keys.push((key.to_owned(), row["default"].clone())),
        }
    }
    keys
}

fn name(cell: &str) -> &str {
    code(cell).unwrap_or_else(|| panic!("{cell:?} names no key"))
}

fn with(key: &str, value: Value) -> Value {
    let mut pool = base();
    let mut node = &mut pool;
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        if segments.peek().is_none() {
            node[segment] = value;
            break;
        }
        if node.get(segment).is_none() {
            node[segment] = json!({});
        }
        node = &mut node[segment];
    }
    pool
}

fn without(key: &str) -> Value {
    let mut pool = base();
    if let Some(map) = pool.as_object_mut() {
        map.remove(key);
    }
    pool
}

#[test]
fn every_documented_default_is_the_codes() {
    let plain = parsed(&base()).unwrap();
    for (key, default) in documented() {
        if default.starts_with("required") {
            assert!(parsed(&without(&key)).is_err(), "`{key}` is documented as required");
        } else if default.starts_with("unset") {
            assert_eq!(parsed(&with(&key, Value::Null)).unwrap(), plain, "`{key}` is documented as unset by default");
        } else {
            let text = code(&default).unwrap_or_else(|| panic!("`{key}`'s default {default:?} has no value"));
            let value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()));
            assert_eq!(parsed(&with(&key, value)).unwrap(), plain, "`{key}`'s documented default {text}");
        }
    }
}

#[test]
fn every_key_the_parser_knows_is_documented() {
    let documented: Vec<String> = documented().into_iter().map(|(key, _)| key).collect();
    for object in ["", "weights.", "prefix."] {
        let unknown = format!("{object}no_such_key");
        let error = parsed(&with(&unknown, json!(1))).unwrap_err();
        let expected = error.split("expected ").nth(1).unwrap_or_else(|| panic!("{error}"));
        // The known fields are the quoted words: `a`, `b` or `c`.
        for field in expected.split('`').skip(1).step_by(2) {
            let key = format!("{object}{field}");
            let nested = documented.iter().any(|d| d.starts_with(&format!("{key}.")));
            assert!(documented.contains(&key) || nested, "`{key}` is not documented in docs/pools.md");
        }
    }
}
