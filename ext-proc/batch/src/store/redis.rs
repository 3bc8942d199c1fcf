//! Batch metadata in Redis, shared by every replica (the `--redis-url` of
//! shared limits). Every write that touches several keys is one Lua script,
//! so it lands whole or not at all; the lease's token is compared inside the
//! script that writes (fencing). Reads are plain commands.
//!
//! Keys, all under `modelgate:batch:`; ids and the owner come last, so no two
//! owners' or records' keys meet:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `file:<id>` | hash | `owner`; `record`: the [`FileRecord`]'s JSON |
//! | `files:<owner>` | sorted set, score 0 | the owner's file ids (lists page by id with ZRANGEBYLEX) |
//! | `purpose:<purpose>:<owner>` | sorted set, score 0 | the same, one purpose's (`:` and `%` in it percent-escaped) |
//! | `expiring` | sorted set | ids of files with an `expires_at`, scored by it |
//! | `batch:<id>` | hash | `owner`; `batch`: the [`Batch`]'s JSON; `cancel_requested_at` once asked |
//! | `batches:<owner>` | sorted set, score 0 | the owner's batch ids |
//! | `active` | set | ids of the batches not finished |
//! | `readers:<file id>` | set | the unfinished batches reading that input file |
//! | `lease:<batch id>` | string, expiring | the lease holder's token (`SET NX PX`) |
//! | `segments:<batch id>` | list | the batch's committed result segments, in commit order |
//! | `response:<id>` | hash, expiring (EXPIREAT) | `owner`; `record`: the [`StoredResponse`]'s JSON |
//!
//! Scripts name every key they touch (KEYS), but the keys of one call do not
//! share a hash slot: this is for one Redis (or one primary with replicas),
//! not Redis Cluster. Needs Redis 6.0.6 or later (LPOS). Durability is
//! Redis's own: run it with `appendonly yes` and `appendfsync always` for the
//! same promise as SQLite.

use super::*;
use ::redis::aio::ConnectionManager;
use ::redis::{cmd, pipe, RedisResult, Script};
use modelgate_runtime::redis_connection::{connect_lazily, within};
use std::future::Future;
use std::sync::LazyLock;

const PREFIX: &str = "modelgate:batch:";

fn file_key(id: &str) -> String {
    format!("{PREFIX}file:{id}")
}

fn owner_files_key(owner: &str) -> String {
    format!("{PREFIX}files:{owner}")
}

/// Purposes are the API's fixed words, but escaped all the same: a `:` in one
/// must not make two owners' keys meet.
fn purpose_files_key(purpose: &str, owner: &str) -> String {
    let purpose = purpose.replace('%', "%25").replace(':', "%3A");
    format!("{PREFIX}purpose:{purpose}:{owner}")
}

fn expiring_key() -> String {
    format!("{PREFIX}expiring")
}

fn batch_key(id: &str) -> String {
    format!("{PREFIX}batch:{id}")
}

fn owner_batches_key(owner: &str) -> String {
    format!("{PREFIX}batches:{owner}")
}

fn active_key() -> String {
    format!("{PREFIX}active")
}

fn readers_key(file_id: &str) -> String {
    format!("{PREFIX}readers:{file_id}")
}

fn lease_key(batch_id: &str) -> String {
    format!("{PREFIX}lease:{batch_id}")
}

fn segments_key(batch_id: &str) -> String {
    format!("{PREFIX}segments:{batch_id}")
}

fn response_key(id: &str) -> String {
    format!("{PREFIX}response:{id}")
}

/// Registers a file: its hash, its owner's lists, its expiry. KEYS[k], KEYS[k+1],
/// KEYS[k+2]: its hash, its owner's files, its owner's files of its purpose;
/// ARGV[a..a+3]: id, owner, record, expires_at ("" for never). Written over
/// when it exists, so a repeated write lands once.
const PUT_FILE_LUA: &str = r"
local function put_file(k, a, expiring)
  redis.call('HSET', KEYS[k], 'owner', ARGV[a + 1], 'record', ARGV[a + 2])
  redis.call('ZADD', KEYS[k + 1], 0, ARGV[a])
  redis.call('ZADD', KEYS[k + 2], 0, ARGV[a])
  if ARGV[a + 3] ~= '' then
    redis.call('ZADD', expiring, ARGV[a + 3], ARGV[a])
  end
