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
    let per_minute = per_minute.clamp(1, MAX_PER_MINUTE);
    let start = tat.max(now_us);
    let new_tat = start.saturating_add(time_for(per_minute, cost));
    let allowed = new_tat - now_us <= MINUTE_US;
    let tat = if allowed { new_tat } else { start };
    let used = tat - now_us;
    let left = u128::from(MINUTE_US.saturating_sub(used)) * u128::from(per_minute) / u128::from(MINUTE_US);
    let verdict = Verdict {
        allowed,
        limit: per_minute,
        remaining: u64::try_from(left).unwrap_or(u64::MAX).min(per_minute),
        reset_us: used,
        retry_after_us: if allowed { 0 } else { new_tat - now_us - MINUTE_US },
    };
    (verdict, tat)
}

/// The largest limit counted exactly: 150 million a minute. Redis's Lua
/// counts in doubles (exact to 2^53), and a minute in microseconds times a
/// limit must stay within that; a larger limit counts as this one.
pub const MAX_PER_MINUTE: u64 = (1 << 53) / MINUTE_US;

/// Microseconds for `cost` units to come back at `per_minute`, rounded up:
/// exact enough for limits of any size (a rounded per-unit interval would
/// let a 25M-a-minute limit spend 30M).
fn time_for(per_minute: u64, cost: u64) -> u64 {
    let exact = (u128::from(cost) * u128::from(MINUTE_US)).div_ceil(u128::from(per_minute.max(1)));
    u64::try_from(exact).unwrap_or(u64::MAX)
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

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    /// Prompt and completion tokens together, as the backend's `usage` reports them.
    Tokens,
}

impl Unit {
    /// As OpenAI names it in `x-ratelimit-*-{unit}` and in a 429's `type`.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

/// Per-minute limits, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rate {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

impl Rate {
    fn per_minute(&self, unit: Unit) -> Option<u64> {
        match unit {
            Unit::Requests => self.requests_per_minute,
            Unit::Tokens => self.tokens_per_minute,
        }
    }
}

/// The limits that apply to one key: its own, and per model name or pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub own: Rate,
    /// Per model name or pattern; for each unit, the most specific pattern that sets it applies.
    models: Vec<(String, Rate)>,
}

/// One bucket a request is counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Its name in the store: `modelgate.{unit}.{key}`, with `.{pattern}` for a model's limit.
    pub name: String,
    pub unit: Unit,
    pub per_minute: u64,
}

impl KeyLimits {
    pub fn from_config(limits: &LimitConfig) -> Result<Self, String> {
        let mut models = Vec::new();
        for (pattern, limit) in &limits.models {
            Pattern::parse(pattern)?;
            let rate =
                Rate { requests_per_minute: limit.requests_per_minute, tokens_per_minute: limit.tokens_per_minute };
            models.push((pattern.clone(), rate));
        }
        let own = Rate { requests_per_minute: limits.requests_per_minute, tokens_per_minute: limits.tokens_per_minute };
        Ok(KeyLimits { own, models })
    }

    /// The `unit` limit for `model`, and the pattern it was set for (which names its bucket).
    pub fn for_model(&self, model: &str, unit: Unit) -> Option<(&str, u64)> {
        self.models
            .iter()
            .filter_map(|(pattern, rate)| {
                let limit = rate.per_minute(unit)?;
                let matched = Pattern::parse(pattern).ok()?;
                matched.matches(model).then(|| (matched.specificity(), pattern.as_str(), limit))
            })
            .max_by_key(|(specificity, _, _)| *specificity)
            .map(|(_, pattern, limit)| (pattern, limit))
    }

    /// Every bucket a request of `key` for `model` counts in.
    pub fn buckets(&self, key: &str, model: &str) -> Vec<Bucket> {
        let mut buckets = Vec::new();
        for unit in [Unit::Requests, Unit::Tokens] {
            let name = unit.name();
            if let Some(per_minute) = self.own.per_minute(unit) {
                buckets.push(Bucket { name: format!("modelgate.{name}.{key}"), unit, per_minute });
            }
            if let Some((pattern, per_minute)) = self.for_model(model, unit) {
                buckets.push(Bucket { name: format!("modelgate.{name}.{key}.{pattern}"), unit, per_minute });
            }
        }
        buckets
    }

