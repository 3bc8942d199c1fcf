//! The Files and Batch APIs, OpenAI's shapes, on ext-proc's admin port:
//!
//! - `POST /v1/files` (a multipart form, streamed to [`Blobs`] as it comes),
//!   `GET /v1/files`, `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`;
//! - `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
//!   `POST /v1/batches/{id}/cancel`;
//! - the Responses API's stored responses (ext_proc keeps them, see
//!   [`crate::responses`]): `GET|DELETE /v1/responses/{id}`,
//!   `GET /v1/responses/{id}/input_items`, and `POST /v1/responses/{id}/cancel`,
//!   refused: background mode is not served.
//!
//! Clients reach them through Envoy: the filter checks their key and names
//! its owner in [`headers::OWNER`], alongside the internal token. Only a caller
//! presenting the token is served, so the owner header is trusted. Each
//! record belongs to its owner; another owner's id is not found.
//!
//! The API writes a batch's creation and its cancel request and wakes the
//! runner; everything else about a batch is the runner's.

use crate::blobs::{BlobError, BlobWriter, Blobs};
use crate::ids;
use crate::store::{BatchRecord, Deletion, FileQuery, FileRecord, Meta, Order, StoreError};
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Multipart, OriginalUri, Path, Query, Request, State,
};
use axum::http::header::{self, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{Stream, StreamExt};
use modelgate_proto::batch::{Batch, CreateBatch, Deleted, FileObject, ListPage, UPLOAD_PURPOSES};
use modelgate_proto::clock;
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::headers::{self, INTERNAL_TOKEN};
use modelgate_proto::stored_response::StoredResponse;
use modelgate_runtime::internal_token::InternalToken;
use serde::Serialize;
use serde_json::Value;
use std::convert::Infallible;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

/// What a multipart form may add to its file's bytes (boundaries, part
/// headers, the other fields) before its declared length is refused unread.
const FORM_OVERHEAD: u64 = 64 << 10;

/// Longest text field of an upload form (`purpose`, `expires_after[…]`).
const MAX_FORM_TEXT: usize = 1024;

/// Largest `POST /v1/batches` body: its metadata is bounded well below this.
const MAX_BATCH_REQUEST: usize = 1 << 20;

/// How long a `batch` file is kept without an `expires_after`, as OpenAI keeps it.
const BATCH_FILE_SECONDS: u64 = 30 * 86_400;

/// `expires_after[seconds]`'s range: an hour to 30 days.
const EXPIRY_SECONDS: RangeInclusive<u64> = 3600..=2_592_000;

/// `limit` of `GET /v1/files` and `GET /v1/batches`, and their defaults.
const FILES_PAGE: RangeInclusive<usize> = 1..=10_000;
const FILES_PAGE_DEFAULT: usize = 10_000;
const BATCHES_PAGE: RangeInclusive<usize> = 1..=100;
const BATCHES_PAGE_DEFAULT: usize = 20;
/// `limit` of `GET /v1/responses/{id}/input_items`, and its default, as OpenAI's.
const INPUT_ITEMS_PAGE: RangeInclusive<usize> = 1..=100;
const INPUT_ITEMS_PAGE_DEFAULT: usize = 20;

/// What the API serves from.
pub struct Api {
    pub meta: Arc<Meta>,
    pub blobs: Arc<Blobs>,
    /// Largest upload (`--files-max-bytes`).
    pub max_file_bytes: u64,
    /// A batch's completion window (`--batch-window-secs`): its `expires_at` is its creation plus this.
    pub window: Duration,
    /// The runner waits on it: notified for each new batch and each cancel.
    pub wake: Arc<Notify>,
    pub token: InternalToken,
}

/// The routes, serving only callers presenting the internal token. Other
/// paths under `/v1/files`, `/v1/batches` and `/v1/responses` are 404 `unknown_url`.
pub fn router(api: Arc<Api>) -> Router {
    let from_envoy = middleware::from_fn_with_state(api.clone(), only_envoy);
    let files = Router::new()
        .route(
            "/",
            // An upload is streamed and bounded by `max_file_bytes` as it comes, not by a body limit.
            post(upload).layer(DefaultBodyLimit::disable()).get(list_files).fallback(only("GET, POST")),
        )
        .route("/{id}", get(get_file).delete(delete_file).fallback(only("GET, DELETE")))
        .route("/{id}/content", get(file_content).fallback(only("GET")))
        .fallback(unknown_url);
    let batches = Router::new()
        .route("/", post(create_batch).get(list_batches).fallback(only("GET, POST")))
        .route("/{id}", get(get_batch).fallback(only("GET")))
        .route("/{id}/cancel", post(cancel_batch).fallback(only("POST")))
        .fallback(unknown_url);
    let responses = Router::new()
        .route("/{id}", get(get_response).delete(delete_response).fallback(only("GET, DELETE")))
        .route("/{id}/input_items", get(input_items).fallback(only("GET")))
        .route("/{id}/cancel", post(cancel_response).fallback(only("POST")))
        .fallback(unknown_url);
    Router::new()
        .nest("/v1/files", files)
        .nest("/v1/batches", batches)
        .nest("/v1/responses", responses)
        .route_layer(from_envoy)
        .layer(DefaultBodyLimit::max(MAX_BATCH_REQUEST))
        .with_state(api)
}

async fn only_envoy(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    match api.token.check(request.headers().get(INTERNAL_TOKEN).map(HeaderValue::as_bytes)) {
        Ok(()) => next.run(request).await,
        Err(refused) => Refusal(refused).into_response(),
    }
}

/// The records' owner the filter named.
struct Owner(String);

impl<S: Send + Sync> FromRequestParts<S> for Owner {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let owner = parts.headers.get(headers::OWNER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        Ok(Owner(owner.unwrap_or_default()))
    }
}

/// The `{id}` in a path, refused in OpenAI's envelope when it is not text.
struct Id(String);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Refusal> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Id(id)),
            Err(rejection) => {
                Err(GatewayError::invalid_parameter("id", format!("Invalid id: {}.", rejection.body_text())).into())
            }
        }
    }
}

