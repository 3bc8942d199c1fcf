//! The gate's decisions on values: which requests ask ext-proc's gate (a
//! route that caches, an `Idempotency-Key`, a key's budgets), what they ask,
//! what its verdict means for the client, and the answer kept for the store.
//! The host calls that carry them out are in [`crate::flow`].

use crate::request::{Reply, Routing};
use modelgate_proto::budgets;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use modelgate_proto::gate::{
    self, BudgetCandidate, CacheAsk, GateRequest, GateVerdict, IdempotencyAsk, Refusal, StoreRequest, StoreTicket,
    MAX_IDEMPOTENCY_KEY_LEN,
};
use modelgate_proto::lru::Weigh;
use modelgate_proto::replay;
use modelgate_proto::routing::{Router, Target};
use modelgate_proto::usage::Usage;
use std::rc::Rc;
use std::time::Duration;

/// A worker's copy of a cached answer, as ext-proc's gate replayed it for
/// one exact request ([`replay::local_key`]): a byte-identical repeat is
/// answered with it, without a call.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalCopy {
    pub status: u16,
    pub content_type: String,
    pub usage: Option<Usage>,
    pub bytes: Rc<[u8]>,
}

impl Weigh for LocalCopy {
    fn weight(&self) -> usize {
        self.content_type.len() + self.bytes.len()
    }
}

/// The client's `Idempotency-Key`, if it is one the gate takes: 1 to 255 printable ASCII characters.
pub fn idempotency_key(value: &[u8]) -> Result<String, GatewayError> {
    let printable = |b: &u8| b.is_ascii_graphic() || *b == b' ';
    if value.is_empty() || value.len() > MAX_IDEMPOTENCY_KEY_LEN || !value.iter().all(printable) {
        return Err(GatewayError::invalid_idempotency_key(MAX_IDEMPOTENCY_KEY_LEN));
    }
    Ok(String::from_utf8_lossy(value).into_owned())
}

/// What the client's `Cache-Control` allows: looking a cached answer up
/// (not `no-cache`), and keeping this one (not `no-store`).
pub fn cache_control(value: Option<&[u8]>) -> (bool, bool) {
    let value = value.map(String::from_utf8_lossy).unwrap_or_default();
    let has = |directive: &str| value.split(',').any(|d| d.trim().eq_ignore_ascii_case(directive));
    (!has("no-cache"), !has("no-store"))
}

/// The route's cache, where it caches answers of `endpoint`.
pub fn route_cache(target: &Target, endpoint: Endpoint) -> Option<&modelgate_proto::config::RouteCacheConfig> {
    target.cache.as_ref().filter(|_| replay::cacheable_path(endpoint.path()))
}

/// The worker keeps copies of cached answers (`cache.local_max_bytes` above 0).
pub fn keeps_copies(router: &Router) -> bool {
    router.cache().is_some_and(|cache| cache.local_max_bytes > 0)
}

/// One candidate per member of the route's chain, with the key's budgets
/// that apply there and what the request may spend; empty when no budget applies.
pub fn budget_candidates(router: &Router, key: &str, target: &Target, routing: &Routing) -> Vec<BudgetCandidate> {
    let Some(config) = router.budgets().and(router.key_budgets(key)) else {
        return Vec::new();
    };
    // The per-minute limits' reservation, without their cap: a budget holds the most a request may cost.
    let tokens = routing.tokens.reservation(router.reserved_completion_tokens(), u64::MAX);
    let prompt = routing.tokens.prompt;
    let completion = tokens.saturating_sub(prompt);
    let candidates: Vec<BudgetCandidate> = target
        .members
        .iter()
        .map(|member| BudgetCandidate {
            backend: member.backend.clone(),
            budgets: budgets::applicable(config, &routing.model, &member.backend),
            usd_micros: budgets::cost_micros(member.price.as_ref(), prompt, completion),
            tokens,
        })
        .collect();
    if candidates.iter().all(|c| c.budgets.is_empty()) {
        return Vec::new();
    }
    candidates
}

/// Where and how long the gate is asked: the cache's store, else the budgets'.
pub fn call_target(router: &Router) -> Option<(String, Duration)> {
    let timeout_ms = router.cache().map(|c| c.timeout_ms).max(router.budgets().map(|b| b.timeout_ms))?;
    let cluster = router.cache().map(|c| &c.cluster).or(router.budgets().map(|b| &b.cluster))?;
    Some((cluster.clone(), Duration::from_millis(timeout_ms)))
}

