//! Building ext_proc answers: the wire-level details of Envoy's protocol, kept
//! out of the code that decides what to answer.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{BodySendMode, HeaderSendMode};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request, processing_response::Response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use modelgate_dialects::dialect::HeaderChanges;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::{retry_header, GatewayError};
use modelgate_proto::headers::DESTINATION_ENDPOINT;
use std::collections::HashMap;

/// The dynamic metadata namespace Envoy's load balancers read the chosen
/// endpoint from, and the one a data plane reports the served endpoint in.
pub const LB_NAMESPACE: &str = "envoy.lb";

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

fn mutation(headers: HeaderChanges) -> Option<HeaderMutation> {
    if headers.set.is_empty() && headers.remove.is_empty() {
        return None;
    }
    Some(HeaderMutation {
        set_headers: headers.set.iter().map(|(key, value)| set_header(key, value.as_bytes())).collect(),
        remove_headers: headers.remove.iter().map(|name| name.to_string()).collect(),
    })
}

/// How much of a request's response ext-proc asks Envoy for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Nothing: the static configuration's modes, which skip the response.
    Nothing,
    /// The headers, then the body whole or streamed as the headers say.
    HeadersThenBody,
    /// The body alone, whole, with its status among the message's attributes
    /// (`response.code`): an answer to a request that did not ask for a stream.
    WholeBody,
}

/// Continues the request headers, asking for the response as `watch` says,
/// and takes the filter's `internal` headers meant for ext-proc alone (the
/// owner, the whole-answer mark) off the backend's request.
///
/// A response watched from its headers has its body asked for whole until
/// the headers are answered (they then say whole or streamed): the body that
/// reaches Envoy while ext-proc reads the headers is then buffered up to
/// Envoy's limit, and past it the answer is Envoy's 500
/// (`response_payload_too_large`). With no body mode yet, Envoy 1.40 holds
/// that body with back-pressure instead: an answer that passes the limit
/// before ext-proc answers its headers pauses the backend for good, and the
/// client waits for the route's timeout.
///
/// A response watched by its body alone costs one message instead of two.
/// Envoy 1.40 then neither holds its headers (the filter after ext_proc holds
/// them until the translated body comes, so that an answer too large to
/// buffer still gets an error) nor applies a header change made in the
/// body's answer: it drops the `content-length` itself, and the filter sets
/// any status the client's API changes (Anthropic's 529 as 503).
pub fn continue_request_headers(watch: Watch, internal: &[&str]) -> ProcessingResponse {
    let removals = (!internal.is_empty()).then(|| HeaderMutation {
        remove_headers: internal.iter().map(|name| name.to_string()).collect(),
        ..Default::default()
    });
    let mut answer = respond(Response::RequestHeaders(HeadersResponse {
        response: removals.map(|removals| CommonResponse { header_mutation: Some(removals), ..Default::default() }),
    }));
    answer.mode_override = match watch {
        Watch::Nothing => None,
        Watch::HeadersThenBody => Some(mode(HeaderSendMode::Send, BodySendMode::Buffered)),
        Watch::WholeBody => Some(mode(HeaderSendMode::Skip, BodySendMode::Buffered)),
    };
    answer
}

/// The response's status, from the message's attributes (`response.code`,
/// under whichever filter name Envoy gives them).
pub fn response_code(attributes: &HashMap<String, Struct>) -> Option<u16> {
    attributes.values().find_map(|values| match values.fields.get(RESPONSE_CODE)?.kind {
        Some(Kind::NumberValue(code)) if (100.0..1000.0).contains(&code) => Some(code as u16),
        _ => None,
    })
}

/// The attribute that carries the response's status, as ext_proc's
/// `response_attributes` must name it.
pub const RESPONSE_CODE: &str = "response.code";

/// The processing mode for the rest of an exchange: the request body is
/// still wanted whole; the response's headers and body as given.
fn mode(response_headers: HeaderSendMode, response_body: BodySendMode) -> ProcessingMode {
    ProcessingMode {
        request_header_mode: HeaderSendMode::Send as i32,
        response_header_mode: response_headers as i32,
        request_body_mode: BodySendMode::Buffered as i32,
        response_body_mode: response_body as i32,
        request_trailer_mode: HeaderSendMode::Skip as i32,
        response_trailer_mode: HeaderSendMode::Skip as i32,
    }
}

fn body_response(body: Vec<u8>, headers: HeaderChanges) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            header_mutation: mutation(headers),
            body_mutation: Some(BodyMutation { mutation: Some(Mutation::Body(body)) }),
            ..Default::default()
        }),
    }
}

