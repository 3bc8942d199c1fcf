//! What every dialect's request translation shares: reading the OpenAI
//! parameters that mean the same to any backend, and the client errors for
//! the ones a backend cannot take.

use modelgate_proto::error::GatewayError;
use serde_json::{json, Map, Value};

/// The most tokens to generate: the newer `max_completion_tokens` wins over the
/// deprecated `max_tokens`; a null counts as absent.
pub fn max_tokens(request: &Map<String, Value>) -> Option<Value> {
    let set = |key: &str| request.get(key).filter(|value| !value.is_null());
    set("max_completion_tokens").or_else(|| set("max_tokens")).cloned()
}

/// `stop` as a list of sequences: OpenAI takes one string or several.
pub fn stop_sequences(value: &Value) -> Result<Value, GatewayError> {
    match value {
        Value::String(stop) => Ok(json!([stop])),
        Value::Array(_) => Ok(value.clone()),
        _ => Err(invalid_type("stop", "a string or an array of strings")),
    }
}

/// An assistant's tool call arguments (a JSON text in OpenAI's shape) as JSON;
/// none count as `{}`. `param` names the call, `messages[i].tool_calls[j]`.
pub fn tool_arguments(call: &Value, param: &str) -> Result<Value, GatewayError> {
    let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(arguments).map_err(|e| {
        GatewayError::invalid_value(
            &format!("{param}.function.arguments"),
            format!("Tool call arguments must be a JSON object ({e})."),
        )
    })
}

/// 400 for a `param` of the wrong JSON type (a dialect does not say which it got).
pub fn invalid_type(param: &str, expected: &str) -> GatewayError {
    GatewayError::invalid_type(param, expected, None)
}

/// A message whose role no backend knows; `param` names the message, `messages[i]`.
pub fn invalid_role(param: &str) -> GatewayError {
    GatewayError::invalid_value(
        &format!("{param}.role"),
        format!("Invalid value for '{param}.role': expected system, developer, user, assistant or tool."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_completion_tokens_wins_and_nulls_are_absent() {
        let request = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(max_tokens(&request(json!({"max_tokens": 5, "max_completion_tokens": 9}))), Some(json!(9)));
        assert_eq!(max_tokens(&request(json!({"max_tokens": 5, "max_completion_tokens": null}))), Some(json!(5)));
        assert_eq!(max_tokens(&request(json!({}))), None);
    }

    #[test]
    fn tool_arguments_are_json_or_nothing() {
        let call = |arguments: Value| json!({"function": {"name": "f", "arguments": arguments}});
        assert_eq!(tool_arguments(&call(json!("{\"a\":1}")), "m").unwrap(), json!({"a": 1}));
        assert_eq!(tool_arguments(&call(json!(" ")), "m").unwrap(), json!({}));
        assert_eq!(tool_arguments(&call(Value::Null), "m").unwrap(), json!({}));
        let e = tool_arguments(&call(json!("{")), "messages[0].tool_calls[1]").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls[1].function.arguments"));
    }
}
