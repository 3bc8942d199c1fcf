//! Budgets on one machine: `budgets.sqlite` under the data directory. WAL
//! with `synchronous=NORMAL`: a reservation or a settlement that returned
//! survives the process being killed (the WAL is in the OS's hands), and an
//! admission, on every budgeted request, waits for no disk sync; a power
//! loss may lose the last moments' (Redis with AOF is the choice for that). Each call is one
//! immediate transaction, run off the async runtime on one connection, so
//! admissions are serialized and never reserve past a limit together.

use super::{
    charged, reservation_expiry, unit_name, unit_named, Charge, CounterState, Decision, Hold, StoreError, GRACE_SECS,
    MAX_AMOUNT, TOMBSTONE_SECS,
};
use modelgate_proto::clock;
use modelgate_runtime::sqlite_database;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Kept in `PRAGMA user_version`: a file written by a newer schema is refused.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
-- One budget of one key in one period ([`BudgetLimit::counter`]); amounts in
-- millionths of a dollar or in tokens, as `unit` says.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount TEXT NOT NULL,
    period TEXT NOT NULL,
    unit TEXT NOT NULL,
    lim INTEGER NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    resets_at INTEGER NOT NULL
);
CREATE INDEX counters_by_reset ON counters (resets_at);

-- `holds`: JSON [[unit, counter, amount], ...], what the reservation reserved where.
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    member INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    holds TEXT NOT NULL
);
CREATE INDEX reservations_by_expiry ON reservations (expires_at);
";

/// How often counters and reservations past their grace are deleted.
const PRUNE_EVERY_SECS: u64 = 3600;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(format!("budget database: {e}"))
    }
}

/// SQLite's integers are signed; every amount is below 2^53 anyway.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) struct SqliteBudgets {
    db: Arc<Mutex<Connection>>,
    /// When counters past their grace were last deleted (Unix seconds).
    pruned_at: Arc<AtomicU64>,
}

