//! Answers kept and served again: the response cache's key, which requests
//! it may serve, an answer turned into its whole form (a stream assembled),
//! and that whole form replayed as the client asks for it, whole or as a
//! stream. Pure: ext-proc's gate runs it, the fuzz targets and property
//! tests drive it.
//!
//! What is kept is the answer in OpenAI's shape as the client got it (after
//! any translation), so a hit skips both the backend and the translation.
//!
//! A stream is assembled member by member, whatever the backend adds to
//! OpenAI's deltas (a `reasoning_content`, say): text is joined, lists are
//! extended, objects merged, and an identity (`role`, `id`, `type`, `name`,
//! `index`) or any other value replaces what came before. Replaying the
//! assembled answer as a stream and assembling that again gives it back
//! exactly; a whole answer as a backend sent it is kept as it is.

use crate::endpoint::Endpoint;
use crate::framing::{event_data, write_data, Framing};
use crate::usage::Usage;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The endpoints whose answers the cache keeps: chat completions,
/// completions and embeddings, whose answers are one object (or a stream
/// that assembles into one).
pub fn cacheable_path(path: &str) -> bool {
    Kind::of(path).is_some()
}

/// The request is deterministic by its parameters: `temperature: 0`, or a
/// `seed`. Embeddings always are (nothing is sampled).
pub fn is_deterministic(path: &str, body: &Value) -> bool {
    Kind::of(path) == Some(Kind::Embeddings)
        || body.get("temperature").and_then(Value::as_f64) == Some(0.0)
        || body.get("seed").is_some_and(Value::is_number)
}

/// The top-level members that do not change the answer, left out of the cache key.
const NON_SEMANTIC: [&str; 4] = ["stream", "stream_options", "user", "metadata"];

/// The cache key: a hex SHA-256 over the partition (a key's name, or the
/// shared partition), the path, the routed model and the body in one
/// canonical JSON form (keys sorted, no whitespace) without the members
/// that do not change the answer (`stream`, `stream_options`, `user`, `metadata`).
pub fn cache_key(partition: &str, path: &str, model: &str, body: &Value) -> String {
    digest("modelgate.cache.v1", &[partition, path, model], body, &NON_SEMANTIC)
}

/// The cache's partition of a request: one per client key (named apart, so
/// that no key's name is the shared partition's), or the one `shared` by all.
pub fn partition(shared: bool, owner: &str) -> String {
    if shared {
        "shared".to_string()
    } else {
        format!("key:{owner}")
    }
}

/// The key of a worker's local copy of a cached answer: a hex SHA-256 over
/// the partition, path, routed model and the client's body bytes exactly as
/// they came. Only byte-identical requests share it, and such a request asks
/// for the same replay (whole or streamed, with or without usage), so the
/// copy is the answer's bytes as ext-proc replayed them; no JSON is read.
pub fn local_key(partition: &str, path: &str, model: &str, raw_body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in ["modelgate.local.v1".as_bytes(), partition.as_bytes(), path.as_bytes(), model.as_bytes(), raw_body] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// What an idempotent request is compared by: a hex SHA-256 over the path,
/// the model and the whole body in canonical form, so a repeat with the
/// same meaning matches whatever its key order or whitespace.
pub fn request_digest(path: &str, model: &str, body: &Value) -> String {
    digest("modelgate.request.v1", &[path, model], body, &[])
}

/// Whether the client asked for a stream, and for its usage chunk
/// (`stream_options.include_usage`, which only a stream has).
pub fn stream_asked(body: &Value) -> (bool, bool) {
    let stream = body.get("stream") == Some(&Value::Bool(true));
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    (stream, stream && include_usage)
}

/// An answer's whole form, as the filter handed it over (`stream` when it
/// was an SSE stream, whose chunks are assembled into one object: content
/// and tool calls joined, the finish reason, the usage). `None` for what is
/// never kept: not an answer of `path`'s shape, an error, or a stream cut
/// short (no finish reason, an error event, no `[DONE]`).
pub fn whole_answer(path: &str, stream: bool, bytes: &[u8], usage: Option<&Usage>) -> Option<Value> {
    let kind = Kind::of(path)?;
    let mut whole = if stream { Assembly::of(kind, bytes)? } else { kind.kept_whole(bytes)? };
    if let (Some(usage), Value::Object(members)) = (usage, &mut whole) {
        if members.get("usage").is_none_or(Value::is_null) {
            members.insert("usage".into(), usage_object(usage));
        }
    }
    Some(whole)
}

/// An SSE stream of any client API that ended in an error event (the
/// stream guard's `stream_interrupted`, Anthropic's `event: error`, the
/// Responses API's `error` or `response.failed`): what an idempotent repeat
/// must not be served, though its status was a 200 and its end clean.
pub fn stream_broken(bytes: &[u8]) -> bool {
    event_data(bytes).iter().any(|data| {
        let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(data) else {
            return false;
        };
        event.get("error").is_some_and(|error| !error.is_null())
            || matches!(event.get("type").and_then(Value::as_str), Some("error" | "response.failed"))
    })
}

/// A kept whole answer as the client asks for it: the JSON object, or an
/// SSE stream with the same content and finish reason (the usage chunk
/// only when `include_usage`), ending with `[DONE]`. Its content type, and the bytes.
/// Embeddings are never streamed.
pub fn replay(path: &str, whole: &Value, stream: bool, include_usage: bool) -> (&'static str, Vec<u8>) {
    match Kind::of(path).and_then(|kind| Some((kind, kind.chunk_object()?))) {
        Some((kind, chunk_object)) if stream => {
            (Framing::Sse.content_type(), Replay { kind, chunk_object, whole, include_usage }.stream())
        }
        _ => ("application/json", serde_json::to_vec(whole).unwrap_or_default()),
    }
}

/// The endpoints the cache keeps, by the shape of their answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
    Embeddings,
}

