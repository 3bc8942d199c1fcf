//! Where the usage report's minutes live, so that a restart loses none of
//! them and a batch of records re-sent is counted once.
//!
//! Each batch the filter sends carries an id ([`BATCH_ID`]), unique across
//! Envoy workers and restarts, and a batch re-sent after a lost answer keeps
//! it. The store remembers the ids it applied for [`Dedup`]'s window and
//! answers a repeat as a success without applying it. The ids live in the
//! same store as the sums they guard and are written in the same step.
//!
//! - [`Ledger`]: one ext-proc's own, on local disk. Every batch is appended
//!   to a log and fsynced before it is acknowledged; a snapshot replaces the
//!   log once the log outgrows it. A restart loads the snapshot and replays
//!   the log; a last line cut short by a crash was never acknowledged, so the
//!   filter sends it again.
//! - [`RedisUsage`]: shared by several ext-procs (the report sums every
//!   gateway's usage); one Lua script per batch checks the id and adds the
//!   sums, atomically. Minutes expire with the retention, ids with the window.

use crate::usage_report::{Group, MinuteRow, Report, Retention, Totals, UsageStore};
use modelgate_proto::usage::{Tally, Traffic, UsageRecord};
use modelgate_runtime::redis_connection::{connect_lazily, within, CallError};
use redis::aio::ConnectionManager;
use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use modelgate_proto::headers::BATCH_ID;

/// Ids remembered at most, whatever the window: bounds memory if ids come
/// faster than any set of gateways sends batches.
const MAX_BATCH_IDS: usize = 1_000_000;

/// A batch id is what the filter makes: letters, digits, `-`, `_`, `.` and `:`, and short.
pub fn valid_batch_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Whether a batch was applied now or had been before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Repeat,
}

#[derive(Debug)]
pub enum StoreError {
    Disk(io::Error),
    Redis(CallError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Disk(e) => write!(f, "usage log: {e}"),
            StoreError::Redis(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<CallError> for StoreError {
    fn from(e: CallError) -> Self {
        StoreError::Redis(e)
    }
}

/// How long applied batch ids are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dedup {
    pub window_ms: u64,
}

/// Batch ids applied, oldest first, each with when it was.
#[derive(Debug)]
struct BatchIds {
    dedup: Dedup,
    order: VecDeque<(u64, String)>,
    seen: HashSet<String>,
}

impl BatchIds {
    fn new(dedup: Dedup) -> Self {
        BatchIds { dedup, order: VecDeque::new(), seen: HashSet::new() }
    }

    fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    fn insert(&mut self, id: String, at_ms: u64) {
        if self.seen.insert(id.clone()) {
            self.order.push_back((at_ms, id));
        }
    }

    /// Forgets the ids applied longer than the window before `now_ms`, and the oldest past the cap.
    fn prune(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.dedup.window_ms);
        while let Some((at_ms, _)) = self.order.front() {
            if *at_ms >= oldest && self.order.len() <= MAX_BATCH_IDS {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.seen.remove(&id);
            }
        }
    }
}

/// One applied batch, as the log keeps it: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// Counts up across the log and snapshots, so a replay skips what a snapshot holds.
    seq: u64,
    at_ms: u64,
    batch: Option<String>,
    rows: Vec<MinuteRow>,
}

/// Everything the log's entries up to `seq` added up to.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    batches: Vec<(u64, String)>,
    rows: Vec<MinuteRow>,
}

/// A log smaller than this is never compacted.
const MIN_COMPACT_BYTES: u64 = 16 << 20;

/// The usage report's minutes and the batch ids applied, in memory and, when
/// opened on a directory, on disk.
#[derive(Debug)]
pub struct Ledger {
    usage: UsageStore,
    batches: BatchIds,
    seq: u64,
    disk: Option<Disk>,
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    log: File,
    log_bytes: u64,
    snapshot_bytes: u64,
}

impl Disk {
    fn snapshot_path(dir: &Path) -> PathBuf {
        dir.join("snapshot.json")
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("log.ndjson")
    }
}

