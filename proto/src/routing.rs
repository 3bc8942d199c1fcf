//! The routing table: which backend serves a model name.
//!
//! Precedence does not depend on the order of the configuration: an exact
//! name wins over any pattern, a longer prefix over a shorter one, and the
//! catch-all `*` comes last.

use crate::backend::{ApiKey, BackendProfile, Dialect};
use crate::chain::{Chain, ChainHeaders, Member};
use crate::client_api::{self, Passage};
use crate::config::{
    AccountingConfig, BackendConfig, BatchesConfig, BudgetsConfig, CacheConfig, FilterConfig, IdempotencyConfig,
    KeyBudgetsConfig, ModelRouteConfig, OnBudgetExhausted, PoolsConfig, Price, RouteCacheConfig, SharedLimitsConfig,
};
use crate::endpoint::Endpoint;
use crate::keys::ClientKeys;
use std::collections::HashMap;

/// Where one model's requests go.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub backend: String,
    pub cluster: String,
    pub owned_by: String,
    /// How ext-proc must rewrite requests for this backend, as the internal
    /// header's value; `None` when they go through untouched.
    pub profile: Option<String>,
    /// When renaming the model is all the backend's requests need: the name it
    /// expects, as a JSON string. The filter writes it into the body itself,
    /// without ext_proc, wherever the request passes in the backend's own API.
    pub rename: Option<String>,
    /// The client's own API key goes on to the backend (`api_key: "passthrough"`).
    pub forwards_client_key: bool,
    pub price: Option<Price>,
    /// For a model with fallbacks: the chain as the internal header's value
    /// ([`crate::chain::Chain`]); `cluster` is then the stream guard's, which
    /// tries the chain's backends in turn, and `profile` is unset.
    pub chain: Option<ChainHeaders>,
    /// The self-hosted pool the backend is, if it is one: ext-proc picks the
    /// replica of each of its requests, streams included.
    pub pool: Option<String>,
    /// What decides how each endpoint reaches the backend ([`Target::passage`]):
    /// the backend's profile, or for a chain the default one, since its members differ.
    pub serves: BackendProfile,
    /// The route's cache: the model's, else its backend's.
    pub cache: Option<RouteCacheConfig>,
    /// The backends a request may be served by, in the order they are tried:
    /// the route's backend, then its fallbacks. Budgets are reserved on one of them.
    pub members: Vec<Candidate>,
    /// With fallbacks: a spent budget on one member moves the request on to the next.
    pub on_budget_exhausted: OnBudgetExhausted,
    /// For a chain whose budgets may move a request on: the chain's headers
    /// when it starts at member 1, 2, … (member 0's are `chain`).
    pub later_chains: Vec<ChainHeaders>,
}

/// One backend a model's request may go to, with what the model costs there.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub backend: String,
    pub price: Option<Price>,
}

impl Target {
    /// How a request to `endpoint` reaches this target's backend.
    pub fn passage(&self, endpoint: Endpoint) -> Passage {
        client_api::passage(endpoint, &self.serves)
    }

    /// The chain header's value for a request that starts at `member` (0 is
    /// the route's backend); `None` without a chain, or past its last member.
    pub fn chain_from(&self, member: usize, stream: bool) -> Option<&str> {
        let headers = match member {
            0 => self.chain.as_ref(),
            later => self.later_chains.get(later - 1),
        };
        headers.map(|headers| headers.for_request(stream))
    }
}

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, Target>,
    /// Longest prefix first.
    prefixes: Vec<(String, Target)>,
    catch_all: Option<Target>,
    /// Exact names in configuration order: what `/v1/models` lists.
    listed: Vec<String>,
    max_request_body_bytes: usize,
    stream_guard_cluster: Option<String>,
    client_keys: ClientKeys,
    accounting: Option<AccountingConfig>,
    shared_limits: Option<SharedLimitsConfig>,
    batches: Option<BatchesConfig>,
    pools: Option<PoolsConfig>,
    internal_token: Option<String>,
    reserved_completion_tokens: u64,
    cache: Option<CacheConfig>,
    idempotency: Option<IdempotencyConfig>,
    budgets: Option<BudgetsConfig>,
    /// The budgets of each key that has some, by the key's name.
    key_budgets: HashMap<String, KeyBudgetsConfig>,
}

