//! Budgets shared by several gateways through Redis: one Lua script admits
//! (checks every budget of the candidates and reserves in the first that
//! has room, atomically across gateways), one settles.
//!
//! - A counter is a hash under `modelgate:budget:<counter>`: `limit`,
//!   `spent`, `reserved`, and what the report shows (`owner`, `scope`,
//!   `amount`, `period`, `unit`, `resets_at`). It expires [`GRACE_SECS`]
//!   after its period ends.
//! - A reservation is a hash under `modelgate:budget-reservation:<id>`:
//!   `member`, and one field per counter it reserved in (`usd|<key>` or
//!   `tokens|<key>`) holding the amount. It expires with the last of its
//!   counters. Settled, it is deleted; one settled before it was made
//!   leaves a tombstone ([`TOMBSTONE_SECS`]).
//! - `modelgate:budgets` is a sorted set of the counters' keys by when
//!   their period ends: what the report reads.
//!
//! Expiries are computed on ext-proc's clock, as the periods are. The
//! scripts touch several keys, so on Redis Cluster they would all have to
//! hash to one slot: use a single Redis (or its replicas).

use super::{
    unit_name, unit_named, Charge, CounterState, Decision, Hold, StoreError, GRACE_SECS, MAX_AMOUNT, TOMBSTONE_SECS,
};
use modelgate_runtime::redis_connection::{connect_lazily, within, CallError};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::collections::HashMap;
use std::time::Duration;

const COUNTER_PREFIX: &str = "modelgate:budget:";
const RESERVATION_PREFIX: &str = "modelgate:budget-reservation:";
const INDEX: &str = "modelgate:budgets";

/// KEYS: the reservation, the index, then every candidate's counters in order.
/// ARGV[1]: the time before which the index forgets counters (their grace
/// over); then per candidate (tried in turn), its number of holds followed by each
/// hold's unit ("usd" or "tokens"), limit, amount, resets_at, expiry in ms,
/// owner, scope, amount name and period. Answers {1, member} or
/// {0, member, hold} (from 0) for the first budget that refused.
const ADMIT_LUA: &str = r#"
local HOLD_ARGS = 9
local made = redis.call('HGET', KEYS[1], 'member')
if made then
  return {1, tonumber(made)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local arg = 2
local key = 3
local member = 0
local refused = nil
while arg <= #ARGV do
  local holds = tonumber(ARGV[arg])
  arg = arg + 1
  local first_refusal = nil
  for h = 0, holds - 1 do
    local k = KEYS[key + h]
    local a = arg + h * HOLD_ARGS
    -- Touched: the limit this request sent, and what the report shows.
    redis.call('HSET', k, 'limit', ARGV[a + 1], 'unit', ARGV[a], 'resets_at', ARGV[a + 3],
      'owner', ARGV[a + 5], 'scope', ARGV[a + 6], 'amount', ARGV[a + 7], 'period', ARGV[a + 8])
    redis.call('PEXPIRE', k, ARGV[a + 4])
    redis.call('ZADD', KEYS[2], ARGV[a + 3], k)
    local state = redis.call('HMGET', k, 'spent', 'reserved')
    local used = tonumber(state[1] or '0') + tonumber(state[2] or '0')
    if first_refusal == nil and used + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
      first_refusal = h
    end
  end
  if first_refusal == nil then
    local expiry = 1
    for h = 0, holds - 1 do
      local a = arg + h * HOLD_ARGS
      redis.call('HINCRBY', KEYS[key + h], 'reserved', ARGV[a + 2])
      redis.call('HSET', KEYS[1], ARGV[a] .. '|' .. KEYS[key + h], ARGV[a + 2])
      expiry = math.max(expiry, tonumber(ARGV[a + 4]))
    end
    redis.call('HSET', KEYS[1], 'member', member)
    redis.call('PEXPIRE', KEYS[1], expiry)
    return {1, member}
  end
  if refused == nil then
    refused = {0, member, first_refusal}
  end
  arg = arg + holds * HOLD_ARGS
  key = key + holds
  member = member + 1
end
return refused
"#;

/// KEYS: reservations. ARGV[1]: how long a tombstone lasts, in ms; then
/// per reservation, "real" and the dollars in millionths and the tokens it
/// cost, or "reserved" (charged what it reserved) and two zeros. Each is
/// applied once: the reservation is deleted. A reservation not found leaves
/// a tombstone (a `member` without holds), so that an admission whose
/// answer was lost, landing after its request was settled, reserves nothing.
///
/// The counters are read from the reservations, so they are not among KEYS:
/// a single Redis (not a Cluster) runs this.
const SETTLE_LUA: &str = r#"
for r = 1, #KEYS do
  local mode, usd, tokens = ARGV[3 * r - 1], ARGV[3 * r], ARGV[3 * r + 1]
  local fields = redis.call('HGETALL', KEYS[r])
  if #fields == 0 then
    redis.call('HSET', KEYS[r], 'member', 0)
    redis.call('PEXPIRE', KEYS[r], ARGV[1])
  end
  for i = 1, #fields, 2 do
    local unit, counter = string.match(fields[i], '^(%a+)|(.*)$')
    -- A counter gone with its period is not brought back.
    if unit and redis.call('EXISTS', counter) == 1 then
      local reserved = fields[i + 1]
      local spent = reserved
      if mode == 'real' then
        spent = unit == 'usd' and usd or tokens
      end
      -- An amount is a decimal string; "-0" is no integer to Redis, and nothing to give back.
      if reserved ~= '0' and redis.call('HINCRBY', counter, 'reserved', '-' .. reserved) < 0 then
        redis.call('HSET', counter, 'reserved', 0)
      end
      redis.call('HINCRBY', counter, 'spent', spent)
    end
  end
  -- A tombstone (no holds) stays until it expires.
  if #fields > 2 then
    redis.call('DEL', KEYS[r])
  end
end
return #KEYS
"#;

/// Reservations settled by one script call: a batch of records is split so
/// that Redis is never held long.
const SETTLE_CHUNK: usize = 256;

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError(format!("budgets in Redis: {e}"))
    }
}

