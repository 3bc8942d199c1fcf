//! How a simulated backend behaves: set at start-up, and overridable per
//! request with `x-sim-*` headers so one process can serve many test cases.

use crate::engine::EngineConfig;
use crate::failure::ErrorFormat;
use axum::http::HeaderMap;
use clap::Parser;
use std::net::SocketAddr;
use std::time::Duration;

/// An OpenAI/vLLM-like LLM backend that answers instantly-generated text.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Name of this backend, returned in the `x-sim-backend` response header.
    #[arg(long, default_value = "simulator")]
    pub name: String,
    /// A model this backend serves (repeatable). With none, any model is accepted.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Time to first token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Time between tokens, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub itl_ms: u64,
    /// Tokens generated when the request sets no lower max_tokens.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: u32,
    /// Length of embedding vectors when the request sets no `dimensions`.
    #[arg(long, default_value_t = 16)]
    pub embedding_dim: usize,
    /// Answer requests with this HTTP status instead of a completion.
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Fraction of requests (0 to 1) that get `fail_status`.
    #[arg(long, default_value_t = 1.0)]
    pub fail_rate: f64,
    /// Abort streams (reset the connection) after this many content chunks.
    #[arg(long)]
    pub abort_after: Option<u32>,
    /// Shape of injected error answers.
    #[arg(long, value_enum, default_value_t = ErrorFormat::Vllm)]
    pub error_format: ErrorFormat,
    /// `retry-after` seconds sent with injected error answers.
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// Prompt tokens reported as read from the prompt cache (Anthropic face).
    #[arg(long, default_value_t = 0)]
    pub cached_tokens: u32,
    /// Compress injected error answers with gzip when the request accepts it.
    #[arg(long)]
    pub gzip_errors: bool,
    /// Bytes of each string argument of a tool call (Ollama face), so that a
    /// test can send one NDJSON line of any length; "simulated" without it.
    #[arg(long)]
    pub tool_argument_bytes: Option<usize>,
    /// The longest prompt and answer together, as `/tokenize` reports it.
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: u64,
    /// KV-cache size in tokens; the default is large enough never to fill.
    #[arg(long, default_value_t = 1 << 24)]
    pub kv_cache_tokens: u64,
    /// Tokens per KV-cache block, the unit of prefix caching.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: u32,
    /// Sequences running at once; later requests wait, first in first out.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: u64,
    /// Prefill time per prompt token not found in the prefix cache, in microseconds.
    #[arg(long, default_value_t = 0)]
    pub prefill_us_per_token: u64,
    /// How much each other running sequence slows decoding: the time between
    /// tokens is `itl-ms × (1 + decode-slowdown × (running − 1))`.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub decode_slowdown: f64,
    /// Adapters that may run in one batch, as vLLM's `--max-loras` (shown in `vllm:lora_requests_info`).
    #[arg(long, default_value_t = 1)]
    pub max_loras: u32,
    /// Time a LoRA adapter takes to load, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub lora_load_ms: u64,
    /// Serve OpenAI's Responses API (`/v1/responses`), as a recent vLLM does;
    /// without it the path is a 404, as on engines that serve chat completions only.
    #[arg(long)]
    pub responses_api: bool,
    /// The first this many adapter loads fail with a 503, to test retries.
    #[arg(long, default_value_t = 0)]
    pub lora_load_failures: u32,
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("`{text}` is not a finite number of at least 0")),
    }
}

/// The behaviour for one request: the settings, with any `x-sim-*` header applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub ttft: Duration,
    pub itl: Duration,
    pub output_tokens: u32,
    pub fail_status: Option<u16>,
    pub fail_rate: f64,
    pub abort_after: Option<u32>,
    pub error_format: ErrorFormat,
    pub retry_after: Option<u64>,
    pub cached_tokens: u32,
    pub gzip_errors: bool,
    pub tool_argument_bytes: Option<usize>,
    /// The gate (crate::gates) a stream waits at after its first token.
    pub gate: Option<String>,
}