// Files.

async fn upload(State(api): State<Arc<Api>>, Owner(owner): Owner, request: Request) -> Result<Response, Refusal> {
    let content_type = request.headers().get(header::CONTENT_TYPE).map(HeaderValue::as_bytes).unwrap_or_default();
    if !content_type.to_ascii_lowercase().starts_with(b"multipart/form-data") {
        return Err(GatewayError::not_multipart(&String::from_utf8_lossy(content_type)).into());
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > api.max_file_bytes.saturating_add(FORM_OVERHEAD)) {
        return Err(GatewayError::file_too_large(api.max_file_bytes).into());
    }
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, Body::from_stream(Paced { body: body.into_data_stream(), run: 0 }));
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|rejection| {
        GatewayError::invalid_request(format!("Could not read the multipart form: {}.", rejection.body_text()))
    })?;
    let mut form = Form::default();
    let checked = match form.read(&api, &mut multipart).await {
        Ok(()) => form.checked(),
        Err(refused) => Err(refused),
    };
    let (purpose, expires_after, upload) = match (checked, form.file.take()) {
        (Ok((purpose, expires_after)), Some(upload)) => (purpose, expires_after, upload),
        (Ok(_), None) => return Err(GatewayError::missing_required_parameter("file").into()),
        (Err(refused), upload) => {
            if let Some(upload) = upload {
                upload.abort().await;
            }
            return Err(refused.into());
        }
    };
    let bytes = upload.writer.finish().await.map_err(|e| blob_failure(&e))?;
    let now = clock::unix_seconds();
    let mut file = FileObject::new(upload.id, bytes, now, upload.filename, purpose);
    let lifetime = expires_after.or((file.purpose == "batch").then_some(BATCH_FILE_SECONDS));
    file.expires_at = lifetime.map(|seconds| now + seconds);
    let record = FileRecord { owner, file, blob: upload.key };
    if let Err(e) = api.meta.insert_file(&record).await {
        // Unrecorded, the bytes would never be found again.
        if let Err(e) = api.blobs.delete(&record.blob).await {
            tracing::warn!(blob = record.blob.as_str(), error = %e, "an unrecorded upload could not be deleted");
        }
        return Err(e.into());
    }
    Ok(json(&record.file))
}

