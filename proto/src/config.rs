//! The filter's configuration: the JSON inside the Envoy YAML's
//! `plugin_config.configuration`. Unknown keys are rejected so that a typo
//! fails loudly when Envoy loads the configuration, not silently at run time.

use crate::backend::{ApiKey, Dialect};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Default limit on a request body the filter buffers to read `model`.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Requests with a larger body get a 413.
    #[serde(default = "default_max_request_body_bytes")]
    pub max_request_body_bytes: usize,
    /// Backends by name.
    pub backends: BTreeMap<String, BackendConfig>,
    /// Which backend serves which model names.
    pub models: Vec<ModelRouteConfig>,
    /// The Envoy cluster of the stream guard (ext-proc's relay that ends a
    /// broken stream with an error event). Streaming requests go through it
    /// when set, and straight to their backend when not.
    #[serde(default)]
    pub stream_guard_cluster: Option<String>,
    /// The keys clients must present. None configured: the gateway is open.
    #[serde(default)]
    pub client_keys: Vec<ClientKeyConfig>,
    /// Where every answered request is reported (ext-proc's admin port), for
    /// metrics and the usage report. Unset: nothing is reported.
    #[serde(default)]
    pub accounting: Option<AccountingConfig>,
    /// Rate limits kept in one store for several Envoys (ext-proc's admin
    /// port, backed by Redis). Unset: each Envoy counts in its own memory.
    #[serde(default)]
    pub shared_limits: Option<SharedLimitsConfig>,
    /// Where the Files and Batch APIs (`/v1/files…`, `/v1/batches…`) are
    /// answered: ext-proc's admin port. Unset: those paths pass on to
    /// Envoy's routes as any other path does.
    #[serde(default)]
    pub batches: Option<BatchesConfig>,
    /// Where operations on self-hosted pools (loading and unloading LoRA
    /// adapters, the models their replicas serve) are answered: ext-proc's
    /// admin port. Unset: those paths pass on to Envoy's routes.
    #[serde(default)]
    pub pools: Option<PoolsConfig>,
    /// How models with fallbacks move from one backend to the next.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// The token the filter presents to the stream guard and to ext-proc's
    /// admin port (as [`crate::headers::INTERNAL_TOKEN`]), the same one those
    /// processes are started with. Unset: the filter presents none.
    #[serde(default)]
    pub internal_token: Option<String>,
    /// Tokens a request reserves under a token limit for an answer whose
    /// length it does not bound (no `max_completion_tokens` or `max_tokens`).
    #[serde(default = "default_reserved_completion_tokens")]
    pub reserved_completion_tokens: u64,
    /// The store of cached answers and idempotent requests' answers (ext-proc's
    /// admin port). Unset: nothing is cached, and `Idempotency-Key` is ignored.
    /// Routes opt into caching with `models[].cache` or `backends.<name>.cache`.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Requests carrying `Idempotency-Key` are answered once per key and client
    /// key within the window; repeats get the first answer. Needs `cache`.
    #[serde(default)]
    pub idempotency: Option<IdempotencyConfig>,
    /// Where the spend and token budgets of `client_keys[].budgets` are kept
    /// (ext-proc's admin port). Needs `accounting`, whose records settle them.
    #[serde(default)]
    pub budgets: Option<BudgetsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
    /// Longest wait for the store; past it the request goes on as a miss.
    #[serde(default = "default_gate_timeout_ms")]
    pub timeout_ms: u64,
    /// The largest answer kept, in bytes as the client got it; a larger one is not cached.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// A hit's tokens count against the key's token limits, as if the backend had answered.
    #[serde(default)]
    pub hits_count_in_limits: bool,
    /// Bytes of cached answers each Envoy worker keeps a copy of, so that an exact repeat of a
    /// request it saw served from the cache is answered without asking ext-proc; 0 turns it off.
    #[serde(default = "default_local_max_bytes")]
    pub local_max_bytes: usize,
}

/// Default of `cache.local_max_bytes`.
pub const DEFAULT_LOCAL_MAX_BYTES: usize = 8 * 1024 * 1024;

fn default_local_max_bytes() -> usize {
    DEFAULT_LOCAL_MAX_BYTES
}

