//! The filter's configuration reference (docs/configuration.md) held to the
//! code. For every documented option, the configuration with the option left
//! out must equal the one with the option set to its documented default (or
//! be refused, when the option is documented as required); and every field the
//! parser knows must be documented. Serde's own "unknown field, expected one
//! of ..." error lists those fields, so no list is kept here to drift too.
//! And the README's minimal configuration must be one the filter takes.

use modelgate_doc_check::{code, table};
use modelgate_proto::config::FilterConfig;
use serde_json::{json, Value};

const REFERENCE: &str = include_str!("../../docs/configuration.md");
const SECTION: &str = "The filter's configuration";

/// One of every object the options live in, each with its required fields.
fn base() -> Value {
    let mut config = json!({
        "backends": {"b": {"cluster": "c"}},
        "models": [{"match": "m", "backend": "b", "price": {"input_per_million": 1.0, "output_per_million": 2.0},
                    "fallbacks": [{"backend": "b"}]}],
        "failover": {},
        "client_keys": [{"name": "k", "sha256": "0".repeat(64), "limits": {"models": {"m": {}}}}],
        "accounting": {"cluster": "admin"},
        "shared_limits": {"cluster": "admin"},
        "batches": {"cluster": "admin"},
        "pools": {"cluster": "admin"},
        "cache": {"cluster": "admin"},
        "idempotency": {},
        "budgets": {"cluster": "admin"},
    });
    config["backends"]["b"]["cache"] = json!({"ttl_secs": 60});
    config["models"][0]["cache"] = json!({"ttl_secs": 60});
    config["client_keys"][0]["budgets"] = json!({"models": {"m": {}}, "backends": {"b": {}}});
    config
}

/// Options that need another (dependent, needed): leaving the needed one out
/// leaves its dependents out too, since a configuration with them alone is refused.
const NEEDS: &[(&str, &str)] = &[
    ("idempotency", "cache"),
    ("backends.<name>.cache", "cache"),
    ("models[].cache", "cache"),
    ("budgets", "accounting"),
    ("client_keys[].budgets", "budgets"),
];

/// `option` left out of `config`, with every option that needs it.
fn remove(config: &mut Value, option: &str) {
    for (dependent, _) in NEEDS.iter().filter(|(_, needed)| *needed == option) {
        remove(config, dependent);
    }
    let path: Vec<&str> = option.split('.').collect();
    let (leaf, parent) = path.split_last().expect("a non-empty option");
    object(config, parent).remove(*leaf);
}

/// The object a documented path leads to: `name[]` is a list's first element,
/// `<name>` a map's first entry.
fn object<'a>(config: &'a mut Value, path: &[&str]) -> &'a mut serde_json::Map<String, Value> {
    let mut node = config;
    for segment in path {
        node = if let Some(list) = segment.strip_suffix("[]") {
            &mut node[list][0]
        } else if segment.starts_with('<') {
            node.as_object_mut().and_then(|map| map.values_mut().next()).expect("a map with an entry")
        } else {
            &mut node[*segment]
        };
    }
    node.as_object_mut().unwrap_or_else(|| panic!("{path:?} is not an object in the test's configuration"))
}

fn parsed(config: &Value) -> Result<String, String> {
    FilterConfig::from_json(config.to_string().as_bytes()).map(|config| format!("{config:?}"))
}

fn documented() -> Vec<(String, String)> {
    table(REFERENCE, SECTION).into_iter().map(|row| (row["option"].clone(), row["default"].clone())).collect()
}

fn option_name(cell: &str) -> &str {
    code(cell).unwrap_or_else(|| panic!("{cell:?} names no option"))
}

#[test]
fn every_documented_default_is_the_codes() {
    for (option, default) in documented() {
        let option = option_name(&option);
        let path: Vec<&str> = option.split('.').collect();
        let (leaf, parent) = path.split_last().expect("a non-empty option");
        let mut without = base();
        remove(&mut without, option);
        let omitted = parsed(&without);

        // The option exists: a value of the wrong type (no option is a list of lists) is refused.
        let mut wrong = without.clone();
        object(&mut wrong, parent).insert(leaf.to_string(), json!([[]]));
        assert!(parsed(&wrong).is_err(), "{option} is documented, but the configuration does not read it");

        let documented_value = if let Some(value) = code(&default) {
            serde_json::from_str(value).unwrap_or_else(|e| panic!("{option}: default {value} is not JSON: {e}"))
        } else if default.starts_with("required") {
            assert!(omitted.is_err(), "{option} is documented as required, but a configuration without it is taken");
            continue;
        } else if default.starts_with("unset") {
            Value::Null
        } else {
            panic!("{option}: the default must be a value in code quotes, `required` or `unset`, not {default:?}");
        };
        let mut with = without.clone();
        object(&mut with, parent).insert(leaf.to_string(), documented_value);
        let omitted = omitted.unwrap_or_else(|e| panic!("{option}: left out, the configuration is refused: {e}"));
        assert_eq!(
            parsed(&with).unwrap_or_else(|e| panic!("{option}: its documented default is refused: {e}")),
            omitted,
            "{option}: the documented default {default:?} is not the code's"
        );
    }
}

#[test]
fn every_option_the_code_reads_is_documented() {
    let options: Vec<String> = documented().iter().map(|(option, _)| option_name(option).to_owned()).collect();
    // Every object that holds a documented option, and the top level.
    let mut objects: Vec<String> =
        options.iter().filter_map(|o| o.rsplit_once('.').map(|(p, _)| p.to_owned())).collect();
    objects.push(String::new());
    objects.sort();
    objects.dedup();
    for prefix in objects {
        let path: Vec<&str> = prefix.split('.').filter(|s| !s.is_empty()).collect();
        let mut config = base();
        object(&mut config, &path).insert("not-an-option".into(), json!(1));
        let error = parsed(&config).expect_err("an unknown option is refused");
        let expected = error.split_once("expected").map_or("", |(_, fields)| fields);
        let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(!fields.is_empty(), "{prefix:?}: no list of fields in {error:?}");
        for field in fields {
            let option = if prefix.is_empty() { field.to_owned() } else { format!("{prefix}.{field}") };
            assert!(options.contains(&option), "{option} is read by the code but not in docs/configuration.md");
        }
    }
}

#[test]
fn the_readmes_minimal_configuration_is_taken() {
    let readme = include_str!("../../README.md");
    let example =
        readme.split("```json\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a JSON block in the README");
    let router = modelgate_proto::routing::Router::from_json(example.as_bytes());
    assert!(router.is_ok(), "the README's configuration is refused: {:?}", router.err());
}