/// A body handed on in runs of at most [`PACED_RUN`] bytes. The multipart
/// parser reads all that a body has ready before it hands out a piece of a
/// field: without a pause now and then, a fast client would have it buffer far
/// ahead of the writes to the blob.
struct Paced {
    body: BodyDataStream,
    run: usize,
}

const PACED_RUN: usize = 1 << 20;

impl Stream for Paced {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.run >= PACED_RUN {
            self.run = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let item = std::task::ready!(self.body.poll_next_unpin(cx));
        if let Some(Ok(piece)) = &item {
            self.run += piece.len();
        }
        Poll::Ready(item)
    }
}

/// An upload form as it is read: its parts may come in any order.
#[derive(Default)]
struct Form {
    file: Option<Upload>,
    purpose: Option<String>,
    anchor: Option<String>,
    seconds: Option<String>,
}

/// The form's file, being written to its blob.
struct Upload {
    id: String,
    key: String,
    filename: String,
    writer: BlobWriter,
}

impl Upload {
    async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(blob = self.key.as_str(), error = %e, "a refused upload could not be dropped");
        }
    }
}

impl Form {
    async fn read(&mut self, api: &Api, multipart: &mut Multipart) -> Result<(), GatewayError> {
        while let Some(mut field) = multipart.next_field().await.map_err(|e| unreadable(&e))? {
            let name = field.name().unwrap_or_default().to_string();
            let slot = match name.as_str() {
                "file" if self.file.is_none() => {
                    let upload = self.file.insert(Upload::start(api, &mut field).await?);
                    while let Some(piece) = field.chunk().await.map_err(|e| unreadable(&e))? {
                        if upload.writer.written() + piece.len() as u64 > api.max_file_bytes {
                            return Err(GatewayError::file_too_large(api.max_file_bytes));
                        }
                        upload.writer.push(piece).await.map_err(|e| blob_failure(&e))?;
                    }
                    continue;
                }
                "file" => return Err(given_twice("file")),
                "purpose" => &mut self.purpose,
                "expires_after[anchor]" => &mut self.anchor,
                "expires_after[seconds]" => &mut self.seconds,
                _ => return Err(GatewayError::unrecognized_argument(&name)),
            };
            if slot.is_some() {
                return Err(given_twice(&name));
            }
            *slot = Some(text(field, &name).await?);
        }
        Ok(())
    }

    /// The purpose and the lifetime asked for, if the form's fields are right.
    fn checked(&self) -> Result<(String, Option<u64>), GatewayError> {
        let purpose = self.purpose.clone().ok_or_else(|| GatewayError::missing_required_parameter("purpose"))?;
        if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
            let supported: Vec<String> = UPLOAD_PURPOSES.iter().map(|p| format!("'{p}'")).collect();
            return Err(GatewayError::invalid_value(
                "purpose",
                format!("Invalid value for 'purpose': '{purpose}'. Supported values are: {}.", supported.join(", ")),
            ));
        }
        let expires_after = match (self.anchor.as_deref(), self.seconds.as_deref()) {
            (None, None) => None,
            (Some(anchor), _) if anchor != "created_at" => {
                return Err(GatewayError::invalid_value(
                    "expires_after[anchor]",
                    format!("Invalid value for 'expires_after[anchor]': '{anchor}'. The only supported value is 'created_at'."),
                ))
            }
            (None, Some(_)) => return Err(GatewayError::missing_required_parameter("expires_after[anchor]")),
            (Some(_), None) => return Err(GatewayError::missing_required_parameter("expires_after[seconds]")),
            (Some(_), Some(seconds)) => match seconds.parse() {
                Ok(seconds) if EXPIRY_SECONDS.contains(&seconds) => Some(seconds),
                _ => {
                    return Err(GatewayError::invalid_value(
                        "expires_after[seconds]",
                        format!(
                            "Invalid value for 'expires_after[seconds]': '{seconds}'. Expected whole seconds from {} to {}.",
                            EXPIRY_SECONDS.start(),
                            EXPIRY_SECONDS.end()
                        ),
                    ))
                }
            },
        };
        Ok((purpose, expires_after))
    }
}

