//! One request's call to its backend, as the filter's backend profile
//! describes it: the dialect's translation and the backend's key, and what
//! they make of the request. ext_proc (ext-proc) and the stream
//! guard (the stream guard) both start from here, so a request is
//! rewritten the same way whichever of them handles it.

use crate::credentials::KeySources;
use crate::dialect::{self, Endpoint, HeaderChanges, ResponseTranslation, Translation};
use modelgate_proto::backend::BackendProfile;
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;

pub struct BackendCall {
    translation: Box<dyn Translation>,
    key: Option<String>,
}

/// The backend's request: header changes (`:path` among them when the path
/// changes) and a new body, when the body changes.
pub struct UpstreamParts {
    pub headers: HeaderChanges,
    pub body: Option<Vec<u8>>,
}

impl BackendCall {
    /// The call for a request to `path` whose backend has `profile` (the
    /// internal header's value); `request_header` reads the request's headers
    /// by name (for the client's key, if the filter let one through), and
    /// `keys` are the key sources this process may read.
    pub fn start<'a>(
        profile: &[u8],
        path: &[u8],
        request_header: impl Fn(&str) -> Option<&'a [u8]>,
        keys: &KeySources,
    ) -> Result<Self, GatewayError> {
        let profile = BackendProfile::from_header(profile).map_err(|e| misconfigured(&e))?;
        let client_key = headers::CLIENT_KEYS.iter().find_map(|name| request_header(name));
        Self::for_profile(profile, path, client_key, keys)
    }

    /// The same, for a profile already read (a member of a fallback chain).
    pub fn for_profile(
        profile: BackendProfile,
        path: &[u8],
        client_key: Option<&[u8]>,
        keys: &KeySources,
    ) -> Result<Self, GatewayError> {
        let endpoint = Endpoint::from_path(path).ok_or_else(|| misconfigured(&"a request to an unknown endpoint"))?;
        let source = profile.api_key.clone();
        // An endpoint the backend lacks is refused before any key is read.
        let translation = dialect::for_backend(profile, endpoint)?;
        let key = match &source {
            Some(source) => keys.resolve(source, client_key)?,
            None => None,
        };
        Ok(BackendCall { translation, key })
    }

    /// The backend's request for the client's body.
    pub fn request(&mut self, body: &[u8]) -> Result<UpstreamParts, GatewayError> {
        let upstream = self.translation.request(body)?;
        let mut headers = self.translation.upstream_headers(self.key.as_deref());
        if let Some(path) = upstream.path {
            headers.set.push((":path", path.to_string()));
        }
        Ok(UpstreamParts { headers, body: upstream.body })
    }

    /// Whether the backend's answers need translating; known before the body is read.
    pub fn translates_responses(&self) -> bool {
        self.translation.translates_responses()
    }

    /// The translation of the answer, once [`BackendCall::request`] has read
    /// the request; `None` when the answer is OpenAI's already. A streamed
    /// answer's events may be `max_event_bytes` long.
    pub fn response_translation(&self, max_event_bytes: usize) -> Option<Box<dyn ResponseTranslation>> {
        let mut context = self.translation.response_context()?;
        context.max_event_bytes = max_event_bytes;
        context.translation()
    }
}

/// What a translated answer's headers become, and how its body is read.
#[derive(Debug, PartialEq)]
pub struct AnswerPlan {
    /// Translate the body as a stream, piece by piece; otherwise whole.
    pub streamed: bool,
    /// `:status` when the client's differs from the backend's, the client's
    /// content-type, and no content-length: the translated body's length differs.
    pub headers: HeaderChanges,
}

/// The plan for a backend's answer with `status` and `content_type`, as its
/// `translation` decides it; ext_proc and the stream guard both apply it.
pub fn plan_answer(translation: &mut dyn ResponseTranslation, status: u16, content_type: &[u8]) -> AnswerPlan {
    let plan = translation.plan(status, content_type);
    let mut headers = HeaderChanges { set: Vec::new(), remove: vec!["content-length"] };
    if plan.status != status {
        headers.set.push((":status", plan.status.to_string()));
    }
    headers.set.extend(plan.content_type.map(|c| ("content-type", c.to_string())));
    AnswerPlan { streamed: plan.streamed, headers }
}

/// The answer when the gateway's own configuration is at fault; `why` goes to the log only.
pub fn misconfigured(why: &dyn std::fmt::Display) -> GatewayError {
    tracing::error!("cannot rewrite a request: {why}");
    GatewayError::new(
        500,
        "server_error",
        "The gateway is misconfigured for this model.".into(),
        None,
        Some("gateway_misconfigured"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::{Endpoint, ResponseContext};
    use modelgate_proto::backend::Dialect;

    #[test]
    fn an_answer_plan_changes_the_status_only_when_the_translation_does() {
        let context = ResponseContext::new(Dialect::Anthropic, Endpoint::ChatCompletions);
        let mut translation = context.translation().unwrap();
        let overloaded = plan_answer(translation.as_mut(), 529, b"application/json");
        assert!(!overloaded.streamed);
        let set = vec![(":status", "503".to_string()), ("content-type", "application/json".to_string())];
        assert_eq!(overloaded.headers, HeaderChanges { set, remove: vec!["content-length"] });
        let streamed = plan_answer(translation.as_mut(), 200, b"text/event-stream");
        assert!(streamed.streamed);
        assert_eq!(streamed.headers.set, vec![("content-type", "text/event-stream".to_string())]);
    }

    #[test]
    fn a_translation_says_when_it_has_ended_a_stream_early() {
        for (dialect, content_type, unreadable) in [
            (Dialect::Anthropic, &b"text/event-stream"[..], &b"data: {nope\n\n"[..]),
            (Dialect::Ollama, b"application/x-ndjson", b"{nope\n"),
        ] {
            let mut translation = ResponseContext::new(dialect, Endpoint::ChatCompletions).translation().unwrap();
            assert!(plan_answer(translation.as_mut(), 200, content_type).streamed);
            assert!(!translation.ended());
            let out = String::from_utf8(translation.stream(unreadable, false)).unwrap();
            assert!(out.contains("stream_unreadable") && translation.ended(), "{dialect:?}: {out}");
            assert!(translation.stream(b"data: {}\n\n", true).is_empty(), "nothing goes on after the end");
        }
    }
}
