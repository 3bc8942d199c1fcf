//! Anthropic's Messages API (and `count_tokens`) through chat completions,
//! for backends that do not speak it.
//!
//! Requests: `system` becomes the first message; user and assistant turns
//! keep their order, with `tool_use` blocks as the assistant's `tool_calls`
//! and each `tool_result` block as a `tool` message; image blocks become
//! `image_url` parts. Parameters map where chat completions have them; the
//! ones they cannot honour are refused with a 400 naming them. The model goes
//! as the client named it (the backend's dialect renames it).
//!
//! Answers: a `chat.completion` becomes a `message`; a chat stream becomes
//! Anthropic's events (`message_start`, `ping`, `content_block_*`,
//! `message_delta`, `message_stop`) as each chunk arrives. Errors, whole or in
//! a stream, take Anthropic's envelope.
//!
//! `count_tokens` is answered here with an estimate (see [`estimate_tokens`]).

use super::{ClientContext, ClientOutcome, ClientRequest};
use crate::dialect::{ResponsePlan, ResponseTranslator};
use crate::stream::{self, RecordStream, RecordTranslator};
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::{anthropic_envelope, ErrorCode, ErrorEnvelope, ErrorType, GatewayError};
use modelgate_proto::error_normalize::{self, Origin};
use modelgate_proto::framing::{error_event_in, Framing};
use serde_json::{json, Map, Value};

/// Why a parameter is refused: completes "Unsupported parameter: '<param>' …".
const THROUGH_CHAT: &str = "for this model: its backend is reached through chat completions, which have no such thing";

/// A Messages API request as a chat completion.
#[derive(Default)]
pub struct MessagesRequest {
    /// The chat completion, once read and until sent.
    chat: Option<Map<String, Value>>,
    context: AnswerContext,
}

impl ClientRequest for MessagesRequest {
    fn read(&mut self, body: &[u8]) -> Result<Option<String>, GatewayError> {
        let translated = translate(&parse(body)?, MaxTokens::Required)?;
        self.chat = Some(translated.chat);
        self.context = translated.context;
        Ok(None)
    }

    fn to_chat(&mut self, _history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        let chat = self.chat.take().ok_or_else(|| GatewayError::internal("a request translated unread".into()))?;
        Ok(ClientOutcome::Chat(Value::Object(chat).to_string().into_bytes()))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Messages(self.context.clone())
    }
}

/// A `count_tokens` request, answered with an estimate.
#[derive(Default)]
pub struct CountTokensRequest {
    input_tokens: Option<u64>,
}

impl ClientRequest for CountTokensRequest {
    fn read(&mut self, body: &[u8]) -> Result<Option<String>, GatewayError> {
        let request = parse(body)?;
        // Checked as a Messages request is, so what would be refused there is refused here too.
        translate(&request, MaxTokens::Optional)?;
        self.input_tokens = Some(estimate_tokens(&request));
        Ok(None)
    }

    fn to_chat(&mut self, _history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        let input_tokens =
            self.input_tokens.ok_or_else(|| GatewayError::internal("a request counted unread".into()))?;
        Ok(ClientOutcome::Answer(json!({ "input_tokens": input_tokens }).to_string().into_bytes()))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Messages(AnswerContext::default())
    }
}

/// What a Messages answer's translation needs of its request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerContext {
    /// The model as the client named it, which the answer names.
    model: Value,
    /// The client's `stop_sequences`: a chat answer that names the one it
    /// stopped at (vLLM's `stop_reason`) stopped at a stop sequence.
    stop_sequences: Vec<String>,
}

/// A request read: the chat completion it becomes, and what its answer needs.
struct Translated {
    chat: Map<String, Value>,
    context: AnswerContext,
}

#[derive(Clone, Copy, PartialEq)]
enum MaxTokens {
    Required,
    Optional,
}

// ---- requests ----

fn parse(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    serde_json::from_slice(body).map_err(|e| GatewayError::unparsable_json(&e))
}

/// The name of a JSON value's type, as the refusals say what they got.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> GatewayError {
    GatewayError::invalid_type(param, expected, Some(type_name(got)))
}

fn string<'a>(value: &'a Value, param: &str) -> Result<&'a str, GatewayError> {
    value.as_str().ok_or_else(|| wrong_type(param, "a string", value))
}

fn object<'a>(value: &'a Value, param: &str) -> Result<&'a Map<String, Value>, GatewayError> {
    value.as_object().ok_or_else(|| wrong_type(param, "an object", value))
}

fn array<'a>(value: &'a Value, param: &str) -> Result<&'a [Value], GatewayError> {
    value.as_array().map(Vec::as_slice).ok_or_else(|| wrong_type(param, "an array", value))
}

/// A member that must be there (not null) and of the right type.
fn required<'a>(fields: &'a Map<String, Value>, name: &str, parent: &str) -> Result<&'a Value, GatewayError> {
    let param = if parent.is_empty() { name.to_string() } else { format!("{parent}.{name}") };
    fields.get(name).filter(|v| !v.is_null()).ok_or_else(|| GatewayError::missing_required_parameter(&param))
}

fn unsupported(param: &str) -> GatewayError {
    GatewayError::unsupported_parameter(param, THROUGH_CHAT)
}