/// Longest file name kept (a file system's usual limit).
const MAX_FILENAME_BYTES: usize = 255;

impl Upload {
    async fn start(api: &Api, field: &mut Field<'_>) -> Result<Self, GatewayError> {
        let id = ids::new_id(ids::FILE);
        let key = format!("files/{id}");
        let filename = field.file_name().filter(|name| !name.is_empty()).unwrap_or("upload").to_string();
        // Kept in the file's record and listed back: bounded like every client-given value.
        if filename.len() > MAX_FILENAME_BYTES {
            let message = format!("The file's name is longer than {MAX_FILENAME_BYTES} bytes.");
            return Err(GatewayError::invalid_value("file", message));
        }
        let writer = api.blobs.writer(&key).await.map_err(|e| blob_failure(&e))?;
        Ok(Upload { id, key, filename, writer })
    }
}

/// A text field's value, bounded.
async fn text(mut field: Field<'_>, name: &str) -> Result<String, GatewayError> {
    let mut value = Vec::new();
    while let Some(piece) = field.chunk().await.map_err(|e| unreadable(&e))? {
        if value.len() + piece.len() > MAX_FORM_TEXT {
            return Err(GatewayError::invalid_value(name, format!("'{name}' is longer than {MAX_FORM_TEXT} bytes.")));
        }
        value.extend_from_slice(&piece);
    }
    String::from_utf8(value).map_err(|_| GatewayError::invalid_value(name, format!("'{name}' is not UTF-8 text.")))
}

fn given_twice(name: &str) -> GatewayError {
    GatewayError::invalid_parameter(name, format!("'{name}' was given more than once."))
}

fn unreadable(e: &MultipartError) -> GatewayError {
    GatewayError::invalid_request(format!("Could not read the multipart form: {}.", e.body_text()))
}

async fn list_files(
    State(api): State<Arc<Api>>,
    Owner(owner): Owner,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Refusal> {
    let query = query_pairs(query)?;
    let files = FileQuery {
        purpose: param(&query, "purpose").map(str::to_string),
        order: order(&query)?,
        after: param(&query, "after").map(str::to_string),
        limit: limit(&query, FILES_PAGE, FILES_PAGE_DEFAULT)?,
    };
    let page = api.meta.list_files(&owner, &files, clock::unix_seconds()).await?;
    let files = page.items.into_iter().map(|record| record.file).collect();
    Ok(json(&ListPage::new(files, page.has_more, |file: &FileObject| &file.id)))
}

async fn get_file(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    Ok(json(&file(&api, &owner, &id).await?.file))
}

async fn file_content(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    let record = file(&api, &owner, &id).await?;
    let pieces = match api.blobs.read(&record.blob).await {
        Ok(pieces) => pieces,
        Err(BlobError::NotFound) => {
            tracing::warn!(file = id.as_str(), blob = record.blob.as_str(), "a file's bytes are missing");
            return Err(GatewayError::file_not_found(&id).into());
        }
        Err(e) => return Err(blob_failure(&e).into()),
    };
    let blob = record.blob;
    let body = Body::from_stream(pieces.map(move |piece| {
        // Past the status line, a failed read can only cut the answer short.
        piece.inspect_err(|e| tracing::warn!(blob = blob.as_str(), error = %e, "a file's download broke off"))
    }));
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
        (header::CONTENT_LENGTH, HeaderValue::from(record.file.bytes)),
    ];
    Ok((headers, body).into_response())
}

async fn delete_file(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    match api.meta.delete_file(&owner, &id).await? {
        Deletion::Deleted(record) => {
            // The record is gone, so the file is: bytes left behind are only garbage.
            if let Err(e) = api.blobs.delete(&record.blob).await {
                tracing::warn!(blob = record.blob.as_str(), error = %e, "a deleted file's bytes could not be deleted");
            }
            Ok(json(&Deleted { id, object: "file".into(), deleted: true }))
        }
        Deletion::NotFound => Err(GatewayError::file_not_found(&id).into()),
        Deletion::InUse { batch_id } => Err(GatewayError::file_in_use(&id, &batch_id).into()),
    }
}

