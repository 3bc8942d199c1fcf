//! The APIs clients speak, and how a request in one reaches a backend.
//!
//! Clients speak OpenAI's chat completions (and completions, embeddings),
//! OpenAI's Responses API, or Anthropic's Messages API. A backend serves some
//! of them itself ([`Passage::Native`]); for the others the gateway
//! translates the request into a chat completion and the answer back
//! ([`Passage::ThroughChat`]), or, for Anthropic's `count_tokens`, answers
//! with an estimate ([`Passage::Estimated`]). The filter and ext-proc decide
//! the passage with the same function, [`passage`].

use crate::backend::{BackendProfile, Dialect};
use crate::endpoint::Endpoint;

/// Whose shapes a request's answers and errors take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientApi {
    /// OpenAI's: errors are `{"error":{"message","type","param","code"}}`.
    #[default]
    Openai,
    /// Anthropic's, on `/v1/messages…`: errors are
    /// `{"type":"error","error":{"type","message"}}`, with Anthropic's statuses.
    Anthropic,
}

impl ClientApi {
    /// The API a request to `endpoint` is answered in.
    pub fn of(endpoint: Endpoint) -> Self {
        match endpoint {
            Endpoint::Messages | Endpoint::CountTokens => ClientApi::Anthropic,
            _ => ClientApi::Openai,
        }
    }

    /// The API a request to `path` is answered in: Anthropic's under `/v1/messages`.
    pub fn of_path(path: &[u8]) -> Self {
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        let messages = Endpoint::Messages.path().as_bytes();
        match path.strip_prefix(messages) {
            Some(rest) if rest.is_empty() || rest.starts_with(b"/") => ClientApi::Anthropic,
            _ => ClientApi::Openai,
        }
    }

    /// The status a backend's answer `status` takes in this API. 529 is
    /// Anthropic's own "overloaded": OpenAI's clients know it as 503, "try again".
    pub fn answer_status(self, status: u16) -> u16 {
        match (self, status) {
            (ClientApi::Openai, 529) => 503,
            _ => status,
        }
    }
}

/// How a request reaches its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passage {
    /// The backend serves the endpoint itself: the dialect's own translation, if any, applies.
    Native,
    /// The request is translated into a chat completion, and its answer back.
    ThroughChat,
    /// ext-proc answers with an estimate; the backend is not called.
    Estimated,
}

/// How a request to `endpoint` reaches a backend with `profile`. A model with
/// fallbacks may be answered by backends of several dialects: its requests
/// take the passage of a default profile (`{}`), so every member gets a chat completion.
pub fn passage(endpoint: Endpoint, profile: &BackendProfile) -> Passage {
    match endpoint {
        Endpoint::Responses if profile.dialect == Dialect::Openai && profile.serves_responses => Passage::Native,
        Endpoint::Responses => Passage::ThroughChat,
        Endpoint::Messages | Endpoint::CountTokens if profile.dialect == Dialect::Anthropic => Passage::Native,
        Endpoint::Messages => Passage::ThroughChat,
        Endpoint::CountTokens => Passage::Estimated,
        _ => Passage::Native,
    }
}

/// Whether the gateway translates the backend's answers to a request to
/// `endpoint`: a client API taken through chat, or OpenAI's own endpoints on
/// a backend of another dialect. A client API the backend serves itself is
/// answered in it already.
pub fn answers_translated(endpoint: Endpoint, profile: &BackendProfile) -> bool {
    match passage(endpoint, profile) {
        Passage::ThroughChat | Passage::Estimated => true,
        Passage::Native => {
            profile.dialect != Dialect::Openai
                && !matches!(endpoint, Endpoint::Responses | Endpoint::Messages | Endpoint::CountTokens)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overload_is_529_only_in_anthropics_api() {
        assert_eq!(ClientApi::Openai.answer_status(529), 503);
        assert_eq!(ClientApi::Anthropic.answer_status(529), 529);
        assert_eq!(ClientApi::Openai.answer_status(503), 503);
        assert_eq!(ClientApi::Openai.answer_status(200), 200);
    }

    #[test]
    fn each_backend_serves_what_it_can_and_the_rest_goes_through_chat() {
        let profile = |dialect, serves_responses| BackendProfile { dialect, serves_responses, ..Default::default() };
        let openai = profile(Dialect::Openai, false);
        let native_responses = profile(Dialect::Openai, true);
        let anthropic = profile(Dialect::Anthropic, false);
        let ollama = profile(Dialect::Ollama, false);
        assert_eq!(passage(Endpoint::Responses, &openai), Passage::ThroughChat);
        assert_eq!(passage(Endpoint::Responses, &native_responses), Passage::Native);
        assert_eq!(passage(Endpoint::Responses, &anthropic), Passage::ThroughChat);
        assert_eq!(passage(Endpoint::Messages, &anthropic), Passage::Native);
        assert_eq!(passage(Endpoint::CountTokens, &anthropic), Passage::Native);
        for other in [&openai, &native_responses, &ollama] {
            assert_eq!(passage(Endpoint::Messages, other), Passage::ThroughChat);
            assert_eq!(passage(Endpoint::CountTokens, other), Passage::Estimated);
            assert_eq!(passage(Endpoint::ChatCompletions, other), Passage::Native);
        }
    }

    #[test]
    fn anthropics_api_is_the_messages_paths() {
        assert_eq!(ClientApi::of_path(b"/v1/messages"), ClientApi::Anthropic);
        assert_eq!(ClientApi::of_path(b"/v1/messages/count_tokens?beta=true"), ClientApi::Anthropic);
        assert_eq!(ClientApi::of_path(b"/v1/messagesx"), ClientApi::Openai);
        assert_eq!(ClientApi::of_path(b"/v1/chat/completions"), ClientApi::Openai);
        assert_eq!(ClientApi::of(Endpoint::CountTokens), ClientApi::Anthropic);
        assert_eq!(ClientApi::of(Endpoint::Responses), ClientApi::Openai);
    }
}
