//! The gate: the filter's one call to ext-proc's admin port before a request
//! goes to its backend, where a route caches answers, the request carries an
//! `Idempotency-Key`, or its key has budgets; and the call after, with the
//! answer to keep.
//!
//! `POST` [`GATE_PATH`]: the body is one [`GateRequest`] whose `body` member
//! is the client's request body as it came (the filter splices it in without
//! parsing it: [`GateRequest::to_call_body`]). ext-proc answers `200` with
//! one line of JSON, a [`GateVerdict`], and, for a replay, the bytes to send
//! after that line's `\n` ([`split_answer`]). Any other status, or a verdict
//! that does not parse, is a store that could not answer.
//!
//! `POST` [`GATE_STORE_PATH`]: one line of JSON, a [`StoreRequest`], then
//! `\n` and the answer's bytes as the client got them. ext-proc answers
//! `204`; the filter does not wait on it.
//!
//! Order on ext-proc's side: an idempotent repeat first (replayed, 409 or
//! 422), then the cache (a hit is replayed and spends no budget), then the
//! budgets (a reservation, or a refusal).

use crate::usage::Usage;
use serde::{Deserialize, Serialize};

/// Where the filter asks.
pub const GATE_PATH: &str = "/v1/gate";
/// Where the filter hands an answer to keep (or a claim to let go).
pub const GATE_STORE_PATH: &str = "/v1/gate/store";

/// The answer header that says whether a cached answer served the request: `hit` or `miss`.
pub const CACHE_HEADER: &str = "modelgate-cache";
/// The answer header on an idempotent repeat, which got the first request's answer: `true`.
pub const REPLAYED_HEADER: &str = "modelgate-idempotent-replayed";
/// The request header a client names its idempotent request with.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The longest `Idempotency-Key` taken; a longer one (or one with other than
/// printable ASCII) is refused with a 400.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What the filter asks about one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    /// The request's `x-request-id`, bounded: for logs.
    pub request_id: String,
    /// The client key's name ("" on an open gateway): whose answers, claims and budgets.
    pub owner: String,
    /// The request's path, such as `/v1/chat/completions`.
    pub path: String,
    /// The model the client asked for (the routed name).
    pub model: String,
    /// The route caches answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheAsk>,
    /// The request carries an `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyAsk>,
    /// The key's budgets: one candidate per backend the request may go to, in
    /// order (the model's backend, then its fallbacks). Empty: no budgets apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetCandidate>,
    /// A refused first candidate moves on to the next (`on_budget_exhausted: fallback`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_fallback: bool,
    /// How long the filter waits for the verdict, in milliseconds (0: not
    /// said). A verdict ext-proc reaches later than this comes to nobody: what
    /// it took for the request (an idempotency claim, a budget reservation)
    /// is let go at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
    /// The reservation's id, unique per request (made by the filter); the
    /// usage record carries it, and settles the reservation once.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reservation: String,
    /// The client's request body, as JSON. Absent when parsed from a call body without it.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub body: serde_json::Value,
}

impl GateRequest {
    /// The call's body: this request's fields, with the client's `body`
    /// spliced in as it came (`self.body` is ignored), so the filter never
    /// parses or copies it twice.
    pub fn to_call_body(&self, client_body: &[u8]) -> Vec<u8> {
        let mut head = serde_json::to_vec(&GateRequest { body: serde_json::Value::Null, ..self.clone() })
            .unwrap_or_else(|_| b"{}".to_vec());
        // `{...}` → `{...,"body":<client body>}`; "{}" → `{"body":...}`.
        head.pop();
        if head.len() > 1 {
            head.push(b',');
        }
        head.extend_from_slice(b"\"body\":");
        head.extend_from_slice(client_body);
        head.push(b'}');
        head
    }
}

/// The route's cache, and what the client's `Cache-Control` allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheAsk {
    pub ttl_secs: u64,
    pub mode: crate::config::CacheMode,
    /// One partition for every key, instead of one per key.
    pub shared: bool,
    /// Look for a cached answer (not `Cache-Control: no-cache`).
    pub lookup: bool,
    /// Keep this answer (not `Cache-Control: no-store`).
    pub store: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyAsk {
    /// The client's `Idempotency-Key`, checked printable and bounded by the filter.
    pub key: String,
    pub window_secs: u64,
}

