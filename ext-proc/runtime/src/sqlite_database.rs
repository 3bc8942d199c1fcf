//! How every store kept in SQLite (batch metadata, budgets) opens its
//! database: WAL, a wait for a lock another process holds a moment, and its
//! schema made or brought up to date in one transaction.

use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::path::Path;
use std::time::Duration;

/// Opens `what` (named so in errors) at `path` (`:memory:`: one in memory),
/// creating the file if missing, syncing to disk as `synchronous` says.
/// `migrate` is given the schema version found (0 for a new database) and
/// brings it to `version`; a database of a newer version is refused.
pub fn open(
    path: &Path,
    what: &str,
    synchronous: &str,
    version: i64,
    migrate: impl FnOnce(&Transaction<'_>, i64) -> rusqlite::Result<()>,
) -> Result<Connection, String> {
    let fail = |e: rusqlite::Error| format!("{what} {}: {e}", path.display());
    let mut db = Connection::open(path).map_err(fail)?;
    // Another process may hold the file a moment (one exiting as its successor starts).
    db.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
    db.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
    db.pragma_update(None, "synchronous", synchronous).map_err(fail)?;
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(fail)?;
    if found > version {
        return Err(format!(
            "{what} {}: schema version {found} is newer than this modelgate's ({version})",
            path.display()
        ));
    }
    if found < version {
        migrate(&tx, found).map_err(fail)?;
        tx.pragma_update(None, "user_version", version).map_err(fail)?;
    }
    tx.commit().map_err(fail)?;
    Ok(db)
}
