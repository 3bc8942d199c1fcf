//! A pool as ext-proc's `--pools` file (JSON) describes it. Unknown keys are
//! refused, so a typo fails at start, not silently at run time.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsFile {
    /// Pools by name: the name a backend's `pool` gives in the filter's configuration.
    pub pools: BTreeMap<String, PoolConfig>,
}

impl PoolsFile {
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let file: PoolsFile = serde_json::from_slice(bytes).map_err(|e| format!("invalid pools configuration: {e}"))?;
        for (name, pool) in &file.pools {
            pool.membership().map_err(|e| format!("invalid pools configuration: pool `{name}`: {e}"))?;
        }
        Ok(file)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The replicas, as `ip:port`: the addresses Envoy's cluster for the pool
    /// lists, since the picker's header names one of them. Exactly one of
    /// this and `dns`.
    #[serde(default)]
    pub replicas: Option<Vec<String>>,
    /// A name (`host:port`) whose addresses are the replicas, re-resolved
    /// every `dns_refresh_ms`: a headless Service publishes one per ready pod.
    #[serde(default)]
    pub dns: Option<String>,
    #[serde(default = "defaults::dns_refresh_ms")]
    pub dns_refresh_ms: u64,
    /// How replicas are scored; see [`Strategy`].
    #[serde(default)]
    pub strategy: Strategy,
    /// Scorer weights replacing the strategy's, one by one.
    #[serde(default)]
    pub weights: Weights,
    /// How often each replica's metrics are read.
    #[serde(default = "defaults::scrape_interval_ms")]
    pub scrape_interval_ms: u64,
    /// Metrics older than this (or a replica that stopped answering) make a
    /// replica not ready: it is not picked while another is.
    #[serde(default = "defaults::stale_after_ms")]
    pub stale_after_ms: u64,
    /// The path of the replicas' Prometheus metrics.
    #[serde(default = "defaults::metrics_path")]
    pub metrics_path: String,
    /// Shed load: when every ready replica has at least this many requests
    /// waiting, a request is refused with a 429. Unset: never shed.
    #[serde(default)]
    pub max_waiting: Option<u64>,
    /// The `retry-after` (seconds) of a shed request.
    #[serde(default = "defaults::retry_after_secs")]
    pub retry_after_secs: u64,
    /// Replicas named after the chosen one, for Envoy to retry on.
    #[serde(default = "defaults::fallbacks")]
    pub fallbacks: usize,
    /// The request header whose value keeps a session on one replica (the
    /// `session` scorer). Its value is only hashed, never kept.
    #[serde(default)]
    pub session_header: Option<String>,
    /// Take the pool's models (and loaded LoRA adapters) from its replicas'
    /// `/v1/models`, read every `models_interval_ms`.
    #[serde(default)]
    pub discover_models: bool,
    #[serde(default = "defaults::models_interval_ms")]
    pub models_interval_ms: u64,
    #[serde(default)]
    pub prefix: PrefixConfig,
}

/// Where a pool's replicas come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership<'a> {
    /// A fixed list of `ip:port`.
    Listed(&'a [String]),
    /// The addresses of a name, looked up again and again.
    Dns { name: &'a str, refresh_ms: u64 },
}

impl PoolConfig {
    /// Where its replicas come from: exactly one of `replicas` and `dns`,
    /// `dns` as `host:port`.
    pub fn membership(&self) -> Result<Membership<'_>, String> {
        match (&self.replicas, &self.dns) {
            (Some(replicas), None) => Ok(Membership::Listed(replicas)),
            (None, Some(name)) => {
                let valid = name
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0));
                if !valid {
                    return Err(format!("`dns` must be `host:port`, not `{name}`"));
                }
                if self.dns_refresh_ms == 0 {
                    return Err("`dns_refresh_ms` must be above 0".into());
                }
                Ok(Membership::Dns { name, refresh_ms: self.dns_refresh_ms })
            }
            (Some(_), Some(_)) => Err("give either `replicas` or `dns`, not both".into()),
            (None, None) => Err("give its replicas: `replicas` (a list of `ip:port`) or `dns` (`host:port`)".into()),
        }
    }
}

/// The scorers' weights as a whole: each is a preset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A uniformly random replica: the baseline.
    Random,
    /// The replica with the fewest requests in flight (the picker's own count).
    LeastRequests,
    /// The replica most likely to hold the prompt's prefix in its KV cache.
    PrefixCache,
    /// Every scorer, weighted: prefix affinity, queue depth, KV-cache use,
    /// requests in flight and LoRA affinity.
    #[default]
    Combined,
}

impl Strategy {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::LeastRequests => "least_requests",
            Strategy::PrefixCache => "prefix_cache",
            Strategy::Combined => "combined",
        }
    }
}

/// One weight per scorer; unset ones take the strategy's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub least_requests: Option<f64>,
    pub queue: Option<f64>,
    pub kv_cache: Option<f64>,
    pub prefix: Option<f64>,
    pub lora: Option<f64>,
    pub session: Option<f64>,
    pub random: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefixConfig {
    /// Prompt bytes per block of the index: a prefix is matched block by block.
    pub block_bytes: usize,
    /// Blocks remembered per replica before the least recently used go (an
    /// estimate of its KV cache). Unset: from the replica's
    /// `vllm:cache_config_info`, or a default while that is unknown.
    pub blocks_per_replica: Option<usize>,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig { block_bytes: defaults::BLOCK_BYTES, blocks_per_replica: None }
    }
}

pub(crate) mod defaults {
    /// Replicas a pool holds at most: their addresses are metric labels, so a
    /// name answering with thousands must not make thousands of series.
    pub const MAX_REPLICAS: usize = 256;
    pub const BLOCK_BYTES: usize = 256;
    /// Blocks remembered per replica while its KV cache's size is unknown:
    /// 4 MiB of prompts at the default block size.
    pub const BLOCKS_PER_REPLICA: usize = 16_384;
    /// Prompt bytes per token, to turn a KV cache's tokens into prompt bytes.
    pub const BYTES_PER_TOKEN: u64 = 4;
    pub fn scrape_interval_ms() -> u64 {
        50
    }
    pub fn stale_after_ms() -> u64 {
        500
    }
    pub fn metrics_path() -> String {
        "/metrics".into()
    }
    pub fn retry_after_secs() -> u64 {
        1
    }
    pub fn fallbacks() -> usize {
        2
    }
    pub fn models_interval_ms() -> u64 {
        1000
    }
    pub fn dns_refresh_ms() -> u64 {
        5000
    }
}