impl Settings {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            kv_cache_tokens: self.kv_cache_tokens,
            block_size: self.block_size,
            max_num_seqs: usize::try_from(self.max_num_seqs).unwrap_or(usize::MAX),
            prefill_us_per_token: self.prefill_us_per_token,
            decode_slowdown: self.decode_slowdown,
        }
    }

    /// With `x-sim-only: NAME`, the `x-sim-*` headers apply only on the backend
    /// of that name: a test can fail the first backend of a fallback chain and
    /// not the ones the gateway retries on.
    pub fn behaviour(&self, headers: &HeaderMap) -> Behaviour {
        let only = headers.get("x-sim-only").and_then(|v| v.to_str().ok()).map(str::trim);
        let applies = only.is_none_or(|name| name == self.name);
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|_| applies);
        let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
        Behaviour {
            ttft: Duration::from_millis(number("x-sim-ttft-ms").unwrap_or(self.ttft_ms)),
            itl: Duration::from_millis(number("x-sim-itl-ms").unwrap_or(self.itl_ms)),
            output_tokens: number("x-sim-output-tokens").map_or(self.output_tokens, |n| n.min(u32::MAX as u64) as u32),
            fail_status: number("x-sim-fail-status").and_then(|s| u16::try_from(s).ok()).or(self.fail_status),
            fail_rate: get("x-sim-fail-rate").and_then(|v| v.parse().ok()).unwrap_or(self.fail_rate),
            abort_after: number("x-sim-abort-after").map(|n| n.min(u32::MAX as u64) as u32).or(self.abort_after),
            error_format: get("x-sim-error-format").and_then(ErrorFormat::parse).unwrap_or(self.error_format),
            retry_after: number("x-sim-retry-after").or(self.retry_after),
            cached_tokens: number("x-sim-cached-tokens").map_or(self.cached_tokens, |n| n.min(u32::MAX as u64) as u32),
            gzip_errors: get("x-sim-gzip-errors").map_or(self.gzip_errors, |v| v == "true" || v == "1"),
            tool_argument_bytes: number("x-sim-tool-argument-bytes")
                .and_then(|n| usize::try_from(n).ok())
                .or(self.tool_argument_bytes),
            gate: get("x-sim-gate").map(str::to_string),
        }
    }
}

impl Behaviour {
    /// The status to fail this request with, if it is one of the unlucky ones.
    pub fn injected_failure(&self) -> Option<u16> {
        self.fail_status.filter(|_| fastrand::f64() < self.fail_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_flags_are_checked() {
        assert_eq!(Settings::parse_from(["sim", "--decode-slowdown", "0.5"]).engine().decode_slowdown, 0.5);
        for bad in
            [["--decode-slowdown", "-1"], ["--decode-slowdown", "inf"], ["--block-size", "0"], ["--max-num-seqs", "0"]]
        {
            assert!(Settings::try_parse_from(["sim", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers_override_settings() {
        let settings = Settings::parse_from(["sim", "--ttft-ms", "5", "--fail-status", "503", "--fail-rate", "0"]);
        let mut headers = HeaderMap::new();
        assert_eq!(settings.behaviour(&headers).ttft, Duration::from_millis(5));
        assert_eq!(settings.behaviour(&headers).injected_failure(), None);
        headers.insert("x-sim-ttft-ms", "50".parse().unwrap());
        headers.insert("x-sim-fail-status", "429".parse().unwrap());
        headers.insert("x-sim-fail-rate", "1".parse().unwrap());
        headers.insert("x-sim-abort-after", "3".parse().unwrap());
        let b = settings.behaviour(&headers);
        assert_eq!((b.ttft, b.abort_after, b.injected_failure()), (Duration::from_millis(50), Some(3), Some(429)));
        headers.insert("x-sim-only", "another-backend".parse().unwrap());
        assert_eq!(settings.behaviour(&headers).ttft, Duration::from_millis(5), "meant for another backend");
        headers.insert("x-sim-only", "simulator".parse().unwrap());
        assert_eq!(settings.behaviour(&headers).ttft, Duration::from_millis(50));
    }
}
