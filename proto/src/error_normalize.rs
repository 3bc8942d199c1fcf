//! Turns any error answer into an OpenAI error envelope, or on Anthropic's
//! API (`/v1/messages…`) into Anthropic's.
//!
//! Errors reach clients from two places besides modelgate itself: backends,
//! in whatever shape their server writes (vLLM's integer `code`, older vLLM's
//! flat `{"object":"error"}`, FastAPI's `{"detail":...}`, a load balancer's
//! HTML page, plain text, nothing at all), and Envoy's own local replies
//! ("no healthy upstream" and the like). Both are rewritten here, keeping the
//! status, so the SDKs raise the right exception with a usable message.

use crate::client_api::ClientApi;
use crate::error::{anthropic_envelope, ErrorBody, ErrorEnvelope, ErrorType, GatewayError};
use serde_json::{Map, Value};

/// Where an error answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// The backend answered it (Envoy's `response.code_details` is `via_upstream`),
    /// after `attempts` tries.
    Backend { attempts: u32 },
    /// Envoy answered it itself; `details` is its `response.code_details`,
    /// and `attempts` how many tries the route's retries made.
    Envoy { details: &'a str, attempts: u32 },
}

impl<'a> Origin<'a> {
    /// The origin Envoy's `response.code_details` names.
    pub fn from_code_details(details: &'a str) -> Self {
        if details == "via_upstream" {
            Origin::Backend { attempts: 1 }
        } else {
            Origin::Envoy { details, attempts: 1 }
        }
    }

    /// The same origin, after `attempts` tries (a fallback chain's retries).
    pub fn after_attempts(self, attempts: u32) -> Self {
        match self {
            Origin::Envoy { details, .. } => Origin::Envoy { details, attempts },
            Origin::Backend { .. } => Origin::Backend { attempts },
        }
    }
}

/// An error answer rewritten as an OpenAI envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub body: Vec<u8>,
    /// `x-should-retry` for the SDKs, where the gateway knows better than the status says.
    pub should_retry: Option<bool>,
}

/// Longest piece of a backend's non-JSON body quoted in a message.
const QUOTE_LIMIT: usize = 300;

/// The error answer as an OpenAI envelope, or `None` when it already is one.
pub fn normalize(status: u16, origin: Origin<'_>, body: &[u8]) -> Option<Rewritten> {
    rewrite(status, origin, body).map(|(error, should_retry)| Rewritten { body: to_json(error), should_retry })
}

/// The error answer in `api`'s envelope, or `None` when it already is one.
/// On Anthropic's API, an answer that is not Anthropic's envelope is read as
/// [`normalize`] reads it, and its message sent in Anthropic's envelope,
/// typed by the status, with the same retry advice.
pub fn normalize_in(api: ClientApi, status: u16, origin: Origin<'_>, body: &[u8]) -> Option<Rewritten> {
    match api {
        ClientApi::Openai => normalize(status, origin, body),
        ClientApi::Anthropic if is_anthropic_envelope(body) => None,
        ClientApi::Anthropic => {
            let (message, should_retry) = match rewrite(status, origin, body) {
                Some((error, should_retry)) => (error.message, should_retry),
                // OpenAI's envelope already: its message.
                None => {
                    (serde_json::from_slice::<ErrorEnvelope>(body).map(|e| e.error.message).unwrap_or_default(), None)
                }
            };
            Some(Rewritten { body: anthropic_envelope(status, &message), should_retry })
        }
    }
}

/// `{"type":"error","error":{"type":string,"message":string}}`, as Anthropic
/// sends it (with its `request_id` or anything else beside).
fn is_anthropic_envelope(body: &[u8]) -> bool {
    let Ok(object) = serde_json::from_slice::<Map<String, Value>>(body) else {
        return false;
    };
    let error = object.get("error").and_then(Value::as_object);
    object.get("type").and_then(Value::as_str) == Some("error")
        && error.is_some_and(|e| {
            e.get("type").is_some_and(Value::is_string) && e.get("message").is_some_and(Value::is_string)
        })
}

/// The error answer as OpenAI's error, with the retry advice; `None` when it already is one.
fn rewrite(status: u16, origin: Origin<'_>, body: &[u8]) -> Option<(ErrorBody, Option<bool>)> {
    match origin {
        // Envoy's replies configured as OpenAI errors (such as the unknown-URL route) stay as they are.
        Origin::Envoy { .. } if is_openai_envelope(body) => None,
        Origin::Envoy { details, attempts } => Some(envoy_reply(status, details, attempts, body)),
        Origin::Backend { attempts } => backend_reply(status, body).map(|mut error| {
            error.message = with_attempts(error.message, attempts);
            (error, None)
        }),
    }
}

