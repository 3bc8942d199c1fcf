//! The OpenAI (vLLM-like) face: chat completions, completions, embeddings and
//! models, streaming or not, with injected latency and failures.

use crate::call::{self, new_id, now, pause, until_abort, Face};
use crate::engine::Work;
use crate::failure::{failure, vllm_error};
use crate::reply::{Ask, Reply};
use crate::settings::Behaviour;
use crate::Sim;
use crate::{generate, tokenizer};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
}

/// The OpenAI (vLLM) API's errors.
pub struct OpenAi;

impl Face for OpenAi {
    fn error(status: u16, message: &str) -> Response {
        vllm_error(status, message)
    }

    fn injected(status: u16, behaviour: &Behaviour) -> Response {
        failure(status, "simulated failure", behaviour.error_format, behaviour.retry_after)
    }
}

type Call = call::Call<OpenAi>;

/// Why generation stopped, in OpenAI's words.
fn plan_tokens(call: &Call) -> (u32, &'static str) {
    match call.planned_tokens() {
        (tokens, true) => (tokens, "length"),
        (tokens, false) => (tokens, "stop"),
    }
}

fn choices_count(body: &Value) -> u32 {
    body["n"].as_u64().unwrap_or(1).clamp(1, 16) as u32
}

fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat_completions(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let messages = call.required("messages")?.as_array().ok_or_else(|| vllm_error(400, "`messages` must be a list"))?;
    let prompt = tokenizer::ids(&generate::chat_prompt(messages));
    let reply = chat_reply(&call.body, messages);
    Ok(respond(sim, call, StreamKind::Chat, prompt, reply).await)
}

/// A chat's function tools, tool choice and `response_format`, as the simulated model answers them.
fn chat_reply(body: &Value, messages: &[Value]) -> Reply {
    let choice = &body["tool_choice"];
    let format = &body["response_format"];
    Reply::to(&Ask {
        tools: body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["function"]["name"].as_str()?, &t["function"]["parameters"])))
            .collect(),
        forced: choice["function"]["name"].as_str(),
        no_tools: choice == "none",
        answered: messages.last().is_some_and(|m| m["role"] == "tool"),
        schema: match format["type"].as_str() {
            Some("json_schema") => Some(&format["json_schema"]["schema"]),
            Some("json_object") => Some(&Value::Null),
            _ => None,
        },
    })
}

async fn completions(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let prompt = generate::items(call.required("prompt")?).iter().flat_map(generate::item_ids).collect();
    Ok(respond(sim, call, StreamKind::Completion, prompt, Reply::Text).await)
}

#[derive(Debug, Clone, Copy)]
enum StreamKind {
    Chat,
    Completion,
}

async fn respond(sim: Arc<Sim>, call: Call, kind: StreamKind, prompt: Vec<u32>, reply: Reply) -> Response {
    let (planned, finish) = plan_tokens(&call);
    let pieces = reply.pieces(planned);
    let tokens = reply.tokens(planned);
    let finish = match reply {
        Reply::Text => finish,
        Reply::Json(_) => "stop",
        Reply::Call { .. } => "tool_calls",
    };
    let n = choices_count(&call.body);
    let work = call.work(prompt);
    let plan = Plan {
        kind,
        id: new_id(match kind {
            StreamKind::Chat => "chatcmpl",
            StreamKind::Completion => "cmpl",
        }),
        created: now(),
        model: call.model,
        n,
        tokens,
        finish,
        call_id: new_id("call").replace('-', "_"),
        reply,
        pieces,
        prompt: work.prompt.len() as u32,
        work,
        include_usage: call.body["stream_options"]["include_usage"].as_bool() == Some(true),
        behaviour: call.behaviour,
    };
    if call.body["stream"].as_bool() == Some(true) {
        stream(sim, plan)
    } else {
        let job = sim.run(plan.work.clone()).await;
        pause(job.whole(&plan.behaviour, tokens)).await;
        job.finish(tokens * n);
        Json(plan.whole()).into_response()
    }
}

/// Everything needed to write one completion, whole or as a stream.
struct Plan {
    kind: StreamKind,
    id: String,
    created: u64,
    model: String,
    n: u32,
    /// Tokens generated: text tokens, or those of the JSON or the tool call's arguments.
    tokens: u32,
    finish: &'static str,
    call_id: String,
    reply: Reply,
    /// What streams, piece by piece: text tokens, JSON, or the tool call's arguments.
    pieces: Vec<String>,
    prompt: u32,
    work: Work,
    include_usage: bool,
    behaviour: Behaviour,
}

