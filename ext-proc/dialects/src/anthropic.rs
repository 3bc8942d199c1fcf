//! Anthropic's Messages API behind OpenAI's chat completions.
//!
//! Requests: system and developer messages become `system`; user, assistant
//! and tool messages become alternating user/assistant turns, with
//! `tool_calls` as `tool_use` blocks and tool messages as `tool_result`
//! blocks; image parts become image blocks (base64 data URLs or URLs).
//! Parameters map where Anthropic has them; the ones it cannot honour are
//! refused with a 400 naming them, and the ones that change nothing a client
//! can observe are dropped (see docs/compatibility.md).
//!
//! Responses: a message becomes a `chat.completion`; its events become
//! `chat.completion.chunk`s as each arrives, with the role on the first, tool
//! input as `tool_calls` argument deltas, a usage chunk when asked for, and
//! `data: [DONE]`. Anthropic errors, whole or in-stream, become OpenAI errors.
//!
//! Anthropic's own Messages API (`/v1/messages`, `/v1/messages/count_tokens`)
//! passes through: only the model's name, the backend's defaults (never for
//! `count_tokens`) and the key change, and the answer is the client's as it is.

use crate::dialect::{
    BackendRequest, Credential, HeaderChanges, KeyHeader, RequestTranslator, ResponseContext, ResponsePlan,
    ResponseTranslator,
};
use crate::openai;
use crate::params::{self, invalid_role, invalid_type, stop_sequences, tool_arguments};
use crate::stream::{self, RecordStream, RecordTranslator, StreamHead};
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::clock;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::{ErrorCode, ErrorType, GatewayError};
use modelgate_proto::framing::{self, error_event, Framing};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::borrow::Cow;

/// The Messages API version requests are made with.
pub const API_VERSION: &str = "2023-06-01";

/// Anthropic requires `max_tokens`; this is used when neither the client nor
/// the backend's `defaults` set one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// An OpenAI chat completion request as a Messages API request, or a
/// Messages API request passed through.
pub struct AnthropicRequest {
    profile: BackendProfile,
    /// The client speaks Anthropic's API itself: nothing is translated.
    native: bool,
    include_usage: bool,
}

impl AnthropicRequest {
    pub fn new(mut profile: BackendProfile, endpoint: Endpoint) -> Result<Self, GatewayError> {
        let native = match endpoint {
            Endpoint::ChatCompletions => false,
            Endpoint::Messages => true,
            Endpoint::CountTokens => {
                // Counting takes no generation parameters: `max_tokens` there is refused.
                profile.defaults.clear();
                true
            }
            other => return Err(GatewayError::unsupported_endpoint(other.path(), "an Anthropic")),
        };
        Ok(AnthropicRequest { profile, native, include_usage: false })
    }
}

impl RequestTranslator for AnthropicRequest {
    fn request(&mut self, body: &[u8]) -> Result<BackendRequest, GatewayError> {
        if self.native {
            let unchanged = self.profile.model.is_none() && self.profile.defaults.is_empty();
            let body = if unchanged {
                None
            } else {
                Some(openai::rewrite(body, &self.profile).map_err(|e| GatewayError::unparsable_json(&e))?)
            };
            return Ok(BackendRequest { path: None, body });
        }
        let request: Map<String, Value> =
            serde_json::from_slice(body).map_err(|e| GatewayError::unparsable_json(&e))?;
        let (messages_request, include_usage) = messages_request(request, &self.profile)?;
        self.include_usage = include_usage;
        Ok(BackendRequest {
            path: Some("/v1/messages".to_string()),
            body: Some(messages_request.to_string().into_bytes()),
        })
    }

    fn response_context(&self) -> Option<ResponseContext> {
        if self.native {
            return None;
        }
        let mut context = ResponseContext::new(Dialect::Anthropic, Endpoint::ChatCompletions);
        context.include_usage = self.include_usage;
        Some(context)
    }

    fn headers(&self) -> HeaderChanges {
        // A passed-through client key now travels as x-api-key; no bearer token goes on.
        // Translated answers must come uncompressed. The client's `anthropic-beta` passes.
        let mut remove = vec!["authorization"];
        if !self.native {
            remove.push("accept-encoding");
        }
        HeaderChanges { set: vec![("anthropic-version", API_VERSION.to_string())], remove }
    }

    fn credential(&self, secret: String) -> Box<dyn Credential> {
        Box::new(KeyHeader { name: "x-api-key", key: secret })
    }
}

