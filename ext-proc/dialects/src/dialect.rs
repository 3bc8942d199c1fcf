//! The two interfaces every backend dialect implements: how a client's OpenAI
//! request becomes the backend's ([`Translation`]), and how the backend's
//! answer, whole or streamed, becomes OpenAI's ([`ResponseTranslation`]). One
//! file per dialect implements them ([`crate::openai`], [`crate::anthropic`],
//! [`crate::ollama`]); ext-proc drives them from Envoy's messages and
//! the the stream guard drives them from the bytes it relays (both
//! through [`crate::call`]), and neither knows anything of any dialect.
//!
//! The two halves meet through a [`ResponseContext`]: what the answer's
//! translation must know of the request.

use crate::{anthropic, ollama, openai};
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::{error_event, DEFAULT_MAX_EVENT_BYTES};
use serde_json::Value;

/// The OpenAI endpoint a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The endpoint of a request path (a query string is ignored).
    pub fn from_path(path: &[u8]) -> Option<Self> {
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        match path {
            b"/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            b"/v1/completions" => Some(Endpoint::Completions),
            b"/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// The request as the backend gets it.
#[derive(Debug, PartialEq)]
pub struct UpstreamRequest {
    /// A new path, when the backend's API has another one.
    pub path: Option<&'static str>,
    /// A new body; `None` when the body goes on as the client sent it.
    pub body: Option<Vec<u8>>,
}

/// Headers to set and remove on a request or response.
#[derive(Debug, Default, PartialEq)]
pub struct HeaderChanges {
    pub set: Vec<(&'static str, String)>,
    pub remove: Vec<&'static str>,
}

/// How a response's body must be handled, decided from its status and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsePlan {
    /// The status the client gets.
    pub status: u16,
    /// Translate the body as a stream, piece by piece; otherwise whole.
    pub streamed: bool,
    /// The client's content-type, when it differs from the backend's.
    pub content_type: Option<&'static str>,
}

/// How one request becomes the backend's.
pub trait Translation: Send {
    /// The backend's request for the client's OpenAI request body.
    fn request(&mut self, body: &[u8]) -> Result<UpstreamRequest, GatewayError>;

    /// The headers the backend needs besides the body: its API key (if there
    /// is one) in the header its API reads, and any version header.
    fn upstream_headers(&self, key: Option<&str>) -> HeaderChanges;

    /// Whether the backend's answers need translating at all; known before
    /// the request body is.
    fn translates_responses(&self) -> bool {
        false
    }

    /// What translating the answer needs to know of the request, once
    /// [`Translation::request`] has read it; `None` for backends whose answers
    /// are already OpenAI's (ext_proc does not even see those).
    fn response_context(&self) -> Option<ResponseContext> {
        None
    }
}

/// How one backend answer becomes OpenAI's.
pub trait ResponseTranslation: Send {
    /// What to do with the answer, from its status and content-type.
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan;

    /// A whole answer body, success or error, in OpenAI's shape.
    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8>;

    /// The next piece of a streamed answer as OpenAI server-sent events,
    /// possibly empty; `end` on the last piece. The pieces are the backend's
    /// bytes cut anywhere: the translation frames them itself.
    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8>;

    /// Whether [`ResponseTranslation::stream`] has ended the stream with an
    /// error event (an event too long to hold, or one it cannot read): the
    /// rest of the backend's stream need not be read, nothing of it goes on.
    fn ended(&self) -> bool;
}

/// What an answer's translation needs to know of its request.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseContext {
    pub dialect: Dialect,
    pub endpoint: Endpoint,
    /// The model the client asked for, which some dialects' answers lack.
    pub model: Value,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The client asked for base64 embeddings (the openai SDKs' default).
    pub base64: bool,
    /// The most of one unfinished event (or NDJSON line) of a streamed answer held; one that outgrows it ends the stream.
    pub max_event_bytes: usize,
}

impl ResponseContext {
    pub fn new(dialect: Dialect, endpoint: Endpoint) -> Self {
        ResponseContext {
            dialect,
            endpoint,
            model: Value::Null,
            include_usage: false,
            base64: false,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
        }
    }

    /// The translation of this request's answer; `None` when it is OpenAI's already.
    pub fn translation(&self) -> Option<Box<dyn ResponseTranslation>> {
        match self.dialect {
            Dialect::Openai => None,
            Dialect::Anthropic => Some(Box::new(anthropic::Responses::new(self))),
            Dialect::Ollama => Some(Box::new(ollama::Responses::new(self))),
        }
    }
}

/// The translation for a request to `endpoint` of a backend with `profile`.
pub fn for_backend(profile: BackendProfile, endpoint: Endpoint) -> Result<Box<dyn Translation>, GatewayError> {
    match profile.dialect {
        Dialect::Openai => Ok(Box::new(openai::Rewrite::new(profile))),
        Dialect::Anthropic => {
            anthropic::Translation::new(profile, endpoint).map(|t| Box::new(t) as Box<dyn Translation>)
        }
        Dialect::Ollama => Ok(Box::new(ollama::Translation::new(profile, endpoint))),
    }
}

/// What every chunk of one translated OpenAI stream repeats, and how chunks are written.
pub struct StreamHead {
    id: Value,
    /// `chat.completion.chunk` or `text_completion`.
    object: &'static str,
    created: u64,
    /// The client asked for the usage chunk (`stream_options.include_usage`).
    include_usage: bool,
    /// `{"id":…,"object":…,"created":…,"model":…,`: every chunk's start, serialised once per stream.
    prefix: Vec<u8>,
}

impl StreamHead {
    pub fn new(object: &'static str, id: Value, model: Value, include_usage: bool) -> Self {
        let mut head = StreamHead { id: Value::Null, object, created: unix_now(), include_usage, prefix: Vec::new() };
        head.identify(id, model);
        head
    }

    /// Sets the stream's id and model, for dialects that name them only in their first event.
    pub fn identify(&mut self, id: Value, model: Value) {
        self.prefix = format!(r#"{{"id":{id},"object":"{}","created":{},"model":{model},"#, self.object, self.created)
            .into_bytes();
        self.id = id;
    }

    pub fn id(&self) -> &Value {
        &self.id
    }

    /// Writes a chunk with one choice.
    pub fn write_choice(&self, out: &mut Vec<u8>, choice: Value) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(br#""choices":["#);
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &choice);
        out.push(b']');
        // With the usage chunk asked for, every other chunk says `usage: null`, as OpenAI's do.
        if self.include_usage {
            out.extend_from_slice(br#","usage":null"#);
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// Ends the stream: the usage chunk if it was asked for, then `[DONE]`.
    pub fn write_end(&self, out: &mut Vec<u8>, usage: Value) {
        if self.include_usage {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(br#""choices":[],"usage":"#);
            let _ = serde_json::to_writer(&mut *out, &usage);
            out.extend_from_slice(b"}\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

/// `out` followed by `error`'s event: how a translated stream ends early (an
/// event too long to hold, one that cannot be read), logged once here.
pub fn ended_early(mut out: Vec<u8>, error: &GatewayError) -> Vec<u8> {
    tracing::warn!(reason = error.body.message, "ending a translated stream early");
    out.extend_from_slice(&error_event(error));
    out
}

/// Seconds since the Unix epoch: OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// OpenAI's answer for an endpoint the model's backend does not offer.
pub fn unsupported_endpoint(endpoint: Endpoint, backend: &str) -> GatewayError {
    GatewayError::new(
        404,
        modelgate_proto::error::INVALID_REQUEST,
        format!("This model is served by {backend} backend, which does not support {}.", endpoint.path()),
        None,
        Some("unsupported_endpoint"),
    )
}

/// OpenAI's 400 for a parameter the backend cannot honour.
pub fn unsupported_parameter(param: &str, why: &str) -> GatewayError {
    GatewayError::invalid_request(
        format!("Unsupported parameter: '{param}' {why}."),
        Some(param),
        Some("unsupported_parameter"),
    )
}

/// What the dialects' tests share: feeding a stream through a translation.
#[cfg(test)]
pub mod testing {
    use super::ResponseTranslation;
    use serde_json::Value;

    /// The translated stream for `pieces`, fed in order, the last marked as the end.
    pub fn feed(translation: &mut dyn ResponseTranslation, pieces: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            out.extend(translation.stream(piece, i + 1 == pieces.len()));
        }
        String::from_utf8(out).unwrap()
    }

    /// The `delta` of each chunk that has a choice.
    pub fn deltas(chunks: &[Value]) -> Vec<&Value> {
        chunks.iter().filter_map(|c| c["choices"].get(0).map(|c| &c["delta"])).collect()
    }

    /// The JSON of each `data:` event of an OpenAI stream, `[DONE]` left out.
    pub fn chunks(sse: &str) -> Vec<Value> {
        sse.split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_are_openai_chunks_in_openais_key_order() {
        let mut head = StreamHead::new("chat.completion.chunk", Value::Null, Value::Null, true);
        head.identify(json!("msg_1"), json!("claude-x"));
        let mut out = Vec::new();
        head.write_choice(&mut out, json!({"index": 0, "delta": {"content": "Hi \"there\""}}));
        head.write_end(&mut out, json!({"total_tokens": 3}));
        let created = head.created;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "data: {{\"id\":\"msg_1\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":\"claude-x\",\"choices\":[{{\"delta\":{{\"content\":\"Hi \\\"there\\\"\"}},\"index\":0}}],\"usage\":null}}\n\n\
                 data: {{\"id\":\"msg_1\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":\"claude-x\",\"choices\":[],\"usage\":{{\"total_tokens\":3}}}}\n\n\
                 data: [DONE]\n\n"
            )
        );
    }

    #[test]
    fn endpoints_are_read_from_paths() {
        assert_eq!(Endpoint::from_path(b"/v1/chat/completions?x=1"), Some(Endpoint::ChatCompletions));
        assert_eq!(Endpoint::from_path(b"/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::from_path(b"/v1/models"), None);
    }
}
