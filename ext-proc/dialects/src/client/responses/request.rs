//! A Responses API request as a chat completion.

use super::AnswerContext;
use crate::client::new_id;
use crate::client::{ClientContext, ClientOutcome, ClientRequest};
use crate::params::invalid_type;
use modelgate_proto::clock;
use modelgate_proto::error::GatewayError;
use serde_json::{json, Map, Value};

/// A Responses API request as a chat completion.
#[derive(Default)]
pub struct ResponsesRequest {
    /// The chat request's fields but `messages`, once read.
    chat: Map<String, Value>,
    /// `instructions`, the first system message.
    instructions: Option<String>,
    /// This request's input as chat messages.
    messages: Vec<Value>,
    context: AnswerContext,
}

/// The fields of a response object that repeat the request, and their
/// defaults; `user` appears only when sent (the spec has it a string, never null).
fn echo_defaults() -> Map<String, Value> {
    let defaults = json!({
        "instructions": null, "max_output_tokens": null, "metadata": {}, "model": null,
        "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
        "store": true, "temperature": null, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "top_p": null, "truncation": "disabled",
    });
    match defaults {
        Value::Object(map) => map,
        _ => unreachable!("an object literal"),
    }
}

impl ClientRequest for ResponsesRequest {
    fn read(&mut self, body: &[u8]) -> Result<Option<String>, GatewayError> {
        let request: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(request)) => request,
            Ok(_) => return Err(GatewayError::invalid_request("The body must be a JSON object.".into())),
            Err(e) => return Err(GatewayError::unparsable_json(&e)),
        };
        let mut echo = echo_defaults();
        let mut chat = Map::new();
        let mut previous = None;
        for (key, value) in request {
            // A null is the field left out, as OpenAI takes it.
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "model" => {
                    expect_string(&value, "model")?;
                    chat.insert(key.clone(), value.clone());
                }
                "input" => {
                    self.context.input = input_items(value)?;
                    self.messages = messages(&self.context.input, "input")?;
                    continue;
                }
                "instructions" => self.instructions = Some(expect_string(&value, "instructions")?.to_string()),
                "previous_response_id" => previous = Some(expect_string(&value, "previous_response_id")?.to_string()),
                "store" => self.context.store = expect_bool(&value, "store")?,
                "tools" => {
                    chat.insert(key.clone(), tools(&value)?);
                }
                "tool_choice" => {
                    chat.insert(key.clone(), tool_choice(&value)?);
                }
                "parallel_tool_calls" => {
                    expect_bool(&value, &key)?;
                    chat.insert(key.clone(), value.clone());
                }
                "stream" => {
                    expect_bool(&value, &key)?;
                    chat.insert(key, value);
                    continue;
                }
                "temperature" | "top_p" => {
                    if !value.is_number() {
                        return Err(invalid_type(&key, "a number"));
                    }
                    chat.insert(key.clone(), value.clone());
                }
                "max_output_tokens" => {
                    if !value.is_u64() {
                        return Err(invalid_type(&key, "an integer"));
                    }
                    // Every dialect reads it (OpenAI's o-series refuse the older `max_tokens`).
                    chat.insert("max_completion_tokens".into(), value.clone());
                }
                "user" | "safety_identifier" | "prompt_cache_key" => {
                    expect_string(&value, &key)?;
                    chat.insert(key.clone(), value.clone());
                }
                // Kept for the response object only: chat backends have nowhere to put it.
                "metadata" if !value.is_object() => return Err(invalid_type(&key, "an object")),
                "metadata" => {}
                "text" => text(&value, &mut chat)?,
                "reasoning" => reasoning(&value, &mut chat)?,
                // Responses' stream options (obfuscation) have nothing to do through chat.
                "stream_options" if !value.is_object() => return Err(invalid_type(&key, "an object")),
                "stream_options" => continue,
                "background" if value == false => continue,
                "truncation" if value == "disabled" => {}
                "service_tier" if value == "auto" || value == "default" => continue,
                "include" if value.as_array().is_some_and(Vec::is_empty) => continue,
                "top_logprobs" if value == 0 => continue,
                "background" => return Err(refused(&key, "background mode is not available through this model")),
                "conversation" => {
                    return Err(refused(&key, "conversations are not available: use `previous_response_id`"))
                }
                "prompt" => return Err(refused(&key, "stored prompts are not available")),
                "include" => return Err(refused(&key, "no additional output is available through this model")),
                "truncation" => return Err(refused(&key, "only `disabled` is available through this model")),
                "max_tool_calls" => return Err(refused(&key, "is not available through this model")),
                "top_logprobs" => return Err(refused(&key, "log probabilities are not available through this model")),
                "service_tier" => return Err(refused(&key, "only `auto` and `default` are available")),
                _ => return Err(GatewayError::unsupported_parameter(&key, "is not a Responses API parameter")),
            }
            echo.insert(key, value);
        }
        let stream = chat.get("stream") == Some(&Value::Bool(true));
        if stream {
            chat.insert("stream_options".into(), json!({"include_usage": true}));
        }
        self.chat = chat;
        self.context.id = new_id("resp_");
        self.context.created_at = clock::unix_seconds();
        self.context.store = echo["store"] != false;
        self.context.echo = echo;
        Ok(previous)
    }

    fn to_chat(&mut self, history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        let mut chat = std::mem::take(&mut self.chat);
        let mut all = Vec::new();
        if let Some(instructions) = self.instructions.take() {
            all.push(json!({"role": "system", "content": instructions}));
        }
        if let Some(history) = history {
            // Stored items were read once already; a stored conversation that no longer reads is the gateway's fault.
            for message in messages(&history, "previous_response_id")? {
                push(&mut all, message);
            }
            self.context.input.splice(0..0, history);
        }
        for message in std::mem::take(&mut self.messages) {
            push(&mut all, message);
        }
        if !all.iter().any(|m| m["role"] != "system") {
            return Err(GatewayError::missing_required_parameter("input"));
        }
        chat.insert("messages".into(), Value::Array(all));
        serde_json::to_vec(&chat).map(ClientOutcome::Chat).map_err(|e| GatewayError::unparsable_json(&e))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Responses(self.context.clone())
    }

    fn client_param(&self, chat_param: &str) -> Option<String> {
        let name = chat_param.split(['.', '[']).next().unwrap_or_default();
        let param = match name {
            "response_format" => "text.format",
            "max_completion_tokens" | "max_tokens" => "max_output_tokens",
            "reasoning_effort" => "reasoning.effort",
            "verbosity" => "text.verbosity",
            // Chat's messages are not the input's items one for one (instructions, merged calls).
            "messages" => "input",
            _ => return None,
        };
        Some(param.to_string())
    }
}