/// A Messages API answer, whole or streamed, as OpenAI's.
pub struct AnthropicAnswer {
    include_usage: bool,
    max_event_bytes: usize,
    stream: Option<RecordStream<ChunkWriter>>,
}

impl AnthropicAnswer {
    pub fn new(context: &ResponseContext) -> Self {
        AnthropicAnswer { include_usage: context.include_usage, max_event_bytes: context.max_event_bytes, stream: None }
    }
}

impl ResponseTranslator for AnthropicAnswer {
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan {
        let mut plan = stream::plan(status, content_type, Framing::Sse);
        if plan.streamed {
            let writer = ChunkWriter::new(self.include_usage);
            self.stream = Some(RecordStream::new(Framing::Sse, self.max_event_bytes, writer));
        }
        plan.status = ClientApi::Openai.answer_status(status);
        plan
    }

    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8> {
        // A body that is not Anthropic's (a proxy's page, say) passes as it came: the filter's
        // error normaliser takes it from here.
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<Message>(body) {
                Ok(message) => chat_completion(&message),
                Err(_) => body.to_vec(),
            };
        }
        match serde_json::from_slice::<Value>(body).ok().and_then(|parsed| openai_error(status, &parsed)) {
            Some(error) => error.to_json(),
            None => body.to_vec(),
        }
    }

    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        stream::push(&mut self.stream, piece, end)
    }

    fn ended(&self) -> bool {
        self.stream.as_ref().is_some_and(RecordStream::ended)
    }
}

// ---- requests ----

fn messages_request(request: Map<String, Value>, profile: &BackendProfile) -> Result<(Value, bool), GatewayError> {
    let mut out = Map::new();
    let mut include_usage = false;
    let max_tokens = params::max_tokens(&request);
    let mut parallel_tool_calls = None;
    for (key, value) in request {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "model" => {
                out.insert("model".into(), value);
            }
            "messages" => {
                let (system, messages) = messages(&value)?;
                if !system.is_empty() {
                    out.insert("system".into(), Value::String(system.join("\n\n")));
                }
                out.insert("messages".into(), Value::Array(messages));
            }
            // `top_k` is not OpenAI's, but vLLM's, and a chat completion made from a Messages request carries it.
            "temperature" | "top_p" | "top_k" | "stream" => {
                out.insert(key, value);
            }
            "stop" => {
                out.insert("stop_sequences".into(), stop_sequences(&value)?);
            }
            "stream_options" => include_usage = value["include_usage"].as_bool() == Some(true),
            "user" => {
                out.insert("metadata".into(), json!({ "user_id": value }));
            }
            "tools" => {
                out.insert("tools".into(), tools(&value)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".into(), tool_choice(&value)?);
            }
            "parallel_tool_calls" => parallel_tool_calls = value.as_bool(),
            "n" if value.as_u64().is_some_and(|n| n > 1) => {
                return Err(GatewayError::unsupported_parameter("n", "with Anthropic models: they return one choice"));
            }
            "logprobs" if value.as_bool() == Some(true) => {
                return Err(GatewayError::unsupported_parameter("logprobs", "with Anthropic models"));
            }
            "top_logprobs" => return Err(GatewayError::unsupported_parameter("top_logprobs", "with Anthropic models")),
            "response_format" if value["type"] != "text" => {
                return Err(GatewayError::unsupported_parameter(
                    "response_format",
                    "with Anthropic models: only `text` is available",
                ));
            }
            "functions" | "function_call" => {
                return Err(GatewayError::unsupported_parameter(&key, "(deprecated): use `tools` and `tool_choice`"));
            }
            "audio" => return Err(GatewayError::unsupported_parameter("audio", "with Anthropic models")),
            // They change the answer, and Anthropic's API has no such setting.
            "reasoning_effort" | "verbosity" => {
                return Err(GatewayError::unsupported_parameter(&key, "with Anthropic models"))
            }
            "modalities" if value.as_array().is_some_and(|m| m.iter().any(|m| m == "audio")) => {
                return Err(GatewayError::unsupported_parameter("modalities", "with Anthropic models: text only"));
            }
            // Everything else (penalties, seed, logit_bias, service_tier, store, metadata and
            // parameters newer than this gateway) has no Anthropic counterpart and is dropped.
            _ => {}
        }
    }
    // The backend's name for the model, whatever the client named (or left out).
    if let Some(model) = &profile.model {
        out.insert("model".into(), Value::String(model.clone()));
    }
    let max_tokens = max_tokens.or_else(|| profile.defaults.get("max_tokens").cloned());
    out.insert("max_tokens".into(), max_tokens.unwrap_or(json!(DEFAULT_MAX_TOKENS)));
    if parallel_tool_calls == Some(false) && out.contains_key("tools") {
        let choice = out.entry("tool_choice").or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = json!(true);
    }
    for (key, value) in &profile.defaults {
        out.entry(key.clone()).or_insert_with(|| value.clone());
    }
    Ok((Value::Object(out), include_usage))
}

