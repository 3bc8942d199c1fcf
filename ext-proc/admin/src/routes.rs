//! ext-proc's admin port, plain HTTP/1.1 beside the gRPC service:
//!
//! - `POST /v1/usage/records`: the filter's usage records, one JSON object a
//!   line, and its tallies of refused requests and dropped records. Lines
//!   that do not parse are skipped and counted; the answer is
//!   `200 {"accepted":N,"rejected":M}`, or a 400 error when lines came and
//!   none parsed (a sender speaking another version). Every value that
//!   becomes a label or a log field is bounded again here.
//!   A batch with an `x-modelgate-batch-id` already applied is answered the
//!   same, with `"repeat":true`, and not applied again
//!   ([`crate::usage_store`]); a 503 when the usage store cannot keep it.
//!   Before a batch is kept, each record holding a budget reservation settles
//!   it ([`modelgate_gate::budgets`]), once however often it is sent; a 503
//!   when the budgets' store does not answer, so the batch comes again.
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]).
//! - `GET /healthz` and `GET /readyz`: the probes ([`modelgate_runtime::health`]);
//!   readiness fails from SIGTERM on, while the drain delay still serves.
//! - `GET /v1/usage/report?start=&end=`: usage per key, model and backend
//!   ([`crate::usage_report`]), in Unix seconds; `start` defaults to 0, `end`
//!   to now.
//! - `GET /v1/usage/budgets?key=`: each budget's counter in its current
//!   period (of one key, or of all): limit, spent, reserved and when it resets.
//! - `POST /v1/limits/spend`: rate-limit buckets in Redis
//!   ([`crate::shared_limits`]), only when Redis is configured. A debit may
//!   carry an `id` (1 to 64 letters, digits, `-`, `_`), applied once however
//!   often it is sent.
//!
//! Errors are OpenAI envelopes. With an internal token configured, the two
//! routes the filter calls (records, spend) serve only callers presenting it
//! ([`modelgate_runtime::internal_token`]); the metrics and the report are read by
//! people and scrapers, so bind the port to loopback or a network only the
//! gateway and its operators reach.

use crate::low_priority::LowPriority;
use crate::metrics::{self, Metrics};
use crate::shared_limits::SharedLimits;
use crate::usage_report::Retention;
use crate::usage_store::{self, Dedup, Ledger, Outcome, Usage};
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use modelgate_gate::budgets::{self, Budgets, Charge};
use modelgate_gate::error_answers::{body_error, error_response, method_not_allowed};
use modelgate_proto::clock;
use modelgate_proto::error::GatewayError;
use modelgate_proto::gate::ReplaySource;
use modelgate_proto::limits::SpendRequest;
use modelgate_proto::usage::{bounded, Tally, UsageRecord, INVALID, OTHER_MODELS};
use modelgate_runtime::health;
use modelgate_runtime::internal_token::InternalToken;
use modelgate_runtime::process::Shutdown;
use prometheus_client::collector::Collector;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Largest request body: about a minute of records at a thousand requests a second.
const MAX_BODY: usize = 32 << 20;

/// Distinct model names kept as they are in metrics and the report. A model
/// name is client input (any name a pattern route serves): it becomes a
/// label only once the filter vouches for it (an exact route, or a backend's
/// success), and past this many, new names too are counted as
/// [`OTHER_MODELS`], so memory and `/metrics` stay bounded.
const MAX_MODELS: usize = 1000;

/// How long applied batch ids are remembered unless configured.
pub const DEFAULT_DEDUP: Dedup = Dedup { window_ms: 60 * 60_000 };

/// What the admin port keeps: metrics and the usage report's minutes, and
/// the budgets its records settle.
pub struct Admin {
    metrics: Arc<Metrics>,
    usage: Usage,
    models: Arc<Mutex<HashSet<String>>>,
    budgets: Option<Arc<Budgets>>,
    /// Where the records are parsed, labelled, counted and logged: it cannot hold a pick.
    records_thread: LowPriority,
}

/// Why a batch was not kept: the filter sends it again.
#[derive(Debug)]
pub enum IngestError {
    Usage(usage_store::StoreError),
    Budgets(budgets::StoreError),
    /// Their parse or labels failed (a panic on the records' thread).
    RecordsThread,
}

