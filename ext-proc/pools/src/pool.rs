//! A pool's replicas, their state, and the pick.

use crate::config::PoolConfig;
use crate::metrics::ReplicaMetrics;
use modelgate_proto::error::GatewayError;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pool {
    name: String,
    config: PoolConfig,
    replicas: Vec<Arc<Replica>>,
}

/// One replica: its address, what its last scrape said, and the requests
/// the picker sent it that have not ended.
#[derive(Debug)]
pub struct Replica {
    pub address: String,
    state: RwLock<ReplicaState>,
    in_flight: AtomicU64,
}

/// What the scrapers know of a replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaState {
    pub metrics: Option<ReplicaMetrics>,
    /// When the last successful scrape ended.
    pub scraped_at: Option<Instant>,
    /// The models and adapters its `/v1/models` lists, when discovery is on.
    pub models: Option<BTreeSet<String>>,
}

/// What a request asks of the picker.
#[derive(Debug, Default)]
pub struct PickRequest<'a> {
    /// The model as the replica will see it (after any rename).
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
        Replica { address, state: RwLock::default(), in_flight: AtomicU64::new(0) }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
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
        let replicas = config.replicas.iter().map(|a| Arc::new(Replica::new(a.clone()))).collect();
        Ok(Pool { name, config, replicas })
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

    /// Picks the replica for `request`, and fallbacks after it.
    pub fn pick(&self, request: &PickRequest, now: Instant) -> Result<Picked, Refusal> {
        let _ = (request, now);
        let best = self.replicas.iter().min_by_key(|r| r.in_flight()).ok_or(Refusal::NoneReady)?;
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Picked { endpoints: vec![Arc::clone(best)], counted: 0 })
    }

    /// Whether some replica may be picked: one whose metrics were read within
    /// `stale_after_ms`.
    pub fn is_ready(&self, now: Instant) -> bool {
        let stale_after = Duration::from_millis(self.config.stale_after_ms);
        self.replicas
            .iter()
            .any(|r| r.state().scraped_at.is_some_and(|at| now.saturating_duration_since(at) <= stale_after))
    }

    /// The models and adapters the pool's ready replicas serve, when discovery is on.
    pub fn models(&self) -> BTreeSet<String> {
        self.replicas.iter().filter_map(|r| r.state().models).flatten().collect()
    }
}
