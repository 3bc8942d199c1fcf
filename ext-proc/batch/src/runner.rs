//! The batch runner: every replica looks for batches not finished, takes one
//! it may run under a lease ([`crate::store::Lease`]), and drives it:
//!
//! 1. [`validate`]: reads the input file once, line by line; a line that is not
//!    JSON, asks for another endpoint, repeats a `custom_id`, or names a model
//!    the owner cannot use fails the batch, each with its line number;
//! 2. [`send`]: sends every line not yet finished through Envoy's listener,
//!    at the configured concurrency, committing finished lines in segments
//!    with the batch's progress; stops sending on a cancel or past the window;
//! 3. [`finalize`]: writes the output and error files from the committed
//!    segments (each line once), and the unsent lines of a cancelled or
//!    expired batch to the error file.
//!
//! A replica that dies leaves its lease to expire; another (or itself,
//! restarted) takes the batch over at the step it had reached, skipping the
//! lines already committed.

mod finalize;
pub mod gateway;
pub mod lines;
pub mod segments;
mod send;
mod validate;

use crate::blobs::{BlobError, Blobs};
use crate::ids;
use crate::store::{BatchRecord, Deletion, Lease, Meta, Progress, StoreError};
use gateway::Gateway;
use modelgate_proto::batch::{Batch, BatchStatus};
use modelgate_proto::clock;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// How often expired files are looked for, and how many are deleted at a time.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
const SWEEP_BATCH: usize = 100;

/// How a batch's run is set.
pub struct Settings {
    pub gateway: Gateway,
    /// Lines of one batch in flight at once.
    pub concurrency: usize,
    /// Batches this replica runs at once.
    pub max_running: usize,
    /// Tries a line gets on retryable failures.
    pub line_attempts: u64,
    /// Most lines an input file may hold.
    pub max_lines: u64,
    pub lease: Duration,
}

/// Runs the batches of one replica.
pub struct Runner {
    meta: Arc<Meta>,
    blobs: Arc<Blobs>,
    settings: Arc<Settings>,
    /// Woken by the API when a batch is created or a cancel is asked for.
    wake: Arc<Notify>,
    /// This replica, in its leases' tokens.
    holder: String,
}

/// Why a batch's run stopped before its end; it is taken up again later, here or elsewhere.
#[derive(Debug)]
pub enum Halt {
    /// Another replica holds the batch now.
    LeaseLost,
    /// This process is stopping.
    Stopping,
    Store(StoreError),
    Blob(BlobError),
    /// The gateway could not say which models it serves.
    Gateway(String),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Store(e)
    }
}

impl From<BlobError> for Halt {
    fn from(e: BlobError) -> Self {
        Halt::Blob(e)
    }
}

/// How a batch ends after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    Cancelled,
    Expired,
}

/// One batch being run here: what its steps share.
#[derive(Clone)]
struct Job {
    meta: Arc<Meta>,
    blobs: Arc<Blobs>,
    settings: Arc<Settings>,
    lease: Lease,
    /// Set when the lease is lost or the process stops: the run ends as soon as it can.
    halted: watch::Receiver<bool>,
}

impl Job {
    fn halted(&self) -> bool {
        *self.halted.borrow()
    }

    /// The runner's one write, fenced by the lease.
    async fn save(&self, progress: Progress<'_>) -> Result<(), Halt> {
        if self.meta.save(&self.lease, progress).await? {
            Ok(())
        } else {
            Err(Halt::LeaseLost)
        }
    }
}

impl Runner {
    pub fn new(meta: Arc<Meta>, blobs: Arc<Blobs>, settings: Settings, wake: Arc<Notify>) -> Self {
        Runner { meta, blobs, settings: Arc::new(settings), wake, holder: ids::new_id("replica-") }
    }