impl std::fmt::Display for IngestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IngestError::Usage(e) => write!(f, "usage store: {e}"),
            IngestError::Budgets(e) => write!(f, "budget store: {e}"),
            IngestError::RecordsThread => write!(f, "the records' thread failed on this batch"),
        }
    }
}

impl std::error::Error for IngestError {}

impl Admin {
    /// Usage kept in memory only.
    pub fn new(retention_hours: u64) -> Self {
        Admin::with_usage(Usage::local(Ledger::in_memory(Retention::hours(retention_hours), DEFAULT_DEDUP)))
    }

    pub fn with_usage(usage: Usage) -> Self {
        Admin {
            metrics: Arc::default(),
            usage,
            models: Arc::new(Mutex::new(HashSet::new())),
            budgets: None,
            records_thread: LowPriority::start(),
        }
    }

    /// Settles `budgets`' reservations from the records, reports them on
    /// `/v1/usage/budgets`, and counts their refusals in `/metrics`.
    pub fn with_budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.metrics.register_collector(budgets.metrics());
        self.budgets = Some(budgets);
        self
    }

    /// Adds metrics read from elsewhere at each scrape (the endpoint picker's, say) to `/metrics`.
    pub fn with_collector(self, collector: Box<dyn Collector>) -> Self {
        self.metrics.register_collector(collector);
        self
    }

    /// Stores a batch of parsed records and tallies, received at `now_ms`, once:
    /// a repeat of a batch already applied is neither stored nor counted nor
    /// logged again. Every value that becomes a label is bounded first.
    /// The records' budget reservations are settled first: a batch that
    /// fails after is sent again, and settles nothing twice.
    pub async fn ingest(
        &self,
        batch: Option<&str>,
        mut records: Vec<UsageRecord>,
        mut tallies: Vec<Tally>,
        now_ms: u64,
    ) -> Result<Outcome, IngestError> {
        if let Some(budgets) = &self.budgets {
            let released = tallies.iter().flat_map(|tally| &tally.released_reservations);
            let settlements: Vec<_> = records
                .iter()
                .filter_map(settlement)
                .chain(released.map(|reservation| (reservation.as_str(), NOTHING)))
                .collect();
            budgets.settle_all(&settlements).await.map_err(IngestError::Budgets)?;
        }
        let models = Arc::clone(&self.models);
        let (records, tallies) = self
            .records_thread
            .run(move || {
                let mut models = models.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                label(&mut models, &mut records, &mut tallies);
                (records, tallies)
            })
            .await
            .ok_or(IngestError::RecordsThread)?;
        let outcome = self.usage.apply(batch, &records, &tallies, now_ms).await.map_err(IngestError::Usage)?;
        if outcome == Outcome::Applied {
            let metrics = Arc::clone(&self.metrics);
            self.records_thread
                .run(move || count_and_log(&metrics, &records, &tallies))
                .await
                .ok_or(IngestError::RecordsThread)?;
        }
        Ok(outcome)
    }
}

/// Counts applied records and tallies into the metrics, and logs them. On the
/// records' thread: a second's batch from a busy worker (a thousand records
/// and more, a log line each) takes milliseconds, which on the thread that
/// answers Envoy's ext_proc exchanges held every pick of a pool's replica.
fn count_and_log(metrics: &Metrics, records: &[UsageRecord], tallies: &[Tally]) {
    for record in records {
        metrics.record(record);
        log(record);
    }
    for tally in tallies {
        metrics.records_dropped(tally.dropped_records);
        if tally.dropped_records > 0 {
            tracing::warn!(dropped = tally.dropped_records, "the gateway dropped usage records it could not send");
        }
        for refused in &tally.refused {
            metrics.refused(refused);
            tracing::info!(
                key = refused.key.as_str(),
                model = refused.model.as_str(),
                status = refused.status,
                count = refused.count,
                "requests refused before any backend"
            );
        }
    }
}

/// What a request that used nothing is charged.
const NOTHING: Charge = Charge::Real { usd_micros: 0, tokens: 0 };

