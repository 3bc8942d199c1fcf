//! Building ext_proc answers: the wire-level details of Envoy's protocol, kept
//! out of the code that decides what to answer.

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request, processing_response::Response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse, ProcessingResponse,
    TrailersResponse,
};
use modelgate_proto::error::GatewayError;

/// The value of a request header Envoy sent, if present.
pub fn header<'a>(headers: &'a HttpHeaders, name: &str) -> Option<&'a [u8]> {
    let values = &headers.headers.as_ref()?.headers;
    let found = values.iter().find(|h| h.key.eq_ignore_ascii_case(name))?;
    // Envoy sends `raw_value`; `value` is its older encoding.
    Some(if found.raw_value.is_empty() { found.value.as_bytes() } else { &found.raw_value })
}

fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_string(), raw_value: value.to_vec(), ..Default::default() }),
        ..Default::default()
    }
}

fn respond(response: Response) -> ProcessingResponse {
    ProcessingResponse { response: Some(response), ..Default::default() }
}

/// Replaces the whole (buffered) request body and sets its content-length to match.
pub fn replace_request_body(body: Vec<u8>) -> ProcessingResponse {
    let content_length = body.len().to_string();
    respond(Response::RequestBody(BodyResponse {
        response: Some(CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers: vec![set_header("content-length", content_length.as_bytes())],
                ..Default::default()
            }),
            body_mutation: Some(BodyMutation { mutation: Some(Mutation::Body(body)) }),
            ..Default::default()
        }),
    }))
}

/// Ends the request with an OpenAI error envelope.
pub fn reject(err: &GatewayError) -> ProcessingResponse {
    respond(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(err.status) }),
        headers: Some(HeaderMutation {
            set_headers: vec![set_header("content-type", b"application/json")],
            ..Default::default()
        }),
        body: err.to_json(),
        details: "modelgate_ext_proc_rejected".to_string(),
        ..Default::default()
    }))
}

/// Lets a message through unchanged. Envoy requires one answer per message, so
/// a phase this service was not configured to see must not hang the request either.
pub fn pass(request: &Request) -> ProcessingResponse {
    respond(match request {
        Request::RequestHeaders(_) => Response::RequestHeaders(HeadersResponse::default()),
        Request::ResponseHeaders(_) => Response::ResponseHeaders(HeadersResponse::default()),
        Request::RequestBody(_) => Response::RequestBody(BodyResponse::default()),
        Request::ResponseBody(_) => Response::ResponseBody(BodyResponse::default()),
        Request::RequestTrailers(_) => Response::RequestTrailers(TrailersResponse::default()),
        Request::ResponseTrailers(_) => Response::ResponseTrailers(TrailersResponse::default()),
    })
}
