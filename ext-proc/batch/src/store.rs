//! Batch and file metadata: in SQLite under the data directory on one machine
//! ([`sqlite`]), or in Redis shared by several replicas ([`redis`]). Both keep
//! the same records with the same guarantees:
//!
//! - every write is durable before it returns (SQLite: WAL, `synchronous=FULL`);
//! - a batch is run under a [`Lease`] with expiry, held by one replica at a
//!   time; the runner's writes ([`Meta::save`]) are fenced by it, so a replica
//!   that lost its lease (paused past its expiry, say) changes nothing;
//! - one [`Meta::save`] is atomic: the batch object, the result segment it
//!   commits and the files it registers are written together or not at all.
//!
//! Records belong to an owner: the client key's name (empty on a gateway
//! without keys). Another owner's record is not found.
//!
//! The same store keeps the Responses API's stored responses
//! ([`StoredResponse`]), each until its expiry: hidden from then on, and
//! deleted by Redis itself or by the runner's sweep ([`Meta::delete_expired_responses`]).

pub mod redis;
pub mod sqlite;

use modelgate_proto::batch::{Batch, BatchStatus, FileObject};
use modelgate_proto::stored_response::StoredResponse;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The store could not be reached or could not keep a write: answered 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A stored file: its object, who owns it, and where its bytes are ([`crate::blobs`]).
/// Both stores keep it as this struct's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub owner: String,
    pub file: FileObject,
    pub blob: String,
}

impl FileRecord {
    /// Past its `expires_at`: hidden from its owner, and due for deletion.
    pub fn expired(&self, now: u64) -> bool {
        self.file.expires_at.is_some_and(|at| at <= now)
    }
}

/// A stored batch: its object as the runner last saved it, who owns it, and
/// when a cancel was asked for. The API writes only the creation and the
/// cancel; everything else is the runner's, under its lease.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub owner: String,
    pub batch: Batch,
    pub cancel_requested_at: Option<u64>,
}

impl BatchRecord {
    /// The batch as a client sees it: `cancelling` from the moment a cancel is
    /// asked for, until the runner finishes it.
    pub fn view(&self) -> Batch {
        let mut batch = self.batch.clone();
        if let (Some(at), false) = (self.cancel_requested_at, batch.status.is_terminal()) {
            batch.status = BatchStatus::Cancelling;
            batch.cancelling_at.get_or_insert(at);
        }
        batch
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// `GET /v1/files`' query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileQuery {
    pub purpose: Option<String>,
    pub order: Order,
    /// The id the page starts after (in `order`).
    pub after: Option<String>,
    pub limit: usize,
}

/// One page of a list, and whether more follow it.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    Deleted(FileRecord),
    NotFound,
    /// The input file of a batch that is not finished.
    InUse {
        batch_id: String,
    },
}

/// The right to run one batch, until it expires unless renewed. `token` is
/// unique to this holding (a replica's id and a counter): fencing compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub batch_id: String,
    pub token: String,
}

/// One fenced write by the runner.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The batch as it is now (status, times, counts, files).
    pub batch: &'a Batch,
    /// A segment of results (a blob key) committed with this write.
    pub segment: Option<&'a str>,
    /// Files the batch wrote (its output and errors), registered with this write.
    pub files: &'a [FileRecord],
}

/// The metadata store in use.
pub enum Meta {
    Sqlite(sqlite::SqliteMeta),
    Redis(redis::RedisMeta),
}

/// A new lease token for `holder`: the holder, the time and randomness
/// ([`crate::ids`]), so a holder that restarts never reuses an old token.
fn lease_token(holder: &str) -> String {
    crate::ids::new_id(&format!("{holder}/"))
}

fn encode<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError(format!("encoding a record: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| StoreError(format!("a stored record is unreadable: {e}")))
}

macro_rules! each {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Meta::Sqlite($store) => $call,
            Meta::Redis($store) => $call,
        }
    };
}