/// The budget reservation `record` holds, if any, and what it is charged:
/// what it cost (nothing, for an error), or, answered without usage, what it reserved.
fn settlement(record: &UsageRecord) -> Option<(&str, Charge)> {
    let charge = match record.usage {
        _ if record.status >= 400 => NOTHING,
        Some(usage) => Charge::Real {
            usd_micros: record.cost_usd.map_or(0, modelgate_proto::budgets::usd_micros),
            tokens: usage.total(),
        },
        None => Charge::Reserved,
    };
    Some((record.budget_reservation.as_deref()?, charge))
}

/// Bounds every value of the records and tallies that becomes a label or a log field.
fn label(models: &mut HashSet<String>, records: &mut [UsageRecord], tallies: &mut [Tally]) {
    for record in records {
        record.request_id = bounded(&record.request_id).to_string();
        record.key = bounded(&record.key).to_string();
        record.backend = bounded(&record.backend).to_string();
        record.model = model_label(models, &record.model, record.model_served);
    }
    for refused in tallies.iter_mut().flat_map(|tally| &mut tally.refused) {
        refused.key = bounded(&refused.key).to_string();
        refused.model = model_label(models, &refused.model, refused.model_served);
    }
}

/// What a model name is shown as: itself once it is known (or vouched for
/// while there is room for it), else a placeholder. The empty name (a
/// request that named no model the gateway serves) stays empty.
fn model_label(models: &mut HashSet<String>, model: &str, served: bool) -> String {
    let model = bounded(model);
    if model.is_empty() || model == INVALID || models.contains(model) {
        return model.to_string();
    }
    if served && models.len() < MAX_MODELS && model != OTHER_MODELS {
        models.insert(model.to_string());
        return model.to_string();
    }
    OTHER_MODELS.into()
}

/// One log line per request, on the target operators silence it by
/// (`RUST_LOG=info,modelgate::requests=off`). One event, without a span: a
/// span formats its fields once more, for every record.
fn log(record: &UsageRecord) {
    let usage = record.usage.map(|usage| (usage.prompt_tokens, usage.completion_tokens));
    tracing::info!(
        target: "modelgate::requests",
        request_id = record.request_id.as_str(),
        model = record.model.as_str(),
        backend = record.backend.as_str(),
        key = record.key.as_str(),
        status = record.status,
        prompt_tokens = usage.map(|(prompt, _)| prompt),
        completion_tokens = usage.map(|(_, completion)| completion),
        stream = record.stream,
        latency_us = record.latency_us,
        ttft_us = record.ttft_us,
        cost_usd = record.cost_usd,
        served_from = record.served_from.map(|source| match source {
            ReplaySource::Cache => "cache",
            ReplaySource::Idempotency => "idempotency",
        }),
        "request finished"
    );
}

/// An NDJSON body's records and tallies, and the lines that were neither.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedRecords {
    pub records: Vec<UsageRecord>,
    pub tallies: Vec<Tally>,
    pub rejected: u64,
    /// Why the first rejected line was, with its number (from 1).
    pub first_error: Option<String>,
}

/// Splits an NDJSON body into records and tallies; blank lines are neither.
/// Bytes that are not UTF-8 only spoil the lines they are on.
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
        // A line that is no record may be a tally; if it is neither, the record's error says why.
        match record.map_err(|e| (serde_json::from_slice::<Tally>(line), e)) {
            Ok(record) => parsed.records.push(record),
            Err((Ok(tally), _)) => parsed.tallies.push(tally),
            Err((Err(_), e)) => {
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
            GatewayError::invalid_parameter(
                name,
                format!("`{name}` must be a whole number of seconds since the Unix epoch, not `{value}`."),
            )
        })?;
    }
    if end < start {
        return Err(GatewayError::invalid_parameter("end", format!("`end` ({end}) is before `start` ({start}).")));
    }
    Ok((start, end))
}