impl SqliteBudgets {
    /// Opens the database at `path` (`:memory:`: one in memory), creating it and its schema if missing.
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        // The only version yet: a database older than it is a new one.
        let db =
            sqlite_database::open(path, "budget database", "NORMAL", SCHEMA_VERSION, |tx, _| tx.execute_batch(SCHEMA))
                .map_err(StoreError)?;
        Ok(SqliteBudgets { db: Arc::new(Mutex::new(db)), pruned_at: Arc::new(AtomicU64::new(0)) })
    }

    /// Runs `work` in one immediate transaction, off the async runtime.
    async fn transaction<T: Send + 'static>(
        &self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let mut db = db.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let answer = work(&tx)?;
            tx.commit()?;
            Ok(answer)
        })
        .await
        .map_err(|e| StoreError(format!("budget database: {e}")))?
    }

    pub(super) async fn admit(
        &self,
        reservation: &str,
        candidates: &[Vec<Hold>],
        now_secs: u64,
    ) -> Result<Decision, StoreError> {
        let reservation = reservation.to_string();
        let candidates = candidates.to_vec();
        let prune = self.prune_due(now_secs);
        self.transaction(move |tx| {
            if prune {
                tx.execute("DELETE FROM counters WHERE resets_at < ?1", [int(now_secs.saturating_sub(GRACE_SECS))])?;
                tx.execute("DELETE FROM reservations WHERE expires_at < ?1", [int(now_secs)])?;
            }
            let made: Option<i64> = tx
                .query_row("SELECT member FROM reservations WHERE id = ?1", [&reservation], |row| row.get(0))
                .optional()?;
            if let Some(member) = made {
                return Ok(Decision::Admitted { member: usize::try_from(member).unwrap_or(0) });
            }
            let mut refused = None;
            for (member, holds) in candidates.iter().enumerate() {
                let mut first_refusal = None;
                for (index, hold) in holds.iter().enumerate() {
                    let (spent, reserved) = touch(tx, hold)?;
                    if first_refusal.is_none()
                        && spent.saturating_add(reserved).saturating_add(hold.amount) > hold.limit
                    {
                        first_refusal = Some(index);
                    }
                }
                if let Some(hold) = first_refusal {
                    refused.get_or_insert(Decision::Refused { member, hold });
                    continue;
                }
                let mut reserve = tx.prepare_cached("UPDATE counters SET reserved = reserved + ?2 WHERE name = ?1")?;
                for hold in holds {
                    reserve.execute(params![hold.counter, int(hold.amount)])?;
                }
                let held: Vec<(&str, &str, u64)> =
                    holds.iter().map(|hold| (unit_name(hold.unit), hold.counter.as_str(), hold.amount)).collect();
                let held = serde_json::to_string(&held).map_err(|e| StoreError(format!("encoding holds: {e}")))?;
                tx.execute(
                    "INSERT INTO reservations (id, member, expires_at, holds) VALUES (?1, ?2, ?3, ?4)",
                    params![reservation, int(member as u64), int(reservation_expiry(holds)), held],
                )?;
                return Ok(Decision::Admitted { member });
            }
            refused.ok_or_else(|| StoreError("no candidate to admit into".into()))
        })
        .await
    }

    pub(super) async fn settle(&self, settlements: Vec<(String, Charge)>) -> Result<(), StoreError> {
        let now_secs = clock::unix_seconds();
        self.transaction(move |tx| {
            let mut take =
                tx.prepare_cached("DELETE FROM reservations WHERE id = ?1 AND holds != '[]' RETURNING holds")?;
            // Settled before it was made, if ever: it never will be (a tombstone until it expires).
            let mut tombstone = tx.prepare_cached(
                "INSERT OR IGNORE INTO reservations (id, member, expires_at, holds) VALUES (?1, 0, ?2, '[]')",
            )?;
            let mut settle = tx.prepare_cached(
                "UPDATE counters SET reserved = MAX(reserved - ?2, 0), spent = MIN(spent + ?3, ?4) WHERE name = ?1",
            )?;
            for (reservation, charge) in settlements {
                let holds: Option<String> = take.query_row([&reservation], |row| row.get(0)).optional()?;
                let Some(holds) = holds else {
                    tombstone.execute(params![reservation, int(now_secs + TOMBSTONE_SECS)])?;
                    continue;
                };
                let holds: Vec<(String, String, u64)> =
                    serde_json::from_str(&holds).map_err(|e| StoreError(format!("reservation {reservation}: {e}")))?;
                for (unit, counter, amount) in holds {
                    let spent = charged(charge, unit_named(&unit)?, amount);
                    settle.execute(params![counter, int(amount), int(spent), int(MAX_AMOUNT)])?;
                }
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn counters(&self, key: Option<&str>, now_secs: u64) -> Result<Vec<CounterState>, StoreError> {
        let key = key.map(str::to_string);
        self.transaction(move |tx| {
            let mut query = tx.prepare_cached(
                "SELECT owner, scope, amount, period, unit, lim, spent, reserved, resets_at FROM counters
                 WHERE resets_at > ?1 AND (?2 IS NULL OR owner = ?2)",
            )?;
            let rows = query.query_map(params![int(now_secs), key], |row| {
                Ok((
                    (row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?),
                    (row.get::<_, String>(3)?, row.get::<_, String>(4)?),
                    (row.get::<_, i64>(5)?, row.get::<_, i64>(6)?, row.get::<_, i64>(7)?, row.get::<_, i64>(8)?),
                ))
            })?;
            let mut counters = Vec::new();
            for row in rows {
                let ((owner, scope, amount_name), (period, unit), (limit, spent, reserved, resets_at)) = row?;
                counters.push(CounterState {
                    owner,
                    scope,
                    amount_name,
                    period,
                    unit: unit_named(&unit)?,
                    limit: unsigned(limit),
                    spent: unsigned(spent),
                    reserved: unsigned(reserved),
                    resets_at: unsigned(resets_at),
                });
            }
            Ok(counters)
        })
        .await
    }

    /// Whether this call should delete what is past its grace: once an hour.
    fn prune_due(&self, now_secs: u64) -> bool {
        let last = self.pruned_at.load(Ordering::Relaxed);
        now_secs.abs_diff(last) >= PRUNE_EVERY_SECS
            && self.pruned_at.compare_exchange(last, now_secs, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// Creates `hold`'s counter if need be, with the limit this request sent
/// (configuration may have changed it), and reads what it has spent and reserved.
fn touch(tx: &rusqlite::Transaction<'_>, hold: &Hold) -> Result<(u64, u64), StoreError> {
    let info = &hold.info;
    let mut upsert = tx.prepare_cached(
        "INSERT INTO counters (name, owner, scope, amount, period, unit, lim, resets_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (name) DO UPDATE SET lim = excluded.lim
         RETURNING spent, reserved",
    )?;
    let (spent, reserved): (i64, i64) = upsert.query_row(
        params![
            hold.counter,
            info.owner,
            info.scope,
            info.amount_name,
            info.period,
            unit_name(hold.unit),
            int(hold.limit),
            int(info.resets_at)
        ],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok((unsigned(spent), unsigned(reserved)))
}