    /// True when some limit counts tokens, so answers' usage must be read.
    pub fn counts_tokens(&self) -> bool {
        self.own.tokens_per_minute.is_some() || self.models.iter().any(|(_, rate)| rate.tokens_per_minute.is_some())
    }
}

impl Bucket {
    /// What admitting a request spends from this bucket: one request; tokens
    /// are only looked at, since they are known once the answer is.
    fn admission_cost(&self) -> u64 {
        match self.unit {
            Unit::Requests => 1,
            Unit::Tokens => 0,
        }
    }

    /// The call to a shared store that admits a request into `buckets`.
    pub fn admission(buckets: &[Bucket]) -> SpendRequest {
        let buckets = buckets
            .iter()
            .map(|b| BucketSpend { name: b.name.clone(), per_minute: b.per_minute, cost: b.admission_cost() })
            .collect();
        SpendRequest { buckets, debit: false }
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

/// What a request's limits said when it was admitted (or refused): the
/// tightest verdict per unit, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    pub requests: Option<Verdict>,
    pub tokens: Option<Verdict>,
}

impl Admission {
    /// Combines one verdict per bucket, in the buckets' order.
    pub fn from_verdicts(buckets: &[Bucket], verdicts: &[Verdict]) -> Self {
        let tightest = |unit: Unit| {
            buckets
                .iter()
                .zip(verdicts)
                .filter(|(b, _)| b.unit == unit)
                .map(|(_, v)| *v)
                .min_by_key(|v| (v.allowed, v.remaining, std::cmp::Reverse(v.reset_us)))
        };
        Admission { requests: tightest(Unit::Requests), tokens: tightest(Unit::Tokens) }
    }

