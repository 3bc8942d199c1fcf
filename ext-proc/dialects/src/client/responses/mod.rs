//! OpenAI's Responses API through chat completions: the request becomes a
//! chat completion ([`ResponsesRequest`], in `request.rs`), the chat answer,
//! whole or streamed, becomes a response object or the Responses API's events
//! ([`ResponsesAnswer`], in `answer.rs`), and a completed response asked to
//! be stored is handed on to be kept ([`ResponsesAnswer`]'s `finished`).

mod answer;
mod request;

pub use answer::ResponsesAnswer;
pub use request::ResponsesRequest;

use serde_json::{json, Map, Value};

/// What a Responses answer's translation needs of its request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerContext {
    /// `resp_<32 hex>`, made with the context so the stream and the store agree.
    pub id: String,
    pub created_at: u64,
    /// The request's fields a response object repeats (model, instructions,
    /// tools, tool_choice…), with their defaults where the client set none.
    pub echo: Map<String, Value>,
    /// Store the completed response (`store`, true unless the client said false).
    pub store: bool,
    /// The conversation's items before the answer: those continued, then this request's input.
    pub input: Vec<Value>,
}

impl AnswerContext {
    /// The response object with `status`, its `output` items, `usage` (chat's) and what else `extra` sets.
    fn response(
        &self,
        status: &str,
        output: Vec<Value>,
        chat_usage: Option<&Value>,
        extra: Map<String, Value>,
    ) -> Value {
        let mut response = self.echo.clone();
        response.insert("id".into(), json!(self.id));
        response.insert("object".into(), json!("response"));
        response.insert("created_at".into(), json!(self.created_at));
        response.insert("status".into(), json!(status));
        response.insert("error".into(), Value::Null);
        response.insert("incomplete_details".into(), Value::Null);
        response.insert("output".into(), Value::Array(output));
        response.insert("usage".into(), chat_usage.map_or(Value::Null, usage));
        response.extend(extra);
        Value::Object(response)
    }
}

/// A chat completion's usage in the Responses API's words.
fn usage(chat: &Value) -> Value {
    if !chat.is_object() {
        return Value::Null;
    }
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    let input = count(&chat["prompt_tokens"]);
    let output = count(&chat["completion_tokens"]);
    json!({
        "input_tokens": input,
        // Chat completions do not say what was written to a cache.
        "input_tokens_details": {
            "cached_tokens": count(&chat["prompt_tokens_details"]["cached_tokens"]),
            "cache_write_tokens": 0,
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": count(&chat["completion_tokens_details"]["reasoning_tokens"])},
        "total_tokens": chat["total_tokens"].as_u64().unwrap_or(input + output),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_cached_and_reasoning_tokens() {
        let chat = json!({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 2}});
        assert_eq!(
            usage(&chat),
            json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0}, "output_tokens": 4,
                "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 14})
        );
        assert_eq!(usage(&Value::Null), Value::Null);
    }
}
