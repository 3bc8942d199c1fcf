//! `/v1/models` answers, built from the routing table in OpenAI's shapes,
//! and the models self-hosted pools' replicas serve (discovered by ext-proc).

use crate::keys::{may_use, ClientKey};
use crate::routing::{Router, Target};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Where ext-proc's admin port answers [`PoolModels`].
pub const POOL_MODELS_PATH: &str = "/v1/pools/models";

/// The models (and loaded LoRA adapters) each self-hosted pool's replicas
/// serve, for the pools that discover them: `GET /v1/pools/models` on
/// ext-proc's admin port, read by the filter for `/v1/models`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolModels {
    pub pools: BTreeMap<String, BTreeSet<String>>,
}

impl PoolModels {
    /// Whether `id`, routed to `target`, is served as far as discovery knows:
    /// routed to a pool that discovers its models, it must be one of them.
    fn serves(&self, target: &Target, id: &str) -> bool {
        target.pool.as_ref().and_then(|pool| self.pools.get(pool)).is_none_or(|models| models.contains(id))
    }
}

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

/// `GET /v1/models`: the models `caller` may use: the configured ones, then
/// those `discovered` on pools that route to the pool that serves them
/// (an adapter by a pattern such as `qwen3-8b*`), owned by its backend.
pub fn list_json(router: &Router, caller: Option<&ClientKey>, discovered: Option<&PoolModels>) -> Vec<u8> {
    let configured = router.listed_models().map(|(id, t)| model(id, &t.owned_by));
    let pools = discovered.map(|d| &d.pools).into_iter().flatten();
    let found = pools.flat_map(|(pool, ids)| {
        ids.iter().filter_map(move |id| {
            let target = router.resolve(id).filter(|t| t.pool.as_ref() == Some(pool))?;
            (!router.names_exactly(id)).then(|| model(id, &target.owned_by))
        })
    });
    let data = configured.chain(found).filter(|m| may_use(caller, m.id)).collect();
    let list = ModelList { object: "list", data };
    serde_json::to_vec(&list).unwrap_or_default()
}

/// `GET /v1/models/{id}`: any model the gateway routes, pattern-matched ones
/// included, if `caller` may use it; one routed by a pattern to a pool that
/// discovers its models only while a replica serves it.
pub fn retrieve_json(
    router: &Router,
    id: &str,
    caller: Option<&ClientKey>,
    discovered: Option<&PoolModels>,
) -> Option<Vec<u8>> {
    let target = router.resolve(id).filter(|_| may_use(caller, id))?;
    if !router.names_exactly(id) && discovered.is_some_and(|d| !d.serves(target, id)) {
        return None;
    }
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
        let list: Value = serde_json::from_slice(&list_json(&r, None, None)).unwrap();
        assert_eq!(
            list,
            json!({"object": "list", "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "a"}]})
        );
        let one: Value = serde_json::from_slice(&retrieve_json(&r, "q-7b", None, None).unwrap()).unwrap();
        assert_eq!(one, json!({"id": "q-7b", "object": "model", "created": 0, "owned_by": "acme"}));
        assert!(retrieve_json(&r, "nope", None, None).is_none());
    }

    #[test]
    fn a_key_sees_only_the_models_it_may_use() {
        let r = Router::from_json(
            br#"{"backends": {"a": {"cluster": "c"}},
                "models": [{"match": "m1", "backend": "a"}, {"match": "m2", "backend": "a"}, {"match": "q-*", "backend": "a"}]}"#,
        )
        .unwrap();
        let key = ClientKey::for_tests("k", &["m2", "q-1*"]);
        let list: Value = serde_json::from_slice(&list_json(&r, Some(&key), None)).unwrap();
        assert_eq!(list["data"].as_array().unwrap().iter().map(|m| &m["id"]).collect::<Vec<_>>(), [&json!("m2")]);
        assert!(retrieve_json(&r, "q-1b", Some(&key), None).is_some());
        assert!(retrieve_json(&r, "q-2b", Some(&key), None).is_none());
        assert!(retrieve_json(&r, "m1", Some(&key), None).is_none());
    }

    #[test]
    fn discovered_models_are_listed_when_a_pattern_routes_them_to_their_pool() {
        let r = Router::from_json(
            br#"{"backends": {"pool": {"cluster": "p", "owned_by": "vllm", "pool": "vp"}, "other": {"cluster": "o"}},
                "models": [{"match": "qwen3-8b", "backend": "pool"}, {"match": "qwen3-8b*", "backend": "pool"},
                           {"match": "x-*", "backend": "other"}]}"#,
        )
        .unwrap();
        let discovered = PoolModels {
            pools: BTreeMap::from([(
                "vp".to_string(),
                ["qwen3-8b", "qwen3-8b-sql", "x-1", "unrouted"].map(String::from).into(),
            )]),
        };
        let ids = |body: Vec<u8>| -> Vec<(String, String)> {
            let list: Value = serde_json::from_slice(&body).unwrap();
            list["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m["id"].as_str().unwrap().into(), m["owned_by"].as_str().unwrap().into()))
                .collect()
        };
        let pair = |id: &str| (id.to_string(), "vllm".to_string());
        assert_eq!(ids(list_json(&r, None, Some(&discovered))), [pair("qwen3-8b"), pair("qwen3-8b-sql")]);
        assert_eq!(ids(list_json(&r, None, None)), [pair("qwen3-8b")]);
        let key = ClientKey::for_tests("k", &["qwen3-8b"]);
        assert_eq!(ids(list_json(&r, Some(&key), Some(&discovered))), [pair("qwen3-8b")]);

        assert!(retrieve_json(&r, "qwen3-8b-sql", None, Some(&discovered)).is_some());
        assert!(retrieve_json(&r, "qwen3-8b-gone", None, Some(&discovered)).is_none());
        // Unknown to discovery (ext-proc did not answer): the pattern alone decides.
        assert!(retrieve_json(&r, "qwen3-8b-gone", None, None).is_some());
        // The configured name stays, served or not.
        assert!(retrieve_json(&r, "qwen3-8b", None, Some(&PoolModels::default())).is_some());
        assert!(retrieve_json(&r, "x-2", None, Some(&discovered)).is_some());
    }
}