end
";

/// KEYS: expiring, then the file's three keys; ARGV: the file's four values.
const INSERT_FILE_LUA: &str = r"
put_file(2, 1, KEYS[1])
return 1
";

/// KEYS: the file's hash, its owner's files, of its purpose, expiring, its readers.
/// ARGV: owner, id. Answers {'not_found'}, {'in_use', batch id} or {'deleted'}.
const DELETE_FILE_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return {'not_found'}
end
local reader = redis.call('SRANDMEMBER', KEYS[5])
if reader then
  return {'in_use', reader}
end
redis.call('DEL', KEYS[1])
for i = 2, 4 do
  redis.call('ZREM', KEYS[i], ARGV[2])
end
return {'deleted'}
";

/// KEYS: the batch's hash, its owner's batches, active, its input's readers.
/// ARGV: id, owner, batch JSON, "1" when not finished, cancel_requested_at ("" for none).
const INSERT_BATCH_LUA: &str = r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'batch', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[5])
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('SADD', KEYS[4], ARGV[1])
end
return 1
";

/// KEYS: the batch's hash, active. ARGV: owner, id, time. Answers nil for
/// another owner's (or no) batch, else {batch JSON, cancel_requested_at}.
const REQUEST_CANCEL_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return false
end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'batch', 'cancel_requested_at')
";

/// KEYS: the lease. ARGV: token, ttl in ms. 1 when renewed.
const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// KEYS: the lease. ARGV: token.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// KEYS: the lease, the batch's hash, its segments, active, its input's
/// readers, expiring, then three keys per file. ARGV: token, batch id, batch
/// JSON, "1" when terminal, "1" when a segment is committed, the segment,
/// then four values per file. 0 (nothing written) unless the token holds the lease.
const SAVE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], 'batch', ARGV[3])
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('SREM', KEYS[5], ARGV[2])
  redis.call('DEL', KEYS[3])
else
  redis.call('SADD', KEYS[4], ARGV[2])
  redis.call('SADD', KEYS[5], ARGV[2])
  -- A save repeated after a lost answer commits its segment once.
  if ARGV[5] == '1' and not redis.call('LPOS', KEYS[3], ARGV[6]) then
    redis.call('RPUSH', KEYS[3], ARGV[6])
  end
end
for i = 0, (#KEYS - 6) / 3 - 1 do
  put_file(7 + 3 * i, 7 + 4 * i, KEYS[6])
end
return 1
";

/// KEYS: the response's hash. ARGV: owner, record, expiry (unix seconds).
/// Another owner's response of the same id is left alone (0).
const PUT_RESPONSE_LUA: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return 1
";

/// KEYS: the response's hash. ARGV: owner. 1 when deleted.
const DELETE_RESPONSE_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
";

/// Ids read per round trip while a list skips expired files.
const LIST_CHUNK: usize = 64;

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

/// A batch's hash as read: owner, batch JSON, cancel_requested_at.
type BatchFields = (Option<String>, Option<String>, Option<u64>);

fn batch_record(owner: String, batch: Option<String>, cancel_requested_at: Option<u64>) -> Result<BatchRecord> {
    let batch = batch.ok_or_else(|| StoreError("a stored batch has no object".into()))?;
    Ok(BatchRecord { owner, batch: decode(&batch)?, cancel_requested_at })
}

/// The record when `owner` owns it.
fn owned_batch((stored_owner, batch, cancel_requested_at): BatchFields, owner: &str) -> Result<Option<BatchRecord>> {
    match stored_owner {
        Some(stored) if stored == owner => batch_record(stored, batch, cancel_requested_at).map(Some),
        _ => Ok(None),
    }
}

struct Scripts {
    insert_file: Script,
    delete_file: Script,
    insert_batch: Script,
    request_cancel: Script,
    renew: Script,
    release: Script,
    save: Script,
    put_response: Script,
    delete_response: Script,
}

/// Built once: each script's hash is computed when it is made.
static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let with_put_file = |script: &str| Script::new(&format!("{PUT_FILE_LUA}{script}"));
    Scripts {
        insert_file: with_put_file(INSERT_FILE_LUA),
        delete_file: Script::new(DELETE_FILE_LUA),
        insert_batch: Script::new(INSERT_BATCH_LUA),
        request_cancel: Script::new(REQUEST_CANCEL_LUA),
        renew: Script::new(RENEW_LUA),
        release: Script::new(RELEASE_LUA),
        save: with_put_file(SAVE_LUA),
        put_response: Script::new(PUT_RESPONSE_LUA),
        delete_response: Script::new(DELETE_RESPONSE_LUA),
    }
});

