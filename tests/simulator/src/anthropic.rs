//! The Anthropic face: `POST /v1/messages` as Anthropic's Messages API answers
//! it, whole or as its server-sent events, with tool use, stop sequences,
//! prompt-cache usage and Anthropic's error shape. The official `anthropic`
//! client is what the tests check it with.

use crate::call::{self, abort_piece, new_id, pause, until_abort, Face};
use crate::engine::Work;
use crate::failure::{failure, ErrorFormat};
use crate::settings::Behaviour;
use crate::Sim;
use crate::{generate, tokenizer};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/v1/messages", post(messages)).route("/v1/messages/count_tokens", post(count_tokens))
}

/// Anthropic's errors: `{"type":"error","error":{"type","message"}}`.
pub struct Anthropic;

impl Face for Anthropic {
    fn error(status: u16, message: &str) -> Response {
        anthropic_error(status, message, None)
    }

    fn injected(status: u16, behaviour: &Behaviour) -> Response {
        match behaviour.error_format {
            ErrorFormat::Reset => failure(status, "", ErrorFormat::Reset, None),
            _ => anthropic_error(status, "simulated failure", behaviour.retry_after),
        }
    }
}

type Call = call::Call<Anthropic>;

fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

fn anthropic_error(status: u16, message: &str, retry_after: Option<u64>) -> Response {
    let mut response = Json(error_body(status, message)).into_response();
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(id) = new_id("req").parse() {
        response.headers_mut().insert("request-id", id);
    }
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

/// What one answer will be: text up to a limit or a stop sequence, or a tool call.
struct Plan {
    id: String,
    model: String,
    /// Text tokens to send; zero for a tool call.
    tokens: u32,
    tool_call: Option<(String, Value)>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u32,
    cached_tokens: u32,
    work: Work,
    behaviour: Behaviour,
}

impl Plan {
    fn output_tokens(&self) -> u32 {
        match &self.tool_call {
            Some((_, input)) => tokenizer::count(&input.to_string()),
            None => self.tokens,
        }
    }

    fn usage(&self, output_tokens: u32) -> Value {
        json!({"input_tokens": self.input_tokens, "output_tokens": output_tokens,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": self.cached_tokens})
    }

    fn content(&self) -> Vec<Value> {
        match &self.tool_call {
            Some((name, input)) => {
                vec![json!({"type": "tool_use", "id": self.tool_use_id(), "name": name, "input": input})]
            }
            None => vec![json!({"type": "text", "text": generate::text(self.tokens)})],
        }
    }

    fn tool_use_id(&self) -> String {
        format!("toolu_{}", &self.id[4..])
    }

    fn whole(&self) -> Value {
        json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
               "content": self.content(), "stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence,
               "usage": self.usage(self.output_tokens())})
    }
}

/// Anthropic's own checks of a request's headers: its key and API version.
#[allow(clippy::result_large_err)] // an error here is the finished answer
fn check_headers(call: &Call) -> Result<(), Response> {
    // Anthropic takes the key as `x-api-key` or, from its newer clients, as a bearer token.
    if !call.headers.contains_key("x-api-key") && !call.headers.contains_key(header::AUTHORIZATION) {
        return Err(anthropic_error(401, "x-api-key header is required", None));
    }
    if !call.headers.contains_key("anthropic-version") {
        return Err(anthropic_error(400, "anthropic-version: header is required", None));
    }
    Ok(())
}

/// `count_tokens`: the prompt's tokens as a message would count them, without generating.
async fn count_tokens(call: Call) -> Result<Response, Response> {
    check_headers(&call)?;
    let messages =
        call.required("messages")?.as_array().ok_or_else(|| Anthropic::error(400, "messages: must be a list"))?;
    Ok(Json(json!({"input_tokens": prompt_ids(&call.body["system"], messages).len()})).into_response())
}

async fn messages(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    check_headers(&call)?;
    call.required("max_tokens")?.as_u64().ok_or_else(|| Anthropic::error(400, "max_tokens: must be an integer"))?;
    let messages =
        call.required("messages")?.as_array().ok_or_else(|| Anthropic::error(400, "messages: must be a list"))?;
    let plan = plan(&call, messages, prompt_ids(&call.body["system"], messages));
    if call.body["stream"].as_bool() == Some(true) {
        return Ok(stream(sim, plan));
    }
    let job = sim.run(plan.work.clone()).await;
    pause(job.whole(&plan.behaviour, plan.output_tokens())).await;
    job.finish(plan.output_tokens());
    Ok(Json(plan.whole()).into_response())
}

/// Tokens of the system prompt and of every text in the messages, tool results included.
fn prompt_ids(system: &Value, messages: &[Value]) -> Vec<u32> {
    let system = match system {
        Value::String(text) => vec![text.as_str()],
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => vec![],
    };
    let flattened: Vec<Value> = messages
        .iter()
        .map(|m| match &m["content"] {
            Value::Array(blocks) => {
                let parts: Vec<Value> = blocks
                    .iter()
                    .map(|b| match b["type"].as_str() {
                        Some("tool_result") => json!({"text": b["content"].to_string()}),
                        _ => b.clone(),
                    })
                    .collect();
                json!({"content": parts})
            }
            other => json!({"content": other}),
        })
        .collect();
    let chat = generate::chat_prompt(&flattened);
    tokenizer::ids(&system.into_iter().chain([chat.as_str()]).collect::<Vec<_>>().join("\n"))
}

fn plan(call: &Call, messages: &[Value], prompt_ids: Vec<u32>) -> Plan {
    let prompt = prompt_ids.len() as u32;
    let (mut tokens, limited) = call.planned_tokens();
    let mut stop_reason = if limited { "max_tokens" } else { "end_turn" };
    let mut stop_sequence = None;
    let stops: Vec<&str> =
        call.body["stop_sequences"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if let Some((at, stop)) =
        (0..tokens).find_map(|i| stops.iter().find(|s| generate::token(i).contains(**s)).map(|s| (i, s.to_string())))
    {
        (tokens, stop_reason, stop_sequence) = (at, "stop_sequence", Some(stop));
    }
    let tool_call = tool_call(&call.body, messages);
    if tool_call.is_some() {
        (tokens, stop_reason, stop_sequence) = (0, "tool_use", None);
    }
    let cached_tokens = call.behaviour.cached_tokens.min(prompt);
    Plan {
        id: new_id("msg").replace('-', "_"),
        model: call.model.clone(),
        tokens,
        tool_call,
        stop_reason,
        stop_sequence,
        input_tokens: prompt - cached_tokens,
        cached_tokens,
        work: call.work(prompt_ids),
        behaviour: call.behaviour.clone(),
    }
}

/// With tools offered and not refused, a conversation that does not end in a
/// tool result gets a call of the chosen tool (the first, unless one is named),
/// with an input that fits the tool's schema.
fn tool_call(body: &Value, messages: &[Value]) -> Option<(String, Value)> {
    let tools = body["tools"].as_array().filter(|t| !t.is_empty())?;
    let choice = &body["tool_choice"];
    if choice["type"] == "none" {
        return None;
    }
    let answered = messages
        .last()
        .and_then(|m| m["content"].as_array())
        .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"));
    if answered {
        return None;
    }
    let tool = match choice["name"].as_str() {
        Some(name) => tools.iter().find(|t| t["name"] == name)?,
        None => &tools[0],
    };
    Some((tool["name"].as_str()?.to_string(), crate::reply::fitting(&tool["input_schema"])))
}

fn event(name: &str, data: &Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
}

/// Streams `plan` as Anthropic's events. An abort sends Anthropic's in-stream
/// `error` event (an overloaded engine), or drops the connection with the `reset` format.
fn stream(sim: Arc<Sim>, plan: Plan) -> Response {
    call::streamed("text/event-stream", |tx| async move {
        let job = sim.run(plan.work.clone()).await;
        pause(job.first_token(&plan.behaviour)).await;
        let mut start = plan.whole();
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["stop_sequence"] = Value::Null;
        start["usage"] = plan.usage(1);
        let opening = [
            event("message_start", &json!({"type": "message_start", "message": start})),
            event("ping", &json!({"type": "ping"})),
        ];
        for bytes in opening {
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
        let (block, deltas): (Value, Vec<Value>) = match &plan.tool_call {
            Some((name, input)) => {
                let json = input.to_string();
                let pieces: Vec<String> =
                    json.as_bytes().chunks(8).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
                (
                    json!({"type": "tool_use", "id": plan.tool_use_id(), "name": name, "input": {}}),
                    pieces.into_iter().map(|p| json!({"type": "input_json_delta", "partial_json": p})).collect(),
                )
            }
            None => (
                json!({"type": "text", "text": ""}),
                (0..plan.tokens).map(|i| json!({"type": "text_delta", "text": generate::token(i)})).collect(),
            ),
        };
        let start = json!({"type": "content_block_start", "index": 0, "content_block": block});
        if tx.send(event("content_block_start", &start)).await.is_err() {
            return;
        }
        for (i, delta) in deltas.iter().enumerate() {
            if plan.behaviour.abort_after == Some(i as u32) {
                until_abort(&plan.behaviour).await;
                let _ = tx.send(abort_piece(&plan.behaviour, event("error", &error_body(529, "Overloaded")))).await;
                return;
            }
            sim.hold(&plan.behaviour, i).await;
            if i > 0 {
                pause(job.next_token(&plan.behaviour)).await;
            }
            let data = json!({"type": "content_block_delta", "index": 0, "delta": delta});
            if tx.send(event("content_block_delta", &data)).await.is_err() {
                return;
            }
        }
        let closing = [
            event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
            event(
                "message_delta",
                &json!({"type": "message_delta",
                        "delta": {"stop_reason": plan.stop_reason, "stop_sequence": plan.stop_sequence},
                        "usage": {"output_tokens": plan.output_tokens()}}),
            ),
            event("message_stop", &json!({"type": "message_stop"})),
        ];
        for bytes in closing {
            let _ = tx.send(bytes).await;
        }
        job.finish(plan.output_tokens());
    })
}