/// Replaces the whole (buffered) request body, with its content-length and any other header changes.
pub fn replace_request_body(body: Vec<u8>, mut headers: HeaderChanges) -> ProcessingResponse {
    headers.set.push(("content-length", body.len().to_string()));
    respond(Response::RequestBody(body_response(body, headers)))
}

/// Lets the request body go on as it is, with header changes only.
pub fn change_request_headers(headers: HeaderChanges) -> ProcessingResponse {
    respond(Response::RequestBody(BodyResponse {
        response: Some(CommonResponse { header_mutation: mutation(headers), ..Default::default() }),
    }))
}

/// Changes the response headers, and says how the body is to be sent: whole or streamed.
pub fn rewrite_response_headers(headers: HeaderChanges, streamed: bool) -> ProcessingResponse {
    let mut answer = respond(Response::ResponseHeaders(HeadersResponse {
        response: Some(CommonResponse { header_mutation: mutation(headers), ..Default::default() }),
    }));
    let body = if streamed { BodySendMode::Streamed } else { BodySendMode::Buffered };
    answer.mode_override = Some(mode(HeaderSendMode::Send, body));
    answer
}

/// Replaces a whole (buffered) response body and sets its content-length.
pub fn replace_response_body(body: Vec<u8>) -> ProcessingResponse {
    let headers = HeaderChanges { set: vec![("content-length", body.len().to_string())], remove: Vec::new() };
    respond(Response::ResponseBody(body_response(body, headers)))
}

/// Replaces one piece of a streamed response body.
pub fn replace_response_piece(piece: Vec<u8>) -> ProcessingResponse {
    respond(Response::ResponseBody(body_response(piece, HeaderChanges::default())))
}

/// Answers the request itself, without calling the backend: a 200 with this JSON body.
pub fn answer_json(body: Vec<u8>) -> ProcessingResponse {
    respond(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: 200 }),
        headers: Some(HeaderMutation {
            set_headers: vec![set_header("content-type", b"application/json")],
            ..Default::default()
        }),
        body,
        details: "modelgate_ext_proc_answered".to_string(),
        ..Default::default()
    }))
}

/// Ends the request with an error in `api`'s envelope and status.
pub fn reject(err: &GatewayError, api: ClientApi) -> ProcessingResponse {
    reject_with(err, api, None)
}

/// Ends the request with an error in `api`'s envelope and status and, when
/// given, a `retry-after` of that many seconds (a request shed by the endpoint picker).
pub fn reject_with(err: &GatewayError, api: ClientApi, retry_after_secs: Option<u64>) -> ProcessingResponse {
    let retry_after = retry_after_secs.map(|secs| secs.to_string());
    respond(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: i32::from(err.status_in(api)) }),
        headers: Some(HeaderMutation {
            set_headers: std::iter::once(("content-type", "application/json"))
                .chain(retry_header(err.should_retry()))
                .chain(retry_after.as_deref().map(|secs| ("retry-after", secs)))
                .map(|(name, value)| set_header(name, value.as_bytes()))
                .collect(),
            ..Default::default()
        }),
        body: err.body_in(api),
        details: "modelgate_ext_proc_rejected".to_string(),
        ..Default::default()
    }))
}

/// Adds to a request-body answer the replicas the endpoint picker chose
/// (`ip:port,…`, best first) as `envoy.lb` dynamic metadata, where the Gateway
/// API Inference Extension's data planes read them; the header of the same
/// name is among the answer's header changes.
pub fn with_destination(mut answer: ProcessingResponse, destination: &str) -> ProcessingResponse {
    let value = |kind| Value { kind: Some(kind) };
    let endpoint = Struct {
        fields: [(DESTINATION_ENDPOINT.to_string(), value(Kind::StringValue(destination.to_string())))].into(),
    };
    answer.dynamic_metadata =
        Some(Struct { fields: [(LB_NAMESPACE.to_string(), value(Kind::StructValue(endpoint)))].into() });
    answer
}

/// Continues the request headers with the endpoint picker's choice: the
/// header, replacing any copy the client sent (appended to, the client's would
/// come first), and the same value as `envoy.lb` dynamic metadata.
pub fn pick_destination(destination: &str) -> ProcessingResponse {
    let mut set = set_header(DESTINATION_ENDPOINT, destination.as_bytes());
    set.append_action = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
    let answer = respond(Response::RequestHeaders(HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: Some(HeaderMutation { set_headers: vec![set], ..Default::default() }),
            ..Default::default()
        }),
    }));
    with_destination(answer, destination)
}

/// Sends one piece of a body on, unchanged, in the `FULL_DUPLEX_STREAMED`
/// mode (where every piece Envoy sends must come back this way).
pub fn stream_body_piece(request: bool, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let piece = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
    };
    respond(if request { Response::RequestBody(piece) } else { Response::ResponseBody(piece) })
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