/// One backend a request may go to, and what it would spend there at most.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetCandidate {
    /// The backend's name.
    pub backend: String,
    /// Every budget of the key that applies on this backend.
    pub budgets: Vec<crate::budgets::BudgetLimit>,
    /// The most the request may cost here: its reserved tokens at the backend's price.
    pub usd_micros: u64,
    /// The tokens it reserves: the prompt's estimate and the most the answer may take.
    pub tokens: u64,
}

/// ext-proc's verdict on a [`GateRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum GateVerdict {
    /// Send the request on, to budget candidate `member` (0 without budgets).
    Proceed {
        #[serde(default)]
        member: usize,
        /// Where the answer is kept once it ends: hand it back in [`StoreRequest::ticket`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ticket: Option<StoreTicket>,
        /// The route caches answers, and this one was not found (`modelgate-cache: miss`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cache_miss: bool,
    },
    /// Answer with the bytes after the verdict's line.
    Replay {
        source: ReplaySource,
        status: u16,
        content_type: String,
        /// The tokens the first answer used, for the record (and the limits, where hits count).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
        /// How much longer a cached answer lives, in milliseconds: the worker
        /// may keep its own copy of these bytes for this request's exact
        /// bytes until then ([`crate::replay::local_key`]). 0: keep none.
        #[serde(default, skip_serializing_if = "is_zero")]
        ttl_ms: u64,
    },
    /// Refuse the request.
    Refuse { refusal: Refusal },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplaySource {
    /// A cached answer (`modelgate-cache: hit`).
    Cache,
    /// The first answer of an `Idempotency-Key` ([`REPLAYED_HEADER`]).
    Idempotency,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The key's first request is still running: a 409.
    IdempotencyInProgress,
    /// The key was used with another body (or path, or model): a 422.
    IdempotencyMismatch,
    /// A budget is spent: a 429 `insufficient_quota`.
    BudgetExhausted {
        /// Which budget, as the message names it (`usd_per_day of key alice on gpt-4*`).
        budget: String,
        /// When it resets, in seconds since the Unix epoch.
        resets_at: u64,
    },
}

/// What to keep once the answer ends, as the gate handed it out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTicket {
    /// The cache entry's key, when the answer is to be cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    #[serde(default)]
    pub ttl_secs: u64,
    /// The request's path, which says what shape of answer is cached (with `cache_key`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// The idempotency claim this request holds, released or completed with the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    #[serde(default)]
    pub window_secs: u64,
}

/// The answer the filter hands back, after the ticket's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRequest {
    pub request_id: String,
    pub ticket: StoreTicket,
    /// The answer ended whole and successful; otherwise nothing is kept and a claim is let go.
    pub complete: bool,
    pub status: u16,
    pub content_type: String,
    /// The answer is a stream (`text/event-stream`).
    pub stream: bool,
    /// The tokens it used, as the filter read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A gate answer's verdict line and the bytes after it.
pub fn split_answer(answer: &[u8]) -> Option<(GateVerdict, &[u8])> {
    let end = answer.iter().position(|&b| b == b'\n').unwrap_or(answer.len());
    let verdict = serde_json::from_slice(answer.get(..end)?).ok()?;
    Some((verdict, answer.get(end + 1..).unwrap_or_default()))
}

/// A verdict line followed by `bytes`: a gate answer, or a store call's body.
pub fn join_line<T: Serialize>(head: &T, bytes: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(head).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_body_is_spliced_in_unparsed() {
        let ask = GateRequest { request_id: "r".into(), owner: "alice".into(), ..Default::default() };
        let body = ask.to_call_body(br#"{"model":"m","messages":[]}"#);
        let read: GateRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(read.owner, "alice");
        assert_eq!(read.body["model"], "m");
    }

    #[test]
    fn an_answer_is_a_verdict_line_then_bytes() {
        let verdict = GateVerdict::Replay {
            source: ReplaySource::Cache,
            status: 200,
            content_type: "application/json".into(),
            usage: None,
            ttl_ms: 1000,
        };
        let answer = join_line(&verdict, b"{\"id\":1}\n");
        let (read, rest) = split_answer(&answer).unwrap();
        assert_eq!(read, verdict);
        assert_eq!(rest, b"{\"id\":1}\n");
        assert!(split_answer(b"not json").is_none());
    }
}
