//! The Files and Batch APIs' wire shapes (OpenAI's `OpenAIFile`, `Batch`,
//! their lists, and a batch's input and output lines), and the checks on what
//! a client sends: pure, so the API, the runner and the fuzzers share them.
//!
//! Unset optional fields are left out rather than sent as `null`: OpenAI's
//! schema types them as integers or strings, never null.

use crate::endpoint::Endpoint;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What an upload may be for (`purpose` of `POST /v1/files`). The gateway
/// runs `batch` files; the others are kept as plain storage.
pub const UPLOAD_PURPOSES: [&str; 6] = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"];

/// The purpose of the files a batch writes (its output and errors).
pub const BATCH_OUTPUT: &str = "batch_output";

/// The only completion window OpenAI offers.
pub const COMPLETION_WINDOW: &str = "24h";

/// The endpoints a batch's lines may call.
pub const BATCH_ENDPOINTS: [Endpoint; 3] = [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings];

/// Bounds of a batch's `metadata`, as OpenAI sets them.
pub const MAX_METADATA_PAIRS: usize = 16;
pub const MAX_METADATA_KEY_CHARS: usize = 64;
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// Longest `custom_id` a line may have: it is written back in every output line.
pub const MAX_CUSTOM_ID_BYTES: usize = 512;

/// OpenAI's `File` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    pub filename: String,
    pub purpose: String,
    /// Deprecated by OpenAI but required by its schema: a stored file is `processed`.
    pub status: String,
}

impl FileObject {
    pub fn new(id: String, bytes: u64, created_at: u64, filename: String, purpose: String) -> Self {
        FileObject {
            id,
            object: "file".into(),
            bytes,
            created_at,
            expires_at: None,
            filename,
            purpose,
            status: "processed".into(),
        }
    }
}

/// `DELETE /v1/files/{id}`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// A page of a list (`GET /v1/files`, `GET /v1/batches`). `first_id` and
/// `last_id` are left out of an empty page: the spec requires strings there,
/// and an empty list has no ids to give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListPage<T> {
    pub object: String,
    pub data: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T> ListPage<T> {
    pub fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> &str) -> Self {
        let first_id = data.first().map(|t| id(t).to_string());
        let last_id = data.last().map(|t| id(t).to_string());
        ListPage { object: "list".into(), data, first_id, last_id, has_more }
    }
}

/// A batch's status. `validating → in_progress → finalizing → completed`;
/// `failed` when the input is rejected; `expired` past the completion window;
/// `cancelling → cancelled` on a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    /// No more work will be done: the batch's files are final.
    pub fn is_terminal(self) -> bool {
        matches!(self, BatchStatus::Failed | BatchStatus::Completed | BatchStatus::Expired | BatchStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One reason a batch's input was rejected (`errors.data[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// The input line, counted from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<BatchError>,
}

/// OpenAI's `Batch` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_file_id: Option<String>,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizing_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelling_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl Batch {
    /// A batch just created from `create`: `validating`, due by `expires_at`, nothing counted.
    pub fn new(id: String, create: CreateBatch, created_at: u64, expires_at: u64) -> Self {
        Batch {
            id,
            object: "batch".into(),
            endpoint: create.endpoint.path().into(),
            errors: None,
            input_file_id: create.input_file_id,
            completion_window: COMPLETION_WINDOW.into(),
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at,
            in_progress_at: None,
            expires_at: Some(expires_at),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata: create.metadata,
        }
    }
}

/// `POST /v1/batches`'s body, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: Endpoint,
    pub metadata: Option<Map<String, Value>>,
}

/// Why a request to the Files or Batch API is refused: the parameter, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub param: &'static str,
    pub message: String,
}

fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { param, message: message.into() }
}

