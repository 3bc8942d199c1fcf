//! The gate's decisions, in the order [`modelgate_proto::gate`] sets:
//! an idempotent repeat, then the cache, then the budgets; and the answers
//! handed back to keep.
//!
//! A store that does not answer never fails a request: the idempotency
//! step is skipped (nothing claimed) and the cache is a miss, both logged
//! and counted; after one failure the request asks the store nothing more,
//! so it is not held up twice. Budgets are another matter: a request they
//! cannot charge is the filter's to decide (`budgets.on_failure`).

use crate::budgets::{Admission, Budgets};
use crate::cache::{self, CachedHead, DoneHead, Record, Store, StoreError, CLAIM_LEASE_MS};
use modelgate_proto::config::CacheMode;
use modelgate_proto::gate::{GateRequest, GateVerdict, Refusal, ReplaySource, StoreRequest, StoreTicket};
use modelgate_proto::replay;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The cache, the idempotency records and the budgets, and what they counted.
pub struct Gate {
    store: Store,
    budgets: Arc<Budgets>,
    counters: Arc<Counters>,
}

/// The budgets' store did not answer: the filter follows `budgets.on_failure`.
#[derive(Debug)]
pub struct BudgetsUnavailable(pub crate::budgets::StoreError);

/// A verdict, and the bytes of its replay (empty otherwise).
pub type Answer = (GateVerdict, Vec<u8>);

/// An idempotency claim this request took.
#[derive(Debug, PartialEq)]
struct Claim {
    key: String,
    holder: String,
    digest: String,
}

impl Claim {
    /// As the ticket carries it: `<store key>/<token>/<request digest>`.
    fn to_ticket(&self, token: &str) -> String {
        format!("{}/{token}/{}", self.key, self.digest)
    }

    /// A ticket's claim; `None` for one of another shape (which the gate never hands out).
    fn from_ticket(ticket: &str) -> Option<Claim> {
        let mut parts = ticket.split('/');
        let (key, token, digest) = (parts.next()?, parts.next()?, parts.next()?);
        let record = key.strip_prefix("idem:")?;
        let hex = |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit());
        let shaped =
            parts.next().is_none() && record.len() == 64 && hex(record, 64) && hex(token, 64) && hex(digest, 128);
        shaped.then(|| Claim { key: key.into(), holder: cache::claim_holder(token), digest: digest.into() })
    }
}

impl Gate {
    pub fn new(store: Store, budgets: Arc<Budgets>) -> Self {
        Gate { store, budgets, counters: Arc::default() }
    }

