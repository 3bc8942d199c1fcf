//! Rate-limit buckets shared by several gateways through Redis: what
//! [`modelgate_proto::limits::admit`] and [`modelgate_proto::limits::settle`]
//! do with Envoy's shared data (the GCRA of `spend`, `overspend` and
//! `give_back`), run as one Lua script so a call's buckets change together,
//! on Redis's clock, which every gateway shares.
//!
//! An admit spends from every bucket if all allow it, and from none
//! otherwise; then the buckets that would have allowed it answer with what
//! is left in them, as `admit` does. A debit spends from every bucket past
//! its limit (or gives back what a reservation did not use), and answers
//! `adjust`'s verdicts. Buckets asked for nothing (a cost of 0) are only
//! looked at, never written.
//!
//! A debit may carry an id: the script remembers it for ten minutes, in the
//! same call that applies the debit, so a debit sent again (its answer was
//! lost, and the filter cannot know whether it landed) is applied once; the
//! repeat only looks.
//!
//! Each bucket's state is its TAT in microseconds, a decimal string under
//! the bucket's name, set to expire once the bucket would be full again (so
//! idle keys vanish). A TAT past 2^53 µs (285 years ahead) saturates there,
//! where `spend` saturates at 2^64: Lua's numbers are doubles, exact only up
//! to 2^53, and no real limit reaches either bound.
//!
//! The script reads and writes several keys, so on Redis Cluster every
//! bucket of one call (and its debit's id) must hash to the same slot.

use modelgate_proto::limits::{SpendRequest, SpendResponse, Verdict, MAX_PER_MINUTE};
use modelgate_runtime::redis_connection::{connect_lazily, within, CallError};
use redis::aio::ConnectionManager;
use redis::Script;
use std::time::Duration;

/// KEYS: the buckets' names, then a debit's id key when ARGV[2] is "1".
/// ARGV[1]: "1" to debit, "0" to admit; then each bucket's limit per
/// minute, cost and refund (a debit's, which then replaces its cost), in
/// the order of KEYS.
const SPEND_LUA: &str = r#"
local MINUTE = 60000000
local MAX = 9007199254740992
-- Kept a second past full, so a bucket read as it expires reads as full anyway.
local MARGIN_MS = 1000
-- How long a debit's id is remembered.
local DEBIT_ID_MS = 600000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local debit = ARGV[1] == '1'
local buckets = #KEYS
if ARGV[2] == '1' then
  buckets = buckets - 1
end

-- limits::spend: the verdict, whether it allows, the state if spent, and if not.
local function spend(per_minute, tat, cost)
  local start = math.max(tat, now)
  -- limits::time_for: the time `cost` units take to come back, rounded up.
  local new_tat = math.min(start + math.ceil(cost * MINUTE / per_minute), MAX)
  local allowed = new_tat - now <= MINUTE
  local used = start - now
  local retry_after = new_tat - now - MINUTE
  if allowed then
    used = new_tat - now
    retry_after = 0
  end
  local remaining = math.min(math.floor(math.max(MINUTE - used, 0) * per_minute / MINUTE), per_minute)
  return {allowed and 1 or 0, per_minute, remaining, used, retry_after}, allowed, new_tat, start
end

-- limits::give_back: the state with `units` given back, rounded down, never past full.
local function give_back(per_minute, tat, units)
  if tat <= now then
    return tat
  end
  return math.max(tat - math.floor(units * MINUTE / per_minute), now)
end

local function arg(i, n)
  return tonumber(ARGV[3 * i + n])
end

local before = {}
local after = {}
local written = {}
local verdicts = {}
local all_allowed = true
for i = 1, buckets do
  local key = KEYS[i]
  if before[key] == nil then
    before[key] = tonumber(redis.call('GET', key) or '0') or 0
  end
  local per_minute, cost, refund = arg(i, 0), arg(i, 1), arg(i, 2)
  -- A bucket named twice spends from what its first spend left.
  local tat = after[key] or before[key]
  local verdict, allowed, new_tat, start = spend(per_minute, tat, cost)
  if debit and refund > 0 then
    new_tat = give_back(per_minute, tat, refund)
    verdict = spend(per_minute, new_tat, 0)
  end
  if allowed or debit then
    after[key] = new_tat
  else
    after[key] = start
    all_allowed = false
  end
  if (cost > 0 or (debit and refund > 0)) and after[key] ~= tat and after[key] >= now then
    written[key] = true
  end
  verdicts[i] = verdict