impl Meta {
    /// Redis at `redis_url` when one is given (several replicas share it),
    /// else SQLite at `<data_dir>/batches.sqlite`.
    pub fn open(
        redis_url: Option<&str>,
        data_dir: &Path,
        redis_timeout: Duration,
    ) -> std::result::Result<Meta, String> {
        match redis_url {
            Some(url) => redis::RedisMeta::new(url, redis_timeout).map(Meta::Redis),
            None => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| format!("creating the data directory {}: {e}", data_dir.display()))?;
                sqlite::SqliteMeta::open(&data_dir.join("batches.sqlite")).map(Meta::Sqlite)
            }
        }
    }

    pub async fn insert_file(&self, record: &FileRecord) -> Result<()> {
        each!(self, s => s.insert_file(record).await)
    }

    /// The owner's file; expired files are not found.
    pub async fn file(&self, owner: &str, id: &str, now: u64) -> Result<Option<FileRecord>> {
        each!(self, s => s.file(owner, id, now).await)
    }

    /// The owner's files, by id in `query.order`; expired files are left out.
    pub async fn list_files(&self, owner: &str, query: &FileQuery, now: u64) -> Result<Page<FileRecord>> {
        each!(self, s => s.list_files(owner, query, now).await)
    }

    /// Deletes the owner's file record (the caller deletes its blob after).
    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<Deletion> {
        each!(self, s => s.delete_file(owner, id).await)
    }

    /// Files whose `expires_at` has passed, at most `limit`, to delete.
    pub async fn expired_files(&self, now: u64, limit: usize) -> Result<Vec<FileRecord>> {
        each!(self, s => s.expired_files(now, limit).await)
    }

    /// A new batch: its input file is in use until the batch is finished, and
    /// the batch is active (the runners look for it).
    pub async fn insert_batch(&self, record: &BatchRecord) -> Result<()> {
        each!(self, s => s.insert_batch(record).await)
    }

    pub async fn batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        each!(self, s => s.batch(owner, id).await)
    }

    /// The owner's batches, newest first, starting after `after`.
    pub async fn list_batches(&self, owner: &str, after: Option<&str>, limit: usize) -> Result<Page<BatchRecord>> {
        each!(self, s => s.list_batches(owner, after, limit).await)
    }

    /// Asks for the owner's batch to be cancelled, at `at`, unless it is
    /// finished or a cancel was asked for already; the record as it is after.
    pub async fn request_cancel(&self, owner: &str, id: &str, at: u64) -> Result<Option<BatchRecord>> {
        each!(self, s => s.request_cancel(owner, id, at).await)
    }

    /// Ids of the batches not finished, for the runners.
    pub async fn active_batches(&self) -> Result<Vec<String>> {
        each!(self, s => s.active_batches().await)
    }

    /// Takes the batch's lease for `holder` unless another holds it unexpired.
    pub async fn acquire(&self, batch_id: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        each!(self, s => s.acquire(batch_id, holder, ttl).await)
    }

    /// Extends the lease; false when it is no longer held (expired and taken).
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool> {
        each!(self, s => s.renew(lease, ttl).await)
    }

    /// Gives the lease up, if still held.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        each!(self, s => s.release(lease).await)
    }

    /// A batch by id alone, with the segments committed for it, in commit order.
    pub async fn running(&self, batch_id: &str) -> Result<Option<(BatchRecord, Vec<String>)>> {
        each!(self, s => s.running(batch_id).await)
    }

    /// The runner's write, fenced by `lease` and atomic: false (nothing
    /// written) when the lease is no longer held. A terminal status also ends
    /// the batch's activity: it leaves the active set, its input file is free,
    /// and its segments are forgotten.
    pub async fn save(&self, lease: &Lease, progress: Progress<'_>) -> Result<bool> {
        each!(self, s => s.save(lease, progress).await)
    }

    /// Keeps the owner's response until `expires_at` (unix seconds). A write
    /// repeated after a lost answer lands once; another owner's id is left alone.
    pub async fn put_response(&self, owner: &str, stored: &StoredResponse, expires_at: u64) -> Result<()> {
        each!(self, s => s.put_response(owner, stored, expires_at).await)
    }

    /// The owner's response; an expired one is not found.
    pub async fn response(&self, owner: &str, id: &str, now: u64) -> Result<Option<StoredResponse>> {
        each!(self, s => s.response(owner, id, now).await)
    }

    /// Deletes the owner's response; false when there is none (or it expired).
    pub async fn delete_response(&self, owner: &str, id: &str, now: u64) -> Result<bool> {
        each!(self, s => s.delete_response(owner, id, now).await)
    }

    /// Deletes responses past their expiry, how many. Redis expires its own keys: none there.
    pub async fn delete_expired_responses(&self, now: u64) -> Result<usize> {
        match self {
            Meta::Sqlite(s) => s.delete_expired_responses(now).await,
            Meta::Redis(_) => Ok(0),
        }
    }
}