    /// The gate's counters, for the admin port's `/metrics`.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(GateMetrics(Arc::clone(&self.counters)))
    }

    /// The verdict on `ask` at `now_ms`.
    pub async fn decide(&self, ask: &GateRequest, now_ms: u64) -> Result<Answer, BudgetsUnavailable> {
        let mut ticket = StoreTicket::default();
        let mut store_up = true;
        let mut claim = None;
        if let Some(idempotency) = &ask.idempotency {
            let key = cache::idempotency_key(&cache::record_id(&ask.owner, &idempotency.key));
            let digest = replay::request_digest(&ask.path, &ask.model, &ask.body);
            let token = cache::claim_token();
            let value = cache::encode_claim(&token, &digest);
            match self.store.claim(&key, &value, CLAIM_LEASE_MS, now_ms).await {
                Ok(None) => {
                    let taken = Claim { key, holder: cache::claim_holder(&token), digest };
                    ticket.claim = Some(taken.to_ticket(&token));
                    ticket.window_secs = idempotency.window_secs;
                    claim = Some(taken);
                }
                Ok(Some(there)) => match cache::decode_record(&there) {
                    Some(Record::Done { head, bytes }) if head.digest == digest => {
                        self.counters.idempotent_replays.fetch_add(1, Ordering::Relaxed);
                        let verdict = GateVerdict::Replay {
                            source: ReplaySource::Idempotency,
                            status: head.status,
                            content_type: head.content_type,
                            usage: head.usage,
                            ttl_ms: 0,
                        };
                        return Ok((verdict, bytes.to_vec()));
                    }
                    Some(Record::Claimed { digest: running }) if running == digest => {
                        return Ok(refuse(Refusal::IdempotencyInProgress));
                    }
                    Some(_) => return Ok(refuse(Refusal::IdempotencyMismatch)),
                    None => tracing::warn!(request_id = ask.request_id.as_str(), "an idempotency record is unreadable"),
                },
                Err(e) => {
                    self.store_failed(&e, ask, "idempotency key not claimed");
                    store_up = false;
                }
            }
        }

        let mut cache_miss = false;
        if let Some(asked) = ask.cache.as_ref().filter(|_| replay::cacheable_path(&ask.path)) {
            if asked.mode == CacheMode::Always || replay::is_deterministic(&ask.path, &ask.body) {
                let partition = replay::partition(asked.shared, &ask.owner);
                let key = replay::cache_key(&partition, &ask.path, &ask.model, &ask.body);
                if !asked.lookup {
                    self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                } else if !store_up {
                    self.counters.miss.fetch_add(1, Ordering::Relaxed);
                } else {
                    match self.store.get(&cache::cache_entry_key(&key), now_ms).await {
                        Ok(found) => {
                            if let Some((head, whole)) = found.as_deref().and_then(cache::decode_cached) {
                                self.counters.hit.fetch_add(1, Ordering::Relaxed);
                                return Ok(self.replay_hit(ask, claim, head, &whole, now_ms).await);
                            }
                            self.counters.miss.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.store_failed(&e, ask, "cache looked up as a miss");
                            self.counters.miss.fetch_add(1, Ordering::Relaxed);
                            store_up = false;
                        }
                    }
                }
                cache_miss = true;
                if asked.store && store_up {
                    ticket.cache_key = Some(key);
                    ticket.ttl_secs = asked.ttl_secs;
                    ticket.path.clone_from(&ask.path);
                }
            } else {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }

        let mut member = 0;
        if !ask.budgets.is_empty() {
            let now_secs = now_ms / 1000;
            let admitted =
                self.budgets.admit(&ask.owner, &ask.budgets, ask.budget_fallback, &ask.reservation, now_secs).await;
            match admitted {
                Ok(Admission::Admitted { member: admitted }) => member = admitted,
                Ok(Admission::Refused { budget, resets_at }) => {
                    self.let_go(claim, ask, now_ms).await;
                    return Ok(refuse(Refusal::BudgetExhausted { budget, resets_at }));
                }
                Err(e) => {
                    self.let_go(claim, ask, now_ms).await;
                    // The admission may have landed after all (a timeout): settling it at nothing
                    // frees what it holds, or keeps it from landing later, at best effort.
                    if let Err(e) = self.budgets.settle(&ask.reservation, 0, 0).await {
                        tracing::debug!(request_id = ask.request_id.as_str(), error = %e, "reservation not let go");
                    }
                    return Err(BudgetsUnavailable(e));
                }
            }
        }
        let ticket = (ticket != StoreTicket::default()).then_some(ticket);
        Ok((GateVerdict::Proceed { member, ticket, cache_miss }, Vec::new()))
    }

    /// Lets go of what `verdict` took for `ask`, which reached the filter too
    /// late to be followed: the claim its ticket names, and its budget reservation.
    pub async fn abandon(&self, ask: &GateRequest, verdict: &GateVerdict, now_ms: u64) {
        let GateVerdict::Proceed { ticket, .. } = verdict else {
            return;
        };
        self.counters.late_verdicts.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            request_id = ask.request_id.as_str(),
            timeout_ms = ask.timeout_ms,
            "the gate decided after the filter stopped waiting: what it took is let go"
        );
        let claim = ticket.as_ref().and_then(|ticket| ticket.claim.as_deref()).and_then(Claim::from_ticket);
        self.let_go(claim, ask, now_ms).await;
        if !ask.budgets.is_empty() {
            if let Err(e) = self.budgets.settle(&ask.reservation, 0, 0).await {
                tracing::warn!(request_id = ask.request_id.as_str(), error = %e, "reservation not let go");
            }
        }
    }

    /// A cached answer as the client asks for it; a claim this request took is completed with it.
    async fn replay_hit(
        &self,
        ask: &GateRequest,
        claim: Option<Claim>,
        head: CachedHead,
        whole: &serde_json::Value,
        now_ms: u64,
    ) -> Answer {
        let (stream, include_usage) = replay::stream_asked(&ask.body);
        let (content_type, bytes) = replay::replay(&ask.path, whole, stream, include_usage);
        if let (Some(claim), Some(window_secs)) = (claim, ask.idempotency.as_ref().map(|i| i.window_secs)) {
            let done = DoneHead {
                digest: claim.digest,
                status: 200,
                content_type: content_type.to_string(),
                usage: head.usage,
            };
            let value = cache::encode_done(&done, &bytes);
            let completed =
                self.store.complete(&claim.key, claim.holder.as_bytes(), &value, secs_to_ms(window_secs), now_ms).await;
            if let Err(e) = completed {
                self.store_failed(&e, ask, "idempotent answer not kept");
            }
        }
        let verdict = GateVerdict::Replay {
            source: ReplaySource::Cache,
            status: 200,
            content_type: content_type.to_string(),
            usage: head.usage,
            ttl_ms: head.expires_ms.saturating_sub(now_ms),
        };
        (verdict, bytes)
    }

    /// Lets go of the claim a refused request took, so that its repeat may run.
    async fn let_go(&self, claim: Option<Claim>, ask: &GateRequest, now_ms: u64) {
        let Some(claim) = claim else { return };
        if let Err(e) = self.store.release(&claim.key, claim.holder.as_bytes(), now_ms).await {
            self.store_failed(&e, ask, "idempotency claim not let go");
        }
    }

    /// Keeps an answer as `request`'s ticket says: a complete one in the
    /// cache and as its idempotency key's first answer; otherwise the claim is let go.
    pub async fn keep(&self, request: &StoreRequest, bytes: &[u8], now_ms: u64) {
        let ticket = &request.ticket;
        let claim = ticket.claim.as_deref().and_then(Claim::from_ticket);
        // A stream cut short still ends cleanly, in an error event: never an answer to repeat.
        if !request.complete || (request.stream && replay::stream_broken(bytes)) {
            if let Some(claim) = claim {
                if let Err(e) = self.store.release(&claim.key, claim.holder.as_bytes(), now_ms).await {
                    self.keep_failed(&e, request, "idempotency claim not let go");
                }
            }
            return;
        }
        if let Some(cache_key) = &ticket.cache_key {
            match replay::whole_answer(&ticket.path, request.stream, bytes, request.usage.as_ref()) {
                Some(whole) => {
                    let ttl_ms = secs_to_ms(ticket.ttl_secs);
                    let head = CachedHead { usage: request.usage, expires_ms: now_ms.saturating_add(ttl_ms) };
                    let value = cache::encode_cached(&head, &whole);
                    let key = cache::cache_entry_key(cache_key);
                    if let Err(e) = self.store.put(&key, &value, ttl_ms, now_ms).await {
                        self.keep_failed(&e, request, "answer not cached");
                    }
                }
                None => tracing::debug!(request_id = request.request_id.as_str(), "answer not whole: not cached"),
            }
        }
        if let Some(claim) = claim {
            let head = DoneHead {
                digest: claim.digest,
                status: request.status,
                content_type: request.content_type.clone(),
                usage: request.usage,
            };
            let value = cache::encode_done(&head, bytes);
            let completed = self
                .store
                .complete(&claim.key, claim.holder.as_bytes(), &value, secs_to_ms(ticket.window_secs), now_ms)
                .await;
            if let Err(e) = completed {
                self.keep_failed(&e, request, "idempotent answer not kept");
            }
        }
    }

    fn store_failed(&self, e: &StoreError, ask: &GateRequest, outcome: &str) {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(request_id = ask.request_id.as_str(), error = %e, "cache store unavailable: {outcome}");
    }

    fn keep_failed(&self, e: &StoreError, request: &StoreRequest, outcome: &str) {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(request_id = request.request_id.as_str(), error = %e, "cache store unavailable: {outcome}");
    }
}