/// The system prompt parts, and the conversation as Anthropic turns.
fn messages(value: &Value) -> Result<(Vec<String>, Vec<Value>), GatewayError> {
    let list = value.as_array().ok_or_else(|| invalid_type("messages", "an array"))?;
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    for (i, message) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let content = &message["content"];
        let (role, blocks) = match message["role"].as_str() {
            Some("system" | "developer") => {
                system.push(plain_text(content, &param)?);
                continue;
            }
            Some("user") => ("user", user_blocks(content, &param)?),
            Some("assistant") => ("assistant", assistant_blocks(message, &param)?),
            Some("tool") => {
                let id = message["tool_call_id"].as_str().ok_or_else(|| {
                    GatewayError::invalid_value(
                        &format!("{param}.tool_call_id"),
                        "A tool message needs its tool_call_id.".into(),
                    )
                })?;
                let result = json!({"type": "tool_result", "tool_use_id": id, "content": plain_text(content, &param)?});
                ("user", vec![result])
            }
            _ => return Err(invalid_role(&param)),
        };
        if blocks.is_empty() {
            continue;
        }
        // Anthropic turns alternate: consecutive messages of one role are one turn.
        match turns.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(existing) = last["content"].as_array_mut() {
                    existing.extend(blocks);
                }
            }
            _ => turns.push(json!({"role": role, "content": blocks})),
        }
    }
    Ok((system, turns))
}

/// The text of a content that may only hold text: a string, or text parts.
fn plain_text(content: &Value, param: &str) -> Result<String, GatewayError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part["type"].as_str() {
                Some("text") => Ok(part["text"].as_str().unwrap_or_default()),
                _ => Err(GatewayError::invalid_value(
                    &format!("{param}.content"),
                    "Only text parts are allowed here.".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("")),
        _ => Err(invalid_type(&format!("{param}.content"), "a string or an array of content parts")),
    }
}

fn text_block(text: &str) -> Option<Value> {
    // Anthropic refuses empty text blocks.
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

fn user_blocks(content: &Value, param: &str) -> Result<Vec<Value>, GatewayError> {
    let Value::Array(parts) = content else {
        return Ok(text_block(&plain_text(content, param)?).into_iter().collect());
    };
    let mut blocks = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let part_param = format!("{param}.content[{j}]");
        match part["type"].as_str() {
            Some("text") => blocks.extend(text_block(part["text"].as_str().unwrap_or_default())),
            Some("image_url") => blocks.push(image_block(&part["image_url"]["url"], &part_param)?),
            other => {
                return Err(GatewayError::unsupported_parameter(
                    &format!("{part_param}.type"),
                    &format!("`{}` with Anthropic models: text and image parts only", other.unwrap_or("?")),
                ))
            }
        }
    }
    Ok(blocks)
}

/// An image part: a `data:` URL becomes base64 data, any other URL is passed as a URL.
fn image_block(url: &Value, param: &str) -> Result<Value, GatewayError> {
    let url = url.as_str().ok_or_else(|| invalid_type(&format!("{param}.image_url.url"), "a string"))?;
    let source = match url.strip_prefix("data:") {
        Some(data_url) => {
            let (media_type, data) = data_url.split_once(";base64,").ok_or_else(|| {
                GatewayError::invalid_value(&format!("{param}.image_url.url"), "Image data URLs must be base64.".into())
            })?;
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        None => json!({"type": "url", "url": url}),
    };
    Ok(json!({"type": "image", "source": source}))
}

fn assistant_blocks(message: &Value, param: &str) -> Result<Vec<Value>, GatewayError> {
    let content = match &message["content"] {
        // An assistant's refusal parts are its text.
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str().or(p["refusal"].as_str())).collect(),
        other => plain_text(other, param)?,
    };
    let mut blocks: Vec<Value> = text_block(&content).into_iter().collect();
    for (j, call) in message["tool_calls"].as_array().into_iter().flatten().enumerate() {
        let input = tool_arguments(call, &format!("{param}.tool_calls[{j}]"))?;
        blocks.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    Ok(blocks)
}

fn tools(value: &Value) -> Result<Value, GatewayError> {
    let list = value.as_array().ok_or_else(|| invalid_type("tools", "an array"))?;
    let tools = list
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool["type"] != "function" {
                return Err(GatewayError::unsupported_parameter(
                    &format!("tools[{i}].type"),
                    "with Anthropic models: function tools only",
                ));
            }
            let function = &tool["function"];
            let mut out = json!({"name": function["name"], "input_schema": function["parameters"]});
            if out["input_schema"].is_null() {
                out["input_schema"] = json!({"type": "object", "properties": {}});
            }
            if let Some(description) = function["description"].as_str() {
                out["description"] = json!(description);
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(tools))
}

fn tool_choice(value: &Value) -> Result<Value, GatewayError> {
    Ok(match value {
        Value::String(mode) => match mode.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            _ => {
                return Err(GatewayError::invalid_value(
                    "tool_choice",
                    format!("Invalid value for 'tool_choice': `{mode}`."),
                ))
            }
        },
        Value::Object(choice) if choice.get("type") == Some(&json!("function")) => {
            json!({"type": "tool", "name": choice.get("function").map_or(&Value::Null, |f| &f["name"])})
        }
        _ => return Err(invalid_type("tool_choice", "`none`, `auto`, `required` or a function choice")),
    })
}

