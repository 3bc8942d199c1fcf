//! How the admin port's routes (the gate's and the rest of admin's) answer
//! an error: the OpenAI envelope, as JSON.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use modelgate_proto::error::GatewayError;

/// `error` in its envelope, with its status; a 503 asks the caller to retry in a second.
pub fn error_response(error: &GatewayError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], error.to_json()).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A body that could not be read: too large for `max_body`, or broken off.
pub fn body_error(rejection: &BytesRejection, max_body: usize) -> Response {
    let error = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        GatewayError::body_too_large(Some(max_body))
    } else {
        GatewayError::invalid_request(format!("Could not read the request body: {rejection}."))
    };
    error_response(&error)
}

/// 405 for a known path called with another method than `allowed`.
pub fn method_not_allowed(method: &Method, uri: &Uri, allowed: &'static str) -> Response {
    let mut response = error_response(&GatewayError::method_not_allowed(method.as_str(), uri.path(), allowed));
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}