impl Router {
    pub fn from_config(config: &FilterConfig) -> Result<Self, String> {
        let mut router = Router {
            max_request_body_bytes: config.max_request_body_bytes,
            stream_guard_cluster: config.stream_guard_cluster.clone(),
            client_keys: ClientKeys::from_config(&config.client_keys)?,
            accounting: config.accounting.clone(),
            shared_limits: config.shared_limits.clone(),
            batches: config.batches.clone(),
            pools: config.pools.clone(),
            internal_token: config.internal_token.clone(),
            reserved_completion_tokens: config.reserved_completion_tokens,
            cache: config.cache.clone(),
            idempotency: config.idempotency.clone(),
            budgets: config.budgets.clone(),
            key_budgets: config
                .client_keys
                .iter()
                .filter_map(|key| Some((key.name.clone(), key.budgets.clone()?)))
                .collect(),
            ..Router::default()
        };
        if let Some((name, _)) =
            config.backends.iter().find(|(_, b)| b.serves_responses && b.dialect != Dialect::Openai)
        {
            return Err(format!(
                "backend `{name}` sets serves_responses, which only a backend of the openai dialect can"
            ));
        }
        for route in &config.models {
            let target = target_for(route, config)?;
            let duplicate = match Pattern::parse(&route.pattern)? {
                Pattern::CatchAll => router.catch_all.replace(target).is_some(),
                Pattern::Prefix(prefix) => {
                    let seen = router.prefixes.iter().any(|(p, _)| p == prefix);
                    router.prefixes.push((prefix.to_string(), target));
                    seen
                }
                Pattern::Exact(name) => {
                    router.listed.push(name.to_string());
                    router.exact.insert(name.to_string(), target).is_some()
                }
            };
            if duplicate {
                return Err(format!("model pattern `{}` is configured twice", route.pattern));
            }
        }
        router.prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(router)
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        Self::from_config(&FilterConfig::from_json(bytes)?)
    }

    /// The backend for a model name, or `None` when no route serves it.
    pub fn resolve(&self, model: &str) -> Option<&Target> {
        if let Some(target) = self.exact.get(model) {
            return Some(target);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| model.starts_with(prefix.as_str()))
            .map(|(_, target)| target)
            .or(self.catch_all.as_ref())
    }

    /// True when an exact route names `model`: configuration, not the client, chose the name.
    pub fn names_exactly(&self, model: &str) -> bool {
        self.exact.contains_key(model)
    }

    /// Models listed by `/v1/models`: the exact names, in configuration order.
    /// Patterns cannot be enumerated; their models can still be retrieved by id.
    pub fn listed_models(&self) -> impl Iterator<Item = (&str, &Target)> {
        self.listed.iter().filter_map(|name| self.exact.get(name).map(|t| (name.as_str(), t)))
    }

    pub fn max_request_body_bytes(&self) -> usize {
        self.max_request_body_bytes
    }

    /// The cluster streaming requests are sent through, if any.
    pub fn stream_guard_cluster(&self) -> Option<&str> {
        self.stream_guard_cluster.as_deref()
    }

    /// The keys callers must present, if any are configured.
    pub fn client_keys(&self) -> &ClientKeys {
        &self.client_keys
    }

    /// The store shared by several Envoys that keeps rate limits, if one is configured.
    pub fn shared_limits(&self) -> Option<&SharedLimitsConfig> {
        self.shared_limits.as_ref()
    }

    /// Where answered requests are reported, if anywhere.
    pub fn accounting(&self) -> Option<&AccountingConfig> {
        self.accounting.as_ref()
    }

    /// Where the Files and Batch APIs are answered, if anywhere.
    pub fn batches(&self) -> Option<&BatchesConfig> {
        self.batches.as_ref()
    }

    /// Where operations on self-hosted pools are answered, if anywhere.
    pub fn pools(&self) -> Option<&PoolsConfig> {
        self.pools.as_ref()
    }

    /// The token presented to the stream guard and ext-proc's admin port, if one is configured.
    pub fn internal_token(&self) -> Option<&str> {
        self.internal_token.as_deref()
    }

    /// Tokens reserved for an answer whose request does not bound its length.
    pub fn reserved_completion_tokens(&self) -> u64 {
        self.reserved_completion_tokens
    }

    /// The store of cached answers (and idempotent requests' answers), if one is configured.
    pub fn cache(&self) -> Option<&CacheConfig> {
        self.cache.as_ref()
    }

    /// Idempotent requests are answered once per key, if configured.
    pub fn idempotency(&self) -> Option<&IdempotencyConfig> {
        self.idempotency.as_ref()
    }

    /// The store of spend and token budgets, if one is configured.
    pub fn budgets(&self) -> Option<&BudgetsConfig> {
        self.budgets.as_ref()
    }

