//! The interface every backend dialect implements: how a client's OpenAI
//! request becomes the backend's ([`RequestTranslator`]), how the backend's
//! secret authorizes it ([`Credential`]), and how the backend's answer, whole
//! or streamed, becomes OpenAI's ([`ResponseTranslator`]). One file per
//! dialect implements it ([`crate::openai`], [`crate::anthropic`],
//! [`crate::ollama`]), with the helpers they share in [`crate::params`] and
//! [`crate::stream`], and [`registered`] is the one place that names them.
//! ext-proc drives them from Envoy's messages and the stream guard from the
//! bytes it relays (both through [`crate::call`]); neither knows any dialect.
//!
//! The two halves meet through a [`ResponseContext`]: what the answer's
//! translation must know of the request.

use crate::client::{ClientContext, ThroughChat};
use crate::{anthropic, ollama, openai};
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
use modelgate_proto::stored_response::StoredResponse;
use serde_json::Value;

/// The request as the backend gets it.
#[derive(Debug, PartialEq)]
pub struct BackendRequest {
    /// A new path, when the backend's API has another one (it may name the model).
    pub path: Option<String>,
    /// A new body; `None` when the body goes on as the client sent it.
    pub body: Option<Vec<u8>>,
}

/// Headers to set and remove on a request or response.
#[derive(Debug, Default, PartialEq)]
pub struct HeaderChanges {
    pub set: Vec<(&'static str, String)>,
    pub remove: Vec<&'static str>,
}

impl HeaderChanges {
    pub fn extend(&mut self, more: HeaderChanges) {
        self.set.extend(more.set);
        self.remove.extend(more.remove);
    }
}

/// A request as it leaves for the backend, final but for its credential: what a signature covers.
pub struct OutgoingRequest<'a> {
    pub method: &'static str,
    pub path: &'a str,
    /// The headers the dialect sets; the rest are the client's.
    pub headers: &'a [(&'static str, String)],
    pub body: &'a [u8],
}

/// How a backend's secret authorizes a request: a header that carries it, or
/// a signature over the request (as AWS SigV4 signs method, path, headers and body).
pub trait Credential: Send {
    fn authorize(&self, request: &OutgoingRequest<'_>) -> HeaderChanges;
}

/// `authorization: Bearer <key>`, as OpenAI's and Ollama's APIs take a key.
pub struct Bearer(pub String);

impl Credential for Bearer {
    fn authorize(&self, _: &OutgoingRequest<'_>) -> HeaderChanges {
        HeaderChanges { set: vec![("authorization", format!("Bearer {}", self.0))], remove: Vec::new() }
    }
}

/// The key as it is, in a header of its own (Anthropic's `x-api-key`).
pub struct KeyHeader {
    pub name: &'static str,
    pub key: String,
}

impl Credential for KeyHeader {
    fn authorize(&self, _: &OutgoingRequest<'_>) -> HeaderChanges {
        HeaderChanges { set: vec![(self.name, self.key.clone())], remove: Vec::new() }
    }
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
pub trait RequestTranslator: Send {
    /// The backend's request for the client's OpenAI request body.
    fn request(&mut self, body: &[u8]) -> Result<BackendRequest, GatewayError>;

    /// The headers the backend's API needs besides its credential (a version
    /// header), and the client's it must not get.
    fn headers(&self) -> HeaderChanges {
        HeaderChanges::default()
    }

    /// How the backend's secret (its API key) authorizes a request.
    fn credential(&self, secret: String) -> Box<dyn Credential> {
        Box::new(Bearer(secret))
    }

    /// What translating the answer needs to know of the request, once
    /// [`RequestTranslator::request`] has read it; `None` for backends whose
    /// answers are already OpenAI's.
    fn response_context(&self) -> Option<ResponseContext> {
        None
    }
}

/// How one backend answer becomes OpenAI's.
pub trait ResponseTranslator: Send {
    /// What to do with the answer, from its status and content-type.
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan;

    /// A whole answer body, success or error, in OpenAI's shape.
    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8>;

    /// The next piece of a streamed answer as OpenAI server-sent events,
    /// possibly empty; `end` on the last piece. The pieces are the backend's
    /// bytes cut anywhere: the translation frames them itself.
    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8>;

    /// Whether [`ResponseTranslator::stream`] has ended the stream with an
    /// error event (an event too long to hold, or one it cannot read): the
    /// rest of the backend's stream need not be read, nothing of it goes on.
    fn ended(&self) -> bool;

    /// The response to store, once the answer has completed (whole, or its
    /// stream's last piece translated): a Responses API answer whose request
    /// asked for `store`. `None` for everything else.
    fn finished(&mut self) -> Option<StoredResponse> {
        None
    }
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
    /// The most of one unfinished record (SSE event, NDJSON line) of a streamed answer held; one that outgrows it ends the stream.
    pub max_event_bytes: usize,
    /// For a client API translated through chat completions: what its
    /// translation needs; the answer, once a chat completion, is translated again.
    pub client: Option<ClientContext>,
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
            client: None,
        }
    }