impl Kind {
    fn of(path: &str) -> Option<Kind> {
        match Endpoint::from_path(path.as_bytes())? {
            Endpoint::ChatCompletions => Some(Kind::Chat),
            Endpoint::Completions => Some(Kind::Completion),
            Endpoint::Embeddings => Some(Kind::Embeddings),
            _ => None,
        }
    }

    /// A whole answer's `object`.
    fn object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
            Kind::Embeddings => "list",
        }
    }

    /// A stream chunk's `object`; embeddings are never streamed.
    fn chunk_object(self) -> Option<&'static str> {
        match self {
            Kind::Chat => Some("chat.completion.chunk"),
            Kind::Completion => Some("text_completion"),
            Kind::Embeddings => None,
        }
    }

    /// A whole answer as the backend sent it, if it is one to keep: this
    /// endpoint's object, no error, and (but for embeddings) every choice finished.
    fn kept_whole(self, bytes: &[u8]) -> Option<Value> {
        let whole: Value = serde_json::from_slice(bytes).ok()?;
        let finished = |choice: &Value| {
            choice.get("finish_reason").is_some_and(Value::is_string)
                && match self {
                    Kind::Chat => choice.get("message").is_some_and(Value::is_object),
                    _ => choice.get("text").is_some_and(Value::is_string),
                }
        };
        let kept = whole.get("object").and_then(Value::as_str) == Some(self.object())
            && whole.get("error").is_none_or(Value::is_null)
            && match self {
                Kind::Embeddings => whole.get("data").is_some_and(Value::is_array),
                _ => whole
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(|choices| !choices.is_empty() && choices.iter().all(finished)),
            };
        kept.then_some(whole)
    }
}

fn usage_object(usage: &Usage) -> Value {
    json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
           "total_tokens": usage.total()})
}

/// A hasher written into as serde_json writes.
struct Hasher(Sha256);

