//! Batch metadata on one machine: one SQLite file under the data directory,
//! nothing to run. WAL with `synchronous=FULL`, so a write that returned is on
//! disk; each call is one transaction, run off the async runtime on one
//! connection. Records are kept as JSON, beside the columns the queries need.
//!
//! Leases expire on this machine's wall clock: only its own processes share
//! the file.

use super::*;
use modelgate_proto::clock;
use modelgate_runtime::sqlite_database;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::sync::{Arc, Mutex, PoisonError};

/// Kept in `PRAGMA user_version`: a file written by a newer schema is refused,
/// an older one is brought up to date ([`MIGRATIONS`]).
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    expires_at INTEGER,
    record TEXT NOT NULL
);
CREATE INDEX files_by_owner ON files (owner, id);
CREATE INDEX files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

-- `active` until the batch's status is terminal; `batch` is the Batch object's JSON.
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    active INTEGER NOT NULL,
    cancel_requested_at INTEGER,
    batch TEXT NOT NULL
);
CREATE INDEX batches_by_owner ON batches (owner, id);
CREATE INDEX active_batches_by_input ON batches (input_file_id) WHERE active;

CREATE TABLE leases (
    batch_id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
);

-- AUTOINCREMENT: `seq` never goes back, so it is the commit order.
CREATE TABLE segments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    blob TEXT NOT NULL,
    UNIQUE (batch_id, blob)
);
";

/// What each version adds to the one before it: `MIGRATIONS[v - 1]` makes version `v + 1`.
const MIGRATIONS: [&str; 1] = ["
-- The Responses API's stored responses; `record` is the StoredResponse's JSON.
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX responses_by_expiry ON responses (expires_at);
"];

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(format!("batch database: {e}"))
    }
}

/// SQLite's integers are signed; times this far out mean "never" all the same.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    int(clock::unix_millis())
}

/// The columns `batch_record` reads, in its order.
const BATCH_COLUMNS: &str = "owner, cancel_requested_at, batch";

fn batch_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Option<i64>, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

fn into_batch_record((owner, cancel_requested_at, batch): (String, Option<i64>, String)) -> Result<BatchRecord> {
    Ok(BatchRecord {
        owner,
        batch: decode(&batch)?,
        cancel_requested_at: cancel_requested_at.map(|at| u64::try_from(at).unwrap_or(0)),
    })
}

/// `limit + 1` rows read: the extra one only tells whether more follow.
fn page<T>(mut items: Vec<T>, limit: usize) -> Page<T> {
    let has_more = items.len() > limit;
    items.truncate(limit);
    Page { items, has_more }
}

/// Replaces a record of the same id: a write repeated after a lost answer lands once.
fn insert_file_row(db: &Connection, record: &FileRecord) -> Result<()> {
    db.execute(
        "INSERT OR REPLACE INTO files (id, owner, purpose, expires_at, record) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![record.file.id, record.owner, record.file.purpose, record.file.expires_at.map(int), encode(record)?],
    )?;
    Ok(())
}