fn expect_string<'a>(value: &'a Value, param: &str) -> Result<&'a str, GatewayError> {
    value.as_str().ok_or_else(|| invalid_type(param, "a string"))
}

fn expect_bool(value: &Value, param: &str) -> Result<bool, GatewayError> {
    value.as_bool().ok_or_else(|| invalid_type(param, "a boolean"))
}

fn refused(param: &str, why: &str) -> GatewayError {
    GatewayError::unsupported_parameter(param, &format!("({why})"))
}

/// The input as items: a string is one user message.
fn input_items(input: Value) -> Result<Vec<Value>, GatewayError> {
    match input {
        Value::String(text) => {
            Ok(vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})])
        }
        Value::Array(items) => Ok(items),
        _ => Err(invalid_type("input", "a string or an array of items")),
    }
}

/// Appends `message`; a function call joins the assistant message before it,
/// since chat gives one assistant turn all its tool calls.
fn push(messages: &mut Vec<Value>, message: Value) {
    if let (Some(calls), Some(last)) = (message.get("tool_calls"), messages.last_mut()) {
        if last["role"] == "assistant" && message["content"].is_null() {
            let last_calls = last.as_object_mut().map(|m| m.entry("tool_calls").or_insert_with(|| json!([])));
            if let Some(Value::Array(last_calls)) = last_calls {
                last_calls.extend(calls.as_array().cloned().unwrap_or_default());
                return;
            }
        }
    }
    messages.push(message);
}

