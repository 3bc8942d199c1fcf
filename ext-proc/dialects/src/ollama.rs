//! Ollama's native API behind OpenAI's: chat completions on `/api/chat`,
//! completions on `/api/generate`, embeddings on `/api/embed`.
//!
//! Requests: sampling parameters go into Ollama's `options` (`max_tokens`
//! becomes `num_predict`), images travel as base64 in `images`, tools keep
//! OpenAI's shape, and `stream` is always sent, since Ollama streams unless
//! told otherwise. Responses: Ollama's answer objects, whole or as NDJSON
//! lines, become OpenAI completions, chunks and embeddings, with
//! `prompt_eval_count` and `eval_count` as usage.

use crate::dialect::{
    BackendRequest, HeaderChanges, RequestTranslator, ResponseContext, ResponsePlan, ResponseTranslator,
};
use crate::params::{self, invalid_role, invalid_type, stop_sequences, tool_arguments};
use crate::stream::{self, RecordStream, RecordTranslator, StreamHead};
use base64::Engine;
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::clock;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::{ErrorType, GatewayError};
use modelgate_proto::framing::{error_event, Framing};
use serde_json::{json, Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// An OpenAI request as an Ollama one.
pub struct OllamaRequest {
    profile: BackendProfile,
    /// What the answer's translation will need, filled in from the request.
    context: ResponseContext,
}

impl OllamaRequest {
    pub fn new(profile: BackendProfile, endpoint: Endpoint) -> Result<Self, GatewayError> {
        match endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => {
                Ok(OllamaRequest { profile, context: ResponseContext::new(Dialect::Ollama, endpoint) })
            }
            // Ollama has no tokenizer endpoint nor LoRA operations.
            other => Err(GatewayError::unsupported_endpoint(other.path(), "an Ollama")),
        }
    }
}

impl RequestTranslator for OllamaRequest {
    fn request(&mut self, body: &[u8]) -> Result<BackendRequest, GatewayError> {
        let request: Map<String, Value> =
            serde_json::from_slice(body).map_err(|e| GatewayError::unparsable_json(&e))?;
        let context = &mut self.context;
        context.model = request.get("model").cloned().unwrap_or(Value::Null);
        context.include_usage = request.get("stream_options").is_some_and(|o| o["include_usage"] == true);
        context.base64 = request.get("encoding_format").is_some_and(|f| f == "base64");
        let (path, mut out) = match context.endpoint {
            Endpoint::ChatCompletions => ("/api/chat", chat_request(&request)?),
            Endpoint::Completions => ("/api/generate", generate_request(&request)?),
            Endpoint::Embeddings => ("/api/embed", embed_request(&request)?),
            other => return Err(GatewayError::unsupported_endpoint(other.path(), "an Ollama")),
        };
        let model = self.profile.model.clone().map(Value::String).unwrap_or_else(|| context.model.clone());
        out.insert("model".into(), model);
        apply_defaults(&mut out, &self.profile.defaults);
        Ok(BackendRequest { path: Some(path.to_string()), body: Some(Value::Object(out).to_string().into_bytes()) })
    }

    fn response_context(&self) -> Option<ResponseContext> {
        Some(self.context.clone())
    }

    fn headers(&self) -> HeaderChanges {
        // Answers must come uncompressed, to be translated.
        HeaderChanges { set: Vec::new(), remove: vec!["accept-encoding"] }
    }
}

/// An Ollama answer, whole or as NDJSON lines, as OpenAI's.
pub struct OllamaAnswer {
    context: ResponseContext,
    stream: Option<RecordStream<ChunkWriter>>,
}

impl OllamaAnswer {
    pub fn new(context: &ResponseContext) -> Self {
        OllamaAnswer { context: context.clone(), stream: None }
    }
}