/// The parts of a [`GateRequest`] the filter found; `None` when the request needs no gate.
pub fn ask(
    cache: Option<CacheAsk>,
    idempotency: Option<IdempotencyAsk>,
    budgets: Vec<BudgetCandidate>,
    fallback: bool,
) -> Option<GateRequest> {
    if cache.is_none() && idempotency.is_none() && budgets.is_empty() {
        return None;
    }
    Some(GateRequest {
        cache,
        idempotency,
        budget_fallback: fallback && budgets.len() > 1,
        budgets,
        ..Default::default()
    })
}

/// The gate's verdict, and a replay's bytes; `None` when it gave none (any status but 200, or garbled).
pub fn verdict<'a>(status: Option<&[u8]>, answer: &'a [u8]) -> Option<(GateVerdict, &'a [u8])> {
    if status != Some(b"200") {
        return None;
    }
    gate::split_answer(answer)
}

/// The gateway's answer to a refusal of the gate's.
pub fn refusal(refusal: &Refusal) -> Reply {
    match refusal {
        Refusal::IdempotencyInProgress => {
            let mut reply = Reply::from(GatewayError::idempotency_key_in_use());
            // The first request is running: a repeat a moment later may get its answer.
            reply.headers.push(("retry-after", "1".into()));
            reply
        }
        Refusal::IdempotencyMismatch => GatewayError::idempotency_key_reused().into(),
        Refusal::BudgetExhausted { budget, resets_at } => GatewayError::insufficient_quota(budget, *resets_at).into(),
    }
}

/// What a request does when the gate gave no verdict: with budgets, as
/// `budgets.on_failure` says (`Ok` goes on; its record settles whatever the store reserved after all); otherwise it goes on as a miss.
pub fn without_verdict(router: &Router, asked_budgets: bool) -> Result<(), Reply> {
    match router.budgets().map(|b| b.on_failure) {
        Some(modelgate_proto::config::FailureMode::Deny) if asked_budgets => {
            Err(GatewayError::budgets_unavailable().into())
        }
        _ => Ok(()),
    }
}

/// The tokens a replayed answer settles in the key's token limits: a cache
/// hit's where hits count in them, else none (an idempotent repeat's first request paid).
pub fn replay_settles(router: &Router, source: gate::ReplaySource, usage: Option<Usage>) -> u64 {
    let counts = source == gate::ReplaySource::Cache && router.cache().is_some_and(|c| c.hits_count_in_limits);
    if counts {
        usage.map_or(0, |u| u.total())
    } else {
        0
    }
}

/// An answer being copied for the store, as the client gets it, up to a bound.
#[derive(Debug)]
pub struct Keep {
    ticket: StoreTicket,
    bytes: Vec<u8>,
    max_bytes: usize,
    /// Over the bound, or not a success: nothing is kept.
    spoilt: bool,
    status: u16,
    content_type: String,
}

impl Keep {
    pub fn new(ticket: StoreTicket, max_bytes: usize) -> Self {
        Keep { ticket, bytes: Vec::new(), max_bytes, spoilt: false, status: 0, content_type: String::new() }
    }

    /// The answer's status, content type and `content-encoding`: a status
    /// other than 200 is not kept, nor a compressed body (a backend may
    /// compress though the request asked it not to), which a replay without
    /// its encoding would hand over unreadable.
    pub fn on_headers(&mut self, status: u16, content_type: Option<&[u8]>, encoding: Option<&[u8]>) {
        self.status = status;
        self.content_type = content_type.map(|c| String::from_utf8_lossy(c).into_owned()).unwrap_or_default();
        let compressed = encoding.is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"));
        self.spoilt |= status != 200 || compressed;
    }

    /// True while the answer's bytes are still wanted.
    pub fn wants_bytes(&self) -> bool {
        !self.spoilt
    }