/// Chat messages for `items`, each named `<param>[i]` in errors; reasoning items are left out.
fn messages(items: &[Value], param: &str) -> Result<Vec<Value>, GatewayError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let param = format!("{param}[{i}]");
        if !item.is_object() {
            return Err(invalid_type(&param, "an object"));
        }
        let message = match item.get("type").map(|t| t.as_str()) {
            None | Some(Some("message")) => message(item, &param)?,
            Some(Some("function_call")) => {
                let call_id = required_string(item, "call_id", &param)?;
                let name = required_string(item, "name", &param)?;
                let arguments = required_string(item, "arguments", &param)?;
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                ]})
            }
            Some(Some("function_call_output")) => {
                let call_id = required_string(item, "call_id", &param)?;
                let output = match &item["output"] {
                    Value::String(text) => text.clone(),
                    Value::Array(parts) => text_parts(parts, &format!("{param}.output"), "input_text")?,
                    Value::Null => return Err(GatewayError::missing_required_parameter(&format!("{param}.output"))),
                    _ => return Err(invalid_type(&format!("{param}.output"), "a string or an array of parts")),
                };
                json!({"role": "tool", "tool_call_id": call_id, "content": output})
            }
            // A chat model reasons afresh each turn: earlier reasoning is not sent back.
            Some(Some("reasoning")) => continue,
            Some(Some(other)) => {
                return Err(GatewayError::invalid_value(
                    &format!("{param}.type"),
                    format!(
                        "Input items of type '{other}' are not available through this model: \
                         only message, function_call, function_call_output and reasoning items are."
                    ),
                ))
            }
            Some(None) => return Err(invalid_type(&format!("{param}.type"), "a string")),
        };
        out.push(message);
    }
    Ok(out)
}

fn required_string(item: &Value, field: &str, param: &str) -> Result<String, GatewayError> {
    match &item[field] {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Err(GatewayError::missing_required_parameter(&format!("{param}.{field}"))),
        _ => Err(invalid_type(&format!("{param}.{field}"), "a string")),
    }
}

/// A message item (an easy input message, or an output message echoed back) as a chat message.
fn message(item: &Value, param: &str) -> Result<Value, GatewayError> {
    let role = match &item["role"] {
        Value::String(role) => role.as_str(),
        Value::Null => return Err(GatewayError::missing_required_parameter(&format!("{param}.role"))),
        _ => return Err(invalid_type(&format!("{param}.role"), "a string")),
    };
    let content_param = format!("{param}.content");
    let content = &item["content"];
    match role {
        "user" => {
            let content = match content {
                Value::String(_) => content.clone(),
                Value::Array(parts) => Value::Array(user_parts(parts, &content_param)?),
                _ => return Err(invalid_type(&content_param, "a string or an array of parts")),
            };
            Ok(json!({"role": "user", "content": content}))
        }
        // Developer messages are system messages to every chat backend (not all know `developer`).
        "system" | "developer" => {
            Ok(json!({"role": "system", "content": text_content(content, &content_param, "input_text")?}))
        }
        "assistant" => {
            Ok(json!({"role": "assistant", "content": text_content(content, &content_param, "output_text")?}))
        }
        _ => Err(GatewayError::invalid_value(
            &format!("{param}.role"),
            format!("Invalid value for '{param}.role': expected user, system, developer or assistant."),
        )),
    }
}

/// Text content: a string, or parts of `text_type` or `input_text` (an assistant's refusals read as its text).
fn text_content(content: &Value, param: &str, text_type: &str) -> Result<String, GatewayError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => text_parts(parts, param, text_type),
        _ => Err(invalid_type(param, "a string or an array of parts")),
    }
}

fn text_parts(parts: &[Value], param: &str, text_type: &str) -> Result<String, GatewayError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let param = format!("{param}[{j}]");
        let kind = part["type"].as_str().ok_or_else(|| invalid_type(&format!("{param}.type"), "a string"))?;
        let field = match kind {
            "refusal" if text_type == "output_text" => "refusal",
            // Clients echoing a conversation often send their own earlier text as input_text.
            "input_text" => "text",
            _ if kind == text_type => "text",
            _ => return Err(unavailable_part(&param, kind, text_type)),
        };
        text.push_str(&required_string(part, field, &param)?);
    }
    Ok(text)
}

fn unavailable_part(param: &str, kind: &str, expected: &str) -> GatewayError {
    GatewayError::invalid_value(
        &format!("{param}.type"),
        format!("Content parts of type '{kind}' are not available here: expected {expected}."),
    )
}

