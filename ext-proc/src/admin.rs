//! ext-proc's admin port, plain HTTP/1.1 beside the gRPC service:
//!
//! - `POST /v1/usage/records`: the filter's usage records, one JSON object a
//!   line. Lines that do not parse are skipped and counted; the answer is
//!   `200 {"accepted":N,"rejected":M}`, or a 400 error when lines came and
//!   none parsed (a sender speaking another version).
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]).
//! - `GET /v1/usage/report?start=&end=`: usage per key, model and backend
//!   ([`crate::usage_report`]), in Unix seconds; `start` defaults to 0, `end`
//!   to now.
//! - `POST /v1/limits/spend`: rate-limit buckets in Redis
//!   ([`crate::shared_limits`]), only when Redis is configured. A debit may
//!   carry an `id` (1 to 64 letters, digits, `-`, `_`), applied once however
//!   often it is sent.
//!
//! Errors are OpenAI envelopes. The port has no authentication: bind it to
//! loopback or a network only the gateway reaches.

use crate::metrics::{self, Metrics};
use crate::shared_limits::SharedLimits;
use crate::usage_report::UsageStore;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use modelgate_proto::error::GatewayError;
use modelgate_proto::limits::SpendRequest;
use modelgate_proto::usage::UsageRecord;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest request body: about a minute of records at a thousand requests a second.
const MAX_BODY: usize = 32 << 20;

/// Distinct model names kept as they are in metrics and the report. A model
/// name is client input (any name a `*` route serves), so past this many,
/// new names are counted as [`OTHER_MODELS`] and memory stays bounded.
const MAX_MODELS: usize = 1000;
const OTHER_MODELS: &str = "(other)";

/// What the admin port keeps: metrics and the usage report's minutes.
pub struct Admin {
    metrics: Metrics,
    usage: Mutex<UsageStore>,
    models: Mutex<HashSet<String>>,
}

impl Admin {
    pub fn new(retention_hours: u64) -> Self {
        Admin {
            metrics: Metrics::default(),
            usage: Mutex::new(UsageStore::new(retention_hours)),
            models: Mutex::new(HashSet::new()),
        }
    }

    /// Counts, stores and logs parsed records, as received at `now_ms`.
    pub fn ingest(&self, mut records: Vec<UsageRecord>, now_ms: u64) {
        {
            let mut models = self.models.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for record in &mut records {
                if !models.contains(&record.model) {
                    if models.len() < MAX_MODELS {
                        models.insert(record.model.clone());
                    } else {
                        record.model = OTHER_MODELS.into();
                    }
                }
            }
        }
        for record in &records {
            self.metrics.record(record);
            log(record);
        }
        // A poisoned lock only means another ingest panicked midway: its sums are still sums.
        let mut usage = self.usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        usage.prune(now_ms);
        for record in &records {
            usage.add(record, now_ms);
        }
    }
}

/// One log line per request, inside a span that carries who asked what.
fn log(record: &UsageRecord) {
    let span = tracing::info_span!(
        "request",
        request_id = record.request_id.as_str(),
        model = record.model.as_str(),
        backend = record.backend.as_str(),
        key = record.key.as_str(),
        status = record.status,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
    );
    if let Some(usage) = record.usage {
        span.record("prompt_tokens", usage.prompt_tokens);
        span.record("completion_tokens", usage.completion_tokens);
    }
    span.in_scope(|| {
        tracing::info!(
            stream = record.stream,
            latency_us = record.latency_us,
            ttft_us = record.ttft_us,
            cost_usd = record.cost_usd,
            "request finished"
        )
    });
}

/// An NDJSON body's records, and the lines that were not one.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedRecords {
    pub records: Vec<UsageRecord>,
    pub rejected: u64,
    /// Why the first rejected line was, with its number (from 1).
    pub first_error: Option<String>,
}

/// Splits an NDJSON body into records; blank lines are neither. Bytes that
/// are not UTF-8 only spoil the lines they are on.
pub fn parse_records(body: &[u8]) -> ParsedRecords {
    let mut parsed = ParsedRecords::default();
    for (index, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let record = serde_json::from_slice::<UsageRecord>(line).map_err(|e| e.to_string()).and_then(|record| {
            // Counters only go up, and a sum with NaN stays NaN.
            match record.cost_usd {
                Some(cost) if !(cost.is_finite() && cost >= 0.0) => Err(format!("cost_usd {cost} is not a price")),
                _ => Ok(record),
            }
        });
        match record {
            Ok(record) => parsed.records.push(record),
            Err(e) => {
                parsed.rejected += 1;
                parsed.first_error.get_or_insert_with(|| format!("line {}: {e}", index + 1));
            }
        }
    }
    parsed
}

