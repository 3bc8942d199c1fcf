//! One ext_proc exchange: what to answer to each message Envoy sends about a
//! single HTTP request. Pure: no I/O, tested without Envoy.

use crate::messages;
use crate::rename::rewrite_model;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, ProcessingRequest, ProcessingResponse,
};
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;

#[derive(Debug, Default)]
pub struct Exchange {
    /// The model name the backend expects, from the filter's routing header.
    upstream_model: Option<String>,
}

impl Exchange {
    /// The answer to one message; `None` for a message with nothing in it.
    pub fn on_message(&mut self, message: ProcessingRequest) -> Option<ProcessingResponse> {
        let request = message.request?;
        Some(match request {
            Request::RequestHeaders(ref h) => {
                self.upstream_model =
                    messages::header(h, headers::UPSTREAM_MODEL).map(|v| String::from_utf8_lossy(v).into_owned());
                messages::pass(&request)
            }
            Request::RequestBody(ref body) => match &self.upstream_model {
                Some(model) => match rewrite_model(&body.body, model) {
                    Ok(rewritten) => messages::replace_request_body(rewritten),
                    Err(e) => messages::reject(&GatewayError::unparsable_json(&e)),
                },
                None => messages::pass(&request),
            },
            _ => messages::pass(&request),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        body_mutation::Mutation, processing_response::Response, HttpBody, HttpHeaders,
    };
    use serde_json::Value;

    fn headers_message(pairs: &[(&str, &str)]) -> ProcessingRequest {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue { key: k.to_string(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        ProcessingRequest {
            request: Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn body_message(body: &str) -> ProcessingRequest {
        ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: body.as_bytes().to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn renames_the_model_and_fixes_content_length() {
        let mut ex = Exchange::default();
        let first =
            ex.on_message(headers_message(&[(":path", "/v1/chat/completions"), (headers::UPSTREAM_MODEL, "llama-3")]));
        assert!(matches!(first.unwrap().response, Some(Response::RequestHeaders(_))));

        let answer = ex.on_message(body_message(r#"{"model":"gpt-4o-mini","n":1}"#)).unwrap();
        let Some(Response::RequestBody(body)) = answer.response else { panic!("expected a body answer") };
        let common = body.response.unwrap();
        let Some(Mutation::Body(new_body)) = common.body_mutation.unwrap().mutation else { panic!("no body") };
        assert_eq!(new_body, br#"{"model":"llama-3","n":1}"#);
        let set = &common.header_mutation.unwrap().set_headers[0];
        let header = set.header.as_ref().unwrap();
        assert_eq!((header.key.as_str(), header.raw_value.as_slice()), ("content-length", b"25".as_slice()));
    }

    #[test]
    fn without_a_rename_the_body_passes_untouched() {
        let mut ex = Exchange::default();
        ex.on_message(headers_message(&[(":path", "/v1/embeddings")]));
        let answer = ex.on_message(body_message(r#"{"model":"x"}"#)).unwrap();
        let Some(Response::RequestBody(body)) = answer.response else { panic!("expected a body answer") };
        assert!(body.response.is_none());
    }

    #[test]
    fn a_body_that_is_not_json_gets_an_openai_400() {
        let mut ex = Exchange::default();
        ex.on_message(headers_message(&[(headers::UPSTREAM_MODEL, "m")]));
        let answer = ex.on_message(body_message("nope")).unwrap();
        let Some(Response::ImmediateResponse(reply)) = answer.response else { panic!("expected an immediate reply") };
        assert_eq!(reply.status.unwrap().code, 400);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn an_empty_message_gets_no_answer() {
        assert!(Exchange::default().on_message(ProcessingRequest::default()).is_none());
    }
}