/// Default of `cache.max_entry_bytes`.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1024 * 1024;

fn default_max_entry_bytes() -> usize {
    DEFAULT_MAX_ENTRY_BYTES
}

fn default_gate_timeout_ms() -> u64 {
    200
}

/// A route's cache: `models[].cache` or `backends.<name>.cache` (the model's wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// How long an answer is served from the cache, 1 to 2592000 (30 days).
    pub ttl_secs: u64,
    #[serde(default)]
    pub mode: CacheMode,
    /// Hits are shared by every client key, instead of each key seeing only its own answers.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Only requests deterministic by their parameters: `temperature: 0`, or a `seed`.
    #[default]
    Deterministic,
    /// Every request the endpoint allows (the operator accepts replayed samples).
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key's first answer is kept for its repeats, 1 to 2592000 (30 days).
    #[serde(default = "default_idempotency_window_secs")]
    pub window_secs: u64,
}

/// Default of `idempotency.window_secs`: 24 hours.
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECS: u64 = 24 * 60 * 60;

fn default_idempotency_window_secs() -> u64 {
    DEFAULT_IDEMPOTENCY_WINDOW_SECS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
    /// Longest wait for the store's verdict; past it the store counts as unreachable.
    #[serde(default = "default_gate_timeout_ms")]
    pub timeout_ms: u64,
    /// What an unreachable store means for a request under a budget: by
    /// default it is refused (503), since money cannot be un-spent.
    #[serde(default = "default_budgets_on_failure")]
    pub on_failure: FailureMode,
}

fn default_budgets_on_failure() -> FailureMode {
    FailureMode::Deny
}

/// A key's budgets: its own, per model name or pattern, and per backend.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBudgetsConfig {
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    #[serde(default)]
    pub usd_per_month: Option<f64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
    /// On the models matching each name or pattern, on top of the key's own;
    /// for each amount, the most specific pattern that sets it applies.
    #[serde(default)]
    pub models: BTreeMap<String, BudgetAmounts>,
    /// On the requests a backend serves (a fallback's included), on top of the others.
    #[serde(default)]
    pub backends: BTreeMap<String, BudgetAmounts>,
}

impl KeyBudgetsConfig {
    /// The key's own amounts, on every model.
    pub fn own(&self) -> BudgetAmounts {
        BudgetAmounts {
            usd_per_day: self.usd_per_day,
            usd_per_month: self.usd_per_month,
            tokens_per_day: self.tokens_per_day,
            tokens_per_month: self.tokens_per_month,
        }
    }
}

/// Amounts per calendar day and month (UTC), each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetAmounts {
    #[serde(default)]
    pub usd_per_day: Option<f64>,
    #[serde(default)]
    pub usd_per_month: Option<f64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub tokens_per_month: Option<u64>,
}

/// What a model with fallbacks does when a budget refuses its first backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBudgetExhausted {
    /// A 429 `insufficient_quota`.
    #[default]
    Refuse,
    /// The next backend whose own budgets allow the request serves it.
    Fallback,
}

/// Default of `reserved_completion_tokens`.
pub const DEFAULT_RESERVED_COMPLETION_TOKENS: u64 = 1024;