impl ResponseTranslator for OllamaAnswer {
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan {
        let plan = stream::plan(status, content_type, Framing::Ndjson);
        if plan.streamed {
            let writer = ChunkWriter::new(&self.context);
            self.stream = Some(RecordStream::new(Framing::Ndjson, self.context.max_event_bytes, writer));
        }
        plan
    }

    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8> {
        let Ok(answer) = serde_json::from_slice::<Value>(body) else {
            return body.to_vec();
        };
        if !(200..300).contains(&status) {
            return match answer["error"].as_str() {
                Some(message) => openai_error(status, message).to_json(),
                None => body.to_vec(),
            };
        }
        let model = &self.context.model;
        let out = match self.context.endpoint {
            Endpoint::ChatCompletions => chat_completion(&answer, model),
            Endpoint::Completions => text_completion(&answer, model),
            Endpoint::Embeddings => embeddings(&answer, model, self.context.base64),
            // Refused before any request was made.
            _ => return body.to_vec(),
        };
        out.to_string().into_bytes()
    }

    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        stream::push(&mut self.stream, piece, end)
    }

    fn ended(&self) -> bool {
        self.stream.as_ref().is_some_and(RecordStream::ended)
    }
}

fn unsupported(param: &str, why: &str) -> GatewayError {
    GatewayError::unsupported_parameter(param, &format!("with Ollama models{why}"))
}

/// Defaults fill what the request left out; `options` are merged key by key.
fn apply_defaults(out: &mut Map<String, Value>, defaults: &Map<String, Value>) {
    for (key, value) in defaults {
        match (out.get_mut(key), value) {
            (Some(Value::Object(set)), Value::Object(default)) => {
                for (k, v) in default {
                    set.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            (Some(_), _) => {}
            (None, _) => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The sampling parameters and other settings every generating endpoint shares.
fn common(request: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), GatewayError> {
    let mut options = Map::new();
    for (key, value) in request {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "temperature" | "top_p" | "top_k" | "seed" | "frequency_penalty" | "presence_penalty" => {
                options.insert(key.clone(), value.clone());
            }
            "stop" => {
                options.insert("stop".into(), stop_sequences(value)?);
            }
            "n" if value.as_u64().is_some_and(|n| n > 1) => return Err(unsupported("n", ": they return one choice")),
            "best_of" if value.as_u64().is_some_and(|n| n > 1) => return Err(unsupported("best_of", "")),
            "logprobs" if value != &json!(false) => return Err(unsupported("logprobs", "")),
            "top_logprobs" => return Err(unsupported("top_logprobs", "")),
            "echo" if value == &json!(true) => return Err(unsupported("echo", "")),
            // They change the answer, and Ollama's API has no such setting.
            "reasoning_effort" | "verbosity" => return Err(unsupported(key, "")),
            "response_format" => match value["type"].as_str() {
                Some("json_object") => {
                    out.insert("format".into(), json!("json"));
                }
                Some("json_schema") => {
                    out.insert("format".into(), value["json_schema"]["schema"].clone());
                }
                _ => {}
            },
            _ => {}
        }
    }
    if let Some(max_tokens) = params::max_tokens(request) {
        options.insert("num_predict".into(), max_tokens);
    }
    if !options.is_empty() {
        out.insert("options".into(), Value::Object(options));
    }
    // Ollama streams unless told not to; OpenAI does not unless asked.
    out.insert("stream".into(), json!(request.get("stream").is_some_and(|s| s == true)));
    Ok(())
}

fn chat_request(request: &Map<String, Value>) -> Result<Map<String, Value>, GatewayError> {
    let mut out = Map::new();
    common(request, &mut out)?;
    let messages =
        request.get("messages").and_then(Value::as_array).ok_or_else(|| invalid_type("messages", "an array"))?;
    let mut tool_names = Vec::new();
    let mut translated = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        translated.push(chat_message(message, &format!("messages[{i}]"), &mut tool_names)?);
    }
    out.insert("messages".into(), Value::Array(translated));
    match request.get("tool_choice").filter(|c| !c.is_null()).map(Value::as_str) {
        Some(Some("none")) => return Ok(out),
        None | Some(Some("auto")) => {}
        _ => return Err(unsupported("tool_choice", ": only `auto` and `none` are available")),
    }
    if let Some(tools) = request.get("tools").filter(|t| !t.is_null()) {
        if tools.as_array().is_some_and(|t| t.iter().any(|t| t["type"] != "function")) {
            return Err(unsupported("tools", ": function tools only"));
        }
        out.insert("tools".into(), tools.clone());
    }
    Ok(out)
}

fn chat_message(message: &Value, param: &str, tool_names: &mut Vec<(String, Value)>) -> Result<Value, GatewayError> {
    let role = match message["role"].as_str() {
        Some("developer") => "system",
        Some(role @ ("system" | "user" | "assistant" | "tool")) => role,
        _ => return Err(invalid_role(param)),
    };
    let mut text = String::new();
    let mut images = Vec::new();
    match &message["content"] {
        Value::String(s) => text.push_str(s),
        Value::Null => {}
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                match part["type"].as_str() {
                    Some("text") => text.push_str(part["text"].as_str().unwrap_or_default()),
                    Some("refusal") => text.push_str(part["refusal"].as_str().unwrap_or_default()),
                    Some("image_url") => {
                        images.push(image_data(&part["image_url"]["url"], &format!("{param}.content[{j}]"))?);
                    }
                    other => {
                        return Err(unsupported(
                            &format!("{param}.content[{j}].type"),
                            &format!(": `{}` parts cannot be sent", other.unwrap_or("?")),
                        ))
                    }
                }
            }
        }
        _ => return Err(invalid_type(&format!("{param}.content"), "a string or an array of content parts")),
    }
    let mut out = json!({"role": role, "content": text});
    if !images.is_empty() {
        out["images"] = Value::Array(images);
    }
    if let Some(calls) = message["tool_calls"].as_array() {
        let mut translated = Vec::new();
        for (j, call) in calls.iter().enumerate() {
            let arguments = tool_arguments(call, &format!("{param}.tool_calls[{j}]"))?;
            tool_names.push((call["id"].as_str().unwrap_or_default().to_string(), call["function"]["name"].clone()));
            translated.push(json!({"function": {"name": call["function"]["name"], "arguments": arguments}}));
        }
        out["tool_calls"] = Value::Array(translated);
    }
    if role == "tool" {
        // Ollama names the tool a result is for; OpenAI names the call.
        let id = message["tool_call_id"].as_str().unwrap_or_default();
        if let Some((_, name)) = tool_names.iter().find(|(call, _)| call == id) {
            out["tool_name"] = name.clone();
        }
    }
    Ok(out)
}

/// An image part as Ollama takes it: base64 data, without the data URL's prefix.
fn image_data(url: &Value, param: &str) -> Result<Value, GatewayError> {
    let url = url.as_str().ok_or_else(|| invalid_type(&format!("{param}.image_url.url"), "a string"))?;
    match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
        Some((_, data)) => Ok(json!(data)),
        None => Err(unsupported(&format!("{param}.image_url.url"), ": images must be base64 data URLs")),
    }
}

