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

    /// As OpenAI names a per-minute limit of this unit in its 429s.
    fn per_minute_name(self) -> &'static str {
        match self {
            Unit::Requests => "requests per min (RPM)",
            Unit::Tokens => "tokens per min (TPM)",
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
    /// What admitting a request spends from this bucket: one request, or the
    /// tokens it reserves until its answer's usage is known.
    fn admission_cost(&self, reserved_tokens: u64) -> u64 {
        match self.unit {
            Unit::Requests => 1,
            Unit::Tokens => reserved_tokens,
        }
    }

    /// The call to a shared store that admits a request reserving `reserved_tokens` into `buckets`.
    pub fn admission(buckets: &[Bucket], reserved_tokens: u64) -> SpendRequest {
        let buckets = buckets
            .iter()
            .map(|b| BucketSpend {
                name: b.name.clone(),
                per_minute: b.per_minute,
                cost: b.admission_cost(reserved_tokens),
                refund: 0,
            })
            .collect();
        SpendRequest { buckets, debit: false, id: None }
    }
}

/// Bytes of prompt counted as one token: OpenAI's rule of thumb for English
/// text, and what OpenAI itself estimates a request's prompt with.
const BYTES_PER_TOKEN: u64 = 4;

/// The tokens a request may take, as far as its body tells before it is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    /// The prompt's tokens, estimated from its size ([`prompt_tokens`]).
    pub prompt: u64,
    /// The most the answer may generate (`max_completion_tokens`, `max_tokens`;
    /// 0 for an embedding); `None` when the request does not bound it.
    pub completion: Option<u64>,
}

impl TokenEstimate {
    /// Tokens to reserve on admission: the prompt and the most the answer may
    /// take. An answer the request does not bound is taken to be
    /// `unbounded_completion` long, but never reserves more than
    /// `smallest_limit` (the tightest token limit) unless its prompt alone does.
    pub fn reservation(&self, unbounded_completion: u64, smallest_limit: u64) -> u64 {
        match self.completion {
            Some(completion) => self.prompt.saturating_add(completion),
            None => self.prompt.saturating_add(unbounded_completion).min(smallest_limit.max(self.prompt)),
        }
    }
}

/// An estimate of the tokens in a prompt, from the raw JSON that carries it
/// (`messages`, `prompt` or `input`): a token per four bytes, rounded up, but
/// data URLs (inline images and audio) count nothing, since what they cost
/// does not follow their size. Their tokens are charged when the answer's
/// usage comes.
pub fn prompt_tokens(raw_json: &[u8]) -> u64 {
    let mut bytes = 0u64;
    let mut rest = raw_json;
    while let Some(quote) = rest.iter().position(|&b| b == b'"') {
        bytes += quote as u64;
        let string = rest.get(quote + 1..).unwrap_or_default();
        // The closing quote: the first one not escaped by a backslash.
        let mut end = 0;
        while let Some(&b) = string.get(end) {
            match b {
                b'\\' => end += 2,
                b'"' => break,
                _ => end += 1,
            }
        }
        if !string.starts_with(b"data:") {
            // The string with its quotes (the closing one, if the JSON has it).
            bytes += 1 + (end + 1).min(string.len()) as u64;
        }
        rest = string.get(end + 1..).unwrap_or_default();
    }
    bytes += rest.len() as u64;
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// The token limit a request can never fit in, however long it waits: a
/// bucket holds at most its limit.
pub fn too_large(buckets: &[Bucket], reserved_tokens: u64) -> Option<&Bucket> {
    buckets.iter().filter(|b| b.unit == Unit::Tokens).find(|b| reserved_tokens > b.per_minute.clamp(1, MAX_PER_MINUTE))
}

/// The tightest token limit among `buckets`, if any counts tokens.
pub fn smallest_token_limit(buckets: &[Bucket]) -> Option<u64> {
    buckets.iter().filter(|b| b.unit == Unit::Tokens).map(|b| b.per_minute.clamp(1, MAX_PER_MINUTE)).min()
}

/// What an admitted request holds in one token bucket until its answer's
/// usage is known: the tokens reserved, and until when they stay spent if
/// nothing is given back (when the bucket would have refilled past them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub bucket: String,
    pub per_minute: u64,
    pub tokens: u64,
    /// Microseconds since the epoch, on the clock that settles it.
    pub until_us: u64,
}