fn default_reserved_completion_tokens() -> u64 {
    DEFAULT_RESERVED_COMPLETION_TOKENS
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How long an attempt may take to start answering (for a whole answer,
    /// to answer) before the next backend is tried; the last backend has no such limit.
    pub per_try_timeout_ms: u64,
    /// Backend answers that send the request on to the next backend.
    pub retry_on_status: Vec<u16>,
    /// Retries allowed at once, as a percentage of the requests in flight in the stream guard...
    pub retry_budget_percent: u32,
    /// ...and always at least this many.
    pub min_retry_concurrency: u32,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            per_try_timeout_ms: 60_000,
            // 529: Anthropic's "overloaded".
            retry_on_status: vec![429, 500, 502, 503, 504, 529],
            retry_budget_percent: 20,
            min_retry_concurrency: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedLimitsConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
    /// Longest wait for the store's verdict; past it the store counts as unreachable.
    #[serde(default = "default_shared_limits_timeout_ms")]
    pub timeout_ms: u64,
    /// What an unreachable store means for a request with limits.
    #[serde(default)]
    pub on_failure: FailureMode,
}

fn default_shared_limits_timeout_ms() -> u64 {
    200
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Fail open: the request goes on, unlimited (availability first).
    #[default]
    Allow,
    /// Fail closed: the request gets a 503.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchesConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingConfig {
    /// The Envoy cluster of ext-proc's admin port.
    pub cluster: String,
    /// How often each Envoy worker sends the records it holds.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
}

fn default_flush_interval_ms() -> u64 {
    1000
}

/// What a model costs on one route, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// What the gateway calls the key in logs, metrics and usage: never the
    /// key itself. It travels in headers (the owner of a file or batch), so it
    /// is printable ASCII without spaces at either end.
    pub name: String,
    /// SHA-256 of the key, as 64 hex digits (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// Model names or patterns (as in `models[].match`) the key may use; every model if unset.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// How fast the key may call; unlimited if unset.
    #[serde(default)]
    pub limits: Option<LimitConfig>,
    /// The key's spend and token budgets per day and month; need `budgets`.
    #[serde(default)]
    pub budgets: Option<KeyBudgetsConfig>,
    /// An operator's key: it may also load and unload LoRA adapters on self-hosted pools.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Requests per minute for the key, all models together.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt and completion) per minute for the key, all models together.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Limits per model name or pattern, on top of the key's own; the most specific match applies.
    #[serde(default)]
    pub models: BTreeMap<String, ModelLimitConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimitConfig {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

fn default_max_request_body_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The Envoy cluster requests for this backend go to.
    pub cluster: String,
    /// `owned_by` in `/v1/models` answers; the backend's name if unset.
    #[serde(default)]
    pub owned_by: Option<String>,
    /// The API the backend speaks; `openai` if unset.
    #[serde(default)]
    pub dialect: Dialect,
    /// Where the key the backend is called with comes from. Unset, the backend
    /// gets no key, and the client's own is never passed on unless this is `passthrough`.
    #[serde(default)]
    pub api_key: Option<ApiKey>,
    /// Request parameters set when the client sent none.
    #[serde(default)]
    pub defaults: Map<String, Value>,
    /// A self-hosted pool whose replica ext-proc picks for each request: the
    /// pool's name in ext-proc's `--pools` file. The cluster must then pick
    /// its host from the picker's `x-gateway-destination-endpoint` header.
    #[serde(default)]
    pub pool: Option<String>,
    /// The backend serves OpenAI's Responses API itself (OpenAI, recent vLLM):
    /// `/v1/responses` passes through to it instead of being translated into
    /// chat completions. Only for the `openai` dialect.
    #[serde(default)]
    pub serves_responses: bool,
    /// Answers from this backend are cached (unless the model's route says otherwise).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRouteConfig {
    /// An exact model name, a prefix pattern ending in `*` (`claude-*`), or `*` alone.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Name of an entry in `backends`.
    pub backend: String,
    /// The model name the backend expects, when it differs from the client's.
    #[serde(default)]
    pub rename: Option<String>,
    /// What the model costs on this route, for the usage report.
    #[serde(default)]
    pub price: Option<Price>,
    /// Backends that serve the model when `backend` cannot, in order, each
    /// with its own model name. The stream guard tries them in turn, so a
    /// model with fallbacks needs `stream_guard_cluster`.
    #[serde(default)]
    pub fallbacks: Vec<FallbackConfig>,
    /// This model's answers are cached; overrides its backend's `cache`.
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
    /// With fallbacks: whether a spent budget refuses the request or moves it on.
    #[serde(default)]
    pub on_budget_exhausted: OnBudgetExhausted,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    pub backend: String,
    /// The model name this backend expects, when it differs from the client's.
    #[serde(default)]
    pub rename: Option<String>,
    /// What the model costs on this backend; the route's `price` if unset.
    #[serde(default)]
    pub price: Option<Price>,
}

/// Bounds of the waits configured in milliseconds: Envoy takes 0 as no
/// timeout at all, and a call's timeout must fit its 32 bits.
const MILLISECONDS: std::ops::RangeInclusive<u64> = 1..=600_000;

impl FilterConfig {
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let config: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid modelgate configuration: {e}"))?;
        let waits = [
            ("accounting.flush_interval_ms", config.accounting.as_ref().map(|a| a.flush_interval_ms)),
            ("shared_limits.timeout_ms", config.shared_limits.as_ref().map(|s| s.timeout_ms)),
            ("failover.per_try_timeout_ms", Some(config.failover.per_try_timeout_ms)),
            ("cache.timeout_ms", config.cache.as_ref().map(|c| c.timeout_ms)),
            ("budgets.timeout_ms", config.budgets.as_ref().map(|b| b.timeout_ms)),
        ];
        for (name, ms) in waits {
            if let Some(ms) = ms.filter(|ms| !MILLISECONDS.contains(ms)) {
                return Err(format!("invalid modelgate configuration: {name} is {ms}, outside 1 to 600000"));
            }
        }
        let printable = |token: &String| !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        if config.internal_token.as_ref().is_some_and(|token| !printable(token)) {
            return Err(
                "invalid modelgate configuration: internal_token must be printable ASCII, without spaces".into()
            );
        }
        config.check_gate().map_err(|e| format!("invalid modelgate configuration: {e}"))?;
        Ok(config)
    }

    /// The cache's, idempotency's and budgets' settings hold together.
    fn check_gate(&self) -> Result<(), String> {
        let route_caches = self
            .backends
            .iter()
            .filter_map(|(name, b)| Some((format!("backends.{name}.cache"), b.cache.as_ref()?)))
            .chain(
                self.models.iter().filter_map(|m| Some((format!("models `{}` cache", m.pattern), m.cache.as_ref()?))),
            );
        let mut seconds =
            vec![("idempotency.window_secs".to_string(), self.idempotency.as_ref().map(|i| i.window_secs))];
        for (name, cache) in route_caches {
            if self.cache.is_none() {
                return Err(format!("{name} needs the top-level `cache`, the store of cached answers"));
            }
            seconds.push((format!("{name}.ttl_secs"), Some(cache.ttl_secs)));
        }
        for (name, secs) in seconds {
            if let Some(secs) = secs.filter(|secs| !SECONDS.contains(secs)) {
                return Err(format!("{name} is {secs}, outside 1 to 2592000 (30 days)"));
            }
        }
        if self.idempotency.is_some() && self.cache.is_none() {
            return Err("`idempotency` needs `cache`, whose store keeps the first answers".into());
        }
        if self.budgets.is_some() && self.accounting.is_none() {
            return Err("`budgets` needs `accounting`, whose usage records settle them".into());
        }
        for key in &self.client_keys {
            let Some(budgets) = &key.budgets else { continue };
            if self.budgets.is_none() {
                return Err(format!("client key `{}` has budgets, which need the top-level `budgets`", key.name));
            }
            let amounts = std::iter::once(("".to_string(), budgets.own()))
                .chain(budgets.models.iter().map(|(pattern, a)| (format!(" on models `{pattern}`"), *a)))
                .chain(budgets.backends.iter().map(|(backend, a)| (format!(" on backend `{backend}`"), *a)));
            for (scope, amounts) in amounts {
                for usd in [amounts.usd_per_day, amounts.usd_per_month].into_iter().flatten() {
                    if !(usd.is_finite() && usd >= 0.0) {
                        return Err(format!(
                            "client key `{}`: a budget{scope} is {usd} dollars, not 0 or more",
                            key.name
                        ));
                    }
                }
            }
            for pattern in budgets.models.keys() {
                crate::routing::Pattern::parse(pattern)
                    .map_err(|e| format!("client key `{}`'s budgets: {e}", key.name))?;
            }
            if let Some(backend) = budgets.backends.keys().find(|b| !self.backends.contains_key(*b)) {
                return Err(format!("client key `{}` has budgets on unknown backend `{backend}`", key.name));
            }
        }
        Ok(())
    }
}

