//! vLLM-style Prometheus metrics, so the gateway's load-aware features and
//! users' dashboards see what they would see from a real engine.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Requests a simulated engine holds before its KV cache counts as full.
const CACHE_SLOTS: f64 = 64.0;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelName {
    model_name: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    running: Family<ModelName, Gauge>,
    waiting: Family<ModelName, Gauge>,
    cache_usage: Family<ModelName, Gauge<f64, AtomicU64>>,
    prompt_tokens: Family<ModelName, Counter>,
    generation_tokens: Family<ModelName, Counter>,
    successes: Family<ModelName, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            running: Family::default(),
            waiting: Family::default(),
            cache_usage: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            successes: Family::default(),
        };
        m.registry.register("vllm:num_requests_running", "Requests being generated", m.running.clone());
        m.registry.register("vllm:num_requests_waiting", "Requests waiting to be scheduled", m.waiting.clone());
        m.registry.register("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 means full", m.cache_usage.clone());
        m.registry.register("vllm:prompt_tokens", "Prefill tokens processed", m.prompt_tokens.clone());
        m.registry.register("vllm:generation_tokens", "Generation tokens processed", m.generation_tokens.clone());
        m.registry.register("vllm:request_success", "Requests finished", m.successes.clone());
        m
    }
}

impl Metrics {
    /// Counts a request as running until the returned guard is dropped.
    pub fn start(&self, model: &str) -> RunningGuard<'_> {
        let label = ModelName { model_name: model.to_string() };
        self.waiting.get_or_create(&label).set(0);
        let now = self.running.get_or_create(&label).inc() + 1;
        self.cache_usage.get_or_create(&label).set((now as f64 / CACHE_SLOTS).min(1.0));
        RunningGuard { metrics: self, label }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub struct RunningGuard<'a> {
    metrics: &'a Metrics,
    label: ModelName,
}

impl RunningGuard<'_> {
    /// Records a finished request's tokens.
    pub fn finish(&self, prompt_tokens: u32, generation_tokens: u32) {
        self.metrics.prompt_tokens.get_or_create(&self.label).inc_by(u64::from(prompt_tokens));
        self.metrics.generation_tokens.get_or_create(&self.label).inc_by(u64::from(generation_tokens));
        self.metrics.successes.get_or_create(&self.label).inc();
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let now = self.metrics.running.get_or_create(&self.label).dec() - 1;
        self.metrics.cache_usage.get_or_create(&self.label).set((now as f64 / CACHE_SLOTS).max(0.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_gauge_follows_guards_and_tokens_accumulate() {
        let m = Metrics::default();
        let a = m.start("m1");
        let b = m.start("m1");
        assert!(m.encode().contains("vllm:num_requests_running{model_name=\"m1\"} 2"), "{}", m.encode());
        a.finish(3, 5);
        drop(a);
        b.finish(1, 1);
        drop(b);
        let text = m.encode();
        assert!(text.contains("vllm:num_requests_running{model_name=\"m1\"} 0"), "{text}");
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"m1\"} 4"), "{text}");
        assert!(text.contains("vllm:generation_tokens_total{model_name=\"m1\"} 6"), "{text}");
    }
}