/// A ticket of the shape the gate hands out (a store call must not name any other entry).
pub fn valid_ticket(ticket: &StoreTicket) -> bool {
    let hex = |s: &str| s.len() <= 128 && s.bytes().all(|b| b.is_ascii_hexdigit());
    ticket.cache_key.as_deref().is_none_or(hex)
        && ticket.claim.as_deref().is_none_or(|c| Claim::from_ticket(c).is_some())
}

fn refuse(refusal: Refusal) -> Answer {
    (GateVerdict::Refuse { refusal }, Vec::new())
}

fn secs_to_ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

#[derive(Debug, Default)]
struct Counters {
    hit: AtomicU64,
    miss: AtomicU64,
    skipped: AtomicU64,
    store_errors: AtomicU64,
    idempotent_replays: AtomicU64,
    late_verdicts: AtomicU64,
}

#[derive(Debug)]
struct GateMetrics(Arc<Counters>);

impl Collector for GateMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = &self.0;
        let mut family = encoder.encode_descriptor(
            "modelgate_cache_lookups",
            "Requests on a caching route: served from the cache (hit), not found (miss), or not looked up \
             (skipped: Cache-Control no-cache, or not deterministic by its parameters)",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [("hit", &counters.hit), ("miss", &counters.miss), ("skipped", &counters.skipped)] {
            ConstCounter::new(count.load(Ordering::Relaxed)).encode(family.encode_family(&[("result", result)])?)?;
        }
        let single = [
            (
                "modelgate_cache_store_errors",
                "Calls to the cache's store that failed (Redis down or slow): the request went on as a miss, \
                 without its idempotency key",
                &counters.store_errors,
            ),
            (
                "modelgate_idempotent_replays",
                "Repeats of an Idempotency-Key answered with the first request's answer",
                &counters.idempotent_replays,
            ),
            (
                "modelgate_gate_late_verdicts",
                "Verdicts reached after the filter stopped waiting for them (cache.timeout_ms, budgets.timeout_ms): \
                 the idempotency claim and budget reservation they took were let go",
                &counters.late_verdicts,
            ),
        ];
        for (name, help, count) in single {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(count.load(Ordering::Relaxed)).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Memory, RedisStore};
    use modelgate_proto::budgets::{BudgetLimit, BudgetUnit, Period};
    use modelgate_proto::gate::{BudgetCandidate, CacheAsk, IdempotencyAsk};
    use modelgate_proto::usage::Usage;
    use serde_json::{json, Value};
    use std::time::Duration;

    const CHAT: &str = "/v1/chat/completions";
    const MINUTE: u64 = 60_000;
    const USAGE: Usage = Usage { prompt_tokens: 5, completion_tokens: 2 };

    /// Budgets in SQLite in a directory of their own, removed with it.
    fn budgets() -> (Arc<Budgets>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Arc::new(Budgets::open(dir.path(), None, Duration::from_secs(1)).unwrap()), dir)
    }

    fn gate() -> (Gate, tempfile::TempDir) {
        let (budgets, dir) = budgets();
        (Gate::new(Store::Memory(Memory::new(1 << 20)), budgets), dir)
    }

    fn cached(ttl_secs: u64) -> CacheAsk {
        CacheAsk { ttl_secs, mode: CacheMode::Deterministic, shared: false, lookup: true, store: true }
    }

    fn ask(owner: &str, body: Value) -> GateRequest {
        GateRequest {
            request_id: "req".into(),
            owner: owner.into(),
            path: CHAT.into(),
            model: "m".into(),
            cache: Some(cached(300)),
            body,
            ..GateRequest::default()
        }
    }

    fn idempotent(owner: &str, key: &str, body: Value) -> GateRequest {
        GateRequest {
            idempotency: Some(IdempotencyAsk { key: key.into(), window_secs: 3600 }),
            cache: None,
            ..ask(owner, body)
        }
    }

    fn question(text: &str) -> Value {
        json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]})
    }

    fn answer(text: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        }))
        .unwrap()
    }

    fn ended(ticket: StoreTicket, complete: bool, status: u16) -> StoreRequest {
        StoreRequest {
            request_id: "req".into(),
            ticket,
            complete,
            status,
            content_type: "application/json".into(),
            stream: false,
            usage: Some(USAGE),
        }
    }

    fn ticket_of(verdict: &GateVerdict) -> StoreTicket {
        match verdict {
            GateVerdict::Proceed { ticket: Some(ticket), .. } => ticket.clone(),
            other => panic!("no ticket: {other:?}"),
        }
    }

    fn metric(gate: &Gate, series: &str) -> u64 {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(gate.collector());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let line = text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_miss_is_kept_and_then_served_whole_or_as_a_stream() {
        let (gate, _budgets) = gate();
        let (verdict, _) = gate.decide(&ask("alice", question("hi")), 0).await.unwrap();
        let GateVerdict::Proceed { member: 0, cache_miss: true, ticket: Some(ticket) } = verdict else {
            panic!("{verdict:?}")
        };
        assert!(ticket.cache_key.is_some() && ticket.claim.is_none());
        assert_eq!((ticket.ttl_secs, ticket.path.as_str()), (300, CHAT));
        gate.keep(&ended(ticket, true, 200), &answer("hello"), 1).await;

        // Key order and the non-semantic members do not matter.
        let again =
            json!({"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "m", "user": "u"});
        let (verdict, bytes) = gate.decide(&ask("alice", again), 2).await.unwrap();
        let usage = Some(USAGE);
        let json = "application/json".to_string();
        // Kept at 1 for 300 s: the worker's copy may live as long as the entry, and no longer.
        let ttl_ms = 300_000 - 1;
        assert_eq!(
            verdict,
            GateVerdict::Replay { source: ReplaySource::Cache, status: 200, content_type: json, usage, ttl_ms }
        );
        let whole: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(whole["choices"][0]["message"]["content"], "hello");

        let mut streamed = question("hi");
        streamed["stream"] = true.into();
        streamed["stream_options"] = json!({"include_usage": true});
        let (verdict, bytes) = gate.decide(&ask("alice", streamed), 3).await.unwrap();
        assert!(matches!(&verdict, GateVerdict::Replay { content_type, .. } if content_type == "text/event-stream"));
        let assembled = replay::whole_answer(CHAT, true, &bytes, None).unwrap();
        assert_eq!(assembled["choices"][0]["message"]["content"], "hello");
        assert_eq!(assembled["usage"]["completion_tokens"], 2);
        assert_eq!((metric(&gate, "modelgate_cache_lookups_total{result=\"hit\"}")), 2);
        assert_eq!((metric(&gate, "modelgate_cache_lookups_total{result=\"miss\"}")), 1);
    }

    #[tokio::test]
    async fn answers_are_kept_per_key_unless_shared_and_for_their_ttl() {
        let (gate, _budgets) = gate();
        let (verdict, _) = gate.decide(&ask("alice", question("hi")), 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("hello"), 0).await;
        let hit = |verdict: &GateVerdict| matches!(verdict, GateVerdict::Replay { .. });
        assert!(!hit(&gate.decide(&ask("bob", question("hi")), 1).await.unwrap().0));
        assert!(hit(&gate.decide(&ask("alice", question("hi")), 300_000 - 1).await.unwrap().0));
        assert!(!hit(&gate.decide(&ask("alice", question("hi")), 300_000).await.unwrap().0));

        let shared = |owner: &str| GateRequest {
            cache: Some(CacheAsk { shared: true, ..cached(300) }),
            ..ask(owner, question("shared"))
        };
        let (verdict, _) = gate.decide(&shared("alice"), 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("for all"), 0).await;
        assert!(hit(&gate.decide(&shared("bob"), 1).await.unwrap().0));
    }

    #[tokio::test]
    async fn no_cache_no_store_and_random_requests_are_not_served_from_the_cache() {
        let (gate, _budgets) = gate();
        let with = |lookup, store, body| GateRequest {
            cache: Some(CacheAsk { lookup, store, ..cached(300) }),
            ..ask("alice", body)
        };
        // no-store: not kept.
        let (verdict, _) = gate.decide(&with(true, false, question("hi")), 0).await.unwrap();
        assert_eq!(verdict, GateVerdict::Proceed { member: 0, ticket: None, cache_miss: true });
        // no-cache: not looked up, but kept.
        let (verdict, _) = gate.decide(&with(false, true, question("hi")), 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("fresh"), 0).await;
        let (verdict, _) = gate.decide(&with(false, true, question("hi")), 1).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Proceed { cache_miss: true, .. }), "{verdict:?}");
        assert!(matches!(
            gate.decide(&with(true, true, question("hi")), 1).await.unwrap().0,
            GateVerdict::Replay { .. }
        ));
        // Sampled: neither looked up nor kept, unless the route caches always.
        let sampled = json!({"model": "m", "messages": [], "temperature": 0.7});
        let (verdict, _) = gate.decide(&ask("alice", sampled.clone()), 0).await.unwrap();
        assert_eq!(verdict, GateVerdict::Proceed { member: 0, ticket: None, cache_miss: false });
        let always =
            GateRequest { cache: Some(CacheAsk { mode: CacheMode::Always, ..cached(300) }), ..ask("alice", sampled) };
        assert!(
            gate.decide(&always, 0).await.unwrap().0
                != GateVerdict::Proceed { member: 0, ticket: None, cache_miss: false }
        );
        assert_eq!(metric(&gate, "modelgate_cache_lookups_total{result=\"skipped\"}"), 3);
    }

    #[tokio::test]
    async fn errors_and_answers_cut_short_are_not_kept() {
        let (gate, _budgets) = gate();
        let (verdict, _) = gate.decide(&ask("alice", question("hi")), 0).await.unwrap();
        let ticket = ticket_of(&verdict);
        gate.keep(&ended(ticket.clone(), false, 200), &[], 0).await;
        gate.keep(&ended(ticket.clone(), true, 200), br#"{"error":{"message":"no"}}"#, 0).await;
        let cut = StoreRequest { stream: true, content_type: "text/event-stream".into(), ..ended(ticket, true, 200) };
        gate.keep(&cut, b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"he\"}}]}\n\n", 0).await;
        assert!(matches!(gate.decide(&ask("alice", question("hi")), 1).await.unwrap().0, GateVerdict::Proceed { .. }));
    }

    #[tokio::test]
    async fn an_idempotent_request_runs_once_and_its_repeats_get_its_answer() {
        let (gate, _budgets) = gate();
        let first = idempotent("alice", "k1", question("hi"));
        let (verdict, _) = gate.decide(&first, 0).await.unwrap();
        let ticket = ticket_of(&verdict);
        assert_eq!((ticket.cache_key.as_ref(), ticket.window_secs), (None, 3600));
        assert!(valid_ticket(&ticket));
        let refused = |refusal| (GateVerdict::Refuse { refusal }, Vec::new());
        assert_eq!(gate.decide(&first, 1).await.unwrap(), refused(Refusal::IdempotencyInProgress));
        let other = idempotent("alice", "k1", question("another"));
        assert_eq!(gate.decide(&other, 1).await.unwrap(), refused(Refusal::IdempotencyMismatch));
        // Another key's, or another key name: its own.
        assert!(matches!(
            gate.decide(&idempotent("bob", "k1", question("hi")), 1).await.unwrap().0,
            GateVerdict::Proceed { .. }
        ));

        let streamed =
            StoreRequest { stream: true, content_type: "text/event-stream".into(), ..ended(ticket, true, 200) };
        gate.keep(&streamed, b"data: raw\n\n", 2).await;
        let (verdict, bytes) = gate.decide(&first, 3).await.unwrap();
        let content_type = "text/event-stream".to_string();
        let usage = Some(USAGE);
        assert_eq!(
            verdict,
            // An idempotent repeat is no copy for the worker to keep: its key is claimed per request.
            GateVerdict::Replay { source: ReplaySource::Idempotency, status: 200, content_type, usage, ttl_ms: 0 }
        );
        assert_eq!(bytes, b"data: raw\n\n");
        assert_eq!(gate.decide(&other, 3).await.unwrap(), refused(Refusal::IdempotencyMismatch));
        assert_eq!(metric(&gate, "modelgate_idempotent_replays_total"), 1);
        // Past the window, the key is new again.
        assert!(matches!(gate.decide(&first, 2 + 3_600_000).await.unwrap().0, GateVerdict::Proceed { .. }));
    }

    #[tokio::test]
    async fn an_unfinished_answer_lets_the_key_go_and_a_lost_claim_ends_with_its_lease() {
        let (gate, _budgets) = gate();
        let first = idempotent("alice", "k", question("hi"));
        let (verdict, _) = gate.decide(&first, 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), false, 0), &[], 1).await;
        let (verdict, _) = gate.decide(&first, 2).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Proceed { ticket: Some(_), .. }), "{verdict:?}");
        // A claim's lease is ten minutes: then its request is taken as lost.
        let refused = GateVerdict::Refuse { refusal: Refusal::IdempotencyInProgress };
        assert_eq!(gate.decide(&first, 2 + 10 * MINUTE - 1).await.unwrap().0, refused);
        let (late, _) = gate.decide(&first, 2 + 10 * MINUTE).await.unwrap();
        // The lost request's end changes nothing; the new one's is kept.
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("lost"), 11 * MINUTE).await;
        assert_eq!(gate.decide(&first, 11 * MINUTE).await.unwrap().0, refused);
        gate.keep(&ended(ticket_of(&late), true, 200), &answer("found"), 11 * MINUTE).await;
        let (verdict, bytes) = gate.decide(&first, 11 * MINUTE).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Replay { source: ReplaySource::Idempotency, .. }));
        assert_eq!(bytes, answer("found"));
    }

    #[tokio::test]
    async fn a_repeat_comes_before_the_cache_and_a_hit_answers_the_key() {
        let (gate, _budgets) = gate();
        let (verdict, _) = gate.decide(&ask("alice", question("hi")), 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("cached"), 0).await;
        let both = GateRequest { cache: Some(cached(300)), ..idempotent("alice", "k", question("hi")) };
        let (verdict, first) = gate.decide(&both, 1).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Replay { source: ReplaySource::Cache, .. }), "{verdict:?}");
        let (verdict, repeat) = gate.decide(&both, 2).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Replay { source: ReplaySource::Idempotency, .. }), "{verdict:?}");
        assert_eq!(first, repeat);
        // A miss carries both the cache's key and the claim.
        let fresh = GateRequest { cache: Some(cached(300)), ..idempotent("alice", "k2", question("new")) };
        let ticket = ticket_of(&gate.decide(&fresh, 3).await.unwrap().0);
        assert!(ticket.cache_key.is_some() && ticket.claim.is_some());
    }

    fn candidate(backend: &str, limit: u64) -> BudgetCandidate {
        let budget = BudgetLimit { scope: "key".into(), unit: BudgetUnit::Usd, period: Period::Day, limit };
        BudgetCandidate { backend: backend.into(), budgets: vec![budget], usd_micros: 1, tokens: 1 }
    }

    fn budgeted(request: GateRequest, candidates: Vec<BudgetCandidate>) -> GateRequest {
        GateRequest { budgets: candidates, reservation: format!("r{}", cache::claim_token()), ..request }
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_after_the_cache_and_lets_the_key_go() {
        let (gate, _budgets) = gate();
        let (verdict, _) = gate.decide(&ask("alice", question("hi")), 0).await.unwrap();
        gate.keep(&ended(ticket_of(&verdict), true, 200), &answer("cached"), 0).await;
        // A hit spends nothing: no budget is asked.
        let spent = vec![candidate("b", 0)];
        let (verdict, _) = gate.decide(&budgeted(ask("alice", question("hi")), spent.clone()), 1).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Replay { source: ReplaySource::Cache, .. }), "{verdict:?}");

        let both = GateRequest { cache: Some(cached(300)), ..idempotent("alice", "k", question("new")) };
        let (verdict, _) = gate.decide(&budgeted(both.clone(), spent.clone()), 1).await.unwrap();
        let GateVerdict::Refuse { refusal: Refusal::BudgetExhausted { budget, resets_at } } = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!((budget.as_str(), resets_at), ("usd_per_day of key `alice`", 86_400));
        // The refused request's key is free for its retry.
        let (verdict, _) = gate.decide(&both, 2).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Proceed { ticket: Some(_), .. }), "{verdict:?}");

        // With fallback, the first member with room.
        let fallback = GateRequest { budget_fallback: true, ..ask("alice", question("other")) };
        let (verdict, _) =
            gate.decide(&budgeted(fallback, vec![candidate("b", 0), candidate("c", 10)]), 3).await.unwrap();
        assert!(matches!(verdict, GateVerdict::Proceed { member: 1, cache_miss: true, .. }), "{verdict:?}");
    }

    #[tokio::test]
    async fn a_verdict_too_late_for_the_filter_lets_go_of_its_claim_and_reservation() {
        let (gate, _dir) = gate();
        let late = budgeted(idempotent("alice", "k", question("hi")), vec![candidate("b", 10)]);
        let (verdict, _) = gate.decide(&late, 0).await.unwrap();
        assert!(matches!(&verdict, GateVerdict::Proceed { ticket: Some(_), .. }), "{verdict:?}");
        gate.abandon(&late, &verdict, 1).await;
        // The client's retry is a first request again, not a 409 until the claim's lease ends.
        let (retry, _) = gate.decide(&idempotent("alice", "k", question("hi")), 2).await.unwrap();
        assert!(matches!(retry, GateVerdict::Proceed { ticket: Some(_), .. }), "{retry:?}");
        // The reservation holds nothing; had it not landed yet, it would be refused when it does.
        let report = gate.budgets.report(Some("alice"), 0).await.unwrap();
        assert!(
            !report.data.is_empty() && report.data.iter().all(|row| row.reserved.as_f64() == Some(0.0)),
            "{report:?}"
        );
        assert_eq!(metric(&gate, "modelgate_gate_late_verdicts_total"), 1);
    }

    #[tokio::test]
    async fn a_store_that_does_not_answer_is_a_miss_without_a_claim() {
        let store = RedisStore::new("redis://127.0.0.1:1/0", Duration::from_millis(50)).unwrap();
        let (budgets, _dir) = budgets();
        let gate = Gate::new(Store::Redis(store), budgets);
        let both = GateRequest { cache: Some(cached(300)), ..idempotent("alice", "k", question("hi")) };
        let (verdict, _) = gate.decide(&both, 0).await.unwrap();
        assert_eq!(verdict, GateVerdict::Proceed { member: 0, ticket: None, cache_miss: true });
        // Asked once: after the claim failed, the cache was not looked up.
        assert_eq!(metric(&gate, "modelgate_cache_store_errors_total"), 1);
        assert_eq!(metric(&gate, "modelgate_cache_lookups_total{result=\"miss\"}"), 1);
    }

    #[test]
    fn tickets_name_only_entries_the_gate_hands_out() {
        let claim = Claim {
            key: format!("idem:{}", "a".repeat(64)),
            holder: cache::claim_holder("00ff"),
            digest: "beef".into(),
        };
        let ticket = claim.to_ticket("00ff");
        assert_eq!(Claim::from_ticket(&ticket), Some(claim));
        for bad in [
            "",
            "idem:aa/00/00",
            "cache:x/00/00",
            &format!("idem:{}/00/00/00", "a".repeat(64)),
            &format!("idem:{}/zz/00", "a".repeat(64)),
        ] {
            assert_eq!(Claim::from_ticket(bad), None, "{bad}");
        }
        assert!(!valid_ticket(&StoreTicket { cache_key: Some("../x".into()), ..StoreTicket::default() }));
        assert!(valid_ticket(&StoreTicket { cache_key: Some("ab".repeat(32)), ..StoreTicket::default() }));
    }
}
