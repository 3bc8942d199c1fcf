//! The client APIs besides OpenAI's chat completions: OpenAI's Responses API
//! ([`responses`]) and Anthropic's Messages API ([`messages`]).
//!
//! A backend that serves the client's API itself gets the request as it is
//! (its dialect's own translation applies: a key, a renamed model). For the
//! others ([`modelgate_proto::client_api::passage`]) the request becomes a
//! chat completion here ([`ClientRequest`]), which the backend's dialect then
//! translates as any other; its answer comes back through the dialect into a
//! chat completion, then through the client API's translation ([`ThroughChat`]).
//! One file per client API holds both directions.

pub mod messages;
pub mod responses;

use crate::dialect::{ResponsePlan, ResponseTranslator};
use crate::stream;
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use modelgate_proto::framing::Framing;
use modelgate_proto::stored_response::StoredResponse;
use serde_json::Value;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a client API's request becomes.
#[derive(Debug, PartialEq)]
pub enum ClientOutcome {
    /// A chat completions request body, for the backend's dialect.
    Chat(Vec<u8>),
    /// The answer itself, a 200 with this JSON body, given without calling
    /// the backend (`count_tokens`' estimate).
    Answer(Vec<u8>),
}

/// How a client API's request becomes a chat completion.
pub trait ClientRequest: Send {
    /// Reads and checks the client's body, and says which stored response it
    /// continues (`previous_response_id`), for the caller to load and hand to
    /// [`ClientRequest::to_chat`]. Called once, before the others.
    fn read(&mut self, body: &[u8]) -> Result<Option<String>, GatewayError>;

    /// The chat completions request (or the answer itself) for the body
    /// read; `history` holds the items of the conversation it continues
    /// ([`StoredResponse::conversation`]), when it names one.
    fn to_chat(&mut self, history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError>;

    /// What translating the chat answer back needs of the request, once read.
    fn answer_context(&self) -> ClientContext;

    /// The client's name for the chat request's `chat_param`, so that a
    /// backend dialect's refusal names what the client sent; `None` keeps it.
    fn client_param(&self, _chat_param: &str) -> Option<String> {
        None
    }
}

/// `error` naming the client's parameter rather than the chat request's.
pub fn in_client_terms(client: &dyn ClientRequest, mut error: GatewayError) -> GatewayError {
    let Some(chat_param) = error.param.clone() else { return error };
    if let Some(param) = client.client_param(&chat_param) {
        error.message = error.message.replace(&format!("'{chat_param}'"), &format!("'{param}'"));
        error.param = Some(param);
    }
    error
}

/// What a client API's answer translation needs of its request.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientContext {
    Responses(responses::AnswerContext),
    Messages(messages::AnswerContext),
}

impl ClientContext {
    /// The translation of a chat completion answer (whole, or OpenAI
    /// server-sent events) into the client's API.
    pub fn translator(&self, max_event_bytes: usize) -> Box<dyn ResponseTranslator> {
        match self {
            ClientContext::Responses(context) => Box::new(responses::ResponsesAnswer::new(context, max_event_bytes)),
            ClientContext::Messages(context) => Box::new(messages::MessagesAnswer::new(context, max_event_bytes)),
        }
    }
}

/// The translation into a chat completion of a request to `endpoint`, a
/// client API the backend does not serve; `None` for chat completions'
/// own endpoints, which every dialect takes.
pub fn request_for(endpoint: Endpoint) -> Option<Box<dyn ClientRequest>> {
    match endpoint {
        Endpoint::Responses => Some(Box::new(responses::ResponsesRequest::default())),
        Endpoint::Messages => Some(Box::new(messages::MessagesRequest::default())),
        Endpoint::CountTokens => Some(Box::new(messages::CountTokensRequest::default())),
        _ => None,
    }
}

/// A new id with `prefix` and 32 hex digits, for what the gateway names in a
/// client API's answer. A stored response's id is its only handle, so ids are
/// unguessable as well as unique: hashers seeded at random.
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let high = RandomState::new().hash_one(nanos);
    let low = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{prefix}{high:016x}{low:016x}")
}

/// A backend's answer through its dialect's translation into a chat
/// completion (none for an OpenAI backend), then into the client's API.
pub struct ThroughChat {
    backend: Option<Box<dyn ResponseTranslator>>,
    client: Box<dyn ResponseTranslator>,
    /// The chat answer's status, once planned: what the client's translation reads.
    chat_status: u16,
}

impl ThroughChat {
    pub fn new(backend: Option<Box<dyn ResponseTranslator>>, client: Box<dyn ResponseTranslator>) -> Self {
        ThroughChat { backend, client, chat_status: 200 }
    }
}

impl ResponseTranslator for ThroughChat {
    fn plan(&mut self, status: u16, content_type: &[u8]) -> ResponsePlan {
        let chat = match &mut self.backend {
            Some(backend) => backend.plan(status, content_type),
            None => stream::plan(status, content_type, Framing::Sse),
        };
        self.chat_status = chat.status;
        let chat_type = chat.content_type.map_or(content_type, str::as_bytes);
        self.client.plan(chat.status, chat_type)
    }

    fn whole(&mut self, status: u16, body: &[u8]) -> Vec<u8> {
        match &mut self.backend {
            Some(backend) => {
                let chat = backend.whole(status, body);
                self.client.whole(self.chat_status, &chat)
            }
            None => self.client.whole(self.chat_status, body),
        }
    }

    fn stream(&mut self, piece: &[u8], end: bool) -> Vec<u8> {
        match &mut self.backend {
            Some(backend) => {
                let chat = backend.stream(piece, end);
                self.client.stream(&chat, end)
            }
            None => self.client.stream(piece, end),
        }
    }

    fn ended(&self) -> bool {
        self.client.ended() || self.backend.as_ref().is_some_and(|backend| backend.ended())
    }

    fn finished(&mut self) -> Option<StoredResponse> {
        self.client.finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_id("resp_"), new_id("resp_"));
        assert_ne!(a, b);
        let digits = a.strip_prefix("resp_").unwrap();
        assert!(digits.len() == 32 && digits.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