/// The admin port's routes; `/v1/limits/spend` only with a limit store. The
/// routes the filter calls serve only callers presenting `token`.
pub fn router(admin: Arc<Admin>, limits: Option<SharedLimits>, token: InternalToken) -> Router {
    let from_envoy = middleware::from_fn_with_state(Arc::new(token), only_envoy);
    let mut filter_calls =
        Router::new().route("/v1/usage/records", post(post_records).fallback(only("POST"))).with_state(admin.clone());
    if let Some(store) = limits {
        let spend = Router::new()
            .route("/v1/limits/spend", post(post_spend).fallback(only("POST")))
            .with_state(Arc::new(Limits { store, admin: admin.clone() }));
        filter_calls = filter_calls.merge(spend);
    }
    Router::new()
        .route("/metrics", get(get_metrics).fallback(only("GET")))
        .route("/v1/usage/report", get(get_report).fallback(only("GET")))
        .route("/v1/usage/budgets", get(get_budgets).fallback(only("GET")))
        .fallback(unknown_url)
        .with_state(admin)
        .merge(filter_calls.route_layer(from_envoy))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// The probes' routes, answered to any caller; merged beside [`router`]'s.
pub fn probes(shutdown: Shutdown) -> Router {
    let probe_answer = |(status, body): health::Answer| {
        json_response(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)
    };
    let ready = get(move || std::future::ready(probe_answer(health::readiness(&shutdown))));
    Router::new()
        .route(health::LIVE, get(move || std::future::ready(probe_answer(health::live()))).fallback(only("GET")))
        .route(health::READY, ready.fallback(only("GET")))
}

/// Lets through only callers presenting the internal token (any caller, without one).
async fn only_envoy(State(token): State<Arc<InternalToken>>, request: axum::extract::Request, next: Next) -> Response {
    match token.check(request.headers().get(modelgate_proto::headers::INTERNAL_TOKEN).map(|v| v.as_bytes())) {
        Ok(()) => next.run(request).await,
        Err(refused) => error_response(&refused),
    }
}

struct Limits {
    store: SharedLimits,
    admin: Arc<Admin>,
}

async fn get_metrics(State(admin): State<Arc<Admin>>) -> Response {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], admin.metrics.encode()).into_response()
}

async fn post_records(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection, MAX_BODY),
    };
    let batch = match batch_id(&headers) {
        Ok(batch) => batch,
        Err(error) => return error_response(&error),
    };
    // Parsed where it cannot hold a pick (count_and_log says why).
    let Some(parsed) = admin.records_thread.run(move || parse_records(&body)).await else {
        return usage_store_unavailable(&IngestError::RecordsThread);
    };
    let accepted = parsed.records.len() + parsed.tallies.len();
    let outcome = match admin.ingest(batch, parsed.records, parsed.tallies, clock::unix_millis()).await {
        Ok(outcome) => outcome,
        Err(e) => return usage_store_unavailable(&e),
    };
    if parsed.rejected > 0 {
        admin.metrics.records_rejected(parsed.rejected);
        tracing::warn!(rejected = parsed.rejected, first = parsed.first_error.as_deref(), "usage records skipped");
    }
    if accepted == 0 && parsed.rejected > 0 {
        let error = GatewayError::invalid_usage_record(format!(
            "None of the {} lines is a usage record ({}).",
            parsed.rejected,
            parsed.first_error.as_deref().unwrap_or_default()
        ));
        return error_response(&error);
    }
    let mut answer = serde_json::json!({"accepted": accepted, "rejected": parsed.rejected});
    if outcome == Outcome::Repeat {
        answer["repeat"] = true.into();
    }
    json_response(StatusCode::OK, answer.to_string())
}

/// The batch's id, if it has one; one of another shape is refused.
fn batch_id(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    let Some(value) = headers.get(usage_store::BATCH_ID) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(id) if usage_store::valid_batch_id(id) => Ok(Some(id)),
        _ => Err(GatewayError::invalid_batch_id(usage_store::BATCH_ID)),
    }
}

async fn get_report(State(admin): State<Arc<Admin>>, uri: Uri) -> Response {
    let now = clock::unix_millis();
    // `end` defaults to now rounded up, so a record of this very second counts.
    let (start, end) = match parse_window(uri.query(), now.div_ceil(1000)) {
        Ok(window) => window,
        Err(error) => return error_response(&error),
    };
    let report = match admin.usage.report(start, end, now).await {
        Ok(report) => report,
        Err(e) => return usage_store_unavailable(&e),
    };
    match serde_json::to_string(&report) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(e) => error_response(&GatewayError::internal(format!("encoding the report: {e}"))),
    }
}