/// A user message's parts as chat parts: text and images by URL.
fn user_parts(parts: &[Value], param: &str) -> Result<Vec<Value>, GatewayError> {
    let mut out = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let param = format!("{param}[{j}]");
        match part["type"].as_str() {
            Some("input_text") => out.push(json!({"type": "text", "text": required_string(part, "text", &param)?})),
            Some("input_image") => {
                if !part["file_id"].is_null() {
                    return Err(refused(
                        &format!("{param}.file_id"),
                        "uploaded files are not available: send the image by `image_url`",
                    ));
                }
                let mut image = json!({"url": required_string(part, "image_url", &param)?});
                match &part["detail"] {
                    Value::Null => {}
                    Value::String(_) => image["detail"] = part["detail"].clone(),
                    _ => return Err(invalid_type(&format!("{param}.detail"), "a string")),
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            Some(kind) => return Err(unavailable_part(&param, kind, "input_text or input_image")),
            None => return Err(invalid_type(&format!("{param}.type"), "a string")),
        }
    }
    Ok(out)
}

/// Function tools as chat's; the Responses API's hosted tools have no chat counterpart.
fn tools(value: &Value) -> Result<Value, GatewayError> {
    let tools = value.as_array().ok_or_else(|| invalid_type("tools", "an array"))?;
    let mut out = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        match tool["type"].as_str() {
            Some("function") => {}
            Some(kind) => {
                return Err(refused(
                    &format!("{param}.type"),
                    &format!("`{kind}` tools are not available through this model: only `function` tools are"),
                ))
            }
            None => return Err(invalid_type(&format!("{param}.type"), "a string")),
        }
        let mut function = Map::new();
        function.insert("name".into(), json!(required_string(tool, "name", &param)?));
        for field in ["description", "parameters", "strict"] {
            if !tool[field].is_null() {
                function.insert(field.into(), tool[field].clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn tool_choice(value: &Value) -> Result<Value, GatewayError> {
    match value {
        Value::String(mode) if ["auto", "none", "required"].contains(&mode.as_str()) => Ok(value.clone()),
        Value::Object(choice) if choice.get("type") == Some(&json!("function")) => {
            let name = required_string(value, "name", "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        Value::String(_) | Value::Object(_) => Err(refused(
            "tool_choice",
            "only auto, none, required and a function by name are available through this model",
        )),
        _ => Err(invalid_type("tool_choice", "a string or an object")),
    }
}

/// `text.format` as chat's `response_format`; `text.verbosity` as chat's `verbosity`.
fn text(value: &Value, chat: &mut Map<String, Value>) -> Result<(), GatewayError> {
    let text = value.as_object().ok_or_else(|| invalid_type("text", "an object"))?;
    for (key, value) in text {
        match key.as_str() {
            _ if value.is_null() => {}
            "format" => match value["type"].as_str() {
                Some("text") => {}
                Some("json_object") => {
                    chat.insert("response_format".into(), json!({"type": "json_object"}));
                }
                Some("json_schema") => {
                    let mut schema = Map::new();
                    schema.insert("name".into(), json!(required_string(value, "name", "text.format")?));
                    if !value["schema"].is_object() {
                        return Err(invalid_type("text.format.schema", "an object"));
                    }
                    for field in ["schema", "strict", "description"] {
                        if !value[field].is_null() {
                            schema.insert(field.into(), value[field].clone());
                        }
                    }
                    chat.insert("response_format".into(), json!({"type": "json_schema", "json_schema": schema}));
                }
                Some(other) => {
                    return Err(GatewayError::invalid_value(
                        "text.format.type",
                        format!(
                        "Invalid value for 'text.format.type': '{other}'; expected text, json_object or json_schema."
                    ),
                    ))
                }
                None => return Err(invalid_type("text.format.type", "a string")),
            },
            "verbosity" => {
                expect_string(value, "text.verbosity")?;
                chat.insert("verbosity".into(), value.clone());
            }
            _ => {
                return Err(GatewayError::unsupported_parameter(
                    &format!("text.{key}"),
                    "is not a Responses API parameter",
                ))
            }
        }
    }
    Ok(())
}

/// `reasoning.effort` as chat's `reasoning_effort`; a reasoning summary cannot be had through chat.
fn reasoning(value: &Value, chat: &mut Map<String, Value>) -> Result<(), GatewayError> {
    let reasoning = value.as_object().ok_or_else(|| invalid_type("reasoning", "an object"))?;
    for (key, value) in reasoning {
        match key.as_str() {
            _ if value.is_null() => {}
            "effort" => {
                expect_string(value, "reasoning.effort")?;
                chat.insert("reasoning_effort".into(), value.clone());
            }
            "summary" | "generate_summary" => {
                return Err(refused(
                    &format!("reasoning.{key}"),
                    "reasoning summaries are not available through this model",
                ))
            }
            _ => {
                return Err(GatewayError::unsupported_parameter(
                    &format!("reasoning.{key}"),
                    "is not a Responses API parameter",
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The chat request for `body` continuing `history`, and the answer's context.
    fn translate(body: Value, history: Option<Vec<Value>>) -> Result<(Value, AnswerContext), GatewayError> {
        let mut request = ResponsesRequest::default();
        request.read(&serde_json::to_vec(&body).unwrap())?;
        let ClientOutcome::Chat(chat) = request.to_chat(history)? else { panic!("a chat request") };
        let ClientContext::Responses(context) = request.answer_context() else { panic!("a Responses context") };
        Ok((serde_json::from_slice(&chat).unwrap(), context))
    }

    fn refusal(body: Value) -> Option<String> {
        translate(body, None).err().and_then(|e| e.param)
    }

    #[test]
    fn read_names_the_continued_response() {
        let mut request = ResponsesRequest::default();
        let previous = request.read(br#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#).unwrap();
        assert_eq!(previous.as_deref(), Some("resp_1"));
    }

    #[test]
    fn history_goes_first_after_this_requests_instructions_and_is_stored_with_the_input() {
        let history = vec![
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}),
            json!({"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]}),
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "w", "arguments": "{}"}),
            json!({"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "w", "arguments": "{}"}),
        ];
        let body = json!({"model": "m", "instructions": "Be brief.", "previous_response_id": "resp_1",
            "input": [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]});
        let (chat, context) = translate(body, Some(history.clone())).unwrap();
        let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "w", "arguments": "{}"}});
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [call("call_1"), call("call_2")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ])
        );
        let mut stored = history;
        stored.push(json!({"type": "function_call_output", "call_id": "call_1", "output": "sunny"}));
        assert_eq!(context.input, stored);
        assert_eq!(context.echo["previous_response_id"], "resp_1");
        assert_eq!(context.echo["instructions"], "Be brief.");
    }

    #[test]
    fn a_string_input_is_stored_as_a_user_message_item() {
        let (_, context) = translate(json!({"model": "m", "input": "hi", "store": false}), None).unwrap();
        assert_eq!(
            context.input,
            vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})]
        );
        assert!(!context.store);
        assert!(context.id.starts_with("resp_") && context.id.len() == 37);
        assert!(translate(json!({"model": "m", "input": "hi"}), None).unwrap().1.store);
    }

    #[test]
    fn parameters_map_to_chats() {
        let body = json!({"model": "m", "input": "hi", "max_output_tokens": 9, "stream": true, "user": "u",
            "metadata": {"a": "b"}, "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low"},
            "tool_choice": "required", "service_tier": "auto", "include": [], "truncation": "disabled"});
        let (chat, context) = translate(body, None).unwrap();
        assert_eq!(chat["max_completion_tokens"], 9);
        assert_eq!(chat["stream_options"], json!({"include_usage": true}));
        assert_eq!(chat["response_format"], json!({"type": "json_object"}));
        assert_eq!(
            (&chat["reasoning_effort"], &chat["tool_choice"], &chat["user"]),
            (&json!("low"), &json!("required"), &json!("u"))
        );
        assert!(chat.get("metadata").is_none() && chat.get("service_tier").is_none());
        assert_eq!(context.echo["metadata"], json!({"a": "b"}));
        assert!(context.echo.get("stream").is_none());
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let with = |field: &str, value: Value| {
            let mut body = json!({"model": "m", "input": "hi"});
            body[field] = value;
            refusal(body)
        };
        for (field, value) in [
            ("background", json!(true)),
            ("conversation", json!("conv_1")),
            ("prompt", json!({"id": "p"})),
            ("include", json!(["file_search_call.results"])),
            ("truncation", json!("auto")),
            ("max_tool_calls", json!(3)),
            ("top_logprobs", json!(2)),
            ("service_tier", json!("flex")),
            ("seed", json!(1)),
        ] {
            assert_eq!(with(field, value).as_deref(), Some(field));
        }
        assert_eq!(
            with("tools", json!([{"type": "function", "name": "f"}, {"type": "mcp"}])).as_deref(),
            Some("tools[1].type")
        );
        assert_eq!(with("tool_choice", json!({"type": "web_search"})).as_deref(), Some("tool_choice"));
        assert_eq!(with("reasoning", json!({"summary": "auto"})).as_deref(), Some("reasoning.summary"));
        assert_eq!(with("text", json!({"format": {"type": "xml"}})).as_deref(), Some("text.format.type"));
    }

    #[test]
    fn wrong_types_name_the_path() {
        let input = |input: Value| refusal(json!({"model": "m", "input": input}));
        assert_eq!(input(json!(3)).as_deref(), Some("input"));
        assert_eq!(input(json!(["hi"])).as_deref(), Some("input[0]"));
        assert_eq!(
            input(json!([{"role": "user", "content": [{"type": "input_text", "text": 1}]}])).as_deref(),
            Some("input[0].content[0].text")
        );
        assert_eq!(
            input(json!([{"type": "function_call", "call_id": "c", "name": "f"}])).as_deref(),
            Some("input[0].arguments")
        );
        assert_eq!(input(json!([{"role": "tool", "content": "x"}])).as_deref(), Some("input[0].role"));
        assert_eq!(input(json!([{"type": "input_file"}])).as_deref(), Some("input[0].type"));
        assert_eq!(
            input(json!([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}])).as_deref(),
            Some("input[0].content[0].type")
        );
        assert_eq!(refusal(json!({"model": "m", "input": "hi", "temperature": "hot"})).as_deref(), Some("temperature"));
        assert_eq!(refusal(json!({"model": "m", "instructions": "only"})).as_deref(), Some("input"));
    }

    #[test]
    fn reasoning_items_are_left_out() {
        let input = json!([{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "user", "content": "hi"}]);
        let (chat, context) = translate(json!({"model": "m", "input": input}), None).unwrap();
        assert_eq!(chat["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(context.input.len(), 2, "the stored conversation keeps what the client sent");
    }

    #[test]
    fn an_assistants_echoed_text_and_refusal_are_its_content() {
        let content = json!([{"type": "input_text", "text": "Sure. "}, {"type": "output_text", "text": "Done."},
            {"type": "refusal", "refusal": " Not that."}]);
        let input = json!([{"role": "assistant", "content": content}, {"role": "user", "content": "ok"}]);
        let (chat, _) = translate(json!({"model": "m", "input": input}), None).unwrap();
        assert_eq!(chat["messages"][0], json!({"role": "assistant", "content": "Sure. Done. Not that."}));
    }

    fn item() -> impl Strategy<Value = Value> {
        let text = "\\PC{0,12}";
        prop_oneof![
            (prop::sample::select(vec!["user", "system", "developer", "assistant"]), text)
                .prop_map(|(role, text)| json!({"role": role, "content": text})),
            text.prop_map(
                |text| json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
            ),
            ("[a-z]{1,5}", "[a-z_]{1,8}").prop_map(
                |(id, name)| json!({"type": "function_call", "call_id": id, "name": name, "arguments": "{}"})
            ),
            ("[a-z]{1,5}", text)
                .prop_map(|(id, output)| json!({"type": "function_call_output", "call_id": id, "output": output})),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut request = ResponsesRequest::default();
            if request.read(&body).is_ok() {
                let _ = request.to_chat(None);
            }
        }

        #[test]
        fn any_valid_input_translates(
            items in proptest::collection::vec(item(), 1..8),
            history in proptest::collection::vec(item(), 0..4),
        ) {
            let mut items = items;
            items.push(json!({"role": "user", "content": "last"}));
            let (chat, context) = translate(json!({"model": "m", "input": items}), Some(history.clone())).unwrap();
            let messages = chat["messages"].as_array().unwrap();
            prop_assert!(messages.len() <= history.len() + items.len());
            prop_assert_eq!(messages.last().unwrap(), &json!({"role": "user", "content": "last"}));
            prop_assert_eq!(context.input.len(), history.len() + items.len());
        }
    }
}