impl Ledger {
    /// Kept in memory only: lost with the process.
    pub fn in_memory(retention: Retention, dedup: Dedup) -> Self {
        Ledger { usage: UsageStore::new(retention), batches: BatchIds::new(dedup), seq: 0, disk: None }
    }

    /// Loads what `dir` holds (creating it if need be), as of `now_ms`, and
    /// compacts it into a fresh snapshot. One process at a time may use a directory.
    pub fn open(dir: &Path, retention: Retention, dedup: Dedup, now_ms: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut ledger = Ledger::in_memory(retention, dedup);
        let snapshot_path = Disk::snapshot_path(dir);
        let snapshot_bytes = match fs::read(&snapshot_path) {
            Ok(bytes) => {
                let snapshot: Snapshot = serde_json::from_slice(&bytes).map_err(|e| corrupt(&snapshot_path, &e))?;
                ledger.seq = snapshot.seq;
                for (at_ms, id) in snapshot.batches {
                    ledger.batches.insert(id, at_ms);
                }
                ledger.usage.add(&snapshot.rows, now_ms);
                bytes.len() as u64
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let log_path = Disk::log_path(dir);
        let mut log = OpenOptions::new().read(true).append(true).create(true).open(&log_path)?;
        let mut text = Vec::new();
        log.read_to_end(&mut text)?;
        // Only whole lines count: a last line without its newline was cut short by a crash
        // before its batch was acknowledged.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in text[..whole].split(|b| *b == b'\n').filter(|line| !line.is_empty()) {
            let entry: Entry = serde_json::from_slice(line).map_err(|e| corrupt(&log_path, &e))?;
            if entry.seq > ledger.seq {
                ledger.apply_entry(entry, now_ms);
            }
        }
        ledger.batches.prune(now_ms);
        ledger.usage.prune(now_ms);
        ledger.disk = Some(Disk { dir: dir.to_path_buf(), log, log_bytes: text.len() as u64, snapshot_bytes });
        ledger.compact()?;
        Ok(ledger)
    }

    fn apply_entry(&mut self, entry: Entry, now_ms: u64) {
        self.seq = entry.seq;
        self.usage.add(&entry.rows, now_ms);
        if let Some(id) = entry.batch {
            self.batches.insert(id, entry.at_ms);
        }
    }

    /// Applies a batch's rows unless its id was applied within the window;
    /// on disk, it is written and synced before this returns.
    pub fn apply(&mut self, batch: Option<&str>, rows: Vec<MinuteRow>, now_ms: u64) -> io::Result<Outcome> {
        self.batches.prune(now_ms);
        if batch.is_some_and(|id| self.batches.contains(id)) {
            return Ok(Outcome::Repeat);
        }
        let entry = Entry { seq: self.seq + 1, at_ms: now_ms, batch: batch.map(str::to_string), rows };
        if let Some(disk) = &mut self.disk {
            let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
            line.push(b'\n');
            let written = disk.log.write_all(&line).and_then(|()| disk.log.sync_data());
            if let Err(e) = written {
                // Whatever part of the line got out is cut off, so the next entry starts a line.
                let _ = disk.log.set_len(disk.log_bytes);
                return Err(e);
            }
            disk.log_bytes += line.len() as u64;
        }
        self.usage.prune(now_ms);
        self.apply_entry(entry, now_ms);
        if self.disk.as_ref().is_some_and(|d| d.log_bytes > d.snapshot_bytes.max(MIN_COMPACT_BYTES)) {
            // The batch is safe in the log already: a failed compaction only leaves the log longer.
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "compacting the usage log");
            }
        }
        Ok(Outcome::Applied)
    }

    /// Writes everything as a new snapshot (synced, then renamed over the old
    /// one), then empties the log. A crash between the two leaves a log whose
    /// entries the snapshot already holds; their `seq` tells.
    fn compact(&mut self) -> io::Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        let snapshot = Snapshot {
            seq: self.seq,
            batches: self.batches.order.iter().cloned().collect(),
            rows: self.usage.rows().collect(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(io::Error::other)?;
        let temporary = disk.dir.join("snapshot.json.tmp");
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, Disk::snapshot_path(&disk.dir))?;
        File::open(&disk.dir)?.sync_all()?;
        disk.log.set_len(0)?;
        disk.log.rewind()?;
        disk.log.sync_all()?;
        disk.log_bytes = 0;
        disk.snapshot_bytes = bytes.len() as u64;
        Ok(())
    }

    pub fn report(&mut self, start: u64, end: u64, now_ms: u64) -> Report {
        self.usage.prune(now_ms);
        self.usage.report(start, end)
    }
}

