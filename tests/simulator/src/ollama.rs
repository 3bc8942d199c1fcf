//! The Ollama face: the native `/api/chat`, `/api/generate` and `/api/embed`,
//! whole or streamed as NDJSON, with options, images, tool calls and Ollama's
//! `{"error": "..."}` answers. The official `ollama` client is what the tests
//! check it with.

use crate::call::{self, abort_piece, generation_time, pause, until_abort, Face};
use crate::engine::Work;
use crate::failure::{failure, ErrorFormat};
use crate::reply::{fitting, Reply};
use crate::settings::Behaviour;
use crate::Sim;
use crate::{generate, tokenizer};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

pub fn routes() -> Router<Arc<Sim>> {
    Router::new().route("/api/chat", post(chat)).route("/api/generate", post(generate)).route("/api/embed", post(embed))
}

/// Ollama's errors: `{"error": "text"}`.
pub struct Ollama;

impl Face for Ollama {
    fn error(status: u16, message: &str) -> Response {
        let mut response = Json(json!({"error": message})).into_response();
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response
    }

    fn injected(status: u16, behaviour: &Behaviour) -> Response {
        match behaviour.error_format {
            ErrorFormat::Reset => failure(status, "", ErrorFormat::Reset, None),
            _ => Self::error(status, "simulated failure"),
        }
    }
}

type Call = call::Call<Ollama>;

/// Ollama's `created_at`: any well-formed RFC 3339 time will do for a simulator.
const CREATED_AT: &str = "2026-01-01T00:00:00.000000000Z";

/// Which endpoint is answering, and so which field carries the text.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Generate,
}

struct Plan {
    kind: Kind,
    model: String,
    tokens: u32,
    /// What streams: text tokens, or a requested `format`'s JSON in pieces.
    pieces: Vec<String>,
    done_reason: &'static str,
    tool_call: Option<Value>,
    prompt: u32,
    work: Work,
    behaviour: Behaviour,
}

impl Plan {
    fn new(call: &Call, kind: Kind, prompt: &str, tool_call: Option<Value>) -> Plan {
        let prompt = tokenizer::ids(prompt);
        let options = &call.body["options"];
        let (mut tokens, mut done_reason) = match options["num_predict"].as_u64() {
            Some(limit) if limit < u64::from(call.behaviour.output_tokens) => (limit as u32, "length"),
            _ => (call.behaviour.output_tokens, "stop"),
        };
        let stops: Vec<&str> = options["stop"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if let Some(at) = (0..tokens).find(|&i| stops.iter().any(|s| generate::token(i).contains(s))) {
            (tokens, done_reason) = (at, "stop");
        }
        let mut pieces = Reply::Text.pieces(tokens);
        if tool_call.is_some() {
            (tokens, done_reason, pieces) = (0, "stop", vec![]);
        } else if !call.body["format"].is_null() {
            // `"json"` or a JSON schema: the answer is a JSON document that fits it.
            let document = Reply::Json(fitting(&call.body["format"]).to_string());
            (tokens, done_reason, pieces) = (document.tokens(0), "stop", document.pieces(0));
        }
        Plan {
            kind,
            model: call.model.clone(),
            tokens,
            pieces,
            done_reason,
            tool_call,
            prompt: prompt.len() as u32,
            work: call.work(prompt),
            behaviour: call.behaviour.clone(),
        }
    }

    fn output_tokens(&self) -> u32 {
        self.tool_call.as_ref().map_or(self.tokens, |call| tokenizer::count(&call.to_string()))
    }

    /// One answer object: a piece of text while streaming, or the last one with `done` and the counts.
    fn part(&self, text: &str, done: bool) -> Value {
        let mut part = json!({"model": self.model, "created_at": CREATED_AT});
        match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if let (true, Some(call)) = (done, &self.tool_call) {
                    message["tool_calls"] = json!([call]);
                }
                part["message"] = message;
            }
            Kind::Generate => part["response"] = json!(text),
        }
        part["done"] = json!(done);
        if done {
            let nanos = |d: Duration| d.as_nanos() as u64;
            part["done_reason"] = json!(self.done_reason);
            part["total_duration"] = json!(nanos(generation_time(&self.behaviour, self.output_tokens())));
            part["load_duration"] = json!(0);
            part["prompt_eval_count"] = json!(self.prompt);
            part["prompt_eval_duration"] = json!(nanos(self.behaviour.ttft));
            part["eval_count"] = json!(self.output_tokens());
            part["eval_duration"] = json!(nanos(self.behaviour.itl * self.output_tokens()));
        }
        part
    }
}

