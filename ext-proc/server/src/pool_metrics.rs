//! The endpoint picker's counters in the admin port's `/metrics`: picks per
//! replica, refusals per kind, requests in flight, readiness, and failed
//! lookups of a pool's name. Every label comes from the pools file (pool,
//! replica address), from a pool's name's answers (replica address: at most
//! 256 per pool, and gone with the replica) or is one of a fixed set (refusal
//! kind), so the series are bounded.

use modelgate_pools::Pools;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::sync::Arc;
use std::time::Instant;

/// The picker's counters, read from the pools at each scrape.
#[derive(Debug)]
pub struct PoolMetrics(pub Arc<Pools>);

impl Collector for PoolMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        // One set per pool for the whole scrape, so every family lists the same replicas.
        let sets: Vec<_> = self.0.iter().map(|pool| (pool, pool.replicas())).collect();
        let replicas = || sets.iter().flat_map(|(pool, set)| set.iter().map(move |replica| (*pool, replica)));
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
        let mut family = encoder.encode_descriptor(
            "modelgate_pool_dns_lookup_failures",
            "Lookups of a dns pool's name that failed or gave no address (its replicas stayed as they were)",
            None,
            MetricType::Counter,
        )?;
        for pool in self.0.iter().filter(|pool| pool.config().dns.is_some()) {
            ConstCounter::new(pool.lookup_failures()).encode(family.encode_family(&[("pool", pool.name())])?)?;
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
    fn a_replica_that_left_leaves_the_metrics_and_failed_lookups_are_counted() {
        let pools = Pools::from_json(br#"{"pools":{"d":{"dns":"vllm:8000"}}}"#).unwrap();
        let pool = pools.get("d").unwrap();
        pool.set_replicas(["10.0.0.1:8000".to_owned(), "10.0.0.2:8000".to_owned()]);
        pool.set_replicas(["10.0.0.2:8000".to_owned()]);
        pool.lookup_failed();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(PoolMetrics(Arc::new(pools))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("10.0.0.1:8000"), "{text}");
        for line in [
            r#"modelgate_pool_picks_total{pool="d",replica="10.0.0.2:8000"} 0"#,
            r#"modelgate_pool_dns_lookup_failures_total{pool="d"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