async fn file(api: &Api, owner: &str, id: &str) -> Result<FileRecord, Refusal> {
    let record = api.meta.file(owner, id, clock::unix_seconds()).await?;
    Ok(record.ok_or_else(|| GatewayError::file_not_found(id))?)
}

// Batches.

async fn create_batch(
    State(api): State<Arc<Api>>,
    Owner(owner): Owner,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Refusal> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::body_too_large(Some(MAX_BATCH_REQUEST)),
        _ => GatewayError::invalid_request(format!("Could not read the request body: {}.", rejection.body_text())),
    })?;
    let create = CreateBatch::parse(&body).map_err(|invalid| match invalid.param {
        "body" => GatewayError::invalid_request(invalid.message),
        param => GatewayError::invalid_parameter(param, invalid.message),
    })?;
    let now = clock::unix_seconds();
    let input = api.meta.file(&owner, &create.input_file_id, now).await?.ok_or_else(|| {
        GatewayError::invalid_parameter("input_file_id", format!("No such File object: {}", create.input_file_id))
    })?;
    if input.file.purpose != "batch" {
        return Err(GatewayError::invalid_value(
            "input_file_id",
            format!(
                "File {} has purpose '{}': a batch's input file must be uploaded with purpose 'batch'.",
                input.file.id, input.file.purpose
            ),
        )
        .into());
    }
    let batch = Batch::new(ids::new_id(ids::BATCH), create, now, now + api.window.as_secs());
    let record = BatchRecord { owner, batch, cancel_requested_at: None };
    api.meta.insert_batch(&record).await?;
    api.wake.notify_one();
    Ok(json(&record.view()))
}

async fn get_batch(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    let record = api.meta.batch(&owner, &id).await?.ok_or_else(|| GatewayError::batch_not_found(&id))?;
    Ok(json(&record.view()))
}