impl std::io::Write for Hasher {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A hex SHA-256 over `domain` and `parts` (each after its length, so no two
/// lists of parts hash alike) and `body` in canonical form, without its
/// top-level members named in `skip`.
fn digest(domain: &str, parts: &[&str], body: &Value, skip: &[&str]) -> String {
    let mut hasher = Hasher(Sha256::new());
    for part in std::iter::once(&domain).chain(parts) {
        hasher.0.update((part.len() as u64).to_be_bytes());
        hasher.0.update(part.as_bytes());
    }
    write_canonical(&mut hasher, body, skip);
    hex::encode(hasher.0.finalize())
}

/// JSON with object members sorted by name at every depth and no
/// whitespace, so the same meaning is written the same whatever order and
/// spacing the client used (sorted here, whatever order `Map` keeps).
fn write_canonical(out: &mut Hasher, value: &Value, skip: &[&str]) {
    match value {
        Value::Object(members) => {
            let mut members: Vec<_> = members.iter().filter(|(name, _)| !skip.contains(&name.as_str())).collect();
            members.sort_unstable_by_key(|(name, _)| name.as_str());
            out.0.update(b"{");
            for (i, (name, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.0.update(b",");
                }
                write_leaf(out, &Value::String(name.clone()));
                out.0.update(b":");
                write_canonical(out, value, &[]);
            }
            out.0.update(b"}");
        }
        Value::Array(items) => {
            out.0.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.0.update(b",");
                }
                write_canonical(out, item, &[]);
            }
            out.0.update(b"]");
        }
        leaf => write_leaf(out, leaf),
    }
}

fn write_leaf(out: &mut Hasher, leaf: &Value) {
    // Writing into a hasher cannot fail.
    let _ = serde_json::to_writer(out, leaf);
}

/// The members of a chunk that are the answer's own (the rest, such as
/// OpenAI's `obfuscation` padding, belong to the stream).
const HEAD: [&str; 5] = ["id", "created", "model", "system_fingerprint", "service_tier"];

/// Members that name rather than carry text: a later value replaces, never extends.
const IDENTITY: [&str; 5] = ["role", "id", "type", "name", "index"];

/// Adds a later piece of a streamed member to what came before: text is
/// joined (where `join`, and the member is no identity), lists extended,
/// objects merged member by member, anything else replaced; null adds nothing.
fn merge_member(members: &mut Map<String, Value>, name: &str, value: Value, join: bool) {
    if value.is_null() {
        return;
    }
    let Some(before) = members.get_mut(name) else {
        members.insert(name.to_string(), value);
        return;
    };
    match (before, value) {
        (Value::String(text), Value::String(more)) if join && !IDENTITY.contains(&name) => text.push_str(&more),
        (Value::Array(items), Value::Array(more)) => items.extend(more),
        (Value::Object(inner), Value::Object(more)) => {
            for (name, value) in more {
                merge_member(inner, &name, value, join);
            }
        }
        (before, value) => *before = value,
    }
}

/// One choice of a stream, assembled so far.
#[derive(Debug, Default)]
struct ChoiceSoFar {
    /// A chat choice's message (from its deltas); unused for completions.
    message: Map<String, Value>,
    /// A chat message's tool calls, by their `index`.
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    /// The choice's other members: `finish_reason`, `logprobs`, a completion's `text`.
    members: Map<String, Value>,
}

impl ChoiceSoFar {
    fn add_delta(&mut self, delta: Map<String, Value>) -> Option<()> {
        for (name, value) in delta {
            if name != "tool_calls" {
                merge_member(&mut self.message, &name, value, true);
                continue;
            }
            let calls = match value {
                Value::Null => continue,
                Value::Array(calls) => calls,
                _ => return None,
            };
            for (position, call) in calls.into_iter().enumerate() {
                let Value::Object(call) = call else { return None };
                let index = call.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
                let so_far = self.tool_calls.entry(index).or_default();
                for (name, value) in call.into_iter().filter(|(name, _)| name != "index") {
                    merge_member(so_far, &name, value, true);
                }
            }
        }
        Some(())
    }

    /// The whole choice at `index`, if it finished.
    fn finish(self, kind: Kind, index: u64) -> Option<Value> {
        let mut choice = self.members;
        if !choice.get("finish_reason").is_some_and(Value::is_string) {
            return None;
        }
        choice.insert("index".into(), index.into());
        choice.entry("logprobs").or_insert(Value::Null);
        if kind == Kind::Chat {
            let mut message = self.message;
            message.entry("role").or_insert_with(|| "assistant".into());
            message.entry("content").or_insert(Value::Null);
            message.entry("refusal").or_insert(Value::Null);
            if !self.tool_calls.is_empty() {
                message.insert("tool_calls".into(), self.tool_calls.into_values().map(Value::Object).collect());
            }
            choice.insert("message".into(), Value::Object(message));
        } else {
            choice.entry("text").or_insert_with(|| "".into());
        }
        Some(Value::Object(choice))
    }
}