pub struct RedisMeta {
    redis: ConnectionManager,
    timeout: Duration,
}

impl RedisMeta {
    /// Connects lazily, as shared limits do: a Redis that is down at start is
    /// only an error for the calls made while it is. Each call is bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> std::result::Result<Self, String> {
        let redis =
            connect_lazily(url, timeout, timeout).map_err(|e| format!("batch metadata in Redis at {url}: {e}"))?;
        Ok(RedisMeta { redis, timeout })
    }

    /// One call to Redis, bounded by the timeout.
    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Result<T> {
        within(self.timeout, call).await.map_err(|e| StoreError(e.to_string()))
    }

    async fn query<T: ::redis::FromRedisValue>(&self, command: &::redis::Cmd) -> Result<T> {
        let mut redis = self.redis.clone();
        self.bounded(command.query_async(&mut redis)).await
    }

    async fn invoke<T: ::redis::FromRedisValue>(&self, invocation: &::redis::ScriptInvocation<'_>) -> Result<T> {
        let mut redis = self.redis.clone();
        self.bounded(invocation.invoke_async(&mut redis)).await
    }

    /// Up to `count` ids of a sorted set (score 0) after `after`, in `order`.
    async fn ids_after(&self, key: &str, order: Order, after: Option<&str>, count: usize) -> Result<Vec<String>> {
        let start = after.map(|id| format!("({id}"));
        let mut command = match order {
            Order::Asc => cmd("ZRANGEBYLEX").arg(key).arg(start.as_deref().unwrap_or("-")).arg("+").clone(),
            Order::Desc => cmd("ZREVRANGEBYLEX").arg(key).arg(start.as_deref().unwrap_or("+")).arg("-").clone(),
        };
        self.query(command.arg("LIMIT").arg(0).arg(count)).await
    }

    /// The records of these files, those still there.
    async fn files(&self, ids: &[String]) -> Result<Vec<FileRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = pipe();
        for id in ids {
            pipeline.cmd("HGET").arg(file_key(id)).arg("record");
        }
        let mut redis = self.redis.clone();
        let records: Vec<Option<String>> = self.bounded(pipeline.query_async(&mut redis)).await?;
        records.into_iter().flatten().map(|json| decode(&json)).collect()
    }

    fn file_args(invocation: &mut ::redis::ScriptInvocation<'_>, record: &FileRecord) -> Result<()> {
        invocation
            .key(file_key(&record.file.id))
            .key(owner_files_key(&record.owner))
            .key(purpose_files_key(&record.file.purpose, &record.owner))
            .arg(&record.file.id)
            .arg(&record.owner)
            .arg(encode(record)?)
            .arg(record.file.expires_at.map(|at| at.to_string()).unwrap_or_default());
        Ok(())
    }

    pub async fn insert_file(&self, record: &FileRecord) -> Result<()> {
        let mut invocation = SCRIPTS.insert_file.prepare_invoke();
        invocation.key(expiring_key());
        Self::file_args(&mut invocation, record)?;
        self.invoke::<i64>(&invocation).await.map(drop)
    }

    pub async fn file(&self, owner: &str, id: &str, now: u64) -> Result<Option<FileRecord>> {
        let (stored_owner, record): (Option<String>, Option<String>) =
            self.query(cmd("HMGET").arg(file_key(id)).arg("owner").arg("record")).await?;
        let (Some(stored_owner), Some(record)) = (stored_owner, record) else {
            return Ok(None);
        };
        if stored_owner != owner {
            return Ok(None);
        }
        let record: FileRecord = decode(&record)?;
        Ok((!record.expired(now)).then_some(record))
    }

    pub async fn list_files(&self, owner: &str, query: &FileQuery, now: u64) -> Result<Page<FileRecord>> {
        let key = match &query.purpose {
            Some(purpose) => purpose_files_key(purpose, owner),
            None => owner_files_key(owner),
        };
        let mut items = Vec::new();
        let mut after = query.after.clone();
        // Expired files not yet deleted are skipped: read on until the page is full, or the list ends.
        while items.len() <= query.limit {
            let asked = (query.limit + 1 - items.len()).max(LIST_CHUNK);
            let ids = self.ids_after(&key, query.order, after.as_deref(), asked).await?;
            after = ids.last().cloned();
            items.extend(self.files(&ids).await?.into_iter().filter(|record| !record.expired(now)));
            if ids.len() < asked {
                break;
            }
        }
        let has_more = items.len() > query.limit;
        items.truncate(query.limit);
        Ok(Page { items, has_more })
    }

    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<Deletion> {
        let stored: Option<String> = self.query(cmd("HGET").arg(file_key(id)).arg("record")).await?;
        let Some(record) = stored.map(|json| decode::<FileRecord>(&json)).transpose()? else {
            return Ok(Deletion::NotFound);
        };
        let mut invocation = SCRIPTS.delete_file.prepare_invoke();
        invocation
            .key(file_key(id))
            .key(owner_files_key(owner))
            .key(purpose_files_key(&record.file.purpose, owner))
            .key(expiring_key())
            .key(readers_key(id))
            .arg(owner)
            .arg(id);
        let answer: Vec<String> = self.invoke(&invocation).await?;
        match answer.as_slice() {
            [verdict] if verdict == "deleted" => Ok(Deletion::Deleted(record)),
            [verdict, batch_id] if verdict == "in_use" => Ok(Deletion::InUse { batch_id: batch_id.clone() }),
            [verdict] if verdict == "not_found" => Ok(Deletion::NotFound),
            other => Err(StoreError(format!("unexpected reply from Redis to a deletion: {other:?}"))),
        }
    }

    pub async fn expired_files(&self, now: u64, limit: usize) -> Result<Vec<FileRecord>> {
        let ids: Vec<String> = self
            .query(cmd("ZRANGEBYSCORE").arg(expiring_key()).arg("-inf").arg(now).arg("LIMIT").arg(0).arg(limit))
            .await?;
        self.files(&ids).await
    }

    pub async fn insert_batch(&self, record: &BatchRecord) -> Result<()> {
        let batch = &record.batch;
        let mut invocation = SCRIPTS.insert_batch.prepare_invoke();
        invocation
            .key(batch_key(&batch.id))
            .key(owner_batches_key(&record.owner))
            .key(active_key())
            .key(readers_key(&batch.input_file_id))
            .arg(&batch.id)
            .arg(&record.owner)
            .arg(encode(batch)?)
            .arg(flag(!batch.status.is_terminal()))
            .arg(record.cancel_requested_at.map(|at| at.to_string()).unwrap_or_default());
        self.invoke::<i64>(&invocation).await.map(drop)
    }

    pub async fn batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        let fields: BatchFields =
            self.query(cmd("HMGET").arg(batch_key(id)).arg("owner").arg("batch").arg("cancel_requested_at")).await?;
        owned_batch(fields, owner)
    }

    pub async fn list_batches(&self, owner: &str, after: Option<&str>, limit: usize) -> Result<Page<BatchRecord>> {
        let ids = self.ids_after(&owner_batches_key(owner), Order::Desc, after, limit + 1).await?;
        let mut pipeline = pipe();
        for id in &ids {
            pipeline.cmd("HMGET").arg(batch_key(id)).arg("owner").arg("batch").arg("cancel_requested_at");
        }
        let mut redis = self.redis.clone();
        let fields: Vec<BatchFields> =
            if ids.is_empty() { Vec::new() } else { self.bounded(pipeline.query_async(&mut redis)).await? };
        let mut items = Vec::with_capacity(fields.len());
        for batch in fields {
            items.extend(owned_batch(batch, owner)?);
        }
        let has_more = items.len() > limit;
        items.truncate(limit);
        Ok(Page { items, has_more })
    }

    pub async fn request_cancel(&self, owner: &str, id: &str, at: u64) -> Result<Option<BatchRecord>> {
        let mut invocation = SCRIPTS.request_cancel.prepare_invoke();
        invocation.key(batch_key(id)).key(active_key()).arg(owner).arg(id).arg(at);
        let answer: Option<(Option<String>, Option<u64>)> = self.invoke(&invocation).await?;
        answer
            .map(|(batch, cancel_requested_at)| batch_record(owner.to_string(), batch, cancel_requested_at))
            .transpose()
    }

    pub async fn active_batches(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.query(cmd("SMEMBERS").arg(active_key())).await?;
        ids.sort_unstable();
        Ok(ids)
    }

    pub async fn acquire(&self, batch_id: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        let lease = Lease { batch_id: batch_id.to_string(), token: lease_token(holder) };
        let taken: Option<String> = self
            .query(cmd("SET").arg(lease_key(batch_id)).arg(&lease.token).arg("NX").arg("PX").arg(ttl_ms(ttl)))
            .await?;
        Ok(taken.map(|_| lease))
    }

    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let mut invocation = SCRIPTS.renew.prepare_invoke();
        invocation.key(lease_key(&lease.batch_id)).arg(&lease.token).arg(ttl_ms(ttl));
        Ok(self.invoke::<i64>(&invocation).await? == 1)
    }

    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let mut invocation = SCRIPTS.release.prepare_invoke();
        invocation.key(lease_key(&lease.batch_id)).arg(&lease.token);
        self.invoke::<i64>(&invocation).await.map(drop)
    }

    pub async fn running(&self, batch_id: &str) -> Result<Option<(BatchRecord, Vec<String>)>> {
        let mut pipeline = pipe();
        pipeline
            .atomic()
            .cmd("HMGET")
            .arg(batch_key(batch_id))
            .arg("owner")
            .arg("batch")
            .arg("cancel_requested_at")
            .cmd("LRANGE")
            .arg(segments_key(batch_id))
            .arg(0)
            .arg(-1);
        let mut redis = self.redis.clone();
        let ((owner, batch, cancel_requested_at), segments): (BatchFields, Vec<String>) =
            self.bounded(pipeline.query_async(&mut redis)).await?;
        let Some(owner) = owner else {
            return Ok(None);
        };
        Ok(Some((batch_record(owner, batch, cancel_requested_at)?, segments)))
    }

    pub async fn save(&self, lease: &Lease, progress: Progress<'_>) -> Result<bool> {
        let batch = progress.batch;
        let mut invocation = SCRIPTS.save.prepare_invoke();
        invocation
            .key(lease_key(&lease.batch_id))
            .key(batch_key(&lease.batch_id))
            .key(segments_key(&lease.batch_id))
            .key(active_key())
            .key(readers_key(&batch.input_file_id))
            .key(expiring_key())
            .arg(&lease.token)
            .arg(&lease.batch_id)
            .arg(encode(batch)?)
            .arg(flag(batch.status.is_terminal()))
            .arg(flag(progress.segment.is_some()))
            .arg(progress.segment.unwrap_or_default());
        for file in progress.files {
            Self::file_args(&mut invocation, file)?;
        }
        Ok(self.invoke::<i64>(&invocation).await? == 1)
    }

    pub async fn put_response(&self, owner: &str, stored: &StoredResponse, expires_at: u64) -> Result<()> {
        let mut invocation = SCRIPTS.put_response.prepare_invoke();
        invocation.key(response_key(stored.id())).arg(owner).arg(encode(stored)?).arg(expires_at);
        self.invoke::<i64>(&invocation).await.map(drop)
    }

    /// Redis hides an expired response itself: `now` is the SQLite store's concern.
    pub async fn response(&self, owner: &str, id: &str, _now: u64) -> Result<Option<StoredResponse>> {
        let (stored_owner, record): (Option<String>, Option<String>) =
            self.query(cmd("HMGET").arg(response_key(id)).arg("owner").arg("record")).await?;
        match (stored_owner, record) {
            (Some(stored_owner), Some(record)) if stored_owner == owner => decode(&record).map(Some),
            _ => Ok(None),
        }
    }

    pub async fn delete_response(&self, owner: &str, id: &str, _now: u64) -> Result<bool> {
        let mut invocation = SCRIPTS.delete_response.prepare_invoke();
        invocation.key(response_key(id)).arg(owner);
        Ok(self.invoke::<i64>(&invocation).await? == 1)
    }
}

/// Redis refuses a zero expiry: the shortest lease is a millisecond.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
