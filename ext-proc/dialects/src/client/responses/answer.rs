//! A chat completion answer, whole or streamed, as the Responses API's.

use super::AnswerContext;
use crate::client::new_id;
use crate::dialect::{ResponsePlan, ResponseTranslator};
use crate::stream;
use modelgate_proto::error::GatewayError;
use modelgate_proto::error_normalize::{normalize, Origin};
use modelgate_proto::framing::{CompleteEvents, Framing};
use modelgate_proto::stored_response::StoredResponse;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// A chat completion answer as a Responses API answer.
pub struct ResponsesAnswer {
    context: AnswerContext,
    records: CompleteEvents,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// `response.created` and `response.in_progress` are out.
    started: bool,
    /// The output items so far, in order.
    items: Vec<Item>,
    /// The output index of each chat tool call, by its chat index.
    calls: HashMap<u64, usize>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    /// The final response event is out (completed, incomplete or failed).
    over: bool,
    /// Ended with an error event: the rest of the backend's stream is not read.
    failed: bool,
    /// The completed response, until handed on to be stored.
    done: Option<Value>,
}

/// One output item as it grows.
enum Item {
    /// The model's reasoning, where the backend gives it (chat's `reasoning_content`).
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        parts: Vec<Part>,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

struct Part {
    refusal: bool,
    text: String,
}

impl Part {
    fn json(&self) -> Value {
        if self.refusal {
            json!({"type": "refusal", "refusal": self.text})
        } else {
            json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
        }
    }
}

impl Item {
    fn id(&self) -> &str {
        match self {
            Item::Reasoning { id, .. } | Item::Message { id, .. } | Item::Call { id, .. } => id,
        }
    }

