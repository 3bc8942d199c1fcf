//! The gateway's errors: OpenAI's envelope `{"error":{"message","type","param","code"}}`,
//! the `type` and `code` values the gateway sends, one constructor per error,
//! and the one rule for the `x-should-retry` advice given with them.
//!
//! Every error the gateway answers itself is built here, so its shape and its
//! words are decided in one place. Constructors only build: whoever meets the
//! error logs what an operator needs to know.

use crate::client_api::ClientApi;
use crate::limits::Unit;
use serde::{Deserialize, Serialize, Serializer};
use std::fmt::Display;

/// An error envelope as read from the wire, whoever wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// An error's fields as strings: a backend's may hold any `type` and `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// OpenAI's error `type`s: those the gateway sends, and those it keeps in a backend's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RateLimit,
    Server,
    Api,
    InsufficientQuota,
    /// A key over a requests-per-minute limit: OpenAI names the limit's unit.
    Requests,
    /// A key over a tokens-per-minute limit.
    Tokens,
}

impl ErrorType {
    /// The types a backend's error keeps; any other is replaced by [`ErrorType::for_status`].
    const KEPT_FROM_BACKENDS: [ErrorType; 8] = [
        ErrorType::InvalidRequest,
        ErrorType::Authentication,
        ErrorType::Permission,
        ErrorType::NotFound,
        ErrorType::RateLimit,
        ErrorType::Server,
        ErrorType::Api,
        ErrorType::InsufficientQuota,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidRequest => "invalid_request_error",
            ErrorType::Authentication => "authentication_error",
            ErrorType::Permission => "permission_error",
            ErrorType::NotFound => "not_found_error",
            ErrorType::RateLimit => "rate_limit_error",
            ErrorType::Server => "server_error",
            ErrorType::Api => "api_error",
            ErrorType::InsufficientQuota => "insufficient_quota",
            ErrorType::Requests => "requests",
            ErrorType::Tokens => "tokens",
        }
    }

    /// The type for an HTTP status, as OpenAI's SDKs map statuses to exceptions.
    pub fn for_status(status: u16) -> Self {
        match status {
            401 => ErrorType::Authentication,
            403 => ErrorType::Permission,
            404 => ErrorType::NotFound,
            429 => ErrorType::RateLimit,
            400..=499 => ErrorType::InvalidRequest,
            _ => ErrorType::Server,
        }
    }

    /// True for a type a backend's error keeps as it is.
    pub fn kept_from_backends(name: &str) -> bool {
        Self::KEPT_FROM_BACKENDS.iter().any(|kind| kind.as_str() == name)
    }
}

impl From<Unit> for ErrorType {
    fn from(unit: Unit) -> Self {
        match unit {
            Unit::Requests => ErrorType::Requests,
            Unit::Tokens => ErrorType::Tokens,
        }
    }
}