    /// The unit whose limit refused the request, and its verdict; requests first.
    pub fn refused(&self) -> Option<(Unit, Verdict)> {
        [(Unit::Requests, self.requests), (Unit::Tokens, self.tokens)]
            .into_iter()
            .find_map(|(unit, verdict)| verdict.filter(|v| !v.allowed).map(|v| (unit, v)))
    }
}

/// Swaps `bucket`'s state for what `next` makes of it, retrying when another
/// request changed it in between; the verdict of the swap that landed.
fn update(store: &dyn BucketStore, bucket: &str, next: impl Fn(u64) -> (Verdict, u64)) -> Verdict {
    let mut attempts = 1;
    loop {
        let (state, version) = store.load(bucket);
        let (verdict, new_state) = next(state);
        if new_state == state || store.swap(bucket, new_state, version) || attempts == SWAP_ATTEMPTS {
            break verdict;
        }
        attempts += 1;
    }
}

/// One request, admitted into every bucket of its key and model: allowed
/// only if every limit allows it, and then one request counted in each
/// requests bucket; a refusal counts nowhere. Token buckets are only looked
/// at: a key whose tokens ran out is refused until they have refilled.
pub fn admit(store: &dyn BucketStore, buckets: &[Bucket], now_us: u64) -> Admission {
    let states: Vec<u64> = buckets.iter().map(|b| store.load(&b.name).0).collect();
    let look = |b: &Bucket, state: u64, cost: u64| spend(b.per_minute, state, now_us, cost).0;
    let checked: Vec<Verdict> = buckets.iter().zip(&states).map(|(b, s)| look(b, *s, b.admission_cost())).collect();
    if checked.iter().any(|v| !v.allowed) {
        // What is left in the buckets that would have allowed it, since this request spends nothing.
        let now: Vec<Verdict> = buckets
            .iter()
            .zip(&states)
            .zip(&checked)
            .map(|((b, s), v)| if v.allowed { look(b, *s, 0) } else { *v })
            .collect();
        return Admission::from_verdicts(buckets, &now);
    }
    let spent: Vec<Verdict> = buckets
        .iter()
        .zip(checked)
        .map(|(b, looked)| {
            if b.admission_cost() == 0 {
                return looked;
            }
            // A bucket another request emptied since the check: this one was admitted already.
            let verdict = update(store, &b.name, |state| spend(b.per_minute, state, now_us, b.admission_cost()));
            Verdict { allowed: true, ..verdict }
        })
        .collect();
    Admission::from_verdicts(buckets, &spent)
}

/// Tokens an answer used, spent from every token bucket of its request
/// whatever the limit says: they are used already. A bucket in debt refuses
/// the key's next requests until it has refilled.
pub fn debit(store: &dyn BucketStore, buckets: &[Bucket], tokens: u64, now_us: u64) {
    for bucket in buckets.iter().filter(|b| b.unit == Unit::Tokens) {
        update(store, &bucket.name, |state| overspend(bucket.per_minute, state, now_us, tokens));
    }
}

/// Like [`spend`], but the cost is taken even past the limit.
pub fn overspend(per_minute: u64, tat: u64, now_us: u64, cost: u64) -> (Verdict, u64) {
    let (verdict, new_tat) = spend(per_minute, tat, now_us, cost);
    if verdict.allowed {
        return (verdict, new_tat);
    }
    (verdict, tat.max(now_us).saturating_add(time_for(per_minute, cost)))
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

/// OpenAI's 429 for a key over a limit.
pub fn refusal(key: &str, model: &str, unit: Unit, verdict: &Verdict) -> GatewayError {
    let wait = openai_duration(verdict.retry_after_us);
    let (what, requested) = match unit {
        Unit::Requests => ("requests per min (RPM)", ", Requested 1"),
        // A token count is known only once the answer is; the key has spent past its limit already.
        Unit::Tokens => ("tokens per min (TPM)", ""),
    };
    GatewayError::new(
        429,
        unit.name(),
        format!(
            "Rate limit reached for {model} on {what} for key `{key}`: Limit {}, Used {}{requested}. Please try again in {wait}.",
            verdict.limit,
            verdict.limit - verdict.remaining
        ),
        None,
        Some("rate_limit_exceeded"),
    )
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, as OpenAI sends them on every answer.
pub fn headers(admission: &Admission) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(6);
    if let Some(v) = admission.requests {
        headers.extend([
            ("x-ratelimit-limit-requests", v.limit.to_string()),
            ("x-ratelimit-remaining-requests", v.remaining.to_string()),
            ("x-ratelimit-reset-requests", openai_duration(v.reset_us)),
        ]);
    }
    if let Some(v) = admission.tokens {
        headers.extend([
            ("x-ratelimit-limit-tokens", v.limit.to_string()),
            ("x-ratelimit-remaining-tokens", v.remaining.to_string()),
            ("x-ratelimit-reset-tokens", openai_duration(v.reset_us)),
        ]);
    }
    headers
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
        let rpm = |model| limits.for_model(model, Unit::Requests);
        assert_eq!(rpm("gpt-4o"), Some(("gpt-4o", 5)));
        assert_eq!(rpm("gpt-4o-mini"), Some(("gpt-*", 20)));
        assert_eq!(rpm("llama"), Some(("*", 50)));
        assert_eq!(limits.own.requests_per_minute, Some(100));
        assert_eq!(KeyLimits::default().for_model("x", Unit::Requests), None);
        assert!(!limits.counts_tokens());
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
        let admit =
            |key: &str, limits: &KeyLimits, model: &str| admit(&store, &limits.buckets(key, model), now).requests;
        let first = admit("k", &limits, "gpt-4o").unwrap();
        assert_eq!((first.allowed, first.limit, first.remaining), (true, 2, 1), "the model's limit is the tighter");
        assert!(admit("k", &limits, "gpt-4o").unwrap().allowed);
        let refused = admit("k", &limits, "gpt-4o").unwrap();
        assert_eq!((refused.allowed, refused.limit, refused.retry_after_us), (false, 2, 30 * SECOND));
        // The refusal spent nothing: the key's own limit still has one left for another model.
        let other = admit("k", &limits, "llama").unwrap();
        assert_eq!((other.allowed, other.limit, other.remaining), (true, 3, 0));
        assert!(!admit("k", &limits, "llama").unwrap().allowed);
        assert_eq!(admit("other-key", &limits, "llama").unwrap().remaining, 2);
        assert_eq!(admit("k", &KeyLimits::default(), "llama"), None);
        let headers = headers(&Admission { requests: Some(refused), tokens: None });
        assert_eq!(headers[0], ("x-ratelimit-limit-requests", "2".to_string()));
        assert_eq!(headers[2], ("x-ratelimit-reset-requests", "1m0s".to_string()));
    }

    #[test]
    fn tokens_are_debited_after_the_answer_and_refuse_the_next_request_once_spent() {
        let config: LimitConfig = serde_json::from_value(serde_json::json!({
            "requests_per_minute": 100, "tokens_per_minute": 600,
            "models": {"gpt-*": {"tokens_per_minute": 6000}}
        }))
        .unwrap();
        let limits = KeyLimits::from_config(&config).unwrap();
        assert!(limits.counts_tokens());
        let buckets = limits.buckets("k", "gpt-4o");
        let names: Vec<&str> = buckets.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["modelgate.requests.k", "modelgate.tokens.k", "modelgate.tokens.k.gpt-*"]);
        let store = MemoryBuckets::default();
        let now = 100 * SECOND;
        let first = admit(&store, &buckets, now);
        assert_eq!(first.tokens.map(|v| (v.allowed, v.limit, v.remaining)), Some((true, 600, 600)));
        assert_eq!(first.requests.map(|v| v.remaining), Some(99));
        debit(&store, &buckets, 500, now);
        let second = admit(&store, &buckets, now);
        assert_eq!(second.tokens.map(|v| (v.allowed, v.remaining, v.reset_us)), Some((true, 100, 50 * SECOND)));
        // An answer may take more than is left: the bucket goes into debt.
        debit(&store, &buckets, 400, now);
        let refused = admit(&store, &buckets, now);
        let (unit, verdict) = refused.refused().unwrap();
        assert_eq!((unit, verdict.remaining, verdict.retry_after_us), (Unit::Tokens, 0, 30 * SECOND));
        assert_eq!(refused.requests.map(|v| v.remaining), Some(98), "a refusal spends no request");
        let error = refusal("k", "gpt-4o", unit, &verdict);
        assert_eq!((error.status, error.body.kind.as_str()), (429, "tokens"));
        assert!(error.body.message.contains("tokens per min (TPM)"), "{}", error.body.message);
        // Once the debt has refilled, the key may call again.
        let later = admit(&store, &buckets, now + 30 * SECOND);
        assert_eq!(later.tokens.map(|v| (v.allowed, v.remaining)), Some((true, 0)));
        assert_eq!(
            headers(&later).iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens"
            ]
        );
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
        fn a_large_limit_spends_what_it_says_in_a_minute(per_minute in 1_000_000u64..MAX_PER_MINUTE, cost in 1u64..100_000) {
            // Spend in equal pieces at one instant until refused: the burst is the limit, less at most
            // a microsecond's worth per piece (state is kept in whole microseconds) and one piece.
            let (mut tat, now, mut spent) = (0, 10 * SECOND, 0u64);
            loop {
                let (v, next) = spend(per_minute, tat, now, cost);
                if !v.allowed {
                    break;
                }
                spent += cost;
                tat = next;
            }
            let pieces = spent / cost;
            let rounding = pieces * per_minute.div_ceil(MINUTE_US);
            prop_assert!(spent <= per_minute && spent + cost + rounding > per_minute, "{spent} of {per_minute}");
        }

        #[test]
        fn any_state_and_cost_never_panic(limit in any::<u64>(), tat in any::<u64>(), now in any::<u64>(), cost in any::<u64>()) {
            let _ = spend(limit, tat, now, cost);
            let _ = overspend(limit, tat, now, cost);
        }
    }
}