/// Bounds of the durations configured in seconds (a cache's TTL, idempotency's window): up to 30 days.
const SECONDS: std::ops::RangeInclusive<u64> = 1..=2_592_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_internal_token_must_fit_in_a_header() {
        let with = |token: &str| {
            FilterConfig::from_json(
                format!(r#"{{"backends": {{}}, "models": [], "internal_token": {token}}}"#).as_bytes(),
            )
        };
        assert_eq!(with(r#""a1-B2_c3.~""#).unwrap().internal_token.as_deref(), Some("a1-B2_c3.~"));
        for bad in ["\"\"", "\"two words\"", "\"line\\nbreak\"", "\"\u{e9}\""] {
            assert!(with(bad).unwrap_err().contains("internal_token"), "{bad}");
        }
        assert_eq!(with("null").unwrap().internal_token, None);
    }

    #[test]
    fn the_cache_idempotency_and_budgets_settings_hold_together() {
        let with = |extra: &str| {
            FilterConfig::from_json(
                format!(
                    r#"{{"backends": {{"a": {{"cluster": "a"}}}}, "models": [{{"match": "m", "backend": "a"}}]{extra}}}"#
                )
                .as_bytes(),
            )
        };
        let cache = r#", "cache": {"cluster": "admin"}"#;
        let keyed = |budgets: &str| {
            format!(
                r#", "accounting": {{"cluster": "admin"}}, "budgets": {{"cluster": "admin"}},
                   "client_keys": [{{"name": "k", "sha256": "{}", "budgets": {budgets}}}]"#,
                "0".repeat(64)
            )
        };
        let fine = [
            cache.to_string(),
            format!(r#"{cache}, "idempotency": {{}}"#),
            keyed(
                r#"{"usd_per_day": 0, "models": {"gpt-4*": {"tokens_per_month": 10}}, "backends": {"a": {"usd_per_month": 5.5}}}"#,
            ),
        ];
        for extra in &fine {
            assert!(with(extra).is_ok(), "{extra}: {:?}", with(extra).err());
        }
        let idempotency = with(&format!(r#"{cache}, "idempotency": {{}}"#)).unwrap().idempotency.unwrap();
        assert_eq!(idempotency.window_secs, 86_400);
        let bad = [
            (format!(r#"{cache}, "idempotency": {{"window_secs": 0}}"#), "outside 1 to 2592000"),
            (format!(r#"{cache}, "idempotency": {{"window_secs": 2592001}}"#), "outside 1 to 2592000"),
            (r#", "idempotency": {}"#.to_string(), "needs `cache`"),
            (r#", "cache": {"cluster": "admin", "timeout_ms": 0}"#.to_string(), "outside 1 to 600000"),
            (r#", "budgets": {"cluster": "admin"}"#.to_string(), "needs `accounting`"),
            (
                r#", "accounting": {"cluster": "admin"}, "budgets": {"cluster": "admin", "timeout_ms": 600001}"#
                    .to_string(),
                "outside 1 to 600000",
            ),
            (keyed(r#"{"usd_per_day": -1}"#), "not 0 or more"),
            (keyed(r#"{"models": {"a*b": {"usd_per_day": 1}}}"#), "only at the end"),
            (keyed(r#"{"backends": {"nope": {"usd_per_day": 1}}}"#), "unknown backend `nope`"),
        ];
        for (extra, why) in &bad {
            let error = with(extra).unwrap_err();
            assert!(error.contains(why), "{extra}: {error}");
        }
        let no_store = format!(
            r#", "client_keys": [{{"name": "k", "sha256": "{}", "budgets": {{"usd_per_day": 1}}}}]"#,
            "0".repeat(64)
        );
        assert!(with(&no_store).unwrap_err().contains("need the top-level `budgets`"));
        let route_cache = |cache_config: &str, ttl: u64| {
            FilterConfig::from_json(
                format!(
                    r#"{{"backends": {{"a": {{"cluster": "a", "cache": {{"ttl_secs": {ttl}}}}}}}, "models": []{cache_config}}}"#
                )
                .as_bytes(),
            )
        };
        assert!(route_cache(cache, 300).is_ok());
        assert!(route_cache(cache, 0).unwrap_err().contains("backends.a.cache.ttl_secs is 0"));
        assert!(route_cache("", 300).unwrap_err().contains("needs the top-level `cache`"));
    }
}
