//! Self-hosted pools: several replicas (vLLM, SGLang) serving the same
//! models, and the endpoint picker that chooses, per request, the replica
//! that will answer fastest.
//!
//! - [`config`]: a pool as ext-proc's `--pools` file describes it.
//! - [`metrics`]: what a replica's Prometheus metrics say about its load.
//! - [`prefix`]: which replica probably holds which prompt prefix in its KV cache.
//! - [`scorers`]: each scorer, pure, over one replica's state.
//! - [`pool`]: a pool's replicas and their state; [`pool::Pool::pick`].
//! - [`request`]: what a request body tells the picker (model, prompt), read once.
//! - [`scrape`]: the background tasks that keep each replica's state fresh,
//!   and a `dns` pool's set of replicas current.
//! - [`operations`]: LoRA adapters loaded and unloaded on a pool's replicas.
//! - [`api`]: those operations, and the models pools discovered, on ext-proc's admin port.
//!
//! Picking is synchronous and takes no lock held across I/O: the scrapers
//! write each replica's state, and a pick reads it.

pub mod api;
pub mod config;
pub mod metrics;
pub mod operations;
pub mod pool;
pub mod prefix;
pub mod request;
pub mod scorers;
pub mod scrape;

use config::PoolsFile;
use pool::Pool;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Every configured pool, by name.
#[derive(Debug, Default)]
pub struct Pools {
    pools: BTreeMap<String, Arc<Pool>>,
}

impl Pools {
    /// The pools of a `--pools` file (JSON).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("reading the pools file {}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        Self::from_config(PoolsFile::from_json(bytes)?)
    }

    pub fn from_config(file: PoolsFile) -> Result<Self, String> {
        let pools = file
            .pools
            .into_iter()
            .map(|(name, config)| Ok((name.clone(), Arc::new(Pool::new(name, config)?))))
            .collect::<Result<_, String>>()?;
        Ok(Pools { pools })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}
