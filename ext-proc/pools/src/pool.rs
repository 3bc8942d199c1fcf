//! A pool's replicas, their state, and the pick.

use crate::config::{defaults, PoolConfig};
use crate::metrics::ReplicaMetrics;
use crate::prefix::{block_hashes, PrefixIndex};
use crate::scorers::{self, Resolved};
use modelgate_proto::error::GatewayError;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pool {
    name: String,
    config: PoolConfig,
    replicas: Vec<Arc<Replica>>,
    weights: Resolved,
    /// Locked only to look a prompt's blocks up and to record them.
    prefix: Mutex<PrefixIndex>,
    /// Requests refused, by [`Refusal::kind`].
    refusals: [AtomicU64; Refusal::KINDS.len()],
}

/// One replica: its address, what its last scrape said, and the requests
/// the picker sent it that have not ended.
#[derive(Debug)]
pub struct Replica {
    pub address: String,
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
    pub fn new(address: String) -> Self {
        Replica { address, state: RwLock::default(), in_flight: AtomicU64::new(0), picks: AtomicU64::new(0) }
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
        if config.replicas.is_empty() {
            return Err(format!("pool `{name}` lists no replicas"));
        }
        if let Some(twice) = config.replicas.iter().enumerate().find(|(i, a)| config.replicas[..*i].contains(a)) {
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
        let replicas = config.replicas.iter().map(|a| Arc::new(Replica::new(a.clone()))).collect();
        let prefix = Mutex::new(PrefixIndex::new(config.replicas.len()));
        Ok(Pool { name, config, replicas, weights, prefix, refusals: Default::default() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
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
        let mut candidates = self.candidates(request, now);
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
            candidates.iter().take(1 + self.config.fallbacks).map(|c| Arc::clone(&self.replicas[c.index])).collect();
        let chosen = &candidates[0];
        endpoints[0].in_flight.fetch_add(1, Ordering::Relaxed);
        endpoints[0].picks.fetch_add(1, Ordering::Relaxed);
        if !blocks.is_empty() {
            let capacity = self.prefix_capacity(chosen.kv_cache_tokens);
            if let Ok(mut index) = self.prefix.lock() {
                index.insert(chosen.index, &blocks, capacity);
            }
        }
        Ok(Picked { endpoints, counted: 0 })
    }

    /// The ready replicas in the subset, with what scoring needs of their state.
    fn candidates(&self, request: &PickRequest, now: Instant) -> Vec<Candidate> {
        let stale_after = self.stale_after();
        let in_subset = |address: &str| request.subset.is_none_or(|subset| subset.iter().any(|a| a == address));
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, replica)| in_subset(&replica.address))
            .filter_map(|(index, replica)| {
                let state = replica.state.read().ok()?;
                let metrics = state.fresh_metrics(now, stale_after)?;
                Some(Candidate {
                    index,
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
        let highest_session = session
            .and_then(|s| candidates.iter().map(|c| scorers::session_weight(s, &self.replicas[c.index].address)).max());
        if !blocks.is_empty() {
            if let Ok(index) = self.prefix.lock() {
                for c in candidates.iter_mut() {
                    c.matched = index.matched(c.index, blocks);
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
                let weight = scorers::session_weight(session, &self.replicas[c.index].address);
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
        self.replicas.iter().any(|r| r.is_ready(now, self.stale_after()))
    }

    /// The models and adapters the pool's ready replicas serve, when discovery is on.
    pub fn models(&self) -> BTreeSet<String> {
        let (now, stale_after) = (Instant::now(), self.stale_after());
        let mut models = BTreeSet::new();
        for replica in &self.replicas {
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
            .replicas
            .iter()
            .enumerate()
            .map(|(i, replica)| {
                let state = replica.state();
                json!({
                    "address": replica.address,
                    "ready": state.fresh_metrics(now, stale_after).is_some(),
                    "refused": state.refused,
                    "scraped_ms_ago": state.scraped_at.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    "in_flight": replica.in_flight(),
                    "picks": replica.picks(),
                    "prefix_blocks": index.as_ref().map_or(0, |index| index.len(i)),
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
            "replicas": replicas,
            "refusals": self.refusals().map(|(k, n)| (k.to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// A replica eligible for one pick, and what scoring needs of it.
struct Candidate {
    index: usize,
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
        for replica in pool.replicas() {
            set(replica, now, ReplicaMetrics::default());
        }
    }

    fn set(replica: &Replica, at: Instant, metrics: ReplicaMetrics) {
        replica.update(|s| {
            s.metrics = Some(metrics);
            s.scraped_at = Some(at);
        });
    }

    fn replica<'a>(pool: &'a Pool, address: &str) -> &'a Replica {
        pool.replicas().iter().find(|r| r.address == address).unwrap()
    }

    fn ask(model: &str) -> PickRequest<'_> {
        PickRequest { model, ..PickRequest::default() }
    }

    #[test]
    fn stale_or_never_scraped_replicas_are_not_picked() {
        let pool = pool(r#","stale_after_ms":500"#);
        let now = Instant::now();
        assert_eq!(pool.pick(&ask("m"), now).unwrap_err(), Refusal::NoneReady, "nothing scraped yet");
        set(replica(&pool, A), now, ReplicaMetrics::default());
        set(replica(&pool, B), now - Duration::from_millis(400), ReplicaMetrics::default());
        set(replica(&pool, C), now - Duration::from_millis(600), ReplicaMetrics::default());
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
        set(replica(&pool, A), now, ReplicaMetrics { waiting: 5, ..Default::default() });
        set(replica(&pool, B), now, ReplicaMetrics::default());
        set(replica(&pool, C), now, ReplicaMetrics { waiting: 2, ..Default::default() });
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
        set(replica(&pool, A), now, queued.clone());
        set(replica(&pool, B), now, queued.clone());
        set(replica(&pool, C), now, ReplicaMetrics { waiting: 3, ..Default::default() });
        for _ in 0..10 {
            assert_eq!(pool.pick(&ask("m"), now).unwrap().destination(), C, "only the replica below the limit");
        }
        set(replica(&pool, C), now, queued);
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
        set(replica(&plain, B), now, running);
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
        set(replica(&pool, A), now, ReplicaMetrics { kv_cache_usage: 0.9, ..Default::default() });
        set(replica(&pool, B), now, ReplicaMetrics { kv_cache_usage: 0.1, ..Default::default() });
        set(replica(&pool, C), now, ReplicaMetrics { kv_cache_usage: 0.5, ..Default::default() });
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

    #[test]
    fn the_snapshot_shows_each_replica() {
        let pool = pool("");
        let now = Instant::now();
        set(replica(&pool, A), now, ReplicaMetrics { running: 2, ..Default::default() });
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
