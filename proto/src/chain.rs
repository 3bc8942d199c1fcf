//! A model's fallback chain, as the filter hands it to the stream guard: the
//! backends to try in order, each with its Envoy cluster and its profile, and
//! the failover settings. The guard tries them one after another until one
//! answers, before any byte reaches the client.
//!
//! Why the guard and not Envoy's own retries: each attempt may need another
//! body (another model name, another dialect), and Envoy 1.40 does not apply
//! an upstream filter's body changes to a retried attempt (it replays the
//! first attempt's body). Envoy still balances, health-checks and ejects the
//! hosts of each backend's cluster; the guard only moves between clusters.

use crate::backend::BackendProfile;
use crate::config::FailoverConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub backend: String,
    pub cluster: String,
    /// `None` for a backend whose requests pass untouched.
    pub profile: Option<BackendProfile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chain {
    /// In the order they are tried.
    pub members: Vec<Member>,
    /// How the guard moves from one member to the next: the configuration's.
    pub failover: FailoverConfig,
    /// The client asked for a stream, so the answer must be one: said here by
    /// the filter, which has read the body, so the guard need not read it again.
    #[serde(default)]
    pub stream: bool,
}

/// A chain's header values, written once when the configuration is read: one
/// for whole requests, one for streams.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainHeaders {
    pub whole: String,
    pub streamed: String,
}

impl ChainHeaders {
    /// The header value for a request that asks for a stream or not.
    pub fn for_request(&self, stream: bool) -> &str {
        if stream {
            &self.streamed
        } else {
            &self.whole
        }
    }
}

impl Chain {
    /// The chain as the value of the internal header.
    pub fn to_header(&self) -> String {
        // Strings, numbers and JSON values always serialise.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Both header values of this chain, whole and streamed.
    pub fn headers(mut self) -> ChainHeaders {
        self.stream = false;
        let whole = self.to_header();
        self.stream = true;
        ChainHeaders { whole, streamed: self.to_header() }
    }

    pub fn from_header(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    /// True when an answer with `status` is to be tried again on the next backend.
    pub fn retries_on(&self, status: u16) -> bool {
        self.failover.retry_on_status.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Dialect;

    #[test]
    fn a_chain_round_trips_through_its_header() {
        let anthropic =
            BackendProfile { dialect: Dialect::Anthropic, model: Some("claude".into()), ..Default::default() };
        let chain = Chain {
            members: vec![
                Member { backend: "pool".into(), cluster: "pool".into(), profile: None },
                Member { backend: "anthropic".into(), cluster: "anthropic_api".into(), profile: Some(anthropic) },
            ],
            failover: FailoverConfig {
                per_try_timeout_ms: 30_000,
                retry_on_status: vec![429, 503],
                retry_budget_percent: 20,
                min_retry_concurrency: 10,
            },
            stream: false,
        };
        let read = Chain::from_header(chain.to_header().as_bytes()).unwrap();
        assert_eq!(read, chain);
        assert!(read.retries_on(429) && !read.retries_on(400));
        let headers = chain.clone().headers();
        assert_eq!(headers.for_request(false), chain.to_header());
        let streamed = Chain::from_header(headers.for_request(true).as_bytes()).unwrap();
        assert_eq!(streamed, Chain { stream: true, ..chain });
    }
}
