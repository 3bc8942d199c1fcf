//! A request rewritten for its backend, as ext_proc would rewrite it, from its [`BackendCall`].

use crate::upstream::{read_body, UpstreamBody};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::Uri;
use modelgate_dialects::call::BackendCall;
use modelgate_dialects::credentials::KeySources;
use modelgate_dialects::dialect::ResponseTranslation;
use modelgate_proto::error::GatewayError;

/// Rewrites a request for its backend, as ext_proc would (body, path, key,
/// headers), and returns its body and its answer's translation.
pub(crate) async fn rewrite(
    parts: &mut hyper::http::request::Parts,
    body: Incoming,
    profile: &[u8],
    keys: &KeySources,
    max_event_bytes: usize,
) -> Result<(UpstreamBody, Option<Box<dyn ResponseTranslation>>), GatewayError> {
    let request_headers = &parts.headers;
    let request_header = |name: &str| request_headers.get(name).map(HeaderValue::as_bytes);
    let mut call = BackendCall::start(profile, parts.uri.path().as_bytes(), request_header, keys)?;
    let whole = read_body(body).await?;
    let body = apply_rewrite(parts, &mut call, whole)?;
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok((Either::Right(Full::new(body)), call.response_translation(max_event_bytes)))
}

/// The backend's request for the client's body `whole`: `parts` changed as
/// the call says (path, key, headers), and the body to send.
pub(crate) fn apply_rewrite(
    parts: &mut hyper::http::request::Parts,
    call: &mut BackendCall,
    whole: Bytes,
) -> Result<Bytes, GatewayError> {
    let upstream = call.request(&whole)?;
    for name in upstream.headers.remove {
        parts.headers.remove(name);
    }
    for (name, value) in upstream.headers.set {
        if name == ":path" {
            let path = parts.uri.authority().map_or(value.clone(), |authority| format!("http://{authority}{value}"));
            parts.uri = Uri::try_from(path).map_err(|_| unusable_header(name))?;
        } else {
            let value = HeaderValue::try_from(value).map_err(|_| unusable_header(name))?;
            parts.headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(upstream.body.map_or(whole, Bytes::from))
}

/// A header for the backend that HTTP cannot carry (a key file with a line break inside, say).
pub(crate) fn unusable_header(name: &str) -> GatewayError {
    modelgate_dialects::call::misconfigured(&format!("the rewritten {name} header is not a valid HTTP header value"))
}