/// A stream's chunks assembled into the whole answer.
#[derive(Debug, Default)]
struct Assembly {
    head: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceSoFar>,
    usage: Option<Value>,
}

impl Assembly {
    /// The whole answer a finished stream of `kind` makes; `None` for one cut short or failed.
    fn of(kind: Kind, bytes: &[u8]) -> Option<Value> {
        let mut assembly = Assembly::default();
        let mut done = false;
        for data in event_data(bytes) {
            if done {
                return None;
            }
            if data == b"[DONE]" {
                done = true;
                continue;
            }
            let Ok(Value::Object(chunk)) = serde_json::from_slice(&data) else { return None };
            assembly.add(kind, chunk)?;
        }
        if !done || assembly.choices.is_empty() {
            return None;
        }
        let mut whole = assembly.head;
        whole.insert("object".into(), kind.object().into());
        let choices = assembly.choices.into_iter().map(|(index, choice)| choice.finish(kind, index));
        whole.insert("choices".into(), choices.collect::<Option<Vec<_>>>()?.into());
        whole.extend(assembly.usage.map(|usage| ("usage".to_string(), usage)));
        Some(Value::Object(whole))
    }

    fn add(&mut self, kind: Kind, chunk: Map<String, Value>) -> Option<()> {
        if chunk.get("object").and_then(Value::as_str) != Some(kind.chunk_object()?) {
            return None;
        }
        for (name, value) in chunk {
            match (name.as_str(), value) {
                (_, Value::Null) | ("object", _) => {}
                ("error", _) => return None,
                ("usage", usage @ Value::Object(_)) => self.usage = Some(usage),
                ("choices", Value::Array(choices)) => {
                    for choice in choices {
                        self.add_choice(kind, choice)?;
                    }
                }
                ("choices", _) => return None,
                (name, value) if HEAD.contains(&name) => {
                    self.head.insert(name.to_string(), value);
                }
                _ => {}
            }
        }
        Some(())
    }

    fn add_choice(&mut self, kind: Kind, choice: Value) -> Option<()> {
        let Value::Object(choice) = choice else { return None };
        let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
        let so_far = self.choices.entry(index).or_default();
        for (name, value) in choice {
            match (kind, name.as_str(), value) {
                (_, "index", _) | (Kind::Chat, "delta", Value::Null) => {}
                (Kind::Chat, "delta", Value::Object(delta)) => so_far.add_delta(delta)?,
                (Kind::Chat, "delta", _) => return None,
                (_, name, value) => {
                    let join = kind == Kind::Completion && name == "text";
                    merge_member(&mut so_far.members, name, value, join);
                }
            }
        }
        Some(())
    }
}

/// A whole answer written as the stream OpenAI sends: per choice a first
/// chunk with the role, then the text, the tool calls (each named, then its
/// arguments) and the finish reason; the usage chunk; `[DONE]`.
struct Replay<'a> {
    kind: Kind,
    chunk_object: &'static str,
    whole: &'a Value,
    include_usage: bool,
}