    /// Runs batches until `stop` resolves; then stops sending, commits what
    /// finished, and gives its leases up so other replicas take over at once.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let (stopping, stopped) = watch::channel(false);
        let running = Arc::new(Mutex::new(HashSet::<String>::new()));
        let mut jobs = JoinSet::new();
        // A lease is renewed three times a lifetime, and free batches are looked for as often.
        let tick = (self.settings.lease / 3).min(Duration::from_secs(1));
        let mut next_sweep = tokio::time::Instant::now();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(tick) => {}
                Some(_) = jobs.join_next() => {}
            }
            self.take_free_batches(&running, &mut jobs, &stopped).await;
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep += SWEEP_INTERVAL;
                self.delete_expired_files().await;
                self.delete_expired_responses().await;
            }
        }
        let _ = stopping.send(true);
        while jobs.join_next().await.is_some() {}
    }

    /// Deletes files past their `expires_at` (clients no longer see them):
    /// the record first, so a file is never listed without its bytes.
    async fn delete_expired_files(&self) {
        let expired = match self.meta.expired_files(clock::unix_seconds(), SWEEP_BATCH).await {
            Ok(expired) => expired,
            Err(e) => return tracing::warn!(error = %e, "the batch store cannot list expired files"),
        };
        for file in expired {
            match self.meta.delete_file(&file.owner, &file.file.id).await {
                Ok(Deletion::Deleted(file)) => {
                    if let Err(e) = self.blobs.delete(&file.blob).await {
                        tracing::warn!(file = %file.file.id, error = %e, "could not delete an expired file's contents");
                    }
                }
                Ok(_) => {}
                Err(e) => return tracing::warn!(error = %e, "the batch store cannot delete expired files"),
            }
        }
    }

    /// Deletes stored responses past their retention (already hidden from everyone).
    async fn delete_expired_responses(&self) {
        if let Err(e) = self.meta.delete_expired_responses(clock::unix_seconds()).await {
            tracing::warn!(error = %e, "the batch store cannot delete expired responses");
        }
    }

    async fn take_free_batches(
        &self,
        running: &Arc<Mutex<HashSet<String>>>,
        jobs: &mut JoinSet<()>,
        stopped: &watch::Receiver<bool>,
    ) {
        let active = match self.meta.active_batches().await {
            Ok(active) => active,
            Err(e) => return tracing::warn!(error = %e, "the batch store cannot list the batches to run"),
        };
        for batch_id in active {
            {
                let running = running.lock().unwrap_or_else(|p| p.into_inner());
                if running.len() >= self.settings.max_running {
                    return;
                }
                if running.contains(&batch_id) {
                    continue;
                }
            }
            let lease = match self.meta.acquire(&batch_id, &self.holder, self.settings.lease).await {
                Ok(Some(lease)) => lease,
                Ok(None) => continue,
                Err(e) => return tracing::warn!(error = %e, "the batch store cannot lease a batch"),
            };
            running.lock().unwrap_or_else(|p| p.into_inner()).insert(batch_id.clone());
            let (halt, halted) = watch::channel(false);
            let job = Job {
                meta: self.meta.clone(),
                blobs: self.blobs.clone(),
                settings: self.settings.clone(),
                lease,
                halted,
            };
            let (running, stopped) = (running.clone(), stopped.clone());
            jobs.spawn(async move {
                run_batch(job, halt, stopped).await;
                running.lock().unwrap_or_else(|p| p.into_inner()).remove(&batch_id);
            });
        }
    }
}

/// Drives one leased batch, renewing the lease as it goes, and gives the lease up at the end.
async fn run_batch(job: Job, halt: watch::Sender<bool>, mut stopped: watch::Receiver<bool>) {
    let batch_id = job.lease.batch_id.clone();
    tracing::info!(batch = %batch_id, lease = %job.lease.token, "running a batch");
    let halt = Arc::new(halt);
    let renewing = {
        let (meta, lease, ttl, halt) = (job.meta.clone(), job.lease.clone(), job.settings.lease, halt.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(ttl / 3) => {}
                    _ = stopped.wait_for(|stopped| *stopped) => {
                        let _ = halt.send(true);
                        return;
                    }
                }
                match meta.renew(&lease, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(batch = %lease.batch_id, "lost the batch's lease; another replica runs it now");
                        let _ = halt.send(true);
                        return;
                    }
                    // The lease may still be ours: the fenced writes tell.
                    Err(e) => tracing::warn!(batch = %lease.batch_id, error = %e, "could not renew the batch's lease"),
                }
            }
        })
    };
    let failed = match drive(&job).await {
        Ok(()) => return leave(job, renewing, "batch finished").await,
        Err(Halt::Stopping) => return leave(job, renewing, "batch left for later: stopping").await,
        Err(Halt::LeaseLost) => return leave(job, renewing, "batch left: another replica holds it").await,
        Err(Halt::Store(e)) => format!("the store failed: {e}"),
        Err(Halt::Blob(e)) => format!("file storage failed: {e}"),
        Err(Halt::Gateway(e)) => format!("the gateway failed: {e}"),
    };
    tracing::warn!(batch = %batch_id, error = %failed, "batch paused; it is taken up again shortly");
    // Held a little while, so a failing store or gateway is not asked again at once.
    tokio::time::sleep(job.settings.lease / 3).await;
    leave(job, renewing, "batch paused").await;
}

