//! One request's call to its backend, as the filter's backend profile
//! describes it: the dialect's translators and the backend's credential, and
//! what they make of the request. ext_proc and the stream guard both start
//! from here, so a request is rewritten the same way whichever handles it.

use crate::client::{self, ClientOutcome, ClientRequest};
use crate::credentials::KeySources;
use crate::dialect::{
    self, Credential, HeaderChanges, OutgoingRequest, RequestTranslator, ResponseContext, ResponseTranslator,
};
use modelgate_proto::backend::{BackendProfile, Dialect};
use modelgate_proto::client_api::{answers_translated, passage, Passage};
use modelgate_proto::endpoint::Endpoint;
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;
use serde_json::Value;

pub struct BackendCall {
    translator: Box<dyn RequestTranslator>,
    /// For a client API the backend does not serve: the request's translation
    /// into a chat completion, which `translator` then translates as any other.
    client: Option<Box<dyn ClientRequest>>,
    /// The client's body was read by [`BackendCall::previous_response`].
    read: bool,
    credential: Option<Box<dyn Credential>>,
    endpoint: Endpoint,
    /// The client's path, which a credential may sign when the dialect keeps it.
    path: String,
    translates_responses: bool,
}

/// The backend's request: header changes (`:path` among them when the path
/// changes) and a new body, when the body changes.
pub struct UpstreamParts {
    pub headers: HeaderChanges,
    pub body: Option<Vec<u8>>,
    /// The answer itself (a 200 with this JSON body) when the gateway answers
    /// without calling the backend: `count_tokens`' estimate. Nothing else applies then.
    pub answer: Option<Vec<u8>>,
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
        let profile = BackendProfile::from_header(profile).map_err(|e| log_misconfiguration(&e))?;
        Self::for_request(profile, path, request_header, keys)
    }

    /// The same, for a profile already read from the request's header.
    pub fn for_request<'a>(
        profile: BackendProfile,
        path: &[u8],
        request_header: impl Fn(&str) -> Option<&'a [u8]>,
        keys: &KeySources,
    ) -> Result<Self, GatewayError> {
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
        let endpoint =
            Endpoint::from_path(path).ok_or_else(|| log_misconfiguration(&"a request to an unknown endpoint"))?;
        let source = profile.api_key.clone();
        let client = match passage(endpoint, &profile) {
            Passage::Native => None,
            Passage::ThroughChat | Passage::Estimated => client::request_for(endpoint),
        };
        // Decided as the filter decides it, which tells ext_proc when such an answer will be whole.
        let translates_responses = answers_translated(endpoint, &profile);
        // The backend gets a chat completion when the client's API is translated.
        let backend_endpoint = if client.is_some() { Endpoint::ChatCompletions } else { endpoint };
        // An endpoint the backend lacks is refused before any key is read.
        let translator = dialect::request_translator(profile, backend_endpoint)?;
        let secret = match &source {
            Some(source) => keys.resolve(source, client_key)?,
            None => None,
        };
        let credential = secret.map(|secret| translator.credential(secret));
        let path = match client {
            Some(_) => backend_endpoint.path().to_string(),
            None => String::from_utf8_lossy(path).into_owned(),
        };
        Ok(BackendCall {
            translator,
            client,
            read: false,
            credential,
            endpoint: backend_endpoint,
            path,
            translates_responses,
        })
    }

    /// Reads the client's body where its API is translated, and says which
    /// stored response it continues (the Responses API's
    /// `previous_response_id`): the caller loads that response's
    /// conversation for [`BackendCall::request_continuing`]. `None` for any other request.
    pub fn previous_response(&mut self, body: &[u8]) -> Result<Option<String>, GatewayError> {
        match &mut self.client {
            Some(client) => {
                self.read = true;
                client.read(body)
            }
            None => Ok(None),
        }
    }

    /// The backend's request for the client's body: the dialect's translation,
    /// then its credential over the request as it will leave.
    pub fn request(&mut self, body: &[u8]) -> Result<UpstreamParts, GatewayError> {
        self.request_continuing(body, None)
    }

    /// The same, for a request that continues a stored conversation
    /// (`history`, its items; see [`BackendCall::previous_response`]). A
    /// client API the backend does not serve becomes a chat completion first.
    pub fn request_continuing(
        &mut self,
        body: &[u8],
        history: Option<Vec<Value>>,
    ) -> Result<UpstreamParts, GatewayError> {
        let chat = match &mut self.client {
            Some(client) => {
                if !std::mem::replace(&mut self.read, true) {
                    client.read(body)?;
                }
                match client.to_chat(history)? {
                    ClientOutcome::Chat(chat) => Some(chat),
                    ClientOutcome::Answer(answer) => {
                        return Ok(UpstreamParts {
                            headers: HeaderChanges::default(),
                            body: None,
                            answer: Some(answer),
                        })
                    }
                }
            }
            None => None,
        };
        let sent = chat.as_deref().unwrap_or(body);
        let upstream = self.translator.request(sent).map_err(|e| match &self.client {
            Some(client) => client::in_client_terms(client.as_ref(), e),
            None => e,
        })?;
        // A translated client API is sent to the chat completions path unless the dialect names its own.
        let path = upstream.path.or_else(|| chat.is_some().then(|| self.path.clone()));
        let mut headers = self.translator.headers();
        // A translated answer is read, and compressed bytes cannot be.
        if chat.is_some() && !headers.remove.contains(&"accept-encoding") {
            headers.remove.push("accept-encoding");
        }
        if let Some(credential) = &self.credential {
            let outgoing = OutgoingRequest {
                // Only model-routed endpoints reach a backend, and they take one method each.
                method: self.endpoint.method().unwrap_or("POST"),
                path: path.as_deref().unwrap_or(&self.path),
                headers: &headers.set,
                body: upstream.body.as_deref().unwrap_or(sent),
            };
            let authorization = credential.authorize(&outgoing);
            headers.extend(authorization);
        }
        if let Some(path) = path {
            headers.set.push((":path", path));
        }
        Ok(UpstreamParts { headers, body: upstream.body.or(chat), answer: None })
    }

    /// Whether the backend's answers need translating; known before the body is read.
    pub fn translates_responses(&self) -> bool {
        self.translates_responses
    }

    /// The translator of the answer, once [`BackendCall::request`] has read
    /// the request; `None` when the answer is OpenAI's already. A streamed
    /// answer's records may be `max_event_bytes` long.
    pub fn response_translator(&self, max_event_bytes: usize) -> Option<Box<dyn ResponseTranslator>> {
        let mut context = match (self.translator.response_context(), &self.client) {
            (Some(context), _) => context,
            // An OpenAI backend's chat answer needs only the client API's translation.
            (None, Some(_)) => ResponseContext::new(Dialect::Openai, Endpoint::ChatCompletions),
            (None, None) => return None,
        };
        context.max_event_bytes = max_event_bytes;
        context.client = self.client.as_ref().map(|client| client.answer_context());
        context.translator()
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
pub fn plan_answer(translation: &mut dyn ResponseTranslator, status: u16, content_type: &[u8]) -> AnswerPlan {
    let plan = translation.plan(status, content_type);
    let mut headers = HeaderChanges { set: Vec::new(), remove: vec!["content-length"] };
    if plan.status != status {
        headers.set.push((":status", plan.status.to_string()));
    }
    headers.set.extend(plan.content_type.map(|c| ("content-type", c.to_string())));
    AnswerPlan { streamed: plan.streamed, headers }
}

/// Logs why the gateway's own configuration is at fault, and returns the
/// answer to the client, which is not told why.
pub fn log_misconfiguration(why: &dyn std::fmt::Display) -> GatewayError {
    tracing::error!("cannot rewrite a request: {why}");
    GatewayError::misconfigured()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_plan_changes_the_status_only_when_the_translation_does() {
        let context = ResponseContext::new(Dialect::Anthropic, Endpoint::ChatCompletions);
        let mut translation = context.translator().unwrap();
        let overloaded = plan_answer(translation.as_mut(), 529, b"application/json");
        assert!(!overloaded.streamed);
        let set = vec![(":status", "503".to_string()), ("content-type", "application/json".to_string())];
        assert_eq!(overloaded.headers, HeaderChanges { set, remove: vec!["content-length"] });
        let streamed = plan_answer(translation.as_mut(), 200, b"text/event-stream");
        assert!(streamed.streamed);
        assert_eq!(streamed.headers.set, vec![("content-type", "text/event-stream".to_string())]);
    }

    #[test]
    fn only_answers_in_another_api_than_the_clients_are_watched() {
        let keys = KeySources::default();
        let anthropic = || BackendProfile { dialect: Dialect::Anthropic, ..Default::default() };
        let watched = |profile, path: &str| {
            BackendCall::for_profile(profile, path.as_bytes(), None, &keys).unwrap().translates_responses()
        };
        assert!(watched(anthropic(), "/v1/chat/completions"));
        assert!(!watched(anthropic(), "/v1/messages"), "Anthropic answers Messages in Messages");
        assert!(!watched(anthropic(), "/v1/messages/count_tokens"));
        assert!(watched(anthropic(), "/v1/responses"));
        assert!(watched(BackendProfile::default(), "/v1/messages"));
        assert!(!watched(BackendProfile::default(), "/v1/chat/completions"));
    }

    #[test]
    fn a_translation_says_when_it_has_ended_a_stream_early() {
        for (dialect, content_type, unreadable) in [
            (Dialect::Anthropic, &b"text/event-stream"[..], &b"data: {nope\n\n"[..]),
            (Dialect::Ollama, b"application/x-ndjson", b"{nope\n"),
        ] {
            let mut translation = ResponseContext::new(dialect, Endpoint::ChatCompletions).translator().unwrap();
            assert!(plan_answer(translation.as_mut(), 200, content_type).streamed);
            assert!(!translation.ended());
            let out = String::from_utf8(translation.stream(unreadable, false)).unwrap();
            assert!(out.contains("stream_unreadable") && translation.ended(), "{dialect:?}: {out}");
            assert!(translation.stream(b"data: {}\n\n", true).is_empty(), "nothing goes on after the end");
        }
    }
}
