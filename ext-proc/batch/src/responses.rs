//! The Responses API's stored responses, as ext_proc keeps and loads them:
//! in the batch metadata store ([`Meta`]), under the client key that made
//! them, for the retention `--responses-retention-days` sets. The batch
//! service ([`crate::api`]) serves them back by id.

use crate::ids;
use crate::store::{Meta, Result};
use modelgate_proto::clock;
use modelgate_proto::stored_response::StoredResponse;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The stored responses, kept for `retention`.
pub struct Responses {
    meta: Arc<Meta>,
    retention: Duration,
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responses").field("retention", &self.retention).finish_non_exhaustive()
    }
}

impl Responses {
    pub fn new(meta: Arc<Meta>, retention: Duration) -> Self {
        Responses { meta, retention }
    }

    /// The owner's response of that id, unless it expired or was deleted.
    pub async fn load(&self, owner: &str, id: &str) -> Result<Option<StoredResponse>> {
        self.meta.response(owner, id, clock::unix_seconds()).await
    }

    /// Keeps the owner's response for the retention, durably before it returns.
    pub async fn keep(&self, owner: &str, stored: StoredResponse) -> Result<()> {
        let expires_at = clock::unix_seconds().saturating_add(self.retention.as_secs());
        self.meta.put_response(owner, &with_item_ids(stored), expires_at).await
    }
}

/// Gives every input item an `id`, as OpenAI's input item list has one for
/// each (and `after` pages by it): an item the client sent without one gets
/// a new one, kept with the response, so it is the same at every read and in
/// every response that continues this one. A message the client wrote in
/// short (`{"role","content":"text"}`) is kept in the item shape the list
/// answers with: `type`, `status` and content parts.
fn with_item_ids(mut stored: StoredResponse) -> StoredResponse {
    for item in &mut stored.input {
        let Some(item) = item.as_object_mut() else { continue };
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
        if kind == "message" {
            as_message_item(item);
        }
        if item.get("id").is_some_and(Value::is_string) {
            continue;
        }
        let prefix = match kind.as_str() {
            "function_call" => "fc_",
            "function_call_output" => "fco_",
            _ => "msg_",
        };
        item.insert("id".into(), Value::String(ids::new_id(prefix)));
    }
    stored
}

/// A message item in full: its `type`, a `status`, and its text as a part
/// (`output_text` for the assistant's, `input_text` for the others').
fn as_message_item(item: &mut serde_json::Map<String, Value>) {
    item.insert("type".into(), Value::from("message"));
    item.entry("status").or_insert_with(|| Value::from("completed"));
    if let Some(Value::String(text)) = item.get("content") {
        let part = if item.get("role").and_then(Value::as_str) == Some("assistant") {
            serde_json::json!({"type": "output_text", "text": text, "annotations": []})
        } else {
            serde_json::json!({"type": "input_text", "text": text})
        };
        item.insert("content".into(), Value::Array(vec![part]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn input_items_without_an_id_get_one_and_the_others_keep_theirs() {
        let stored = StoredResponse {
            response: json!({"id": "resp_1", "output": []}),
            input: vec![
                json!({"role": "user", "content": "hi"}),
                json!({"type": "function_call_output", "call_id": "c", "output": "4"}),
                json!({"type": "message", "id": "msg_kept", "role": "user", "content": "again"}),
            ],
        };
        let ids: Vec<String> =
            with_item_ids(stored).input.iter().map(|item| item["id"].as_str().unwrap().to_string()).collect();
        assert!(ids[0].starts_with("msg_") && ids[1].starts_with("fco_"), "{ids:?}");
        assert_eq!(ids[2], "msg_kept");
    }

    #[test]
    fn a_message_written_in_short_is_kept_as_a_full_item() {
        let stored = StoredResponse {
            response: json!({"id": "resp_1", "output": []}),
            input: vec![
                json!({"role": "user", "content": "hi"}),
                json!({"role": "assistant", "content": "hello"}),
                json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}),
            ],
        };
        let input = with_item_ids(stored).input;
        assert_eq!(input[0]["type"], "message");
        assert_eq!(input[0]["status"], "completed");
        assert_eq!(input[0]["content"], json!([{"type": "input_text", "text": "hi"}]));
        assert_eq!(input[1]["content"], json!([{"type": "output_text", "text": "hello", "annotations": []}]));
        assert_eq!(input[2]["content"], json!([{"type": "input_text", "text": "x"}]));
    }
}
