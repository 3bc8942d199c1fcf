//! What one answered request used: the record the filter sends to ext-proc's
//! admin port, where it becomes metrics and the usage report.
//!
//! The filter batches records (one JSON object per line) and posts them
//! about once a second, so accounting costs no call per request.

use serde::{Deserialize, Serialize};

/// Token counts as the backend reported them in `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// One request, as the gateway answered it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The request's `x-request-id`.
    pub request_id: String,
    /// When the answer ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The client key's name; empty for an open gateway or a refused key. Never the key itself.
    pub key: String,
    /// The model the client asked for; empty when the request never named one.
    pub model: String,
    /// The backend that answered; empty when the gateway answered itself (a refusal).
    pub backend: String,
    /// The HTTP status the client got.
    pub status: u16,
    pub stream: bool,
    /// Tokens, when the answer reported them.
    pub usage: Option<Usage>,
    /// What those tokens cost at the configured prices, in US dollars; none without a price.
    pub cost_usd: Option<f64>,
    /// From the request's first byte to the answer's last, in microseconds.
    pub latency_us: u64,
    /// From the request's first byte to the answer's first body byte (a stream's first chunk).
    pub ttft_us: Option<u64>,
    /// A stream's gaps between consecutive chunks, in microseconds.
    #[serde(default)]
    pub itl_us: Vec<u64>,
}
