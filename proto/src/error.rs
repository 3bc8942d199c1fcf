//! The OpenAI error envelope: `{"error":{"message","type","param","code"}}`.
//!
//! Every error that leaves the gateway is built here, so its shape is decided
//! in one place.

use serde::{Deserialize, Serialize};

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// An error the gateway answers itself, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    pub status: u16,
    pub body: ErrorBody,
}

pub const INVALID_REQUEST: &str = "invalid_request_error";

impl GatewayError {
    pub fn new(status: u16, kind: &str, message: String, param: Option<&str>, code: Option<&str>) -> Self {
        GatewayError {
            status,
            body: ErrorBody {
                message,
                kind: kind.to_string(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }

    /// 400: the request cannot be understood as sent.
    pub fn invalid_request(message: String, param: Option<&str>, code: Option<&str>) -> Self {
        Self::new(400, INVALID_REQUEST, message, param, code)
    }

    /// 400 for a body that is not JSON; `reason` is the parser's word on it.
    pub fn unparsable_json(reason: &dyn std::fmt::Display) -> Self {
        Self::invalid_request(
            format!("We could not parse the JSON body of your request ({reason}). The API expects a JSON object."),
            None,
            None,
        )
    }

    /// 404 for a model no route serves. Type and message follow OpenAI's own answer.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            format!("The model `{model}` does not exist or you do not have access to it."),
            Some("model"),
            Some("model_not_found"),
        )
    }

    /// 401 for a request without a client key, where keys are required. Type,
    /// code and message follow OpenAI's own answer.
    pub fn missing_api_key() -> Self {
        Self::new(
            401,
            INVALID_REQUEST,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
            None,
            Some("invalid_api_key"),
        )
    }

    /// 401 for a client key the gateway does not know. Unlike OpenAI's, the
    /// message quotes no part of the key.
    pub fn invalid_api_key() -> Self {
        Self::new(401, INVALID_REQUEST, "Incorrect API key provided.".into(), None, Some("invalid_api_key"))
    }

    /// 413 for a request body over the configured limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            INVALID_REQUEST,
            format!("The request body is larger than this gateway's limit of {limit} bytes."),
            None,
            Some("request_too_large"),
        )
    }

    /// 415 for a body declared as something other than JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            INVALID_REQUEST,
            format!("Unsupported content-type `{content_type}`: send the body as JSON with `content-type: application/json`."),
            None,
            Some("unsupported_media_type"),
        )
    }

    /// 405 for a known path called with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        Self::new(
            405,
            INVALID_REQUEST,
            format!("{method} is not allowed on {path}; use {allowed}."),
            None,
            Some("method_not_allowed"),
        )
    }

    /// Rate limits kept in a shared store that did not answer, where the
    /// configuration says to refuse rather than to let requests go unlimited.
    pub fn rate_limits_unavailable() -> Self {
        Self::new(
            503,
            "server_error",
            "The gateway could not check this key's rate limits. Please retry your request shortly.".into(),
            None,
            Some("rate_limits_unavailable"),
        )
    }

    /// 502 for a backend's success without content: an answer with an empty
    /// body, or a stream's answer that is not a stream. `what` says which.
    pub fn bad_answer(what: &str) -> Self {
        Self::new(502, "server_error", format!("The backend answered with {what}."), None, Some("bad_backend_answer"))
    }

    /// The envelope as JSON bytes, ready to send.
    pub fn to_json(&self) -> Vec<u8> {
        let envelope = ErrorEnvelope { error: self.body.clone() };
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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

        let v: Value =
            serde_json::from_slice(&GatewayError::invalid_request("bad".into(), None, None).to_json()).unwrap();
        assert_eq!(v["error"]["code"], Value::Null);
        assert_eq!(v["error"]["param"], Value::Null);
    }

    #[test]
    fn messages_with_quotes_stay_valid_json() {
        let err = GatewayError::model_not_found("a\"b\\c\n");
        let back: ErrorEnvelope = serde_json::from_slice(&err.to_json()).unwrap();
        assert!(back.error.message.contains("a\"b\\c\n"));
    }
}