impl CreateBatch {
    pub fn parse(body: &[u8]) -> Result<Self, Invalid> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| invalid("body", format!("The request body is not valid JSON: {e}")))?;
        let Value::Object(mut fields) = value else {
            return Err(invalid("body", "The request body must be a JSON object."));
        };
        let string = |fields: &Map<String, Value>, param: &'static str| match fields.get(param) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(invalid(param, format!("'{param}' must not be empty."))),
            Some(_) => Err(invalid(param, format!("'{param}' must be a string."))),
            None => Err(invalid(param, format!("Missing required parameter: '{param}'."))),
        };
        let input_file_id = string(&fields, "input_file_id")?;
        let endpoint_path = string(&fields, "endpoint")?;
        let endpoint = BATCH_ENDPOINTS.into_iter().find(|e| e.path() == endpoint_path).ok_or_else(|| {
            let supported: Vec<&str> = BATCH_ENDPOINTS.iter().map(|e| e.path()).collect();
            invalid(
                "endpoint",
                format!("Invalid endpoint '{endpoint_path}': this gateway batches {}.", supported.join(", ")),
            )
        })?;
        let window = string(&fields, "completion_window")?;
        if window != COMPLETION_WINDOW {
            return Err(invalid(
                "completion_window",
                format!("Invalid completion_window '{window}': the only supported value is '{COMPLETION_WINDOW}'."),
            ));
        }
        let metadata = match fields.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(pairs)) => Some(check_metadata(pairs)?),
            Some(_) => return Err(invalid("metadata", "'metadata' must be an object of strings.")),
        };
        Ok(CreateBatch { input_file_id, endpoint, metadata })
    }
}

fn check_metadata(pairs: Map<String, Value>) -> Result<Map<String, Value>, Invalid> {
    if pairs.len() > MAX_METADATA_PAIRS {
        return Err(invalid("metadata", format!("'metadata' may hold at most {MAX_METADATA_PAIRS} pairs.")));
    }
    for (key, value) in &pairs {
        if key.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(invalid(
                "metadata",
                format!("A metadata key is longer than {MAX_METADATA_KEY_CHARS} characters."),
            ));
        }
        match value {
            Value::String(s) if s.chars().count() <= MAX_METADATA_VALUE_CHARS => {}
            Value::String(_) => {
                return Err(invalid(
                    "metadata",
                    format!("A metadata value is longer than {MAX_METADATA_VALUE_CHARS} characters."),
                ))
            }
            _ => return Err(invalid("metadata", "Metadata values must be strings.")),
        }
    }
    Ok(pairs)
}

/// One line of a batch's input file, checked against the batch's endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct InputLine {
    pub custom_id: String,
    /// The request body, sent as it is.
    pub body: Map<String, Value>,
    /// The body's `model`.
    pub model: String,
}

/// Why an input line is refused: the batch fails while validating, with it in `errors.data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
}

impl LineError {
    fn new(code: &'static str, param: Option<&'static str>, message: impl Into<String>) -> Self {
        LineError { code, param, message: message.into() }
    }

    /// As an entry of `errors.data`, at `line` (counted from 1).
    pub fn at(&self, line: u64) -> BatchError {
        BatchError {
            code: self.code.into(),
            message: self.message.clone(),
            param: self.param.map(str::to_string),
            line: Some(line),
        }
    }
}

impl InputLine {
    /// Parses one line (without its newline) of a batch for `endpoint`. A line
    /// asks for `POST` on the batch's own endpoint, names a model, and does
    /// not stream (a batch's answers are whole).
    pub fn parse(line: &[u8], endpoint: Endpoint) -> Result<Self, LineError> {
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| LineError::new("invalid_json_line", None, format!("This line is not valid JSON: {e}.")))?;
        let Value::Object(mut fields) = value else {
            return Err(LineError::new("invalid_json_line", None, "This line is not a JSON object."));
        };
        let custom_id = match fields.remove("custom_id") {
            Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_CUSTOM_ID_BYTES => id,
            Some(Value::String(_)) => {
                return Err(LineError::new(
                    "invalid_custom_id",
                    Some("custom_id"),
                    format!("'custom_id' must be 1 to {MAX_CUSTOM_ID_BYTES} bytes."),
                ))
            }
            _ => return Err(LineError::new("missing_required_parameter", Some("custom_id"), "Missing 'custom_id'.")),
        };
        match fields.get("method") {
            Some(Value::String(m)) if m == "POST" => {}
            _ => return Err(LineError::new("invalid_method", Some("method"), "'method' must be \"POST\".")),
        }
        match fields.get("url") {
            Some(Value::String(url)) if url == endpoint.path() => {}
            Some(Value::String(url)) => {
                return Err(LineError::new(
                    "mismatched_url",
                    Some("url"),
                    format!("The line's url '{url}' is not the batch's endpoint '{}'.", endpoint.path()),
                ))
            }
            _ => return Err(LineError::new("missing_required_parameter", Some("url"), "Missing 'url'.")),
        }
        let Some(Value::Object(body)) = fields.remove("body") else {
            return Err(LineError::new("missing_required_parameter", Some("body"), "Missing 'body' (a JSON object)."));
        };
        let model = match body.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => return Err(LineError::new("missing_required_parameter", Some("body.model"), "Missing 'body.model'.")),
        };
        if body.get("stream") == Some(&Value::Bool(true)) {
            return Err(LineError::new(
                "unsupported_parameter",
                Some("body.stream"),
                "A batch's answers are whole: 'stream' must not be true.",
            ));
        }
        Ok(InputLine { custom_id, body, model })
    }

    /// The line for a model no route serves (or the batch's key may not use).
    pub fn model_not_found(model: &str) -> LineError {
        LineError::new(
            "model_not_found",
            Some("body.model"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    /// A `custom_id` already used by an earlier line.
    pub fn duplicate_custom_id(custom_id: &str) -> LineError {
        LineError::new(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("The custom_id '{custom_id}' is used by an earlier line."),
        )
    }
}

/// The answer a line got (`response` in an output line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineResponse {
    pub status_code: u16,
    pub request_id: String,
    pub body: Value,
}

/// Why a line got no answer (`error` in an output line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineFailure {
    pub code: String,
    pub message: String,
}