/// Every `code` the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    // The request, as sent.
    MissingRequiredParameter,
    EmptyString,
    InvalidType,
    InvalidValue,
    UnsupportedParameter,
    UnsupportedEndpoint,
    UnsupportedMediaType,
    MethodNotAllowed,
    RequestTooLarge,
    UnknownUrl,
    ModelNotFound,
    InvalidUsageRecord,
    InvalidBatchId,
    // The Files and Batch APIs' objects.
    FileInUse,
    BatchFinished,
    // The Responses API's stored responses.
    PreviousResponseNotFound,
    ResponseNotFound,
    /// Background mode (`background`, `POST /v1/responses/{id}/cancel`): not served.
    BackgroundUnsupported,
    // Who is asking.
    InvalidApiKey,
    /// A key without the `admin` mark asking for an operator's action.
    AdminKeyRequired,
    InvalidInternalToken,
    // Rate limits.
    RateLimitExceeded,
    /// A request reserving more tokens than its limit ever holds. OpenAI's code
    /// for it is `rate_limit_exceeded` too; unlike the other, waiting does not help.
    TokensBeyondLimit,
    RateLimitsUnavailable,
    LimitStoreUnavailable,
    // Budgets and idempotent requests.
    /// A spend or token budget is spent until its period ends.
    InsufficientQuota,
    /// The store of budgets did not answer, where the configuration refuses then.
    BudgetsUnavailable,
    /// An `Idempotency-Key` whose first request is still running.
    IdempotencyKeyInUse,
    /// An `Idempotency-Key` used again with another request.
    IdempotencyKeyReused,
    UsageStoreUnavailable,
    FileStoreUnavailable,
    BatchStoreUnavailable,
    ResponseStoreUnavailable,
    // The gateway's configuration.
    GatewayMisconfigured,
    BackendNotConfigured,
    BackendKeyUnavailable,
    // The gateway or a backend, failing for now.
    GatewayUnavailable,
    BackendUnavailable,
    BackendConnectFailed,
    BackendReset,
    BackendTimeout,
    Overloaded,
    /// Every replica of a self-hosted pool is queued past its limit.
    PoolSaturated,
    /// No replica of a self-hosted pool is ready (none answers its metrics).
    NoReadyReplica,
    /// A LoRA adapter's load or unload failed on some of the replicas it targeted.
    LoraOperationFailed,
    BadBackendAnswer,
    // A stream cut short.
    StreamInterrupted,
    StreamEventTooLarge,
    StreamUnreadable,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingRequiredParameter => "missing_required_parameter",
            ErrorCode::EmptyString => "empty_string",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::UnsupportedParameter => "unsupported_parameter",
            ErrorCode::UnsupportedEndpoint => "unsupported_endpoint",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::UnknownUrl => "unknown_url",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::InvalidUsageRecord => "invalid_usage_record",
            ErrorCode::InvalidBatchId => "invalid_batch_id",
            ErrorCode::FileInUse => "file_in_use",
            ErrorCode::BatchFinished => "batch_finished",
            ErrorCode::PreviousResponseNotFound => "previous_response_not_found",
            ErrorCode::ResponseNotFound => "response_not_found",
            ErrorCode::BackgroundUnsupported => "background_unsupported",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::AdminKeyRequired => "admin_key_required",
            ErrorCode::InvalidInternalToken => "invalid_internal_token",
            ErrorCode::RateLimitExceeded | ErrorCode::TokensBeyondLimit => "rate_limit_exceeded",
            ErrorCode::RateLimitsUnavailable => "rate_limits_unavailable",
            ErrorCode::LimitStoreUnavailable => "limit_store_unavailable",
            ErrorCode::InsufficientQuota => "insufficient_quota",
            ErrorCode::BudgetsUnavailable => "budgets_unavailable",
            ErrorCode::IdempotencyKeyInUse => "idempotency_key_in_use",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::UsageStoreUnavailable => "usage_store_unavailable",
            ErrorCode::FileStoreUnavailable => "file_store_unavailable",
            ErrorCode::BatchStoreUnavailable => "batch_store_unavailable",
            ErrorCode::ResponseStoreUnavailable => "response_store_unavailable",
            ErrorCode::GatewayMisconfigured => "gateway_misconfigured",
            ErrorCode::BackendNotConfigured => "backend_not_configured",
            ErrorCode::BackendKeyUnavailable => "backend_key_unavailable",
            ErrorCode::GatewayUnavailable => "gateway_unavailable",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::BackendConnectFailed => "backend_connect_failed",
            ErrorCode::BackendReset => "backend_reset",
            ErrorCode::BackendTimeout => "backend_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::PoolSaturated => "pool_saturated",
            ErrorCode::NoReadyReplica => "no_ready_replica",
            ErrorCode::LoraOperationFailed => "lora_operation_failed",
            ErrorCode::BadBackendAnswer => "bad_backend_answer",
            ErrorCode::StreamInterrupted => "stream_interrupted",
            ErrorCode::StreamEventTooLarge => "stream_event_too_large",
            ErrorCode::StreamUnreadable => "stream_unreadable",
        }
    }
}

impl Serialize for ErrorType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The openai SDKs' retry advice header, which overrides their status-based rule.
pub const SHOULD_RETRY: &str = "x-should-retry";

/// The `x-should-retry` header for `advice` (from [`GatewayError::should_retry`]), if there is any.
pub fn retry_header(advice: Option<bool>) -> Option<(&'static str, &'static str)> {
    advice.map(|retry| (SHOULD_RETRY, if retry { "true" } else { "false" }))
}

/// An error the gateway answers itself, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub status: u16,
    pub kind: ErrorType,
    pub code: Option<ErrorCode>,
    pub message: String,
    pub param: Option<String>,
}

/// The envelope as it is written, borrowing the error's fields.
#[derive(Serialize)]
struct Envelope<'a> {
    error: Fields<'a>,
}

#[derive(Serialize)]
struct Fields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: ErrorType,
    param: Option<&'a str>,
    code: Option<ErrorCode>,
}

impl GatewayError {
    fn new(status: u16, kind: ErrorType, code: Option<ErrorCode>, message: String) -> Self {
        GatewayError { status, kind, code, message, param: None }
    }

