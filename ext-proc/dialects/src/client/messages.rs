//! Anthropic's Messages API (and count_tokens) through chat completions. (To be written.)

use super::{ClientContext, ClientOutcome, ClientRequest};
use crate::dialect::{ResponsePlan, ResponseTranslator};
use modelgate_proto::error::GatewayError;
use serde_json::Value;

/// A Messages API request as a chat completion.
#[derive(Default)]
pub struct MessagesRequest {}

impl ClientRequest for MessagesRequest {
    fn read(&mut self, _body: &[u8]) -> Result<Option<String>, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn to_chat(&mut self, _history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Messages(AnswerContext::default())
    }
}

/// What a Messages answer's translation needs of its request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerContext {}

/// A chat completion answer as a Messages API answer.
pub struct MessagesAnswer {}

impl MessagesAnswer {
    pub fn new(_context: &AnswerContext, _max_event_bytes: usize) -> Self {
        MessagesAnswer {}
    }
}

impl ResponseTranslator for MessagesAnswer {
    fn plan(&mut self, status: u16, _content_type: &[u8]) -> ResponsePlan {
        ResponsePlan { status, streamed: false, content_type: None }
    }

    fn whole(&mut self, _status: u16, body: &[u8]) -> Vec<u8> {
        body.to_vec()
    }

    fn stream(&mut self, piece: &[u8], _end: bool) -> Vec<u8> {
        piece.to_vec()
    }

    fn ended(&self) -> bool {
        false
    }
}

/// A `count_tokens` request, answered with an estimate.
#[derive(Default)]
pub struct CountTokensRequest {}

impl ClientRequest for CountTokensRequest {
    fn read(&mut self, _body: &[u8]) -> Result<Option<String>, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn to_chat(&mut self, _history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Messages(AnswerContext::default())
    }
}