/// One line of a batch's output or error file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    pub id: String,
    pub custom_id: String,
    pub response: Option<LineResponse>,
    pub error: Option<LineFailure>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn a_line_asks_for_post_on_the_batch_endpoint() {
        let chat = Endpoint::ChatCompletions;
        let ok =
            br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;
        let line = InputLine::parse(ok, chat).unwrap();
        assert_eq!((line.custom_id.as_str(), line.model.as_str()), ("a", "m"));
        let code = |line: &str| InputLine::parse(line.as_bytes(), chat).unwrap_err().code;
        assert_eq!(code("{"), "invalid_json_line");
        assert_eq!(code("[]"), "invalid_json_line");
        assert_eq!(
            code(r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#),
            "missing_required_parameter"
        );
        assert_eq!(
            code(r#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{"model":"m"}}"#),
            "invalid_method"
        );
        assert_eq!(
            code(r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#),
            "mismatched_url"
        );
        assert_eq!(
            code(r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#),
            "missing_required_parameter"
        );
        assert_eq!(
            code(
                r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#
            ),
            "unsupported_parameter"
        );
    }

    #[test]
    fn create_batch_takes_openai_endpoints_and_the_24h_window() {
        let ok = CreateBatch::parse(
            br#"{"input_file_id":"file-1","endpoint":"/v1/embeddings","completion_window":"24h","metadata":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!(ok.endpoint, Endpoint::Embeddings);
        let param = |body: &str| CreateBatch::parse(body.as_bytes()).unwrap_err().param;
        assert_eq!(param(r#"{"endpoint":"/v1/embeddings","completion_window":"24h"}"#), "input_file_id");
        assert_eq!(param(r#"{"input_file_id":"f","endpoint":"/v1/responses","completion_window":"24h"}"#), "endpoint");
        assert_eq!(
            param(r#"{"input_file_id":"f","endpoint":"/v1/embeddings","completion_window":"1h"}"#),
            "completion_window"
        );
        assert_eq!(
            param(r#"{"input_file_id":"f","endpoint":"/v1/embeddings","completion_window":"24h","metadata":{"k":1}}"#),
            "metadata"
        );
    }

    #[test]
    fn unset_fields_are_left_out() {
        let create =
            CreateBatch { input_file_id: "file-1".into(), endpoint: Endpoint::ChatCompletions, metadata: None };
        let batch = Batch::new("batch_1".into(), create, 1, 2);
        assert_eq!(
            serde_json::to_value(&batch).unwrap(),
            json!({"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
                   "completion_window": "24h", "status": "validating", "created_at": 1, "expires_at": 2,
                   "request_counts": {"total": 0, "completed": 0, "failed": 0}})
        );
        let empty: ListPage<Batch> = ListPage::new(Vec::new(), false, |b| &b.id);
        assert_eq!(serde_json::to_value(&empty).unwrap(), json!({"object": "list", "data": [], "has_more": false}));
    }

    proptest! {
        #[test]
        fn any_line_is_parsed_or_refused_without_panic(line in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = InputLine::parse(&line, Endpoint::Completions);
            let _ = CreateBatch::parse(&line);
        }
    }
}