async fn chat(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let messages =
        call.required("messages")?.as_array().ok_or_else(|| Ollama::error(400, "messages must be a list"))?;
    let images = messages.iter().map(|m| m["images"].as_array().map_or(0, Vec::len)).sum();
    let prompt =
        [generate::chat_prompt(messages)].into_iter().chain(std::iter::repeat_n(generate::MEDIA.to_string(), images));
    let prompt = prompt.collect::<Vec<_>>().join("\n");
    let plan =
        Plan::new(&call, Kind::Chat, &prompt, tool_call(&call.body, messages, call.behaviour.tool_argument_bytes));
    Ok(answer(sim, &call, plan).await)
}

async fn generate(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let prompt = call.required("prompt")?.as_str().ok_or_else(|| Ollama::error(400, "prompt must be a string"))?;
    let prompt =
        call.body["system"].as_str().map_or_else(|| prompt.to_string(), |system| format!("{system}\n{prompt}"));
    let plan = Plan::new(&call, Kind::Generate, &prompt, None);
    Ok(answer(sim, &call, plan).await)
}

/// Ollama streams unless the request says `"stream": false`.
async fn answer(sim: Arc<Sim>, call: &Call, plan: Plan) -> Response {
    if call.body["stream"].as_bool() != Some(false) {
        return stream(sim, plan);
    }
    let job = sim.run(plan.work.clone()).await;
    pause(job.whole(&plan.behaviour, plan.output_tokens())).await;
    job.finish(plan.output_tokens());
    Json(plan.part(&plan.pieces.concat(), true)).into_response()
}

/// A call of the first offered tool, unless the conversation ends with a tool's answer;
/// its string arguments are `argument_bytes` long when that is given.
fn tool_call(body: &Value, messages: &[Value], argument_bytes: Option<usize>) -> Option<Value> {
    let tool = body["tools"].as_array()?.first()?;
    if messages.last().is_some_and(|m| m["role"] == "tool") {
        return None;
    }
    let function = &tool["function"];
    let arguments: Map<String, Value> = function["parameters"]["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, schema)| {
            let value = match schema["type"].as_str() {
                Some("integer" | "number") => json!(1),
                Some("boolean") => json!(true),
                _ => json!(argument_bytes.map_or_else(|| "simulated".to_string(), |n| "s".repeat(n))),
            };
            (name.clone(), value)
        })
        .collect();
    Some(json!({"function": {"name": function["name"], "arguments": arguments}}))
}

fn line(part: &Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("{part}\n")))
}

/// Streams `plan` as NDJSON. An abort writes Ollama's in-stream `{"error": ...}`
/// line, or drops the connection with the `reset` format.
fn stream(sim: Arc<Sim>, plan: Plan) -> Response {
    call::streamed("application/x-ndjson", |tx| async move {
        let job = sim.run(plan.work.clone()).await;
        pause(job.first_token(&plan.behaviour)).await;
        for (i, piece) in plan.pieces.iter().enumerate() {
            if plan.behaviour.abort_after == Some(i as u32) {
                until_abort(&plan.behaviour).await;
                let _ = tx
                    .send(abort_piece(&plan.behaviour, line(&json!({"error": "simulated failure mid-stream"}))))
                    .await;
                return;
            }
            sim.hold(&plan.behaviour, i).await;
            if i > 0 {
                pause(job.next_token(&plan.behaviour)).await;
            }
            if tx.send(line(&plan.part(piece, false))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(line(&plan.part("", true))).await;
        job.finish(plan.output_tokens());
    })
}

async fn embed(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let inputs = generate::items(call.required("input")?);
    let dim = call.body["dimensions"].as_u64().map_or(sim.settings.embedding_dim, |d| d.clamp(1, 8192) as usize);
    let prompt: Vec<u32> = inputs.iter().flat_map(generate::item_ids).collect();
    let prompt_tokens = prompt.len();
    let job = sim.run(Work { max_output: 0, ..call.work(prompt) }).await;
    pause(job.first_token(&call.behaviour)).await;
    let embeddings: Vec<Vec<f32>> = inputs.iter().map(|item| generate::embedding(item, dim)).collect();
    job.finish(0);
    Ok(Json(json!({"model": call.model, "embeddings": embeddings, "total_duration": 0, "load_duration": 0,
                   "prompt_eval_count": prompt_tokens}))
    .into_response())
}