/// Ends a batch's run here: the lease renewals stop and the lease is given up.
async fn leave(job: Job, renewing: tokio::task::JoinHandle<()>, what: &str) {
    tracing::info!(batch = %job.lease.batch_id, "{what}");
    let batch_id = job.lease.batch_id.clone();
    renewing.abort();
    if let Err(e) = job.meta.release(&job.lease).await {
        tracing::warn!(batch = %batch_id, error = %e, "could not give the batch's lease up; it expires");
    }
}

/// Takes the batch from the step it reached to its end.
async fn drive(job: &Job) -> Result<(), Halt> {
    let Some((mut record, committed)) = job.meta.running(&job.lease.batch_id).await? else {
        return Ok(());
    };
    if record.batch.status == BatchStatus::Validating {
        if let Some(ending) = stop_reason(&record, clock::unix_seconds()) {
            return finish_unstarted(job, &record, ending).await;
        }
        record.batch = validate::validate(job, &record).await?;
    }
    let ending = match record.batch.status {
        BatchStatus::InProgress | BatchStatus::Cancelling => {
            let (ending, batch) = send::send(job, &record, &committed).await?;
            record.batch = batch;
            if ending == Ending::Completed {
                record.batch.status = BatchStatus::Finalizing;
                record.batch.finalizing_at = Some(clock::unix_seconds());
                job.save(Progress { batch: &record.batch, segment: None, files: &[] }).await?;
            }
            ending
        }
        BatchStatus::Finalizing => Ending::Completed,
        _ => return Ok(()),
    };
    let Some((record, segments)) = job.meta.running(&job.lease.batch_id).await? else {
        return Ok(());
    };
    finalize::finalize(job, &record, &segments, ending).await
}

/// Why a batch must stop sending now, if it must: a cancel asked for, or its window passed.
fn stop_reason(record: &BatchRecord, now: u64) -> Option<Ending> {
    if record.cancel_requested_at.is_some() {
        Some(Ending::Cancelled)
    } else if record.batch.expires_at.is_some_and(|at| now >= at) {
        Some(Ending::Expired)
    } else {
        None
    }
}

/// A batch cancelled or expired before it was validated: it ends with no files.
async fn finish_unstarted(job: &Job, record: &BatchRecord, ending: Ending) -> Result<(), Halt> {
    let mut batch = record.batch.clone();
    end(&mut batch, ending, clock::unix_seconds(), record.cancel_requested_at);
    job.save(Progress { batch: &batch, segment: None, files: &[] }).await
}

/// Sets the status and time of `ending`; a cancelled batch keeps when the cancel was asked for.
fn end(batch: &mut Batch, ending: Ending, now: u64, cancel_requested_at: Option<u64>) {
    let (status, at) = match ending {
        Ending::Completed => (BatchStatus::Completed, &mut batch.completed_at),
        Ending::Cancelled => (BatchStatus::Cancelled, &mut batch.cancelled_at),
        Ending::Expired => (BatchStatus::Expired, &mut batch.expired_at),
    };
    *at = Some(now);
    batch.status = status;
    if ending == Ending::Cancelled {
        batch.cancelling_at.get_or_insert(cancel_requested_at.unwrap_or(now));
    }
}