fn corrupt(path: &Path, e: &serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged: {e}", path.display()))
}

/// The minutes' sums in Redis. Every key shares the `{modelgate-usage}` hash
/// tag, so on Redis Cluster one batch's keys are in one slot.
const INDEX_KEY: &str = "modelgate:{modelgate-usage}:minutes";

fn minute_key(minute: u64) -> String {
    format!("modelgate:{{modelgate-usage}}:minute:{minute}")
}

fn batch_key(id: &str) -> String {
    format!("modelgate:{{modelgate-usage}}:batch:{id}")
}

/// KEYS[1]: the batch's id ('' for none); KEYS[2]: the index of minutes
/// (a sorted set); KEYS[3..]: the minutes' hashes. ARGV[1]: how long to
/// remember the id (ms); ARGV[2]: the oldest minute kept; ARGV[3]: when the
/// index expires (Unix ms); then per minute hash, its minute and expiry; then
/// per row its hash's place in KEYS, its group's field, requests, errors,
/// prompt and completion tokens, answers served from the store and their
/// tokens, and cost ('' for none). Returns 1 when applied, 0 for a repeat. A
/// hash's fields are a letter (`r`, `e`, `p`, `c`, `h`, `t`, `$`) followed
/// by the group as a JSON array; a field never written reads as 0.
const APPLY_LUA: &str = r#"
if KEYS[1] ~= '' and not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
local hashes = #KEYS - 2
for h = 1, hashes do
  local minute, expiry = ARGV[2 + 2 * h], ARGV[3 + 2 * h]
  redis.call('ZADD', KEYS[2], minute, minute)
  redis.call('PEXPIREAT', KEYS[2 + h], expiry)
end
redis.call('PEXPIREAT', KEYS[2], ARGV[3])
local names = {'r', 'e', 'p', 'c', 'h', 't'}
for i = 4 + 2 * hashes, #ARGV, 9 do
  local key, group = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  for n = 1, 6 do
    if ARGV[i + 1 + n] ~= '0' then
      redis.call('HINCRBY', key, names[n] .. group, ARGV[i + 1 + n])
    end
  end
  if ARGV[i + 8] ~= '' then
    redis.call('HINCRBYFLOAT', key, '$' .. group, ARGV[i + 8])
  end
end
return 1
"#;

/// The longest wait for a report's reads from Redis: a week's minutes take more
/// than a batch's write, which is bounded by the configured timeout.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The minutes' sums in one Redis shared by several ext-procs.
pub struct RedisUsage {
    redis: ConnectionManager,
    script: Script,
    timeout: Duration,
    retention: Retention,
    dedup: Dedup,
}