    /// The translator of this request's answer; `None` when it is what the client gets already.
    pub fn translator(&self) -> Option<Box<dyn ResponseTranslator>> {
        let backend = registered(self.dialect).answers.map(|answers| answers(self));
        match &self.client {
            None => backend,
            Some(client) => Some(Box::new(ThroughChat::new(backend, client.translator(self.max_event_bytes)))),
        }
    }
}

/// Makes a dialect's request translator; refuses an endpoint the backend lacks.
pub type NewRequestTranslator = fn(BackendProfile, Endpoint) -> Result<Box<dyn RequestTranslator>, GatewayError>;

/// Makes a dialect's answer translator.
pub type NewResponseTranslator = fn(&ResponseContext) -> Box<dyn ResponseTranslator>;

/// A dialect's two halves.
pub struct Registered {
    pub requests: NewRequestTranslator,
    /// `None` for a dialect whose answers are OpenAI's already.
    pub answers: Option<NewResponseTranslator>,
}

/// Every dialect, registered here once: a new dialect is an arm of this match.
pub fn registered(dialect: Dialect) -> Registered {
    match dialect {
        Dialect::Openai => {
            Registered { requests: |p, e| Ok(Box::new(openai::OpenaiRequest::new(p, e)?)), answers: None }
        }
        Dialect::Anthropic => Registered {
            requests: |p, e| Ok(Box::new(anthropic::AnthropicRequest::new(p, e)?)),
            answers: Some(|c| Box::new(anthropic::AnthropicAnswer::new(c))),
        },
        Dialect::Ollama => Registered {
            requests: |p, e| Ok(Box::new(ollama::OllamaRequest::new(p, e)?)),
            answers: Some(|c| Box::new(ollama::OllamaAnswer::new(c))),
        },
    }
}

/// The request translator for `endpoint` of a backend with `profile`; an
/// endpoint the backend lacks is refused here.
pub fn request_translator(
    profile: BackendProfile,
    endpoint: Endpoint,
) -> Result<Box<dyn RequestTranslator>, GatewayError> {
    (registered(profile.dialect).requests)(profile, endpoint)
}

/// What the dialects' tests share: feeding a stream through a translation.
#[cfg(test)]
pub mod testing {
    use super::ResponseTranslator;
    use serde_json::Value;

    /// The translated stream for `pieces`, fed in order, the last marked as the end.
    pub fn feed(translation: &mut dyn ResponseTranslator, pieces: &[&[u8]]) -> String {
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

    #[test]
    fn every_dialect_that_translates_requests_translates_answers() {
        for dialect in [Dialect::Openai, Dialect::Anthropic, Dialect::Ollama] {
            let mut translator =
                request_translator(BackendProfile { dialect, ..Default::default() }, Endpoint::ChatCompletions)
                    .unwrap();
            translator.request(br#"{"model":"m","messages":[]}"#).unwrap();
            let context = translator.response_context();
            assert_eq!(context.is_some(), registered(dialect).answers.is_some(), "{dialect:?}");
            assert!(context.is_none_or(|c| c.dialect == dialect && c.translator().is_some()));
        }
    }

    #[test]
    fn only_openai_backends_tokenize_and_the_others_name_their_dialect() {
        for endpoint in [Endpoint::Tokenize, Endpoint::Detokenize] {
            let profile = |dialect| BackendProfile { dialect, ..Default::default() };
            assert!(request_translator(profile(Dialect::Openai), endpoint).is_ok());
            for (dialect, named) in [(Dialect::Anthropic, "an Anthropic"), (Dialect::Ollama, "an Ollama")] {
                let Err(refused) = request_translator(profile(dialect), endpoint) else {
                    panic!("{dialect:?} does not serve {endpoint:?}");
                };
                assert_eq!(refused.status, 404);
                let body: Value = serde_json::from_slice(&refused.to_json()).unwrap();
                assert_eq!(body["error"]["code"], "unsupported_endpoint");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains(named) && message.contains(endpoint.path()), "{message}");
            }
        }
    }

    #[test]
    fn credentials_are_headers_or_signatures_over_the_final_request() {
        let request = OutgoingRequest { method: "POST", path: "/v1/messages", headers: &[], body: b"{}" };
        assert_eq!(Bearer("k".into()).authorize(&request).set, [("authorization", "Bearer k".to_string())]);
        assert_eq!(
            KeyHeader { name: "x-api-key", key: "k".into() }.authorize(&request).set,
            [("x-api-key", "k".to_string())]
        );
    }
}
