//! The endpoint picker on ext-proc's admin port:
//!
//! - `GET /v1/pools`: each pool as the picker sees it (settings, and each
//!   replica's readiness, last metrics, requests in flight, picks, models),
//!   for callers presenting the internal token, as the other admin paths
//!   that are not metrics.
//! - In `/metrics`, through [`PoolMetrics`]: picks per replica, refusals per
//!   kind, requests in flight and readiness. Every label comes from the pools
//!   file (pool, replica address) or is one of a fixed set (refusal kind),
//!   so the series are bounded.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use modelgate_admin::routes::{error_response, only};
use modelgate_pools::Pools;
use modelgate_proto::headers::INTERNAL_TOKEN;
use modelgate_runtime::internal_token::InternalToken;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

struct PoolsApi {
    pools: Arc<Pools>,
    token: InternalToken,
}

pub fn router(pools: Arc<Pools>, token: InternalToken) -> Router {
    Router::new()
        .route("/v1/pools", get(get_pools).fallback(only("GET")))
        .with_state(Arc::new(PoolsApi { pools, token }))
}

async fn get_pools(State(api): State<Arc<PoolsApi>>, headers: HeaderMap) -> Response {
    if let Err(refused) = api.token.check(headers.get(INTERNAL_TOKEN).map(|v| v.as_bytes())) {
        return error_response(&refused);
    }
    Json(snapshot(&api.pools, Instant::now())).into_response()
}

fn snapshot(pools: &Pools, now: Instant) -> Value {
    json!({"object": "list", "data": pools.iter().map(|pool| pool.snapshot(now)).collect::<Vec<_>>()})
}

/// The picker's counters, read from the pools at each scrape.
#[derive(Debug)]
pub struct PoolMetrics(pub Arc<Pools>);

impl Collector for PoolMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let replicas = || self.0.iter().flat_map(|pool| pool.replicas().iter().map(move |replica| (pool, replica)));
        let mut family = encoder.encode_descriptor(
            "modelgate_pool_picks",
            "Requests the endpoint picker sent to a replica first",
            None,
            MetricType::Counter,
        )?;
        for (pool, replica) in replicas() {
            let labels = [("pool", pool.name()), ("replica", replica.address.as_str())];
            ConstCounter::new(replica.picks()).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "modelgate_pool_in_flight",
            "Requests the endpoint picker sent to a replica that have not ended",
            None,
            MetricType::Gauge,
        )?;
        for (pool, replica) in replicas() {
            let labels = [("pool", pool.name()), ("replica", replica.address.as_str())];
            ConstGauge::new(replica.in_flight()).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "modelgate_pool_replica_ready",
            "1 while a replica's metrics are fresh (it may be picked), else 0",
            None,
            MetricType::Gauge,
        )?;
        for (pool, replica) in replicas() {
            let labels = [("pool", pool.name()), ("replica", replica.address.as_str())];
            let ready = u64::from(replica.is_ready(now, pool.stale_after()));
            ConstGauge::new(ready).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "modelgate_pool_refusals",
            "Requests the endpoint picker refused, by why: saturated (429), none_ready (503), model_not_served (404)",
            None,
            MetricType::Counter,
        )?;
        for pool in self.0.iter() {
            for (kind, count) in pool.refusals() {
                let labels = [("pool", pool.name()), ("reason", kind)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_pools::pool::PickRequest;
    use prometheus_client::registry::Registry;

    fn pools() -> Arc<Pools> {
        let file = br#"{"pools":{"p":{"replicas":["10.0.0.1:8000","10.0.0.2:8000"],"strategy":"least_requests"}}}"#;
        let pools = Pools::from_json(file).unwrap();
        let replica = &pools.get("p").unwrap().replicas()[0];
        replica.update(|state| {
            state.metrics = Some(Default::default());
            state.scraped_at = Some(Instant::now());
        });
        Arc::new(pools)
    }

    #[test]
    fn the_metrics_count_picks_in_flight_readiness_and_refusals_by_configured_labels() {
        let pools = pools();
        let pool = pools.get("p").unwrap();
        let picked = pool.pick(&PickRequest { model: "m", ..Default::default() }, Instant::now()).unwrap();
        assert_eq!(picked.primary(), "10.0.0.1:8000", "the only ready replica");
        pool.replicas()[0].update(|state| state.scraped_at = None);
        assert!(pool.pick(&PickRequest { model: "m", ..Default::default() }, Instant::now()).is_err());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(PoolMetrics(Arc::clone(&pools))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"modelgate_pool_picks_total{pool="p",replica="10.0.0.1:8000"} 1"#,
            r#"modelgate_pool_picks_total{pool="p",replica="10.0.0.2:8000"} 0"#,
            r#"modelgate_pool_in_flight{pool="p",replica="10.0.0.1:8000"} 1"#,
            r#"modelgate_pool_replica_ready{pool="p",replica="10.0.0.1:8000"} 0"#,
            r#"modelgate_pool_refusals_total{pool="p",reason="none_ready"} 1"#,
            r#"modelgate_pool_refusals_total{pool="p",reason="saturated"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        drop(picked);
    }

    #[test]
    fn the_snapshot_lists_every_pool_and_its_replicas() {
        let snapshot = snapshot(&pools(), Instant::now());
        assert_eq!(snapshot["object"], "list");
        let pool = &snapshot["data"][0];
        assert_eq!(pool["name"], "p");
        let ready: Vec<&Value> = pool["replicas"].as_array().unwrap().iter().map(|r| &r["ready"]).collect();
        assert_eq!(ready, [&json!(true), &json!(false)]);
    }
}
