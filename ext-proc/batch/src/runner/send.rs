//! A batch's second step: every line not yet finished sent through Envoy's
//! listener, at the configured concurrency, and the finished ones committed
//! in segments with the batch's counts, about once a second.

use super::gateway::{next, Answer, Gateway, Next};
use super::lines::{lines, ReadError, MAX_LINE_BYTES};
use super::segments::{self, Finished, LineSet};
use super::validate::input_blob;
use super::{stop_reason, Ending, Halt, Job};
use crate::ids;
use crate::store::{BatchRecord, Progress};
use bytes::Bytes;
use futures_util::StreamExt;
use modelgate_proto::batch::{Batch, InputLine, LineFailure, OutputLine};
use modelgate_proto::clock;
use modelgate_proto::endpoint::Endpoint;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// A segment is committed once it holds this many lines, or after [`COMMIT_INTERVAL`].
const SEGMENT_LINES: usize = 256;
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How often a running batch looks for a cancel.
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Sends the lines not yet finished (those in no `committed` segment); how
/// the sending ended, and the batch as last saved.
pub(super) async fn send(job: &Job, record: &BatchRecord, committed: &[String]) -> Result<(Ending, Batch), Halt> {
    let (done, batch) = finished_so_far(job, record, committed).await?;
    let Some(blob) = input_blob(job, record).await? else {
        // Validated, then gone (it cannot be deleted while used): nothing more can be sent.
        return Ok((Ending::Completed, batch));
    };
    let stop = Stop::watch(job, record);
    let (results, committing) = mpsc::channel(job.settings.concurrency * 2);
    let committer = tokio::spawn(commit(job.clone(), batch, committing));
    let endpoint = Endpoint::from_path(record.batch.endpoint.as_bytes()).unwrap_or(Endpoint::ChatCompletions);
    let slots = Arc::new(Semaphore::new(job.settings.concurrency));
    let mut input = lines(job.blobs.read(&blob).await?, MAX_LINE_BYTES);
    let mut outcome = Ok(Ending::Completed);
    while let Some(line) = input.next().await {
        let line = match line {
            Ok(line) => line,
            // Validation refused overlong lines: none is met here.
            Err(ReadError::TooLong(_)) => continue,
            Err(ReadError::Blob(e)) => {
                outcome = Err(Halt::Blob(e));
                break;
            }
        };
        if line.is_blank() || done.contains(line.number) {
            continue;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        // A committer that ended early lost the lease or its store: nothing more would count.
        if job.halted() || committer.is_finished() {
            outcome = Err(Halt::Stopping);
            break;
        }
        if let Some(reason) = stop.reason() {
            outcome = Ok(reason);
            break;
        }
        let line_run = LineRun {
            gateway: job.settings.gateway.clone(),
            endpoint,
            owner: record.owner.clone(),
            attempts: job.settings.line_attempts,
            stop: stop.clone(),
            job_halted: job.halted.clone(),
        };
        let results = results.clone();
        tokio::spawn(async move {
            if let Some(finished) = line_run.send(line.number, &line.bytes).await {
                let _ = results.send(finished).await;
            }
            drop(slot);
        });
    }
    drop(results);
    // The lines in flight finish (or give up on a stop), and the last segment is committed.
    let committed = committer.await.map_err(|_| Halt::Stopping)?;
    stop.end();
    let batch = committed?;
    let ending = outcome?;
    if job.halted() {
        return Err(Halt::Stopping);
    }
    if ending != Ending::Completed {
        return Ok((ending, batch));
    }
    // A cancel or the window's end may have come while the last lines were in flight.
    let now = job.meta.batch(&record.owner, &record.batch.id).await?;
    let late = now.and_then(|now| stop_reason(&now, clock::unix_seconds()));
    Ok((late.unwrap_or(ending), batch))
}

/// The lines committed so far, and the batch with its counts recounted from them.
async fn finished_so_far(job: &Job, record: &BatchRecord, committed: &[String]) -> Result<(LineSet, Batch), Halt> {
    let mut done = LineSet::default();
    let mut batch = record.batch.clone();
    batch.request_counts.completed = 0;
    batch.request_counts.failed = 0;
    for segment in committed {
        let mut finished = lines(job.blobs.read(segment).await?, MAX_LINE_BYTES);
        while let Some(line) = finished.next().await {
            let line = line.map_err(|e| match e {
                ReadError::Blob(e) => Halt::Blob(e),
                ReadError::TooLong(_) => {
                    Halt::Blob(crate::blobs::BlobError::Other(format!("{segment}: a line too long")))
                }
            })?;
            let Ok(one) = serde_json::from_slice::<Finished>(&line.bytes) else { continue };
            if done.insert(one.line) {
                if one.failed {
                    batch.request_counts.failed += 1;
                } else {
                    batch.request_counts.completed += 1;
                }
            }
        }
    }
    Ok((done, batch))
}

/// Why sending must stop: a cancel (looked up in the store once a
/// [`CANCEL_POLL`]) or the end of the window.
#[derive(Clone)]
struct Stop {
    cancelled: Arc<AtomicBool>,
    expires_at: Option<u64>,
    watcher: Arc<tokio::task::JoinHandle<()>>,
}

impl Stop {
    fn watch(job: &Job, record: &BatchRecord) -> Self {
        let cancelled = Arc::new(AtomicBool::new(record.cancel_requested_at.is_some()));
        let (meta, owner, id, flag) =
            (job.meta.clone(), record.owner.clone(), record.batch.id.clone(), cancelled.clone());
        let watcher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(CANCEL_POLL).await;
                if let Ok(Some(now)) = meta.batch(&owner, &id).await {
                    if stop_reason(&now, 0) == Some(Ending::Cancelled) {
                        flag.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
        Stop { cancelled, expires_at: record.batch.expires_at, watcher: Arc::new(watcher) }
    }

    fn reason(&self) -> Option<Ending> {
        if self.cancelled.load(Ordering::Relaxed) {
            Some(Ending::Cancelled)
        } else if self.expires_at.is_some_and(|at| clock::unix_seconds() >= at) {
            Some(Ending::Expired)
        } else {
            None
        }
    }

    fn end(&self) {
        self.watcher.abort();
    }
}

/// What sending one line needs.
struct LineRun {
    gateway: Gateway,
    endpoint: Endpoint,
    owner: String,
    attempts: u64,
    stop: Stop,
    job_halted: tokio::sync::watch::Receiver<bool>,
}

impl LineRun {
    /// The line's result; none when the batch stopped before the line finished
    /// (it is then sent again later, or ends cancelled or expired).
    async fn send(&self, number: u64, line: &[u8]) -> Option<Finished> {
        let parsed = match InputLine::parse(line, self.endpoint) {
            Ok(parsed) => parsed,
            // Validated already: only a file changed under the batch gets here.
            Err(e) => {
                let failure = LineFailure { code: e.code.into(), message: e.message };
                return Some(finished(number, String::new(), Answer::None(failure)));
            }
        };
        let body = Bytes::from(serde_json::to_vec(&parsed.body).unwrap_or_default());
        let mut tries = 0;
        loop {
            tries += 1;
            let called = self.gateway.call(self.endpoint.path(), &self.owner, body.clone()).await;
            let wait = match next(&called, tries, self.attempts) {
                Next::Done => return Some(finished(number, parsed.custom_id, called.answer)),
                Next::Retry(wait) => wait,
                Next::Wait(wait) => {
                    tries -= 1;
                    wait
                }
            };
            tokio::time::sleep(wait).await;
            if *self.job_halted.borrow() || self.stop.reason().is_some() {
                return None;
            }
        }
    }
}

fn finished(line: u64, custom_id: String, answer: Answer) -> Finished {
    let id = ids::new_id(ids::LINE);
    let (failed, response, error) = match answer {
        Answer::Http(response) => (!(200..300).contains(&response.status_code), Some(response), None),
        Answer::None(failure) => (true, None, Some(failure)),
    };
    Finished { line, failed, output: OutputLine { id, custom_id, response, error } }
}

/// Commits finished lines in segments, with the counts, until the senders are
/// done; the batch as last saved.
async fn commit(job: Job, mut batch: Batch, mut results: mpsc::Receiver<Finished>) -> Result<Batch, Halt> {
    let mut pending = Vec::new();
    let mut written = 0u64;
    let mut open = true;
    while open {
        let deadline = tokio::time::sleep(COMMIT_INTERVAL);
        tokio::pin!(deadline);
        while open && pending.len() < SEGMENT_LINES {
            tokio::select! {
                one = results.recv() => match one {
                    Some(one) => pending.push(one),
                    None => open = false,
                },
                () = &mut deadline, if !pending.is_empty() => break,
            }
        }
        if pending.is_empty() {
            continue;
        }
        let key = segments::key(&batch.id, &job.lease.token, written);
        written += 1;
        job.blobs.put_new(&key, segments::encode(&pending).into()).await?;
        for one in pending.drain(..) {
            if one.failed {
                batch.request_counts.failed += 1;
            } else {
                batch.request_counts.completed += 1;
            }
        }
        job.save(Progress { batch: &batch, segment: Some(&key), files: &[] }).await?;
    }
    Ok(batch)
}