impl RedisUsage {
    /// Connects lazily, as [`crate::shared_limits::SharedLimits`] does; each batch is bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration, retention: Retention, dedup: Dedup) -> Result<Self, redis::RedisError> {
        let redis = connect_lazily(url, timeout, timeout.max(REPORT_TIMEOUT))?;
        Ok(RedisUsage { redis, script: Script::new(APPLY_LUA), timeout, retention, dedup })
    }

    pub async fn apply(&self, batch: Option<&str>, rows: &[MinuteRow], now_ms: u64) -> Result<Outcome, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.key(batch.map(batch_key).unwrap_or_default()).key(INDEX_KEY);
        let oldest = self.retention.oldest_kept(now_ms);
        let mut minutes: Vec<u64> = rows.iter().map(|row| row.minute).collect();
        minutes.dedup();
        let index_expiry = minutes
            .iter()
            .map(|m| self.retention.expiry_ms(*m))
            .fold(self.retention.expiry_ms(now_ms / crate::usage_report::MINUTE_MS), u64::max);
        invocation.arg(self.dedup.window_ms.max(1)).arg(oldest).arg(index_expiry);
        for minute in &minutes {
            invocation.key(minute_key(*minute)).arg(*minute).arg(self.retention.expiry_ms(*minute));
        }
        for row in rows {
            // Rows come sorted by minute, so a row's hash is found by the same order.
            let place = minutes.iter().position(|m| *m == row.minute).unwrap_or_default() + 3;
            let group = redis_group(&row.group);
            let t = &row.totals;
            invocation.arg(place).arg(group).arg(t.requests).arg(t.errors).arg(t.prompt_tokens);
            invocation.arg(t.completion_tokens).arg(t.cache_hits).arg(t.cached_tokens);
            invocation.arg(t.cost_usd.map(|c| c.to_string()).unwrap_or_default());
        }
        let mut redis = self.redis.clone();
        let applied: u8 = within(self.timeout, invocation.invoke_async(&mut redis)).await?;
        Ok(if applied == 1 { Outcome::Applied } else { Outcome::Repeat })
    }

    pub async fn report(&self, start: u64, end: u64, now_ms: u64) -> Result<Report, StoreError> {
        let (first, past_last) = (start.div_ceil(60).max(self.retention.oldest_kept(now_ms)), end.div_ceil(60));
        let mut usage = UsageStore::new(self.retention);
        if first < past_last {
            let mut redis = self.redis.clone();
            let mut index = redis::cmd("ZRANGEBYSCORE");
            index.arg(INDEX_KEY).arg(first).arg(past_last - 1);
            let minutes: Vec<u64> = within(REPORT_TIMEOUT, index.query_async(&mut redis)).await?;
            let mut pipe = redis::pipe();
            for minute in &minutes {
                pipe.hgetall(minute_key(*minute));
            }
            let hashes: Vec<HashMap<String, String>> = within(REPORT_TIMEOUT, pipe.query_async(&mut redis)).await?;
            for (minute, fields) in minutes.into_iter().zip(hashes) {
                usage.add(&minute_rows(minute, &fields), now_ms);
            }
        }
        Ok(usage.report(start, end))
    }
}

/// A minute's hash, as the script writes it, back as rows; fields of another shape are skipped.
fn minute_rows(minute: u64, fields: &HashMap<String, String>) -> Vec<MinuteRow> {
    let mut groups: HashMap<&str, Totals> = HashMap::new();
    for (field, value) in fields {
        let Some((name, group)) = field.split_at_checked(1) else { continue };
        let totals = groups.entry(group).or_default();
        match name {
            "r" => totals.requests = value.parse().unwrap_or_default(),
            "e" => totals.errors = value.parse().unwrap_or_default(),
            "p" => totals.prompt_tokens = value.parse().unwrap_or_default(),
            "c" => totals.completion_tokens = value.parse().unwrap_or_default(),
            "h" => totals.cache_hits = value.parse().unwrap_or_default(),
            "t" => totals.cached_tokens = value.parse().unwrap_or_default(),
            "$" => totals.cost_usd = value.parse().ok(),
            _ => {}
        }
    }
    groups
        .into_iter()
        .filter_map(|(group, totals)| Some(MinuteRow { minute, group: group_of_redis(group)?, totals }))
        .collect()
}

/// A group as a minute's hash names it: `[key, model, backend]`, with the
/// traffic after them only where it is not interactive, so the groups kept
/// before batches keep their names.
fn redis_group(group: &Group) -> String {
    let Group { key, model, backend, traffic } = group;
    match traffic {
        Traffic::Interactive => serde_json::json!([key, model, backend]),
        Traffic::Batch => serde_json::json!([key, model, backend, traffic]),
    }
    .to_string()
}