// ---- responses ----

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    match stop_reason? {
        "end_turn" | "stop_sequence" | "pause_turn" => Some("stop"),
        "max_tokens" | "model_context_window_exceeded" => Some("length"),
        "tool_use" => Some("tool_calls"),
        "refusal" => Some("content_filter"),
        _ => Some("stop"),
    }
}

/// Anthropic's token counts: a whole message's, or a stream's gathered from its events.
#[derive(Deserialize, Default)]
struct MessageUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// OpenAI's `usage` of a chat completion.
#[derive(Serialize)]
struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedTokens,
}

#[derive(Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

impl MessageUsage {
    /// OpenAI's usage: Anthropic's `input_tokens` leaves out cached tokens, which OpenAI's prompt counts.
    fn chat(&self) -> ChatUsage {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let prompt = self.input_tokens.unwrap_or(0) + cached + self.cache_creation_input_tokens.unwrap_or(0);
        let completion = self.output_tokens.unwrap_or(0);
        ChatUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: CachedTokens { cached_tokens: cached },
        }
    }
}

/// As much of a whole Messages API answer as a chat completion needs, read in
/// place: the rest of it is skipped unread, and what is passed on as it is
/// (`id`, `model`, a tool's `input`) is copied as the backend wrote it.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<Vec<Block<'a>>>,
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
    usage: Option<MessageUsage>,
}

/// One content block of a message: text, a tool call, or one a chat completion has no place for.
#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
}

impl Block<'_> {
    fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: Option<&'a RawValue>,
    object: &'static str,
    created: u64,
    model: Option<&'a RawValue>,
    choices: [Choice<'a>; 1],
    usage: ChatUsage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Reply<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Reply<'a> {
    role: &'static str,
    content: Option<String>,
    refusal: (),
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall<'a>>,
}

#[derive(Serialize)]
struct ToolCall<'a> {
    id: Option<&'a RawValue>,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Serialize)]
struct Function<'a> {
    name: Option<&'a RawValue>,
    arguments: &'a str,
}

/// A `tool_use` block as an OpenAI tool call, its input as the arguments' JSON text.
fn tool_call<'a>(block: &Block<'a>) -> ToolCall<'a> {
    ToolCall {
        id: block.id,
        kind: "function",
        function: Function { name: block.name, arguments: block.input.map_or("null", RawValue::get) },
    }
}

/// A whole Messages API answer as a `chat.completion`.
fn chat_completion(message: &Message) -> Vec<u8> {
    let blocks = message.content.as_deref().unwrap_or_default();
    let text: String = blocks.iter().filter(|b| b.is("text")).filter_map(|b| b.text.as_deref()).collect();
    let tool_calls: Vec<ToolCall> = blocks.iter().filter(|b| b.is("tool_use")).map(tool_call).collect();
    let content = if text.is_empty() && !tool_calls.is_empty() { None } else { Some(text) };
    let completion = ChatCompletion {
        id: message.id,
        object: "chat.completion",
        created: clock::unix_seconds(),
        model: message.model,
        choices: [Choice {
            index: 0,
            message: Reply { role: "assistant", content, refusal: (), tool_calls },
            logprobs: (),
            finish_reason: finish_reason(message.stop_reason.as_deref()),
        }],
        usage: message.usage.as_ref().map(MessageUsage::chat).unwrap_or_else(|| MessageUsage::default().chat()),
    };
    // Serializing these types into a Vec cannot fail.
    serde_json::to_vec(&completion).unwrap_or_default()
}

