//! What a replica's Prometheus metrics say about its load: vLLM's names, and
//! SGLang's where they differ.

use std::collections::BTreeSet;

/// One reading of a replica's metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaMetrics {
    /// `vllm:num_requests_running`
    pub running: u64,
    /// `vllm:num_requests_waiting`
    pub waiting: u64,
    /// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`), 0 to 1.
    pub kv_cache_usage: f64,
    /// `vllm:lora_requests_info`'s `running_lora_adapters` and `waiting_lora_adapters`.
    pub active_loras: BTreeSet<String>,
    /// `vllm:lora_requests_info`'s `max_lora`, when given.
    pub max_loras: Option<u64>,
    /// `vllm:cache_config_info`: `num_gpu_blocks` × `block_size`, when given.
    pub kv_cache_tokens: Option<u64>,
}

/// Reads a metrics page (Prometheus or OpenMetrics text). Unknown families
/// are skipped; a page without any known one is an error. Counts are summed
/// over a family's series (one per `model_name`); the KV-cache use is the
/// highest series'.
pub fn parse(text: &str) -> Result<ReplicaMetrics, String> {
    let mut metrics = ReplicaMetrics::default();
    let mut known = false;
    // vLLM keeps every label set `lora_requests_info` ever had, each valued
    // with the time it was set: the newest is the current one.
    let mut newest_lora: Option<f64> = None;
    // The current name wins over the older one when a page has both.
    let mut kv_usage_current = false;
    for line in text.lines() {
        let Some(sample) = Sample::read(line) else { continue };
        match sample.name {
            "vllm:num_requests_running" | "sglang:num_running_reqs" => {
                metrics.running = metrics.running.saturating_add(count(sample.value));
            }
            "vllm:num_requests_waiting" | "sglang:num_queue_reqs" => {
                metrics.waiting = metrics.waiting.saturating_add(count(sample.value));
            }
            "vllm:kv_cache_usage_perc" | "sglang:token_usage" => {
                if !kv_usage_current {
                    metrics.kv_cache_usage = 0.0;
                    kv_usage_current = true;
                }
                metrics.kv_cache_usage = metrics.kv_cache_usage.max(fraction(sample.value));
            }
            "vllm:gpu_cache_usage_perc" => {
                if !kv_usage_current {
                    metrics.kv_cache_usage = metrics.kv_cache_usage.max(fraction(sample.value));
                }
            }
            "vllm:lora_requests_info" => {
                if newest_lora.is_some_and(|newest| sample.value < newest) {
                    continue;
                }
                newest_lora = Some(sample.value);
                metrics.active_loras.clear();
                metrics.max_loras = None;
                for (label, value) in sample.labels() {
                    match label {
                        "running_lora_adapters" | "waiting_lora_adapters" => metrics
                            .active_loras
                            .extend(value.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned)),
                        "max_lora" => metrics.max_loras = value.trim().parse().ok(),
                        _ => {}
                    }
                }
            }
            "vllm:cache_config_info" => {
                let (mut block_size, mut blocks) = (None, None);
                for (label, value) in sample.labels() {
                    match label {
                        "block_size" => block_size = value.trim().parse::<u64>().ok(),
                        "num_gpu_blocks" => blocks = value.trim().parse::<u64>().ok(),
                        _ => {}
                    }
                }
                if let (Some(size), Some(blocks)) = (block_size, blocks) {
                    metrics.kv_cache_tokens = Some(size.saturating_mul(blocks));
                }
            }
            _ => continue,
        }
        known = true;
    }
    if known {
        Ok(metrics)
    } else {
        Err("no vLLM or SGLang metrics on the page".into())
    }
}

/// A gauge read as a count: negative or not a number is 0, beyond u64 saturates.
fn count(value: f64) -> u64 {
    if value.is_nan() || value <= 0.0 {
        0
    } else {
        value as u64
    }
}

fn fraction(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 1.0)
    }
}

/// One sample line: `name{label="value",...} value [timestamp]`.
struct Sample<'a> {
    name: &'a str,
    /// What is between the braces, unparsed until asked.
    labels: &'a str,
    value: f64,
}

impl<'a> Sample<'a> {
    fn read(line: &'a str) -> Option<Self> {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let (name, rest) = line.split_at(name_end);
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(rest) => {
                let end = closing_brace(rest)?;
                (&rest[..end], &rest[end + 1..])
            }
            None => ("", rest),
        };
        let value = rest.split_whitespace().next()?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            _ => value.parse().ok()?,
        };
        Some(Sample { name, labels, value })
    }

    /// The labels, values unescaped only as far as the picker needs: an
    /// adapter name or a number never holds a quote or a backslash.
    fn labels(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut rest = self.labels;
        std::iter::from_fn(move || {
            rest = rest.trim_start_matches([',', ' ']);
            let eq = rest.find('=')?;
            let name = rest[..eq].trim();
            let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
            let end = closing_quote(after)?;
            let value = &after[..end];
            rest = &after[end + 1..];
            Some((name, value))
        })
    }
}

/// Where the unquoted `}` closing a label set is.
fn closing_brace(labels: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

/// Where the unescaped `"` closing a label value is.
fn closing_quote(value: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-8b"} 3.0
vllm:num_requests_running{engine="0",model_name="other"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-8b"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3-8b"} 0.42
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen3-8b"} 0.9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql, chat",waiting_lora_adapters="math"} 1.8e9
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="1000"} 1.0
vllm:prompt_tokens_total{model_name="qwen3-8b"} 12345
"#;

    #[test]
    fn reads_vllm_names_summing_over_models() {
        let m = parse(VLLM).unwrap();
        assert_eq!(m.running, 4);
        assert_eq!(m.waiting, 7);
        assert_eq!(m.kv_cache_usage, 0.42, "the current name wins over the older one");
        assert_eq!(m.active_loras, ["chat", "math", "sql"].map(String::from).into(), "the newest label set");
        assert_eq!(m.max_loras, Some(4));
        assert_eq!(m.kv_cache_tokens, Some(16_000));
    }

    #[test]
    fn reads_the_older_kv_cache_name_and_sglang() {
        let m = parse("vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n").unwrap();
        assert_eq!(m.kv_cache_usage, 0.25);
        let m = parse("sglang:num_running_reqs{model_name=\"m\"} 5\nsglang:num_queue_reqs 2 1700000000\nsglang:token_usage 0.5\n# EOF\n").unwrap();
        assert_eq!((m.running, m.waiting, m.kv_cache_usage), (5, 2, 0.5));
    }

    #[test]
    fn a_page_without_known_families_is_an_error() {
        assert!(parse("").is_err());
        assert!(parse("<html>not metrics</html>").is_err());
        assert!(parse("process_cpu_seconds_total 3\n").is_err());
    }

    #[test]
    fn odd_values_are_bounded() {
        let m = parse("vllm:num_requests_running -3\nvllm:num_requests_waiting NaN\nvllm:kv_cache_usage_perc +Inf\n")
            .unwrap();
        assert_eq!((m.running, m.waiting, m.kv_cache_usage), (0, 0, 1.0));
        let m = parse("vllm:num_requests_waiting{a=\"}\\\"\"} 1e30\nvllm:num_requests_waiting 1e30\n").unwrap();
        assert_eq!(m.waiting, u64::MAX);
    }

    proptest! {
        #[test]
        fn never_panics(text in "(vllm:[a-z_]{0,24}|sglang:[a-z_]{0,12}|[{}\"=, \\\\#\n.0-9a-zE+-]){0,40}") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_any_text(text in any::<String>()) {
            let _ = parse(&text);
        }
    }
}
