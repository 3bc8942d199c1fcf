//! How every store kept in Redis (batch metadata, the cache, budgets, usage,
//! shared limits) reaches it: one connection that reconnects by itself, and
//! each call bounded in time.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};
use std::future::Future;
use std::time::Duration;

/// Connects lazily: a Redis that is down at start only fails the calls made
/// while it is. Each reply is awaited at most `reply_timeout`; connecting is
/// given `timeout`, but never under half a second (a handshake's worth).
pub fn connect_lazily(url: &str, timeout: Duration, reply_timeout: Duration) -> RedisResult<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(reply_timeout))
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
        // Back within a second of Redis coming back, however long it was away.
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// Why a call bounded by [`within`] gave no answer.
#[derive(Debug)]
pub enum CallError {
    /// No answer within the time allowed.
    Timeout,
    Redis(RedisError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "no answer from Redis in time"),
            CallError::Redis(e) => write!(f, "Redis: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// One call to Redis, bounded by `timeout`.
pub async fn within<T>(timeout: Duration, call: impl Future<Output = RedisResult<T>>) -> Result<T, CallError> {
    tokio::time::timeout(timeout, call).await.map_err(|_| CallError::Timeout)?.map_err(CallError::Redis)
}