/// An Anthropic error object (`{"type":"error","error":{...}}`) as an OpenAI error.
fn openai_error(status: u16, body: &Value) -> Option<GatewayError> {
    let error = body.get("error").filter(|e| e.is_object())?;
    let message = error["message"].as_str().unwrap_or("The backend reported an error.").to_string();
    // Anthropic's types, on the left, are its own words.
    let (kind, code) = match error["type"].as_str().unwrap_or_default() {
        "invalid_request_error" | "request_too_large" => (ErrorType::InvalidRequest, None),
        "authentication_error" => (ErrorType::Authentication, None),
        "permission_error" => (ErrorType::Permission, None),
        "not_found_error" => (ErrorType::NotFound, None),
        "rate_limit_error" => (ErrorType::RateLimit, Some(ErrorCode::RateLimitExceeded)),
        "overloaded_error" => (ErrorType::Server, Some(ErrorCode::Overloaded)),
        _ => (ErrorType::Server, None),
    };
    Some(GatewayError::from_backend(status, kind, code, message))
}

/// Turns Anthropic's stream into OpenAI chunks, event by event.
struct ChunkWriter {
    head: StreamHead,
    /// The OpenAI tool call index of each Anthropic content block that is a tool call.
    tool_indexes: Vec<(u64, usize)>,
    usage: Value,
}

impl ChunkWriter {
    fn new(include_usage: bool) -> Self {
        ChunkWriter {
            head: StreamHead::new("chat.completion.chunk", Value::Null, Value::Null, include_usage),
            tool_indexes: Vec::new(),
            usage: json!({}),
        }
    }

    fn delta(&self, out: &mut Vec<u8>, delta: Value, finish_reason: Value) {
        self.head
            .write_choice(out, json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}));
    }

    fn translate_event(&mut self, data: &Value, out: &mut Vec<u8>) {
        match data["type"].as_str() {
            Some("message_start") => {
                let message = &data["message"];
                self.head.identify(message["id"].clone(), message["model"].clone());
                // An object, whatever the backend sent: message_delta adds its output tokens to it.
                self.usage = Value::Object(message["usage"].as_object().cloned().unwrap_or_default());
                self.delta(out, json!({"role": "assistant", "content": ""}), Value::Null);
            }
            Some("content_block_start") if data["content_block"]["type"] == "tool_use" => {
                let block = &data["content_block"];
                let index = self.tool_indexes.len();
                self.tool_indexes.push((data["index"].as_u64().unwrap_or(0), index));
                let call = json!({"index": index, "id": block["id"], "type": "function",
                                  "function": {"name": block["name"], "arguments": ""}});
                self.delta(out, json!({"tool_calls": [call]}), Value::Null);
            }
            Some("content_block_delta") => {
                let delta = &data["delta"];
                let content = match delta["type"].as_str() {
                    Some("text_delta") => json!({"content": delta["text"]}),
                    Some("input_json_delta") => {
                        let block = data["index"].as_u64().unwrap_or(0);
                        let Some(&(_, index)) = self.tool_indexes.iter().find(|(b, _)| *b == block) else { return };
                        json!({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]})
                    }
                    // Thinking and signatures have no place in a chat completion.
                    _ => return,
                };
                self.delta(out, content, Value::Null);
            }
            Some("message_delta") => {
                if let Some(output) = data["usage"]["output_tokens"].as_u64() {
                    self.usage["output_tokens"] = json!(output);
                }
                self.delta(out, json!({}), json!(finish_reason(data["delta"]["stop_reason"].as_str())));
            }
            Some("message_stop") => {
                let usage = MessageUsage::deserialize(&self.usage).unwrap_or_default();
                self.head.write_end(out, usage.chat());
            }
            Some("error") => {
                if let Some(error) = openai_error(503, data) {
                    out.extend_from_slice(&error_event(&error));
                }
            }
            _ => {}
        }
    }
}

