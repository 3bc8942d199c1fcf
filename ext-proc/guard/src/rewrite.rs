//! A request rewritten for its backend, as ext_proc would rewrite it, from its [`BackendCall`].

use crate::upstream::{read_body, UpstreamBody};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::Uri;
use modelgate_dialects::call::BackendCall;
use modelgate_dialects::credentials::KeySources;
use modelgate_dialects::dialect::{HeaderChanges, ResponseTranslator};
use modelgate_proto::error::GatewayError;

/// Rewrites a request for its backend, as ext_proc would (body, path, key,
/// headers), and returns its body and its answer's translation.
pub(crate) async fn rewrite(
    parts: &mut hyper::http::request::Parts,
    body: Incoming,
    profile: &[u8],
    keys: &KeySources,
    max_event_bytes: usize,
) -> Result<(UpstreamBody, Option<Box<dyn ResponseTranslator>>), GatewayError> {
    let request_headers = &parts.headers;
    let request_header = |name: &str| request_headers.get(name).map(HeaderValue::as_bytes);
    let call = BackendCall::start(profile, parts.uri.path().as_bytes(), request_header, keys)?;
    let whole = read_body(body).await?;
    let (body, translation) = apply_rewrite(parts, call, whole, max_event_bytes)?;
    Ok((Either::Right(Full::new(body)), translation))
}

/// The backend's request for the client's body `whole`: `parts` changed as
/// the call says (path, key, headers) and for the new body's length; the body
/// to send, and the answer's translation.
pub(crate) fn apply_rewrite(
    parts: &mut hyper::http::request::Parts,
    mut call: BackendCall,
    whole: Bytes,
    max_event_bytes: usize,
) -> Result<(Bytes, Option<Box<dyn ResponseTranslator>>), GatewayError> {
    let upstream = call.request(&whole)?;
    let uri = &mut parts.uri;
    apply_changes(&mut parts.headers, upstream.headers, |name, value| {
        let path = uri.authority().map_or(value.clone(), |authority| format!("http://{authority}{value}"));
        *uri = Uri::try_from(path).map_err(|_| unusable_header(name))?;
        Ok(())
    })?;
    let body = upstream.body.map_or(whole, Bytes::from);
    parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok((body, call.response_translator(max_event_bytes)))
}

/// Applies a call's header changes to a request's or an answer's `headers`;
/// the pseudo-header among them (`:path`, `:status`) goes to `pseudo`, as
/// hyper keeps it apart from the headers.
pub(crate) fn apply_changes(
    headers: &mut HeaderMap,
    changes: HeaderChanges,
    mut pseudo: impl FnMut(&'static str, String) -> Result<(), GatewayError>,
) -> Result<(), GatewayError> {
    for name in changes.remove {
        headers.remove(name);
    }
    for (name, value) in changes.set {
        if name.starts_with(':') {
            pseudo(name, value)?;
        } else {
            let value = HeaderValue::try_from(value).map_err(|_| unusable_header(name))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    Ok(())
}

/// A header for the backend that HTTP cannot carry (a key file with a line break inside, say).
pub(crate) fn unusable_header(name: &str) -> GatewayError {
    modelgate_dialects::call::log_misconfiguration(&format!(
        "the rewritten {name} header is not a valid HTTP header value"
    ))
}