fn single_text(request: &Map<String, Value>, field: &str) -> Result<Value, GatewayError> {
    match request.get(field) {
        Some(Value::String(text)) => Ok(json!(text)),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => Ok(items[0].clone()),
        _ => Err(unsupported(field, ": one text prompt per request")),
    }
}

fn generate_request(request: &Map<String, Value>) -> Result<Map<String, Value>, GatewayError> {
    let mut out = Map::new();
    common(request, &mut out)?;
    out.insert("prompt".into(), single_text(request, "prompt")?);
    if let Some(suffix) = request.get("suffix").filter(|s| s.is_string()) {
        out.insert("suffix".into(), suffix.clone());
    }
    Ok(out)
}

fn embed_request(request: &Map<String, Value>) -> Result<Map<String, Value>, GatewayError> {
    let input = match request.get("input") {
        Some(Value::String(text)) => json!(text),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Value::Array(items.clone()),
        _ => return Err(unsupported("input", ": text inputs only, not token arrays")),
    };
    let mut out = Map::new();
    out.insert("input".into(), input);
    if let Some(dimensions) = request.get("dimensions").filter(|d| d.is_u64()) {
        out.insert("dimensions".into(), dimensions.clone());
    }
    Ok(out)
}

// ---- responses ----

/// An id for an answer Ollama gives none.
fn new_id(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{:x}", nanos as u64 ^ u64::from(std::process::id()).rotate_left(40))
}

