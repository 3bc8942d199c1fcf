//! The one interface every backend dialect implements: how a client's OpenAI
//! request becomes the backend's, and how the backend's answer, whole or
//! streamed, becomes OpenAI's. One file per dialect implements it
//! ([`crate::openai`], [`crate::anthropic`]); [`crate::exchange`] drives it
//! from Envoy's messages and knows nothing of any dialect.

use crate::{anthropic, openai};
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::error::GatewayError;

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
    pub body: Vec<u8>,
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

/// One request's translation, from the request body to the response's end.
pub trait Translation: Send {
    /// The backend's request for the client's OpenAI request body.
    fn request(&mut self, body: &[u8]) -> Result<UpstreamRequest, GatewayError>;

    /// Whether the backend's answers need translating at all.
    fn translates_responses(&self) -> bool;

    /// What to do with a response, from its status and content-type.
    fn response_plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan;

    /// A whole response body, success or error, in OpenAI's shape.
    fn response(&mut self, status: u16, body: &[u8]) -> Vec<u8>;

    /// The next piece of a streamed response as OpenAI server-sent events,
    /// possibly empty; `end` on the last piece.
    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8>;

    /// The headers the backend needs besides the body: its API key (if there
    /// is one) in the header its API reads, and any version header.
    fn upstream_headers(&self, key: Option<&str>) -> HeaderChanges;
}

/// The translation for a request to `endpoint` of a backend with `profile`.
pub fn for_backend(profile: BackendProfile, endpoint: Endpoint) -> Result<Box<dyn Translation>, GatewayError> {
    match profile.dialect {
        Dialect::Openai => Ok(Box::new(openai::Rewrite::new(profile))),
        Dialect::Anthropic => {
            anthropic::Translation::new(profile, endpoint).map(|t| Box::new(t) as Box<dyn Translation>)
        }
        Dialect::Ollama => Err(unsupported_endpoint(endpoint, "an Ollama")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_read_from_paths() {
        assert_eq!(Endpoint::from_path(b"/v1/chat/completions?x=1"), Some(Endpoint::ChatCompletions));
        assert_eq!(Endpoint::from_path(b"/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(Endpoint::from_path(b"/v1/models"), None);
    }
}