    pub fn add(&mut self, piece: &[u8]) {
        if self.spoilt {
            return;
        }
        if self.bytes.len() + piece.len() > self.max_bytes {
            self.spoilt = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(piece);
    }

    /// The store call's body, once the answer ended (`ended`) or was left
    /// unfinished; `None` when there is nothing to keep or let go.
    pub fn into_call(self, request_id: &str, ended: bool, stream: bool, usage: Option<Usage>) -> Option<Vec<u8>> {
        let complete = ended && !self.spoilt;
        if !complete && self.ticket.claim.is_none() {
            return None;
        }
        let request = StoreRequest {
            request_id: request_id.to_string(),
            ticket: self.ticket,
            complete,
            status: self.status,
            content_type: self.content_type,
            stream,
            usage,
        };
        Some(gate::join_line(&request, if complete { &self.bytes } else { b"" }))
    }
}

/// Budgets reserved by a request: this worker's part (16 hex digits) and a
/// counter, with the request's start, in hex: at most 64 letters, digits and
/// `-`, as the store takes them.
pub fn reservation_id(worker: &str, counter: u64, started_us: u64) -> String {
    format!("{worker}-{counter:x}-{started_us:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_is_short_printable_ascii() {
        assert_eq!(idempotency_key(b"retry-7 a").unwrap(), "retry-7 a");
        for bad in [&b""[..], &[b'a'; 256][..], b"tab\there", "caf\u{e9}".as_bytes()] {
            let error = idempotency_key(bad).unwrap_err();
            assert_eq!((error.status, error.param.as_deref()), (400, Some("Idempotency-Key")));
        }
        assert!(idempotency_key(&[b'a'; 255]).is_ok());
    }

    #[test]
    fn cache_control_may_skip_the_lookup_or_the_store() {
        assert_eq!(cache_control(None), (true, true));
        assert_eq!(cache_control(Some(b"No-Cache")), (false, true));
        assert_eq!(cache_control(Some(b"max-age=0, no-store")), (true, false));
        assert_eq!(cache_control(Some(b"no-cache,no-store")), (false, false));
        assert_eq!(cache_control(Some(b"no-cachex")), (true, true));
    }

    #[test]
    fn an_answer_is_kept_whole_and_successful_and_within_its_bound() {
        let ticket = |claim: Option<&str>| StoreTicket {
            cache_key: Some("k".into()),
            ttl_secs: 60,
            claim: claim.map(String::from),
            window_secs: 0,
            ..StoreTicket::default()
        };
        let call = |keep: Keep, ended| {
            keep.into_call("r", ended, false, None).map(|body| {
                let end = body.iter().position(|&b| b == b'\n').unwrap();
                let head: StoreRequest = serde_json::from_slice(&body[..end]).unwrap();
                (head.complete, body[end + 1..].to_vec())
            })
        };
        let mut kept = Keep::new(ticket(None), 8);
        kept.on_headers(200, Some(b"application/json"), None);
        kept.add(b"{\"a\":");
        kept.add(b"1}");
        assert_eq!(call(kept, true), Some((true, b"{\"a\":1}".to_vec())));
        let mut over = Keep::new(ticket(None), 4);
        over.on_headers(200, None, None);
        over.add(b"{\"a\":1}");
        assert!(!over.wants_bytes());
        assert_eq!(call(over, true), None, "nothing to keep, no claim to let go");
        let mut failed = Keep::new(ticket(Some("c")), 64);
        failed.on_headers(500, None, None);
        assert_eq!(call(failed, true), Some((false, Vec::new())), "the claim is let go");
        let mut left = Keep::new(ticket(Some("c")), 64);
        left.on_headers(200, None, None);
        left.add(b"data: ");
        assert_eq!(call(left, false), Some((false, Vec::new())));
        let mut compressed = Keep::new(ticket(Some("c")), 64);
        compressed.on_headers(200, Some(b"application/json"), Some(b"gzip"));
        compressed.add(b"\x1f\x8b");
        assert_eq!(call(compressed, true), Some((false, Vec::new())), "a compressed answer is not kept");
    }

    #[test]
    fn a_reservation_id_is_short_and_plain() {
        let id = reservation_id(&format!("{:016x}", u64::MAX), u64::MAX, u64::MAX);
        assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'), "{id}");
        assert_ne!(reservation_id("w", 1, 5), reservation_id("w", 2, 5));
    }

    #[test]
    fn refusals_are_the_gateways_errors() {
        let busy = refusal(&Refusal::IdempotencyInProgress);
        assert_eq!(busy.status, 409);
        assert!(busy.headers.contains(&("retry-after", "1".to_string())));
        assert_eq!(refusal(&Refusal::IdempotencyMismatch).status, 422);
        let spent = refusal(&Refusal::BudgetExhausted { budget: "usd_per_day of key `k`".into(), resets_at: 0 });
        assert_eq!(spent.status, 429);
        assert!(spent.headers.contains(&("x-should-retry", "false".to_string())));
    }
}