/// The chat completion for a Messages request (whose null members count as absent).
fn translate(request: &Map<String, Value>, max_tokens: MaxTokens) -> Result<Translated, GatewayError> {
    let mut chat = Map::new();
    let mut context = AnswerContext::default();
    let mut system = None;
    for (key, value) in request.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "model" => {
                string(value, "model")?;
                context.model = value.clone();
                chat.insert("model".into(), value.clone());
            }
            // Read below, once `system` is known.
            "messages" => {}
            "system" => system = Some(system_prompt(value)?),
            "max_tokens" => {
                if !value.is_u64() {
                    return Err(wrong_type("max_tokens", "a non-negative integer", value));
                }
                // OpenAI's reasoning models take only this name; every dialect reads it.
                chat.insert("max_completion_tokens".into(), value.clone());
            }
            "temperature" | "top_p" => {
                if !value.is_number() {
                    return Err(wrong_type(key, "a number", value));
                }
                chat.insert(key.clone(), value.clone());
            }
            // Not OpenAI's, but vLLM's and Ollama's (the backends that sample by it).
            "top_k" => {
                if !value.is_u64() {
                    return Err(wrong_type("top_k", "a non-negative integer", value));
                }
                chat.insert("top_k".into(), value.clone());
            }
            "stop_sequences" => {
                let sequences = array(value, "stop_sequences")?
                    .iter()
                    .enumerate()
                    .map(|(i, s)| string(s, &format!("stop_sequences[{i}]")).map(str::to_string))
                    .collect::<Result<Vec<_>, _>>()?;
                chat.insert("stop".into(), json!(sequences));
                context.stop_sequences = sequences;
            }
            "stream" => match value {
                Value::Bool(true) => {
                    chat.insert("stream".into(), json!(true));
                    // Anthropic's streams always end with usage.
                    chat.insert("stream_options".into(), json!({"include_usage": true}));
                }
                Value::Bool(false) => {}
                other => return Err(wrong_type("stream", "a boolean", other)),
            },
            "metadata" => {
                for (name, field) in object(value, "metadata")?.iter().filter(|(_, v)| !v.is_null()) {
                    match name.as_str() {
                        "user_id" => {
                            string(field, "metadata.user_id")?;
                            chat.insert("user".into(), field.clone());
                        }
                        other => return Err(unsupported(&format!("metadata.{other}"))),
                    }
                }
            }
            "tools" => {
                chat.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => {
                let (choice, parallel) = tool_choice(value)?;
                chat.insert("tool_choice".into(), choice);
                if !parallel {
                    chat.insert("parallel_tool_calls".into(), json!(false));
                }
            }
            "thinking" => {
                let thinking = object(value, "thinking")?;
                match string(required(thinking, "type", "thinking")?, "thinking.type")? {
                    "disabled" => {}
                    _ => return Err(unsupported("thinking")),
                }
            }
            "service_tier" => match value.as_str() {
                // Which capacity serves the request is the gateway's to say; both mean "any".
                Some("auto" | "standard_only") => {}
                Some(other) => {
                    return Err(GatewayError::invalid_value(
                        "service_tier",
                        format!("Invalid value for 'service_tier': `{other}`; expected `auto` or `standard_only`."),
                    ))
                }
                None => return Err(wrong_type("service_tier", "a string", value)),
            },
            "output_config" => {
                if let Some(format) = output_format(value)? {
                    chat.insert("response_format".into(), format);
                }
            }
            // Where to cache the prompt: a cost hint, not part of the request's meaning.
            "cache_control" => {}
            other => return Err(unsupported(other)),
        }
    }
    required(request, "model", "")?;
    if max_tokens == MaxTokens::Required {
        required(request, "max_tokens", "")?;
    }
    let messages = required(request, "messages", "")?;
    chat.insert("messages".into(), Value::Array(chat_messages(messages, system)?));
    Ok(Translated { chat, context })
}

/// The system prompt's text: a string, or text blocks (joined by blank lines).
fn system_prompt(value: &Value) -> Result<String, GatewayError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let texts = blocks
                .iter()
                .enumerate()
                .map(|(i, block)| text_of(block, &format!("system[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n\n"))
        }
        other => Err(wrong_type("system", "a string or an array of text blocks", other)),
    }
}

/// A block's `type`, which every block must have.
fn block_type<'a>(block: &'a Value, param: &str) -> Result<(&'a Map<String, Value>, &'a str), GatewayError> {
    let fields = object(block, param)?;
    let kind = string(required(fields, "type", param)?, &format!("{param}.type"))?;
    Ok((fields, kind))
}

/// The text of a block that may only be text.
fn text_of<'a>(block: &'a Value, param: &str) -> Result<&'a str, GatewayError> {
    let (fields, kind) = block_type(block, param)?;
    if kind != "text" {
        return Err(refused_block(kind, param, "text blocks only"));
    }
    string(required(fields, "text", param)?, &format!("{param}.text"))
}

fn refused_block(kind: &str, param: &str, allowed: &str) -> GatewayError {
    GatewayError::unsupported_parameter(
        &format!("{param}.type"),
        &format!(
            "(`{kind}`) for this model: its backend is reached through chat completions, which take {allowed} here"
        ),
    )
}

/// The chat messages for the Messages API's `messages`, after the system prompt.
fn chat_messages(value: &Value, system: Option<String>) -> Result<Vec<Value>, GatewayError> {
    let list = array(value, "messages")?;
    let mut out: Vec<Value> = system.into_iter().map(|text| json!({"role": "system", "content": text})).collect();
    for (i, message) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let fields = object(message, &param)?;
        let role = string(required(fields, "role", &param)?, &format!("{param}.role"))?;
        let content = required(fields, "content", &param)?;
        match role {
            "user" => user_messages(content, &param, &mut out)?,
            // A last assistant turn asks the model to continue it (prefill), which chat completions cannot.
            "assistant" if i + 1 == list.len() => {
                return Err(GatewayError::unsupported_parameter(
                    &format!("{param}.role"),
                    "(`assistant` last, a prefill) for this model: its backend is reached through chat completions, which always start a new turn",
                ))
            }
            "assistant" => out.push(assistant_message(content, &param)?),
            other => {
                return Err(GatewayError::invalid_value(
                    &format!("{param}.role"),
                    format!("Invalid value for '{param}.role': `{other}`; expected `user` or `assistant`."),
                ))
            }
        }
    }
    Ok(out)
}

