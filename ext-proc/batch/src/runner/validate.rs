//! A batch's first step: its input file read once, line by line, and checked
//! as OpenAI checks it, before any line is sent.

use super::lines::{lines, ReadError, MAX_LINE_BYTES};
use super::{Halt, Job};
use crate::store::{BatchRecord, Progress};
use futures_util::StreamExt;
use modelgate_proto::batch::{Batch, BatchError, BatchErrors, BatchStatus, InputLine};
use modelgate_proto::clock;
use modelgate_proto::endpoint::Endpoint;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

/// Errors listed in a failed batch's `errors.data`; reading stops at this many.
const MAX_ERRORS: usize = 100;

/// Checks the batch's input and saves the verdict: `in_progress` with its
/// line count, or `failed` with its errors.
pub(super) async fn validate(job: &Job, record: &BatchRecord) -> Result<Batch, Halt> {
    let mut batch = record.batch.clone();
    let errors = match input_blob(job, record).await? {
        Some(blob) => check(job, record, &blob).await?,
        None => Err(vec![error("invalid_input_file", "The input file no longer exists.", None)]),
    };
    let now = clock::unix_seconds();
    match errors {
        Ok(total) => {
            batch.status = BatchStatus::InProgress;
            batch.in_progress_at = Some(now);
            batch.request_counts.total = total;
        }
        Err(data) => {
            batch.status = BatchStatus::Failed;
            batch.failed_at = Some(now);
            batch.errors = Some(BatchErrors { object: "list".into(), data });
        }
    }
    job.save(Progress { batch: &batch, segment: None, files: &[] }).await?;
    Ok(batch)
}

/// The blob of the batch's input file, if the file is still there.
pub(super) async fn input_blob(job: &Job, record: &BatchRecord) -> Result<Option<String>, Halt> {
    let file = job.meta.file(&record.owner, &record.batch.input_file_id, 0).await?;
    Ok(file.map(|file| file.blob))
}

fn error(code: &str, message: &str, line: Option<u64>) -> BatchError {
    BatchError { code: code.into(), message: message.into(), param: None, line }
}

/// The number of requests in the input, or why it is refused.
async fn check(job: &Job, record: &BatchRecord, blob: &str) -> Result<Result<u64, Vec<BatchError>>, Halt> {
    let endpoint = Endpoint::from_path(record.batch.endpoint.as_bytes()).unwrap_or(Endpoint::ChatCompletions);
    let mut input = lines(job.blobs.read(blob).await?, MAX_LINE_BYTES);
    let mut errors = Vec::new();
    // 128 bits of each custom_id: a batch's worth of them stays small whatever their length.
    let mut custom_ids = HashSet::new();
    let mut models: HashMap<String, bool> = HashMap::new();
    let mut total = 0u64;
    while let Some(line) = input.next().await {
        if errors.len() >= MAX_ERRORS || job.halted() {
            break;
        }
        let line = match line {
            Ok(line) => line,
            Err(ReadError::TooLong(number)) => {
                let message = format!("This line is longer than {MAX_LINE_BYTES} bytes.");
                errors.push(error("line_too_large", &message, Some(number)));
                continue;
            }
            Err(ReadError::Blob(e)) => return Err(Halt::Blob(e)),
        };
        if line.is_blank() {
            continue;
        }
        total += 1;
        if total > job.settings.max_lines {
            let message = format!("The input file has more than {} requests.", job.settings.max_lines);
            errors.push(error("too_many_requests", &message, Some(line.number)));
            break;
        }
        let parsed = match InputLine::parse(&line.bytes, endpoint) {
            Ok(parsed) => parsed,
            Err(e) => {
                errors.push(e.at(line.number));
                continue;
            }
        };
        if !custom_ids.insert(digest(&parsed.custom_id)) {
            errors.push(InputLine::duplicate_custom_id(&parsed.custom_id).at(line.number));
            continue;
        }
        let served = match models.get(&parsed.model) {
            Some(served) => *served,
            None => {
                // A gateway that cannot answer now leaves the batch to be validated again later.
                let served = job.settings.gateway.serves(&parsed.model, &record.owner).await.map_err(Halt::Gateway)?;
                models.insert(parsed.model.clone(), served);
                served
            }
        };
        if !served {
            errors.push(InputLine::model_not_found(&parsed.model).at(line.number));
        }
    }
    if job.halted() {
        return Err(Halt::Stopping);
    }
    if total == 0 && errors.is_empty() {
        errors.push(error("empty_file", "The input file holds no requests.", None));
    }
    Ok(if errors.is_empty() { Ok(total) } else { Err(errors) })
}

fn digest(custom_id: &str) -> u128 {
    let half = |seed: u8| {
        let mut hasher = DefaultHasher::new();
        seed.hash(&mut hasher);
        custom_id.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}
