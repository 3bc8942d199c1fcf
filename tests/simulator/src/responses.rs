//! OpenAI's Responses API on the OpenAI face, served natively as a recent vLLM
//! serves it: `POST /v1/responses`, whole or as its typed events, with function
//! tools as `function_call` items, `text.format` and `previous_response_id`
//! (the responses this process made, kept in memory). The official `openai`
//! client is what the tests check it with.

use crate::call::{self, abort_piece, new_id, now, pause, until_abort};
use crate::engine::Work;
use crate::openai::OpenAi;
use crate::reply::{Ask, Reply};
use crate::settings::Behaviour;
use crate::Sim;
use crate::{generate, tokenizer};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/v1/responses", post(create))
}

type Call = call::Call<OpenAi>;

/// The conversations of stored responses by id (their input and output, as
/// prompt lines), for `previous_response_id`.
#[derive(Debug, Default)]
pub struct Store {
    conversations: Mutex<HashMap<String, Vec<Value>>>,
}

impl Store {
    fn get(&self, id: &str) -> Option<Vec<Value>> {
        self.conversations.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn put(&self, id: String, conversation: Vec<Value>) {
        self.conversations.lock().unwrap_or_else(|e| e.into_inner()).insert(id, conversation);
    }
}

fn openai_error(status: StatusCode, message: &str, param: Option<&str>, code: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}});
    (status, Json(body)).into_response()
}

/// An input item as a line of the prompt: a message's text parts (a token
/// for each image), a call's arguments, a tool's output.
fn prompt_line(item: &Value) -> Value {
    match item["type"].as_str() {
        Some("function_call") => json!({"content": item["arguments"]}),
        Some("function_call_output") => json!({"content": item["output"]}),
        _ => json!({"content": item["content"]}),
    }
}

async fn create(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    if !sim.settings.responses_api {
        return Err(crate::failure::vllm_error(404, "Not Found"));
    }
    let body = &call.body;
    let items = match call.required("input")? {
        Value::String(text) => vec![json!({"role": "user", "content": text})],
        Value::Array(items) => items.clone(),
        _ => {
            return Err(openai_error(
                StatusCode::BAD_REQUEST,
                "`input` must be a string or a list",
                Some("input"),
                "invalid_type",
            ))
        }
    };
    let previous = body["previous_response_id"].as_str();
    let history = match previous {
        Some(id) => sim.responses.get(id).ok_or_else(|| {
            openai_error(
                StatusCode::BAD_REQUEST,
                &format!("Previous response with id '{id}' not found."),
                Some("previous_response_id"),
                "previous_response_not_found",
            )
        })?,
        None => vec![],
    };
    let instructions = body["instructions"].as_str().map(|text| json!({"content": text}));
    let mut conversation: Vec<Value> = history;
    conversation.extend(items.iter().map(prompt_line));
    let lines: Vec<Value> = instructions.into_iter().chain(conversation.iter().cloned()).collect();
    let prompt = tokenizer::ids(&generate::chat_prompt(&lines));
    let choice = &body["tool_choice"];
    let format = &body["text"]["format"];
    let reply = Reply::to(&Ask {
        tools: body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "function")
            .filter_map(|t| Some((t["name"].as_str()?, &t["parameters"])))
            .collect(),
        forced: choice["name"].as_str(),
        no_tools: choice == "none",
        answered: items.last().is_some_and(|i| i["type"] == "function_call_output"),
        schema: match format["type"].as_str() {
            Some("json_schema") => Some(&format["schema"]),
            Some("json_object") => Some(&Value::Null),
            _ => None,
        },
    });
    let limit = body["max_output_tokens"].as_u64();
    let (planned, limited) = match limit {
        Some(limit) if limit < u64::from(call.behaviour.output_tokens) => (limit as u32, true),
        _ => (call.behaviour.output_tokens, false),
    };
    let plan = Plan {
        id: format!("resp_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        item_id: match reply {
            Reply::Call { .. } => new_id("fc").replace('-', "_"),
            _ => new_id("msg").replace('-', "_"),
        },
        call_id: new_id("call").replace('-', "_"),
        created_at: now(),
        request: body.clone(),
        pieces: reply.pieces(planned),
        tokens: reply.tokens(planned),
        incomplete: limited && reply == Reply::Text,
        reply,
        input_tokens: prompt.len() as u32,
        work: call.work(prompt),
        conversation,
        behaviour: call.behaviour.clone(),
    };
    if body["stream"].as_bool() == Some(true) {
        return Ok(stream(sim, plan));
    }
    let job = sim.run(plan.work.clone()).await;
    pause(job.whole(&plan.behaviour, plan.tokens)).await;
    job.finish(plan.tokens);
    plan.store(&sim);
    Ok(Json(plan.response("completed", vec![plan.item("completed", &plan.pieces.concat())])).into_response())
}

/// Everything needed to write one response, whole or as events.
struct Plan {
    id: String,
    item_id: String,
    call_id: String,
    created_at: u64,
    request: Value,
    reply: Reply,
    pieces: Vec<String>,
    tokens: u32,
    /// `max_output_tokens` cut the text short.
    incomplete: bool,
    input_tokens: u32,
    work: Work,
    /// The conversation so far, as prompt lines, to remember under this response's id.
    conversation: Vec<Value>,
    behaviour: Behaviour,
}