/// A user turn: a `tool` message per tool result (chat puts them right
/// after the assistant's calls), then a user message with the other blocks.
fn user_messages(content: &Value, param: &str, out: &mut Vec<Value>) -> Result<(), GatewayError> {
    let blocks = match content {
        Value::String(text) => {
            out.push(json!({"role": "user", "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        other => return Err(wrong_type(&format!("{param}.content"), "a string or an array of content blocks", other)),
    };
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_param = format!("{param}.content[{j}]");
        let (fields, kind) = block_type(block, &block_param)?;
        match kind {
            "text" => parts.push(json!({"type": "text", "text": text_of(block, &block_param)?})),
            "image" => parts.push(image_part(fields, &block_param)?),
            "tool_result" => out.push(tool_message(fields, &block_param)?),
            other => return Err(refused_block(other, &block_param, "text, image and tool_result blocks from a user")),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

/// An image block as an `image_url` part: base64 data as a data URL, a URL as it is.
fn image_part(fields: &Map<String, Value>, param: &str) -> Result<Value, GatewayError> {
    let source_param = format!("{param}.source");
    let source = object(required(fields, "source", param)?, &source_param)?;
    let url = match string(required(source, "type", &source_param)?, &format!("{source_param}.type"))? {
        "base64" => {
            let media_type =
                string(required(source, "media_type", &source_param)?, &format!("{source_param}.media_type"))?;
            let data = string(required(source, "data", &source_param)?, &format!("{source_param}.data"))?;
            format!("data:{media_type};base64,{data}")
        }
        "url" => string(required(source, "url", &source_param)?, &format!("{source_param}.url"))?.to_string(),
        other => {
            return Err(GatewayError::unsupported_parameter(
                &format!("{source_param}.type"),
                &format!("(`{other}`) for this model: images go as `base64` data or a `url`"),
            ))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A tool result as a `tool` message; an error result says so in its text,
/// since chat completions have no flag for it.
fn tool_message(fields: &Map<String, Value>, param: &str) -> Result<Value, GatewayError> {
    let id = string(required(fields, "tool_use_id", param)?, &format!("{param}.tool_use_id"))?;
    let content_param = format!("{param}.content");
    let text = match fields.get("content").unwrap_or(&Value::Null) {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(k, block)| text_of(block, &format!("{content_param}[{k}]")))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n\n"),
        other => return Err(wrong_type(&content_param, "a string or an array of text blocks", other)),
    };
    let is_error = match fields.get("is_error").unwrap_or(&Value::Null) {
        Value::Null => false,
        Value::Bool(is_error) => *is_error,
        other => return Err(wrong_type(&format!("{param}.is_error"), "a boolean", other)),
    };
    let text = if is_error { format!("Error: {text}") } else { text };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": text}))
}

/// An assistant turn: its text, and its `tool_use` blocks as tool calls.
fn assistant_message(content: &Value, param: &str) -> Result<Value, GatewayError> {
    let blocks = match content {
        Value::String(text) => return Ok(json!({"role": "assistant", "content": text})),
        Value::Array(blocks) => blocks,
        other => return Err(wrong_type(&format!("{param}.content"), "a string or an array of content blocks", other)),
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_param = format!("{param}.content[{j}]");
        let (fields, kind) = block_type(block, &block_param)?;
        match kind {
            "text" => text.push_str(text_of(block, &block_param)?),
            "tool_use" => {
                let id = string(required(fields, "id", &block_param)?, &format!("{block_param}.id"))?;
                let name = string(required(fields, "name", &block_param)?, &format!("{block_param}.name"))?;
                let input = object(required(fields, "input", &block_param)?, &format!("{block_param}.input"))?;
                calls.push(json!({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": Value::Object(input.clone()).to_string()}}));
            }
            other => return Err(refused_block(other, &block_param, "text and tool_use blocks from an assistant")),
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(message)
}

/// Client tools as chat function tools; server tools (web search and the
/// like, any `type` but `custom`) are refused.
fn tools(value: &Value) -> Result<Value, GatewayError> {
    let list = array(value, "tools")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        let fields = object(tool, &param)?;
        match fields.get("type").unwrap_or(&Value::Null) {
            Value::Null => {}
            Value::String(kind) if kind == "custom" => {}
            Value::String(kind) => {
                return Err(GatewayError::unsupported_parameter(
                    &format!("{param}.type"),
                    &format!("(`{kind}`) for this model: its backend is reached through chat completions, which take client tools (with an `input_schema`) only"),
                ))
            }
            other => return Err(wrong_type(&format!("{param}.type"), "a string", other)),
        }
        let name = string(required(fields, "name", &param)?, &format!("{param}.name"))?;
        let schema = object(required(fields, "input_schema", &param)?, &format!("{param}.input_schema"))?;
        let mut function = json!({"name": name, "parameters": schema});
        for (key, field) in fields.iter().filter(|(_, v)| !v.is_null()) {
            match key.as_str() {
                "type" | "name" | "input_schema" => {}
                "description" => function["description"] = json!(string(field, &format!("{param}.description"))?),
                "strict" => {
                    if !field.is_boolean() {
                        return Err(wrong_type(&format!("{param}.strict"), "a boolean", field));
                    }
                    function["strict"] = field.clone();
                }
                // A cost hint, and a hint on how the input streams (it streams as it comes anyway).
                "cache_control" | "eager_input_streaming" => {}
                other => return Err(unsupported(&format!("{param}.{other}"))),
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// The chat `tool_choice`, and whether several tool calls may come at once.
fn tool_choice(value: &Value) -> Result<(Value, bool), GatewayError> {
    let fields = object(value, "tool_choice")?;
    let choice = match string(required(fields, "type", "tool_choice")?, "tool_choice.type")? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = string(required(fields, "name", "tool_choice")?, "tool_choice.name")?;
            json!({"type": "function", "function": {"name": name}})
        }
        other => {
            return Err(GatewayError::invalid_value(
                "tool_choice.type",
                format!("Invalid value for 'tool_choice.type': `{other}`; expected `auto`, `any`, `tool` or `none`."),
            ))
        }
    };
    let parallel = match fields.get("disable_parallel_tool_use").unwrap_or(&Value::Null) {
        Value::Null => true,
        Value::Bool(disable) => !disable,
        other => return Err(wrong_type("tool_choice.disable_parallel_tool_use", "a boolean", other)),
    };
    Ok((choice, parallel))
}

/// `output_config.format` (a JSON schema the answer must follow) as a chat
/// `response_format`; `effort` has no counterpart.
fn output_format(value: &Value) -> Result<Option<Value>, GatewayError> {
    let mut format = None;
    for (key, field) in object(value, "output_config")?.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "format" => {
                let fields = object(field, "output_config.format")?;
                match string(required(fields, "type", "output_config.format")?, "output_config.format.type")? {
                    "json_schema" => {
                        let schema =
                            object(required(fields, "schema", "output_config.format")?, "output_config.format.schema")?;
                        format = Some(json!({"type": "json_schema",
                                             "json_schema": {"name": "output", "schema": schema, "strict": true}}));
                    }
                    other => {
                        return Err(GatewayError::invalid_value(
                            "output_config.format.type",
                            format!(
                                "Invalid value for 'output_config.format.type': `{other}`; expected `json_schema`."
                            ),
                        ))
                    }
                }
            }
            other => return Err(unsupported(&format!("output_config.{other}"))),
        }
    }
    Ok(format)
}

/// `count_tokens`' estimate, for a backend that cannot count: a token per
/// four characters of the system prompt, of every block's text (a tool
/// result's text, a tool call's input as JSON) and of the tools as JSON, plus
/// three per message for its framing. Images are not counted.
pub fn estimate_tokens(request: &Map<String, Value>) -> u64 {
    fn characters(value: &Value) -> usize {
        match value {
            Value::String(text) => text.chars().count(),
            Value::Array(blocks) => blocks.iter().map(characters).sum(),
            Value::Object(block) => match block.get("type").and_then(Value::as_str) {
                Some("text") => block.get("text").map_or(0, characters),
                Some("tool_result") => block.get("content").map_or(0, characters),
                Some("tool_use") => block.get("input").map_or(0, |input| input.to_string().chars().count()),
                _ => 0,
            },
            _ => 0,
        }
    }
    let messages = request.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let tools = request.get("tools").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let characters = request.get("system").map_or(0, characters)
        + messages.iter().map(|message| characters(&message["content"])).sum::<usize>()
        + tools.iter().map(|tool| tool.to_string().chars().count()).sum::<usize>();
    (characters as u64).div_ceil(4) + 3 * messages.len() as u64
}

// ---- answers ----

/// A chat completion answer, whole or streamed, as a Messages API answer.
pub struct MessagesAnswer {
    context: AnswerContext,
    max_event_bytes: usize,
    stream: Option<RecordStream<EventWriter>>,
}

impl MessagesAnswer {
    pub fn new(context: &AnswerContext, max_event_bytes: usize) -> Self {
        MessagesAnswer { context: context.clone(), max_event_bytes, stream: None }
    }
}

impl ResponseTranslator for MessagesAnswer {
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan {
        let plan = stream::plan(status, content_type, Framing::Sse);
        if plan.streamed {
            let writer = EventWriter::new(self.context.clone());
            self.stream = Some(RecordStream::new(Framing::Sse, self.max_event_bytes, writer));
        }
        plan
    }

    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8> {
        if !(200..300).contains(&status) {
            return anthropic_envelope(status, &error_message(status, body));
        }
        let message = serde_json::from_slice::<Value>(body)
            .map_err(|_| "a body that is not JSON".to_string())
            .and_then(|chat| message(&chat, &self.context));
        match message {
            Ok(message) => message.to_string().into_bytes(),
            // The status is sent already; the body says what went wrong.
            Err(what) => GatewayError::bad_answer(&what).body_in(ClientApi::Anthropic),
        }
    }

    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        stream::push(&mut self.stream, piece, end)
    }

    fn ended(&self) -> bool {
        self.stream.as_ref().is_some_and(|stream| stream.ended() || stream.translator().errored)
    }
}

/// The message of a chat error answer, normalized as the gateway normalizes any.
fn error_message(status: u16, body: &[u8]) -> String {
    let normalized = error_normalize::normalize(status, Origin::Backend { attempts: 1 }, body);
    let envelope = normalized.as_ref().map_or(body, |rewritten| &rewritten.body);
    serde_json::from_slice::<ErrorEnvelope>(envelope)
        .map_or_else(|_| format!("The backend answered HTTP {status}."), |e| e.error.message)
}

/// Anthropic's `stop_reason` and `stop_sequence` for a chat choice's `finish_reason`.
fn stop_reason(
    finish_reason: &Value,
    matched: &Value,
    has_tool_calls: bool,
    context: &AnswerContext,
) -> (Value, Value) {
    let stopped_at = matched.as_str().filter(|m| context.stop_sequences.iter().any(|s| s == m));
    match finish_reason.as_str() {
        Some("length") => (json!("max_tokens"), Value::Null),
        Some("content_filter") => (json!("refusal"), Value::Null),
        // Whatever the finish reason says (some backends say `stop` after tool calls).
        _ if has_tool_calls => (json!("tool_use"), Value::Null),
        _ => match stopped_at {
            Some(sequence) => (json!("stop_sequence"), json!(sequence)),
            None => (json!("end_turn"), Value::Null),
        },
    }
}

/// Anthropic's usage for chat's. As Anthropic counts them, `input_tokens`
/// leaves out the tokens read from a cache, which `cache_read_input_tokens` says.
fn usage(chat: &Value) -> Value {
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    let cached = chat["prompt_tokens_details"]["cached_tokens"].as_u64();
    let input = count(&chat["prompt_tokens"]).saturating_sub(cached.unwrap_or(0));
    let mut usage = json!({"input_tokens": input, "output_tokens": count(&chat["completion_tokens"])});
    if let Some(cached) = cached {
        usage["cache_read_input_tokens"] = json!(cached);
    }
    usage
}

/// A tool call's arguments as the `input` object Anthropic's clients read.
fn tool_input(arguments: &Value) -> Result<Value, String> {
    let arguments = arguments.as_str().unwrap_or_default();
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| format!("tool call arguments that are not a JSON object ({arguments})"))
}

/// A whole `chat.completion` as a `message`; `Err` says what about it cannot be one.
fn message(chat: &Value, context: &AnswerContext) -> Result<Value, String> {
    let choice = chat["choices"].get(0).ok_or("no choices")?;
    let reply = &choice["message"];
    let text = match &reply["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => reply["refusal"].as_str().unwrap_or_default().to_string(),
    };
    let mut content: Vec<Value> = Vec::new();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = reply["tool_calls"].as_array().map(Vec::as_slice).unwrap_or_default();
    for call in calls {
        let function = &call["function"];
        content.push(json!({"type": "tool_use", "id": call["id"], "name": function["name"],
                            "input": tool_input(&function["arguments"])?}));
    }
    let has_tool_calls = !calls.is_empty();
    let (stop_reason, stop_sequence) =
        stop_reason(&choice["finish_reason"], &choice["stop_reason"], has_tool_calls, context);
    Ok(json!({
        "id": super::new_id("msg_"), "type": "message", "role": "assistant", "model": context.model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": usage(&chat["usage"]),
    }))
}

/// The content block a stream is writing.
#[derive(Clone, Copy, PartialEq)]
enum Block {
    Text(usize),
    Tool(usize),
}

impl Block {
    fn index(self) -> usize {
        match self {
            Block::Text(index) | Block::Tool(index) => index,
        }
    }
}

/// Turns a chat completion stream into Anthropic's events, chunk by chunk.
struct EventWriter {
    context: AnswerContext,
    started: bool,
    /// The block being written, which the next one of another kind closes.
    open: Option<Block>,
    /// Every tool call's block, by the chat answer's index of the call.
    tool_blocks: Vec<(u64, usize)>,
    blocks: usize,
    /// The choice's `finish_reason` and matched stop (vLLM's `stop_reason`), once said.
    finish: Option<(Value, Value)>,
    usage: Value,
    /// `message_stop` is written.
    stopped: bool,
    /// The stream was ended with an error event.
    errored: bool,
}

impl EventWriter {
    fn new(context: AnswerContext) -> Self {
        EventWriter {
            context,
            started: false,
            open: None,
            tool_blocks: Vec::new(),
            blocks: 0,
            finish: None,
            usage: Value::Null,
            stopped: false,
            errored: false,
        }
    }

    fn event(out: &mut Vec<u8>, data: &Value) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(data["type"].as_str().unwrap_or_default().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        let _ = serde_json::to_writer(&mut *out, data);
        out.extend_from_slice(b"\n\n");
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        // Input tokens are known only at the end; message_delta says them.
        let message = json!({"id": super::new_id("msg_"), "type": "message", "role": "assistant", "model": self.context.model,
                             "content": [], "stop_reason": null, "stop_sequence": null,
                             "usage": {"input_tokens": 0, "output_tokens": 0}});
        Self::event(out, &json!({"type": "message_start", "message": message}));
        Self::event(out, &json!({"type": "ping"}));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.open.take() {
            Self::event(out, &json!({"type": "content_block_stop", "index": block.index()}));
        }
    }

    fn open(&mut self, block: &Value, out: &mut Vec<u8>) -> usize {
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        Self::event(out, &json!({"type": "content_block_start", "index": index, "content_block": block}));
        index
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = match self.open {
            Some(Block::Text(index)) => index,
            _ => {
                let index = self.open(&json!({"type": "text", "text": ""}), out);
                self.open = Some(Block::Text(index));
                index
            }
        };
        let delta = json!({"type": "text_delta", "text": text});
        Self::event(out, &json!({"type": "content_block_delta", "index": index, "delta": delta}));
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<u8>) {
        let call_index = call["index"].as_u64().unwrap_or(0);
        let function = &call["function"];
        let index = match self.tool_blocks.iter().find(|(c, _)| *c == call_index) {
            Some(&(_, index)) => index,
            None => {
                let block = json!({"type": "tool_use", "id": call["id"], "name": function["name"], "input": {}});
                let index = self.open(&block, out);
                self.open = Some(Block::Tool(index));
                self.tool_blocks.push((call_index, index));
                index
            }
        };
        if let Some(arguments) = function["arguments"].as_str().filter(|a| !a.is_empty()) {
            let delta = json!({"type": "input_json_delta", "partial_json": arguments});
            Self::event(out, &json!({"type": "content_block_delta", "index": index, "delta": delta}));
        }
    }

    /// Ends the message: its last block, the stop reason and usage, `message_stop`.
    fn stop(&mut self, out: &mut Vec<u8>) {
        if self.stopped {
            return;
        }
        self.start(out);
        self.close(out);
        let (finish_reason, matched) = self.finish.clone().unwrap_or_default();
        let (stop_reason, stop_sequence) =
            stop_reason(&finish_reason, &matched, !self.tool_blocks.is_empty(), &self.context);
        Self::event(
            out,
            &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage(&self.usage)}),
        );
        Self::event(out, &json!({"type": "message_stop"}));
        self.stopped = true;
    }

    /// An error event in the chat stream (the backend's, its dialect's or the guard's).
    fn error(&mut self, error: &Value, out: &mut Vec<u8>) {
        let field = |name: &str| error[name].as_str().unwrap_or_default();
        let message = match field("message") {
            "" => "The backend's stream failed.",
            message => message,
        };
        let code = match field("code") {
            "overloaded" => Some(ErrorCode::Overloaded),
            "pool_saturated" => Some(ErrorCode::PoolSaturated),
            _ => None,
        };
        let status = match field("type") {
            "invalid_request_error" => 400,
            "authentication_error" => 401,
            "permission_error" => 403,
            "not_found_error" => 404,
            "rate_limit_error" | "requests" | "tokens" => 429,
            _ => 500,
        };
        let error = GatewayError::from_backend(status, ErrorType::for_status(status), code, message.to_string());
        self.write_error(&error, out);
    }
}

impl RecordTranslator for EventWriter {
    fn translate(&mut self, chunk: &Value, _raw: &[u8], out: &mut Vec<u8>) {
        if self.stopped || self.errored {
            return;
        }
        if chunk.get("choices").is_none() {
            if let Some(error) = chunk.get("error") {
                return self.error(error, out);
            }
        }
        self.start(out);
        if let Some(choice) = chunk["choices"].get(0) {
            let delta = &choice["delta"];
            if let Some(text) = delta["content"].as_str().or(delta["refusal"].as_str()).filter(|t| !t.is_empty()) {
                self.text(text, out);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                self.tool_call(call, out);
            }
            if !choice["finish_reason"].is_null() {
                self.close(out);
                self.finish = Some((choice["finish_reason"].clone(), choice["stop_reason"].clone()));
            }
        }
        if !chunk["usage"].is_null() {
            self.usage = chunk["usage"].clone();
            // The usage chunk asked for comes after the finish, without choices.
            if self.finish.is_some() && chunk["choices"].as_array().is_none_or(Vec::is_empty) {
                self.stop(out);
            }
        }
    }

    fn write_error(&mut self, error: &GatewayError, out: &mut Vec<u8>) {
        self.errored = true;
        out.extend_from_slice(&error_event_in(ClientApi::Anthropic, error));
    }

    fn done(&mut self, out: &mut Vec<u8>) {
        if !self.errored {
            self.stop(out);
        }
    }

    /// A stream that ended without `[DONE]` or its usage chunk: complete if
    /// the choice had finished, else cut short, which the client must be told.
    fn end(&mut self, out: &mut Vec<u8>) {
        if self.stopped || self.errored {
            return;
        }
        if self.finish.is_some() {
            self.stop(out);
        } else {
            self.write_error(&GatewayError::interrupted(&"the backend's stream ended before its answer"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::testing::feed;
    use proptest::prelude::*;

    fn chat(request: Value) -> Result<Value, GatewayError> {
        let mut t = MessagesRequest::default();
        t.read(request.to_string().as_bytes())?;
        match t.to_chat(None)? {
            ClientOutcome::Chat(body) => Ok(serde_json::from_slice(&body).unwrap()),
            ClientOutcome::Answer(_) => panic!("a Messages request is sent on"),
        }
    }

    fn with(fields: Value) -> Value {
        let mut request = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
        request.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        request
    }

    #[test]
    fn a_conversation_with_system_images_and_tools_maps_across() {
        let out = chat(json!({
            "model": "claude-x", "max_tokens": 300, "temperature": 0.3, "top_p": 0.9, "top_k": 40,
            "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}, "stream": true,
            "service_tier": "auto", "thinking": {"type": "disabled"}, "cache_control": {"type": "ephemeral"},
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"zoom": 2}},
                    {"type": "tool_use", "id": "toolu_2", "name": "look", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a cat"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                     "content": [{"type": "text", "text": "too close"}]},
                    {"type": "text", "text": "Thanks"}]}
            ],
            "tools": [{"name": "look", "description": "Look closer", "strict": true, "cache_control": {"type": "ephemeral"},
                       "input_schema": {"type": "object", "properties": {"zoom": {"type": "integer"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x", "max_completion_tokens": 300, "temperature": 0.3, "top_p": 0.9, "top_k": 40, "stop": ["END"],
                "user": "u-1", "stream": true, "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "Be brief.\n\nUse tools."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is in"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]},
                    {"role": "assistant", "content": "Let me look.", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
                    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: too close"},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}
                ],
                "tools": [{"type": "function", "function": {"name": "look", "description": "Look closer", "strict": true,
                           "parameters": {"type": "object", "properties": {"zoom": {"type": "integer"}}}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": true}}
            })
        );
    }

    #[test]
    fn tool_choices_map_to_chats() {
        let choice = |c: Value| {
            chat(with(json!({"tool_choice": c})))
                .map(|o| (o["tool_choice"].clone(), o.get("parallel_tool_calls").cloned()))
        };
        assert_eq!(choice(json!({"type": "auto"})).unwrap(), (json!("auto"), None));
        assert_eq!(choice(json!({"type": "none"})).unwrap(), (json!("none"), None));
        assert_eq!(
            choice(json!({"type": "tool", "name": "f", "disable_parallel_tool_use": false})).unwrap(),
            (json!({"type": "function", "function": {"name": "f"}}), None)
        );
        assert_eq!(choice(json!({"type": "sometimes"})).unwrap_err().param.as_deref(), Some("tool_choice.type"));
    }

    #[test]
    fn what_chat_completions_cannot_honour_is_refused_by_name() {
        let user = |block: Value| json!({"messages": [{"role": "user", "content": [block]}]});
        for (param, code, fields) in [
            ("thinking", "unsupported_parameter", json!({"thinking": {"type": "enabled", "budget_tokens": 2048}})),
            (
                "tools[0].type",
                "unsupported_parameter",
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            ),
            (
                "tools[0].defer_loading",
                "unsupported_parameter",
                json!({"tools": [{"name": "f", "input_schema": {"type": "object"}, "defer_loading": true}]}),
            ),
            ("container", "unsupported_parameter", json!({"container": "c-1"})),
            ("metadata.team", "unsupported_parameter", json!({"metadata": {"team": "a"}})),
            ("output_config.effort", "unsupported_parameter", json!({"output_config": {"effort": "high"}})),
            (
                "messages[0].content[0].type",
                "unsupported_parameter",
                user(json!({"type": "document", "source": {"type": "text", "data": "x", "media_type": "text/plain"}})),
            ),
            (
                "messages[0].content[0].type",
                "unsupported_parameter",
                user(json!({"type": "thinking", "thinking": "hmm"})),
            ),
            (
                "messages[0].content[0].type",
                "unsupported_parameter",
                user(json!({"type": "tool_use", "id": "t", "name": "f", "input": {}})),
            ),
            (
                "messages[0].content[0].content[0].type",
                "unsupported_parameter",
                user(json!({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]})),
            ),
            (
                "messages[0].content[0].source.type",
                "unsupported_parameter",
                user(json!({"type": "image", "source": {"type": "file", "file_id": "f"}})),
            ),
            (
                "messages[1].role",
                "unsupported_parameter",
                json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is ("}]}),
            ),
            ("messages[0].role", "invalid_value", json!({"messages": [{"role": "system", "content": "x"}]})),
            ("service_tier", "invalid_value", json!({"service_tier": "priority"})),
            ("max_tokens", "invalid_type", json!({"max_tokens": "10"})),
            ("temperature", "invalid_type", json!({"temperature": "hot"})),
            ("stop_sequences[1]", "invalid_type", json!({"stop_sequences": ["a", 2]})),
            ("system", "invalid_type", json!({"system": 5})),
            ("messages", "invalid_type", json!({"messages": {"role": "user"}})),
            ("messages[0].content", "invalid_type", json!({"messages": [{"role": "user", "content": 5}]})),
            ("messages[0].content[0].text", "invalid_type", user(json!({"type": "text", "text": ["x"]}))),
            ("messages[0].content[0].type", "missing_required_parameter", user(json!({"text": "x"}))),
            ("tools[0].input_schema", "missing_required_parameter", json!({"tools": [{"name": "f"}]})),
        ] {
            let e = chat(with(fields)).unwrap_err();
            assert_eq!(e.status, 400, "{param}");
            assert_eq!((e.param.as_deref(), e.code.map(ErrorCode::as_str)), (Some(param), Some(code)), "{}", e.message);
            let envelope: Value = serde_json::from_slice(&e.body_in(ClientApi::Anthropic)).unwrap();
            assert_eq!(envelope["error"]["type"], "invalid_request_error");
            assert!(envelope["error"]["message"].as_str().unwrap().contains(param), "{envelope}");
        }
        let mut missing = with(json!({}));
        missing.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(chat(missing).unwrap_err().code, Some(ErrorCode::MissingRequiredParameter));
        assert!(MessagesRequest::default().read(b"[1]").is_err());
    }

    #[test]
    fn count_tokens_is_estimated_from_the_text_and_tools() {
        let body = json!({
            "model": "m", "system": "12345678",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "abcd"},
                                             {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "ok"}]}]}
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]
        });
        let tool_chars = body["tools"][0].to_string().len();
        // 8 (system) + 4 + 7 (`{"a":1}`) + 2, the tool's JSON, and 3 for each of 3 messages.
        let expected = (8 + 4 + 7 + 2 + tool_chars as u64).div_ceil(4) + 9;
        let mut t = CountTokensRequest::default();
        assert_eq!(t.read(body.to_string().as_bytes()).unwrap(), None);
        assert_eq!(
            t.to_chat(None).unwrap(),
            ClientOutcome::Answer(json!({"input_tokens": expected}).to_string().into_bytes())
        );
        let refused =
            CountTokensRequest::default().read(with(json!({"thinking": {"type": "enabled"}})).to_string().as_bytes());
        assert_eq!(refused.unwrap_err().param.as_deref(), Some("thinking"));
    }

    fn answer(stop_sequences: &[&str]) -> MessagesAnswer {
        let context = AnswerContext {
            model: json!("claude-x"),
            stop_sequences: stop_sequences.iter().map(|s| s.to_string()).collect(),
        };
        MessagesAnswer::new(&context, 1 << 20)
    }

    fn whole(status: u16, body: Value, stop_sequences: &[&str]) -> Value {
        let mut t = answer(stop_sequences);
        let plan = t.plan(status, b"application/json");
        assert_eq!((plan.status, plan.streamed), (status, false));
        serde_json::from_slice(&t.whole(status, body.to_string().as_bytes())).unwrap()
    }

    #[test]
    fn a_chat_completion_becomes_a_message() {
        let completion = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "llama",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me look.",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}}]}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "prompt_tokens_details": {"cached_tokens": 4}}});
        let out = whole(200, completion, &[]);
        assert!(out["id"].as_str().unwrap().starts_with("msg_") && out["id"].as_str().unwrap().len() == 36);
        assert_eq!(
            out,
            json!({"id": out["id"], "type": "message", "role": "assistant", "model": "claude-x",
                   "content": [{"type": "text", "text": "Let me look."},
                               {"type": "tool_use", "id": "call_1", "name": "look", "input": {"zoom": 2}}],
                   "stop_reason": "tool_use", "stop_sequence": null,
                   "usage": {"input_tokens": 7, "output_tokens": 7, "cache_read_input_tokens": 4}})
        );
        let finished = |finish: &str, stop_reason: Value| {
            let completion = json!({"choices": [{"finish_reason": finish, "stop_reason": stop_reason,
                                                 "message": {"role": "assistant", "content": ""}}]});
            let out = whole(200, completion, &["END"]);
            assert_eq!(out["content"], json!([]));
            assert_eq!(out["usage"], json!({"input_tokens": 0, "output_tokens": 0}));
            (out["stop_reason"].clone(), out["stop_sequence"].clone())
        };
        assert_eq!(finished("stop", Value::Null), (json!("end_turn"), Value::Null));
        assert_eq!(finished("stop", json!("END")), (json!("stop_sequence"), json!("END")));
        assert_eq!(finished("stop", json!(128001)), (json!("end_turn"), Value::Null));
        assert_eq!(finished("length", Value::Null), (json!("max_tokens"), Value::Null));
        assert_eq!(finished("content_filter", Value::Null), (json!("refusal"), Value::Null));
    }

    #[test]
    fn errors_and_bad_answers_take_anthropics_envelope() {
        let limited = json!({"error": {"message": "Slow down", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}});
        assert_eq!(
            whole(429, limited, &[]),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}})
        );
        let vllm = json!({"object": "error", "message": "This model's maximum context length is 10 tokens", "type": "BadRequestError", "code": 400});
        assert_eq!(
            whole(400, vllm, &[]),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "This model's maximum context length is 10 tokens"}})
        );
        let mut t = answer(&[]);
        t.plan(502, b"text/html");
        let page: Value = serde_json::from_slice(&t.whole(502, b"<html>bad gateway</html>")).unwrap();
        assert_eq!(page["error"]["type"], "api_error");
        let garbled = json!({"choices": [{"finish_reason": "tool_calls", "message": {"tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{\"zoom\":"}}]}}]});
        let out = whole(200, garbled, &[]);
        assert_eq!(out["type"], "error");
        assert!(out["error"]["message"].as_str().unwrap().contains("not a JSON object"), "{out}");
    }

    /// A chat stream as an OpenAI backend sends it: text, then two tool calls whose arguments come in pieces.
    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"look\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"zo\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"om\\\":2}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_2\",\"type\":\"function\",\"function\":{\"name\":\"look\",\"arguments\":\"{}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12,\"total_tokens\":21}}\n\n",
        "data: [DONE]\n\n",
    );

    fn streamed(pieces: &[&[u8]]) -> (String, bool) {
        let mut t = answer(&[]);
        let plan = t.plan(200, b"text/event-stream; charset=utf-8");
        assert_eq!(plan, ResponsePlan { status: 200, streamed: true, content_type: Some("text/event-stream") });
        let out = feed(&mut t, pieces);
        (out, t.ended())
    }

    /// Each event's name and data, checking that the name is the data's type.
    fn events(sse: &str) -> Vec<Value> {
        sse.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.strip_prefix("event: ").unwrap().split_once("\ndata: ").unwrap();
                let data: Value = serde_json::from_str(data).unwrap();
                assert_eq!(data["type"], name);
                data
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_that_ends_without_its_end_still_closes_the_message() {
        let lines: Vec<&str> = STREAM.split_inclusive("\n\n").collect();
        // Finished, but no usage chunk and no `[DONE]`: the message stops.
        let (finished, _) = streamed(&[lines[..8].concat().as_bytes(), b""]);
        assert_eq!(events(&finished).last().unwrap()["type"], "message_stop");
        // Cut before the choice finished: an error event says so, last.
        let (cut, ended) = streamed(&[lines[..3].concat().as_bytes(), b""]);
        let last = events(&cut).pop().unwrap();
        assert_eq!(last["type"], "error");
        assert!(last["error"]["message"].as_str().unwrap().contains("stopped in the middle"), "{last}");
        assert!(ended);
    }

    #[test]
    fn a_chat_stream_becomes_anthropics_events() {
        let (out, ended) = streamed(&[STREAM.as_bytes()]);
        assert!(!ended);
        let events = events(&out);
        let start = &events[0]["message"];
        assert!(start["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(
            (&start["model"], &start["usage"]),
            (&json!("claude-x"), &json!({"input_tokens": 0, "output_tokens": 0}))
        );
        let delta = |index: usize, delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
        let stop = |index: usize| json!({"type": "content_block_stop", "index": index});
        assert_eq!(
            events[1..],
            [
                json!({"type": "ping"}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                delta(0, json!({"type": "text_delta", "text": "Hello"})),
                delta(0, json!({"type": "text_delta", "text": " there"})),
                stop(0),
                json!({"type": "content_block_start", "index": 1,
                       "content_block": {"type": "tool_use", "id": "call_1", "name": "look", "input": {}}}),
                delta(1, json!({"type": "input_json_delta", "partial_json": "{\"zo"})),
                delta(1, json!({"type": "input_json_delta", "partial_json": "om\":2}"})),
                stop(1),
                json!({"type": "content_block_start", "index": 2,
                       "content_block": {"type": "tool_use", "id": "call_2", "name": "look", "input": {}}}),
                delta(2, json!({"type": "input_json_delta", "partial_json": "{}"})),
                stop(2),
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                       "usage": {"input_tokens": 9, "output_tokens": 12}}),
                json!({"type": "message_stop"}),
            ]
        );
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_events() {
        let without_ids = |sse: &str| {
            let mut events = events(sse);
            events[0]["message"]["id"] = Value::Null;
            events
        };
        let whole = without_ids(&streamed(&[STREAM.as_bytes()]).0);
        let bytes = STREAM.as_bytes();
        for cut in 0..=bytes.len() {
            assert_eq!(without_ids(&streamed(&[&bytes[..cut], &bytes[cut..]]).0), whole, "cut at {cut}");
        }
    }

    #[test]
    fn a_stream_ended_by_done_alone_still_ends_its_message() {
        let (out, _) = streamed(&[concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi END\"},\"finish_reason\":\"stop\",\"stop_reason\":null}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes()]);
        let events = events(&out);
        let names: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[5]["usage"], json!({"input_tokens": 3, "output_tokens": 2}));
        assert_eq!(events[5]["delta"]["stop_reason"], "end_turn");
    }

    #[test]
    fn errors_in_a_stream_end_it_with_anthropics_error_event() {
        let (out, ended) = streamed(&[concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
            "data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":\"overloaded\"}}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
        )
        .as_bytes()]);
        assert!(ended);
        let overloaded = events(&out);
        assert_eq!(overloaded.len(), 5, "nothing after the error: {out}");
        assert_eq!(
            overloaded[4],
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        let (out, ended) = streamed(&[b"data: {\"choices\":[{nope\n\n"]);
        assert!(ended);
        let unreadable = events(&out);
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0]["error"]["type"], "api_error");
        assert!(unreadable[0]["error"]["message"].as_str().unwrap().contains("could not read"));
    }

    fn message_strategy() -> impl Strategy<Value = Value> {
        let text = "\\PC{0,12}";
        let block = prop_oneof![
            text.prop_map(|t| json!({"type": "text", "text": t})),
            ("[a-z]{1,6}", text).prop_map(|(id, t)| json!({"type": "tool_result", "tool_use_id": id, "content": t})),
            "[A-Za-z0-9+/]{0,12}".prop_map(
                |d| json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": d}})
            ),
        ];
        let assistant_block = prop_oneof![
            text.prop_map(|t| json!({"type": "text", "text": t})),
            ("[a-z]{1,6}", "[a-z]{1,6}", any::<i32>())
                .prop_map(|(id, name, n)| json!({"type": "tool_use", "id": id, "name": name, "input": {"n": n}})),
        ];
        prop_oneof![
            text.prop_map(|t| json!({"role": "user", "content": t})),
            proptest::collection::vec(block, 0..4).prop_map(|b| json!({"role": "user", "content": b})),
            proptest::collection::vec(assistant_block, 0..4).prop_map(|b| json!({"role": "assistant", "content": b})),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_request_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = MessagesRequest::default().read(&body);
            let _ = CountTokensRequest::default().read(&body);
        }

        #[test]
        fn any_valid_conversation_translates(mut messages in proptest::collection::vec(message_strategy(), 0..8)) {
            messages.push(json!({"role": "user", "content": "go on"}));
            let request = json!({"model": "m", "max_tokens": 5, "messages": messages});
            let out = chat(request.clone()).unwrap();
            let chat_messages = out["messages"].as_array().unwrap();
            prop_assert!(!chat_messages.is_empty());
            prop_assert_eq!(chat_messages.last().unwrap(), &json!({"role": "user", "content": "go on"}));
            let mut counted = CountTokensRequest::default();
            prop_assert!(counted.read(request.to_string().as_bytes()).is_ok());
        }

        #[test]
        fn arbitrary_bytes_in_a_stream_never_panic(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut t = answer(&[]);
            t.plan(200, b"text/event-stream");
            for piece in &pieces {
                let _ = t.stream(piece, false);
            }
            let _ = t.stream(b"", true);
            let _ = answer(&[]).whole(200, &pieces.concat());
        }

        #[test]
        fn random_splits_give_the_same_events(cuts in proptest::collection::btree_set(0..STREAM.len(), 0..20)) {
            let bytes = STREAM.as_bytes();
            let mut bounds = vec![0];
            bounds.extend(cuts.iter().copied());
            bounds.push(bytes.len());
            let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let split = events(&streamed(&pieces).0);
            let whole = events(&streamed(&[bytes]).0);
            prop_assert_eq!(split.len(), whole.len());
            prop_assert_eq!(&split[1..], &whole[1..]);
        }
    }
}
