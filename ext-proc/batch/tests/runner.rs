//! The runner over the real embedded stores (SQLite, local files) and a fake
//! gateway: a batch runs to its end with every line once, also when its
//! runner is cut off mid-batch and another takes it over.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::StreamExt;
use modelgate_batch::blobs::Blobs;
use modelgate_batch::ids;
use modelgate_batch::runner::gateway::Gateway;
use modelgate_batch::runner::{Runner, Settings};
use modelgate_batch::store::{BatchRecord, FileRecord, Meta};
use modelgate_proto::batch::{Batch, BatchStatus, CreateBatch, FileObject, OutputLine, RequestCounts};
use modelgate_proto::endpoint::Endpoint;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// The fake gateway: what it was sent, and how it answers.
#[derive(Default)]
struct Fake {
    calls: AtomicU64,
    /// Times each custom_id was sent.
    sent: Mutex<HashMap<String, u64>>,
    /// Owners the calls came as.
    owners: Mutex<Vec<String>>,
}

async fn chat(State(fake): State<Arc<Fake>>, headers: HeaderMap, Json(body): Json<Value>) -> impl IntoResponse {
    fake.calls.fetch_add(1, Ordering::Relaxed);
    let owner = headers.get("x-modelgate-on-behalf-of").and_then(|v| v.to_str().ok()).unwrap_or("?").to_string();
    fake.owners.lock().unwrap().push(owner);
    let tag = body["messages"][0]["content"].as_str().unwrap_or_default().to_string();
    let seen = {
        let mut sent = fake.sent.lock().unwrap();
        let n = sent.entry(tag.clone()).or_default();
        *n += 1;
        *n
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let request_id = [("x-request-id", format!("req-{tag}-{seen}"))];
    if tag.starts_with("paced") && seen == 1 {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0".to_string())], Json(json!({"error": {"message": "slow down", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}))).into_response();
    }
    if tag.starts_with("broken") {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            request_id,
            Json(json!({"error": {"message": "down", "type": "server_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    if tag.starts_with("refused") {
        return (
            StatusCode::BAD_REQUEST,
            request_id,
            Json(json!({"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    (request_id, Json(json!({"object": "chat.completion", "choices": [{"message": {"content": tag}}]}))).into_response()
}

async fn model(Path(id): Path<String>) -> StatusCode {
    if id == "unknown-model" {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    }
}

async fn fake_gateway() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models/{id}", get(model))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, fake)
}

struct Setup {
    meta: Arc<Meta>,
    blobs: Arc<Blobs>,
    gateway_url: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> (Self, Arc<Fake>) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(None, dir.path(), Duration::from_secs(5)).unwrap();
        let blobs = Blobs::open(dir.path().join("files").to_str().unwrap()).unwrap();
        let (gateway_url, fake) = fake_gateway().await;
        (Setup { meta: Arc::new(meta), blobs: Arc::new(blobs), gateway_url, _dir: dir }, fake)
    }

    fn runner(&self, lease: Duration) -> Runner {
        let settings = Settings {
            gateway: Gateway::new(&self.gateway_url, Some("tok".into())).unwrap(),
            concurrency: 4,
            max_running: 2,
            line_attempts: 2,
            max_lines: 1000,
            lease,
        };
        Runner::new(self.meta.clone(), self.blobs.clone(), settings, Arc::new(Notify::new()))
    }

    async fn upload(&self, owner: &str, lines: &[Value]) -> String {
        let id = ids::new_id(ids::FILE);
        let blob = format!("files/{id}");
        let mut writer = self.blobs.writer(&blob).await.unwrap();
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend(serde_json::to_vec(line).unwrap());
            bytes.push(b'\n');
        }
        writer.push(Bytes::from(bytes.clone())).await.unwrap();
        writer.finish().await.unwrap();
        let file = FileObject::new(id.clone(), bytes.len() as u64, 1, "in.jsonl".into(), "batch".into());
        self.meta.insert_file(&FileRecord { owner: owner.into(), file, blob }).await.unwrap();
        id
    }

    async fn create(&self, owner: &str, input_file_id: &str, window_secs: u64) -> String {
        let now = modelgate_proto::clock::unix_seconds();
        let create =
            CreateBatch { input_file_id: input_file_id.into(), endpoint: Endpoint::ChatCompletions, metadata: None };
        let batch = Batch::new(ids::new_id(ids::BATCH), create, now, now + window_secs);
        let id = batch.id.clone();
        self.meta.insert_batch(&BatchRecord { owner: owner.into(), batch, cancel_requested_at: None }).await.unwrap();
        id
    }

    async fn batch(&self, owner: &str, id: &str) -> Batch {
        self.meta.batch(owner, id).await.unwrap().unwrap().view()
    }

    async fn wait_until(&self, owner: &str, id: &str, done: impl Fn(&Batch) -> bool) -> Batch {
        for _ in 0..600 {
            let batch = self.batch(owner, id).await;
            if done(&batch) {
                return batch;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the batch did not get there: {:?}", self.batch(owner, id).await);
    }

    async fn lines_of(&self, owner: &str, file_id: Option<&str>) -> Vec<OutputLine> {
        let Some(file_id) = file_id else { return Vec::new() };
        let file = self.meta.file(owner, file_id, 0).await.unwrap().unwrap();
        let mut bytes = Vec::new();
        let mut read = self.blobs.read(&file.blob).await.unwrap();
        while let Some(piece) = read.next().await {
            bytes.extend_from_slice(&piece.unwrap());
        }
        assert_eq!(file.file.bytes, bytes.len() as u64);
        bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
    }
}

fn line(custom_id: &str, model: &str, tag: &str) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "messages": [{"role": "user", "content": tag}]}})
}

/// Every custom_id of `expected` exactly once across both files.
fn once_each(output: &[OutputLine], errors: &[OutputLine], expected: usize) {
    let mut ids: Vec<&str> = output.iter().chain(errors).map(|l| l.custom_id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!((before, ids.len()), (expected, expected), "every line once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_to_completed_with_each_line_once_and_failures_in_the_error_file() {
    let (setup, fake) = Setup::new().await;
    let mut lines: Vec<Value> = (0..40).map(|i| line(&format!("ok-{i}"), "m", &format!("ok{i}"))).collect();
    lines.push(line("paced", "m", "paced-1"));
    lines.push(line("broken", "m", "broken-1"));
    lines.push(line("refused", "m", "refused-1"));
    let file = setup.upload("alice", &lines).await;
    let id = setup.create("alice", &file, 3600).await;
    let runner = tokio::spawn(setup.runner(Duration::from_secs(5)).run(std::future::pending()));
    let batch = setup.wait_until("alice", &id, |b| b.status.is_terminal()).await;
    runner.abort();
    assert_eq!(batch.status, BatchStatus::Completed, "{batch:?}");
    assert_eq!(batch.request_counts, RequestCounts { total: 43, completed: 41, failed: 2 });
    assert!(batch.in_progress_at.is_some() && batch.finalizing_at.is_some() && batch.completed_at.is_some());
    let output = setup.lines_of("alice", batch.output_file_id.as_deref()).await;
    let errors = setup.lines_of("alice", batch.error_file_id.as_deref()).await;
    once_each(&output, &errors, 43);
    let broken = errors.iter().find(|l| l.custom_id == "broken").unwrap();
    assert_eq!(broken.response.as_ref().unwrap().status_code, 503);
    assert_eq!(fake.sent.lock().unwrap()["broken-1"], 2, "a 5xx is tried line_attempts times");
    assert_eq!(fake.sent.lock().unwrap()["refused-1"], 1, "a 400 is not tried again");
    assert_eq!(fake.sent.lock().unwrap()["paced-1"], 2, "a 429 waits and is sent again");
    assert!(fake.owners.lock().unwrap().iter().all(|o| o == "alice"));
    let ok = output.iter().find(|l| l.custom_id == "ok-3").unwrap();
    assert_eq!(ok.response.as_ref().unwrap().body["choices"][0]["message"]["content"], "ok3");
    assert!(ok.id.starts_with("batch_req_") && ok.error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_input_fails_the_batch_with_line_numbers() {
    let (setup, fake) = Setup::new().await;
    let lines = [
        line("a", "m", "x").to_string(),
        "not json".to_string(),
        line("a", "m", "x").to_string(),
        line("b", "unknown-model", "x").to_string(),
        json!({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).to_string(),
    ];
    let id = setup
        .upload(
            "bob",
            &lines.iter().map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.clone()))).collect::<Vec<_>>(),
        )
        .await;
    let _ = id;
    // Written raw, so the line that is not JSON stays so.
    let file = {
        let id = ids::new_id(ids::FILE);
        let blob = format!("files/{id}");
        let mut writer = setup.blobs.writer(&blob).await.unwrap();
        writer.push(Bytes::from(lines.join("\n"))).await.unwrap();
        let bytes = writer.finish().await.unwrap();
        let file = FileObject::new(id.clone(), bytes, 1, "in.jsonl".into(), "batch".into());
        setup.meta.insert_file(&FileRecord { owner: "bob".into(), file, blob }).await.unwrap();
        id
    };
    let batch_id = setup.create("bob", &file, 3600).await;
    let runner = tokio::spawn(setup.runner(Duration::from_secs(5)).run(std::future::pending()));
    let batch = setup.wait_until("bob", &batch_id, |b| b.status.is_terminal()).await;
    runner.abort();
    assert_eq!(batch.status, BatchStatus::Failed);
    let errors: Vec<(String, Option<u64>)> = batch.errors.unwrap().data.into_iter().map(|e| (e.code, e.line)).collect();
    assert_eq!(
        errors,
        [
            ("invalid_json_line".to_string(), Some(2)),
            ("duplicate_custom_id".into(), Some(3)),
            ("model_not_found".into(), Some(4)),
            ("mismatched_url".into(), Some(5))
        ]
    );
    assert_eq!(fake.calls.load(Ordering::Relaxed), 0, "nothing is sent from a batch that fails validation");
    assert!(batch.failed_at.is_some() && batch.output_file_id.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_cut_off_mid_batch_is_taken_over_and_every_line_appears_once() {
    let (setup, fake) = Setup::new().await;
    let lines: Vec<Value> = (0..200).map(|i| line(&format!("id-{i}"), "m", &format!("t{i}"))).collect();
    let file = setup.upload("carol", &lines).await;
    let id = setup.create("carol", &file, 3600).await;
    let lease = Duration::from_millis(900);
    let first = tokio::spawn(setup.runner(lease).run(std::future::pending()));
    // Cut off (as kill -9 would) once some lines are committed and others are in flight.
    setup.wait_until("carol", &id, |b| b.request_counts.completed >= 30).await;
    first.abort();
    let _ = first.await;
    let cut_at = setup.batch("carol", &id).await.request_counts.completed;
    assert!(cut_at < 200, "cut off before the end");
    let second = tokio::spawn(setup.runner(lease).run(std::future::pending()));
    let batch = setup.wait_until("carol", &id, |b| b.status.is_terminal()).await;
    second.abort();
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!(batch.request_counts, RequestCounts { total: 200, completed: 200, failed: 0 });
    let output = setup.lines_of("carol", batch.output_file_id.as_deref()).await;
    once_each(&output, &[], 200);
    assert!(batch.error_file_id.is_none());
    // Lines in flight when the runner was cut off were sent again: at least once each, some twice.
    let sent = fake.sent.lock().unwrap();
    assert!(sent.values().all(|&n| n >= 1) && sent.len() == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_keeps_finished_lines_and_writes_the_rest_as_cancelled() {
    let (setup, _fake) = Setup::new().await;
    let lines: Vec<Value> = (0..600).map(|i| line(&format!("id-{i}"), "m", &format!("c{i}"))).collect();
    let file = setup.upload("dave", &lines).await;
    let id = setup.create("dave", &file, 3600).await;
    let runner = tokio::spawn(setup.runner(Duration::from_secs(5)).run(std::future::pending()));
    setup.wait_until("dave", &id, |b| b.request_counts.completed >= 10).await;
    let asked = setup.meta.request_cancel("dave", &id, modelgate_proto::clock::unix_seconds()).await.unwrap().unwrap();
    assert_eq!(asked.view().status, BatchStatus::Cancelling);
    let batch = setup.wait_until("dave", &id, |b| b.status.is_terminal()).await;
    runner.abort();
    assert_eq!(batch.status, BatchStatus::Cancelled);
    assert!(batch.cancelling_at.is_some() && batch.cancelled_at.is_some());
    let output = setup.lines_of("dave", batch.output_file_id.as_deref()).await;
    let errors = setup.lines_of("dave", batch.error_file_id.as_deref()).await;
    once_each(&output, &errors, 600);
    assert!(!output.is_empty() && !errors.is_empty());
    assert!(errors.iter().all(|l| l.error.as_ref().unwrap().code == "batch_cancelled"));
    assert_eq!(batch.request_counts.completed as usize, output.len());
    assert_eq!(batch.request_counts.failed as usize, errors.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_window_expires_keeping_its_results() {
    let (setup, _fake) = Setup::new().await;
    let lines: Vec<Value> = (0..400).map(|i| line(&format!("id-{i}"), "m", &format!("e{i}"))).collect();
    let file = setup.upload("erin", &lines).await;
    let id = setup.create("erin", &file, 2).await;
    let runner = tokio::spawn(setup.runner(Duration::from_secs(5)).run(std::future::pending()));
    let batch = setup.wait_until("erin", &id, |b| b.status.is_terminal()).await;
    runner.abort();
    assert_eq!(batch.status, BatchStatus::Expired, "{batch:?}");
    let output = setup.lines_of("erin", batch.output_file_id.as_deref()).await;
    let errors = setup.lines_of("erin", batch.error_file_id.as_deref()).await;
    once_each(&output, &errors, 400);
    assert!(errors.iter().all(|l| l.error.as_ref().unwrap().code == "batch_expired"));
    assert!(!output.is_empty(), "the lines finished in time are kept");
}