fn lease_held(db: &Connection, lease: &Lease, now: i64) -> Result<bool> {
    Ok(db
        .query_row(
            "SELECT 1 FROM leases WHERE batch_id = ?1 AND token = ?2 AND expires_at_ms > ?3",
            params![lease.batch_id, lease.token, now],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

pub struct SqliteMeta {
    db: Arc<Mutex<Connection>>,
}

impl SqliteMeta {
    /// Opens the database at `path`, creating it and its schema if missing.
    pub fn open(path: &Path) -> std::result::Result<Self, String> {
        let db = sqlite_database::open(path, "batch database", "FULL", SCHEMA_VERSION, |tx, version| {
            if version == 0 {
                tx.execute_batch(SCHEMA)?;
            }
            for migration in MIGRATIONS.iter().skip(usize::try_from(version.max(1) - 1).unwrap_or(0)) {
                tx.execute_batch(migration)?;
            }
            Ok(())
        })?;
        Ok(SqliteMeta { db: Arc::new(Mutex::new(db)) })
    }

    /// Runs `work` on the connection, off the async runtime: SQLite blocks on the disk.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            // A panic mid-call rolled its transaction back when it unwound: the connection is sound.
            let mut db = db.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut db)
        })
        .await
        .map_err(|e| StoreError(format!("batch database call: {e}")))?
    }

    pub async fn insert_file(&self, record: &FileRecord) -> Result<()> {
        let record = record.clone();
        self.run(move |db| insert_file_row(db, &record)).await
    }

    pub async fn file(&self, owner: &str, id: &str, now: u64) -> Result<Option<FileRecord>> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            db.query_row(
                "SELECT record FROM files WHERE id = ?1 AND owner = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                params![id, owner, int(now)],
                |row| row.get::<_, String>(0),
            )
            .optional()?
            .map(|json| decode(&json))
            .transpose()
        })
        .await
    }

    pub async fn list_files(&self, owner: &str, query: &FileQuery, now: u64) -> Result<Page<FileRecord>> {
        let (owner, query) = (owner.to_string(), query.clone());
        self.run(move |db| {
            let sql = match query.order {
                Order::Asc => {
                    "SELECT record FROM files WHERE owner = ?1 AND (?2 IS NULL OR purpose = ?2)
                     AND (expires_at IS NULL OR expires_at > ?3) AND (?4 IS NULL OR id > ?4)
                     ORDER BY id ASC LIMIT ?5"
                }
                Order::Desc => {
                    "SELECT record FROM files WHERE owner = ?1 AND (?2 IS NULL OR purpose = ?2)
                     AND (expires_at IS NULL OR expires_at > ?3) AND (?4 IS NULL OR id < ?4)
                     ORDER BY id DESC LIMIT ?5"
                }
            };
            let mut statement = db.prepare_cached(sql)?;
            let rows = statement.query_map(
                params![owner, query.purpose, int(now), query.after, int(query.limit as u64 + 1)],
                |row| row.get::<_, String>(0),
            )?;
            let items = rows.map(|json| decode(&json?)).collect::<Result<Vec<FileRecord>>>()?;
            Ok(page(items, query.limit))
        })
        .await
    }

    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<Deletion> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(record) = tx
                .query_row("SELECT record FROM files WHERE id = ?1 AND owner = ?2", params![id, owner], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?
            else {
                return Ok(Deletion::NotFound);
            };
            let user = tx
                .query_row(
                    "SELECT id FROM batches WHERE input_file_id = ?1 AND active ORDER BY id LIMIT 1",
                    params![id],
                    |row| row.get::<_, String>(0),
                )
                .optional()?;
            if let Some(batch_id) = user {
                return Ok(Deletion::InUse { batch_id });
            }
            tx.execute("DELETE FROM files WHERE id = ?1", params![id])?;
            tx.commit()?;
            Ok(Deletion::Deleted(decode(&record)?))
        })
        .await
    }

    pub async fn expired_files(&self, now: u64, limit: usize) -> Result<Vec<FileRecord>> {
        self.run(move |db| {
            let mut statement =
                db.prepare_cached("SELECT record FROM files WHERE expires_at <= ?1 ORDER BY expires_at, id LIMIT ?2")?;
            let rows = statement.query_map(params![int(now), int(limit as u64)], |row| row.get::<_, String>(0))?;
            rows.map(|json| decode(&json?)).collect()
        })
        .await
    }

    pub async fn insert_batch(&self, record: &BatchRecord) -> Result<()> {
        let record = record.clone();
        self.run(move |db| {
            let batch = &record.batch;
            db.execute(
                "INSERT INTO batches (id, owner, input_file_id, active, cancel_requested_at, batch)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    batch.id,
                    record.owner,
                    batch.input_file_id,
                    !batch.status.is_terminal(),
                    record.cancel_requested_at.map(int),
                    encode(batch)?
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            db.query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND owner = ?2"),
                params![id, owner],
                batch_record,
            )
            .optional()?
            .map(into_batch_record)
            .transpose()
        })
        .await
    }

    pub async fn list_batches(&self, owner: &str, after: Option<&str>, limit: usize) -> Result<Page<BatchRecord>> {
        let (owner, after) = (owner.to_string(), after.map(str::to_string));
        self.run(move |db| {
            let mut statement = db.prepare_cached(&format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = ?1 AND (?2 IS NULL OR id < ?2)
                 ORDER BY id DESC LIMIT ?3"
            ))?;
            let rows = statement.query_map(params![owner, after, int(limit as u64 + 1)], batch_record)?;
            let items = rows.map(|row| into_batch_record(row?)).collect::<Result<Vec<_>>>()?;
            Ok(page(items, limit))
        })
        .await
    }

    pub async fn request_cancel(&self, owner: &str, id: &str, at: u64) -> Result<Option<BatchRecord>> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE batches SET cancel_requested_at = ?3
                 WHERE id = ?1 AND owner = ?2 AND active AND cancel_requested_at IS NULL",
                params![id, owner, int(at)],
            )?;
            let record = tx
                .query_row(
                    &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND owner = ?2"),
                    params![id, owner],
                    batch_record,
                )
                .optional()?;
            tx.commit()?;
            record.map(into_batch_record).transpose()
        })
        .await
    }

    pub async fn active_batches(&self) -> Result<Vec<String>> {
        self.run(|db| {
            let mut statement = db.prepare_cached("SELECT id FROM batches WHERE active ORDER BY id")?;
            let ids = statement.query_map([], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?;
            Ok(ids)
        })
        .await
    }

    pub async fn acquire(&self, batch_id: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        let lease = Lease { batch_id: batch_id.to_string(), token: lease_token(holder) };
        self.run(move |db| {
            let now = now_ms();
            let taken = db.execute(
                "INSERT INTO leases (batch_id, token, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (batch_id) DO UPDATE SET token = ?2, expires_at_ms = ?3 WHERE expires_at_ms <= ?4",
                params![lease.batch_id, lease.token, now.saturating_add(millis(ttl)), now],
            )?;
            Ok((taken == 1).then_some(lease))
        })
        .await
    }

    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        let lease = lease.clone();
        self.run(move |db| {
            let now = now_ms();
            let renewed = db.execute(
                "UPDATE leases SET expires_at_ms = ?3 WHERE batch_id = ?1 AND token = ?2 AND expires_at_ms > ?4",
                params![lease.batch_id, lease.token, now.saturating_add(millis(ttl)), now],
            )?;
            Ok(renewed == 1)
        })
        .await
    }

    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let lease = lease.clone();
        self.run(move |db| {
            db.execute("DELETE FROM leases WHERE batch_id = ?1 AND token = ?2", params![lease.batch_id, lease.token])?;
            Ok(())
        })
        .await
    }

    pub async fn running(&self, batch_id: &str) -> Result<Option<(BatchRecord, Vec<String>)>> {
        let batch_id = batch_id.to_string();
        self.run(move |db| {
            let tx = db.transaction()?;
            let Some(row) = tx
                .query_row(
                    &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
                    params![batch_id],
                    batch_record,
                )
                .optional()?
            else {
                return Ok(None);
            };
            let segments = {
                let mut statement = tx.prepare_cached("SELECT blob FROM segments WHERE batch_id = ?1 ORDER BY seq")?;
                let rows = statement.query_map(params![batch_id], |row| row.get(0))?;
                rows.collect::<rusqlite::Result<Vec<String>>>()?
            };
            Ok(Some((into_batch_record(row)?, segments)))
        })
        .await
    }

    pub async fn save(&self, lease: &Lease, progress: Progress<'_>) -> Result<bool> {
        let lease = lease.clone();
        let batch = progress.batch.clone();
        let segment = progress.segment.map(str::to_string);
        let files = progress.files.to_vec();
        self.run(move |db| {
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !lease_held(&tx, &lease, now_ms())? {
                return Ok(false);
            }
            let terminal = batch.status.is_terminal();
            let updated = tx.execute(
                "UPDATE batches SET batch = ?2, active = ?3 WHERE id = ?1",
                params![lease.batch_id, encode(&batch)?, !terminal],
            )?;
            if updated == 0 {
                return Ok(false);
            }
            if terminal {
                tx.execute("DELETE FROM segments WHERE batch_id = ?1", params![lease.batch_id])?;
            } else if let Some(segment) = segment {
                // A save repeated after a lost answer commits its segment once.
                tx.execute(
                    "INSERT OR IGNORE INTO segments (batch_id, blob) VALUES (?1, ?2)",
                    params![lease.batch_id, segment],
                )?;
            }
            for file in &files {
                insert_file_row(&tx, file)?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    pub async fn put_response(&self, owner: &str, stored: &StoredResponse, expires_at: u64) -> Result<()> {
        let (owner, id, record) = (owner.to_string(), stored.id().to_string(), encode(stored)?);
        self.run(move |db| {
            db.execute(
                "INSERT INTO responses (id, owner, expires_at, record) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET expires_at = ?3, record = ?4 WHERE owner = ?2",
                params![id, owner, int(expires_at), record],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn response(&self, owner: &str, id: &str, now: u64) -> Result<Option<StoredResponse>> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            db.query_row(
                "SELECT record FROM responses WHERE id = ?1 AND owner = ?2 AND expires_at > ?3",
                params![id, owner, int(now)],
                |row| row.get::<_, String>(0),
            )
            .optional()?
            .map(|json| decode(&json))
            .transpose()
        })
        .await
    }

    pub async fn delete_response(&self, owner: &str, id: &str, now: u64) -> Result<bool> {
        let (owner, id) = (owner.to_string(), id.to_string());
        self.run(move |db| {
            let deleted = db.execute(
                "DELETE FROM responses WHERE id = ?1 AND owner = ?2 AND expires_at > ?3",
                params![id, owner, int(now)],
            )?;
            Ok(deleted == 1)
        })
        .await
    }

    pub async fn delete_expired_responses(&self, now: u64) -> Result<usize> {
        self.run(move |db| Ok(db.execute("DELETE FROM responses WHERE expires_at <= ?1", params![int(now)])?)).await
    }
}
