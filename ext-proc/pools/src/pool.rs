//! A pool's replicas, their state, and the pick.
//!
//! The set of replicas can change while requests are picked (a `dns` pool's
//! name answers with other addresses): a pick works on the set it started
//! with, an `Arc` cloned under a lock held only for that clone, and a change
//! swaps a new set in. A replica that left stays alive for the requests
//! still counted on it.

use crate::config::{defaults, Membership, PoolConfig};
use crate::metrics::ReplicaMetrics;
use crate::prefix::{block_hashes, PrefixIndex};
use crate::scorers::{self, Resolved};
use modelgate_proto::error::GatewayError;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pool {
    name: String,
    config: PoolConfig,
    /// The current replicas; see the module's documentation.
    replicas: RwLock<Replicas>,
    /// The id the next replica to join gets.
    next_id: AtomicU64,
    weights: Resolved,
    /// Locked only to look a prompt's blocks up and to record them.
    prefix: Mutex<PrefixIndex>,
    /// Requests refused, by [`Refusal::kind`].
    refusals: [AtomicU64; Refusal::KINDS.len()],
    /// Lookups of the pool's `dns` name that failed (the set was kept).
    lookup_failures: AtomicU64,
}

/// One set of a pool's replicas.
pub type Replicas = Arc<[Arc<Replica>]>;

/// What a change of a pool's replicas did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// New addresses left out: the pool already had its most replicas.
    pub ignored: usize,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.ignored == 0
    }
}

/// One replica: its address, what its last scrape said, and the requests
/// the picker sent it that have not ended.
#[derive(Debug)]
pub struct Replica {
    pub address: String,
    /// Unique within its pool, never reused: a replica that leaves and comes
    /// back at the same address is a new replica, knowing nothing yet.
    id: u64,
    state: RwLock<ReplicaState>,
    in_flight: AtomicU64,
    /// Requests picked for it (as the first choice) since start.
    picks: AtomicU64,
}

/// What the scrapers know of a replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaState {
    pub metrics: Option<ReplicaMetrics>,
    /// When the last successful scrape ended.
    pub scraped_at: Option<Instant>,
    /// The models and adapters its `/v1/models` lists, when discovery is on.
    pub models: Option<BTreeSet<String>>,
    /// Its last read was refused: nothing listens there (a replica stopped or
    /// restarting). It is not picked until a read succeeds again, without
    /// waiting for its metrics to go stale. A slow answer does not count:
    /// a busy machine would make every replica flap.
    pub refused: bool,
}

impl ReplicaState {
    /// Its metrics, if the last successful scrape is recent enough to trust
    /// and it has not refused a read since.
    fn fresh_metrics(&self, now: Instant, stale_after: Duration) -> Option<&ReplicaMetrics> {
        if self.refused {
            return None;
        }
        let scraped_at = self.scraped_at?;
        (now.saturating_duration_since(scraped_at) <= stale_after).then_some(self.metrics.as_ref()).flatten()
    }

    /// Whether it serves `model`: `None` when it is not known.
    fn serves(&self, model: &str, metrics: &ReplicaMetrics) -> Option<bool> {
        // A request naming no model (`GET /v1/models` through the endpoint picker) is for any.
        if model.is_empty() || metrics.active_loras.contains(model) {
            return Some(true);
        }
        self.models.as_ref().map(|models| models.contains(model))
    }
}

/// What a request asks of the picker.
#[derive(Debug, Default)]
pub struct PickRequest<'a> {
    /// The model as the replica will see it (after any rename); empty when
    /// the request names none, which any replica serves.
    pub model: &'a str,
    /// The prompt's bytes, for the prefix index.
    pub prompt: &'a [u8],
    /// The session header's value, if the pool has one and the request sent it.
    pub session: Option<&'a [u8]>,
    /// Only these replicas (`ip:port`) may be picked: the data plane's subset hint.
    pub subset: Option<&'a [String]>,
}

/// Why no replica was picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Every ready replica is queued past `max_waiting`: a 429, retry after the given seconds.
    Saturated { retry_after_secs: u64 },
    /// No replica is ready (or none in the subset): a 503.
    NoneReady,
    /// Discovery is on and no replica serves the model: a 404.
    ModelNotServed,
}

