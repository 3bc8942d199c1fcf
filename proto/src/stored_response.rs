//! A response of OpenAI's Responses API as the gateway stores it (`store`,
//! the default): what `GET /v1/responses/{id}` answers, and the conversation
//! a later request continues with `previous_response_id`.
//!
//! ext-proc's translation makes it when a translated answer completes,
//! ext-proc keeps it in the batch metadata store (SQLite, or Redis when
//! shared) under the client key that made it, and the batch service serves it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One stored response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The `response` object as the client got it (its `id`, `created_at`, `output`, `usage`…).
    pub response: Value,
    /// Every input item of the request, in the Responses API's item shape,
    /// those of the conversation it continued first: with `response.output`
    /// after them, the conversation a request that continues this one starts from.
    pub input: Vec<Value>,
}

impl StoredResponse {
    /// The response's id (`resp_…`); empty if it has none.
    pub fn id(&self) -> &str {
        self.response.get("id").and_then(Value::as_str).unwrap_or_default()
    }

    /// The items a request continuing this response starts from: its input, then its output.
    pub fn conversation(&self) -> Vec<Value> {
        let output = self.response.get("output").and_then(Value::as_array).into_iter().flatten();
        self.input.iter().chain(output).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_continued_conversation_is_the_input_then_the_output() {
        let stored = StoredResponse {
            response: json!({"id": "resp_1", "output": [{"type": "message", "role": "assistant"}]}),
            input: vec![json!({"role": "user", "content": "hi"})],
        };
        assert_eq!(stored.id(), "resp_1");
        assert_eq!(
            stored.conversation(),
            vec![json!({"role": "user", "content": "hi"}), json!({"type": "message", "role": "assistant"})]
        );
    }
}