pub(super) struct RedisBudgets {
    redis: ConnectionManager,
    admit: Script,
    settle: Script,
    timeout: Duration,
}

impl RedisBudgets {
    /// Connects lazily; each call is bounded by `timeout`.
    pub(super) fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let redis = connect_lazily(url, timeout, timeout)?;
        Ok(RedisBudgets { redis, admit: Script::new(ADMIT_LUA), settle: Script::new(SETTLE_LUA), timeout })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        within(self.timeout, call).await.map_err(|e| match e {
            CallError::Timeout => StoreError("budgets in Redis: no answer in time".into()),
            CallError::Redis(e) => StoreError::from(e),
        })
    }

    pub(super) async fn admit(
        &self,
        reservation: &str,
        candidates: &[Vec<Hold>],
        now_secs: u64,
    ) -> Result<Decision, StoreError> {
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(format!("{RESERVATION_PREFIX}{reservation}"))
            .key(INDEX)
            .arg(now_secs.saturating_sub(GRACE_SECS));
        for holds in candidates {
            invocation.arg(holds.len());
            for hold in holds {
                let info = &hold.info;
                // A counter, and a reservation in it, lives until its period's grace ends.
                let expiry_ms = info.resets_at.saturating_add(GRACE_SECS).saturating_sub(now_secs).max(1) * 1000;
                invocation
                    .key(format!("{COUNTER_PREFIX}{}", hold.counter))
                    .arg(unit_name(hold.unit))
                    .arg(hold.limit)
                    .arg(hold.amount)
                    .arg(info.resets_at)
                    .arg(expiry_ms)
                    .arg(&info.owner)
                    .arg(&info.scope)
                    .arg(info.amount_name)
                    .arg(&info.period);
            }
        }
        let mut redis = self.redis.clone();
        let reply: Vec<u64> = self.bounded(invocation.invoke_async(&mut redis)).await?;
        let at = |i: usize| reply.get(i).map(|v| usize::try_from(*v).unwrap_or(usize::MAX));
        match (reply.first(), at(1), at(2)) {
            (Some(1), Some(member), _) => Ok(Decision::Admitted { member }),
            (Some(0), Some(member), Some(hold)) if candidates.get(member).is_some_and(|holds| hold < holds.len()) => {
                Ok(Decision::Refused { member, hold })
            }
            _ => Err(StoreError(format!("budgets in Redis: an admission answered {reply:?}"))),
        }
    }

    pub(super) async fn settle(&self, settlements: &[(String, Charge)]) -> Result<(), StoreError> {
        let mut redis = self.redis.clone();
        for chunk in settlements.chunks(SETTLE_CHUNK) {
            let mut invocation = self.settle.prepare_invoke();
            invocation.arg(TOMBSTONE_SECS * 1000);
            for (reservation, charge) in chunk {
                invocation.key(format!("{RESERVATION_PREFIX}{reservation}"));
                match *charge {
                    Charge::Real { usd_micros, tokens } => {
                        invocation.arg("real").arg(usd_micros.min(MAX_AMOUNT)).arg(tokens.min(MAX_AMOUNT))
                    }
                    Charge::Reserved => invocation.arg("reserved").arg(0).arg(0),
                };
            }
            let _: usize = self.bounded(invocation.invoke_async(&mut redis)).await?;
        }
        Ok(())
    }

    pub(super) async fn counters(&self, key: Option<&str>, now_secs: u64) -> Result<Vec<CounterState>, StoreError> {
        let mut redis = self.redis.clone();
        let names: Vec<String> = self.bounded(redis.zrangebyscore(INDEX, format!("({now_secs}"), "+inf")).await?;
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.hgetall(name);
        }
        let hashes: Vec<HashMap<String, String>> = self.bounded(pipe.query_async(&mut redis)).await?;
        let mut counters = Vec::new();
        for mut hash in hashes.into_iter().filter(|hash| !hash.is_empty()) {
            if key.is_some_and(|key| hash.get("owner").map(String::as_str) != Some(key)) {
                continue;
            }
            let mut text = |field: &str| hash.remove(field).unwrap_or_default();
            let (owner, scope, amount_name, period, unit) =
                (text("owner"), text("scope"), text("amount"), text("period"), text("unit"));
            let number = |field: &str| hash.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
            counters.push(CounterState {
                owner,
                scope,
                amount_name,
                period,
                unit: unit_named(&unit)?,
                limit: number("limit"),
                spent: number("spent"),
                reserved: number("reserved"),
                resets_at: number("resets_at"),
            });
        }
        Ok(counters)
    }
}