    /// The budgets of the key named `key`, if it has any.
    pub fn key_budgets(&self, key: &str) -> Option<&KeyBudgetsConfig> {
        if self.key_budgets.is_empty() {
            return None;
        }
        self.key_budgets.get(key)
    }
}

fn profile_of(backend: &BackendConfig, rename: Option<&String>) -> BackendProfile {
    BackendProfile {
        dialect: backend.dialect,
        model: rename.cloned(),
        api_key: backend.api_key.clone(),
        defaults: backend.defaults.clone(),
        pool: backend.pool.clone(),
        serves_responses: backend.serves_responses,
    }
}

fn target_for(route: &ModelRouteConfig, config: &FilterConfig) -> Result<Target, String> {
    let named = |name: &str| {
        config
            .backends
            .get(name)
            .ok_or_else(|| format!("model route `{}` names unknown backend `{name}`", route.pattern))
    };
    let backend = named(&route.backend)?;
    let profile = profile_of(backend, route.rename.as_ref());
    let members = std::iter::once(Candidate { backend: route.backend.clone(), price: route.price })
        .chain(route.fallbacks.iter().map(|f| Candidate { backend: f.backend.clone(), price: f.price.or(route.price) }))
        .collect();
    let mut target = Target {
        backend: route.backend.clone(),
        cluster: backend.cluster.clone(),
        owned_by: backend.owned_by.clone().unwrap_or_else(|| route.backend.clone()),
        profile: (!profile.is_passthrough()).then(|| profile.to_header()),
        rename: profile.rename_only().and_then(|model| serde_json::to_string(model).ok()),
        forwards_client_key: backend.api_key == Some(ApiKey::Passthrough),
        price: route.price,
        chain: None,
        pool: backend.pool.clone(),
        serves: profile,
        cache: route.cache.clone().or_else(|| backend.cache.clone()),
        members,
        on_budget_exhausted: route.on_budget_exhausted,
        later_chains: Vec::new(),
    };
    if route.fallbacks.is_empty() {
        return Ok(target);
    }
    let Some(guard) = &config.stream_guard_cluster else {
        return Err(format!(
            "model route `{}` has fallbacks, which the stream guard tries: set stream_guard_cluster",
            route.pattern
        ));
    };
    let mut members: Vec<Member> = Vec::new();
    let listed = std::iter::once((&route.backend, route.rename.as_ref()))
        .chain(route.fallbacks.iter().map(|f| (&f.backend, f.rename.as_ref())));
    for (name, rename) in listed {
        let member = named(name)?;
        // Each attempt is called with its own backend's key; a client's key has no place in a chain.
        if member.api_key == Some(ApiKey::Passthrough) {
            return Err(format!(
                "model route `{}`: backend `{name}` passes the client's key, which a chain cannot",
                route.pattern
            ));
        }
        if members.iter().any(|m| &m.backend == name) {
            return Err(format!("model route `{}` lists backend `{name}` twice", route.pattern));
        }
        let profile = profile_of(member, rename);
        members.push(Member {
            backend: name.clone(),
            cluster: member.cluster.clone(),
            profile: (!profile.is_passthrough()).then_some(profile),
        });
    }
    let chain = Chain { members, failover: config.failover.clone(), stream: false };
    if route.on_budget_exhausted == OnBudgetExhausted::Fallback {
        target.later_chains = (1..chain.members.len())
            .map(|start| {
                Chain { members: chain.members.get(start..).unwrap_or_default().to_vec(), ..chain.clone() }.headers()
            })
            .collect();
    }
    target.cluster = guard.clone();
    target.profile = None;
    target.rename = None;
    target.serves = BackendProfile::default();
    target.chain = Some(chain.headers());
    Ok(target)
}

/// A model name as configured: exact, a prefix ending in `*`, or `*` alone.
pub(crate) enum Pattern<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    CatchAll,
}

impl<'a> Pattern<'a> {
    pub(crate) fn parse(pattern: &'a str) -> Result<Self, String> {
        match pattern.find('*') {
            None if pattern.is_empty() => Err("a model pattern must not be empty".to_string()),
            None => Ok(Pattern::Exact(pattern)),
            Some(0) if pattern.len() == 1 => Ok(Pattern::CatchAll),
            Some(i) if i == pattern.len() - 1 => Ok(Pattern::Prefix(&pattern[..i])),
            Some(_) => Err(format!("model pattern `{pattern}`: `*` is allowed only at the end")),
        }
    }

