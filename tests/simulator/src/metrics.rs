//! vLLM's Prometheus metrics under their real names, so the gateway's
//! endpoint picker and users' dashboards see what they would see from a real
//! engine. Gauges are read from the engine when scraped; counters count.

use crate::engine::Snapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelName {
    model_name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraInfo {
    max_lora: String,
    running_lora_adapters: String,
    waiting_lora_adapters: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheConfig {
    block_size: String,
    num_gpu_blocks: String,
    enable_prefix_caching: String,
}

type Ratio = Gauge<f64, AtomicU64>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    running: Family<ModelName, Gauge>,
    waiting: Family<ModelName, Gauge>,
    kv_cache_usage: Family<ModelName, Ratio>,
    gpu_cache_usage: Family<ModelName, Ratio>,
    lora_info: Family<LoraInfo, Ratio>,
    cache_config: Family<CacheConfig, Gauge>,
    prefix_queries: Family<ModelName, Counter>,
    prefix_hits: Family<ModelName, Counter>,
    prompt_tokens: Family<ModelName, Counter>,
    generation_tokens: Family<ModelName, Counter>,
    successes: Family<ModelName, Counter>,
    max_loras: u32,
}

impl Metrics {
    pub fn new(max_loras: u32) -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            running: Family::default(),
            waiting: Family::default(),
            kv_cache_usage: Family::default(),
            gpu_cache_usage: Family::default(),
            lora_info: Family::default(),
            cache_config: Family::default(),
            prefix_queries: Family::default(),
            prefix_hits: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            successes: Family::default(),
            max_loras,
        };
        let r = &mut m.registry;
        r.register("vllm:num_requests_running", "Requests in the running batch", m.running.clone());
        r.register("vllm:num_requests_waiting", "Requests waiting to be scheduled", m.waiting.clone());
        r.register("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means full", m.kv_cache_usage.clone());
        r.register("vllm:gpu_cache_usage_perc", "KV-cache usage (older name), 1 means full", m.gpu_cache_usage.clone());
        r.register(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests; the value is when this was last updated",
            m.lora_info.clone(),
        );
        r.register("vllm:cache_config_info", "Information of the KV cache's configuration", m.cache_config.clone());
        r.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_queries.clone(),
        );
        r.register("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", m.prefix_hits.clone());
        r.register("vllm:prompt_tokens", "Prefill tokens processed", m.prompt_tokens.clone());
        r.register("vllm:generation_tokens", "Generation tokens processed", m.generation_tokens.clone());
        r.register("vllm:request_success", "Requests finished", m.successes.clone());
        m
    }

    /// Counts a request's prompt tokens, and those found in the prefix cache, as it is scheduled.
    pub fn scheduled(&self, model: &str, prompt_tokens: u32, cached_tokens: u32) {
        let label = label(model);
        self.prefix_queries.get_or_create(&label).inc_by(u64::from(prompt_tokens));
        self.prefix_hits.get_or_create(&label).inc_by(u64::from(cached_tokens));
    }

    /// Records a finished request's tokens.
    pub fn finished(&self, model: &str, prompt_tokens: u32, generation_tokens: u32) {
        let label = label(model);
        self.prompt_tokens.get_or_create(&label).inc_by(u64::from(prompt_tokens));
        self.generation_tokens.get_or_create(&label).inc_by(u64::from(generation_tokens));
        self.successes.get_or_create(&label).inc();
    }

    /// The metrics page; `served` are the models shown even before any request.
    pub fn encode(&self, engine: &Snapshot, served: &[String]) -> String {
        let seen = engine.models.iter().map(|(model, counts)| (model.as_str(), *counts));
        let idle = served.iter().filter(|m| !engine.models.contains_key(*m)).map(|m| (m.as_str(), (0, 0)));
        for (model, (running, waiting)) in seen.chain(idle) {
            let label = label(model);
            self.running.get_or_create(&label).set(running as i64);
            self.waiting.get_or_create(&label).set(waiting as i64);
            self.kv_cache_usage.get_or_create(&label).set(engine.kv_cache_usage);
            self.gpu_cache_usage.get_or_create(&label).set(engine.kv_cache_usage);
            // counters show from the start at zero, as vLLM's do
            for counter in [&self.prefix_queries, &self.prefix_hits, &self.prompt_tokens, &self.generation_tokens] {
                let _ = counter.get_or_create(&label);
            }
        }
        self.lora_info.clear();
        let info = LoraInfo {
            max_lora: self.max_loras.to_string(),
            running_lora_adapters: engine.running_adapters.join(","),
            waiting_lora_adapters: engine.waiting_adapters.join(","),
        };
        self.lora_info.get_or_create(&info).set(crate::call::now_f64());
        let config = CacheConfig {
            block_size: engine.block_size.to_string(),
            num_gpu_blocks: engine.num_blocks.to_string(),
            enable_prefix_caching: "True".into(),
        };
        self.cache_config.get_or_create(&config).set(1);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn label(model: &str) -> ModelName {
    ModelName { model_name: model.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn gauges_follow_the_engine_and_tokens_accumulate() {
        let m = Metrics::new(2);
        let engine = Snapshot {
            models: BTreeMap::from([("m1".to_string(), (2, 3))]),
            running_adapters: vec!["a".into(), "b".into()],
            waiting_adapters: vec![],
            kv_cache_usage: 0.25,
            num_blocks: 100,
            block_size: 16,
        };
        m.scheduled("m1", 10, 8);
        m.finished("m1", 3, 5);
        m.finished("m1", 1, 1);
        let text = m.encode(&engine, &["m1".into(), "m2".into()]);
        for line in [
            "vllm:num_requests_running{model_name=\"m1\"} 2",
            "vllm:num_requests_waiting{model_name=\"m1\"} 3",
            "vllm:num_requests_running{model_name=\"m2\"} 0",
            "vllm:kv_cache_usage_perc{model_name=\"m1\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"m1\"} 0.25",
            "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"}",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"100\",enable_prefix_caching=\"True\"} 1",
            "vllm:prefix_cache_queries_total{model_name=\"m1\"} 10",
            "vllm:prefix_cache_hits_total{model_name=\"m1\"} 8",
            "vllm:prompt_tokens_total{model_name=\"m1\"} 4",
            "vllm:generation_tokens_total{model_name=\"m1\"} 6",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
