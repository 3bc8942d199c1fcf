//! `/v1/models` answers, built from the routing table in OpenAI's shapes.

use crate::keys::{may_use, ClientKey};
use crate::routing::Router;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Model<'a> {
    pub id: &'a str,
    pub object: &'static str,
    /// The gateway does not know when a backend's model was made; 0 says so.
    pub created: u64,
    pub owned_by: &'a str,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<Model<'a>>,
}

fn model<'a>(id: &'a str, owned_by: &'a str) -> Model<'a> {
    Model { id, object: "model", created: 0, owned_by }
}

/// `GET /v1/models`: the models `caller` may use.
pub fn list_json(router: &Router, caller: Option<&ClientKey>) -> Vec<u8> {
    let data =
        router.listed_models().filter(|(id, _)| may_use(caller, id)).map(|(id, t)| model(id, &t.owned_by)).collect();
    let list = ModelList { object: "list", data };
    serde_json::to_vec(&list).unwrap_or_default()
}

/// `GET /v1/models/{id}`: any model the gateway routes, pattern-matched ones
/// included, if `caller` may use it.
pub fn retrieve_json(router: &Router, id: &str, caller: Option<&ClientKey>) -> Option<Vec<u8>> {
    let target = router.resolve(id).filter(|_| may_use(caller, id))?;
    serde_json::to_vec(&model(id, &target.owned_by)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn list_and_retrieve_follow_openai_shapes() {
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "c"}, "b": {"cluster": "c", "owned_by": "acme"}},
                "models": [{"match": "m1", "backend": "a"}, {"match": "q-*", "backend": "b"}]}"#,
        )
        .unwrap();
        let list: Value = serde_json::from_slice(&list_json(&r, None)).unwrap();
        assert_eq!(
            list,
            json!({"object": "list", "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "a"}]})
        );
        let one: Value = serde_json::from_slice(&retrieve_json(&r, "q-7b", None).unwrap()).unwrap();
        assert_eq!(one, json!({"id": "q-7b", "object": "model", "created": 0, "owned_by": "acme"}));
        assert!(retrieve_json(&r, "nope", None).is_none());
    }

    #[test]
    fn a_key_sees_only_the_models_it_may_use() {
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "c"}},
                "models": [{"match": "m1", "backend": "a"}, {"match": "m2", "backend": "a"}, {"match": "q-*", "backend": "a"}]}"#,
        )
        .unwrap();
        let key = ClientKey::for_tests("k", &["m2", "q-1*"]);
        let list: Value = serde_json::from_slice(&list_json(&r, Some(&key))).unwrap();
        assert_eq!(list["data"].as_array().unwrap().iter().map(|m| &m["id"]).collect::<Vec<_>>(), [&json!("m2")]);
        assert!(retrieve_json(&r, "q-1b", Some(&key)).is_some());
        assert!(retrieve_json(&r, "q-2b", Some(&key)).is_none());
        assert!(retrieve_json(&r, "m1", Some(&key)).is_none());
    }
}