/// `?key=`: one key's budgets; all keys' without it.
#[derive(serde::Deserialize)]
struct BudgetsQuery {
    key: Option<String>,
}

async fn get_budgets(State(admin): State<Arc<Admin>>, query: Result<Query<BudgetsQuery>, QueryRejection>) -> Response {
    let key = match query {
        Ok(Query(query)) => query.key,
        Err(rejection) => return error_response(&GatewayError::invalid_request(format!("{rejection}."))),
    };
    let report = match &admin.budgets {
        Some(budgets) => match budgets.report(key.as_deref(), clock::unix_seconds()).await {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(error = %e, "budget store unavailable");
                return error_response(&GatewayError::budgets_unavailable());
            }
        },
        None => budgets::BudgetReport { object: "list", data: Vec::new() },
    };
    match serde_json::to_string(&report) {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(e) => error_response(&GatewayError::internal(format!("encoding the budgets: {e}"))),
    }
}

async fn post_spend(State(limits): State<Arc<Limits>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_error(&rejection, MAX_BODY),
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
            Err(e) => error_response(&GatewayError::internal(format!("encoding verdicts: {e}"))),
        },
        Err(e) => {
            limits.admin.metrics.limit_store_error();
            tracing::warn!(error = %e, "limit store unavailable");
            error_response(&GatewayError::limit_store_unavailable())
        }
    }
}

/// A 503: the filter keeps a batch it could not hand over and sends it again.
fn usage_store_unavailable(e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "usage store unavailable");
    error_response(&GatewayError::usage_store_unavailable())
}

/// Why a spend call's `id` is refused, if it is: ids name debits, and
/// become Redis keys, so they are short and plain.
fn bad_debit_id(id: &str, debit: bool) -> Option<GatewayError> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    (!debit || id.is_empty() || id.len() > 64 || !id.bytes().all(plain)).then(|| {
        GatewayError::invalid_value(
            "id",
            "Invalid 'id': a debit's id is 1 to 64 letters, digits, '-' or '_', and only debits take one.".into(),
        )
    })
}