fn group_of_redis(name: &str) -> Option<Group> {
    let (key, model, backend, traffic) = match serde_json::from_str::<Vec<Value>>(name).ok()?.as_slice() {
        [key, model, backend] => (key.clone(), model.clone(), backend.clone(), Traffic::Interactive),
        [key, model, backend, traffic] => {
            (key.clone(), model.clone(), backend.clone(), serde_json::from_value(traffic.clone()).ok()?)
        }
        _ => return None,
    };
    let text = |value: Value| value.as_str().map(str::to_owned);
    Some(Group { key: text(key)?, model: text(model)?, backend: text(backend)?, traffic })
}

/// Where the admin port keeps usage: its own ledger, or Redis.
pub enum Usage {
    Local(Arc<Mutex<Ledger>>),
    Redis(RedisUsage),
}

impl Usage {
    pub fn local(ledger: Ledger) -> Self {
        Usage::Local(Arc::new(Mutex::new(ledger)))
    }

    /// Applies a batch of records once; returns only when they are durable.
    pub async fn apply(
        &self,
        batch: Option<&str>,
        records: &[UsageRecord],
        tallies: &[Tally],
        now_ms: u64,
    ) -> Result<Outcome, StoreError> {
        let retention = match self {
            Usage::Local(ledger) => lock(ledger).usage.retention(),
            Usage::Redis(redis) => redis.retention,
        };
        let rows = retention.rows(records, tallies, now_ms);
        match self {
            Usage::Local(ledger) => {
                let (ledger, batch) = (Arc::clone(ledger), batch.map(str::to_string));
                // The fsync blocks: off the threads that serve requests.
                tokio::task::spawn_blocking(move || lock(&ledger).apply(batch.as_deref(), rows, now_ms))
                    .await
                    .map_err(|e| StoreError::Disk(io::Error::other(e)))?
                    .map_err(StoreError::Disk)
            }
            Usage::Redis(redis) => redis.apply(batch, &rows, now_ms).await,
        }
    }

    pub async fn report(&self, start: u64, end: u64, now_ms: u64) -> Result<Report, StoreError> {
        match self {
            Usage::Local(ledger) => {
                // Behind a batch's fsync, and a week of minutes to sum: off the serving threads too.
                let ledger = Arc::clone(ledger);
                tokio::task::spawn_blocking(move || lock(&ledger).report(start, end, now_ms))
                    .await
                    .map_err(|e| StoreError::Disk(io::Error::other(e)))
            }
            Usage::Redis(redis) => redis.report(start, end, now_ms).await,
        }
    }
}

