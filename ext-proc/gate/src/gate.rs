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
                let partition = if asked.shared { "*" } else { ask.owner.as_str() };
                let key = replay::cache_key(partition, &ask.path, &ask.model, &ask.body);
                if asked.lookup && store_up {
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
                } else {
                    self.counters.skipped.fetch_add(1, Ordering::Relaxed);
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
                    return Err(BudgetsUnavailable(e));
                }
            }
        }
        let ticket = (ticket != StoreTicket::default()).then_some(ticket);
        Ok((GateVerdict::Proceed { member, ticket, cache_miss }, Vec::new()))
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
        if !request.complete {
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
                    let value = cache::encode_cached(&CachedHead { usage: request.usage }, &whole);
                    let key = cache::cache_entry_key(cache_key);
                    if let Err(e) = self.store.put(&key, &value, secs_to_ms(ticket.ttl_secs), now_ms).await {
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
        ];
        for (name, help, count) in single {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(count.load(Ordering::Relaxed)).encode(metric)?;
        }
        Ok(())
    }
}