    fn about(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    fn bad_request(code: Option<ErrorCode>, message: String) -> Self {
        Self::new(400, ErrorType::InvalidRequest, code, message)
    }

    fn server(status: u16, code: Option<ErrorCode>, message: String) -> Self {
        Self::new(status, ErrorType::Server, code, message)
    }

    // The request, as sent.

    /// 400: the request cannot be understood as sent.
    pub fn invalid_request(message: String) -> Self {
        Self::bad_request(None, message)
    }

    /// 400 for a request whose `param` cannot be understood.
    pub fn invalid_parameter(param: &str, message: String) -> Self {
        Self::bad_request(None, message).about(param)
    }

    /// 400 for a body that is not JSON; `reason` is the parser's word on it.
    pub fn unparsable_json(reason: &dyn Display) -> Self {
        Self::invalid_request(format!(
            "We could not parse the JSON body of your request ({reason}). The API expects a JSON object."
        ))
    }

    /// 400 for a required `param` left out, in OpenAI's words.
    pub fn missing_required_parameter(param: &str) -> Self {
        Self::bad_request(Some(ErrorCode::MissingRequiredParameter), format!("Missing required parameter: '{param}'."))
            .about(param)
    }

    /// 400 for a string `param` sent empty, in OpenAI's words.
    pub fn empty_string(param: &str) -> Self {
        Self::bad_request(
            Some(ErrorCode::EmptyString),
            format!("Invalid '{param}': empty string. Expected a string with minimum length 1."),
        )
        .about(param)
    }

    /// 400 for a `param` of the wrong JSON type; `got` names the type sent, where it is said.
    pub fn invalid_type(param: &str, expected: &str, got: Option<&str>) -> Self {
        let message = match got {
            Some(got) => format!("Invalid type for '{param}': expected {expected}, but got {got} instead."),
            None => format!("Invalid type for '{param}': expected {expected}."),
        };
        Self::bad_request(Some(ErrorCode::InvalidType), message).about(param)
    }

    /// 400 for a `param` of the right type and a wrong value.
    pub fn invalid_value(param: &str, message: String) -> Self {
        Self::bad_request(Some(ErrorCode::InvalidValue), message).about(param)
    }

    /// 400 for a `param` the model's backend cannot honour; `why` completes the sentence.
    pub fn unsupported_parameter(param: &str, why: &str) -> Self {
        Self::bad_request(Some(ErrorCode::UnsupportedParameter), format!("Unsupported parameter: '{param}' {why}."))
            .about(param)
    }

    /// 404 for an endpoint (its `path`) the model's backend (`backend`, with its article) does not offer.
    pub fn unsupported_endpoint(path: &str, backend: &str) -> Self {
        Self::new(
            404,
            ErrorType::InvalidRequest,
            Some(ErrorCode::UnsupportedEndpoint),
            format!("This model is served by {backend} backend, which does not support {path}."),
        )
    }

    /// 415 for a body declared as something other than JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            ErrorType::InvalidRequest,
            Some(ErrorCode::UnsupportedMediaType),
            format!("Unsupported content-type `{content_type}`: send the body as JSON with `content-type: application/json`."),
        )
    }

    /// 405 for a known path called with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self::new(
            405,
            ErrorType::InvalidRequest,
            Some(ErrorCode::MethodNotAllowed),
            format!("{method} is not allowed on {path}; use {allowed}."),
        )
    }

    /// 413 for a request body over `limit` bytes; `None` when the limit is Envoy's own.
    pub fn body_too_large(limit: Option<usize>) -> Self {
        let message = match limit {
            Some(limit) => format!("The request body is larger than this gateway's limit of {limit} bytes."),
            None => "The request body is too large.".to_string(),
        };
        Self::new(413, ErrorType::InvalidRequest, Some(ErrorCode::RequestTooLarge), message)
    }

    /// 404 for a path nothing serves; `request` names it (method, path) where it is said.
    pub fn unknown_url(request: Option<(&str, &str)>) -> Self {
        let message = match request {
            Some((method, path)) => format!("Unknown request URL: {method} {path}."),
            None => "Unknown request URL.".to_string(),
        };
        Self::new(404, ErrorType::InvalidRequest, Some(ErrorCode::UnknownUrl), message)
    }

    /// 404 for a model no route serves. Type and message follow OpenAI's own answer.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            ErrorType::InvalidRequest,
            Some(ErrorCode::ModelNotFound),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .about("model")
    }

    /// 400 for a batch of usage records of which none could be read.
    pub fn invalid_usage_record(message: String) -> Self {
        Self::bad_request(Some(ErrorCode::InvalidUsageRecord), message)
    }

    /// 400 for a usage batch's id header (`header`) of the wrong shape.
    pub fn invalid_batch_id(header: &str) -> Self {
        Self::bad_request(
            Some(ErrorCode::InvalidBatchId),
            format!("`{header}` must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`."),
        )
    }

    /// 400 for a multipart form field (`name`) the endpoint does not take, in OpenAI's words.
    pub fn unrecognized_argument(name: &str) -> Self {
        Self::bad_request(None, format!("Unrecognized request argument supplied: {name}")).about(name)
    }

    /// 415 for an upload sent as something other than a multipart form.
    pub fn not_multipart(content_type: &str) -> Self {
        Self::new(
            415,
            ErrorType::InvalidRequest,
            Some(ErrorCode::UnsupportedMediaType),
            format!("Unsupported content-type `{content_type}`: upload files as `multipart/form-data`."),
        )
    }

    /// 413 for an uploaded file over `limit` bytes.
    pub fn file_too_large(limit: u64) -> Self {
        Self::new(
            413,
            ErrorType::InvalidRequest,
            Some(ErrorCode::RequestTooLarge),
            format!("The file is larger than this gateway's limit of {limit} bytes."),
        )
        .about("file")
    }

    // The Files and Batch APIs' objects.

    /// 404 for a file id its caller has no file by, in OpenAI's words.
    pub fn file_not_found(id: &str) -> Self {
        Self::new(404, ErrorType::InvalidRequest, None, format!("No such File object: {id}")).about("id")
    }

    /// 404 for a batch id its caller has no batch by, in the words of [`GatewayError::file_not_found`].
    pub fn batch_not_found(id: &str) -> Self {
        Self::new(404, ErrorType::InvalidRequest, None, format!("No such Batch object: {id}")).about("id")
    }

    /// 409 for deleting a file that a batch still reads (`batch_id`, not finished).
    pub fn file_in_use(file_id: &str, batch_id: &str) -> Self {
        Self::new(
            409,
            ErrorType::InvalidRequest,
            Some(ErrorCode::FileInUse),
            format!("File {file_id} is the input of batch {batch_id}, which has not finished: delete the file once the batch is done or cancelled."),
        )
        .about("id")
    }

    /// 409 for cancelling a batch already finished, with `status`.
    pub fn batch_finished(id: &str, status: &str) -> Self {
        Self::new(
            409,
            ErrorType::InvalidRequest,
            Some(ErrorCode::BatchFinished),
            format!("Batch {id} is already {status}: only a batch that has not finished can be cancelled."),
        )
        .about("id")
    }

    // The Responses API's stored responses.

    /// 400 for a `previous_response_id` its caller has no stored response by
    /// (never stored, expired, deleted, or another key's), in OpenAI's words.
    pub fn previous_response_not_found(id: &str) -> Self {
        Self::bad_request(
            Some(ErrorCode::PreviousResponseNotFound),
            format!("Previous response with id '{id}' not found."),
        )
        .about("previous_response_id")
    }

    /// 404 for a response id its caller has no stored response by.
    pub fn response_not_found(id: &str) -> Self {
        Self::new(
            404,
            ErrorType::InvalidRequest,
            Some(ErrorCode::ResponseNotFound),
            format!("No response found with id '{id}'."),
        )
        .about("id")
    }

    /// 400 for background mode (`background: true`, or cancelling a
    /// response), which the gateway does not run: `param` names what asked for it.
    pub fn background_unsupported(param: &str) -> Self {
        Self::bad_request(
            Some(ErrorCode::BackgroundUnsupported),
            "Background mode is not supported by this gateway: a response is answered while its request is open, and cannot be cancelled.".into(),
        )
        .about(param)
    }

    /// 503: the store of the Responses API's stored responses did not answer.
    pub fn response_store_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::ResponseStoreUnavailable),
            "The store of responses is unavailable; try again shortly.".into(),
        )
    }

    // Who is asking.

    /// 401 for a request without a client key, where keys are required. Type,
    /// code and message follow OpenAI's own answer.
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            ErrorType::InvalidRequest,
            Some(ErrorCode::InvalidApiKey),
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
        )
    }

    /// 403 for an operator's action (loading a LoRA adapter, say) asked with a
    /// key that is not marked `admin` in the configuration.
    pub fn admin_key_required(action: &str) -> Self {
        Self::new(
            403,
            ErrorType::Permission,
            Some(ErrorCode::AdminKeyRequired),
            format!("You have insufficient permissions for this operation: {action} needs a key marked as admin."),
        )
    }

    /// 401 for a client key the gateway does not know. Unlike OpenAI's, the
    /// message quotes no part of the key.
    pub fn invalid_api_key() -> Self {
        Self::new(401, ErrorType::InvalidRequest, Some(ErrorCode::InvalidApiKey), "Incorrect API key provided.".into())
    }

    /// 401 for a caller of an internal port without the internal token, which `header` carries.
    pub fn invalid_internal_token(header: &str) -> Self {
        Self::new(
            401,
            ErrorType::InvalidRequest,
            Some(ErrorCode::InvalidInternalToken),
            format!("This port serves only the gateway's Envoy, which sends its internal token in `{header}`."),
        )
    }

    // Rate limits.

    /// OpenAI's 429 for a key over a limit counting `unit`.
    pub fn rate_limit_reached(unit: Unit, message: String) -> Self {
        Self::new(429, unit.into(), Some(ErrorCode::RateLimitExceeded), message)
    }

    /// OpenAI's 429 for a request reserving more tokens than a limit holds at all.
    pub fn tokens_beyond_limit(message: String) -> Self {
        Self::new(429, ErrorType::Tokens, Some(ErrorCode::TokensBeyondLimit), message)
    }

    /// 503: rate limits kept in a shared store that did not answer, where the
    /// configuration says to refuse rather than to let requests go unlimited.
    pub fn rate_limits_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::RateLimitsUnavailable),
            "The gateway could not check this key's rate limits. Please retry your request shortly.".into(),
        )
    }

    // Budgets and idempotent requests.

    /// OpenAI's 429 for a spent quota: `budget` (as [`crate::budgets::BudgetLimit::describe`]
    /// names it) is spent until `resets_at` (seconds since the epoch). Retrying before then fails alike.
    pub fn insufficient_quota(budget: &str, resets_at: u64) -> Self {
        Self::new(
            429,
            ErrorType::InsufficientQuota,
            Some(ErrorCode::InsufficientQuota),
            format!("You exceeded your budget: {budget} is spent until {}.", crate::budgets::rfc3339(resets_at)),
        )
    }

    /// 503: the store of budgets did not answer, where the configuration
    /// refuses a request it cannot charge (`budgets.on_failure: deny`).
    pub fn budgets_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::BudgetsUnavailable),
            "The gateway could not check this key's budgets. Please retry your request shortly.".into(),
        )
    }

    /// 400 for an `Idempotency-Key` header that is empty, too long, or not printable ASCII.
    pub fn invalid_idempotency_key(max_len: usize) -> Self {
        Self::invalid_value(
            "Idempotency-Key",
            format!("The Idempotency-Key header must be 1 to {max_len} printable ASCII characters."),
        )
    }

    /// 409 for a repeat of an idempotent request whose first is still running: it may pass once that one ends.
    pub fn idempotency_key_in_use() -> Self {
        Self::new(
            409,
            ErrorType::InvalidRequest,
            Some(ErrorCode::IdempotencyKeyInUse),
            "A request with this Idempotency-Key is still being processed. Retry it once that request has finished."
                .into(),
        )
    }

    /// 422 for an `Idempotency-Key` sent again with another request, as Stripe answers it.
    pub fn idempotency_key_reused() -> Self {
        Self::new(
            422,
            ErrorType::InvalidRequest,
            Some(ErrorCode::IdempotencyKeyReused),
            "Keys for idempotent requests can only be used with the same parameters they were first used with.".into(),
        )
    }

    /// 503 from the admin port: its rate-limit store (Redis) did not answer.
    pub fn limit_store_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::LimitStoreUnavailable),
            "The rate-limit store is unavailable; try again shortly.".into(),
        )
    }

    /// 503 from the admin port: its usage store did not answer.
    pub fn usage_store_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::UsageStoreUnavailable),
            "The usage store is unavailable; try again shortly.".into(),
        )
    }

    /// 503: the store of uploaded and batch files did not answer.
    pub fn file_store_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::FileStoreUnavailable),
            "The file store is unavailable; try again shortly.".into(),
        )
    }

    /// 503: the store of file and batch records did not answer.
    pub fn batch_store_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::BatchStoreUnavailable),
            "The batch store is unavailable; try again shortly.".into(),
        )
    }

    // The gateway's configuration.

    /// 500 when the gateway's own configuration is at fault for this model.
    pub fn misconfigured() -> Self {
        Self::server(500, Some(ErrorCode::GatewayMisconfigured), "The gateway is misconfigured for this model.".into())
    }

    /// 500 from the stream guard for a stream the filter sent without its backend's cluster.
    pub fn stream_without_cluster() -> Self {
        Self::server(
            500,
            Some(ErrorCode::GatewayMisconfigured),
            "The gateway routed a stream without naming its backend; check the filter's stream_guard_cluster setting."
                .into(),
        )
    }

    /// 503 for a backend cluster missing from Envoy's configuration.
    pub fn backend_not_configured() -> Self {
        Self::server(
            503,
            Some(ErrorCode::BackendNotConfigured),
            "The backend configured for this model does not exist in Envoy's configuration.".into(),
        )
    }

    /// 500 when the backend's API key cannot be read.
    pub fn backend_key_unavailable() -> Self {
        Self::server(
            500,
            Some(ErrorCode::BackendKeyUnavailable),
            "The gateway has no API key for this model's backend; its operators have been told why.".into(),
        )
    }

    /// 500 for a failure of the gateway's own that has no code (`what` failed).
    pub fn internal(what: String) -> Self {
        Self::server(500, None, what)
    }

    // The gateway or a backend, failing for now.

    /// 503 from the stream guard when Envoy's inner listener cannot be reached.
    pub fn gateway_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::GatewayUnavailable),
            "The gateway could not reach its routing listener; try again.".into(),
        )
    }

    /// 503 for a backend without a healthy endpoint.
    pub fn backend_unavailable() -> Self {
        Self::server(
            503,
            Some(ErrorCode::BackendUnavailable),
            "No healthy backend is available for this model right now.".into(),
        )
    }

    /// 429 when every replica of the self-hosted pool `pool` has more requests
    /// waiting than its configured limit: shed now, with `retry-after` (the
    /// caller sends the header) so the SDKs wait before trying again.
    pub fn pool_saturated(pool: &str) -> Self {
        Self::new(
            429,
            ErrorType::RateLimit,
            Some(ErrorCode::PoolSaturated),
            format!("Every replica serving this model ({pool}) is at capacity. Please retry after a short wait."),
        )
    }

    /// 503 when no replica of the self-hosted pool `pool` is ready: none
    /// answered its metrics recently, or none serves the model.
    pub fn no_ready_replica(pool: &str) -> Self {
        Self::server(
            503,
            Some(ErrorCode::NoReadyReplica),
            format!("No replica serving this model ({pool}) is ready right now; try again shortly."),
        )
    }

    /// 502 when loading or unloading the LoRA adapter `lora_name` (`action`:
    /// "load", "unload") failed on `failed` of the `targeted` replicas, after
    /// its retries; the per-replica report goes beside it ([`Self::to_json_with`]).
    pub fn lora_operation_failed(action: &str, lora_name: &str, failed: usize, targeted: usize) -> Self {
        Self::server(
            502,
            Some(ErrorCode::LoraOperationFailed),
            format!(
                "Could not {action} the LoRA adapter '{lora_name}' on {failed} of {targeted} replicas; see `replicas` for each one's outcome."
            ),
        )
    }

    /// 503 for a backend that could not be connected to.
    pub fn backend_connect_failed() -> Self {
        Self::server(
            503,
            Some(ErrorCode::BackendConnectFailed),
            "The gateway could not connect to the backend for this model.".into(),
        )
    }

    /// 503 for a backend that closed the connection before its answer.
    pub fn backend_reset() -> Self {
        Self::server(503, Some(ErrorCode::BackendReset), "The backend closed the connection before answering.".into())
    }

    /// 504 for a backend that did not answer within the route's timeout.
    pub fn backend_timeout() -> Self {
        Self::server(504, Some(ErrorCode::BackendTimeout), "The backend did not answer in time.".into())
    }

    /// 504 for a backend of a fallback chain that did not answer within `per_try_ms`.
    pub fn no_answer_within(per_try_ms: u128) -> Self {
        Self::server(
            504,
            Some(ErrorCode::BackendTimeout),
            format!("The backend did not answer within {per_try_ms} ms."),
        )
    }

    /// 504 for a stream of a fallback chain that sent nothing within `per_try_ms`.
    pub fn no_stream_within(per_try_ms: u128) -> Self {
        Self::server(
            504,
            Some(ErrorCode::BackendTimeout),
            format!("The backend's stream sent nothing within {per_try_ms} ms."),
        )
    }

    /// 502 for a backend's success without content: an answer with an empty
    /// body, or a stream's answer that is not a stream. `what` says which.
    pub fn bad_answer(what: &str) -> Self {
        Self::server(502, Some(ErrorCode::BadBackendAnswer), format!("The backend answered with {what}."))
    }

    /// A backend's own error, restated in OpenAI's envelope (a translated dialect's).
    pub fn from_backend(status: u16, kind: ErrorType, code: Option<ErrorCode>, message: String) -> Self {
        Self::new(status, kind, code, message)
    }

    // A stream cut short: the error of its last event.

    /// The backend broke off the stream (`reason`).
    pub fn interrupted(reason: &dyn Display) -> Self {
        Self::server(
            502,
            Some(ErrorCode::StreamInterrupted),
            format!("The backend stopped in the middle of this stream ({reason}); the response is incomplete."),
        )
    }

    /// The gateway ended a stream still open at its shutdown deadline.
    pub fn shutting_down() -> Self {
        Self::server(
            503,
            Some(ErrorCode::StreamInterrupted),
            "The gateway is shutting down and ended this stream before it finished; the response is incomplete. Retry the request.".into(),
        )
    }

    /// The backend sent an event longer than the gateway holds.
    pub fn stream_event_too_large(max_event_bytes: usize) -> Self {
        Self::server(
            502,
            Some(ErrorCode::StreamEventTooLarge),
            format!(
                "The backend sent a stream event longer than the gateway's limit of {max_event_bytes} bytes; the response is incomplete."
            ),
        )
    }

    /// The backend sent a record the gateway cannot read (`reason`).
    pub fn stream_unreadable(reason: &dyn Display) -> Self {
        Self::server(
            502,
            Some(ErrorCode::StreamUnreadable),
            format!(
                "The backend sent a stream record the gateway could not read ({reason}); the response is incomplete."
            ),
        )
    }

    /// The gateway's advice to the SDKs on sending this same request again
    /// (`x-should-retry`), which overrides their own rule: retry 408, 409, 429
    /// and 5xx. `None` leaves their rule to decide by the status.
    pub fn should_retry(&self) -> Option<bool> {
        use ErrorCode::*;
        match self.code {
            // Briefly unable (the gateway, a backend, a store, a stream cut short): it may pass now.
            Some(
                GatewayUnavailable
                | BackendUnavailable
                | BackendConnectFailed
                | BackendReset
                | BackendTimeout
                | RateLimitsUnavailable
                | BudgetsUnavailable
                | LimitStoreUnavailable
                | UsageStoreUnavailable
                | FileStoreUnavailable
                | BatchStoreUnavailable
                | ResponseStoreUnavailable
                | NoReadyReplica
                | StreamInterrupted,
            ) => Some(true),
            // The status says it already: a 429 passes after its `retry-after`; a backend's 5xx may
            // pass; a 409 once the first request ends.
            Some(
                IdempotencyKeyInUse | RateLimitExceeded | PoolSaturated | Overloaded | BadBackendAnswer
                | StreamEventTooLarge | StreamUnreadable | LoraOperationFailed,
            ) => None,
            // The same request would fail again: refused as sent, or a configuration only an operator can fix.
            Some(
                MissingRequiredParameter
                | EmptyString
                | InvalidType
                | InvalidValue
                | UnsupportedParameter
                | UnsupportedEndpoint
                | UnsupportedMediaType
                | MethodNotAllowed
                | RequestTooLarge
                | UnknownUrl
                | ModelNotFound
                | InvalidUsageRecord
                | InvalidBatchId
                | FileInUse
                | BatchFinished
                | PreviousResponseNotFound
                | ResponseNotFound
                | BackgroundUnsupported
                | InvalidApiKey
                | AdminKeyRequired
                | InvalidInternalToken
                | TokensBeyondLimit
                | InsufficientQuota
                | IdempotencyKeyReused
                | GatewayMisconfigured
                | BackendNotConfigured
                | BackendKeyUnavailable,
            ) => Some(false),
            // Without a code, a refusal (4xx) is final; a failure is left to its status.
            None => (400..500).contains(&self.status).then_some(false),
        }
    }

    /// The status in `api`: Anthropic's clients know an overload by its 529.
    pub fn status_in(&self, api: ClientApi) -> u16 {
        match (api, self.code) {
            (ClientApi::Anthropic, Some(ErrorCode::Overloaded | ErrorCode::PoolSaturated)) => 529,
            _ => self.status,
        }
    }

    /// The error's body in `api`'s envelope.
    pub fn body_in(&self, api: ClientApi) -> Vec<u8> {
        match api {
            ClientApi::Openai => self.to_json(),
            ClientApi::Anthropic => anthropic_envelope(self.status_in(api), &self.message),
        }
    }

    /// The envelope as JSON bytes, ready to send.
    pub fn to_json(&self) -> Vec<u8> {
        let envelope = Envelope {
            error: Fields { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        };
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    /// The envelope with one more member in `error`, `name`: a report the
    /// client reads beside the message (a LoRA operation's per-replica
    /// outcomes). The SDKs keep unknown members of an error's body.
    pub fn to_json_with(&self, name: &str, value: serde_json::Value) -> Vec<u8> {
        let mut envelope: serde_json::Value = serde_json::from_slice(&self.to_json()).unwrap_or_default();
        if let Some(error) = envelope.get_mut("error").and_then(serde_json::Value::as_object_mut) {
            error.insert(name.to_string(), value);
        }
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

/// Anthropic's error `type` for an HTTP status, as its API sends them.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Anthropic's error envelope, `{"type":"error","error":{"type","message"}}`,
/// for an error with `status`.
pub fn anthropic_envelope(status: u16, message: &str) -> Vec<u8> {
    let envelope = serde_json::json!({
        "type": "error",
        "error": {"type": anthropic_error_type(status), "message": message},
    });
    serde_json::to_vec(&envelope).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn on_anthropics_api_errors_take_its_envelope_and_an_overload_its_529() {
        let refused = GatewayError::model_not_found("claude-9");
        assert_eq!(refused.status_in(ClientApi::Anthropic), 404);
        let body: Value = serde_json::from_slice(&refused.body_in(ClientApi::Anthropic)).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {
                "type": "not_found_error",
                "message": "The model `claude-9` does not exist or you do not have access to it.",
            }})
        );
        assert_eq!(refused.body_in(ClientApi::Openai), refused.to_json());
        let saturated = GatewayError::pool_saturated("p");
        assert_eq!(saturated.status_in(ClientApi::Anthropic), 529);
        assert_eq!(saturated.status_in(ClientApi::Openai), saturated.status);
        let body: Value = serde_json::from_slice(&saturated.body_in(ClientApi::Anthropic)).unwrap();
        assert_eq!(body["error"]["type"], "overloaded_error");
        for (status, kind) in [(400, "invalid_request_error"), (413, "request_too_large"), (500, "api_error")] {
            assert_eq!(anthropic_error_type(status), kind);
        }
    }

    #[test]
    fn envelope_has_openai_shape_with_string_or_null_code() {
        let err = GatewayError::model_not_found("gpt-9");
        assert_eq!(err.status, 404);
        let v: Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"error": {
                "message": "The model `gpt-9` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found"
            }})
        );
        assert_eq!(
            String::from_utf8(GatewayError::invalid_request("bad".into()).to_json()).unwrap(),
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#
        );
    }

    #[test]
    fn messages_with_quotes_stay_valid_json() {
        let err = GatewayError::model_not_found("a\"b\\c\n");
        let back: ErrorEnvelope = serde_json::from_slice(&err.to_json()).unwrap();
        assert!(back.error.message.contains("a\"b\\c\n"));
    }

    #[test]
    fn a_429_over_a_limit_is_named_by_its_unit() {
        let over = GatewayError::rate_limit_reached(Unit::Requests, "m".into());
        let beyond = GatewayError::tokens_beyond_limit("m".into());
        let wire = |e: &GatewayError| serde_json::from_slice::<ErrorEnvelope>(&e.to_json()).unwrap().error;
        assert_eq!((wire(&over).kind, wire(&over).code), ("requests".to_string(), Some("rate_limit_exceeded".into())));
        assert_eq!(
            (wire(&beyond).kind, wire(&beyond).code),
            ("tokens".to_string(), Some("rate_limit_exceeded".into()))
        );
    }

    #[test]
    fn retry_advice_says_whether_the_same_request_may_pass() {
        let advice = |e: GatewayError| e.should_retry();
        // Refused as sent, or misconfigured: never.
        assert_eq!(advice(GatewayError::invalid_request("x".into())), Some(false));
        assert_eq!(advice(GatewayError::model_not_found("m")), Some(false));
        assert_eq!(advice(GatewayError::invalid_internal_token("h")), Some(false));
        assert_eq!(advice(GatewayError::misconfigured()), Some(false));
        assert_eq!(advice(GatewayError::backend_not_configured()), Some(false));
        assert_eq!(advice(GatewayError::backend_key_unavailable()), Some(false));
        assert_eq!(advice(GatewayError::tokens_beyond_limit("m".into())), Some(false));
        assert_eq!(advice(GatewayError::file_in_use("file-1", "batch_1")), Some(false));
        assert_eq!(advice(GatewayError::batch_finished("batch_1", "completed")), Some(false));
        assert_eq!(advice(GatewayError::file_not_found("file-1")), Some(false));
        assert_eq!(advice(GatewayError::insufficient_quota("usd_per_day of key `k`", 0)), Some(false));
        assert_eq!(advice(GatewayError::idempotency_key_reused()), Some(false));
        assert_eq!(advice(GatewayError::invalid_idempotency_key(255)), Some(false));
        assert_eq!(advice(GatewayError::budgets_unavailable()), Some(true));
        // Briefly unable: yes, the guard's own per-try timeouts included.
        assert_eq!(advice(GatewayError::gateway_unavailable()), Some(true));
        assert_eq!(advice(GatewayError::rate_limits_unavailable()), Some(true));
        assert_eq!(advice(GatewayError::file_store_unavailable()), Some(true));
        assert_eq!(advice(GatewayError::batch_store_unavailable()), Some(true));
        assert_eq!(advice(GatewayError::backend_timeout()), Some(true));
        assert_eq!(advice(GatewayError::no_answer_within(100)), Some(true));
        assert_eq!(advice(GatewayError::no_stream_within(100)), Some(true));
        assert_eq!(advice(GatewayError::interrupted(&"reset")), Some(true));
        // The status decides: a 429 after its retry-after, a backend's 5xx.
        assert_eq!(advice(GatewayError::rate_limit_reached(Unit::Tokens, "m".into())), None);
        assert_eq!(advice(GatewayError::bad_answer("nothing")), None);
        assert_eq!(advice(GatewayError::idempotency_key_in_use()), None);
        assert_eq!(advice(GatewayError::internal("encoding".into())), None);
    }

    #[test]
    fn a_spent_budget_is_openais_insufficient_quota_with_its_reset() {
        let spent = GatewayError::insufficient_quota("usd_per_day of key `alice`", 1_798_761_600);
        assert_eq!(
            (spent.status, spent.kind, spent.code),
            (429, ErrorType::InsufficientQuota, Some(ErrorCode::InsufficientQuota))
        );
        let body: Value = serde_json::from_slice(&spent.to_json()).unwrap();
        assert_eq!(
            body,
            json!({"error": {
                "message": "You exceeded your budget: usd_per_day of key `alice` is spent until 2027-01-01T00:00:00Z.",
                "type": "insufficient_quota", "param": null, "code": "insufficient_quota",
            }})
        );
        let body: Value = serde_json::from_slice(&spent.body_in(ClientApi::Anthropic)).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        let key = GatewayError::invalid_idempotency_key(255);
        assert_eq!(
            (key.status, key.param.as_deref(), key.code),
            (400, Some("Idempotency-Key"), Some(ErrorCode::InvalidValue))
        );
        assert_eq!(GatewayError::idempotency_key_in_use().status, 409);
        let reused = GatewayError::idempotency_key_reused();
        assert_eq!((reused.status, reused.code.map(ErrorCode::as_str)), (422, Some("idempotency_key_reused")));
        assert_eq!(GatewayError::budgets_unavailable().status, 503);
    }
}