    fn json(&self, status: &str) -> Value {
        match self {
            Item::Reasoning { id, text } => json!({
                "id": id, "type": "reasoning", "status": status, "summary": [],
                "content": if text.is_empty() { json!([]) } else { json!([{"type": "reasoning_text", "text": text}]) },
            }),
            Item::Message { id, parts } => json!({
                "id": id, "type": "message", "status": status, "role": "assistant",
                "content": parts.iter().map(Part::json).collect::<Vec<_>>(),
            }),
            Item::Call { id, call_id, name, arguments } => json!({
                "id": id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
                "arguments": arguments,
            }),
        }
    }
}

/// The response's status (its items' too) for chat's `finish_reason`, and why it is incomplete.
fn outcome(finish_reason: Option<&str>) -> (&'static str, Value) {
    match finish_reason {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// A chat error (`{"message","code",…}`) as a response's `error`, and its `error` event's fields.
fn error_fields(error: &Value) -> (Value, Value, Value) {
    let code = error["code"].as_str().or(error["type"].as_str()).unwrap_or("server_error");
    let message = error["message"].as_str().unwrap_or("The backend's answer failed.");
    (json!(code), json!(message), error["param"].clone())
}

impl ResponsesAnswer {
    pub fn new(context: &AnswerContext, max_event_bytes: usize) -> Self {
        ResponsesAnswer {
            context: context.clone(),
            records: CompleteEvents::new(Framing::Sse, max_event_bytes),
            sequence: 0,
            started: false,
            items: Vec::new(),
            calls: HashMap::new(),
            finish_reason: None,
            usage: None,
            over: false,
            failed: false,
            done: None,
        }
    }

    /// The response with what the answer has given so far.
    fn response(&self, status: &str, item_status: &str, extra: Map<String, Value>) -> Value {
        let output = self.items.iter().map(|item| item.json(item_status)).collect();
        self.context.response(status, output, self.usage.as_ref(), extra)
    }

    /// The completed (or incomplete) response, kept to be stored.
    fn complete(&mut self) -> Value {
        let (status, details) = outcome(self.finish_reason.as_deref());
        let mut extra = Map::new();
        extra.insert("incomplete_details".into(), details);
        let response = self.response(status, status, extra);
        self.done = Some(response.clone());
        response
    }

    fn failed_response(&self, error: &Value) -> Value {
        let (code, message, _) = error_fields(error);
        let mut extra = Map::new();
        extra.insert("error".into(), json!({"code": code, "message": message}));
        self.response("failed", "incomplete", extra)
    }

    /// A whole chat completion's items.
    fn read_whole(&mut self, chat: &Value) {
        let choice = &chat["choices"][0];
        let message = &choice["message"];
        if let Some(text) = reasoning_text(message) {
            self.items.push(Item::Reasoning { id: new_id("rs_"), text: text.to_string() });
        }
        let mut parts = Vec::new();
        for (field, refusal) in [("content", false), ("refusal", true)] {
            if let Some(text) = message[field].as_str().filter(|t| !t.is_empty()) {
                parts.push(Part { refusal, text: text.to_string() });
            }
        }
        if !parts.is_empty() {
            self.items.push(Item::Message { id: new_id("msg_"), parts });
        }
        for call in message["tool_calls"].as_array().into_iter().flatten() {
            self.items.push(Item::Call {
                id: new_id("fc_"),
                call_id: call_id(call),
                name: call["function"]["name"].as_str().unwrap_or_default().to_string(),
                arguments: call["function"]["arguments"].as_str().unwrap_or_default().to_string(),
            });
        }
        self.finish_reason = choice["finish_reason"].as_str().map(str::to_string);
        self.usage = chat.get("usage").filter(|u| u.is_object()).cloned();
    }

    /// Writes one event: `event: <kind>` and its data with `type` and `sequence_number`.
    fn event(&mut self, out: &mut Vec<u8>, kind: &str, fields: Value) {
        let mut data = match fields {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(self.sequence));
        self.sequence += 1;
        out.extend_from_slice(format!("event: {kind}\ndata: ").as_bytes());
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &data);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        self.started = true;
        let response = self.response("in_progress", "in_progress", Map::new());
        self.event(out, "response.created", json!({"response": response}));
        self.event(out, "response.in_progress", json!({"response": response}));
    }

    /// One chat chunk's events.
    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if let Some(error) = chunk.get("error") {
            return self.fail(error, out);
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        // One choice: the chat request asks for no more.
        let Some(choice) = chunk["choices"].get(0) else { return };
        let delta = &choice["delta"];
        if let Some(text) = reasoning_text(delta) {
            self.reasoning(text, out);
        }
        for (field, refusal) in [("content", false), ("refusal", true)] {
            if let Some(text) = delta[field].as_str().filter(|t| !t.is_empty()) {
                self.text(refusal, text, out);
            }
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            self.tool_call(call, out);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
        }
    }

    /// Adds `item` to the output, announced; its output index.
    fn open(&mut self, item: Item, out: &mut Vec<u8>) -> usize {
        let added = json!({"output_index": self.items.len(), "item": item.json("in_progress")});
        self.items.push(item);
        self.event(out, "response.output_item.added", added);
        self.items.len() - 1
    }

    /// A piece of the model's reasoning, opening its item as needed.
    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>) {
        if !matches!(self.items.last(), Some(Item::Reasoning { .. })) {
            self.open(Item::Reasoning { id: new_id("rs_"), text: String::new() }, out);
        }
        let output_index = self.items.len() - 1;
        let Some(Item::Reasoning { id, text: all }) = self.items.last_mut() else { return };
        all.push_str(text);
        let fields = json!({"item_id": id, "output_index": output_index, "content_index": 0, "delta": text});
        self.event(out, "response.reasoning_text.delta", fields);
    }

    /// A piece of the message's text (or refusal), opening the message and its part as needed.
    fn text(&mut self, refusal: bool, text: &str, out: &mut Vec<u8>) {
        if !matches!(self.items.last(), Some(Item::Message { .. })) {
            self.open(Item::Message { id: new_id("msg_"), parts: Vec::new() }, out);
        }
        let output_index = self.items.len() - 1;
        let Some(Item::Message { id, parts }) = self.items.last_mut() else { return };
        let item_id = id.clone();
        let added = match parts.last() {
            Some(part) if part.refusal == refusal => None,
            _ => {
                let part = Part { refusal, text: String::new() };
                let json = part.json();
                parts.push(part);
                Some(json)
            }
        };
        let content_index = parts.len() - 1;
        if let Some(last) = parts.last_mut() {
            last.text.push_str(text);
        }
        let at = json!({"item_id": item_id, "output_index": output_index, "content_index": content_index});
        if let Some(part) = added {
            self.event(out, "response.content_part.added", with(&at, "part", part));
        }
        if refusal {
            self.event(out, "response.refusal.delta", with(&at, "delta", json!(text)));
        } else {
            let delta = with(&with(&at, "delta", json!(text)), "logprobs", json!([]));
            self.event(out, "response.output_text.delta", delta);
        }
    }

    /// A piece of a tool call: its start (id and name), or a piece of its arguments.
    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) {
        let index = call["index"].as_u64().unwrap_or(0);
        let function = &call["function"];
        let output_index = match self.calls.get(&index) {
            Some(&output_index) => output_index,
            None => {
                let call = Item::Call {
                    id: new_id("fc_"),
                    call_id: call_id(call),
                    name: function["name"].as_str().unwrap_or_default().to_string(),
                    arguments: String::new(),
                };
                let output_index = self.open(call, out);
                self.calls.insert(index, output_index);
                output_index
            }
        };
        let Some(delta) = function["arguments"].as_str().filter(|a| !a.is_empty()) else { return };
        let Some(Item::Call { id, arguments, .. }) = self.items.get_mut(output_index) else { return };
        arguments.push_str(delta);
        let fields = json!({"item_id": id, "output_index": output_index, "delta": delta});
        self.event(out, "response.function_call_arguments.delta", fields);
    }