impl Replay<'_> {
    fn stream(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let choices = self.whole.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (position, choice) in choices.iter().enumerate() {
            let Value::Object(choice) = choice else { continue };
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
            match self.kind {
                Kind::Chat => self.chat_choice(&mut out, index, choice),
                _ => self.completion_choice(&mut out, index, choice),
            }
        }
        if self.include_usage {
            if let Some(usage @ Value::Object(_)) = self.whole.get("usage") {
                self.chunk(&mut out, Vec::new(), usage.clone());
            }
        }
        write_data(&mut out, b"[DONE]");
        out
    }

    /// One chunk: the answer's own members, `choices`, and where the client
    /// asked for usage, `usage` (null but on the last chunk, as OpenAI sends it).
    fn chunk(&self, out: &mut Vec<u8>, choices: Vec<Value>, usage: Value) {
        let mut chunk: Map<String, Value> =
            HEAD.iter().filter_map(|name| Some((name.to_string(), self.whole.get(*name)?.clone()))).collect();
        chunk.insert("object".into(), self.chunk_object.into());
        chunk.insert("choices".into(), choices.into());
        if self.include_usage {
            chunk.insert("usage".into(), usage);
        }
        write_data(out, &serde_json::to_vec(&chunk).unwrap_or_default());
    }

    fn chat_choice(&self, out: &mut Vec<u8>, index: u64, choice: &Map<String, Value>) {
        let delta =
            |out: &mut Vec<u8>, delta: Map<String, Value>, logprobs: Value, finish: Option<&Map<String, Value>>| {
                let mut choice = Map::new();
                choice.insert("index".into(), index.into());
                choice.insert("delta".into(), Value::Object(delta));
                choice.insert("logprobs".into(), logprobs);
                choice.insert("finish_reason".into(), Value::Null);
                if let Some(last) = finish {
                    choice.extend(last.iter().map(|(name, value)| (name.clone(), value.clone())));
                }
                self.chunk(out, vec![Value::Object(choice)], Value::Null);
            };
        let empty = Map::new();
        let message = choice.get("message").and_then(Value::as_object).unwrap_or(&empty);
        let mut logprobs = choice.get("logprobs").cloned().unwrap_or_default();
        let content = message.get("content").unwrap_or(&Value::Null);

        let mut first = Map::new();
        first.insert("role".into(), message.get("role").cloned().unwrap_or_else(|| "assistant".into()));
        if content.is_string() {
            first.insert("content".into(), "".into());
        }
        delta(out, first, Value::Null, None);
        let others: Map<String, Value> = message
            .iter()
            .filter(|(name, value)| {
                !["role", "content", "refusal", "tool_calls"].contains(&name.as_str()) && !value.is_null()
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        if !others.is_empty() {
            delta(out, others, Value::Null, None);
        }
        if let Some(refusal @ Value::String(_)) = message.get("refusal") {
            delta(out, Map::from_iter([("refusal".to_string(), refusal.clone())]), Value::Null, None);
        }
        if !content.is_null() && content.as_str() != Some("") {
            let text = Map::from_iter([("content".to_string(), content.clone())]);
            delta(out, text, std::mem::take(&mut logprobs), None);
        }
        let calls = message.get("tool_calls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, call) in calls.iter().filter_map(Value::as_object).enumerate() {
            let (named, arguments) = tool_call_parts(call, i);
            delta(out, Map::from_iter([("tool_calls".to_string(), json!([named]))]), Value::Null, None);
            if let Some(arguments) = arguments {
                let more = json!([{"index": i, "function": {"arguments": arguments}}]);
                delta(out, Map::from_iter([("tool_calls".to_string(), more)]), Value::Null, None);
            }
        }
        let last: Map<String, Value> = choice
            .iter()
            .filter(|(name, _)| !["index", "message", "delta", "logprobs"].contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        delta(out, Map::new(), logprobs, Some(&last));
    }

    fn completion_choice(&self, out: &mut Vec<u8>, index: u64, choice: &Map<String, Value>) {
        let text = choice.get("text").cloned().unwrap_or_else(|| "".into());
        let logprobs = choice.get("logprobs").cloned().unwrap_or_default();
        let first = json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null});
        self.chunk(out, vec![first], Value::Null);
        let mut last: Map<String, Value> = choice
            .iter()
            .filter(|(name, _)| !["index", "text", "logprobs"].contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        last.insert("index".into(), index.into());
        last.insert("text".into(), "".into());
        last.insert("logprobs".into(), Value::Null);
        self.chunk(out, vec![Value::Object(last)], Value::Null);
    }
}

/// A tool call's first chunk (its id, type and name, arguments empty) and,
/// when it has any, its arguments for the next.
fn tool_call_parts(call: &Map<String, Value>, index: usize) -> (Value, Option<Value>) {
    let mut named = call.clone();
    named.insert("index".into(), index.into());
    let mut arguments = None;
    if let Some(Value::Object(function)) = named.get_mut("function") {
        if let Some(Value::String(text)) = function.get_mut("arguments") {
            arguments = Some(std::mem::take(text)).filter(|text| !text.is_empty()).map(Value::String);
        }
    }
    (Value::Object(named), arguments)
}

#[cfg(test)]
mod tests;
