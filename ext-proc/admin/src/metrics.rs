//! The admin port's Prometheus metrics: requests, errors, tokens, cost and
//! timings per key, model and backend, as the usage records tell them.
//! Requests, errors, tokens and cost are also split by `traffic`: a client's
//! own (`interactive`) or a batch's lines (`batch`). An answer served from the
//! gateway's store (a cache hit, an idempotent repeat) is a request like any
//! other, but its tokens are counted apart, as cached, and it costs nothing.
//!
//! Counters are registered without their `_total`, which the encoder adds.

use modelgate_proto::usage::{Refused, UsageRecord};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whole requests: from a fast refusal to a long generation.
const DURATION_BUCKETS: [f64; 15] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
/// Time to first token: a warm cache's prefill to a long queue.
const TTFT_BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0];
/// Gaps between a stream's chunks: a fast decode step to a stalled one.
const ITL_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    model: String,
    backend: String,
    key: String,
    traffic: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    backend: String,
    key: String,
    status: u16,
    traffic: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    model: String,
    backend: String,
}

impl ErrorLabels {
    fn of(labels: &KeyLabels, status: u16) -> Self {
        ErrorLabels {
            model: labels.model.clone(),
            backend: labels.backend.clone(),
            key: labels.key.clone(),
            status,
            traffic: labels.traffic,
        }
    }
}