/// What stands for an error body compressed with `encoding`, which the
/// gateway does not decompress: [`normalize`] quotes it instead of the bytes.
pub fn compressed_body(encoding: &str) -> Vec<u8> {
    format!("(a body compressed with {}, which the gateway does not read)", truncate(encoding.trim())).into_bytes()
}

fn is_openai_envelope(body: &[u8]) -> bool {
    serde_json::from_slice::<Map<String, Value>>(body).is_ok_and(|object| from_json_object(0, &object).is_none())
}

fn to_json(error: ErrorBody) -> Vec<u8> {
    serde_json::to_vec(&ErrorEnvelope { error }).unwrap_or_default()
}

/// An error with no code, typed by its status.
fn error(status: u16, message: String) -> ErrorBody {
    ErrorBody { message, kind: ErrorType::for_status(status).as_str().to_string(), param: None, code: None }
}

/// Envoy's local replies, by the `response.code_details` Envoy gives them.
fn envoy_reply(status: u16, details: &str, attempts: u32, body: &[u8]) -> (ErrorBody, Option<bool>) {
    let known = if details == "no_healthy_upstream" {
        Some(GatewayError::backend_unavailable())
    } else if details.starts_with("upstream_reset_before_response_started") {
        // e.g. `{remote_connection_failure,delayed_connect_error:_Connection_refused}`, as
        // opposed to `{connection_termination}` once connected
        if details.contains("connection_failure") || details.contains("connect_error") {
            Some(GatewayError::backend_connect_failed())
        } else {
            Some(GatewayError::backend_reset())
        }
    } else if details.contains("timeout") {
        Some(GatewayError::backend_timeout())
    } else if details == "cluster_not_found" {
        Some(GatewayError::backend_not_configured())
    } else if details == "route_not_found" {
        Some(GatewayError::unknown_url(None))
    } else if status == 413 {
        Some(GatewayError::body_too_large(None))
    } else {
        None
    };
    match known {
        // Envoy's status stays, and with it the type, as for any of Envoy's replies.
        Some(known) => {
            let should_retry = known.should_retry();
            let error = ErrorBody {
                message: with_attempts(known.message, attempts),
                kind: ErrorType::for_status(status).as_str().to_string(),
                param: known.param,
                code: known.code.map(|code| code.as_str().to_string()),
            };
            (error, should_retry)
        }
        // Any other reply: Envoy's words, and no advice beyond the status.
        None => {
            let text = quote(body);
            let message =
                if text.is_empty() { format!("The gateway answered HTTP {status} ({details}).") } else { text };
            (error(status, with_attempts(message, attempts)), None)
        }
    }
}

/// A failure's message, saying so when it is the last of a fallback chain's attempts.
fn with_attempts(message: String, attempts: u32) -> String {
    if attempts > 1 {
        format!("{message} That was the last of {attempts} attempts on this model's backends.")
    } else {
        message
    }
}

/// A backend's error answer in OpenAI's shape; `None` if it is already exactly that.
fn backend_reply(status: u16, body: &[u8]) -> Option<ErrorBody> {
    match serde_json::from_slice::<Map<String, Value>>(body) {
        Ok(object) => from_json_object(status, &object),
        Err(_) => Some(error(status, non_json_message(status, body))),
    }
}

/// A JSON error answer in OpenAI's shape; `None` if it is already exactly that.
fn from_json_object(status: u16, object: &Map<String, Value>) -> Option<ErrorBody> {
    let (fields, nested) = match object.get("error") {
        Some(Value::Object(inner)) => (inner, true),
        Some(Value::String(message)) => {
            return Some(error(status, message.clone()));
        }
        _ => (object, false),
    };
    let message = ["message", "detail", "msg"].iter().find_map(|k| fields.get(*k)).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let Some(message) = message else {
        return Some(error(
            status,
            format!("The backend answered HTTP {status}: {}", truncate(&Value::Object(object.clone()).to_string())),
        ));
    };
    let kind = fields.get("type").and_then(Value::as_str).filter(|t| ErrorType::kept_from_backends(t));
    let param = fields.get("param").and_then(Value::as_str);
    let code = fields.get("code").and_then(Value::as_str);
    let exact = nested
        && kind.is_some()
        && fields.len() == 4
        && matches!(fields.get("message"), Some(Value::String(_)))
        && matches!(fields.get("param"), Some(Value::String(_) | Value::Null))
        && matches!(fields.get("code"), Some(Value::String(_) | Value::Null));
    if exact {
        return None;
    }
    Some(ErrorBody {
        message,
        kind: kind.unwrap_or_else(|| ErrorType::for_status(status).as_str()).to_string(),
        param: param.map(str::to_string),
        code: code.map(str::to_string),
    })
}