/// The report's window from the query string: `(start, end)` in Unix seconds.
pub fn parse_window(query: Option<&str>, now_s: u64) -> Result<(u64, u64), GatewayError> {
    let (mut start, mut end) = (0, now_s);
    for pair in query.unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bound = match name {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        *bound = value.parse().map_err(|_| {
            GatewayError::invalid_request(
                format!("`{name}` must be a whole number of seconds since the Unix epoch, not `{value}`."),
                Some(name),
                None,
            )
        })?;
    }
    if end < start {
        return Err(GatewayError::invalid_request(
            format!("`end` ({end}) is before `start` ({start})."),
            Some("end"),
            None,
        ));
    }
    Ok((start, end))
}

/// The admin port's routes; `/v1/limits/spend` only with a limit store.
pub fn router(admin: Arc<Admin>, limits: Option<SharedLimits>) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(get_metrics).fallback(only("GET")))
        .route("/v1/usage/records", post(post_records).fallback(only("POST")))
        .route("/v1/usage/report", get(get_report).fallback(only("GET")))
        .fallback(unknown_url)
        .with_state(admin.clone());
    if let Some(store) = limits {
        let spend = Router::new()
            .route("/v1/limits/spend", post(post_spend).fallback(only("POST")))
            .with_state(Arc::new(Limits { store, admin }));
        router = router.merge(spend);
    }
    router.layer(DefaultBodyLimit::max(MAX_BODY))
}

struct Limits {
    store: SharedLimits,
    admin: Arc<Admin>,
}

async fn get_metrics(State(admin): State<Arc<Admin>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], admin.metrics.encode()).into_response()
}

async fn post_records(State(admin): State<Arc<Admin>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection),
    };
    let parsed = parse_records(&body);
    let accepted = parsed.records.len();
    admin.ingest(parsed.records, now_ms());
    if parsed.rejected > 0 {
        admin.metrics.records_rejected(parsed.rejected);
        tracing::warn!(rejected = parsed.rejected, first = parsed.first_error.as_deref(), "usage records skipped");
    }
    if accepted == 0 && parsed.rejected > 0 {
        let error = GatewayError::invalid_request(
            format!(
                "None of the {} lines is a usage record ({}).",
                parsed.rejected,
                parsed.first_error.as_deref().unwrap_or_default()
            ),
            None,
            Some("invalid_usage_record"),
        );
        return error_response(&error);
    }
    json_response(StatusCode::OK, serde_json::json!({"accepted": accepted, "rejected": parsed.rejected}).to_string())
}

async fn get_report(State(admin): State<Arc<Admin>>, uri: Uri) -> Response {
    let now = now_ms();
    // `end` defaults to now rounded up, so a record of this very second counts.
    let (start, end) = match parse_window(uri.query(), now.div_ceil(1000)) {
        Ok(window) => window,
        Err(error) => return error_response(&error),
    };
    let report = {
        let mut usage = admin.usage.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        usage.prune(now);
        usage.report(start, end)
    };
    match serde_json::to_string(&report) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(e) => {
            error_response(&GatewayError::new(500, "server_error", format!("encoding the report: {e}"), None, None))
        }
    }
}

async fn post_spend(State(limits): State<Arc<Limits>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection),
    };
    let request: SpendRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error_response(&GatewayError::unparsable_json(&e)),
    };
    if let Some(error) = request.id.as_deref().and_then(|id| bad_debit_id(id, request.debit)) {
        return error_response(&error);
    }
    match limits.store.spend(&request).await {
        Ok(answer) => match serde_json::to_string(&answer) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => {
                error_response(&GatewayError::new(500, "server_error", format!("encoding verdicts: {e}"), None, None))
            }
        },
        Err(e) => {
            limits.admin.metrics.limit_store_error();
            tracing::warn!(error = %e, "limit store unavailable");
            error_response(&GatewayError::new(
                503,
                "server_error",
                "The rate-limit store is unavailable; try again shortly.".into(),
                None,
                Some("limit_store_unavailable"),
            ))
        }
    }
}

/// Why a spend call's `id` is refused, if it is: ids name debits, and
/// become Redis keys, so they are short and plain.
fn bad_debit_id(id: &str, debit: bool) -> Option<GatewayError> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    (!debit || id.is_empty() || id.len() > 64 || !id.bytes().all(plain)).then(|| {
        GatewayError::invalid_request(
            "Invalid 'id': a debit's id is 1 to 64 letters, digits, '-' or '_', and only debits take one.".into(),
            Some("id"),
            Some("invalid_value"),
        )
    })
}