impl Plan {
    fn whole(&self) -> Value {
        let text = self.pieces.concat();
        let choices: Vec<Value> = (0..self.n)
            .map(|index| match self.kind {
                StreamKind::Chat => json!({
                    "index": index,
                    "message": match &self.reply {
                        Reply::Call { name, arguments } => json!({"role": "assistant", "content": null,
                            "refusal": null, "tool_calls": [self.tool_call(name, arguments)]}),
                        _ => json!({"role": "assistant", "content": text, "refusal": null}),
                    },
                    "logprobs": null,
                    "finish_reason": self.finish,
                }),
                StreamKind::Completion => {
                    json!({"index": index, "text": text, "logprobs": null, "finish_reason": self.finish})
                }
            })
            .collect();
        let object = match self.kind {
            StreamKind::Chat => "chat.completion",
            StreamKind::Completion => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices, "usage": usage(self.prompt, self.tokens * self.n),
        })
    }

    fn tool_call(&self, name: &str, arguments: &str) -> Value {
        json!({"id": self.call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    }

    /// One chunk with one choice. `piece` is the new text (or the tool call's
    /// arguments, the first piece with the call's id and name), `None` for the
    /// role-only opening chunk of chat.
    fn chunk(&self, index: u32, piece: Option<(usize, &str)>, finish: Option<&str>) -> Value {
        let (object, choice) = match self.kind {
            StreamKind::Chat => {
                let delta = match (piece, finish, &self.reply) {
                    (_, Some(_), _) => json!({}),
                    (None, None, _) => json!({"role": "assistant", "content": ""}),
                    (Some((0, text)), None, Reply::Call { name, .. }) => {
                        let mut call = self.tool_call(name, text);
                        call["index"] = json!(0);
                        json!({"tool_calls": [call]})
                    }
                    (Some((_, text)), None, Reply::Call { .. }) => {
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
                    }
                    (Some((_, text)), None, _) => json!({"content": text}),
                };
                (
                    "chat.completion.chunk",
                    json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}),
                )
            }
            StreamKind::Completion => (
                "text_completion",
                json!({"index": index, "text": piece.map_or("", |(_, text)| text), "logprobs": null,
                       "finish_reason": finish}),
            ),
        };
        let mut chunk =
            json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn usage_chunk(&self) -> Value {
        let object = match self.kind {
            StreamKind::Chat => "chat.completion.chunk",
            StreamKind::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": usage(self.prompt, self.tokens * self.n)})
    }
}

fn sse(event: &Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(format!("data: {event}\n\n")))
}

/// Streams `plan` as server-sent events with the planned delays. An abort
/// drops the connection mid-body, as a crashing engine would.
fn stream(sim: Arc<Sim>, plan: Plan) -> Response {
    call::streamed("text/event-stream", |tx| async move {
        let job = sim.run(plan.work.clone()).await;
        pause(job.first_token(&plan.behaviour)).await;
        if matches!(plan.kind, StreamKind::Chat) {
            for index in 0..plan.n {
                if tx.send(sse(&plan.chunk(index, None, None))).await.is_err() {
                    return;
                }
            }
        }
        for (i, piece) in plan.pieces.iter().enumerate() {
            if plan.behaviour.abort_after == Some(i as u32) {
                until_abort(&plan.behaviour).await;
                let _ = tx.send(Err(std::io::Error::other("simulated abort"))).await;
                return;
            }
            sim.hold(&plan.behaviour, i).await;
            if i > 0 {
                pause(job.next_token(&plan.behaviour)).await;
            }
            for index in 0..plan.n {
                if tx.send(sse(&plan.chunk(index, Some((i, piece)), None))).await.is_err() {
                    return;
                }
            }
        }
        for index in 0..plan.n {
            let _ = tx.send(sse(&plan.chunk(index, None, Some(plan.finish)))).await;
        }
        if plan.include_usage {
            let _ = tx.send(sse(&plan.usage_chunk())).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        job.finish(plan.tokens * plan.n);
    })
}

async fn embeddings(State(sim): State<Arc<Sim>>, call: Call) -> Result<Response, Response> {
    let inputs = generate::items(call.required("input")?);
    let dim = call.body["dimensions"].as_u64().map_or(sim.settings.embedding_dim, |d| d.clamp(1, 8192) as usize);
    let base64 = call.body["encoding_format"].as_str() == Some("base64");
    let prompt: Vec<u32> = inputs.iter().flat_map(generate::item_ids).collect();
    let prompt_tokens = prompt.len();
    let job = sim.run(Work { max_output: 0, ..call.work(prompt) }).await;
    pause(job.first_token(&call.behaviour)).await;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let vector = generate::embedding(item, dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    job.finish(0);
    Ok(Json(json!({"object": "list", "data": data, "model": call.model,
                   "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}))
    .into_response())
}

async fn list_models(State(sim): State<Arc<Sim>>) -> Response {
    let model =
        |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm", "root": id, "parent": null});
    let mut data: Vec<Value> = sim.settings.models.iter().map(|id| model(id)).collect();
    for (name, path) in sim.adapters.list() {
        let mut adapter = model(&name);
        adapter["root"] = json!(path);
        adapter["parent"] = json!(sim.parent_model());
        data.push(adapter);
    }
    Json(json!({"object": "list", "data": data})).into_response()
}