fn non_json_message(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("The backend answered HTTP {status} with an empty body.")
    } else if text.starts_with('<') {
        match html_title(text) {
            Some(title) => format!("The backend answered HTTP {status} with an HTML page: {}", truncate(title)),
            None => format!("The backend answered HTTP {status} with an HTML page."),
        }
    } else {
        format!("The backend answered HTTP {status}: {}", truncate(text))
    }
}

fn html_title(html: &str) -> Option<&str> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title>")? + "<title>".len();
    let end = start + lower.get(start..)?.find("</title>")?;
    html.get(start..end).map(str::trim).filter(|t| !t.is_empty())
}

/// Envoy's own plain-text body, as a message.
fn quote(body: &[u8]) -> String {
    truncate(String::from_utf8_lossy(body).trim())
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn backend(status: u16, body: &str) -> Option<Value> {
        normalize(status, Origin::Backend { attempts: 1 }, body.as_bytes())
            .map(|r| serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn exact_openai_errors_pass_untouched() {
        let body =
            r#"{"error":{"message":"m","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert_eq!(backend(404, body), None);
        assert_eq!(backend(500, r#"{"error":{"message":"m","type":"server_error","param":null,"code":null}}"#), None);
        let numeric_message = r#"{"error":{"message":7,"type":"server_error","param":null,"code":null}}"#;
        assert_eq!(backend(500, numeric_message).unwrap()["error"]["message"], "7");
    }

    #[test]
    fn vllm_integer_codes_become_openai_errors() {
        let v = backend(
            400,
            r#"{"error":{"message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}}"#,
        );
        assert_eq!(
            v.unwrap(),
            json!({"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "param": null, "code": null}})
        );
    }

    #[test]
    fn flat_and_fastapi_errors_keep_their_message() {
        let v = backend(404, r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#).unwrap();
        assert_eq!(v["error"]["message"], "The model `x` does not exist.");
        assert_eq!(v["error"]["type"], "not_found_error");
        let v = backend(422, r#"{"detail":[{"loc":["body","messages"],"msg":"field required"}]}"#).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("field required"));
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let v = backend(429, r#"{"error":"slow down"}"#).unwrap();
        assert_eq!(
            (v["error"]["message"].as_str(), v["error"]["type"].as_str()),
            (Some("slow down"), Some("rate_limit_error"))
        );
    }

    #[test]
    fn html_text_and_empty_bodies_get_a_message_a_person_can_act_on() {
        let v = backend(502, "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>").unwrap();
        assert_eq!(v["error"]["message"], "The backend answered HTTP 502 with an HTML page: 502 Bad Gateway");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(
            backend(503, "overloaded, try later").unwrap()["error"]["message"],
            "The backend answered HTTP 503: overloaded, try later"
        );
        assert_eq!(backend(500, "").unwrap()["error"]["message"], "The backend answered HTTP 500 with an empty body.");
        let long = "x".repeat(5000);
        assert!(backend(500, &long).unwrap()["error"]["message"].as_str().unwrap().chars().count() < 400);
    }

    #[test]
    fn a_compressed_body_is_named_not_quoted() {
        let v = backend(500, std::str::from_utf8(&compressed_body("gzip")).unwrap()).unwrap();
        assert_eq!(
            v["error"]["message"],
            "The backend answered HTTP 500: (a body compressed with gzip, which the gateway does not read)"
        );
    }

    #[test]
    fn envoy_replies_already_in_openai_shape_stay() {
        let body = br#"{"error":{"message":"Unknown request URL.","type":"invalid_request_error","param":null,"code":"unknown_url"}}"#;
        assert_eq!(normalize(404, Origin::Envoy { details: "direct_response", attempts: 1 }, body), None);
    }

    #[test]
    fn envoy_local_replies_say_what_happened_and_whether_to_retry() {
        let envoy = |status, details| {
            let r = normalize(status, Origin::Envoy { details, attempts: 1 }, b"plain text from Envoy").unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            let field = |name: &str| v["error"][name].as_str().map(str::to_string);
            (field("type"), field("code"), r.should_retry)
        };
        let server = |code: &str, retry| (Some("server_error".to_string()), Some(code.to_string()), retry);
        assert_eq!(envoy(503, "no_healthy_upstream"), server("backend_unavailable", Some(true)));
        let refused = "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_Connection_refused}";
        assert_eq!(envoy(503, refused), server("backend_connect_failed", Some(true)));
        let chained = normalize(503, Origin::from_code_details(refused).after_attempts(3), b"").unwrap();
        let message = serde_json::from_slice::<Value>(&chained.body).unwrap()["error"]["message"].to_string();
        assert!(message.contains("could not connect") && message.contains("last of 3 attempts"), "{message}");
        let overloaded = normalize(503, Origin::from_code_details("via_upstream").after_attempts(2), b"busy").unwrap();
        let message = serde_json::from_slice::<Value>(&overloaded.body).unwrap()["error"]["message"].to_string();
        assert!(message.contains("busy") && message.contains("last of 2 attempts"), "{message}");
        let dropped = "upstream_reset_before_response_started{connection_termination}";
        assert_eq!(envoy(503, dropped), server("backend_reset", Some(true)));
        assert_eq!(envoy(504, "response_timeout"), server("backend_timeout", Some(true)));
        assert_eq!(envoy(503, "cluster_not_found"), server("backend_not_configured", Some(false)));
        assert_eq!(envoy(431, "http1.headers_too_large"), (Some("invalid_request_error".to_string()), None, None));
        let r = normalize(431, Origin::Envoy { details: "http1.headers_too_large", attempts: 1 }, b"").unwrap();
        let message = serde_json::from_slice::<ErrorEnvelope>(&r.body).unwrap().error.message;
        assert!(message.contains("431"), "{message}");
    }

    #[test]
    fn huge_and_deep_bodies_are_handled() {
        let huge = format!(r#"{{"error":{{"message":"{}","type":"x","code":1}}}}"#, "m".repeat(1 << 20));
        let v = backend(500, &huge).unwrap();
        assert_eq!(v["error"]["message"].as_str().unwrap().len(), 1 << 20);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(backend(500, &deep).unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("The backend answered HTTP 500"));
        let invalid_utf8 = normalize(502, Origin::Backend { attempts: 1 }, b"\xff\xfe<html>").unwrap();
        assert!(serde_json::from_slice::<ErrorEnvelope>(&invalid_utf8.body).is_ok());
    }

    fn anthropic(status: u16, origin: Origin<'_>, body: &str) -> Option<(Value, Option<bool>)> {
        normalize_in(ClientApi::Anthropic, status, origin, body.as_bytes())
            .map(|r| (serde_json::from_slice(&r.body).unwrap(), r.should_retry))
    }

    #[test]
    fn on_anthropics_api_errors_take_its_envelope_and_its_own_stay() {
        let backend = Origin::Backend { attempts: 1 };
        let own = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
        assert_eq!(anthropic(529, backend, own), None);
        let openai =
            r#"{"error":{"message":"m","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert_eq!(
            anthropic(404, backend, openai),
            Some((json!({"type": "error", "error": {"type": "not_found_error", "message": "m"}}), None))
        );
        assert_eq!(
            anthropic(502, backend, "<html><title>502 Bad Gateway</title></html>"),
            Some((
                json!({"type": "error", "error": {"type": "api_error",
                       "message": "The backend answered HTTP 502 with an HTML page: 502 Bad Gateway"}}),
                None
            ))
        );
        let (envelope, retry) =
            anthropic(503, Origin::Envoy { details: "no_healthy_upstream", attempts: 1 }, "").unwrap();
        assert_eq!((envelope["error"]["type"].as_str(), retry), (Some("api_error"), Some(true)));
        let (envelope, _) = anthropic(429, backend, r#"{"error":"slow down"}"#).unwrap();
        assert_eq!(envelope, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}));
        // OpenAI's API is as it was.
        assert_eq!(normalize_in(ClientApi::Openai, 500, backend, b"x"), normalize(500, backend, b"x"));
    }

    proptest! {
        #[test]
        fn any_body_becomes_a_valid_envelope(status in 400u16..600, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some(r) = normalize(status, Origin::Backend { attempts: 1 }, &body) {
                let v: ErrorEnvelope = serde_json::from_slice(&r.body).unwrap();
                prop_assert!(!v.error.message.is_empty());
            }
            let r = normalize(status, Origin::Envoy { details: "x", attempts: 1 }, &body).unwrap();
            prop_assert!(serde_json::from_slice::<ErrorEnvelope>(&r.body).is_ok());
        }

        /// On Anthropic's API, whatever the body, what the client gets is Anthropic's envelope, and final.
        #[test]
        fn any_body_becomes_an_anthropic_envelope(status in 400u16..600, body in proptest::collection::vec(any::<u8>(), 0..300), envoy in any::<bool>()) {
            let origin = if envoy { Origin::Envoy { details: "x", attempts: 1 } } else { Origin::Backend { attempts: 1 } };
            let sent = normalize_in(ClientApi::Anthropic, status, origin, &body).map_or(body, |r| r.body);
            prop_assert!(is_anthropic_envelope(&sent));
            prop_assert_eq!(normalize_in(ClientApi::Anthropic, status, origin, &sent), None);
        }

        #[test]
        fn any_json_error_object_becomes_a_valid_envelope(message in "\\PC{0,40}", code in any::<i64>(), kind in "[A-Za-z_]{0,12}") {
            let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string();
            let r = normalize(400, Origin::Backend { attempts: 1 }, body.as_bytes()).unwrap();
            let v: ErrorEnvelope = serde_json::from_slice(&r.body).unwrap();
            prop_assert_eq!(v.error.code, None);
        }
    }
}