impl Refusal {
    /// Each kind's name, as counters and logs give it.
    pub const KINDS: [&'static str; 3] = ["saturated", "none_ready", "model_not_served"];

    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    fn kind_index(&self) -> usize {
        match self {
            Refusal::Saturated { .. } => 0,
            Refusal::NoneReady => 1,
            Refusal::ModelNotServed => 2,
        }
    }

    /// The client's error; a `Saturated` one also needs its `retry-after` header.
    pub fn to_error(&self, pool: &str, model: &str) -> GatewayError {
        match self {
            Refusal::Saturated { .. } => GatewayError::pool_saturated(pool),
            Refusal::NoneReady => GatewayError::no_ready_replica(pool),
            Refusal::ModelNotServed => GatewayError::model_not_found(model),
        }
    }

    /// The `retry-after` seconds to send with the error, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Saturated { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

/// The replicas picked for one request, best first; the first is counted as
/// in flight until this is dropped (or until [`Picked::served`] names another).
#[derive(Debug)]
pub struct Picked {
    endpoints: Vec<Arc<Replica>>,
    /// Which of `endpoints` the request is counted on.
    counted: usize,
}

impl Picked {
    /// The endpoints as the `x-gateway-destination-endpoint` header and the
    /// `envoy.lb` metadata carry them: `ip:port,ip:port,...`, best first.
    pub fn destination(&self) -> String {
        self.endpoints.iter().map(|r| r.address.as_str()).collect::<Vec<_>>().join(",")
    }

    pub fn primary(&self) -> &str {
        &self.endpoints[self.counted].address
    }

    /// The data plane says `address` served the request (a retry went down
    /// the list): it is counted there from now on.
    pub fn served(&mut self, address: &str) {
        if let Some(i) = self.endpoints.iter().position(|r| r.address == address) {
            if i != self.counted {
                self.endpoints[i].in_flight.fetch_add(1, Ordering::Relaxed);
                self.endpoints[self.counted].in_flight.fetch_sub(1, Ordering::Relaxed);
                self.counted = i;
            }
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.endpoints[self.counted].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Replica {
    fn new(id: u64, address: String) -> Self {
        Replica { address, id, state: RwLock::default(), in_flight: AtomicU64::new(0), picks: AtomicU64::new(0) }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    /// Whether a scrape succeeded within `stale_after` of `now`.
    pub fn is_ready(&self, now: Instant, stale_after: Duration) -> bool {
        self.state.read().is_ok_and(|state| state.fresh_metrics(now, stale_after).is_some())
    }

    pub fn state(&self) -> ReplicaState {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Called by the scraper.
    pub fn update(&self, change: impl FnOnce(&mut ReplicaState)) {
        if let Ok(mut state) = self.state.write() {
            change(&mut state);
        }
    }
}

impl Pool {
    pub fn new(name: String, config: PoolConfig) -> Result<Self, String> {
        let listed = match config.membership().map_err(|e| format!("pool `{name}`: {e}"))? {
            Membership::Listed([]) => return Err(format!("pool `{name}` lists no replicas")),
            Membership::Listed(replicas) => replicas.to_vec(),
            // Filled by the first lookup.
            Membership::Dns { .. } => Vec::new(),
        };
        if listed.len() > defaults::MAX_REPLICAS {
            return Err(format!("pool `{name}` lists {} replicas; at most {}", listed.len(), defaults::MAX_REPLICAS));
        }
        if let Some(twice) = listed.iter().enumerate().find(|(i, a)| listed[..*i].contains(a)) {
            return Err(format!("pool `{name}` lists replica {} twice", twice.1));
        }
        if config.prefix.block_bytes == 0 || config.scrape_interval_ms == 0 || config.models_interval_ms == 0 {
            return Err(format!(
                "pool `{name}`: block_bytes, scrape_interval_ms and models_interval_ms must be above 0"
            ));
        }
        let weights = Resolved::new(config.strategy, &config.weights);
        if let Some((scorer, _)) = weights.named().into_iter().find(|(_, w)| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!("pool `{name}`: the weight of `{scorer}` must be a number from 0 up"));
        }
        let pool = Pool {
            name,
            config,
            replicas: RwLock::new(Arc::new([])),
            next_id: AtomicU64::new(0),
            weights,
            prefix: Mutex::default(),
            refusals: Default::default(),
            lookup_failures: AtomicU64::new(0),
        };
        pool.set_replicas(listed);
        Ok(pool)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The current replicas.
    pub fn replicas(&self) -> Replicas {
        // Neither holder of this lock can panic while holding it.
        Arc::clone(&self.replicas.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `addresses` the pool's replicas. Those already in the pool keep
    /// their state and place; new ones follow in the order given, not ready
    /// until their first scrape, up to [`defaults::MAX_REPLICAS`] in all;
    /// those not named leave the pick, the prefix index and the snapshot.
    /// One task (the pool's resolver) changes a pool's set.
    pub fn set_replicas(&self, addresses: impl IntoIterator<Item = String>) -> Change {
        let current = self.replicas();
        let mut wanted: Vec<String> = Vec::new();
        for address in addresses {
            if !wanted.contains(&address) {
                wanted.push(address);
            }
        }
        let (kept, gone): (Vec<_>, Vec<_>) = current.iter().cloned().partition(|r| wanted.contains(&r.address));
        let new: Vec<String> = wanted.into_iter().filter(|a| !kept.iter().any(|r| &r.address == a)).collect();
        let room = defaults::MAX_REPLICAS.saturating_sub(kept.len());
        let ignored = new.len().saturating_sub(room);
        let joining: Vec<Arc<Replica>> = new
            .into_iter()
            .take(room)
            .map(|address| Arc::new(Replica::new(self.next_id.fetch_add(1, Ordering::Relaxed), address)))
            .collect();
        if gone.is_empty() && joining.is_empty() {
            // The same answer as last time: the set (and the picks reading it) stay untouched.
            return Change { ignored, ..Change::default() };
        }
        // The index first: a pick still holding the old set records nothing
        // for a replica that left, and one on the new set finds its entry.
        if let Ok(mut index) = self.prefix.lock() {
            gone.iter().for_each(|r| index.remove(r.id));
            joining.iter().for_each(|r| index.add(r.id));
        }
        let change = Change {
            added: joining.iter().map(|r| r.address.clone()).collect(),
            removed: gone.iter().map(|r| r.address.clone()).collect(),
            ignored,
        };
        let next: Replicas = kept.into_iter().chain(joining).collect();
        *self.replicas.write().unwrap_or_else(PoisonError::into_inner) = next;
        change
    }

    /// A lookup of the pool's `dns` name failed: its replicas stay as they were.
    pub fn lookup_failed(&self) {
        self.lookup_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Lookups of the pool's `dns` name that failed since start.
    pub fn lookup_failures(&self) -> u64 {
        self.lookup_failures.load(Ordering::Relaxed)
    }

    /// How old a replica's metrics may be for it to be picked.
    pub fn stale_after(&self) -> Duration {
        Duration::from_millis(self.config.stale_after_ms)
    }

    /// Picks the replica for `request`, and fallbacks after it.
    ///
    /// Eligible: ready, in the subset if one is given, serving the model where
    /// that is known, and (with `max_waiting`) not queued past it. The best
    /// by weighted score is counted in flight and recorded as holding the
    /// prompt's blocks.
    pub fn pick(&self, request: &PickRequest, now: Instant) -> Result<Picked, Refusal> {
        let picked = self.choose(request, now);
        if let Err(refusal) = &picked {
            self.refusals[refusal.kind_index()].fetch_add(1, Ordering::Relaxed);
        }
        picked
    }

    fn choose(&self, request: &PickRequest, now: Instant) -> Result<Picked, Refusal> {
        let replicas = self.replicas();
        let mut candidates = self.candidates(&replicas, request, now);
        if candidates.is_empty() {
            return Err(Refusal::NoneReady);
        }
        // Where some replica is known to serve the model, only those may;
        // where none is, those whose models are unknown may try.
        if candidates.iter().any(|c| c.serves == Some(true)) {
            candidates.retain(|c| c.serves == Some(true));
        } else if candidates.iter().any(|c| c.serves.is_none()) {
            candidates.retain(|c| c.serves.is_none());
        } else {
            return Err(Refusal::ModelNotServed);
        }
        if let Some(max_waiting) = self.config.max_waiting {
            candidates.retain(|c| c.waiting < max_waiting);
            if candidates.is_empty() {
                return Err(Refusal::Saturated { retry_after_secs: self.config.retry_after_secs });
            }
        }
        let blocks = if self.weights.prefix > 0.0 {
            block_hashes(request.prompt, self.config.prefix.block_bytes)
        } else {
            Vec::new()
        };
        self.score(&mut candidates, request, &blocks);
        candidates.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.tie_break.cmp(&b.tie_break)));

        let endpoints: Vec<Arc<Replica>> =
            candidates.iter().take(1 + self.config.fallbacks).map(|c| Arc::clone(c.replica)).collect();
        let chosen = &candidates[0];
        endpoints[0].in_flight.fetch_add(1, Ordering::Relaxed);
        endpoints[0].picks.fetch_add(1, Ordering::Relaxed);
        if !blocks.is_empty() {
            let capacity = self.prefix_capacity(chosen.kv_cache_tokens);
            if let Ok(mut index) = self.prefix.lock() {
                index.insert(chosen.replica.id, &blocks, capacity);
            }
        }
        Ok(Picked { endpoints, counted: 0 })
    }

    /// The ready replicas in the subset, with what scoring needs of their state.
    fn candidates<'a>(&self, replicas: &'a [Arc<Replica>], request: &PickRequest, now: Instant) -> Vec<Candidate<'a>> {
        let stale_after = self.stale_after();
        let in_subset = |address: &str| request.subset.is_none_or(|subset| subset.iter().any(|a| a == address));
        replicas
            .iter()
            .filter(|replica| in_subset(&replica.address))
            .filter_map(|replica| {
                let state = replica.state.read().ok()?;
                let metrics = state.fresh_metrics(now, stale_after)?;
                Some(Candidate {
                    replica,
                    in_flight: replica.in_flight(),
                    waiting: metrics.waiting,
                    kv_cache_usage: metrics.kv_cache_usage,
                    kv_cache_tokens: metrics.kv_cache_tokens,
                    adapter_active: metrics.active_loras.contains(request.model),
                    serves: state.serves(request.model, metrics),
                    matched: 0,
                    score: 0.0,
                    tie_break: 0,
                })
            })
            .collect()
    }

    fn score(&self, candidates: &mut [Candidate], request: &PickRequest, blocks: &[u64]) {
        let w = &self.weights;
        let most_in_flight = candidates.iter().map(|c| c.in_flight).max().unwrap_or(0);
        let most_waiting = candidates.iter().map(|c| c.waiting).max().unwrap_or(0);
        let session = request.session.filter(|_| w.session > 0.0);
        let highest_session =
            session.and_then(|s| candidates.iter().map(|c| scorers::session_weight(s, &c.replica.address)).max());
        if !blocks.is_empty() {
            if let Ok(index) = self.prefix.lock() {
                for c in candidates.iter_mut() {
                    c.matched = index.matched(c.replica.id, blocks);
                }
            }
        }
        for c in candidates.iter_mut() {
            let mut score = w.least_requests * scorers::least_requests(c.in_flight, most_in_flight)
                + w.queue * scorers::queue(c.waiting, most_waiting)
                + w.kv_cache * scorers::kv_cache(c.kv_cache_usage)
                + w.lora * scorers::lora(c.adapter_active)
                + w.prefix * scorers::prefix(c.matched, blocks.len());
            if let (Some(session), Some(highest)) = (session, highest_session) {
                let weight = scorers::session_weight(session, &c.replica.address);
                score += w.session * scorers::session(weight, highest);
            }
            if w.random > 0.0 {
                score += w.random * scorers::random();
            }
            c.score = score;
            c.tie_break = fastrand::u64(..);
        }
    }

    /// Blocks the prefix index keeps for a replica: configured, else its KV
    /// cache's tokens as prompt bytes, else a default.
    fn prefix_capacity(&self, kv_cache_tokens: Option<u64>) -> usize {
        let block_bytes = self.config.prefix.block_bytes as u64;
        self.config.prefix.blocks_per_replica.unwrap_or_else(|| {
            kv_cache_tokens.map_or(defaults::BLOCKS_PER_REPLICA, |tokens| {
                usize::try_from(tokens.saturating_mul(defaults::BYTES_PER_TOKEN) / block_bytes).unwrap_or(usize::MAX)
            })
        })
    }

    /// Whether some replica may be picked: one whose metrics were read within
    /// `stale_after_ms`.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.replicas().iter().any(|r| r.is_ready(now, self.stale_after()))
    }

    /// The models and adapters the pool's ready replicas serve, when discovery is on.
    pub fn models(&self) -> BTreeSet<String> {
        let (now, stale_after) = (Instant::now(), self.stale_after());
        let mut models = BTreeSet::new();
        for replica in self.replicas().iter() {
            let Ok(state) = replica.state.read() else { continue };
            let Some(metrics) = state.fresh_metrics(now, stale_after) else { continue };
            models.extend(metrics.active_loras.iter().cloned());
            models.extend(state.models.iter().flatten().cloned());
        }
        models
    }

    /// Requests refused since start, by kind.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::KINDS.iter().zip(&self.refusals).map(|(kind, n)| (*kind, n.load(Ordering::Relaxed)))
    }

    /// The pool as an operator sees it: its settings, and each replica's
    /// readiness, last metrics, requests in flight, picks and models.
    pub fn snapshot(&self, now: Instant) -> Value {
        let stale_after = self.stale_after();
        let index = self.prefix.lock().ok();
        let replicas: Vec<Value> = self
            .replicas()
            .iter()
            .map(|replica| {
                let state = replica.state();
                json!({
                    "address": replica.address,
                    "ready": state.fresh_metrics(now, stale_after).is_some(),
                    "refused": state.refused,
                    "scraped_ms_ago": state.scraped_at.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    "in_flight": replica.in_flight(),
                    "picks": replica.picks(),
                    "prefix_blocks": index.as_ref().map_or(0, |index| index.len(replica.id)),
                    "metrics": state.metrics.map(|m| json!({
                        "running": m.running,
                        "waiting": m.waiting,
                        "kv_cache_usage": m.kv_cache_usage,
                        "active_loras": m.active_loras,
                        "max_loras": m.max_loras,
                        "kv_cache_tokens": m.kv_cache_tokens,
                    })),
                    "models": state.models,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "strategy": self.config.strategy.as_str(),
            "weights": self.weights.named().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "max_waiting": self.config.max_waiting,
            "dns": self.config.dns.as_ref().map(|name| json!({
                "name": name,
                "refresh_ms": self.config.dns_refresh_ms,
                "lookup_failures": self.lookup_failures(),
            })),
            "replicas": replicas,
            "refusals": self.refusals().map(|(k, n)| (k.to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// A replica eligible for one pick, and what scoring needs of it.
struct Candidate<'a> {
    replica: &'a Arc<Replica>,
    in_flight: u64,
    waiting: u64,
    kv_cache_usage: f64,
    kv_cache_tokens: Option<u64>,
    adapter_active: bool,
    serves: Option<bool>,
    /// Leading blocks of the prompt it probably holds.
    matched: usize,
    score: f64,
    tie_break: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PoolsFile, Strategy};

    const A: &str = "10.0.0.1:8000";
    const B: &str = "10.0.0.2:8000";
    const C: &str = "10.0.0.3:8000";

    fn pool(extra: &str) -> Pool {
        let json = format!(r#"{{"pools":{{"p":{{"replicas":["{A}","{B}","{C}"]{extra}}}}}}}"#);
        let (name, config) = PoolsFile::from_json(json.as_bytes()).unwrap().pools.pop_first().unwrap();
        Pool::new(name, config).unwrap()
    }

    /// Every replica freshly scraped, idle.
    fn ready(pool: &Pool, now: Instant) {
        for replica in pool.replicas().iter() {
            set(replica, now, ReplicaMetrics::default());
        }
    }

    fn set(replica: &Replica, at: Instant, metrics: ReplicaMetrics) {
        replica.update(|s| {
            s.metrics = Some(metrics);
            s.scraped_at = Some(at);
        });
    }

    fn replica(pool: &Pool, address: &str) -> Arc<Replica> {
        Arc::clone(pool.replicas().iter().find(|r| r.address == address).unwrap())
    }

    fn ask(model: &str) -> PickRequest<'_> {
        PickRequest { model, ..PickRequest::default() }
    }

    #[test]
    fn stale_or_never_scraped_replicas_are_not_picked() {
        let pool = pool(r#","stale_after_ms":500"#);
        let now = Instant::now();
        assert_eq!(pool.pick(&ask("m"), now).unwrap_err(), Refusal::NoneReady, "nothing scraped yet");
        set(&replica(&pool, A), now, ReplicaMetrics::default());
        set(&replica(&pool, B), now - Duration::from_millis(400), ReplicaMetrics::default());
        set(&replica(&pool, C), now - Duration::from_millis(600), ReplicaMetrics::default());
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            seen.insert(pool.pick(&ask("m"), now).unwrap().primary().to_owned());
        }
        assert_eq!(seen, [A, B].map(String::from).into(), "C's metrics are too old");
        assert!(!replica(&pool, C).is_ready(now, Duration::from_millis(500)));
        replica(&pool, B).update(|s| s.refused = true);
        for _ in 0..10 {
            assert_eq!(pool.pick(&ask("m"), now).unwrap().primary(), A, "B refused its last read");
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(pool.pick(&ask("m"), later).unwrap_err(), Refusal::NoneReady);
        let err = Refusal::NoneReady.to_error("p", "m");
        assert_eq!(err.status, 503);
    }

    #[test]
    fn least_requests_counts_in_flight_and_releases_it() {
        let pool = pool(r#","strategy":"least_requests","fallbacks":0"#);
        let now = Instant::now();
        ready(&pool, now);
        let held: Vec<Picked> = (0..3).map(|_| pool.pick(&ask("m"), now).unwrap()).collect();
        let firsts: BTreeSet<&str> = held.iter().map(|p| p.primary()).collect();
        assert_eq!(firsts.len(), 3, "each request went to an idle replica");
        assert!(pool.replicas().iter().all(|r| r.in_flight() == 1));
        let b_again = held.into_iter().filter(|p| p.primary() != B).collect::<Vec<_>>();
        assert_eq!(replica(&pool, B).in_flight(), 0, "a dropped pick releases its replica");
        assert_eq!(pool.pick(&ask("m"), now).unwrap().primary(), B);
        drop(b_again);
        assert!(pool.replicas().iter().all(|r| r.in_flight() == 0));
    }

    #[test]
    fn fallbacks_follow_in_score_order_and_served_moves_the_count() {
        let pool = pool(r#","strategy":"combined","fallbacks":2"#);
        let now = Instant::now();
        set(&replica(&pool, A), now, ReplicaMetrics { waiting: 5, ..Default::default() });
        set(&replica(&pool, B), now, ReplicaMetrics::default());
        set(&replica(&pool, C), now, ReplicaMetrics { waiting: 2, ..Default::default() });
        let mut picked = pool.pick(&ask("m"), now).unwrap();
        assert_eq!(picked.destination(), format!("{B},{C},{A}"));
        assert_eq!(replica(&pool, B).in_flight(), 1);
        picked.served(C);
        assert_eq!((replica(&pool, B).in_flight(), replica(&pool, C).in_flight()), (0, 1));
        picked.served("10.9.9.9:1");
        assert_eq!(picked.primary(), C, "an address not offered changes nothing");
        drop(picked);
        assert_eq!(replica(&pool, C).in_flight(), 0);

        let pool = pool_with_fallbacks(1);
        ready(&pool, now);
        assert_eq!(pool.pick(&ask("m"), now).unwrap().destination().split(',').count(), 2);
    }

    fn pool_with_fallbacks(n: usize) -> Pool {
        pool(&format!(r#","fallbacks":{n}"#))
    }

    #[test]
    fn sheds_only_when_every_replica_is_queued_past_the_limit() {
        let pool = pool(r#","max_waiting":4,"retry_after_secs":3"#);
        let now = Instant::now();
        let queued = ReplicaMetrics { waiting: 4, ..Default::default() };
        set(&replica(&pool, A), now, queued.clone());
        set(&replica(&pool, B), now, queued.clone());
        set(&replica(&pool, C), now, ReplicaMetrics { waiting: 3, ..Default::default() });
        for _ in 0..10 {
            assert_eq!(pool.pick(&ask("m"), now).unwrap().destination(), C, "only the replica below the limit");
        }
        set(&replica(&pool, C), now, queued);
        let refusal = pool.pick(&ask("m"), now).unwrap_err();
        assert_eq!(refusal, Refusal::Saturated { retry_after_secs: 3 });
        assert_eq!((refusal.to_error("p", "m").status, refusal.retry_after_secs()), (429, Some(3)));
        assert_eq!(pool.refusals().find(|(k, _)| *k == "saturated").unwrap().1, 1);
    }

    #[test]
    fn the_subset_hint_limits_the_choice() {
        let pool = pool("");
        let now = Instant::now();
        ready(&pool, now);
        let subset = vec![C.to_owned()];
        for _ in 0..10 {
            let request = PickRequest { model: "m", subset: Some(&subset), ..PickRequest::default() };
            assert_eq!(pool.pick(&request, now).unwrap().destination(), C);
        }
        let elsewhere = vec!["10.9.9.9:1".to_owned()];
        let request = PickRequest { model: "m", subset: Some(&elsewhere), ..PickRequest::default() };
        assert_eq!(pool.pick(&request, now).unwrap_err(), Refusal::NoneReady);
    }

    #[test]
    fn only_replicas_serving_the_model_are_picked() {
        let pool = pool(r#","discover_models":true"#);
        let now = Instant::now();
        ready(&pool, now);
        let models = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect());
        replica(&pool, A).update(|s| s.models = models(&["base", "base-sql"]));
        replica(&pool, B).update(|s| s.models = models(&["base"]));
        replica(&pool, C).update(|s| s.models = models(&["base"]));
        for _ in 0..10 {
            assert_eq!(pool.pick(&ask("base-sql"), now).unwrap().destination(), A);
        }
        assert_eq!(pool.pick(&ask("nowhere"), now).unwrap_err(), Refusal::ModelNotServed);
        assert_eq!(Refusal::ModelNotServed.to_error("p", "nowhere").status, 404);
        assert_eq!(pool.models(), ["base", "base-sql"].map(String::from).into());

        // Without discovery, an adapter a replica is running is enough to know.
        let plain = self::pool("");
        ready(&plain, now);
        let running = ReplicaMetrics { active_loras: ["chat".to_owned()].into(), ..Default::default() };
        set(&replica(&plain, B), now, running);
        for _ in 0..10 {
            assert_eq!(plain.pick(&ask("chat"), now).unwrap().primary(), B);
        }
        assert_eq!(plain.pick(&ask("base"), now).unwrap().destination().split(',').count(), 3);
    }

    #[test]
    fn a_prompt_returns_to_the_replica_holding_its_prefix() {
        let pool = pool(r#","strategy":"prefix_cache","prefix":{"block_bytes":16}"#);
        let now = Instant::now();
        ready(&pool, now);
        let system = "You are a careful assistant who answers in French. ".repeat(4);
        let prompt =
            |turn: &str| format!(r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{turn}"}}]"#);
        let first = prompt("Bonjour");
        let chosen =
            pool.pick(&PickRequest { model: "m", prompt: first.as_bytes(), ..Default::default() }, now).unwrap();
        let home = chosen.primary().to_owned();
        drop(chosen);
        for turn in ["Merci", "Au revoir"] {
            let next = prompt(turn);
            let picked =
                pool.pick(&PickRequest { model: "m", prompt: next.as_bytes(), ..Default::default() }, now).unwrap();
            assert_eq!(picked.primary(), home);
        }
    }

    #[test]
    fn a_session_stays_on_its_replica() {
        let pool = pool(r#","session_header":"x-session-id""#);
        let now = Instant::now();
        ready(&pool, now);
        let request = PickRequest { model: "m", session: Some(b"user-7"), ..PickRequest::default() };
        let home = pool.pick(&request, now).unwrap().primary().to_owned();
        for _ in 0..10 {
            assert_eq!(pool.pick(&request, now).unwrap().primary(), home);
        }
    }

    #[test]
    fn random_spreads_over_every_replica() {
        let pool = pool(r#","strategy":"random""#);
        assert_eq!(pool.config().strategy, Strategy::Random);
        let now = Instant::now();
        ready(&pool, now);
        let seen: BTreeSet<String> =
            (0..200).map(|_| pool.pick(&ask("m"), now).unwrap().primary().to_owned()).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn kv_cache_use_counts() {
        let pool = pool(r#","weights":{"least_requests":0,"queue":0,"prefix":0,"session":0}"#);
        let now = Instant::now();
        set(&replica(&pool, A), now, ReplicaMetrics { kv_cache_usage: 0.9, ..Default::default() });
        set(&replica(&pool, B), now, ReplicaMetrics { kv_cache_usage: 0.1, ..Default::default() });
        set(&replica(&pool, C), now, ReplicaMetrics { kv_cache_usage: 0.5, ..Default::default() });
        assert_eq!(pool.pick(&ask("m"), now).unwrap().destination(), format!("{B},{C},{A}"));
    }

    #[test]
    fn a_bad_configuration_is_refused() {
        let refused = |extra: &str| {
            let json = format!(r#"{{"pools":{{"p":{{"replicas":["{A}"]{extra}}}}}}}"#);
            let (name, config) = PoolsFile::from_json(json.as_bytes()).unwrap().pools.pop_first().unwrap();
            Pool::new(name, config).is_err()
        };
        assert!(!refused(""));
        assert!(refused(r#","weights":{"queue":-1}"#));
        assert!(refused(r#","prefix":{"block_bytes":0}"#));
        assert!(refused(r#","scrape_interval_ms":0"#));
        let json = format!(r#"{{"pools":{{"p":{{"replicas":["{A}","{A}"]}}}}}}"#);
        assert!(crate::Pools::from_json(json.as_bytes()).is_err());
    }

    fn dns_pool() -> Pool {
        let json = r#"{"pools":{"p":{"dns":"vllm.example:8000","strategy":"least_requests","fallbacks":1}}}"#;
        let (name, config) = PoolsFile::from_json(json.as_bytes()).unwrap().pools.pop_first().unwrap();
        Pool::new(name, config).unwrap()
    }

    fn addresses(pool: &Pool) -> Vec<String> {
        pool.replicas().iter().map(|r| r.address.clone()).collect()
    }

    fn set_of(addresses: &[&str]) -> Vec<String> {
        addresses.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn replicas_join_not_ready_and_leave_the_pick() {
        let pool = dns_pool();
        let now = Instant::now();
        assert!(addresses(&pool).is_empty(), "nothing until the first lookup");
        assert_eq!(pool.pick(&ask("m"), now).unwrap_err(), Refusal::NoneReady);

        let change = pool.set_replicas(set_of(&[B, A]));
        assert_eq!(change, Change { added: set_of(&[B, A]), removed: vec![], ignored: 0 });
        assert_eq!(pool.pick(&ask("m"), now).unwrap_err(), Refusal::NoneReady, "not ready before a scrape");
        ready(&pool, now);
        let kept = replica(&pool, A);

        let change = pool.set_replicas(set_of(&[A, C]));
        assert_eq!(change, Change { added: set_of(&[C]), removed: set_of(&[B]), ignored: 0 });
        assert_eq!(addresses(&pool), [A, C], "a kept replica keeps its place, new ones follow");
        assert!(Arc::ptr_eq(&kept, &replica(&pool, A)), "and its state");
        for _ in 0..10 {
            assert_eq!(pool.pick(&ask("m"), now).unwrap().primary(), A, "B left; C is not scraped yet");
        }
        let snapshot = pool.snapshot(now);
        let listed: Vec<&str> =
            snapshot["replicas"].as_array().unwrap().iter().map(|r| r["address"].as_str().unwrap()).collect();
        assert_eq!(listed, [A, C]);
        assert_eq!(snapshot["dns"]["name"], "vllm.example:8000");

        assert!(pool.set_replicas(set_of(&[C, A, A])).is_empty(), "the same set again changes nothing");
        let change = pool.set_replicas(Vec::new());
        assert_eq!(change.removed, set_of(&[A, C]));
        assert!(addresses(&pool).is_empty());
        assert_eq!(pool.pick(&ask("m"), now).unwrap_err(), Refusal::NoneReady);
    }

    #[test]
    fn a_request_on_a_replica_that_left_ends_cleanly() {
        let pool = dns_pool();
        let now = Instant::now();
        pool.set_replicas(set_of(&[A, B]));
        ready(&pool, now);
        let mut held: Vec<Picked> = (0..2).map(|_| pool.pick(&ask("m"), now).unwrap()).collect();
        let on_a = held.iter().position(|p| p.primary() == A).unwrap();
        let gone = replica(&pool, A);
        assert_eq!(gone.in_flight(), 1);

        pool.set_replicas(set_of(&[B]));
        pool.set_replicas(set_of(&[A, B]));
        let back = replica(&pool, A);
        assert!(!Arc::ptr_eq(&gone, &back), "back at the same address, it is a new replica");
        assert_eq!(back.in_flight(), 0);
        assert!(!back.is_ready(now, pool.stale_after()), "not ready before its first scrape");

        let mut request = held.remove(on_a);
        request.served(B);
        assert_eq!((gone.in_flight(), replica(&pool, B).in_flight()), (0, 2), "served moves the count off it");
        drop(request);
        drop(held);
        assert_eq!((gone.in_flight(), back.in_flight(), replica(&pool, B).in_flight()), (0, 0, 0));
    }

    #[test]
    fn a_replica_that_left_takes_its_prefix_blocks_along() {
        let pool = pool(r#","strategy":"prefix_cache","prefix":{"block_bytes":4}"#);
        let now = Instant::now();
        ready(&pool, now);
        let prompt = b"AAAABBBBCCCC";
        let home = pool.pick(&PickRequest { model: "m", prompt, ..Default::default() }, now).unwrap();
        let home = home.primary().to_owned();
        let held = |pool: &Pool| {
            pool.snapshot(now)["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["prefix_blocks"].as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!(held(&pool), 3);
        let others: Vec<String> = [A, B, C].iter().filter(|a| **a != home).map(|a| a.to_string()).collect();
        pool.set_replicas(others.clone());
        pool.set_replicas([others, vec![home]].concat());
        assert_eq!(held(&pool), 0, "it came back knowing nothing");
    }

    #[test]
    fn a_pool_holds_at_most_256_replicas() {
        let pool = dns_pool();
        let many: Vec<String> = (0..300).map(|i| format!("10.1.{}.{}:8000", i / 256, i % 256)).collect();
        let change = pool.set_replicas(many.clone());
        assert_eq!((change.added.len(), change.ignored), (256, 44));
        let change = pool.set_replicas(many[100..].to_vec());
        assert_eq!((pool.replicas().len(), change.ignored), (200, 0), "room again: every address is a replica");

        let listed: Vec<String> = many.iter().take(257).map(|a| format!("{a:?}")).collect();
        let json = format!(r#"{{"pools":{{"p":{{"replicas":[{}]}}}}}}"#, listed.join(","));
        let error = crate::Pools::from_json(json.as_bytes()).unwrap_err();
        assert!(error.contains("at most 256"), "{error}");
    }

    #[test]
    fn a_pool_takes_exactly_one_of_replicas_and_dns() {
        let error = |pool: &str| {
            let json = format!(r#"{{"pools":{{"p":{{{pool}}}}}}}"#);
            crate::Pools::from_json(json.as_bytes()).unwrap_err()
        };
        assert!(error(&format!(r#""replicas":["{A}"],"dns":"vllm:8000""#)).contains("not both"));
        assert!(error("").contains("`replicas`"));
        assert!(error(r#""dns":"vllm""#).contains("host:port"));
        assert!(error(r#""dns":":8000""#).contains("host:port"));
        assert!(error(r#""dns":"vllm:http""#).contains("host:port"));
        assert!(error(r#""dns":"vllm:8000","dns_refresh_ms":0"#).contains("dns_refresh_ms"));
        assert!(error(r#""dns":"vllm:8000""#.replace("dns", "dns ").as_str()).contains("unknown field"));
        let json = r#"{"pools":{"p":{"dns":"[fd00::1]:8000"}}}"#;
        assert_eq!(crate::Pools::from_json(json.as_bytes()).unwrap().get("p").unwrap().config().dns_refresh_ms, 5000);
    }

    #[test]
    fn the_snapshot_shows_each_replica() {
        let pool = pool("");
        let now = Instant::now();
        set(&replica(&pool, A), now, ReplicaMetrics { running: 2, ..Default::default() });
        let picked = pool.pick(&ask("m"), now).unwrap();
        let snapshot = pool.snapshot(now);
        assert_eq!(snapshot["strategy"], "combined");
        assert_eq!(snapshot["replicas"][0]["ready"], true);
        assert_eq!(snapshot["replicas"][0]["in_flight"], 1);
        assert_eq!(snapshot["replicas"][0]["metrics"]["running"], 2);
        assert_eq!(snapshot["replicas"][1]["ready"], false);
        assert_eq!(snapshot["replicas"][1]["metrics"], Value::Null);
        drop(picked);
    }
}