/// 405 for a known path called with another method than `allowed`.
fn only(allowed: &'static str) -> impl Fn(Method, Uri) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |method: Method, uri: Uri| {
        let error = GatewayError::method_not_allowed(method.as_str(), uri.path(), allowed);
        let mut response = error_response(&error);
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        std::future::ready(response)
    }
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    error_response(&GatewayError::new(
        404,
        modelgate_proto::error::INVALID_REQUEST,
        format!("Unknown request URL: {method} {}.", uri.path()),
        None,
        Some("unknown_url"),
    ))
}

fn body_error(rejection: &BytesRejection) -> Response {
    let error = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        GatewayError::body_too_large(MAX_BODY)
    } else {
        GatewayError::invalid_request(format!("Could not read the request body: {rejection}."), None, None)
    };
    error_response(&error)
}

fn error_response(error: &GatewayError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, error.to_json());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn ndjson_lines_parse_and_bad_ones_are_counted() {
        let body = b"{\"request_id\":\"a\",\"at_ms\":1,\"key\":\"\",\"model\":\"m\",\"backend\":\"b\",\"status\":200,\
\"stream\":false,\"usage\":{\"prompt_tokens\":3},\"cost_usd\":null,\"latency_us\":5,\"ttft_us\":null}\r\n\
\n   \n\
not json\n\
{\"request_id\":\"b\"}\n\
\xff\xfe\n\
{\"request_id\":\"c\",\"at_ms\":2,\"key\":\"k\",\"model\":\"\",\"backend\":\"\",\"status\":401,\"stream\":true,\
\"usage\":null,\"cost_usd\":-1.0,\"latency_us\":0,\"ttft_us\":null}\n\
{\"request_id\":\"d\",\"at_ms\":2,\"key\":\"k\",\"model\":\"\",\"backend\":\"\",\"status\":401,\"stream\":true,\
\"usage\":null,\"cost_usd\":0.5,\"latency_us\":0,\"ttft_us\":9,\"itl_us\":[1,2]}";
        let parsed = parse_records(body);
        assert_eq!(parsed.rejected, 4);
        assert_eq!(parsed.first_error.as_deref().map(|e| e.starts_with("line 4: ")), Some(true), "{parsed:?}");
        let ids: Vec<_> = parsed.records.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["a", "d"]);
        assert_eq!(parsed.records[0].usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((3, 0)));
        assert_eq!((parsed.records[1].ttft_us, parsed.records[1].itl_us.as_slice()), (Some(9), &[1, 2][..]));
        assert_eq!(parse_records(b""), ParsedRecords::default());
    }

    #[test]
    fn model_names_past_the_cap_are_counted_together() {
        let admin = Admin::new(1);
        let record = |model: String| UsageRecord { model, status: 200, ..UsageRecord::default() };
        admin.ingest((0..MAX_MODELS + 5).map(|i| record(format!("m-{i}"))).collect(), 0);
        admin.ingest(vec![record("m-0".into()), record("new".into())], 0);
        let metrics = admin.metrics.encode();
        let series = |model: &str| {
            metrics
                .lines()
                .filter(|l| l.starts_with("modelgate_requests_total") && l.contains(&format!("model=\"{model}\"")))
                .count()
        };
        assert_eq!((series("m-0"), series("m-999"), series("m-1000"), series("new")), (1, 1, 0, 0));
        let other = metrics
            .lines()
            .find(|l| l.starts_with("modelgate_requests_total") && l.contains("model=\"(other)\""))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string);
        assert_eq!(other.as_deref(), Some("6"));
    }

    #[test]
    fn the_window_defaults_to_all_until_now_and_names_a_bad_parameter() {
        assert_eq!(parse_window(None, 500), Ok((0, 500)));
        assert_eq!(parse_window(Some(""), 500), Ok((0, 500)));
        assert_eq!(parse_window(Some("start=60&end=120&other=x"), 500), Ok((60, 120)));
        assert_eq!(parse_window(Some("start=600"), 500).map_err(|e| e.body.param), Err(Some("end".into())));
        assert_eq!(parse_window(Some("end=600"), 500), Ok((0, 600)));
        for (query, param) in [("start=-1", "start"), ("start=1.5", "start"), ("end=", "end"), ("end", "end")] {
            let error = parse_window(Some(query), 500).unwrap_err();
            let envelope: Value = serde_json::from_slice(&error.to_json()).unwrap();
            assert_eq!(error.status, 400);
            assert_eq!(envelope["error"]["type"], json!("invalid_request_error"), "{query}");
            assert_eq!(envelope["error"]["param"], json!(param), "{query}");
            assert_eq!(envelope["error"]["code"], Value::Null);
        }
    }
}
