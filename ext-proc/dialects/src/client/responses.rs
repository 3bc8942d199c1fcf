//! OpenAI's Responses API through chat completions. (To be written.)

use super::{ClientContext, ClientOutcome, ClientRequest};
use crate::dialect::{ResponsePlan, ResponseTranslator};
use modelgate_proto::error::GatewayError;
use serde_json::Value;

/// A Responses API request as a chat completion.
#[derive(Default)]
pub struct ResponsesRequest {}

impl ClientRequest for ResponsesRequest {
    fn read(&mut self, _body: &[u8]) -> Result<Option<String>, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn to_chat(&mut self, _history: Option<Vec<Value>>) -> Result<ClientOutcome, GatewayError> {
        Err(GatewayError::invalid_request("not yet".into()))
    }

    fn answer_context(&self) -> ClientContext {
        ClientContext::Responses(AnswerContext::default())
    }
}

/// What a Responses answer's translation needs of its request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerContext {}

/// A chat completion answer as a Responses API answer.
pub struct ResponsesAnswer {}

impl ResponsesAnswer {
    pub fn new(_context: &AnswerContext, _max_event_bytes: usize) -> Self {
        ResponsesAnswer {}
    }
}

impl ResponseTranslator for ResponsesAnswer {
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