    /// The `.done` events of every item, then `response.completed` (or `.incomplete`).
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.over = true;
        let (status, _) = outcome(self.finish_reason.as_deref());
        let mut events = Vec::new();
        for (output_index, item) in self.items.iter().enumerate() {
            let at = json!({"item_id": item.id(), "output_index": output_index});
            match item {
                Item::Reasoning { text, .. } => {
                    let done = with(&with(&at, "content_index", json!(0)), "text", json!(text));
                    events.push(("response.reasoning_text.done", done));
                }
                Item::Message { parts, .. } => {
                    for (content_index, part) in parts.iter().enumerate() {
                        let at = with(&at, "content_index", json!(content_index));
                        events.push(if part.refusal {
                            ("response.refusal.done", with(&at, "refusal", json!(part.text)))
                        } else {
                            let done = with(&with(&at, "text", json!(part.text)), "logprobs", json!([]));
                            ("response.output_text.done", done)
                        });
                        events.push(("response.content_part.done", with(&at, "part", part.json())));
                    }
                }
                Item::Call { name, arguments, .. } => {
                    let done = with(&with(&at, "name", json!(name)), "arguments", json!(arguments));
                    events.push(("response.function_call_arguments.done", done));
                }
            }
            let done = json!({"output_index": output_index, "item": item.json(status)});
            events.push(("response.output_item.done", done));
        }
        for (kind, fields) in events {
            self.event(out, kind, fields);
        }
        let response = self.complete();
        let kind = if status == "completed" { "response.completed" } else { "response.incomplete" };
        self.event(out, kind, json!({"response": response}));
    }

    /// An `error` event, then `response.failed`: the stream's end.
    fn fail(&mut self, error: &Value, out: &mut Vec<u8>) {
        self.over = true;
        self.failed = true;
        let (code, message, param) = error_fields(error);
        self.event(out, "error", json!({"code": code, "message": message, "param": param}));
        let response = self.failed_response(error);
        self.event(out, "response.failed", json!({"response": response}));
    }

    fn fail_with(&mut self, error: &GatewayError, out: &mut Vec<u8>) {
        tracing::warn!(reason = error.message, "ending a translated Responses stream early");
        let envelope: Value = serde_json::from_slice(&error.to_json()).unwrap_or_default();
        self.fail(&envelope["error"], out);
    }
}

/// A chat tool call's id; one is made up for a backend that gives none.
fn call_id(call: &Value) -> String {
    call["id"].as_str().map_or_else(|| new_id("call_"), str::to_string)
}

/// The reasoning of a chat message or delta: vLLM's `reasoning_content`, or the newer `reasoning`.
fn reasoning_text(message: &Value) -> Option<&str> {
    ["reasoning_content", "reasoning"].iter().find_map(|field| message[field].as_str().filter(|t| !t.is_empty()))
}

/// `object` with `key` set to `value`.
fn with(object: &Value, key: &str, value: Value) -> Value {
    let mut object = object.clone();
    object[key] = value;
    object
}