impl RecordTranslator for ChunkWriter {
    fn translate(&mut self, data: &Value, raw: &[u8], out: &mut Vec<u8>) {
        if data.get("type").is_none() && data.get("error").is_some() {
            // The stream guard's error event: already OpenAI's, passed on byte for byte
            // unless it came over several data lines, which one `data:` line cannot hold.
            if raw.contains(&b'\n') {
                framing::write_data(out, data.to_string().as_bytes());
            } else {
                framing::write_data(out, raw);
            }
        } else {
            self.translate_event(data, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::testing::{chunks, deltas, feed};
    use proptest::prelude::*;

    fn translate(request: Value) -> Result<Value, GatewayError> {
        translate_with(request, BackendProfile::default())
    }

    fn translate_with(request: Value, profile: BackendProfile) -> Result<Value, GatewayError> {
        let mut t = AnthropicRequest::new(profile, Endpoint::ChatCompletions)?;
        let upstream = t.request(request.to_string().as_bytes())?;
        assert_eq!(upstream.path.as_deref(), Some("/v1/messages"));
        Ok(serde_json::from_slice(&upstream.body.unwrap()).unwrap())
    }

    #[test]
    fn a_conversation_with_system_images_and_tools_maps_across() {
        let out = translate(json!({
            "model": "claude-x", "max_completion_tokens": 300, "max_tokens": 5, "temperature": 0.3, "top_p": 0.9, "top_k": 7,
            "stop": "END", "user": "u-1", "stream": true, "stream_options": {"include_usage": true},
            "frequency_penalty": 0.5, "seed": 7,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look closer",
                                                        "parameters": {"type": "object", "properties": {"zoom": {"type": "integer"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x", "max_tokens": 300, "temperature": 0.3, "top_p": 0.9, "top_k": 7, "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"}, "stream": true,
                "system": "Be brief.\n\nUse tools.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "look", "input": {"zoom": 2}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                        {"type": "text", "text": "Thanks"}]}
                ],
                "tools": [{"name": "look", "description": "Look closer",
                           "input_schema": {"type": "object", "properties": {"zoom": {"type": "integer"}}}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
            })
        );
    }

    #[test]
    fn anthropics_own_api_passes_through_renamed_with_defaults_but_counting_takes_none() {
        let profile = BackendProfile {
            model: Some("claude-y".into()),
            defaults: json!({"max_tokens": 1000}).as_object().cloned().unwrap(),
            ..Default::default()
        };
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"thinking":{"type":"enabled"}}"#;
        for (endpoint, max_tokens) in [(Endpoint::Messages, json!(1000)), (Endpoint::CountTokens, Value::Null)] {
            let mut t = AnthropicRequest::new(profile.clone(), endpoint).unwrap();
            let upstream = t.request(body).unwrap();
            assert_eq!(upstream.path, None, "{endpoint:?} keeps its path");
            let sent: Value = serde_json::from_slice(&upstream.body.unwrap()).unwrap();
            assert_eq!((&sent["model"], &sent["max_tokens"]), (&json!("claude-y"), &max_tokens));
            assert_eq!(sent["thinking"], json!({"type": "enabled"}));
            assert!(t.response_context().is_none(), "the answer is the client's as it is");
            assert_eq!(
                t.headers(),
                HeaderChanges {
                    set: vec![("anthropic-version", API_VERSION.to_string())],
                    remove: vec!["authorization"]
                }
            );
        }
        let mut unchanged = AnthropicRequest::new(BackendProfile::default(), Endpoint::Messages).unwrap();
        assert_eq!(unchanged.request(body).unwrap().body, None);
        assert!(AnthropicRequest::new(BackendProfile::default(), Endpoint::Embeddings).is_err());
    }

    #[test]
    fn a_renamed_model_is_sent_whatever_the_client_named() {
        let profile = BackendProfile { model: Some("claude-y".into()), ..Default::default() };
        for request in [json!({"messages": []}), json!({"model": null, "messages": []}), json!({"model": "m"})] {
            assert_eq!(translate_with(request, profile.clone()).unwrap()["model"], "claude-y");
        }
    }

    #[test]
    fn max_tokens_comes_from_the_client_the_defaults_or_the_built_in_value() {
        let request = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(translate(request.clone()).unwrap()["max_tokens"], DEFAULT_MAX_TOKENS);
        let profile = BackendProfile {
            model: Some("claude-y".into()),
            defaults: json!({"max_tokens": 1000, "top_k": 5}).as_object().cloned().unwrap(),
            ..Default::default()
        };
        let out = translate_with(request, profile).unwrap();
        assert_eq!((&out["max_tokens"], &out["top_k"], &out["model"]), (&json!(1000), &json!(5), &json!("claude-y")));
    }

    #[test]
    fn tool_choices_map_to_anthropics() {
        let choice = |c: Value| {
            translate(json!({"model": "m", "messages": [], "tool_choice": c})).map(|o| o["tool_choice"].clone())
        };
        assert_eq!(choice(json!("auto")).unwrap(), json!({"type": "auto"}));
        assert_eq!(choice(json!("none")).unwrap(), json!({"type": "none"}));
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            json!({"type": "tool", "name": "f"})
        );
        assert_eq!(choice(json!("sometimes")).unwrap_err().param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn what_anthropic_cannot_honour_is_refused_by_name() {
        for (param, request) in [
            ("n", json!({"n": 2})),
            ("logprobs", json!({"logprobs": true})),
            ("top_logprobs", json!({"top_logprobs": 3})),
            ("response_format", json!({"response_format": {"type": "json_object"}})),
            ("functions", json!({"functions": []})),
            (
                "messages[0].content[0].type",
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            ),
            ("messages[0].role", json!({"messages": [{"role": "function", "content": "x"}]})),
            (
                "messages[0].tool_calls[0].function.arguments",
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}]}),
            ),
            ("tools[0].type", json!({"tools": [{"type": "web_search"}]})),
        ] {
            let mut body = json!({"model": "m", "messages": []});
            body.as_object_mut().unwrap().extend(request.as_object().unwrap().clone());
            let e = translate(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{}", e.message);
        }
        assert!(translate(json!({"model": "m", "messages": [], "n": 1, "logprobs": false})).is_ok());
    }

    fn responses(include_usage: bool) -> AnthropicAnswer {
        let mut context = ResponseContext::new(Dialect::Anthropic, Endpoint::ChatCompletions);
        context.include_usage = include_usage;
        AnthropicAnswer::new(&context)
    }

    #[test]
    fn a_whole_message_becomes_a_chat_completion() {
        let mut t = responses(false);
        assert_eq!(
            t.plan(200, b"application/json"),
            ResponsePlan { status: 200, streamed: false, content_type: Some("application/json") }
        );
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"zoom": 2}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 1}});
        let out: Value = serde_json::from_slice(&t.whole(200, message.to_string().as_bytes())).unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["model"], "claude-x");
        assert_eq!(
            out["choices"][0],
            json!({"index": 0, "logprobs": null, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Let me look.", "refusal": null,
                "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}}]}})
        );
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 15, "completion_tokens": 7, "total_tokens": 22, "prompt_tokens_details": {"cached_tokens": 4}})
        );
        for (stop, finish) in
            [("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter")]
        {
            assert_eq!(finish_reason(Some(stop)), Some(finish));
        }
    }

    #[test]
    fn anthropic_errors_become_openai_errors() {
        let mut t = responses(false);
        assert_eq!(t.plan(529, b"application/json").status, 503);
        assert_eq!(t.plan(429, b"application/json").status, 429);
        let limited = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}"#;
        let out: Value = serde_json::from_slice(&t.whole(429, limited)).unwrap();
        assert_eq!(
            out,
            json!({"error": {"message": "Slow down", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
        );
        assert_eq!(t.whole(502, b"<html>bad gateway</html>"), b"<html>bad gateway</html>");
    }

    /// A stream as Anthropic sends it: text, then a tool call whose input arrives in pieces.
    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":9,\"output_tokens\":1,\"cache_read_input_tokens\":2}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"look\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"zo\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"om\\\":2}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":12}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn streamed(pieces: &[&[u8]], include_usage: bool) -> String {
        let mut t = responses(include_usage);
        assert!(t.plan(200, b"text/event-stream; charset=utf-8").streamed);
        feed(&mut t, pieces)
    }

    #[test]
    fn a_stream_becomes_chat_completion_chunks() {
        let out = streamed(&[STREAM.as_bytes()], true);
        assert!(out.ends_with("data: [DONE]\n\n"));
        let chunks = chunks(&out);
        assert_eq!(
            deltas(&chunks),
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hello"}),
                &json!({"content": " there"}),
                &json!({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"zo"}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "om\":2}"}}]}),
                &json!({}),
            ]
        );
        assert_eq!(chunks[6]["choices"][0]["finish_reason"], "tool_calls");
        assert!(chunks
            .iter()
            .all(|c| c["id"] == "msg_1" && c["object"] == "chat.completion.chunk" && c["model"] == "claude-x"));
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23, "prompt_tokens_details": {"cached_tokens": 2}})
        );
        assert!(!streamed(&[STREAM.as_bytes()], false).contains("\"usage\""));
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_chunks() {
        let whole = chunks(&streamed(&[STREAM.as_bytes()], true));
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            let split = chunks(&streamed(&[&bytes[..cut], &bytes[cut..]], true));
            assert_eq!(split.len(), whole.len(), "cut at {cut}");
            for (a, b) in split.iter().zip(&whole) {
                assert_eq!((&a["choices"], &a["usage"]), (&b["choices"], &b["usage"]), "cut at {cut}");
            }
        }
    }

    proptest! {
        #[test]
        fn random_splits_give_the_same_chunks(cuts in proptest::collection::btree_set(0..STREAM.len(), 0..20)) {
            let bytes = STREAM.as_bytes();
            let mut bounds = vec![0];
            bounds.extend(cuts.iter().copied());
            bounds.push(bytes.len());
            let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let split = chunks(&streamed(&pieces, false));
            let whole = chunks(&streamed(&[bytes], false));
            prop_assert_eq!(split.len(), whole.len());
            for (a, b) in split.iter().zip(&whole) {
                prop_assert_eq!(&a["choices"], &b["choices"]);
            }
        }

        #[test]
        fn arbitrary_bytes_in_a_stream_never_panic(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let mut t = responses(false);
            t.plan(200, b"text/event-stream");
            for piece in pieces {
                let _ = t.stream(piece, false);
            }
        }

        #[test]
        fn any_whole_message_becomes_a_chat_completion_and_anything_else_passes_as_it_came(
            id in any::<String>(), text in any::<String>(), query in any::<String>(),
            junk in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut t = responses(false);
            let message = json!({"id": id, "model": "m", "stop_reason": "end_turn", "content": [
                {"type": "text", "text": text}, {"type": "tool_use", "id": "t", "name": "n", "input": {"q": query}}],
                "usage": {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": null}});
            let out: Value = serde_json::from_slice(&t.whole(200, message.to_string().as_bytes())).unwrap();
            let reply = &out["choices"][0]["message"];
            prop_assert_eq!(&out["id"], &json!(id));
            // With a tool call and no text, the content is null, as OpenAI's.
            prop_assert_eq!(&reply["content"], &if text.is_empty() { Value::Null } else { json!(text) });
            let arguments: Value = serde_json::from_str(reply["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
            prop_assert_eq!(arguments, json!({"q": query}));
            prop_assert_eq!(&out["usage"]["total_tokens"], &json!(3));
            if serde_json::from_slice::<Message>(&junk).is_err() {
                prop_assert_eq!(t.whole(200, &junk), junk);
            }
        }

        #[test]
        fn arbitrary_request_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut t = AnthropicRequest::new(BackendProfile::default(), Endpoint::ChatCompletions).unwrap();
            let _ = t.request(&body);
        }
    }

    #[test]
    fn an_event_whose_data_is_not_json_ends_the_stream_with_an_error_event_and_comments_are_ignored() {
        let out = streamed(
            &[concat!(
                ": keep-alive\n\nevent: ping\n\n",
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{}}}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_del\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            )
            .as_bytes()],
            false,
        );
        let chunks = chunks(&out);
        assert_eq!(deltas(&chunks), vec![&json!({"role": "assistant", "content": ""})]);
        assert_eq!(chunks.last().unwrap()["error"]["code"], "stream_unreadable");
        assert!(!out.contains("[DONE]"), "{out}");
    }

    #[test]
    fn a_message_start_whose_usage_is_no_object_counts_as_none() {
        let out = streamed(
            &[concat!(
                "data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":5}}\n\n",
                "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
                "data: {\"type\":\"message_stop\"}\n\n"
            )
            .as_bytes()],
            true,
        );
        let usage = chunks(&out).pop().unwrap()["usage"].clone();
        assert_eq!((&usage["prompt_tokens"], &usage["completion_tokens"]), (&json!(0), &json!(2)));
    }

    #[test]
    fn in_stream_errors_become_openai_error_events() {
        let out = streamed(
            &[concat!(
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"c\",\"usage\":{}}}\n\n",
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
            )
            .as_bytes()],
            false,
        );
        let last = chunks(&out).pop().unwrap();
        assert_eq!(
            last,
            json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded"}})
        );
        assert!(!out.contains("[DONE]"));
        let guard = streamed(&[b"data: {\"error\":{\"message\":\"cut\",\"type\":\"server_error\",\"param\":null,\"code\":\"stream_interrupted\"}}\n\n"], false);
        assert_eq!(chunks(&guard)[0]["error"]["code"], "stream_interrupted");
    }

    #[test]
    fn an_error_event_over_several_data_lines_goes_on_as_one() {
        let out = streamed(&[b"data: {\"error\":\ndata: {\"message\":\"cut\"}}\n\n"], false);
        assert_eq!(out, "data: {\"error\":{\"message\":\"cut\"}}\n\n");
    }
}
