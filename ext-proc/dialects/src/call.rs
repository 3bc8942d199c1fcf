//! One request's call to its backend, as the filter's backend profile
//! describes it: the dialect's translation and the backend's key, and what
//! they make of the request. ext_proc (ext-proc) and the stream
//! guard (the stream guard) both start from here, so a request is
//! rewritten the same way whichever of them handles it.

use crate::credentials::KeySources;
use crate::dialect::{self, Endpoint, HeaderChanges, ResponseTranslation, Translation};
use modelgate_proto::backend::BackendProfile;
use modelgate_proto::error::GatewayError;

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
    /// internal header's value); `client_key` is the client's key header, if
    /// the filter let one through, and `keys` the key sources this process may read.
    pub fn start(
        profile: &[u8],
        path: &[u8],
        client_key: Option<&[u8]>,
        keys: &KeySources,
    ) -> Result<Self, GatewayError> {
        let profile = BackendProfile::from_header(profile).map_err(|e| log_misconfiguration(&e))?;
        Self::for_profile(profile, path, client_key, keys)
    }

    /// The same, for a profile already read (a member of a fallback chain).
    pub fn for_profile(
        profile: BackendProfile,
        path: &[u8],
        client_key: Option<&[u8]>,
        keys: &KeySources,
    ) -> Result<Self, GatewayError> {
        let endpoint =
            Endpoint::from_path(path).ok_or_else(|| log_misconfiguration(&"a request to an unknown endpoint"))?;
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

/// Logs why the gateway's own configuration is at fault, and returns the
/// answer to the client, which is not told why.
pub fn log_misconfiguration(why: &dyn std::fmt::Display) -> GatewayError {
    tracing::error!("cannot rewrite a request: {why}");
    GatewayError::misconfigured()
}
