//! The Files and Batch APIs as a client sees them through Envoy: each route
//! driven through the router, over SQLite and a local files directory in a
//! temporary directory.

use axum::body::{to_bytes, Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use futures_util::stream;
use modelgate_batch::api::{router, Api};
use modelgate_batch::blobs::Blobs;
use modelgate_batch::store::{Meta, Progress};
use modelgate_proto::batch::BatchStatus;
use modelgate_proto::headers::INTERNAL_TOKEN;
use modelgate_proto::headers::OWNER;
use modelgate_runtime::internal_token::InternalToken;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tower::ServiceExt;

const TOKEN: &str = "internal-token";
const WINDOW_SECS: u64 = 3600;
const BOUNDARY: &str = "modelgate-test-boundary";
const LINE: &str =
    r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

struct Gateway {
    router: Router,
    api: Arc<Api>,
    files_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn gateway(max_file_bytes: u64) -> Gateway {
    gateway_over(max_file_bytes, None)
}

/// A gateway whose records are in SQLite, or in Redis at `redis_url`.
fn gateway_over(max_file_bytes: u64, redis_url: Option<&str>) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let files_dir = dir.path().join("data/files");
    let meta = Meta::open(redis_url, &dir.path().join("data"), Duration::from_millis(500)).unwrap();
    let api = Arc::new(Api {
        meta: Arc::new(meta),
        blobs: Arc::new(Blobs::open(files_dir.to_str().unwrap()).unwrap()),
        max_file_bytes,
        window: Duration::from_secs(WINDOW_SECS),
        wake: Arc::new(Notify::new()),
        token: InternalToken::new(TOKEN),
    });
    Gateway { router: router(api.clone()), api, files_dir, _dir: dir }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    /// The error's status, `param` and `code`, checking it is OpenAI's envelope.
    fn error(&self) -> (u16, Value, Value) {
        let error = &self.json()["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
        assert!(error["type"].is_string(), "{error}");
        (self.status.as_u16(), error["param"].clone(), error["code"].clone())
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or_default()
    }
}

impl Gateway {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Answer { status: parts.status, headers: parts.headers, body: to_bytes(body, usize::MAX).await.unwrap() }
    }

    /// A request as the filter passes it on: with the internal token, for `owner`.
    fn request(method: Method, path: &str, owner: &str) -> axum::http::request::Builder {
        Request::builder().method(method).uri(path).header(INTERNAL_TOKEN, TOKEN).header(OWNER, owner)
    }

    async fn call(&self, method: Method, path: impl AsRef<str>, owner: &str) -> Answer {
        self.send(Gateway::request(method, path.as_ref(), owner).body(Body::empty()).unwrap()).await
    }

    async fn post_json(&self, path: &str, owner: &str, body: Value) -> Answer {
        let request = Gateway::request(Method::POST, path, owner)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(request).await
    }

    async fn upload_form(&self, owner: &str, parts: &[Part<'_>]) -> Answer {
        let body = form(parts);
        let request = Gateway::request(Method::POST, "/v1/files", owner)
            .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    /// Uploads `content` as `in.jsonl` for `purpose`; the file object.
    async fn upload(&self, owner: &str, purpose: &str, content: &str) -> Value {
        let answer = self.upload_form(owner, &[text("purpose", purpose), file(Some("in.jsonl"), content)]).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.json()
    }

    async fn create_batch(&self, owner: &str, input: &str) -> Answer {
        let body = json!({"input_file_id": input, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        self.post_json("/v1/batches", owner, body).await
    }

    /// The files' bytes kept on disk.
    fn stored_files(&self) -> usize {
        std::fs::read_dir(self.files_dir.join("files")).map(|dir| dir.count()).unwrap_or(0)
    }
}

/// A form part: name, filename (a file part), bytes.
type Part<'a> = (&'a str, Option<&'a str>, &'a [u8]);

fn text<'a>(name: &'a str, value: &'a str) -> Part<'a> {
    (name, None, value.as_bytes())
}

fn file<'a>(filename: Option<&'a str>, content: &'a str) -> Part<'a> {
    ("file", Some(filename.unwrap_or_default()), content.as_bytes())
}

fn form(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"").bytes());
        match filename {
            Some("") => body.extend(b"; filename=\"\"\r\nContent-Type: application/octet-stream"),
            Some(filename) => {
                body.extend(format!("; filename=\"{filename}\"\r\nContent-Type: application/jsonl").bytes());
            }
            None => {}
        }
        body.extend(b"\r\n\r\n");
        body.extend(*bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{BOUNDARY}--\r\n").bytes());
    body
}

fn ids(list: &Value) -> Vec<&str> {
    list["data"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_file_goes_up_comes_back_and_is_deleted() {
    let gw = gateway(1 << 20);
    let content = format!("{LINE}\n{LINE}\n");
    let uploaded = gw.upload("alice", "batch", &content).await;
    let id = uploaded["id"].as_str().unwrap();
    assert!(id.starts_with("file-"), "{id}");
    let created_at = uploaded["created_at"].as_u64().unwrap();
    assert_eq!(
        uploaded,
        json!({"id": id, "object": "file", "bytes": content.len(), "created_at": created_at,
               "expires_at": created_at + 30 * 86_400, "filename": "in.jsonl", "purpose": "batch",
               "status": "processed"})
    );
    assert_eq!(gw.call(Method::GET, &format!("/v1/files/{id}"), "alice").await.json(), uploaded);

    let content_answer = gw.call(Method::GET, &format!("/v1/files/{id}/content"), "alice").await;
    assert_eq!(content_answer.status, StatusCode::OK);
    assert_eq!(content_answer.header("content-type"), "application/octet-stream");
    assert_eq!(content_answer.body, content.as_bytes());

    let list = gw.call(Method::GET, "/v1/files", "alice").await.json();
    assert_eq!(list, json!({"object": "list", "data": [uploaded], "first_id": id, "last_id": id, "has_more": false}));

    let deleted = gw.call(Method::DELETE, &format!("/v1/files/{id}"), "alice").await;
    assert_eq!(deleted.json(), json!({"id": id, "object": "file", "deleted": true}));
    assert_eq!(gw.stored_files(), 0, "the bytes are deleted with the record");
    let gone = gw.call(Method::GET, &format!("/v1/files/{id}"), "alice").await;
    assert_eq!(gone.error(), (404, json!("id"), Value::Null));
    assert_eq!(gone.json()["error"]["message"], format!("No such File object: {id}"));
    assert_eq!(gone.header("x-should-retry"), "false");
    for (method, path) in
        [(Method::GET, format!("/v1/files/{id}/content")), (Method::DELETE, format!("/v1/files/{id}"))]
    {
        assert_eq!(gw.call(method, &path, "alice").await.error().0, 404);
    }
    assert_eq!(
        gw.call(Method::GET, "/v1/files", "alice").await.json(),
        json!({"object": "list", "data": [], "has_more": false})
    );
}

#[tokio::test]
async fn form_parts_come_in_any_order() {
    let gw = gateway(1 << 20);
    let answer = gw
        .upload_form(
            "",
            &[
                file(None, "notes"),
                text("expires_after[seconds]", "3600"),
                text("purpose", "user_data"),
                text("expires_after[anchor]", "created_at"),
            ],
        )
        .await;
    let uploaded = answer.json();
    assert_eq!(answer.status, StatusCode::OK, "{uploaded}");
    assert_eq!((uploaded["filename"].as_str(), uploaded["bytes"].as_u64()), (Some("upload"), Some(5)));
    assert_eq!(uploaded["expires_at"].as_u64(), uploaded["created_at"].as_u64().map(|at| at + 3600));
    // Files of other purposes are kept until deleted.
    let kept = gw.upload("", "assistants", "x").await;
    assert!(kept.get("expires_at").is_none(), "{kept}");
}

#[tokio::test]
async fn a_bad_upload_is_refused_and_keeps_nothing() {
    let gw = gateway(1 << 20);
    let long = "b".repeat(2000);
    let cases: Vec<(Vec<Part>, u16, Value, Value)> = vec![
        (vec![file(Some("in.jsonl"), LINE)], 400, json!("purpose"), json!("missing_required_parameter")),
        (vec![text("purpose", "batch")], 400, json!("file"), json!("missing_required_parameter")),
        (vec![text("purpose", "search"), file(Some("a"), LINE)], 400, json!("purpose"), json!("invalid_value")),
        (vec![file(Some("a"), LINE), text("purpose", "search")], 400, json!("purpose"), json!("invalid_value")),
        (vec![text("purpose", "batch"), file(Some("a"), LINE), file(Some("b"), LINE)], 400, json!("file"), Value::Null),
        (
            vec![text("purpose", "batch"), text("purpose", "batch"), file(None, LINE)],
            400,
            json!("purpose"),
            Value::Null,
        ),
        (vec![text("purpose", "batch"), text("model", "m"), file(None, LINE)], 400, json!("model"), Value::Null),
        (
            vec![text("purpose", "batch"), file(None, LINE), text("expires_after[anchor]", "created_at")],
            400,
            json!("expires_after[seconds]"),
            json!("missing_required_parameter"),
        ),
        (
            vec![
                text("purpose", "batch"),
                text("expires_after[anchor]", "created_at"),
                text("expires_after[seconds]", "60"),
                file(None, LINE),
            ],
            400,
            json!("expires_after[seconds]"),
            json!("invalid_value"),
        ),
        (
            vec![
                text("purpose", "batch"),
                text("expires_after[anchor]", "now"),
                text("expires_after[seconds]", "3600"),
                file(None, LINE),
            ],
            400,
            json!("expires_after[anchor]"),
            json!("invalid_value"),
        ),
        (vec![text("purpose", &long), file(None, LINE)], 400, json!("purpose"), json!("invalid_value")),
        (vec![text("purpose", "batch"), file(Some(&long[..256]), LINE)], 400, json!("file"), json!("invalid_value")),
    ];
    for (parts, status, param, code) in cases {
        let answer = gw.upload_form("alice", &parts).await;
        assert_eq!(answer.error(), (status, param, code), "{parts:?}: {:?}", answer.body);
        assert_eq!(answer.header("x-should-retry"), "false");
    }

    let not_a_form = Gateway::request(Method::POST, "/v1/files", "alice")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let answer = gw.send(not_a_form).await;
    assert_eq!(answer.error(), (415, Value::Null, json!("unsupported_media_type")));

    // Cut off before its last boundary: the file part began, and is dropped.
    let mut cut = form(&[text("purpose", "batch"), file(Some("a"), LINE)]);
    cut.truncate(cut.len() - BOUNDARY.len() - 10);
    let cut = Gateway::request(Method::POST, "/v1/files", "alice")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(cut))
        .unwrap();
    assert_eq!(gw.send(cut).await.error(), (400, Value::Null, Value::Null));

    assert_eq!(gw.stored_files(), 0, "nothing refused is kept");
    assert_eq!(gw.call(Method::GET, "/v1/files", "alice").await.json()["data"], json!([]));
}

/// A body of `pieces` pieces of `piece` bytes each, counting the bytes read from it.
fn counted_body(prefix: Vec<u8>, piece: usize, pieces: usize, read: Arc<AtomicU64>) -> Body {
    let chunk = Bytes::from(vec![b'x'; piece]);
    let body = std::iter::once(Bytes::from(prefix)).chain(std::iter::repeat_n(chunk, pieces));
    Body::from_stream(stream::iter(body.map(move |bytes| {
        read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(bytes)
    })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_refused_while_it_streams() {
    const LIMIT: u64 = 4 << 20;
    let gw = gateway(LIMIT);
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
    );
    let upload = |body: Body, length: Option<u64>| {
        let mut request = Gateway::request(Method::POST, "/v1/files", "alice")
            .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"));
        if let Some(length) = length {
            request = request.header(header::CONTENT_LENGTH, length);
        }
        request.body(body).unwrap()
    };

    // 256 MiB offered without a length: refused once past the limit, the rest never read.
    let read = Arc::new(AtomicU64::new(0));
    let body = counted_body(head.clone().into_bytes(), 64 << 10, 4096, read.clone());
    let answer = gw.send(upload(body, None)).await;
    assert_eq!(answer.error(), (413, json!("file"), json!("request_too_large")), "{:?}", answer.body);
    assert!(read.load(Ordering::Relaxed) < 2 * LIMIT, "read {} bytes", read.load(Ordering::Relaxed));

    // A declared length over the limit: refused before any of it is read.
    let read = Arc::new(AtomicU64::new(0));
    let body = counted_body(head.clone().into_bytes(), 64 << 10, 4096, read.clone());
    let answer = gw.send(upload(body, Some(256 << 20))).await;
    assert_eq!(answer.error(), (413, json!("file"), json!("request_too_large")));
    assert_eq!(read.load(Ordering::Relaxed), 0);
    assert_eq!(gw.stored_files(), 0);

    // A file of exactly the limit fits.
    let mut exact = head.into_bytes();
    exact.extend(vec![b'y'; LIMIT as usize]);
    exact.extend(format!("\r\n--{BOUNDARY}--\r\n").bytes());
    let length = exact.len() as u64;
    let answer = gw.send(upload(Body::from(exact), Some(length))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.json()["bytes"], LIMIT);
}

#[tokio::test]
async fn files_list_by_purpose_order_and_page() {
    let gw = gateway(1 << 20);
    let mut made = Vec::new();
    for purpose in ["batch", "user_data", "batch", "batch"] {
        made.push(gw.upload("alice", purpose, LINE).await["id"].as_str().unwrap().to_string());
        // Ids sort by their millisecond: keep them apart.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let list = |query: &str| gw.call(Method::GET, format!("/v1/files{query}"), "alice");
    let newest_first: Vec<&str> = made.iter().rev().map(String::as_str).collect();
    assert_eq!(ids(&list("").await.json()), newest_first);
    let oldest_first: Vec<&str> = made.iter().map(String::as_str).collect();
    assert_eq!(ids(&list("?order=asc").await.json()), oldest_first);
    let batch_files = list("?purpose=batch&order=asc&limit=2").await.json();
    assert_eq!((ids(&batch_files), &batch_files["has_more"]), (vec![made[0].as_str(), made[2].as_str()], &json!(true)));
    let next = list(&format!("?purpose=batch&order=asc&limit=2&after={}", made[2])).await.json();
    assert_eq!((ids(&next), &next["has_more"]), (vec![made[3].as_str()], &json!(false)));

    for (query, param) in
        [("?limit=0", "limit"), ("?limit=10001", "limit"), ("?limit=ten", "limit"), ("?order=sideways", "order")]
    {
        assert_eq!(list(query).await.error(), (400, json!(param), json!("invalid_value")), "{query}");
    }
}

#[tokio::test]
async fn a_batch_is_created_listed_and_cancelled() {
    let gw = gateway(1 << 20);
    let input = gw.upload("alice", "batch", LINE).await["id"].as_str().unwrap().to_string();
    let body = json!({"input_file_id": input, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                      "metadata": {"job": "nightly"}});
    let created = gw.post_json("/v1/batches", "alice", body).await.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("batch_"), "{id}");
    let created_at = created["created_at"].as_u64().unwrap();
    assert_eq!(
        created,
        json!({"id": id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": input,
               "completion_window": "24h", "status": "validating", "created_at": created_at,
               "expires_at": created_at + WINDOW_SECS,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": {"job": "nightly"}})
    );
    tokio::time::timeout(Duration::from_secs(1), gw.api.wake.notified()).await.expect("the runner is woken");
    assert_eq!(gw.call(Method::GET, &format!("/v1/batches/{id}"), "alice").await.json(), created);

    // Its input file is in use until it finishes.
    let in_use = gw.call(Method::DELETE, &format!("/v1/files/{input}"), "alice").await;
    assert_eq!(in_use.error(), (409, json!("id"), json!("file_in_use")));
    assert_eq!(in_use.header("x-should-retry"), "false");

    let cancelled = gw.call(Method::POST, &format!("/v1/batches/{id}/cancel"), "alice").await.json();
    assert_eq!(cancelled["status"], "cancelling");
    let cancelling_at = cancelled["cancelling_at"].as_u64().expect("cancelling_at");
    tokio::time::timeout(Duration::from_secs(1), gw.api.wake.notified()).await.expect("the runner is woken");
    let again = gw.call(Method::POST, &format!("/v1/batches/{id}/cancel"), "alice").await.json();
    assert_eq!((&again["status"], again["cancelling_at"].as_u64()), (&json!("cancelling"), Some(cancelling_at)));
    assert_eq!(gw.call(Method::GET, &format!("/v1/batches/{id}"), "alice").await.json(), again);

    // The runner finishes it: a finished batch cannot be cancelled, and its input is free.
    let lease = gw.api.meta.acquire(&id, "runner", Duration::from_secs(30)).await.unwrap().unwrap();
    let (record, _) = gw.api.meta.running(&id).await.unwrap().unwrap();
    let mut batch = record.batch;
    batch.status = BatchStatus::Cancelled;
    batch.cancelled_at = Some(cancelling_at);
    assert!(gw.api.meta.save(&lease, Progress { batch: &batch, segment: None, files: &[] }).await.unwrap());
    let finished = gw.call(Method::POST, &format!("/v1/batches/{id}/cancel"), "alice").await;
    assert_eq!(finished.error(), (409, json!("id"), json!("batch_finished")));
    assert_eq!(finished.header("x-should-retry"), "false");
    assert_eq!(gw.call(Method::GET, &format!("/v1/batches/{id}"), "alice").await.json()["status"], "cancelled");
    assert_eq!(gw.call(Method::DELETE, &format!("/v1/files/{input}"), "alice").await.status, StatusCode::OK);
}

#[tokio::test]
async fn batches_list_newest_first_by_page() {
    let gw = gateway(1 << 20);
    let input = gw.upload("alice", "batch", LINE).await["id"].as_str().unwrap().to_string();
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(gw.create_batch("alice", &input).await.json()["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let list = |query: &str| gw.call(Method::GET, format!("/v1/batches{query}"), "alice");
    let all = list("").await.json();
    assert_eq!(
        (ids(&all), &all["has_more"]),
        (vec![made[2].as_str(), made[1].as_str(), made[0].as_str()], &json!(false))
    );
    let first = list("?limit=2").await.json();
    assert_eq!((ids(&first), &first["has_more"]), (vec![made[2].as_str(), made[1].as_str()], &json!(true)));
    let rest = list(&format!("?limit=2&after={}", made[1])).await.json();
    assert_eq!((ids(&rest), &rest["has_more"]), (vec![made[0].as_str()], &json!(false)));
    for query in ["?limit=0", "?limit=101", "?limit=-1"] {
        assert_eq!(list(query).await.error(), (400, json!("limit"), json!("invalid_value")), "{query}");
    }
}

#[tokio::test]
async fn a_bad_batch_is_refused_with_its_param() {
    let gw = gateway(1 << 20);
    let input = gw.upload("alice", "batch", LINE).await["id"].as_str().unwrap().to_string();
    let storage = gw.upload("alice", "user_data", LINE).await["id"].as_str().unwrap().to_string();
    let ok = json!({"input_file_id": input, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let with = |key: &str, value: Value| {
        let mut body = ok.clone();
        body[key] = value;
        body
    };
    let cases = [
        (with("input_file_id", json!("file-nope")), "input_file_id"),
        (with("input_file_id", json!(storage)), "input_file_id"),
        (with("endpoint", json!("/v1/responses")), "endpoint"),
        (with("completion_window", json!("1h")), "completion_window"),
        (with("metadata", json!({"k": 1})), "metadata"),
        (json!({"endpoint": "/v1/chat/completions", "completion_window": "24h"}), "input_file_id"),
    ];
    for (body, param) in cases {
        let answer = gw.post_json("/v1/batches", "alice", body.clone()).await;
        assert_eq!((answer.error().0, answer.error().1), (400, json!(param)), "{body}");
    }
    let not_json = Gateway::request(Method::POST, "/v1/batches", "alice").body(Body::from("{")).unwrap();
    assert_eq!(gw.send(not_json).await.error(), (400, Value::Null, Value::Null));
    assert_eq!(gw.call(Method::GET, "/v1/batches", "alice").await.json()["data"], json!([]));
}

#[tokio::test]
async fn another_owner_finds_nothing() {
    let gw = gateway(1 << 20);
    let input = gw.upload("alice", "batch", LINE).await["id"].as_str().unwrap().to_string();
    let batch = gw.create_batch("alice", &input).await.json()["id"].as_str().unwrap().to_string();
    for owner in ["bob", ""] {
        for (method, path) in [
            (Method::GET, format!("/v1/files/{input}")),
            (Method::GET, format!("/v1/files/{input}/content")),
            (Method::DELETE, format!("/v1/files/{input}")),
            (Method::GET, format!("/v1/batches/{batch}")),
            (Method::POST, format!("/v1/batches/{batch}/cancel")),
        ] {
            assert_eq!(
                gw.call(method.clone(), &path, owner).await.error(),
                (404, json!("id"), Value::Null),
                "{method} {path}"
            );
        }
        assert_eq!(gw.call(Method::GET, "/v1/files", owner).await.json()["data"], json!([]));
        assert_eq!(gw.call(Method::GET, "/v1/batches", owner).await.json()["data"], json!([]));
        let theirs = gw.create_batch(owner, &input).await;
        assert_eq!(theirs.error(), (400, json!("input_file_id"), Value::Null));
    }
    assert_eq!(gw.call(Method::GET, &format!("/v1/batches/{batch}"), "alice").await.json()["status"], "validating");
}

#[tokio::test]
async fn only_envoy_is_served_and_other_paths_are_refused() {
    let gw = gateway(1 << 20);
    for token in [None, Some("wrong")] {
        let mut request = Request::builder().uri("/v1/files").header(OWNER, "alice");
        if let Some(token) = token {
            request = request.header(INTERNAL_TOKEN, token);
        }
        let answer = gw.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(answer.error(), (401, Value::Null, json!("invalid_internal_token")));
    }
    for (method, path, allow) in [
        (Method::PUT, "/v1/files", "GET, POST"),
        (Method::POST, "/v1/files/file-1", "GET, DELETE"),
        (Method::DELETE, "/v1/files/file-1/content", "GET"),
        (Method::PATCH, "/v1/batches", "GET, POST"),
        (Method::DELETE, "/v1/batches/batch_1", "GET"),
        (Method::GET, "/v1/batches/batch_1/cancel", "POST"),
    ] {
        let answer = gw.call(method.clone(), path, "alice").await;
        assert_eq!(answer.error(), (405, Value::Null, json!("method_not_allowed")), "{method} {path}");
        assert_eq!(answer.header("allow"), allow, "{method} {path}");
    }
    let not_text = gw.call(Method::GET, "/v1/files/%FF", "alice").await;
    assert_eq!(not_text.error(), (400, json!("id"), Value::Null));
    for path in ["/v1/files/file-1/content/more", "/v1/batches/batch_1/retry", "/v1/batches/a/b/c"] {
        assert_eq!(
            gw.call(Method::GET, path, "alice").await.error(),
            (404, Value::Null, json!("unknown_url")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_file_store_that_fails_is_a_503_to_retry() {
    let gw = gateway(1 << 20);
    // The files directory replaced by a plain file: nothing can be written under it.
    std::fs::remove_dir_all(&gw.files_dir).unwrap();
    std::fs::write(&gw.files_dir, b"not a directory").unwrap();
    let answer = gw.upload_form("alice", &[text("purpose", "batch"), file(Some("in.jsonl"), LINE)]).await;
    assert_eq!(answer.error(), (503, Value::Null, json!("file_store_unavailable")));
    assert_eq!((answer.header("x-should-retry"), answer.header("retry-after")), ("true", "1"));
    assert_eq!(gw.call(Method::GET, "/v1/files", "alice").await.json()["data"], json!([]));
}

#[tokio::test]
async fn a_batch_store_that_fails_is_a_503_to_retry() {
    // Redis on a port nothing listens on: every call fails.
    let gw = gateway_over(1 << 20, Some("redis://127.0.0.1:1"));
    let answer = gw.upload_form("alice", &[text("purpose", "batch"), file(Some("in.jsonl"), LINE)]).await;
    assert_eq!(answer.error(), (503, Value::Null, json!("batch_store_unavailable")));
    assert_eq!((answer.header("x-should-retry"), answer.header("retry-after")), ("true", "1"));
    assert_eq!(gw.stored_files(), 0, "bytes never recorded are not kept");
    for (method, path) in [
        (Method::GET, "/v1/files"),
        (Method::GET, "/v1/files/file-1"),
        (Method::DELETE, "/v1/files/file-1"),
        (Method::GET, "/v1/batches"),
        (Method::POST, "/v1/batches/batch_1/cancel"),
    ] {
        assert_eq!(gw.call(method.clone(), path, "alice").await.error().0, 503, "{method} {path}");
    }
}

/// A form part for the property test: a name (known or not), maybe a filename, bytes.
fn any_part() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    let name = prop_oneof![
        Just("file".to_string()),
        Just("purpose".to_string()),
        Just("expires_after[anchor]".to_string()),
        Just("expires_after[seconds]".to_string()),
        "[a-z\\[\\]\"]{0,8}",
    ];
    let value = prop_oneof![
        Just(b"batch".to_vec()),
        Just(b"created_at".to_vec()),
        Just(b"3600".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    (name, proptest::option::of("[a-z.\"]{0,8}"), value)
}

#[test]
fn any_form_or_query_is_answered_in_an_envelope_and_keeps_only_what_it_accepts() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let gw = gateway(256);
    let strategy =
        (proptest::collection::vec(any_part(), 0..5), proptest::option::of(0usize..600), "[a-z=&%0-9]{0,24}");
    proptest!(|((parts, cut, query) in strategy)| {
        runtime.block_on(async {
            let parts: Vec<Part> = parts.iter().map(|(n, f, v)| (n.as_str(), f.as_deref(), v.as_slice())).collect();
            let mut body = form(&parts);
            body.truncate(cut.unwrap_or(usize::MAX));
            let before = gw.stored_files();
            let request = Gateway::request(Method::POST, "/v1/files", "alice")
                .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
                .body(Body::from(body))
                .unwrap();
            let answer = gw.send(request).await;
            match answer.status.as_u16() {
                200 => assert_eq!(gw.stored_files(), before + 1),
                400 | 413 => {
                    answer.error();
                    assert_eq!(gw.stored_files(), before, "a refused upload keeps nothing");
                }
                status => panic!("{status}: {:?}", answer.body),
            }
            for path in ["/v1/files", "/v1/batches"] {
                let answer = gw.call(Method::GET, format!("{path}?{query}"), "alice").await;
                match answer.status.as_u16() {
                    200 => assert_eq!(answer.json()["object"], "list"),
                    400 => drop(answer.error()),
                    status => panic!("{path}?{query}: {status}"),
                }
            }
        });
    });
}

/// A response ext_proc kept for `owner`, with `inputs` input items.
async fn keep_response(gateway: &Gateway, owner: &str, id: &str, inputs: usize) {
    let input = (0..inputs).map(|n| json!({"type": "message", "id": format!("msg_{n}"), "role": "user"})).collect();
    let stored = modelgate_proto::stored_response::StoredResponse {
        response: json!({"id": id, "object": "response", "status": "completed", "output": []}),
        input,
    };
    gateway.api.meta.put_response(owner, &stored, 4_000_000_000).await.unwrap();
}

#[tokio::test]
async fn a_stored_response_is_read_listed_and_deleted_by_its_owner_only() {
    let gateway = gateway(1 << 20);
    keep_response(&gateway, "alice", "resp_1", 3).await;

    let got = gateway.call(Method::GET, "/v1/responses/resp_1", "alice").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["id"], "resp_1");
    let theirs = gateway.call(Method::GET, "/v1/responses/resp_1", "bob").await;
    assert_eq!(theirs.error(), (404, json!("id"), json!("response_not_found")));
    assert_eq!(theirs.json()["error"]["message"], "No response found with id 'resp_1'.");

    let items = gateway.call(Method::GET, "/v1/responses/resp_1/input_items", "alice").await.json();
    let ids = |page: &Value| page["data"].as_array().unwrap().iter().map(|i| i["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&items), [json!("msg_2"), json!("msg_1"), json!("msg_0")], "newest first by default");
    assert_eq!((items["object"].clone(), items["has_more"].clone()), (json!("list"), json!(false)));
    assert_eq!((items["first_id"].clone(), items["last_id"].clone()), (json!("msg_2"), json!("msg_0")));
    let page =
        gateway.call(Method::GET, "/v1/responses/resp_1/input_items?order=asc&limit=1&after=msg_0", "alice").await;
    assert_eq!((ids(&page.json()), page.json()["has_more"].clone()), (vec![json!("msg_1")], json!(true)));
    let bad = gateway.call(Method::GET, "/v1/responses/resp_1/input_items?limit=101", "alice").await;
    assert_eq!(bad.error(), (400, json!("limit"), json!("invalid_value")));
    let unknown_after = gateway.call(Method::GET, "/v1/responses/resp_1/input_items?after=msg_9", "alice").await;
    assert_eq!(unknown_after.error().1, json!("after"));
    let theirs = gateway.call(Method::GET, "/v1/responses/resp_1/input_items", "bob").await;
    assert_eq!(theirs.error().0, 404);

    assert_eq!(gateway.call(Method::DELETE, "/v1/responses/resp_1", "bob").await.error().0, 404);
    let deleted = gateway.call(Method::DELETE, "/v1/responses/resp_1", "alice").await;
    assert_eq!(deleted.json(), json!({"id": "resp_1", "object": "response", "deleted": true}));
    assert_eq!(gateway.call(Method::GET, "/v1/responses/resp_1", "alice").await.error().0, 404);
}

#[tokio::test]
async fn background_mode_methods_and_paths_the_responses_routes_refuse() {
    let gateway = gateway(1 << 20);
    keep_response(&gateway, "alice", "resp_1", 1).await;
    let cancel = gateway.call(Method::POST, "/v1/responses/resp_1/cancel", "alice").await;
    assert_eq!(cancel.error(), (400, json!("background"), json!("background_unsupported")));
    assert_eq!(cancel.header("x-should-retry"), "false");
    let wrong = gateway.call(Method::POST, "/v1/responses/resp_1", "alice").await;
    assert_eq!(wrong.error().0, 405);
    assert_eq!(wrong.header("allow"), "GET, DELETE");
    assert_eq!(gateway.call(Method::GET, "/v1/responses/resp_1/cancel", "alice").await.error().0, 405);
    assert_eq!(gateway.call(Method::GET, "/v1/responses/resp_1/other", "alice").await.error().0, 404);
}