/// A poisoned lock only means a batch panicked midway: what is on disk is still whole.
fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::usage::Usage as Tokens;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const HOUR_MS: u64 = 3_600_000;
    const NOW: u64 = 1000 * HOUR_MS;
    const RETENTION: Retention = Retention::hours(24);
    const DEDUP: Dedup = Dedup { window_ms: HOUR_MS };

    /// A fresh directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("modelgate-usage-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let dir = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rows(key: &str, prompt_tokens: u64, at_ms: u64) -> Vec<MinuteRow> {
        let record = UsageRecord {
            at_ms,
            key: key.into(),
            status: 200,
            usage: Some(Tokens { prompt_tokens, completion_tokens: 1 }),
            cost_usd: Some(0.5),
            ..UsageRecord::default()
        };
        RETENTION.rows(&[record], &[], at_ms)
    }

    #[test]
    fn redis_names_groups_as_before_and_batch_groups_apart() {
        let group = |traffic| Group { key: "k".into(), model: "m/1".into(), backend: "b".into(), traffic };
        assert_eq!(redis_group(&group(Traffic::Interactive)), r#"["k","m/1","b"]"#, "as kept before batches");
        assert_eq!(redis_group(&group(Traffic::Batch)), r#"["k","m/1","b","batch"]"#);
        for traffic in [Traffic::Interactive, Traffic::Batch] {
            assert_eq!(group_of_redis(&redis_group(&group(traffic))), Some(group(traffic)));
        }
        for odd in
            ["", "[]", r#"["k","m"]"#, r#"["k","m","b","other"]"#, r#"["k",1,"b"]"#, r#"["k","m","b","batch",1]"#]
        {
            assert_eq!(group_of_redis(odd), None, "{odd}");
        }
    }

    fn open(dir: &TempDir, now_ms: u64) -> Ledger {
        Ledger::open(&dir.0, RETENTION, DEDUP, now_ms).unwrap()
    }

    fn tokens(ledger: &mut Ledger) -> Vec<(String, u64, u64)> {
        let report = ledger.report(0, u64::MAX, NOW);
        report.data.into_iter().map(|row| (row.key, row.requests, row.prompt_tokens)).collect()
    }

    #[test]
    fn batches_survive_a_reopen_and_a_repeat_is_still_known() {
        let dir = TempDir::new();
        let mut ledger = open(&dir, NOW);
        assert_eq!(ledger.apply(Some("a-1"), rows("k", 10, NOW), NOW).unwrap(), Outcome::Applied);
        assert_eq!(ledger.apply(Some("a-2"), rows("k", 20, NOW), NOW).unwrap(), Outcome::Applied);
        assert_eq!(ledger.apply(Some("a-1"), rows("k", 10, NOW), NOW).unwrap(), Outcome::Repeat);
        assert_eq!(ledger.apply(None, rows("j", 5, NOW), NOW).unwrap(), Outcome::Applied);
        let before = tokens(&mut ledger);
        assert_eq!(before, [("j".to_string(), 1, 5), ("k".to_string(), 2, 30)]);
        // Dropped without closing, as by a kill: what was applied is in the log.
        drop(ledger);
        let mut ledger = open(&dir, NOW + 1000);
        assert_eq!(tokens(&mut ledger), before);
        assert_eq!(ledger.apply(Some("a-2"), rows("k", 20, NOW), NOW + 1000).unwrap(), Outcome::Repeat);
        // Opened again: now from the snapshot the first reopen wrote.
        drop(ledger);
        let mut ledger = open(&dir, NOW + 2000);
        assert_eq!(tokens(&mut ledger), before);
        assert_eq!(ledger.apply(Some("a-1"), rows("k", 10, NOW), NOW + 2000).unwrap(), Outcome::Repeat);
        // Past the window an id is forgotten, and so on disk.
        let later = NOW + 2000 + DEDUP.window_ms + 1;
        assert_eq!(ledger.apply(Some("a-3"), rows("k", 1, later), later).unwrap(), Outcome::Applied);
        drop(ledger);
        let mut ledger = open(&dir, later);
        assert_eq!(ledger.batches.order.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>(), ["a-3"]);
        assert_eq!(ledger.apply(Some("a-1"), rows("k", 10, later), later).unwrap(), Outcome::Applied);
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_left_out() {
        let dir = TempDir::new();
        let mut ledger = open(&dir, NOW);
        ledger.apply(Some("a-1"), rows("k", 10, NOW), NOW).unwrap();
        drop(ledger);
        let log = Disk::log_path(&dir.0);
        let mut text = fs::read(&log).unwrap();
        // A second entry, written halfway when the process died.
        let entry = Entry { seq: 2, at_ms: NOW, batch: Some("a-2".into()), rows: rows("k", 20, NOW) };
        let line = serde_json::to_vec(&entry).unwrap();
        text.extend_from_slice(&line[..line.len() / 2]);
        fs::write(&log, &text).unwrap();
        let mut ledger = open(&dir, NOW);
        assert_eq!(tokens(&mut ledger), [("k".to_string(), 1, 10)]);
        // The filter sends it again: applied, and kept whole from then on.
        assert_eq!(ledger.apply(Some("a-2"), rows("k", 20, NOW), NOW).unwrap(), Outcome::Applied);
        drop(ledger);
        assert_eq!(tokens(&mut open(&dir, NOW)), [("k".to_string(), 2, 30)]);
    }

    #[test]
    fn a_log_the_snapshot_already_holds_is_not_replayed_again() {
        let dir = TempDir::new();
        let mut ledger = open(&dir, NOW);
        ledger.apply(None, rows("k", 10, NOW), NOW).unwrap();
        let log = fs::read(Disk::log_path(&dir.0)).unwrap();
        drop(ledger);
        // A crash after the snapshot was renamed into place, before the log was emptied.
        let mut ledger = open(&dir, NOW);
        fs::write(Disk::log_path(&dir.0), &log).unwrap();
        drop(ledger);
        ledger = open(&dir, NOW);
        assert_eq!(tokens(&mut ledger), [("k".to_string(), 1, 10)]);
    }

    #[test]
    fn a_damaged_snapshot_stops_the_start_instead_of_losing_usage() {
        let dir = TempDir::new();
        drop(open(&dir, NOW));
        fs::write(Disk::snapshot_path(&dir.0), b"{\"seq\":").unwrap();
        let error = Ledger::open(&dir.0, RETENTION, DEDUP, NOW).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("snapshot.json is damaged"), "{error}");
    }

    #[test]
    fn a_redis_minute_reads_back_as_its_rows() {
        let fields: HashMap<String, String> = [
            ("r[\"k\",\"m\",\"b\"]", "3"),
            ("p[\"k\",\"m\",\"b\"]", "30"),
            ("$[\"k\",\"m\",\"b\"]", "0.75"),
            ("h[\"k\",\"m\",\"b\"]", "2"),
            ("t[\"k\",\"m\",\"b\"]", "40"),
            ("r[\"\",\"\",\"\"]", "1"),
            ("e[\"\",\"\",\"\"]", "1"),
            ("rnot json", "1"),
            ("", "1"),
        ]
        .into_iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
        let mut rows = minute_rows(7, &fields);
        rows.sort_by(|a, b| a.group.cmp(&b.group));
        let totals: Vec<(&str, Totals)> = rows.iter().map(|r| (r.group.key.as_str(), r.totals)).collect();
        assert_eq!(
            totals,
            [
                ("", Totals { requests: 1, errors: 1, ..Totals::default() }),
                (
                    "k",
                    Totals {
                        requests: 3,
                        prompt_tokens: 30,
                        cost_usd: Some(0.75),
                        cache_hits: 2,
                        cached_tokens: 40,
                        ..Totals::default()
                    }
                ),
            ]
        );
    }

    proptest! {
        // Each case writes, syncs and reopens files.
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Whatever batches come, repeated or not, and wherever the process
        /// stops, the report counts each batch id once.
        #[test]
        fn each_batch_counts_once_across_restarts(
            batches in prop::collection::vec((prop::option::of(0..6u8), 1..100u64, any::<bool>()), 1..20)
        ) {
            let dir = TempDir::new();
            let mut ledger = open(&dir, NOW);
            let mut applied = HashSet::new();
            let mut expected = 0;
            for (i, (id, tokens, restart)) in batches.into_iter().enumerate() {
                let now = NOW + i as u64;
                let id = id.map(|n| format!("b-{n}"));
                let outcome = ledger.apply(id.as_deref(), rows("k", tokens, now), now).unwrap();
                let new = id.is_none_or(|id| applied.insert(id));
                prop_assert_eq!(outcome, if new { Outcome::Applied } else { Outcome::Repeat });
                expected += if new { tokens } else { 0 };
                if restart {
                    drop(ledger);
                    ledger = open(&dir, now);
                }
            }
            let total: u64 = ledger.report(0, u64::MAX, NOW).data.iter().map(|r| r.prompt_tokens).sum();
            prop_assert_eq!(total, expected);
        }
    }
}