/// What an admitted request holds in each token bucket, from the verdicts
/// (one per bucket, in order) that admitted it at `admitted_us`.
pub fn reservations(buckets: &[Bucket], verdicts: &[Verdict], tokens: u64, admitted_us: u64) -> Vec<Reserved> {
    buckets
        .iter()
        .zip(verdicts)
        .filter(|(b, _)| b.unit == Unit::Tokens)
        .map(|(b, v)| Reserved {
            bucket: b.name.clone(),
            per_minute: b.per_minute,
            tokens,
            until_us: admitted_us.saturating_add(v.reset_us),
        })
        .collect()
}

/// A request let through without a verdict (its store was unreachable): it
/// holds nothing, and its usage is charged when known.
pub fn unreserved(buckets: &[Bucket], now_us: u64) -> Vec<Reserved> {
    buckets
        .iter()
        .filter(|b| b.unit == Unit::Tokens)
        .map(|b| Reserved { bucket: b.name.clone(), per_minute: b.per_minute, tokens: 0, until_us: now_us })
        .collect()
}

impl Reserved {
    /// Tokens to charge (positive) or give back (negative) once the answer
    /// used `used` tokens, at `now_us`: the excess over the reservation, or
    /// what it did not use. An answer whose usage is unknown (a stream the
    /// client left, a backend that sent none) keeps its whole reservation.
    /// What is given back is only the part still unrefilled: the bucket
    /// refills past a reservation as time goes by, and giving back a part it
    /// refilled already would hand the key tokens it never spent.
    pub fn settlement(&self, used: Option<u64>, now_us: u64) -> i64 {
        let Some(used) = used else { return 0 };
        if used >= self.tokens {
            return i64::try_from(used - self.tokens).unwrap_or(i64::MAX);
        }
        let per_minute = self.per_minute.clamp(1, MAX_PER_MINUTE);
        let unrefilled =
            u128::from(self.until_us.saturating_sub(now_us)) * u128::from(per_minute) / u128::from(MINUTE_US);
        let back = u128::from(self.tokens - used).min(unrefilled);
        -i64::try_from(back).unwrap_or(i64::MAX)
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
    /// Units a debit gives back: tokens reserved and not used.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refund: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A call to a shared store: admit (spend from every bucket only if all allow it)
/// or debit (spend regardless, as tokens already used are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendRequest {
    pub buckets: Vec<BucketSpend>,
    #[serde(default)]
    pub debit: bool,
    /// A debit's id: a debit sent again with the same id (a retry after an
    /// answer was lost) is applied once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
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

/// One request, admitted into every bucket of its key and model, reserving
/// `reserved_tokens` in each token bucket: allowed only if every limit
/// allows it, and then counted in each bucket; a refusal counts nowhere.
/// The verdicts, one per bucket in order.
pub fn admit(store: &dyn BucketStore, buckets: &[Bucket], reserved_tokens: u64, now_us: u64) -> Vec<Verdict> {
    let look = |b: &Bucket, cost: u64| spend(b.per_minute, store.load(&b.name).0, now_us, cost).0;
    let checked: Vec<Verdict> = buckets.iter().map(|b| look(b, b.admission_cost(reserved_tokens))).collect();
    // Refused: what is left in the buckets that would have allowed it, since this request spends nothing.
    let refused = |verdicts: &[Verdict]| -> Vec<Verdict> {
        buckets.iter().zip(verdicts).map(|(b, v)| if v.allowed { look(b, 0) } else { *v }).collect()
    };
    if checked.iter().any(|v| !v.allowed) {
        return refused(&checked);
    }
    let mut spent = Vec::with_capacity(buckets.len());
    for (i, (b, looked)) in buckets.iter().zip(checked.iter().copied()).enumerate() {
        let cost = b.admission_cost(reserved_tokens);
        if cost == 0 {
            spent.push(looked);
            continue;
        }
        let verdict = update(store, &b.name, |state| spend(b.per_minute, state, now_us, cost));
        if !verdict.allowed {
            // Another request took what was left since the check: what this one spent goes back.
            for earlier in &buckets[..i] {
                let back = earlier.admission_cost(reserved_tokens);
                update(store, &earlier.name, |state| {
                    look_after(earlier.per_minute, give_back(earlier.per_minute, state, now_us, back), now_us)
                });
            }
            let mut verdicts = checked;
            verdicts[i] = verdict;
            return refused(&verdicts);
        }
        spent.push(verdict);
    }
    spent
}

/// Settles what an answer used with what its request reserved, in every
/// token bucket: the excess charged, or the unused part given back
/// ([`Reserved::settlement`]).
pub fn settle(store: &dyn BucketStore, reserved: &[Reserved], used: Option<u64>, now_us: u64) {
    for held in reserved {
        let tokens = held.settlement(used, now_us);
        if tokens != 0 {
            update(store, &held.bucket, |state| adjust(held.per_minute, state, now_us, tokens));
        }
    }
}

/// Charges `tokens` to a bucket past its limit ([`overspend`]), or gives
/// `-tokens` back ([`give_back`]): the verdict on the bucket after, and its state.
pub fn adjust(per_minute: u64, tat: u64, now_us: u64, tokens: i64) -> (Verdict, u64) {
    match u64::try_from(tokens) {
        Ok(charge) => overspend(per_minute, tat, now_us, charge),
        Err(_) => {
            let state = give_back(per_minute, tat, now_us, tokens.unsigned_abs());
            look_after(per_minute, state, now_us)
        }
    }
}

/// A bucket's state with `units` given back: its time moved back by theirs,
/// rounded down (a spend rounds up, so a reservation given back whole
/// never leaves more than was there), and never past full.
pub fn give_back(per_minute: u64, tat: u64, now_us: u64, units: u64) -> u64 {
    if tat <= now_us {
        return tat;
    }
    let back = u128::from(units) * u128::from(MINUTE_US) / u128::from(per_minute.clamp(1, MAX_PER_MINUTE));
    tat.saturating_sub(u64::try_from(back).unwrap_or(u64::MAX)).max(now_us)
}

/// The verdict on a bucket in `state`, spending nothing, and that state.
fn look_after(per_minute: u64, state: u64, now_us: u64) -> (Verdict, u64) {
    (spend(per_minute, state, now_us, 0).0, state)
}

/// Like [`spend`], but the cost is taken even past the limit.
pub fn overspend(per_minute: u64, tat: u64, now_us: u64, cost: u64) -> (Verdict, u64) {
    let (verdict, new_tat) = spend(per_minute, tat, now_us, cost);
    if verdict.allowed {
        return (verdict, new_tat);
    }
    (verdict, tat.max(now_us).saturating_add(time_for(per_minute, cost)))
}

/// Buckets in a map, versioned as Envoy's shared data versions them: for
/// tests, here and in other crates. Always built, so that those crates' tests
/// and their release builds share one build of this crate (a feature for it
/// would make `make build` compile every crate above this one again).
#[derive(Default)]
pub struct MemoryBuckets(std::cell::RefCell<std::collections::HashMap<String, (u64, u32)>>);

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

/// OpenAI's 429 for a key over a limit, asking for `requested` units (1 request, or the tokens it reserves).
pub fn refusal(key: &str, model: &str, unit: Unit, verdict: &Verdict, requested: u64) -> GatewayError {
    let wait = openai_duration(verdict.retry_after_us);
    GatewayError::rate_limit_reached(
        unit,
        format!(
            "Rate limit reached for {model} on {} for key `{key}`: Limit {}, Used {}, Requested {requested}. Please try again in {wait}.",
            unit.per_minute_name(),
            verdict.limit,
            verdict.limit - verdict.remaining
        ),
    )
}

/// OpenAI's 429 for a request that reserves more tokens than its key's limit
/// holds: it can never be let in, so waiting does not help.
pub fn too_large_refusal(key: &str, model: &str, limit: u64, requested: u64) -> GatewayError {
    GatewayError::tokens_beyond_limit(format!(
        "Request too large for {model} on {} for key `{key}`: Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully.",
        Unit::Tokens.per_minute_name()
    ))
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
    use crate::error::{ErrorCode, ErrorType};
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
        let admit = |key: &str, limits: &KeyLimits, model: &str| {
            let buckets = limits.buckets(key, model);
            Admission::from_verdicts(&buckets, &admit(&store, &buckets, 0, now)).requests
        };
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

    /// A request reserving `tokens`, admitted into `buckets`: what its limits said, and what it holds.
    fn admitted(store: &MemoryBuckets, buckets: &[Bucket], tokens: u64, now: u64) -> (Admission, Vec<Reserved>) {
        let verdicts = admit(store, buckets, tokens, now);
        (Admission::from_verdicts(buckets, &verdicts), reservations(buckets, &verdicts, tokens, now))
    }

    #[test]
    fn tokens_are_reserved_on_admission_and_settled_with_the_answers_usage() {
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
        let (first, held) = admitted(&store, &buckets, 100, now);
        assert_eq!(first.tokens.map(|v| (v.allowed, v.limit, v.remaining)), Some((true, 600, 500)));
        assert_eq!(first.requests.map(|v| v.remaining), Some(99));
        // 100 tokens take 10 s to come back at 600 a minute, 1 s at 6000.
        let until: Vec<(&str, u64, u64)> = held.iter().map(|r| (r.bucket.as_str(), r.tokens, r.until_us)).collect();
        assert_eq!(
            until,
            [("modelgate.tokens.k", 100, now + 10 * SECOND), ("modelgate.tokens.k.gpt-*", 100, now + SECOND)]
        );
        let (second, second_held) = admitted(&store, &buckets, 450, now);
        assert_eq!(second.tokens.map(|v| v.remaining), Some(50));

        // A reservation that does not fit what is left is refused, and takes nothing.
        let (refused, nothing) = admitted(&store, &buckets, 100, now);
        let (unit, verdict) = refused.refused().unwrap();
        assert_eq!((unit, verdict.remaining, verdict.retry_after_us), (Unit::Tokens, 50, 5 * SECOND));
        assert_eq!(refused.requests.map(|v| v.remaining), Some(98), "a refusal spends no request");
        assert!(nothing.iter().all(|r| r.tokens == 100), "what it would have held");
        let error = refusal("k", "gpt-4o", unit, &verdict, 100);
        assert_eq!((error.status, error.kind), (429, ErrorType::Tokens));
        assert!(error.message.contains("tokens per min (TPM) for key `k`: Limit 600, Used 550, Requested 100."));

        // The first answer used 40: the 60 it did not use come back.
        settle(&store, &held, Some(40), now);
        assert_eq!(admitted(&store, &buckets, 0, now).0.tokens.map(|v| v.remaining), Some(110));
        // The second used 500: 50 more than it reserved are charged.
        settle(&store, &second_held, Some(500), now);
        assert_eq!(admitted(&store, &buckets, 0, now).0.tokens.map(|v| v.remaining), Some(60));
        // An answer whose usage is unknown keeps its reservation.
        let (_, unknown) = admitted(&store, &buckets, 60, now);
        settle(&store, &unknown, None, now);
        let empty = admitted(&store, &buckets, 0, now).0;
        assert_eq!(empty.tokens.map(|v| (v.allowed, v.remaining)), Some((true, 0)));
        assert_eq!(
            headers(&empty).iter().map(|(n, _)| *n).collect::<Vec<_>>(),
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

    #[test]
    fn what_a_request_reserves_and_when_it_can_never_fit() {
        let estimate = |prompt, completion| TokenEstimate { prompt, completion };
        assert_eq!(estimate(9, Some(5)).reservation(1024, 60), 14);
        assert_eq!(estimate(9, Some(500)).reservation(1024, 60), 509, "a bound the client set is reserved whole");
        assert_eq!(estimate(9, None).reservation(16, 60), 25);
        assert_eq!(estimate(9, None).reservation(1024, 60), 60, "no bound: at most the whole limit");
        assert_eq!(estimate(90, None).reservation(1024, 60), 90, "a prompt alone over the limit");
        assert_eq!(estimate(9, Some(0)).reservation(1024, 60), 9, "an embedding generates nothing");
        let bucket = |name: &str, unit, per_minute| Bucket { name: name.into(), unit, per_minute };
        let buckets = [bucket("r", Unit::Requests, 1), bucket("t", Unit::Tokens, 600), bucket("t.m", Unit::Tokens, 60)];
        assert_eq!(smallest_token_limit(&buckets), Some(60));
        assert_eq!(too_large(&buckets, 60), None);
        assert_eq!(too_large(&buckets, 61).map(|b| b.name.as_str()), Some("t.m"));
        assert_eq!(smallest_token_limit(&buckets[..1]), None);
        let error = too_large_refusal("k", "m", 60, 61);
        assert_eq!(
            (error.status, error.kind, error.code, error.should_retry()),
            (429, ErrorType::Tokens, Some(ErrorCode::TokensBeyondLimit), Some(false))
        );
        assert_eq!(
            error.message,
            "Request too large for m on tokens per min (TPM) for key `k`: Limit 60, Requested 61. The input or output tokens must be reduced in order to run successfully."
        );
    }

    #[test]
    fn a_prompt_is_estimated_at_four_bytes_a_token_without_its_data_urls() {
        assert_eq!(prompt_tokens(br#"[{"role":"user","content":"hello"}]"#), 9);
        assert_eq!(prompt_tokens(b"\"abcdefgh\""), 3);
        assert_eq!(prompt_tokens(br#""a \"quoted\" data: word""#), 7);
        let image = format!(
            r#"[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]"#,
            "A".repeat(100_000)
        );
        assert_eq!(prompt_tokens(image.as_bytes()), 11);
        assert_eq!(prompt_tokens(b"[1,2,3]"), 2);
        assert_eq!(prompt_tokens(b""), 0);
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
            let _ = adjust(limit, tat, now, cost as i64);
            let _ = give_back(limit, tat, now, cost);
            let held = Reserved { bucket: "b".into(), per_minute: limit, tokens: cost, until_us: tat };
            let _ = held.settlement(Some(now), now);
        }

        #[test]
        fn any_bytes_are_estimated_without_panic_and_never_above_a_token_per_four(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert!(prompt_tokens(&raw) <= (raw.len() as u64).div_ceil(BYTES_PER_TOKEN));
        }

        #[test]
        fn a_reservation_settled_at_once_leaves_the_bucket_as_spending_the_usage_would(
            per_minute in 1u64..MAX_PER_MINUTE, ahead in 0u64..2 * MINUTE_US, reserved in 0u64..1_000_000, used in 0u64..2_000_000
        ) {
            let now = 1_000 * SECOND;
            let tat = now + ahead;
            let (_, held_state) = overspend(per_minute, tat, now, reserved);
            let held = Reserved { bucket: "b".into(), per_minute, tokens: reserved, until_us: held_state };
            let (_, settled) = adjust(per_minute, held_state, now, held.settlement(Some(used), now));
            let (_, direct) = overspend(per_minute, tat, now, used);
            // Reserving rounds up and giving back rounds down: never more room than spending the usage
            // would leave, and at most a microsecond less.
            prop_assert!(settled >= direct && settled - direct <= 1, "{settled} against {direct}");
            // Unknown usage keeps the reservation.
            prop_assert_eq!(held.settlement(None, now), 0);
        }

        #[test]
        fn concurrent_reservations_never_admit_more_than_the_limit_holds(
            limit in 1u64..500,
            requests in proptest::collection::vec((0u64..3 * SECOND, 0u64..200, 0u64..=100, 0u64..90 * SECOND), 1..150)
        ) {
            // Requests come `gap` apart, each reserving `reserve`, using `share`% of it, and answered
            // `takes` after their admission. In every minute, the tokens used by the requests admitted
            // in it stay within what the bucket holds and what refills in that minute.
            let store = MemoryBuckets::default();
            let bucket = [Bucket { name: "t".into(), unit: Unit::Tokens, per_minute: limit }];
            let mut now = 10 * SECOND;
            let mut in_flight: Vec<(u64, Vec<Reserved>, u64)> = Vec::new();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (gap, reserve, share, takes) in requests {
                now += gap;
                in_flight.sort_by_key(|(ends, _, _)| std::cmp::Reverse(*ends));
                while in_flight.last().is_some_and(|(ends, _, _)| *ends <= now) {
                    if let Some((ends, held, used)) = in_flight.pop() {
                        settle(&store, &held, Some(used), ends);
                    }
                }
                let verdicts = admit(&store, &bucket, reserve, now);
                if verdicts[0].allowed {
                    prop_assert!(reserve <= limit);
                    let used = reserve * share / 100;
                    admitted.push((now, used));
                    in_flight.push((now + takes, reservations(&bucket, &verdicts, reserve, now), used));
                }
            }
            for (i, (start, _)) in admitted.iter().enumerate() {
                let used: u64 = admitted[i..].iter().take_while(|(t, _)| *t < start + MINUTE_US).map(|(_, u)| u).sum();
                prop_assert!(used <= 2 * limit, "{used} tokens used in one minute at a limit of {limit}");
            }
        }
    }
}