    /// How specific the pattern is: exact beats any prefix, a longer prefix a shorter one, `*` comes last.
    pub(crate) fn specificity(&self) -> (u8, usize) {
        match self {
            Pattern::Exact(name) => (2, name.len()),
            Pattern::Prefix(prefix) => (1, prefix.len()),
            Pattern::CatchAll => (0, 0),
        }
    }

    pub(crate) fn matches(&self, model: &str) -> bool {
        match self {
            Pattern::Exact(name) => model == *name,
            Pattern::Prefix(prefix) => model.starts_with(prefix),
            Pattern::CatchAll => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(models: &str) -> Result<Router, String> {
        Router::from_json(
            format!(
                r#"{{"backends": {{"a": {{"cluster": "ca"}}, "b": {{"cluster": "cb", "owned_by": "team-b"}}}},
                   "models": {models}}}"#
            )
            .as_bytes(),
        )
    }

    fn backend_of(r: &Router, model: &str) -> Option<String> {
        r.resolve(model).map(|t| t.backend.clone())
    }

    #[test]
    fn waits_must_be_between_a_millisecond_and_ten_minutes() {
        let with =
            |extra: &str| Router::from_json(format!(r#"{{"backends": {{}}, "models": [], {extra}}}"#).as_bytes());
        assert!(with(r#""shared_limits": {"cluster": "a", "timeout_ms": 200}"#).is_ok());
        for bad in [
            r#""shared_limits": {"cluster": "a", "timeout_ms": 0}"#,
            r#""accounting": {"cluster": "a", "flush_interval_ms": 4294967296}"#,
        ] {
            assert!(with(bad).unwrap_err().contains("outside 1 to 600000"), "{bad}");
        }
    }

    #[test]
    fn a_model_with_fallbacks_goes_to_the_stream_guard_with_its_chain() {
        let config = |guard: &str, route: &str| {
            format!(
                r#"{{{guard} "backends": {{"pool": {{"cluster": "pool"}}, "claude": {{"cluster": "c", "dialect": "anthropic"}},
                     "mine": {{"cluster": "m", "api_key": "passthrough"}}}},
                    "failover": {{"per_try_timeout_ms": 5000}},
                    "models": [{route}]}}"#
            )
        };
        let guard = r#""stream_guard_cluster": "guard","#;
        let router = Router::from_json(
            config(
                guard,
                r#"{"match": "m", "backend": "pool", "fallbacks": [{"backend": "claude", "rename": "claude-haiku"}]}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let target = router.resolve("m").unwrap();
        assert_eq!(
            (target.cluster.as_str(), target.profile.as_deref(), target.rename.as_deref()),
            ("guard", None, None)
        );
        let headers = target.chain.as_ref().unwrap();
        assert!(Chain::from_header(headers.streamed.as_bytes()).unwrap().stream);
        let chain = Chain::from_header(headers.whole.as_bytes()).unwrap();
        assert!(!chain.stream);
        let members: Vec<(&str, &str, Option<&str>)> = chain
            .members
            .iter()
            .map(|m| (m.backend.as_str(), m.cluster.as_str(), m.profile.as_ref().and_then(|p| p.model.as_deref())))
            .collect();
        assert_eq!(members, [("pool", "pool", None), ("claude", "c", Some("claude-haiku"))]);
        assert_eq!(
            (chain.failover.per_try_timeout_ms, chain.failover.retry_on_status.as_slice()),
            (5000, &[429, 500, 502, 503, 504, 529][..])
        );
        for (guard, route, why) in [
            ("", r#"{"match": "m", "backend": "pool", "fallbacks": [{"backend": "claude"}]}"#, "stream_guard_cluster"),
            (
                guard,
                r#"{"match": "m", "backend": "pool", "fallbacks": [{"backend": "nope"}]}"#,
                "unknown backend `nope`",
            ),
            (guard, r#"{"match": "m", "backend": "pool", "fallbacks": [{"backend": "mine"}]}"#, "client's key"),
            (guard, r#"{"match": "m", "backend": "pool", "fallbacks": [{"backend": "pool"}]}"#, "twice"),
        ] {
            let error = Router::from_json(config(guard, route).as_bytes()).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }

    #[test]
    fn exact_beats_longer_prefix_beats_shorter_prefix_beats_catch_all() {
        let r = router(
            r#"[{"match": "*", "backend": "a"},
                {"match": "gpt-*", "backend": "b"},
                {"match": "gpt-4*", "backend": "a"},
                {"match": "gpt-4o", "backend": "b"}]"#,
        )
        .unwrap();
        assert_eq!(backend_of(&r, "gpt-4o").as_deref(), Some("b"));
        assert_eq!(backend_of(&r, "gpt-4-turbo").as_deref(), Some("a"));
        assert_eq!(backend_of(&r, "gpt-3.5").as_deref(), Some("b"));
        assert_eq!(backend_of(&r, "llama").as_deref(), Some("a"));
    }

    #[test]
    fn unknown_model_without_catch_all_is_unrouted() {
        let r = router(r#"[{"match": "claude-*", "backend": "a"}]"#).unwrap();
        assert_eq!(backend_of(&r, "claude-3"), Some("a".into()));
        assert_eq!(backend_of(&r, "claude"), None);
        assert_eq!(backend_of(&r, ""), None);
    }

    #[test]
    fn rename_and_owner_travel_with_the_target() {
        let r =
            router(r#"[{"match": "fast", "backend": "b", "rename": "llama-3.1-8b"}, {"match": "x", "backend": "a"}]"#)
                .unwrap();
        let t = r.resolve("fast").unwrap();
        assert_eq!(t.cluster, "cb");
        assert_eq!(t.owned_by, "team-b");
        assert_eq!(t.profile.as_deref(), Some(r#"{"model":"llama-3.1-8b"}"#));
        assert_eq!(t.rename.as_deref(), Some(r#""llama-3.1-8b""#));
        assert_eq!(r.resolve("x").unwrap().profile, None);
        assert_eq!(r.resolve("x").unwrap().rename, None);
    }

    #[test]
    fn dialect_key_and_defaults_make_the_profile() {
        let r = Router::from_json(
            br#"{"backends": {
                    "claude": {"cluster": "c", "dialect": "anthropic", "api_key": {"env": "K"},
                               "defaults": {"max_tokens": 1024}},
                    "shared": {"cluster": "s", "api_key": "passthrough"}},
                 "models": [{"match": "claude-*", "backend": "claude"}, {"match": "s", "backend": "shared"}]}"#,
        )
        .unwrap();
        let claude = r.resolve("claude-x").unwrap();
        assert_eq!(
            claude.profile.as_deref(),
            Some(r#"{"dialect":"anthropic","api_key":{"env":"K"},"defaults":{"max_tokens":1024}}"#)
        );
        assert!(!claude.forwards_client_key);
        let shared = r.resolve("s").unwrap();
        assert_eq!((shared.profile.as_deref(), shared.forwards_client_key), (None, true));
        let err = Router::from_json(br#"{"backends": {"x": {"cluster": "c", "dialect": "gemini"}}, "models": []}"#);
        assert!(err.unwrap_err().contains("unknown variant `gemini`"));
    }

    #[test]
    fn each_target_knows_how_the_client_apis_reach_it_and_a_chain_takes_the_default_passage() {
        let r = Router::from_json(
            br#"{"stream_guard_cluster": "guard",
                 "backends": {"vllm": {"cluster": "v", "serves_responses": true}, "pool": {"cluster": "p"},
                              "claude": {"cluster": "c", "dialect": "anthropic"}},
                 "models": [{"match": "v", "backend": "vllm"}, {"match": "p", "backend": "pool"},
                            {"match": "c", "backend": "claude"},
                            {"match": "chained", "backend": "claude", "fallbacks": [{"backend": "vllm"}]}]}"#,
        )
        .unwrap();
        let passage = |model: &str, endpoint| r.resolve(model).unwrap().passage(endpoint);
        assert_eq!(passage("v", Endpoint::Responses), Passage::Native);
        assert_eq!(passage("p", Endpoint::Responses), Passage::ThroughChat);
        assert_eq!(passage("c", Endpoint::Messages), Passage::Native);
        assert_eq!(passage("c", Endpoint::CountTokens), Passage::Native);
        assert_eq!(passage("chained", Endpoint::Messages), Passage::ThroughChat);
        assert_eq!(passage("chained", Endpoint::CountTokens), Passage::Estimated);
        assert_eq!(passage("chained", Endpoint::Responses), Passage::ThroughChat);
        assert_eq!(r.resolve("v").unwrap().profile, None, "serving Responses needs no rewriting");
    }

    #[test]
    fn only_an_openai_backend_may_serve_responses() {
        let error = Router::from_json(
            br#"{"backends": {"claude": {"cluster": "c", "dialect": "anthropic", "serves_responses": true}},
                 "models": []}"#,
        )
        .unwrap_err();
        assert_eq!(error, "backend `claude` sets serves_responses, which only a backend of the openai dialect can");
    }

    #[test]
    fn only_exact_names_are_listed_in_order() {
        let r = router(
            r#"[{"match": "z", "backend": "a"}, {"match": "p-*", "backend": "a"}, {"match": "m", "backend": "b"}]"#,
        )
        .unwrap();
        let names: Vec<_> = r.listed_models().map(|(n, _)| n).collect();
        assert_eq!(names, ["z", "m"]);
    }

    #[test]
    fn bad_configurations_are_rejected_with_the_reason() {
        let err = router(r#"[{"match": "x", "backend": "nope"}]"#).unwrap_err();
        assert!(err.contains("unknown backend `nope`"), "{err}");
        assert!(router(r#"[{"match": "a*b", "backend": "a"}]"#).unwrap_err().contains("only at the end"));
        assert!(router(r#"[{"match": "", "backend": "a"}]"#).unwrap_err().contains("empty"));
        assert!(router(r#"[{"match": "x", "backend": "a"}, {"match": "x", "backend": "b"}]"#)
            .unwrap_err()
            .contains("twice"));
        assert!(router(r#"[{"match": "p*", "backend": "a"}, {"match": "p*", "backend": "b"}]"#).is_err());
        assert!(router(r#"[{"match": "x", "backend": "a", "renmae": "y"}]"#).unwrap_err().contains("unknown field"));
        assert!(Router::from_json(b"not json").is_err());
    }

    #[test]
    fn body_limit_defaults_and_overrides() {
        let r = router("[]").unwrap();
        assert_eq!(r.max_request_body_bytes(), crate::config::DEFAULT_MAX_REQUEST_BODY_BYTES);
        let r = Router::from_json(br#"{"max_request_body_bytes": 10, "backends": {}, "models": []}"#).unwrap();
        assert_eq!(r.max_request_body_bytes(), 10);
    }

    #[test]
    fn a_route_knows_its_cache_its_members_prices_and_its_chain_from_each_member() {
        let router = Router::from_json(
            br#"{"stream_guard_cluster": "guard", "cache": {"cluster": "admin"},
                "backends": {"a": {"cluster": "ca", "cache": {"ttl_secs": 60}}, "b": {"cluster": "cb"}, "c": {"cluster": "cc"}},
                "models": [
                  {"match": "plain", "backend": "a"},
                  {"match": "own", "backend": "a", "cache": {"ttl_secs": 5, "mode": "always", "shared": true}},
                  {"match": "m", "backend": "a", "price": {"input_per_million": 1, "output_per_million": 2},
                   "on_budget_exhausted": "fallback",
                   "fallbacks": [{"backend": "b", "price": {"input_per_million": 3, "output_per_million": 4}},
                                 {"backend": "c", "rename": "m2"}]}]}"#,
        )
        .unwrap();
        let plain = router.resolve("plain").unwrap();
        assert_eq!(plain.cache.as_ref().map(|c| c.ttl_secs), Some(60), "the backend's cache");
        assert_eq!(plain.members, [Candidate { backend: "a".into(), price: None }]);
        assert_eq!((plain.chain_from(0, false), plain.chain_from(1, false)), (None, None));
        let own = router.resolve("own").unwrap().cache.clone().unwrap();
        assert_eq!((own.ttl_secs, own.mode, own.shared), (5, crate::config::CacheMode::Always, true));
        let m = router.resolve("m").unwrap();
        let prices: Vec<_> =
            m.members.iter().map(|c| (c.backend.as_str(), c.price.map(|p| p.input_per_million))).collect();
        assert_eq!(
            prices,
            [("a", Some(1.0)), ("b", Some(3.0)), ("c", Some(1.0))],
            "a fallback's own price, else the route's"
        );
        assert_eq!(m.on_budget_exhausted, OnBudgetExhausted::Fallback);
        let backends = |member, stream| {
            let chain = Chain::from_header(m.chain_from(member, stream).unwrap().as_bytes()).unwrap();
            assert_eq!(chain.stream, stream);
            chain.members.iter().map(|m| m.backend.clone()).collect::<Vec<_>>()
        };
        assert_eq!(backends(0, false), ["a", "b", "c"]);
        assert_eq!(backends(1, true), ["b", "c"]);
        assert_eq!(backends(2, false), ["c"]);
        assert_eq!(m.chain_from(3, false), None);
        assert!(router.key_budgets("anyone").is_none());
    }
}
