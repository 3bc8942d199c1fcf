//! The runner's calls to Envoy's OpenAI listener, each as the batch's owner:
//! the internal token vouches for the on-behalf-of header, so the filter
//! applies that key's allow-list and limits and accounts the call as batch
//! traffic. [`next`] decides what follows an answer: a 429 waits its
//! `retry-after` (pacing, not counted as a try), a retryable failure backs
//! off, up to the configured tries.

use bytes::Bytes;
use modelgate_proto::batch::{LineFailure, LineResponse};
use modelgate_proto::headers;
use serde_json::Value;
use std::time::Duration;

/// Longest a line's call may take: Envoy's routes give a backend 600 s.
const CALL_TIMEOUT: Duration = Duration::from_secs(610);

/// The first backoff after a retryable failure; it doubles each try, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A 429 without `retry-after` waits this long; a longer `retry-after` is cut to [`MAX_BACKOFF`].
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Envoy's listener and the token the runner presents to it.
#[derive(Clone)]
pub struct Gateway {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// What one call gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Called {
    pub answer: Answer,
    /// The answer's `retry-after`, in seconds.
    pub retry_after: Option<Duration>,
    /// The answer's `x-should-retry`.
    pub should_retry: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The gateway answered: its status, request id and body.
    Http(LineResponse),
    /// No answer: the listener unreachable, or the call cut off.
    None(LineFailure),
}

/// What follows an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The line is finished: a success, or a failure that would fail again, or its last try.
    Done,
    /// Try again after this long, counting a try.
    Retry(Duration),
    /// Try again after this long without counting a try: a rate limit pacing the key.
    Wait(Duration),
}

/// What follows `called`, after `tries` tries of at most `max_tries`.
pub fn next(called: &Called, tries: u64, max_tries: u64) -> Next {
    let retryable = match &called.answer {
        Answer::Http(response) if (200..300).contains(&response.status_code) => return Next::Done,
        Answer::Http(response) if response.status_code == 429 && called.should_retry != Some(false) => {
            return Next::Wait(called.retry_after.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_BACKOFF));
        }
        Answer::Http(response) => called.should_retry.unwrap_or(response.status_code >= 500),
        Answer::None(_) => true,
    };
    if !retryable || tries >= max_tries {
        return Next::Done;
    }
    let doubled = FIRST_BACKOFF.saturating_mul(1 << tries.saturating_sub(1).min(16));
    Next::Retry(called.retry_after.unwrap_or(doubled).min(MAX_BACKOFF))
}

fn unreachable(message: String) -> Called {
    let failure = LineFailure { code: "gateway_unreachable".into(), message };
    Called { answer: Answer::None(failure), retry_after: None, should_retry: None }
}

impl Gateway {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| format!("the batch runner's HTTP client: {e}"))?;
        Ok(Gateway { client, base: base.trim_end_matches('/').to_string(), token })
    }

    fn request(&self, method: reqwest::Method, path: &str, owner: &str) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header(headers::INTERNAL_TOKEN, token);
        }
        request.header(headers::ON_BEHALF_OF, owner)
    }

    /// Sends one line's body to `path` as `owner`.
    pub async fn call(&self, path: &str, owner: &str, body: Bytes) -> Called {
        let sent = self
            .request(reqwest::Method::POST, path, owner)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return unreachable(format!("The gateway could not be reached: {e}.")),
        };
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let status_code = response.status().as_u16();
        let request_id = header("x-request-id").unwrap_or_default();
        let retry_after = header("retry-after").and_then(|s| s.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let should_retry = header("x-should-retry").and_then(|s| s.parse::<bool>().ok());
        let body = match response.bytes().await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) => return unreachable(format!("The gateway's answer was cut off: {e}.")),
        };
        Called { answer: Answer::Http(LineResponse { status_code, request_id, body }), retry_after, should_retry }
    }

    /// Whether `owner` may use `model` through the gateway: the filter answers
    /// `/v1/models/{id}` for a model a route serves and the key may use.
    pub async fn serves(&self, model: &str, owner: &str) -> Result<bool, String> {
        let id = percent_encoding::utf8_percent_encode(model, percent_encoding::NON_ALPHANUMERIC);
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/models/{id}"), owner)
            .send()
            .await
            .map_err(|e| format!("the gateway could not be reached: {e}"))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(format!("the gateway answered {status} when asked for the model `{model}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status_code: u16, retry_after: Option<u64>, should_retry: Option<bool>) -> Called {
        let response = LineResponse { status_code, request_id: "r".into(), body: Value::Null };
        Called { answer: Answer::Http(response), retry_after: retry_after.map(Duration::from_secs), should_retry }
    }

    #[test]
    fn a_rate_limit_paces_and_failures_back_off_up_to_the_tries() {
        assert_eq!(next(&answered(200, None, None), 1, 3), Next::Done);
        assert_eq!(next(&answered(429, Some(2), None), 9, 3), Next::Wait(Duration::from_secs(2)));
        assert_eq!(next(&answered(429, Some(3600), None), 1, 3), Next::Wait(MAX_BACKOFF));
        assert_eq!(next(&answered(503, None, None), 1, 3), Next::Retry(FIRST_BACKOFF));
        assert_eq!(next(&answered(503, None, None), 2, 3), Next::Retry(FIRST_BACKOFF * 2));
        assert_eq!(next(&answered(503, None, None), 3, 3), Next::Done);
        assert_eq!(next(&answered(502, None, Some(false)), 1, 3), Next::Done);
        assert_eq!(next(&answered(400, None, None), 1, 3), Next::Done);
        assert_eq!(next(&answered(404, None, None), 1, 3), Next::Done);
        assert_eq!(next(&answered(409, None, Some(true)), 1, 3), Next::Retry(FIRST_BACKOFF));
        assert_eq!(next(&unreachable("down".into()), 1, 3), Next::Retry(FIRST_BACKOFF));
        assert_eq!(next(&unreachable("down".into()), 3, 3), Next::Done);
    }
}