type Histograms = Family<BackendLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    /// Locked only to add a collector and for a scrape: the counters themselves are atomics.
    registry: Mutex<Registry>,
    requests: Family<KeyLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    prompt_tokens: Family<KeyLabels, Counter>,
    completion_tokens: Family<KeyLabels, Counter>,
    cached_tokens: Family<KeyLabels, Counter>,
    without_usage: Family<BackendLabels, Counter>,
    cost_usd: Family<KeyLabels, Counter<f64, AtomicU64>>,
    duration: Histograms,
    ttft: Histograms,
    itl: Histograms,
    rejected_records: Counter,
    dropped_records: Counter,
    limit_store_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            errors: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            cached_tokens: Family::default(),
            without_usage: Family::default(),
            cost_usd: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            ttft: Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS)),
            itl: Family::new_with_constructor(|| Histogram::new(ITL_BUCKETS)),
            rejected_records: Counter::default(),
            dropped_records: Counter::default(),
            limit_store_errors: Counter::default(),
        };
        let r = m.registry.get_mut().unwrap_or_else(PoisonError::into_inner);
        r.register("modelgate_requests", "Requests answered", m.requests.clone());
        r.register("modelgate_errors", "Requests answered with a status of 400 or more", m.errors.clone());
        r.register("modelgate_prompt_tokens", "Prompt tokens, as backends reported them", m.prompt_tokens.clone());
        r.register(
            "modelgate_completion_tokens",
            "Completion tokens, as backends reported them",
            m.completion_tokens.clone(),
        );
        r.register(
            "modelgate_cached_tokens",
            "Tokens of answers served from the gateway's store (cache hits and idempotent repeats): served, not \
             used, in neither prompt nor completion tokens",
            m.cached_tokens.clone(),
        );
        r.register(
            "modelgate_answers_without_usage",
            "Successful answers that reported no usage (a client gone mid-stream, a backend that ignores \
             include_usage): their tokens are counted nowhere",
            m.without_usage.clone(),
        );
        r.register(
            "modelgate_cost_usd",
            "Cost of the tokens at the configured prices, in US dollars",
            m.cost_usd.clone(),
        );
        r.register(
            "modelgate_request_duration_seconds",
            "From a request's first byte to its answer's last",
            m.duration.clone(),
        );
        r.register(
            "modelgate_time_to_first_token_seconds",
            "From a stream's request to its first chunk",
            m.ttft.clone(),
        );
        r.register(
            "modelgate_inter_token_latency_seconds",
            "Gaps between a stream's consecutive chunks",
            m.itl.clone(),
        );
        r.register(
            "modelgate_usage_records_rejected",
            "Usage record lines that did not parse",
            m.rejected_records.clone(),
        );
        r.register(
            "modelgate_usage_records_dropped",
            "Usage records the gateway dropped: a worker's outbox was full while this port did not take them",
            m.dropped_records.clone(),
        );
        r.register(
            "modelgate_limit_store_errors",
            "Calls to the shared limit store that failed",
            m.limit_store_errors.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts one record; its cost, if any, must be finite and not negative
    /// (counters only go up).
    pub fn record(&self, record: &UsageRecord) {
        let labels = KeyLabels {
            model: record.model.clone(),
            backend: record.backend.clone(),
            key: record.key.clone(),
            traffic: record.traffic.as_str(),
        };
        self.requests.get_or_create(&labels).inc();
        if record.status >= 400 {
            self.errors.get_or_create(&ErrorLabels::of(&labels, record.status)).inc();
        }
        match (record.usage, record.served_from) {
            (Some(usage), Some(_)) => {
                self.cached_tokens.get_or_create(&labels).inc_by(usage.total());
            }
            (Some(usage), None) => {
                self.prompt_tokens.get_or_create(&labels).inc_by(usage.prompt_tokens);
                self.completion_tokens.get_or_create(&labels).inc_by(usage.completion_tokens);
            }
            (None, _) => {}
        }
        if let (Some(cost), None) = (record.cost_usd, record.served_from) {
            self.cost_usd.get_or_create(&labels).inc_by(cost);
        }
        let timings = BackendLabels { model: labels.model, backend: labels.backend };
        if record.usage.is_none() && record.status < 400 {
            self.without_usage.get_or_create(&timings).inc();
        }
        self.duration.get_or_create(&timings).observe(seconds(record.latency_us));
        if record.stream {
            if let Some(ttft) = record.ttft_us {
                self.ttft.get_or_create(&timings).observe(seconds(ttft));
            }
            if !record.itl_us.is_empty() {
                let itl = self.itl.get_or_create(&timings);
                for gap in &record.itl_us {
                    itl.observe(seconds(*gap));
                }
            }
        }
    }

    /// Counts requests the gateway refused before any backend: requests and
    /// errors, as their records would have been (they have no timings).
    pub fn refused(&self, refused: &Refused) {
        let labels = KeyLabels {
            model: refused.model.clone(),
            backend: String::new(),
            key: refused.key.clone(),
            traffic: refused.traffic.as_str(),
        };
        self.requests.get_or_create(&labels).inc_by(refused.count);
        if refused.status >= 400 {
            self.errors.get_or_create(&ErrorLabels::of(&labels, refused.status)).inc_by(refused.count);
        }
    }

    pub fn records_dropped(&self, records: u64) {
        self.dropped_records.inc_by(records);
    }

    pub fn records_rejected(&self, lines: u64) {
        self.rejected_records.inc_by(lines);
    }

    pub fn limit_store_error(&self) {
        self.limit_store_errors.inc();
    }

    /// Metrics read at each scrape from a collector.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner).register_collector(collector);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::gate::ReplaySource;
    use modelgate_proto::usage::{Traffic, Usage};

    fn lines(text: &str, prefix: &str) -> Vec<String> {
        text.lines().filter(|l| l.starts_with(prefix)).map(str::to_string).collect()
    }

    /// The same, in order: a family's series come in no particular order.
    fn sorted_lines(text: &str, prefix: &str) -> Vec<String> {
        let mut lines = lines(text, prefix);
        lines.sort();
        lines
    }

    #[test]
    fn a_record_becomes_exact_counters_and_histograms() {
        let m = Metrics::default();
        let stream = UsageRecord {
            request_id: "r1".into(),
            at_ms: 1,
            key: "alice".into(),
            model: "gpt-4o".into(),
            model_served: true,
            backend: "vllm".into(),
            status: 200,
            stream: true,
            usage: Some(Usage { prompt_tokens: 12, completion_tokens: 30 }),
            cost_usd: Some(0.5),
            latency_us: 1_500_000,
            ttft_us: Some(200_000),
            itl_us: vec![1_000, 40_000, 40_000],
            traffic: Traffic::Interactive,
            ..UsageRecord::default()
        };
        m.record(&stream);
        m.record(&UsageRecord { status: 429, usage: None, cost_usd: Some(0.25), stream: false, ..stream.clone() });
        m.records_rejected(3);
        m.records_dropped(4);
        m.limit_store_error();
        let text = m.encode();
        let key = r#"{model="gpt-4o",backend="vllm",key="alice",traffic="interactive"}"#;
        assert_eq!(lines(&text, "modelgate_requests_total"), [format!("modelgate_requests_total{key} 2")]);
        assert_eq!(
            lines(&text, "modelgate_errors_total"),
            [
                r#"modelgate_errors_total{model="gpt-4o",backend="vllm",key="alice",status="429",traffic="interactive"} 1"#
            ]
        );
        assert_eq!(lines(&text, "modelgate_prompt_tokens_total"), [format!("modelgate_prompt_tokens_total{key} 12")]);
        assert_eq!(
            lines(&text, "modelgate_completion_tokens_total"),
            [format!("modelgate_completion_tokens_total{key} 30")]
        );
        assert_eq!(lines(&text, "modelgate_cost_usd_total"), [format!("modelgate_cost_usd_total{key} 0.75")]);
        assert_eq!(
            lines(&text, "modelgate_usage_records_rejected_total"),
            ["modelgate_usage_records_rejected_total 3"]
        );
        assert_eq!(lines(&text, "modelgate_limit_store_errors_total"), ["modelgate_limit_store_errors_total 1"]);
        assert_eq!(lines(&text, "modelgate_usage_records_dropped_total"), ["modelgate_usage_records_dropped_total 4"]);

        let timing = r#"model="gpt-4o",backend="vllm""#;
        assert!(text.contains(&format!("modelgate_request_duration_seconds_count{{{timing}}} 2\n")), "{text}");
        assert!(text.contains(&format!("modelgate_request_duration_seconds_sum{{{timing}}} 3.0\n")), "{text}");
        assert!(
            text.contains(&format!("modelgate_request_duration_seconds_bucket{{le=\"1.0\",{timing}}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("modelgate_request_duration_seconds_bucket{{le=\"2.5\",{timing}}} 2\n")),
            "{text}"
        );
        // Only the stream has a first token and gaps.
        assert!(text.contains(&format!("modelgate_time_to_first_token_seconds_count{{{timing}}} 1\n")), "{text}");
        assert!(
            text.contains(&format!("modelgate_time_to_first_token_seconds_bucket{{le=\"0.1\",{timing}}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("modelgate_time_to_first_token_seconds_bucket{{le=\"0.25\",{timing}}} 1\n")),
            "{text}"
        );
        assert!(text.contains(&format!("modelgate_inter_token_latency_seconds_count{{{timing}}} 3\n")), "{text}");
        assert!(
            text.contains(&format!("modelgate_inter_token_latency_seconds_bucket{{le=\"0.001\",{timing}}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("modelgate_inter_token_latency_seconds_bucket{{le=\"0.05\",{timing}}} 3\n")),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_batchs_lines_are_counted_apart_from_the_keys_own_requests() {
        let m = Metrics::default();
        let own = UsageRecord {
            key: "k".into(),
            model: "m".into(),
            backend: "b".into(),
            status: 200,
            usage: Some(Usage { prompt_tokens: 5, completion_tokens: 1 }),
            ..UsageRecord::default()
        };
        m.record(&own);
        m.record(&UsageRecord { traffic: Traffic::Batch, ..own.clone() });
        m.record(&UsageRecord { traffic: Traffic::Batch, ..own });
        let text = m.encode();
        assert_eq!(
            sorted_lines(&text, "modelgate_prompt_tokens_total"),
            [
                r#"modelgate_prompt_tokens_total{model="m",backend="b",key="k",traffic="batch"} 10"#,
                r#"modelgate_prompt_tokens_total{model="m",backend="b",key="k",traffic="interactive"} 5"#
            ]
        );
    }

    #[test]
    fn answers_served_from_the_store_count_their_tokens_as_cached_and_cost_nothing() {
        let m = Metrics::default();
        let used = UsageRecord {
            key: "k".into(),
            model: "m".into(),
            backend: "b".into(),
            status: 200,
            usage: Some(Usage { prompt_tokens: 5, completion_tokens: 2 }),
            cost_usd: Some(0.5),
            ..UsageRecord::default()
        };
        m.record(&used);
        m.record(&UsageRecord { served_from: Some(ReplaySource::Cache), cost_usd: None, ..used.clone() });
        m.record(&UsageRecord { served_from: Some(ReplaySource::Idempotency), ..used });
        let text = m.encode();
        let labels = r#"{model="m",backend="b",key="k",traffic="interactive"}"#;
        assert_eq!(lines(&text, "modelgate_requests_total"), [format!("modelgate_requests_total{labels} 3")]);
        assert_eq!(lines(&text, "modelgate_prompt_tokens_total"), [format!("modelgate_prompt_tokens_total{labels} 5")]);
        assert_eq!(
            lines(&text, "modelgate_completion_tokens_total"),
            [format!("modelgate_completion_tokens_total{labels} 2")]
        );
        assert_eq!(
            lines(&text, "modelgate_cached_tokens_total"),
            [format!("modelgate_cached_tokens_total{labels} 14")]
        );
        assert_eq!(lines(&text, "modelgate_cost_usd_total"), [format!("modelgate_cost_usd_total{labels} 0.5")]);
    }

    #[test]
    fn refusals_count_as_requests_and_errors_without_timings() {
        let m = Metrics::default();
        let refused = Refused {
            key: "k".into(),
            model: "m".into(),
            model_served: true,
            status: 429,
            count: 7,
            ..Refused::default()
        };
        m.refused(&refused);
        m.refused(&Refused { traffic: Traffic::Batch, count: 2, ..refused });
        let text = m.encode();
        assert_eq!(
            sorted_lines(&text, "modelgate_requests_total"),
            [
                r#"modelgate_requests_total{model="m",backend="",key="k",traffic="batch"} 2"#,
                r#"modelgate_requests_total{model="m",backend="",key="k",traffic="interactive"} 7"#
            ]
        );
        assert_eq!(
            sorted_lines(&text, "modelgate_errors_total"),
            [
                r#"modelgate_errors_total{model="m",backend="",key="k",status="429",traffic="batch"} 2"#,
                r#"modelgate_errors_total{model="m",backend="",key="k",status="429",traffic="interactive"} 7"#
            ]
        );
        assert!(lines(&text, "modelgate_request_duration_seconds_count").is_empty(), "{text}");
    }

    #[test]
    fn names_and_label_values_from_clients_cannot_break_the_exposition() {
        let m = Metrics::default();
        m.record(&UsageRecord { model: "a\"} evil 1\n".into(), status: 200, ..UsageRecord::default() });
        let text = m.encode();
        assert!(
            text.contains(
                r#"modelgate_requests_total{model="a\"} evil 1\n",backend="",key="",traffic="interactive"} 1"#
            ),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with(" evil")), "{text}");
    }

    #[test]
    fn unpriced_and_unstreamed_records_add_no_cost_or_stream_timings() {
        let m = Metrics::default();
        m.record(&UsageRecord { status: 200, ttft_us: Some(5), itl_us: vec![1], ..UsageRecord::default() });
        let text = m.encode();
        assert!(lines(&text, "modelgate_cost_usd_total").is_empty(), "{text}");
        assert!(lines(&text, "modelgate_time_to_first_token_seconds_count").is_empty(), "{text}");
        assert!(lines(&text, "modelgate_inter_token_latency_seconds_count").is_empty(), "{text}");
        assert!(lines(&text, "modelgate_errors_total").is_empty(), "{text}");
        // That answer reported no usage: its tokens are counted nowhere, and this says so.
        assert_eq!(
            lines(&text, "modelgate_answers_without_usage_total"),
            [r#"modelgate_answers_without_usage_total{model="",backend=""} 1"#]
        );
        m.record(&UsageRecord { status: 503, ..UsageRecord::default() });
        assert_eq!(
            lines(&m.encode(), "modelgate_answers_without_usage_total"),
            [r#"modelgate_answers_without_usage_total{model="",backend=""} 1"#],
            "an error has no usage to miss"
        );
    }
}
