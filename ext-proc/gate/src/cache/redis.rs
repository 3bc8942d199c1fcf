//! The store in Redis, shared by every gateway pointed at it: each entry one
//! string under `modelgate:<key>`, expiring by Redis's own clock (PX). A
//! claim is taken, completed and let go by one script each, so two gateways
//! never both hold one. Entries leave by their TTL or window; `--cache-max-bytes`
//! does not apply. Redis keeps budgets and usage too, so it is sized, not
//! left to evict (an eviction policy could drop a key's spend for a cached answer).

use super::{Result, StoreError};
use ::redis::aio::ConnectionManager;
use ::redis::{cmd, RedisResult, Script};
use modelgate_runtime::redis_connection::{connect_lazily, within};
use std::future::Future;
use std::time::Duration;

const PREFIX: &str = "modelgate:";

/// KEYS[1]: the record. ARGV: the claim, its lease in ms. Answers what is there, or nil once claimed.
const CLAIM_LUA: &str = r#"
local there = redis.call('GET', KEYS[1])
if there then
  return there
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

/// KEYS[1]: the record. ARGV: the holder's prefix, the answer, its TTL in ms.
const COMPLETE_LUA: &str = r#"
local there = redis.call('GET', KEYS[1])
if (not there) or string.sub(there, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"#;

/// KEYS[1]: the record. ARGV[1]: the holder's prefix.
const RELEASE_LUA: &str = r#"
local there = redis.call('GET', KEYS[1])
if there and string.sub(there, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisStore {
    redis: ConnectionManager,
    timeout: Duration,
    claim: Script,
    complete: Script,
    release: Script,
}

impl RedisStore {
    /// Connects lazily, as the other Redis stores do: a Redis that is down at
    /// start only fails the calls made while it is. Each call is bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> std::result::Result<Self, String> {
        let redis = connect_lazily(url, timeout, timeout).map_err(|e| format!("the cache in Redis at {url}: {e}"))?;
        Ok(RedisStore {
            redis,
            timeout,
            claim: Script::new(CLAIM_LUA),
            complete: Script::new(COMPLETE_LUA),
            release: Script::new(RELEASE_LUA),
        })
    }

    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Result<T> {
        within(self.timeout, call).await.map_err(|e| StoreError(e.to_string()))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut redis = self.redis.clone();
        self.bounded(cmd("GET").arg(format!("{PREFIX}{key}")).query_async(&mut redis)).await
    }

    pub async fn put(&self, key: &str, value: &[u8], ttl_ms: u64) -> Result<()> {
        let mut redis = self.redis.clone();
        let set = cmd("SET").arg(format!("{PREFIX}{key}")).arg(value).arg("PX").arg(ttl_ms.max(1)).clone();
        self.bounded(set.query_async::<()>(&mut redis)).await
    }

    pub async fn claim(&self, key: &str, claim: &[u8], lease_ms: u64) -> Result<Option<Vec<u8>>> {
        let mut redis = self.redis.clone();
        let mut invocation = self.claim.prepare_invoke();
        invocation.key(format!("{PREFIX}{key}")).arg(claim).arg(lease_ms.max(1));
        self.bounded(invocation.invoke_async(&mut redis)).await
    }

    pub async fn complete(&self, key: &str, holder: &[u8], value: &[u8], ttl_ms: u64) -> Result<()> {
        let mut redis = self.redis.clone();
        let mut invocation = self.complete.prepare_invoke();
        invocation.key(format!("{PREFIX}{key}")).arg(holder).arg(value).arg(ttl_ms.max(1));
        self.bounded(invocation.invoke_async::<()>(&mut redis)).await
    }

    pub async fn release(&self, key: &str, holder: &[u8]) -> Result<()> {
        let mut redis = self.redis.clone();
        let mut invocation = self.release.prepare_invoke();
        invocation.key(format!("{PREFIX}{key}")).arg(holder);
        self.bounded(invocation.invoke_async::<()>(&mut redis)).await
    }
}