impl ResponseTranslator for ResponsesAnswer {
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan {
        stream::plan(status, content_type, Framing::Sse)
    }

    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8> {
        if !(200..300).contains(&status) {
            // An error stays OpenAI's, as the client's SDK reads it.
            return normalize(status, Origin::Backend { attempts: 1 }, body).map_or_else(|| body.to_vec(), |e| e.body);
        }
        let response = match serde_json::from_slice::<Value>(body) {
            Ok(chat) => {
                self.read_whole(&chat);
                self.complete()
            }
            Err(e) => {
                let error = GatewayError::stream_unreadable(&e);
                let envelope: Value = serde_json::from_slice(&error.to_json()).unwrap_or_default();
                self.failed_response(&envelope["error"])
            }
        };
        serde_json::to_vec(&response).unwrap_or_default()
    }

    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if self.over {
            return out;
        }
        if !self.started {
            self.start(&mut out);
        }
        let (complete, too_long) = match self.records.take(piece, end) {
            Ok(complete) => (complete, None),
            Err(long) => {
                (long.complete.to_vec(), Some(GatewayError::stream_event_too_large(self.records.max_event_bytes())))
            }
        };
        for raw in Framing::Sse.records(&complete) {
            if self.over {
                return out;
            }
            if raw.trim_ascii() == b"[DONE]" {
                self.finish(&mut out);
                continue;
            }
            match serde_json::from_slice::<Value>(&raw) {
                Ok(chunk) => self.chunk(&chunk, &mut out),
                Err(e) => self.fail_with(&GatewayError::stream_unreadable(&e), &mut out),
            }
        }
        if let Some(error) = too_long.filter(|_| !self.over) {
            self.fail_with(&error, &mut out);
        }
        if end && !self.over {
            // A stream cut before `[DONE]` is whole if its answer said why it stopped.
            match self.finish_reason {
                Some(_) => self.finish(&mut out),
                None => self.fail_with(&GatewayError::interrupted(&"the backend's stream ended early"), &mut out),
            }
        }
        out
    }

    fn ended(&self) -> bool {
        self.failed
    }

    fn finished(&mut self) -> Option<StoredResponse> {
        let response = self.done.take().filter(|_| self.context.store)?;
        Some(StoredResponse { response, input: self.context.input.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::testing::feed;
    use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
    use proptest::prelude::*;

    fn context(store: bool) -> AnswerContext {
        let mut echo = Map::new();
        echo.insert("model".into(), json!("client-model"));
        AnswerContext {
            id: "resp_1".into(),
            created_at: 1,
            echo,
            store,
            input: vec![json!({"role": "user", "content": "hi"})],
        }
    }

    fn answer(store: bool) -> ResponsesAnswer {
        ResponsesAnswer::new(&context(store), DEFAULT_MAX_EVENT_BYTES)
    }

    /// Each event's `type` and data.
    fn events(sse: &str) -> Vec<(String, Value)> {
        sse.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (kind, data) = e.strip_prefix("event: ").unwrap().split_once("\ndata: ").unwrap();
                (kind.to_string(), serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    fn chunk(delta: Value, finish_reason: Value) -> String {
        format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}))
    }

    const WHOLE: &[u8] = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;

    #[test]
    fn a_completed_response_is_stored_once_and_only_when_asked() {
        let mut stored = answer(true);
        let response: Value = serde_json::from_slice(&stored.whole(200, WHOLE)).unwrap();
        let kept = stored.finished().unwrap();
        assert_eq!((kept.id(), &kept.response), ("resp_1", &response));
        assert_eq!(kept.input, vec![json!({"role": "user", "content": "hi"})]);
        assert!(stored.finished().is_none(), "once");
        let mut unstored = answer(false);
        unstored.whole(200, WHOLE);
        assert!(unstored.finished().is_none());
    }

    #[test]
    fn a_failed_stream_is_not_stored_and_ends_with_error_then_response_failed() {
        let mut translation = answer(true);
        let error = r#"data: {"error":{"message":"boom","type":"server_error","code":"internal_error"}}"#;
        let out = feed(&mut translation, &[chunk(json!({"content": "He"}), Value::Null).as_bytes(), error.as_bytes()]);
        let events = events(&out);
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"]);
        assert_eq!(events[events.len() - 2].1["code"], "internal_error");
        let failed = &events[events.len() - 1].1["response"];
        assert_eq!(
            (&failed["status"], &failed["error"]),
            (&json!("failed"), &json!({"code": "internal_error", "message": "boom"}))
        );
        assert!(translation.ended() && translation.finished().is_none());
        assert!(translation.stream(b"data: [DONE]\n\n", true).is_empty(), "nothing goes on after the end");
    }

    #[test]
    fn a_stream_cut_before_done_completes_only_if_its_answer_said_why_it_stopped() {
        let finished = chunk(json!({"content": "Hi"}), json!("stop"));
        let out = feed(&mut answer(true), &[finished.as_bytes()]);
        assert_eq!(events(&out).last().unwrap().0, "response.completed");
        let cut = chunk(json!({"content": "Hi"}), Value::Null);
        let out = feed(&mut answer(true), &[cut.as_bytes()]);
        let events = events(&out);
        assert_eq!(events[events.len() - 2].1["code"], "stream_interrupted");
        assert_eq!(events.last().unwrap().0, "response.failed");
    }

    #[test]
    fn sequence_numbers_count_from_zero_and_a_refusal_is_its_own_part() {
        let pieces = [
            chunk(json!({"refusal": "No."}), Value::Null),
            chunk(json!({}), json!("content_filter")),
            "data: [DONE]\n\n".to_string(),
        ];
        let pieces: Vec<&[u8]> = pieces.iter().map(|p| p.as_bytes()).collect();
        let mut translation = answer(true);
        let events = events(&feed(&mut translation, &pieces));
        for (n, (kind, data)) in events.iter().enumerate() {
            assert_eq!((&data["sequence_number"], &data["type"]), (&json!(n), &json!(kind)));
        }
        assert!(events.iter().any(|(kind, data)| kind == "response.refusal.done" && data["refusal"] == "No."));
        let response = &events.last().unwrap().1["response"];
        assert_eq!(
            (&response["status"], &response["incomplete_details"]),
            (&json!("incomplete"), &json!({"reason": "content_filter"}))
        );
        assert_eq!(response["output"][0]["content"], json!([{"type": "refusal", "refusal": "No."}]));
        assert!(translation.finished().is_some(), "an incomplete response is stored");
    }

    #[test]
    fn an_unreadable_whole_answer_is_a_failed_response() {
        let mut translation = answer(true);
        let response: Value = serde_json::from_slice(&translation.whole(200, b"<html>")).unwrap();
        assert_eq!((&response["status"], &response["error"]["code"]), (&json!("failed"), &json!("stream_unreadable")));
        assert!(translation.finished().is_none());
    }

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\",\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n\
        data: [DONE]\n\n";

    /// The events with their made-up ids left out.
    fn without_ids(sse: &str) -> Vec<(String, Value)> {
        let strip = |mut value: Value| {
            for at in ["/item_id", "/item/id", "/response/id"] {
                if let Some(id) = value.pointer_mut(at) {
                    *id = Value::Null;
                }
            }
            if let Some(Value::Array(output)) = value.pointer_mut("/response/output") {
                output.iter_mut().for_each(|item| item["id"] = Value::Null);
            }
            value
        };
        events(sse).into_iter().map(|(kind, data)| (kind, strip(data))).collect()
    }

    proptest! {
        #[test]
        fn random_splits_give_the_same_events(cuts in proptest::collection::btree_set(0..STREAM.len(), 0..20)) {
            let whole = feed(&mut answer(true), &[STREAM.as_bytes()]);
            let mut pieces = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([STREAM.len()]) {
                pieces.push(&STREAM.as_bytes()[from..cut]);
                from = cut;
            }
            let split = feed(&mut answer(true), &pieces);
            prop_assert_eq!(without_ids(&split), without_ids(&whole));
            let events = events(&whole);
            let completed = &events.last().unwrap().1["response"];
            prop_assert_eq!(&completed["output"][1]["arguments"], &json!("{\"a\":1}"));
            prop_assert_eq!(&completed["usage"]["total_tokens"], &json!(7));
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256), status in 100u16..600) {
            let mut translation = answer(true);
            let _ = translation.whole(status, &body);
            let _ = answer(true).stream(&body, true);
        }
    }
}
