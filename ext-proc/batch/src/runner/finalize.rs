//! A batch's last step: its output and error files written from the committed
//! segments, each line once (the first result committed for it), then the
//! lines a cancel or the window's end left unsent, as errors. The files and
//! the batch's end are saved in one fenced write; a run cut off before it
//! leaves files no record names, and the next run writes them anew.

use super::lines::{lines, ReadError, MAX_LINE_BYTES};
use super::segments::{Finished, LineSet};
use super::validate::input_blob;
use super::{end, Ending, Halt, Job};
use crate::blobs::{BlobError, BlobWriter};
use crate::ids;
use crate::store::{BatchRecord, FileRecord, Progress};
use futures_util::StreamExt;
use modelgate_proto::batch::{FileObject, InputLine, LineFailure, OutputLine, BATCH_OUTPUT};
use modelgate_proto::clock;
use modelgate_proto::endpoint::Endpoint;

/// One of the files a batch writes, opened at its first line.
struct Output {
    kind: &'static str,
    open: Option<(String, BlobWriter)>,
}

impl Output {
    fn new(kind: &'static str) -> Self {
        Output { kind, open: None }
    }

    async fn write(&mut self, job: &Job, line: &OutputLine) -> Result<(), Halt> {
        let (_, writer) = match &mut self.open {
            Some(open) => open,
            None => {
                let id = ids::new_id(ids::FILE);
                let writer = job.blobs.writer(&format!("files/{id}")).await?;
                self.open.insert((id, writer))
            }
        };
        let mut bytes = serde_json::to_vec(line).unwrap_or_default();
        bytes.push(b'\n');
        writer.push(bytes.into()).await?;
        Ok(())
    }

    /// The file written, if any line was.
    async fn finish(self, record: &BatchRecord, now: u64) -> Result<Option<FileRecord>, Halt> {
        let Some((id, writer)) = self.open else { return Ok(None) };
        let bytes = writer.finish().await?;
        let filename = format!("{}_{}.jsonl", record.batch.id, self.kind);
        let file = FileObject::new(id.clone(), bytes, now, filename, BATCH_OUTPUT.into());
        Ok(Some(FileRecord { owner: record.owner.clone(), file, blob: format!("files/{id}") }))
    }
}

pub(super) async fn finalize(job: &Job, record: &BatchRecord, segments: &[String], ending: Ending) -> Result<(), Halt> {
    let mut seen = LineSet::default();
    let mut batch = record.batch.clone();
    batch.request_counts.completed = 0;
    batch.request_counts.failed = 0;
    let (mut output, mut errors) = (Output::new("output"), Output::new("errors"));
    for segment in segments {
        let mut finished = lines(job.blobs.read(segment).await?, MAX_LINE_BYTES);
        while let Some(line) = finished.next().await {
            let line = line.map_err(read_error)?;
            let Ok(one) = serde_json::from_slice::<Finished>(&line.bytes) else { continue };
            if !seen.insert(one.line) {
                continue;
            }
            if one.failed {
                batch.request_counts.failed += 1;
                errors.write(job, &one.output).await?;
            } else {
                batch.request_counts.completed += 1;
                output.write(job, &one.output).await?;
            }
        }
    }
    if ending != Ending::Completed {
        let failure = match ending {
            Ending::Cancelled => LineFailure {
                code: "batch_cancelled".into(),
                message: "The batch was cancelled before this request was sent.".into(),
            },
            _ => LineFailure {
                code: "batch_expired".into(),
                message: "The batch expired before this request was sent.".into(),
            },
        };
        if let Some(blob) = input_blob(job, record).await? {
            let endpoint = Endpoint::from_path(batch.endpoint.as_bytes()).unwrap_or(Endpoint::ChatCompletions);
            let mut input = lines(job.blobs.read(&blob).await?, MAX_LINE_BYTES);
            while let Some(line) = input.next().await {
                let Ok(line) = line else { continue };
                if line.is_blank() || seen.contains(line.number) {
                    continue;
                }
                let custom_id = InputLine::parse(&line.bytes, endpoint).map(|l| l.custom_id).unwrap_or_default();
                let unsent =
                    OutputLine { id: ids::new_id(ids::LINE), custom_id, response: None, error: Some(failure.clone()) };
                batch.request_counts.failed += 1;
                errors.write(job, &unsent).await?;
            }
        }
    }
    let now = clock::unix_seconds();
    let files: Vec<FileRecord> =
        [output.finish(record, now).await?, errors.finish(record, now).await?].into_iter().flatten().collect();
    for file in &files {
        if file.file.filename.ends_with("_output.jsonl") {
            batch.output_file_id = Some(file.file.id.clone());
        } else {
            batch.error_file_id = Some(file.file.id.clone());
        }
    }
    if batch.finalizing_at.is_none() && ending == Ending::Completed {
        batch.finalizing_at = Some(now);
    }
    end(&mut batch, ending, now, record.cancel_requested_at);
    job.save(Progress { batch: &batch, segment: None, files: &files }).await?;
    // The segments are no longer needed: the store forgot them with the batch's end.
    for segment in segments {
        if let Err(e) = job.blobs.delete(segment).await {
            tracing::warn!(segment = %segment, error = %e, "could not delete a finished batch's segment");
        }
    }
    Ok(())
}

fn read_error(e: ReadError) -> Halt {
    match e {
        ReadError::Blob(e) => Halt::Blob(e),
        ReadError::TooLong(n) => Halt::Blob(BlobError::Other(format!("a segment's line {n} is too long"))),
    }
}