async fn list_batches(
    State(api): State<Arc<Api>>,
    Owner(owner): Owner,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Refusal> {
    let query = query_pairs(query)?;
    let limit = limit(&query, BATCHES_PAGE, BATCHES_PAGE_DEFAULT)?;
    let page = api.meta.list_batches(&owner, param(&query, "after"), limit).await?;
    let batches = page.items.iter().map(BatchRecord::view).collect();
    Ok(json(&ListPage::new(batches, page.has_more, |batch: &Batch| &batch.id)))
}

async fn cancel_batch(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    let record = api
        .meta
        .request_cancel(&owner, &id, clock::unix_seconds())
        .await?
        .ok_or_else(|| GatewayError::batch_not_found(&id))?;
    if record.batch.status.is_terminal() {
        return Err(GatewayError::batch_finished(&id, record.batch.status.as_str()).into());
    }
    api.wake.notify_one();
    Ok(json(&record.view()))
}

// Stored responses.

async fn get_response(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    Ok(json(&stored_response(&api, &owner, &id).await?.response))
}

async fn delete_response(State(api): State<Arc<Api>>, Owner(owner): Owner, Id(id): Id) -> Result<Response, Refusal> {
    let deleted =
        api.meta.delete_response(&owner, &id, clock::unix_seconds()).await.map_err(|e| response_store_down(&e))?;
    if !deleted {
        return Err(GatewayError::response_not_found(&id).into());
    }
    Ok(json(&Deleted { id, object: "response".into(), deleted: true }))
}

/// The response's input items as stored (each with its `id`), a page at a time.
async fn input_items(
    State(api): State<Arc<Api>>,
    Owner(owner): Owner,
    Id(id): Id,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Refusal> {
    let query = query_pairs(query)?;
    let order = order(&query)?;
    let limit = limit(&query, INPUT_ITEMS_PAGE, INPUT_ITEMS_PAGE_DEFAULT)?;
    let mut items = stored_response(&api, &owner, &id).await?.input;
    if order == Order::Desc {
        items.reverse();
    }
    let start = match param(&query, "after") {
        Some(after) => {
            1 + items.iter().position(|item| item_id(item) == after).ok_or_else(|| {
                GatewayError::invalid_value(
                    "after",
                    format!("Invalid value for 'after': '{after}' is not an input item of response {id}."),
                )
            })?
        }
        None => 0,
    };
    let mut page: Vec<Value> = items.into_iter().skip(start).take(limit + 1).collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    Ok(json(&ListPage::new(page, has_more, item_id)))
}

fn item_id(item: &Value) -> &str {
    item.get("id").and_then(Value::as_str).unwrap_or_default()
}

/// Background mode is not served, so no response is ever running to cancel.
async fn cancel_response() -> Refusal {
    Refusal(GatewayError::background_unsupported("background"))
}

async fn stored_response(api: &Api, owner: &str, id: &str) -> Result<StoredResponse, Refusal> {
    let stored = api.meta.response(owner, id, clock::unix_seconds()).await.map_err(|e| response_store_down(&e))?;
    Ok(stored.ok_or_else(|| GatewayError::response_not_found(id))?)
}

fn response_store_down(e: &StoreError) -> Refusal {
    tracing::warn!(error = %e, "response store unavailable");
    Refusal(GatewayError::response_store_unavailable())
}

// Queries.

/// A list's `order`: `desc` unless `asc` is asked for.
fn order(query: &[(String, String)]) -> Result<Order, GatewayError> {
    match param(query, "order") {
        None | Some("desc") => Ok(Order::Desc),
        Some("asc") => Ok(Order::Asc),
        Some(other) => Err(GatewayError::invalid_value(
            "order",
            format!("Invalid value for 'order': '{other}'. Supported values are: 'asc', 'desc'."),
        )),
    }
}

fn query_pairs(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Vec<(String, String)>, GatewayError> {
    query.map(|Query(pairs)| pairs).map_err(|rejection| {
        GatewayError::invalid_request(format!("Could not read the query string: {}.", rejection.body_text()))
    })
}

/// A query parameter's value: the last one given, if it is not empty.
fn param<'q>(query: &'q [(String, String)], name: &str) -> Option<&'q str> {
    query.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.as_str()).filter(|value| !value.is_empty())
}

fn limit(query: &[(String, String)], range: RangeInclusive<usize>, default: usize) -> Result<usize, GatewayError> {
    let Some(value) = param(query, "limit") else {
        return Ok(default);
    };
    value.parse().ok().filter(|limit| range.contains(limit)).ok_or_else(|| {
        GatewayError::invalid_value(
            "limit",
            format!(
                "Invalid value for 'limit': '{value}'. Expected an integer from {} to {}.",
                range.start(),
                range.end()
            ),
        )
    })
}

// Answers.

/// An error answer: OpenAI's envelope, with the retry advice.
struct Refusal(GatewayError);

impl From<GatewayError> for Refusal {
    fn from(error: GatewayError) -> Self {
        Refusal(error)
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "batch store unavailable");
        Refusal(GatewayError::batch_store_unavailable())
    }
}

fn blob_failure(e: &BlobError) -> GatewayError {
    tracing::warn!(error = %e, "file store unavailable");
    GatewayError::file_store_unavailable()
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let error = self.0;
        let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], error.to_json()).into_response();
        let headers = response.headers_mut();
        if let Some((name, value)) = retry_header(error.should_retry()) {
            headers.insert(name, HeaderValue::from_static(value));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn json(value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => Refusal(GatewayError::internal(format!("encoding the answer: {e}"))).into_response(),
    }
}

/// 405 for a known path called with another method than `allowed`.
fn only(
    allowed: &'static str,
) -> impl Fn(Method, OriginalUri) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |method: Method, OriginalUri(uri): OriginalUri| {
        let mut response =
            Refusal(GatewayError::method_not_allowed(method.as_str(), uri.path(), allowed)).into_response();
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
        std::future::ready(response)
    }
}

async fn unknown_url(method: Method, OriginalUri(uri): OriginalUri) -> Refusal {
    Refusal(GatewayError::unknown_url(Some((method.as_str(), uri.path()))))
}