/// 405 for a known path called with another method than `allowed`.
fn only(allowed: &'static str) -> impl Fn(Method, Uri) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |method: Method, uri: Uri| std::future::ready(method_not_allowed(&method, &uri, allowed))
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    error_response(&GatewayError::unknown_url(Some((method.as_str(), uri.path()))))
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_proto::error::ErrorCode;
    use modelgate_proto::usage::Refused;
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

    async fn ingest(admin: &Admin, records: Vec<UsageRecord>, tallies: Vec<Tally>, now_ms: u64) {
        assert_eq!(admin.ingest(None, records, tallies, now_ms).await.unwrap(), Outcome::Applied);
    }

    /// The requests counted for this model, with no backend and no key.
    fn requests_of(admin: &Admin, model: &str) -> Option<String> {
        let series =
            format!("modelgate_requests_total{{model=\"{model}\",backend=\"\",key=\"\",traffic=\"interactive\"}} ");
        admin.metrics.encode().lines().find_map(|l| l.strip_prefix(&series).map(str::to_string))
    }

    fn served(model: String) -> UsageRecord {
        UsageRecord { model, model_served: true, status: 200, ..UsageRecord::default() }
    }

    #[tokio::test]
    async fn model_names_past_the_cap_are_counted_together() {
        let admin = Admin::new(1);
        ingest(&admin, (0..MAX_MODELS + 5).map(|i| served(format!("m-{i}"))).collect(), Vec::new(), 0).await;
        ingest(&admin, vec![served("m-0".into()), served("new".into())], Vec::new(), 0).await;
        let named = |model: &str| requests_of(&admin, model);
        assert_eq!((named("m-0").as_deref(), named("m-999").is_some()), (Some("2"), true));
        assert_eq!((named("m-1000"), named("new")), (None, None));
        assert_eq!(named(OTHER_MODELS).as_deref(), Some("6"));
    }

    #[tokio::test]
    async fn a_model_name_becomes_a_label_once_vouched_for_and_stays_one() {
        let admin = Admin::new(1);
        let unserved = |model: &str, status| UsageRecord { model: model.into(), status, ..UsageRecord::default() };
        // A flood of names no backend answered leaves every place for real ones.
        ingest(&admin, (0..2 * MAX_MODELS).map(|i| unserved(&format!("junk-{i}"), 404)).collect(), Vec::new(), 0).await;
        ingest(&admin, vec![unserved("qwen-3", 404), served("qwen-3".into()), unserved("qwen-3", 500)], Vec::new(), 0)
            .await;
        let refused = Refused {
            key: "k".into(),
            model: "qwen-3".into(),
            model_served: false,
            status: 429,
            count: 4,
            ..Refused::default()
        };
        let tally = Tally { at_ms: 0, refused: vec![refused.clone()], dropped_records: 3, ..Tally::default() };
        ingest(&admin, Vec::new(), vec![tally], 0).await;
        assert_eq!(requests_of(&admin, OTHER_MODELS).as_deref(), Some(&*(2 * MAX_MODELS + 1).to_string()));
        assert_eq!(requests_of(&admin, "qwen-3").as_deref(), Some("2"));
        let metrics = admin.metrics.encode();
        assert!(metrics.contains(
            "modelgate_errors_total{model=\"qwen-3\",backend=\"\",key=\"k\",status=\"429\",traffic=\"interactive\"} 4\n"
        ));
        assert!(metrics.contains("modelgate_usage_records_dropped_total 3\n"), "{metrics}");
        assert!(!metrics.contains("junk"));
        assert_eq!(admin.models.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn values_past_their_bounds_are_shown_as_invalid_wherever_they_go() {
        let admin = Admin::new(1);
        let long = "x".repeat(1 << 20);
        let record = UsageRecord {
            request_id: long.clone(),
            key: "a key".into(),
            model: long.clone(),
            model_served: true,
            backend: "b\"}".into(),
            status: 200,
            ..UsageRecord::default()
        };
        let refused = Refused {
            key: long.clone(),
            model: "m\n".into(),
            model_served: true,
            status: 404,
            count: 1,
            ..Refused::default()
        };
        ingest(
            &admin,
            vec![record],
            vec![Tally { at_ms: 0, refused: vec![refused], dropped_records: 0, ..Tally::default() }],
            0,
        )
        .await;
        let metrics = admin.metrics.encode();
        assert!(metrics.len() < 16 << 10, "{} bytes", metrics.len());
        assert!(metrics.contains(
            r#"modelgate_requests_total{model="(invalid)",backend="(invalid)",key="(invalid)",traffic="interactive"} 1"#
        ));
        assert!(metrics.contains(
            r#"modelgate_requests_total{model="(invalid)",backend="",key="(invalid)",traffic="interactive"} 1"#
        ));
        let report = admin.usage.report(0, u64::MAX, 0).await.unwrap();
        assert!(report.data.iter().all(|row| row.key == INVALID && row.model == INVALID), "{report:?}");
        assert!(admin.models.lock().unwrap().is_empty());
    }

    #[test]
    fn a_batch_ends_with_its_tally() {
        let body = b"{\"request_id\":\"a\",\"at_ms\":1,\"key\":\"\",\"model\":\"m\",\"backend\":\"b\",\"status\":200,\
\"stream\":false,\"usage\":null,\"cost_usd\":null,\"latency_us\":5,\"ttft_us\":null,\"model_served\":true}\n\
{\"at_ms\":7,\"refused\":[{\"key\":\"k\",\"model\":\"\",\"model_served\":false,\"status\":404,\"count\":3}],\
\"dropped_records\":2}\n\
{\"at_ms\":7,\"refused\":[],\"dropped_records\":2,\"surprise\":1}\n";
        let parsed = parse_records(body);
        assert_eq!((parsed.records.len(), parsed.rejected), (1, 1), "{parsed:?}");
        assert!(parsed.records[0].model_served);
        let refused = Refused {
            key: "k".into(),
            model: String::new(),
            model_served: false,
            status: 404,
            count: 3,
            ..Refused::default()
        };
        assert_eq!(
            parsed.tallies,
            [Tally { at_ms: 7, refused: vec![refused], dropped_records: 2, ..Tally::default() }]
        );
        assert!(parsed.first_error.unwrap().starts_with("line 3: "));
    }

    #[tokio::test]
    async fn a_batch_sent_again_is_counted_once() {
        let admin = Admin::new(1);
        let now = 100 * 3_600_000;
        let records = || vec![UsageRecord { at_ms: now, key: "k".into(), status: 200, ..UsageRecord::default() }];
        assert_eq!(admin.ingest(Some("vm-1"), records(), Vec::new(), now).await.unwrap(), Outcome::Applied);
        assert_eq!(admin.ingest(Some("vm-1"), records(), Vec::new(), now + 1000).await.unwrap(), Outcome::Repeat);
        assert_eq!(admin.ingest(Some("vm-2"), records(), Vec::new(), now + 2000).await.unwrap(), Outcome::Applied);
        assert_eq!(admin.ingest(None, records(), Vec::new(), now + 3000).await.unwrap(), Outcome::Applied);
        let report = admin.usage.report(0, u64::MAX, now).await.unwrap();
        assert_eq!(report.data.iter().map(|row| row.requests).collect::<Vec<_>>(), [3]);
        assert!(admin.metrics.encode().lines().any(|l| l.starts_with("modelgate_requests_total") && l.ends_with(" 3")));
        // Remembered for the window, then forgotten.
        let later = now + DEFAULT_DEDUP.window_ms + 1001;
        assert_eq!(admin.ingest(Some("vm-1"), records(), Vec::new(), later).await.unwrap(), Outcome::Applied);
    }

    /// Budgets with two requests of alice's admitted (600 and 300 tokens
    /// reserved of her 1000 a day), and the admin port settling them.
    async fn admitted_twice() -> Arc<Admin> {
        use modelgate_gate::budgets::Admission;
        use modelgate_proto::budgets::{BudgetLimit, BudgetUnit, Period};
        use modelgate_proto::gate::BudgetCandidate;
        let budgets = Arc::new(Budgets::in_memory());
        let limit = BudgetLimit { scope: "key".into(), unit: BudgetUnit::Tokens, period: Period::Day, limit: 1000 };
        for (reservation, tokens) in [("r1", 600), ("r2", 300)] {
            let candidate =
                BudgetCandidate { backend: "b".into(), budgets: vec![limit.clone()], usd_micros: 0, tokens };
            let admitted = budgets.admit("alice", &[candidate], false, reservation, clock::unix_seconds()).await;
            assert_eq!(admitted.unwrap(), Admission::Admitted { member: 0 });
        }
        Arc::new(Admin::new(1).with_budgets(budgets))
    }

    async fn budgets_of(admin: &Arc<Admin>, query: &str) -> Value {
        use tower::ServiceExt;
        let request = axum::http::Request::get(format!("/v1/usage/budgets{query}")).body(Body::empty()).unwrap();
        let response =
            router(Arc::clone(admin), None, InternalToken::from_secret(None, "test")).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn records_settle_their_reservations_once() {
        let admin = admitted_twice().await;
        let record = |reservation: &str, status, usage| UsageRecord {
            key: "alice".into(),
            status,
            usage,
            budget_reservation: Some(reservation.into()),
            ..UsageRecord::default()
        };
        let used = Some(modelgate_proto::usage::Usage { prompt_tokens: 100, completion_tokens: 20 });
        let batch = || vec![record("r1", 200, used), record("r2", 429, None), record("unknown", 200, used)];
        let now = clock::unix_millis();
        assert_eq!(admin.ingest(Some("b-1"), batch(), Vec::new(), now).await.unwrap(), Outcome::Applied);
        // Sent again, under another id or none: settled already.
        assert_eq!(admin.ingest(None, batch(), Vec::new(), now).await.unwrap(), Outcome::Applied);
        let report = budgets_of(&admin, "?key=alice").await;
        let row = &report["data"][0];
        assert_eq!(
            (&row["amount"], &row["limit"], &row["spent"], &row["reserved"]),
            (&json!("tokens_per_day"), &json!(1000), &json!(120), &json!(0)),
            "{report}"
        );
        assert_eq!(budgets_of(&admin, "?key=bob").await, json!({"object": "list", "data": []}));
        assert_eq!(budgets_of(&admin, "").await["data"].as_array().map(Vec::len), Some(1));
    }

    #[tokio::test]
    async fn a_released_reservation_frees_what_it_held_and_a_late_admission_is_refused() {
        use modelgate_proto::budgets::{BudgetLimit, BudgetUnit, Period};
        use modelgate_proto::gate::BudgetCandidate;
        let admin = admitted_twice().await;
        let release = |ids: &[&str]| Tally {
            released_reservations: ids.iter().map(|id| id.to_string()).collect(),
            ..Tally::default()
        };
        let now = clock::unix_millis();
        admin.ingest(Some("b-1"), Vec::new(), vec![release(&["r1", "late"])], now).await.unwrap();
        let row = &budgets_of(&admin, "").await["data"][0];
        assert_eq!((&row["spent"], &row["reserved"]), (&json!(0), &json!(300)), "r1 freed, r2 still held");
        // The gate's admission of `late` landed after its request was gone: it is not made.
        let budgets = admin.budgets.as_ref().unwrap();
        let limit = BudgetLimit { scope: "key".into(), unit: BudgetUnit::Tokens, period: Period::Day, limit: 1000 };
        let candidate = BudgetCandidate { backend: "b".into(), budgets: vec![limit], usd_micros: 0, tokens: 100 };
        let _ = budgets.admit("alice", &[candidate], false, "late", clock::unix_seconds()).await;
        let row = &budgets_of(&admin, "").await["data"][0];
        assert_eq!(row["reserved"], json!(300));
    }

    #[tokio::test]
    async fn a_record_answered_without_usage_is_charged_what_it_reserved() {
        let admin = admitted_twice().await;
        let record = UsageRecord { status: 200, budget_reservation: Some("r2".into()), ..UsageRecord::default() };
        admin.ingest(None, vec![record], Vec::new(), clock::unix_millis()).await.unwrap();
        let row = &budgets_of(&admin, "").await["data"][0];
        assert_eq!((&row["spent"], &row["reserved"]), (&json!(300), &json!(600)));
    }

    #[tokio::test]
    async fn a_batch_whose_budgets_cannot_be_settled_is_refused_whole_to_come_again() {
        use tower::ServiceExt;
        // Nothing listens on port 1: every call to this Redis fails.
        let dir = std::path::Path::new("/nonexistent");
        let budgets = Budgets::open(dir, Some("redis://127.0.0.1:1/0"), std::time::Duration::from_millis(200)).unwrap();
        let admin = Arc::new(Admin::new(1).with_budgets(Arc::new(budgets)));
        let record = UsageRecord {
            key: "alice".into(),
            status: 200,
            budget_reservation: Some("r1".into()),
            ..UsageRecord::default()
        };
        let request = axum::http::Request::post("/v1/usage/records")
            .body(Body::from(serde_json::to_vec(&record).unwrap()))
            .unwrap();
        let response =
            router(Arc::clone(&admin), None, InternalToken::from_secret(None, "test")).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope["error"]["code"], "usage_store_unavailable");
        assert!(admin.usage.report(0, u64::MAX, 0).await.unwrap().data.is_empty());
    }

    #[tokio::test]
    async fn without_budgets_the_list_is_empty() {
        assert_eq!(budgets_of(&Arc::new(Admin::new(1)), "?key=alice").await, json!({"object": "list", "data": []}));
    }

    #[test]
    fn batch_ids_of_another_shape_are_refused() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(usage_store::BATCH_ID, header::HeaderValue::from_bytes(value.as_bytes()).unwrap());
            headers
        };
        assert_eq!(batch_id(&HeaderMap::new()), Ok(None));
        let id = "0123abcd-5f3e1c-17";
        assert_eq!(batch_id(&headers(id)), Ok(Some(id)));
        for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
            let error = batch_id(&headers(bad)).unwrap_err();
            assert_eq!((error.status, error.code), (400, Some(ErrorCode::InvalidBatchId)), "{bad:?}");
        }
    }

    #[test]
    fn the_window_defaults_to_all_until_now_and_names_a_bad_parameter() {
        assert_eq!(parse_window(None, 500), Ok((0, 500)));
        assert_eq!(parse_window(Some(""), 500), Ok((0, 500)));
        assert_eq!(parse_window(Some("start=60&end=120&other=x"), 500), Ok((60, 120)));
        assert_eq!(parse_window(Some("start=600"), 500).map_err(|e| e.param), Err(Some("end".into())));
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
