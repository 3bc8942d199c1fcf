//! Rate limits per client key: the arithmetic, apart from where its state is kept.
//!
//! A limit of N per minute is a GCRA (generic cell rate algorithm) bucket: it
//! holds N, refills at N per minute, continuously, and a request may spend
//! from it while anything is left. That is how OpenAI's own limits behave
//! (their `x-ratelimit-reset-*` is the time until the bucket is full again),
//! and its whole state is one number, the "theoretical arrival time", which a
//! compare-and-swap store (Envoy's shared data, Redis) can update atomically.

use crate::config::LimitConfig;
use crate::error::GatewayError;
use crate::routing::Pattern;
use serde::{Deserialize, Serialize};

/// One minute, in microseconds: the period every limit is counted over.
const MINUTE_US: u64 = 60_000_000;

/// What one limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub allowed: bool,
    /// The limit, per minute.
    pub limit: u64,
    /// What is left once this request is counted (or, when refused, now).
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub reset_us: u64,
    /// Microseconds until this request would be allowed (0 when it is).
    pub retry_after_us: u64,
}

/// A limit of `per_minute` over one bucket whose state is `tat` (0 for a new
/// bucket): the verdict on spending `cost` at `now_us`, and the bucket's new
/// state (unchanged when refused).
pub fn spend(per_minute: u64, tat: u64, now_us: u64, cost: u64) -> (Verdict, u64) {
    let per_minute = per_minute.clamp(1, MINUTE_US);
    // Microseconds for one unit to come back.
    let interval = MINUTE_US / per_minute;
    let start = tat.max(now_us);
    let new_tat = start.saturating_add(cost.saturating_mul(interval));
    let allowed = new_tat - now_us <= MINUTE_US;
    let tat = if allowed { new_tat } else { start };
    let used = tat - now_us;
    let verdict = Verdict {
        allowed,
        limit: per_minute,
        remaining: (MINUTE_US.saturating_sub(used) / interval).min(per_minute),
        reset_us: used,
        retry_after_us: if allowed { 0 } else { new_tat - now_us - MINUTE_US },
    };
    (verdict, tat)
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`.
pub fn openai_duration(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let seconds = format!("{:.3}", ms as f64 / 1000.0);
        format!("{}s", seconds.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000).div_ceil(1000))
    }
}

/// Whole seconds to wait, as `retry-after` says it: never 0 for a refusal.
pub fn retry_after_seconds(us: u64) -> u64 {
    us.div_ceil(1_000_000).max(1)
}

/// The requests-per-minute limits that apply to one key: its own, and the
/// one for the model asked for, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u64>,
    /// Per model name or pattern; the most specific match applies.
    models: Vec<(String, u64)>,
}

impl KeyLimits {
    pub fn from_config(limits: &LimitConfig) -> Result<Self, String> {
        let mut models = Vec::new();
        for (pattern, limit) in &limits.models {
            Pattern::parse(pattern)?;
            models.push((pattern.clone(), limit.requests_per_minute));
        }
        Ok(KeyLimits { requests_per_minute: limits.requests_per_minute, models })
    }

    /// The limit for `model`, and the pattern it was set for (which names its bucket).
    pub fn for_model(&self, model: &str) -> Option<(&str, u64)> {
        self.models
            .iter()
            .filter_map(|(pattern, limit)| {
                let matched = Pattern::parse(pattern).ok()?;
                matched.matches(model).then(|| (matched.specificity(), pattern.as_str(), *limit))
            })
            .max_by_key(|(specificity, _, _)| *specificity)
            .map(|(_, pattern, limit)| (pattern, limit))
    }

    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.models.is_empty()
    }
}

/// One bucket to spend from, as a shared store (ext-proc's Redis-backed
/// `POST /v1/limits/spend`) is asked to: every bucket of a request in one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSpend {
    /// The bucket's name, such as `modelgate.requests.alice`.
    pub name: String,
    /// The limit, per minute.
    pub per_minute: u64,
    /// Units to spend: 1 for a request, a token count for a debit, 0 to only look.
    pub cost: u64,
}

/// A call to a shared store: admit (spend from every bucket only if all allow it)
/// or debit (spend regardless, as tokens already used are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendRequest {
    pub buckets: Vec<BucketSpend>,
    #[serde(default)]
    pub debit: bool,
}

/// The store's answer: one verdict per bucket, in the request's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendResponse {
    pub verdicts: Vec<Verdict>,
}

/// Where buckets are kept: each bucket's state under its name, changed only
/// by compare-and-swap, so concurrent requests (Envoy's worker threads, or
/// several gateways sharing Redis) never spend the same unit twice.
pub trait BucketStore {
    /// A bucket's state (0 if it has none) and the version to swap against.
    fn load(&self, bucket: &str) -> (u64, Option<u32>);
    /// Stores a bucket's state if its version is still `version`; false if another request got there first.
    fn swap(&self, bucket: &str, state: u64, version: Option<u32>) -> bool;
}

/// How often a request retries a swap before giving up on exactness and
/// counting what it read; only a storm of requests on one key gets that far.
const SWAP_ATTEMPTS: usize = 8;

/// One request, counted against every requests-per-minute limit of its key:
/// the key's own and the model's. Allowed only if every limit allows it, and
/// then counted in each; a refusal counts nowhere. The verdict reported is
/// the tightest one; `None` when the key has no limit for this request.
pub fn admit(store: &dyn BucketStore, key: &str, limits: &KeyLimits, model: &str, now_us: u64) -> Option<Verdict> {
    let mut buckets = Vec::with_capacity(2);
    if let Some(limit) = limits.requests_per_minute {
        buckets.push((format!("modelgate.requests.{key}"), limit));
    }
    if let Some((pattern, limit)) = limits.for_model(model) {
        buckets.push((format!("modelgate.requests.{key}.{pattern}"), limit));
    }
    let tightest = |verdicts: &mut dyn Iterator<Item = Verdict>| {
        verdicts.min_by_key(|v| (v.allowed, v.remaining, std::cmp::Reverse(v.reset_us)))
    };
    let refused = tightest(&mut buckets.iter().map(|(bucket, limit)| spend(*limit, store.load(bucket).0, now_us, 1).0))
        .filter(|v| !v.allowed);
    if refused.is_some() {
        return refused;
    }
    tightest(&mut buckets.iter().map(|(bucket, limit)| {
        let mut attempts = 1;
        loop {
            let (state, version) = store.load(bucket);
            let (verdict, next) = spend(*limit, state, now_us, 1);
            // A bucket another request emptied since the check: this one was admitted already.
            if !verdict.allowed || store.swap(bucket, next, version) || attempts == SWAP_ATTEMPTS {
                break Verdict { allowed: true, ..verdict };
            }
            attempts += 1;
        }
    }))
}

/// Buckets in a map, versioned as Envoy's shared data versions them: for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Default)]
pub struct MemoryBuckets(std::cell::RefCell<std::collections::HashMap<String, (u64, u32)>>);

#[cfg(any(test, feature = "testing"))]
impl BucketStore for MemoryBuckets {
    fn load(&self, bucket: &str) -> (u64, Option<u32>) {
        self.0.borrow().get(bucket).map_or((0, None), |(state, version)| (*state, Some(*version)))
    }

    fn swap(&self, bucket: &str, state: u64, version: Option<u32>) -> bool {
        let mut map = self.0.borrow_mut();
        let current = map.get(bucket).map(|(_, v)| *v);
        if current != version {
            return false;
        }
        map.insert(bucket.to_string(), (state, current.map_or(1, |v| v + 1)));
        true
    }
}

/// OpenAI's 429 for a key over a requests-per-minute limit.
pub fn refusal(key: &str, model: &str, verdict: &Verdict) -> GatewayError {
    let wait = openai_duration(verdict.retry_after_us);
    GatewayError::new(
        429,
        "requests",
        format!(
            "Rate limit reached for {model} on requests per min (RPM) for key `{key}`: Limit {}, Used {}, Requested 1. Please try again in {wait}.",
            verdict.limit,
            verdict.limit - verdict.remaining
        ),
        None,
        Some("rate_limit_exceeded"),
    )
}

/// `x-ratelimit-*-requests`, as OpenAI sends them on every answer.
pub fn request_headers(verdict: &Verdict) -> [(&'static str, String); 3] {
    [
        ("x-ratelimit-limit-requests", verdict.limit.to_string()),
        ("x-ratelimit-remaining-requests", verdict.remaining.to_string()),
        ("x-ratelimit-reset-requests", openai_duration(verdict.reset_us)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn a_full_bucket_allows_the_limit_at_once_then_refills_steadily() {
        let (mut tat, now) = (0, 1_000 * SECOND);
        for i in 1..=3 {
            let (v, next) = spend(3, tat, now, 1);
            assert!(v.allowed);
            assert_eq!((v.limit, v.remaining, v.reset_us), (3, 3 - i, i * 20 * SECOND));
            tat = next;
        }
        let (refused, unchanged) = spend(3, tat, now, 1);
        assert_eq!(unchanged, tat);
        assert_eq!((refused.allowed, refused.remaining, refused.retry_after_us), (false, 0, 20 * SECOND));
        assert_eq!(refused.reset_us, 60 * SECOND);
        // One unit is back after a third of a minute, not after a whole one.
        let (later, _) = spend(3, tat, now + 20 * SECOND, 1);
        assert_eq!((later.allowed, later.remaining), (true, 0));
        // An idle bucket is full, whatever happened long ago.
        let (idle, _) = spend(3, tat, now + 3600 * SECOND, 1);
        assert_eq!(idle.remaining, 2);
    }

    #[test]
    fn durations_read_as_openais() {
        assert_eq!(openai_duration(0), "0ms");
        assert_eq!(openai_duration(19_200), "20ms");
        assert_eq!(openai_duration(1_500_000), "1.5s");
        assert_eq!(openai_duration(20_000_000), "20s");
        assert_eq!(openai_duration(360_000_000), "6m0s");
        assert_eq!(openai_duration(61_500_000), "1m2s");
        assert_eq!((retry_after_seconds(1), retry_after_seconds(2_000_001)), (1, 3));
    }

    #[test]
    fn the_most_specific_model_limit_applies() {
        let config: LimitConfig = serde_json::from_value(serde_json::json!({
            "requests_per_minute": 100,
            "models": {"*": {"requests_per_minute": 50}, "gpt-*": {"requests_per_minute": 20},
                       "gpt-4o": {"requests_per_minute": 5}}
        }))
        .unwrap();
        let limits = KeyLimits::from_config(&config).unwrap();
        assert_eq!(limits.for_model("gpt-4o"), Some(("gpt-4o", 5)));
        assert_eq!(limits.for_model("gpt-4o-mini"), Some(("gpt-*", 20)));
        assert_eq!(limits.for_model("llama"), Some(("*", 50)));
        assert_eq!(limits.requests_per_minute, Some(100));
        assert_eq!(KeyLimits::default().for_model("x"), None);
    }

    #[test]
    fn a_request_counts_against_its_keys_limit_and_its_models() {
        let config: LimitConfig = serde_json::from_value(serde_json::json!({
            "requests_per_minute": 3, "models": {"gpt-4o": {"requests_per_minute": 2}}
        }))
        .unwrap();
        let limits = KeyLimits::from_config(&config).unwrap();
        let store = MemoryBuckets::default();
        let now = 100 * SECOND;
        let first = admit(&store, "k", &limits, "gpt-4o", now).unwrap();
        assert_eq!((first.allowed, first.limit, first.remaining), (true, 2, 1), "the model's limit is the tighter");
        assert!(admit(&store, "k", &limits, "gpt-4o", now).unwrap().allowed);
        let refused = admit(&store, "k", &limits, "gpt-4o", now).unwrap();
        assert_eq!((refused.allowed, refused.limit, refused.retry_after_us), (false, 2, 30 * SECOND));
        // The refusal spent nothing: the key's own limit still has one left for another model.
        let other = admit(&store, "k", &limits, "llama", now).unwrap();
        assert_eq!((other.allowed, other.limit, other.remaining), (true, 3, 0));
        assert!(!admit(&store, "k", &limits, "llama", now).unwrap().allowed);
        assert_eq!(admit(&store, "other-key", &limits, "llama", now).unwrap().remaining, 2);
        assert_eq!(admit(&store, "k", &KeyLimits::default(), "llama", now), None);
        let headers = request_headers(&refused);
        assert_eq!(headers[0], ("x-ratelimit-limit-requests", "2".to_string()));
        assert_eq!(headers[2], ("x-ratelimit-reset-requests", "1m0s".to_string()));
    }

    proptest! {
        #[test]
        fn never_more_than_the_limit_in_any_minute(limit in 1u64..50, gaps in proptest::collection::vec(0u64..5 * SECOND, 1..300)) {
            let (mut tat, mut now) = (0u64, 10 * SECOND);
            let mut allowed_at = Vec::new();
            for gap in gaps {
                now += gap;
                let (v, next) = spend(limit, tat, now, 1);
                prop_assert!(v.remaining <= limit && v.reset_us <= MINUTE_US);
                if v.allowed {
                    allowed_at.push(now);
                } else {
                    prop_assert!(v.retry_after_us > 0 && v.retry_after_us <= MINUTE_US);
                }
                tat = next;
            }
            // Whatever the pattern, no sliding minute holds more than the burst plus what refilled in it.
            for (i, start) in allowed_at.iter().enumerate() {
                let in_window = allowed_at[i..].iter().take_while(|t| **t < start + MINUTE_US).count() as u64;
                prop_assert!(in_window <= 2 * limit, "{in_window} in one minute at a limit of {limit}");
            }
        }

        #[test]
        fn any_state_and_cost_never_panic(limit in any::<u64>(), tat in any::<u64>(), now in any::<u64>(), cost in any::<u64>()) {
            let _ = spend(limit, tat, now, cost);
        }
    }
}