end
if not (debit or all_allowed) then
  -- Nothing is spent: the buckets that would have allowed it tell what is left in them.
  for i = 1, buckets do
    if verdicts[i][1] == 1 then
      verdicts[i] = spend(arg(i, 0), before[KEYS[i]], 0)
    end
  end
  return verdicts
end
if ARGV[2] == '1' and not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', DEBIT_ID_MS) then
  -- Applied already: this is a repeat, which only looks.
  for i = 1, buckets do
    verdicts[i] = spend(arg(i, 0), before[KEYS[i]], 0)
  end
  return verdicts
end
for key in pairs(written) do
  local tat = after[key]
  redis.call('SET', key, string.format('%.0f', tat),
    'PX', string.format('%.0f', math.ceil((tat - now) / 1000) + MARGIN_MS))
end
return verdicts
"#;

const MINUTE_US: u64 = 60_000_000;
/// The largest count the script computes with exactly.
const MAX_EXACT: u64 = 1 << 53;

#[derive(Debug)]
pub enum LimitStoreError {
    /// No answer in time, or Redis's error.
    Call(CallError),
    /// An answer of another shape than the script's.
    Reply(String),
}

impl std::fmt::Display for LimitStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitStoreError::Call(e) => e.fmt(f),
            LimitStoreError::Reply(e) => write!(f, "unexpected reply from Redis: {e}"),
        }
    }
}

impl std::error::Error for LimitStoreError {}

impl From<CallError> for LimitStoreError {
    fn from(e: CallError) -> Self {
        LimitStoreError::Call(e)
    }
}

/// Buckets in one Redis, over a connection that reconnects by itself.
pub struct SharedLimits {
    redis: ConnectionManager,
    script: Script,
    timeout: Duration,
}

impl SharedLimits {
    /// Connects lazily: a Redis that is down at start is only an error for
    /// the calls made while it is. Each call is bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        let redis = connect_lazily(url, timeout, timeout)?;
        Ok(SharedLimits { redis, script: Script::new(SPEND_LUA), timeout })
    }

    /// Spends from every bucket of `request` at once, as the module describes.
    pub async fn spend(&self, request: &SpendRequest) -> Result<SpendResponse, LimitStoreError> {
        if request.buckets.is_empty() {
            return Ok(SpendResponse { verdicts: Vec::new() });
        }
        let mut invocation = self.script.prepare_invoke();
        let id = request.id.as_deref().filter(|_| request.debit);
        invocation.arg(if request.debit { "1" } else { "0" }).arg(if id.is_some() { "1" } else { "0" });
        for bucket in &request.buckets {
            // Kept where the script's doubles are exact (cost × a minute in µs below 2^53); a larger
            // cost is refused (or saturates) all the same.
            invocation
                .key(&bucket.name)
                .arg(bucket.per_minute.clamp(1, MAX_PER_MINUTE))
                .arg(bucket.cost.min(MAX_EXACT / MINUTE_US))
                .arg(bucket.refund.min(MAX_EXACT / MINUTE_US));
        }
        if let Some(id) = id {
            invocation.key(format!("modelgate.debit.{id}"));
        }
        let mut redis = self.redis.clone();
        let reply: Vec<(u8, u64, u64, u64, u64)> = within(self.timeout, invocation.invoke_async(&mut redis)).await?;
        if reply.len() != request.buckets.len() {
            return Err(LimitStoreError::Reply(format!(
                "{} verdicts for {} buckets",
                reply.len(),
                request.buckets.len()
            )));
        }
        let verdicts = reply
            .into_iter()
            .map(|(allowed, limit, remaining, reset_us, retry_after_us)| Verdict {
                allowed: allowed == 1,
                limit,
                remaining,
                reset_us,
                retry_after_us,
            })
            .collect();
        Ok(SpendResponse { verdicts })
    }
}
