//! Answers kept and served again: the response cache's key, which requests
//! it may serve, an answer turned into its whole form (a stream assembled),
//! and that whole form replayed as the client asks for it, whole or as a
//! stream. Pure: ext-proc's gate runs it, the fuzz targets and property
//! tests drive it.
//!
//! What is kept is the answer in OpenAI's shape as the client got it (after
//! any translation), so a hit skips both the backend and the translation.

use crate::usage::Usage;
use serde_json::Value;

/// The endpoints whose answers the cache keeps: chat completions,
/// completions and embeddings, whose answers are one object (or a stream
/// that assembles into one).
pub fn cacheable_path(path: &str) -> bool {
    let _ = path;
    false
}

/// The request is deterministic by its parameters: `temperature: 0`, or a `seed`.
pub fn is_deterministic(body: &Value) -> bool {
    let _ = body;
    false
}

/// The cache key: a hex SHA-256 over the partition (a key's name, or the
/// shared partition), the path, the routed model and the body in one
/// canonical JSON form (keys sorted, no whitespace) without the members
/// that do not change the answer (`stream`, `stream_options`, `user`, `metadata`).
pub fn cache_key(partition: &str, path: &str, model: &str, body: &Value) -> String {
    let _ = (partition, path, model, body);
    String::new()
}

/// What an idempotent request is compared by: a hex SHA-256 over the path,
/// the model and the whole body in canonical form, so a repeat with the
/// same meaning matches whatever its key order or whitespace.
pub fn request_digest(path: &str, model: &str, body: &Value) -> String {
    let _ = (path, model, body);
    String::new()
}

/// Whether the client asked for a stream, and for its usage chunk
/// (`stream_options.include_usage`).
pub fn stream_asked(body: &Value) -> (bool, bool) {
    let _ = body;
    (false, false)
}

/// An answer's whole form, as the filter handed it over (`stream` when it
/// was an SSE stream, whose chunks are assembled into one object: content
/// and tool calls joined, the finish reason, the usage). `None` for what is
/// never kept: not an answer of `path`'s shape, an error, or a stream cut
/// short (no finish reason, an error event, no `[DONE]`).
pub fn whole_answer(path: &str, stream: bool, bytes: &[u8], usage: Option<&Usage>) -> Option<Value> {
    let _ = (path, stream, bytes, usage);
    None
}

/// A kept whole answer as the client asks for it: the JSON object, or an
/// SSE stream with the same content and finish reason (the usage chunk
/// only when `include_usage`), ending with `[DONE]`. Its content type, and the bytes.
pub fn replay(path: &str, whole: &Value, stream: bool, include_usage: bool) -> (&'static str, Vec<u8>) {
    let _ = (path, whole, stream, include_usage);
    ("application/json", Vec::new())
}