impl Plan {
    /// The output item in `status`, with `text` (or the call's arguments) so far.
    fn item(&self, status: &str, text: &str) -> Value {
        match &self.reply {
            Reply::Call { name, .. } => json!({"id": self.item_id, "type": "function_call", "status": status,
                                               "call_id": self.call_id, "name": name, "arguments": text}),
            _ => {
                let content = if status == "in_progress" { json!([]) } else { json!([self.part(text)]) };
                json!({"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                       "content": content})
            }
        }
    }

    fn part(&self, text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }

    /// The response object: `completed` (or incomplete, when cut short) with its output and
    /// usage, or `in_progress` without.
    fn response(&self, status: &str, output: Vec<Value>) -> Value {
        let done = status != "in_progress";
        let status = if done && self.incomplete { "incomplete" } else { status };
        let echo = |field: &str, default: Value| match &self.request[field] {
            Value::Null => default,
            value => value.clone(),
        };
        let mut response = json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { json!(null) },
            "instructions": echo("instructions", json!(null)),
            "max_output_tokens": echo("max_output_tokens", json!(null)),
            "model": self.request["model"], "output": output,
            "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
            "previous_response_id": echo("previous_response_id", json!(null)),
            "reasoning": {"effort": null, "summary": null},
            "store": echo("store", json!(true)),
            "temperature": echo("temperature", json!(1.0)),
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": echo("tools", json!([])),
            "top_p": echo("top_p", json!(1.0)),
            "truncation": "disabled",
            "usage": if done { self.usage() } else { json!(null) },
            "metadata": echo("metadata", json!({})),
        });
        // OpenAI's schema has `user` a string: absent unless the request gave one.
        if let Some(user) = self.request["user"].as_str() {
            response["user"] = json!(user);
        }
        response
    }

    fn usage(&self) -> Value {
        json!({"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
               "output_tokens": self.tokens, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": self.input_tokens + self.tokens})
    }

    /// Remembers the conversation with this answer, unless the request said `store: false`.
    fn store(&self, sim: &Sim) {
        if self.request["store"].as_bool() != Some(false) {
            let mut conversation = self.conversation.clone();
            conversation.push(json!({"content": self.pieces.concat()}));
            sim.responses.put(self.id.clone(), conversation);
        }
    }
}

/// The events of a stream, numbered in order.
struct Events {
    next: u64,
}

impl Events {
    fn event(&mut self, kind: &str, mut data: Value) -> Result<Bytes, std::io::Error> {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.next);
        self.next += 1;
        Ok(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
    }
}

/// Streams `plan` as the Responses API's events. An abort sends an `error`
/// event and `response.failed`, or drops the connection with the `reset` format.
fn stream(sim: Arc<Sim>, plan: Plan) -> Response {
    call::streamed("text/event-stream", |tx| async move {
        let job = sim.run(plan.work.clone()).await;
        pause(job.first_token(&plan.behaviour)).await;
        let mut events = Events { next: 0 };
        let (item, part) = (&plan.item_id, json!({"output_index": 0, "content_index": 0, "item_id": plan.item_id}));
        let calling = matches!(plan.reply, Reply::Call { .. });
        let mut opening = vec![
            events.event("response.created", json!({"response": plan.response("in_progress", vec![])})),
            events.event("response.in_progress", json!({"response": plan.response("in_progress", vec![])})),
            events
                .event("response.output_item.added", json!({"output_index": 0, "item": plan.item("in_progress", "")})),
        ];
        if !calling {
            let mut added = part.clone();
            added["part"] = plan.part("");
            opening.push(events.event("response.content_part.added", added));
        }
        for bytes in opening {
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
        for (i, piece) in plan.pieces.iter().enumerate() {
            if plan.behaviour.abort_after == Some(i as u32) {
                until_abort(&plan.behaviour).await;
                let error = events.event(
                    "error",
                    json!({"code": "server_error", "message": "simulated failure",
                                                          "param": null}),
                );
                let _ = tx.send(abort_piece(&plan.behaviour, error)).await;
                let mut failed = plan.response("in_progress", vec![]);
                (failed["status"], failed["error"]) =
                    (json!("failed"), json!({"code": "server_error", "message": "simulated failure"}));
                let _ = tx.send(events.event("response.failed", json!({"response": failed}))).await;
                return;
            }
            sim.hold(&plan.behaviour, i).await;
            if i > 0 {
                pause(job.next_token(&plan.behaviour)).await;
            }
            let delta = if calling {
                events.event(
                    "response.function_call_arguments.delta",
                    json!({"output_index": 0, "item_id": item, "delta": piece}),
                )
            } else {
                let mut delta = part.clone();
                (delta["delta"], delta["logprobs"]) = (json!(piece), json!([]));
                events.event("response.output_text.delta", delta)
            };
            if tx.send(delta).await.is_err() {
                return;
            }
        }
        let text = plan.pieces.concat();
        let done = plan.item("completed", &text);
        let mut closing = Vec::new();
        if calling {
            closing.push(events.event(
                "response.function_call_arguments.done",
                json!({"output_index": 0, "item_id": item, "arguments": text}),
            ));
        } else {
            let mut text_done = part.clone();
            (text_done["text"], text_done["logprobs"]) = (json!(text), json!([]));
            closing.push(events.event("response.output_text.done", text_done));
            let mut part_done = part.clone();
            part_done["part"] = plan.part(&text);
            closing.push(events.event("response.content_part.done", part_done));
        }
        closing.push(events.event("response.output_item.done", json!({"output_index": 0, "item": done})));
        plan.store(&sim);
        let last = if plan.incomplete { "response.incomplete" } else { "response.completed" };
        closing.push(events.event(last, json!({"response": plan.response("completed", vec![done])})));
        for bytes in closing {
            let _ = tx.send(bytes).await;
        }
        job.finish(plan.tokens);
    })
}