fn usage(answer: &Value) -> Value {
    let prompt = answer["prompt_eval_count"].as_u64().unwrap_or(0);
    let completion = answer["eval_count"].as_u64().unwrap_or(0);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn finish_reason(answer: &Value, has_tool_calls: bool) -> Value {
    match answer["done_reason"].as_str() {
        Some("length") => json!("length"),
        _ if has_tool_calls => json!("tool_calls"),
        _ => json!("stop"),
    }
}

/// A message's tool calls in OpenAI's shape, numbered from `first` (a stream
/// may bring them over several lines; their ids must not repeat).
fn tool_calls(message: &Value, id_prefix: &str, first: usize) -> Vec<Value> {
    message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(first..)
        .map(|(call, i)| {
            json!({"id": format!("call_{id_prefix}_{i}"), "type": "function",
                   "function": {"name": call["function"]["name"], "arguments": call["function"]["arguments"].to_string()}})
        })
        .collect()
}

fn chat_completion(answer: &Value, model: &Value) -> Value {
    let id = new_id("chatcmpl");
    let calls = tool_calls(&answer["message"], &id, 0);
    let mut message = json!({"role": "assistant", "content": answer["message"]["content"], "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls.clone());
    }
    json!({"id": id, "object": "chat.completion", "created": clock::unix_seconds(), "model": model,
           "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(answer, !calls.is_empty())}],
           "usage": usage(answer)})
}

fn text_completion(answer: &Value, model: &Value) -> Value {
    json!({"id": new_id("cmpl"), "object": "text_completion", "created": clock::unix_seconds(), "model": model,
           "choices": [{"index": 0, "text": answer["response"], "logprobs": null, "finish_reason": finish_reason(answer, false)}],
           "usage": usage(answer)})
}

fn embeddings(answer: &Value, model: &Value, base64: bool) -> Value {
    let data: Vec<Value> = answer["embeddings"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|x| (x.as_f64().unwrap_or(0.0) as f32).to_le_bytes())
                    .collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                vector.clone()
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let prompt = answer["prompt_eval_count"].as_u64().unwrap_or(0);
    json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
}

fn openai_error(status: u16, message: &str) -> GatewayError {
    GatewayError::from_backend(status, ErrorType::for_status(status), None, message.to_string())
}

/// Turns Ollama's NDJSON answer lines into OpenAI chunks, line by line.
struct ChunkWriter {
    endpoint: Endpoint,
    head: StreamHead,
    started: bool,
    tool_calls: usize,
}

impl ChunkWriter {
    fn new(context: &ResponseContext) -> Self {
        let endpoint = context.endpoint;
        let (prefix, object) = match endpoint {
            Endpoint::ChatCompletions => ("chatcmpl", "chat.completion.chunk"),
            _ => ("cmpl", "text_completion"),
        };
        let head = StreamHead::new(object, json!(new_id(prefix)), context.model.clone(), context.include_usage);
        ChunkWriter { endpoint, head, started: false, tool_calls: 0 }
    }
}

impl RecordTranslator for ChunkWriter {
    fn translate(&mut self, answer: &Value, _: &[u8], out: &mut Vec<u8>) {
        if let Some(message) = answer["error"].as_str() {
            out.extend_from_slice(&error_event(&openai_error(502, message)));
            return;
        }
        let done = answer["done"] == true;
        match self.endpoint {
            Endpoint::ChatCompletions => {
                if !self.started {
                    self.started = true;
                    let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    self.head.write_choice(out, choice);
                }
                let message = &answer["message"];
                if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
                    let choice =
                        json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null});
                    self.head.write_choice(out, choice);
                }
                let mut calls = tool_calls(message, self.head.id().as_str().unwrap_or_default(), self.tool_calls);
                if !calls.is_empty() {
                    for call in &mut calls {
                        call["index"] = json!(self.tool_calls);
                        self.tool_calls += 1;
                    }
                    let choice =
                        json!({"index": 0, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null});
                    self.head.write_choice(out, choice);
                }
                if done {
                    let finish = finish_reason(answer, self.tool_calls > 0);
                    self.head
                        .write_choice(out, json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}));
                }
            }
            _ => {
                let text = answer["response"].as_str().unwrap_or_default();
                let finish = if done { finish_reason(answer, false) } else { Value::Null };
                if !text.is_empty() || done {
                    self.head.write_choice(
                        out,
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
                    );
                }
            }
        }
        if done {
            self.head.write_end(out, usage(answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::testing::{chunks, deltas, feed};
    use proptest::prelude::*;

    fn translation(endpoint: Endpoint) -> OllamaRequest {
        OllamaRequest::new(BackendProfile::default(), endpoint).unwrap()
    }

    /// The answer's translation for the request `body` to `endpoint`.
    fn answering(endpoint: Endpoint, body: &[u8]) -> OllamaAnswer {
        let mut t = translation(endpoint);
        t.request(body).unwrap();
        OllamaAnswer::new(&t.response_context().unwrap())
    }

    fn request(endpoint: Endpoint, body: Value) -> Result<(String, Value), GatewayError> {
        let upstream = translation(endpoint).request(body.to_string().as_bytes())?;
        Ok((upstream.path.unwrap(), serde_json::from_slice(&upstream.body.unwrap()).unwrap()))
    }

    #[test]
    fn a_chat_maps_options_images_and_tools() {
        let (path, out) = request(Endpoint::ChatCompletions, json!({
            "model": "llama3.2", "max_tokens": 5, "temperature": 0.1, "top_p": 0.8, "top_k": 20, "seed": 3, "stop": "END",
            "response_format": {"type": "json_object"}, "user": "dropped",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "a cat"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
        }))
        .unwrap();
        assert_eq!(path, "/api/chat");
        assert_eq!(
            out,
            json!({
                "model": "llama3.2", "stream": false, "format": "json",
                "options": {"num_predict": 5, "temperature": 0.1, "top_p": 0.8, "top_k": 20, "seed": 3, "stop": ["END"]},
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is this?", "images": ["QUJD"]},
                    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "look", "arguments": {"zoom": 2}}}]},
                    {"role": "tool", "content": "a cat", "tool_name": "look"}
                ],
                "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
            })
        );
    }

    #[test]
    fn completions_and_embeddings_map_to_generate_and_embed() {
        let (path, out) = request(
            Endpoint::Completions,
            json!({"model": "m", "prompt": ["one two"], "max_completion_tokens": 2, "stream": true}),
        )
        .unwrap();
        assert_eq!(
            (path.as_str(), out),
            (
                "/api/generate",
                json!({"model": "m", "prompt": "one two", "stream": true, "options": {"num_predict": 2}})
            )
        );
        let (path, out) =
            request(Endpoint::Embeddings, json!({"model": "m", "input": ["a", "b"], "dimensions": 8})).unwrap();
        assert_eq!((path.as_str(), out), ("/api/embed", json!({"model": "m", "input": ["a", "b"], "dimensions": 8})));
    }

    #[test]
    fn defaults_fill_gaps_and_merge_options() {
        let profile = BackendProfile {
            model: Some("qwen3:8b".into()),
            defaults: json!({"keep_alive": "10m", "options": {"num_ctx": 8192, "temperature": 0.7}})
                .as_object()
                .cloned()
                .unwrap(),
            ..Default::default()
        };
        let mut t = OllamaRequest::new(profile, Endpoint::ChatCompletions).unwrap();
        let upstream = t.request(br#"{"model":"m","messages":[],"temperature":0.2}"#).unwrap();
        let out: Value = serde_json::from_slice(&upstream.body.unwrap()).unwrap();
        assert_eq!(out["model"], "qwen3:8b");
        assert_eq!(out["keep_alive"], "10m");
        assert_eq!(out["options"], json!({"temperature": 0.2, "num_ctx": 8192}));
    }

    #[test]
    fn what_ollama_cannot_honour_is_refused_by_name() {
        for (endpoint, body, param) in [
            (Endpoint::ChatCompletions, json!({"messages": [], "n": 3}), "n"),
            (Endpoint::ChatCompletions, json!({"messages": [], "logprobs": true}), "logprobs"),
            (Endpoint::ChatCompletions, json!({"messages": [], "tool_choice": "required"}), "tool_choice"),
            (
                Endpoint::ChatCompletions,
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                "messages[0].content[0].image_url.url",
            ),
            (Endpoint::Completions, json!({"prompt": ["a", "b"]}), "prompt"),
            (Endpoint::Completions, json!({"prompt": "a", "echo": true}), "echo"),
            (Endpoint::Embeddings, json!({"input": [[1, 2]]}), "input"),
        ] {
            let mut body = body;
            body["model"] = json!("m");
            let e = request(endpoint, body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{}", e.message);
        }
    }

    #[test]
    fn whole_answers_become_openai_objects() {
        let mut chat = answering(Endpoint::ChatCompletions, br#"{"model":"client-name","messages":[]}"#);
        assert!(!chat.plan(200, b"application/json; charset=utf-8").streamed);
        let answer = json!({"model": "llama3.2", "created_at": "x", "done": true, "done_reason": "stop",
            "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "look", "arguments": {"zoom": 2}}}]},
            "prompt_eval_count": 7, "eval_count": 3});
        let out: Value = serde_json::from_slice(&chat.whole(200, answer.to_string().as_bytes())).unwrap();
        assert_eq!(out["model"], "client-name");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"],
            json!({"name": "look", "arguments": "{\"zoom\":2}"})
        );
        assert_eq!(out["usage"], json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}));

        let mut embed = answering(Endpoint::Embeddings, br#"{"model":"e","input":"a","encoding_format":"base64"}"#);
        let out: Value =
            serde_json::from_slice(&embed.whole(200, br#"{"embeddings":[[1.0,-0.5]],"prompt_eval_count":1}"#)).unwrap();
        let expected: Vec<u8> = [1.0f32, -0.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(out["data"][0]["embedding"], json!(base64::engine::general_purpose::STANDARD.encode(expected)));
        assert_eq!(out["usage"], json!({"prompt_tokens": 1, "total_tokens": 1}));

        let error: Value = serde_json::from_slice(&chat.whole(404, br#"{"error":"model \"x\" not found"}"#)).unwrap();
        assert_eq!(error["error"]["message"], "model \"x\" not found");
        assert_eq!(error["error"]["type"], "not_found_error");
    }

    const STREAM: &str = concat!(
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"done\":false}\n",
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\" there\"},\"done\":false}\n",
        "{\"model\":\"m\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"length\",\"prompt_eval_count\":4,\"eval_count\":2}\n",
    );

    fn streamed(endpoint: Endpoint, pieces: &[&[u8]], include_usage: bool) -> String {
        let mut context = ResponseContext::new(Dialect::Ollama, endpoint);
        context.include_usage = include_usage;
        let mut t = OllamaAnswer::new(&context);
        assert_eq!(t.plan(200, b"application/x-ndjson").content_type, Some("text/event-stream"));
        feed(&mut t, pieces)
    }

    #[test]
    fn a_chat_stream_becomes_chunks_with_role_finish_and_usage() {
        let out = streamed(Endpoint::ChatCompletions, &[STREAM.as_bytes()], true);
        assert!(out.ends_with("data: [DONE]\n\n"));
        let chunks = chunks(&out);
        assert_eq!(
            deltas(&chunks),
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hello"}),
                &json!({"content": " there"}),
                &json!({})
            ]
        );
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[4]["usage"], json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}));
        assert!(!streamed(Endpoint::ChatCompletions, &[STREAM.as_bytes()], false).contains("usage"));
    }

    #[test]
    fn a_generate_stream_becomes_text_completion_chunks() {
        let stream = STREAM
            .replace("\"message\":{\"role\":\"assistant\",\"content\":", "\"response\":")
            .replace("},\"done\"", ",\"done\"");
        let chunks = chunks(&streamed(Endpoint::Completions, &[stream.as_bytes()], false));
        let texts: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["text"]).collect();
        assert_eq!(texts, [&json!("Hello"), &json!(" there"), &json!("")]);
        assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    }

    #[test]
    fn every_split_gives_the_same_chunks() {
        let whole = chunks(&streamed(Endpoint::ChatCompletions, &[STREAM.as_bytes()], true));
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let split = chunks(&streamed(Endpoint::ChatCompletions, &[&bytes[..cut], &bytes[cut..]], true));
            let strip =
                |c: &Vec<Value>| c.iter().map(|c| (c["choices"].clone(), c["usage"].clone())).collect::<Vec<_>>();
            assert_eq!(strip(&split), strip(&whole), "cut at {cut}");
        }
    }

    #[test]
    fn tool_calls_over_several_lines_keep_distinct_ids_and_indexes() {
        let call = |name: &str| {
            format!("{{\"message\":{{\"content\":\"\",\"tool_calls\":[{{\"function\":{{\"name\":\"{name}\",\"arguments\":{{}}}}}}]}},\"done\":false}}\n")
        };
        let stream = format!("{}{}", call("a"), call("b"));
        let chunks = chunks(&streamed(Endpoint::ChatCompletions, &[stream.as_bytes()], false));
        let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0)).collect();
        assert_eq!((calls.len(), &calls[0]["index"], &calls[1]["index"]), (2, &json!(0), &json!(1)));
        assert_ne!(calls[0]["id"], calls[1]["id"]);
    }

    #[test]
    fn an_error_line_ends_the_stream_with_an_openai_error_event() {
        let out = streamed(
            Endpoint::ChatCompletions,
            &[b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"error\":\"out of memory\"}\n"],
            false,
        );
        let last = chunks(&out).pop().unwrap();
        assert_eq!(last["error"]["message"], "out of memory");
        assert!(!out.contains("[DONE]"));
    }

    #[test]
    fn a_line_that_is_not_json_ends_the_stream_with_an_error_event_not_a_silent_skip() {
        let out = streamed(
            Endpoint::ChatCompletions,
            &[
                b"{\"message\":{\"content\":\"a\"},\"done\":false}\n\n{\"message\":{\"tool_calls\":[{\"functi\n",
                b"{\"message\":{\"content\":\"b\"},\"done\":true}\n",
            ],
            false,
        );
        let chunks = chunks(&out);
        assert_eq!(deltas(&chunks).last().unwrap()["content"], "a", "nothing after the unreadable line: {out}");
        assert_eq!(chunks.last().unwrap()["error"]["code"], "stream_unreadable");
        assert!(!out.contains("[DONE]") && !out.contains("finish_reason\":\"stop"), "{out}");
    }

    #[test]
    fn a_tool_call_line_over_the_limit_ends_the_stream_with_an_error_event() {
        let call = format!(
            "{{\"message\":{{\"tool_calls\":[{{\"function\":{{\"name\":\"write\",\"arguments\":{{\"text\":\"{}\"}}}}}}]}},\"done\":false}}\n",
            "x".repeat(200)
        );
        let done = "{\"message\":{\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\"}\n";
        let translate = |max_event_bytes: usize| {
            let mut context = ResponseContext::new(Dialect::Ollama, Endpoint::ChatCompletions);
            context.max_event_bytes = max_event_bytes;
            let mut t = OllamaAnswer::new(&context);
            t.plan(200, b"application/x-ndjson");
            let pieces: Vec<&[u8]> = call.as_bytes().chunks(64).chain([done.as_bytes()]).collect();
            feed(&mut t, &pieces)
        };
        // The limit is on the line without its newline.
        let whole = translate(call.len() - 1);
        assert_eq!(
            chunks(&whole).iter().rev().find(|c| c["choices"].get(0).is_some()).unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
        let cut = translate(call.len() / 2);
        let chunks = chunks(&cut);
        assert!(deltas(&chunks).iter().all(|d| d.get("tool_calls").is_none()), "{cut}");
        assert_eq!(chunks.last().unwrap()["error"]["code"], "stream_event_too_large");
        assert!(!cut.contains("[DONE]") && !cut.contains("finish_reason\":\"stop"), "{cut}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
                let _ = translation(endpoint).request(&body);
                let mut t = OllamaAnswer::new(&ResponseContext::new(Dialect::Ollama, endpoint));
                t.plan(200, b"application/x-ndjson");
                let _ = t.stream(&body, false);
                let _ = t.whole(200, &body);
            }
        }
    }
}
