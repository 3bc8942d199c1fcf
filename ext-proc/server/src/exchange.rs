//! One ext_proc exchange: what to answer to each message Envoy sends about a
//! single HTTP request. It knows Envoy's protocol and no dialect: the
//! request's [`BackendCall`] decides every rewrite. It waits on nothing but
//! the stored responses of the Responses API, and only for the requests that
//! continue or keep one; tested without Envoy.

use crate::envoy_messages::{self, Watch, RESPONSE_CODE};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use modelgate_batch::responses::Responses;
use modelgate_dialects::call::{log_misconfiguration, plan_answer, BackendCall, UpstreamParts};
use modelgate_dialects::credentials::KeySources;
use modelgate_dialects::dialect::ResponseTranslator;
use modelgate_pools::pool::{PickRequest, Picked, Pool};
use modelgate_pools::request::pick_fields;
use modelgate_pools::Pools;
use modelgate_proto::backend::BackendProfile;
use modelgate_proto::client_api::ClientApi;
use modelgate_proto::error::GatewayError;
use modelgate_proto::headers;
use modelgate_proto::stored_response::StoredResponse;
use std::sync::Arc;
use std::time::Instant;

pub struct Exchange {
    /// The key sources this process may read.
    keys: Arc<KeySources>,
    /// The self-hosted pools whose replicas this process picks.
    pools: Arc<Pools>,
    /// The Responses API's stored responses: loaded for `previous_response_id`, kept when an answer completes.
    responses: Arc<Responses>,
    /// Set from the request headers when the request's backend has a profile.
    active: Option<Active>,
    /// The longest event of a translated stream.
    max_event_bytes: usize,
    /// The API of the request's path: the errors ext_proc answers itself take its envelope.
    api: ClientApi,
}

struct Active {
    call: BackendCall,
    /// For a backend that is a self-hosted pool: where its replica is picked.
    pool: Option<PoolRoute>,
    /// The answer's translation, once the request is known, for backends whose answers need one.
    translation: Option<Box<dyn ResponseTranslator>>,
    /// The response's status and whether its body streams, once its headers are seen.
    response: Option<(u16, bool)>,
    /// Whose stored responses the request continues and keeps: the client
    /// key's name the filter sent (empty on a gateway without keys).
    owner: String,
}

/// A request to a self-hosted pool.
struct PoolRoute {
    pool: Arc<Pool>,
    /// The model as the replica sees it, when the profile renames it.
    rename: Option<String>,
    /// The value of the pool's session header, if the request sent one.
    session: Option<Vec<u8>>,
    /// The replicas picked. Kept until the exchange ends, since its drop ends
    /// the request's count in flight on its replica. That is when the answer
    /// ends: measured with Envoy 1.40, an exchange whose response phases are
    /// all skipped stays open until Envoy is done with the request (the count
    /// was still 1 while the replica ran it, 0 once the answer had come), so
    /// nothing more need be asked of Envoy to make the count last.
    picked: Option<Picked>,
}

impl Exchange {
    pub fn new(keys: Arc<KeySources>, pools: Arc<Pools>, responses: Arc<Responses>, max_event_bytes: usize) -> Self {
        Exchange { keys, pools, responses, active: None, max_event_bytes, api: ClientApi::default() }
    }

    /// The answer to one message; `None` for a message with nothing in it.
    /// Ready at once but for the stored responses' reads and writes.
    pub async fn on_message(&mut self, message: ProcessingRequest) -> Option<ProcessingResponse> {
        let request = message.request?;
        let api = self.api;
        let answer = match (&request, &mut self.active) {
            (Request::RequestHeaders(h), _) => {
                self.api = ClientApi::of_path(envoy_messages::header(h, ":path").unwrap_or_default());
                let internal: Vec<&str> = [headers::OWNER, headers::WHOLE_ANSWER]
                    .into_iter()
                    .filter(|name| envoy_messages::header(h, name).is_some())
                    .collect();
                match start(h, &self.keys, &self.pools) {
                    Ok(Some(active)) => {
                        let watch = match active.call.translates_responses() {
                            false => Watch::Nothing,
                            true if internal.contains(&headers::WHOLE_ANSWER) => Watch::WholeBody,
                            true => Watch::HeadersThenBody,
                        };
                        self.active = Some(active);
                        envoy_messages::continue_request_headers(watch, &internal)
                    }
                    Ok(None) => envoy_messages::pass(&request),
                    Err(e) => envoy_messages::reject(&e, self.api),
                }
            }
            (Request::RequestBody(body), Some(active)) => match upstream(active, &body.body, &self.responses).await {
                Ok(UpstreamParts { answer: Some(answer), .. }) => envoy_messages::answer_json(answer),
                Ok(upstream) => {
                    active.translation = active.call.response_translator(self.max_event_bytes);
                    match &mut active.pool {
                        Some(route) => route.pick(&body.body, upstream, api),
                        None => forward(upstream),
                    }
                }
                Err(e) => envoy_messages::reject(&e, api),
            },
            (Request::ResponseHeaders(h), Some(Active { translation: Some(translation), response, .. })) => {
                let status = envoy_messages::header(h, ":status")
                    .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
                    .unwrap_or(200);
                let content_type = envoy_messages::header(h, "content-type").unwrap_or_default();
                let plan = plan_answer(translation.as_mut(), status, content_type);
                *response = Some((status, plan.streamed));
                envoy_messages::rewrite_response_headers(plan.headers, plan.streamed)
            }
            (Request::ResponseBody(body), Some(Active { translation: Some(translation), response, owner, .. })) => {
                // A whole answer's headers were not asked for: its status comes with the body.
                let (status, streamed) = match response {
                    Some(seen) => seen,
                    None => match envoy_messages::response_code(&message.attributes) {
                        Some(status) => {
                            // Only the translation's own state matters: no header of this answer can change.
                            translation.plan(status, b"application/json");
                            response.insert((status, false))
                        }
                        None => {
                            let why = format_args!("ext_proc's response_attributes lack {RESPONSE_CODE}");
                            return Some(envoy_messages::reject(&log_misconfiguration(&why), api));
                        }
                    },
                };
                let answer = if *streamed {
                    envoy_messages::replace_response_piece(translation.stream(&body.body, body.end_of_stream))
                } else {
                    envoy_messages::replace_response_body(translation.whole(*status, &body.body))
                };
                // Kept before the client has the piece that completes the answer (a stream's
                // `response.completed` may come before Envoy's end of stream), so a request
                // continuing it, sent as soon as the client has it, finds it.
                if let Some(stored) = translation.finished() {
                    keep(&self.responses, owner, stored).await;
                }
                answer
            }
            _ => envoy_messages::pass(&request),
        };
        Some(answer)
    }
}

/// The backend's request for the client's `body`, continuing the stored
/// conversation it names, if any.
async fn upstream(active: &mut Active, body: &[u8], responses: &Responses) -> Result<UpstreamParts, GatewayError> {
    let history = match active.call.previous_response(body)? {
        Some(id) => Some(conversation(responses, &active.owner, &id).await?),
        None => None,
    };
    active.call.request_continuing(body, history)
}

/// The items of the owner's stored response `id`, which a request continues.
async fn conversation(responses: &Responses, owner: &str, id: &str) -> Result<Vec<serde_json::Value>, GatewayError> {
    match responses.load(owner, id).await {
        Ok(Some(stored)) => Ok(stored.conversation()),
        Ok(None) => Err(GatewayError::previous_response_not_found(id)),
        Err(e) => {
            tracing::warn!(error = %e, "the response store cannot load a previous response");
            Err(GatewayError::response_store_unavailable())
        }
    }
}

/// Keeps a completed response. The client's answer goes on whether or not it could be kept.
async fn keep(responses: &Responses, owner: &str, stored: StoredResponse) {
    let id = stored.id().to_string();
    if let Err(e) = responses.keep(owner, stored).await {
        tracing::warn!(response = id.as_str(), error = %e, "a completed response could not be stored");
    }
}

/// The answer that sends the request on, rewritten as `upstream` says.
fn forward(upstream: UpstreamParts) -> ProcessingResponse {
    match upstream.body {
        Some(body) => envoy_messages::replace_request_body(body, upstream.headers),
        None => envoy_messages::change_request_headers(upstream.headers),
    }
}

impl PoolRoute {
    /// Picks the replicas for the request (the client's `body`, or the body
    /// the backend gets when it differs: a Responses or Messages request goes
    /// as a chat completion) and sends it on to them, or refuses it as the
    /// picker does, in the client's `api`.
    fn pick(&mut self, body: &[u8], mut upstream: UpstreamParts, api: ClientApi) -> ProcessingResponse {
        let fields = match pick_fields(upstream.body.as_deref().unwrap_or(body)) {
            Ok(fields) => fields,
            Err(e) => return envoy_messages::reject(&e, api),
        };
        let model = self.rename.as_deref().unwrap_or(&fields.model);
        let request = PickRequest { model, prompt: fields.prompt, session: self.session.as_deref(), subset: None };
        match self.pool.pick(&request, Instant::now()) {
            Ok(picked) => {
                let destination = picked.destination();
                self.picked = Some(picked);
                upstream.headers.set.push((headers::DESTINATION_ENDPOINT, destination.clone()));
                envoy_messages::with_destination(forward(upstream), &destination)
            }
            Err(refusal) => {
                envoy_messages::reject_with(&refusal.to_error(self.pool.name(), model), api, refusal.retry_after_secs())
            }
        }
    }
}

/// What a request needs, from its headers; `None` when the filter marked
/// nothing to do.
fn start(request: &HttpHeaders, keys: &KeySources, pools: &Pools) -> Result<Option<Active>, GatewayError> {
    let Some(profile) = envoy_messages::header(request, headers::BACKEND) else {
        return Ok(None);
    };
    let profile = BackendProfile::from_header(profile).map_err(|e| log_misconfiguration(&e))?;
    let pool = match &profile.pool {
        Some(name) => {
            let pool = pools.get(name).ok_or_else(|| {
                log_misconfiguration(&format_args!("the pool `{name}` is not in ext-proc's --pools file"))
            })?;
            let session =
                pool.config().session_header.as_deref().and_then(|name| envoy_messages::header(request, name));
            Some(PoolRoute {
                pool: Arc::clone(pool),
                rename: profile.model.clone(),
                session: session.map(<[u8]>::to_vec),
                picked: None,
            })
        }
        None => None,
    };
    let path = envoy_messages::header(request, ":path").unwrap_or_default();
    let call = BackendCall::for_request(profile, path, |name| envoy_messages::header(request, name), keys)?;
    let owner =
        envoy_messages::header(request, headers::OWNER).map(|owner| String::from_utf8_lossy(owner).into_owned());
    Ok(Some(Active { call, pool, translation: None, response: None, owner: owner.unwrap_or_default() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        body_mutation::Mutation, processing_response::Response, CommonResponse, HttpBody,
    };
    use envoy_types::pb::google::protobuf::value::Kind;
    use futures_util::FutureExt;
    use modelgate_batch::store::Meta;
    use modelgate_pools::metrics::ReplicaMetrics;
    use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
    use serde_json::{json, Value};
    use std::time::Duration;

    impl Exchange {
        /// The answer to a message that waits on no store.
        fn on_message_now(&mut self, message: ProcessingRequest) -> Option<ProcessingResponse> {
            self.on_message(message).now_or_never().expect("an answer at once")
        }
    }

    /// Stored responses in SQLite, in a temporary directory kept until the process ends.
    fn responses() -> Arc<Responses> {
        let dir = tempfile::tempdir().unwrap().keep();
        let meta = Meta::open(None, &dir, Duration::from_secs(2)).unwrap();
        Arc::new(Responses::new(Arc::new(meta), Duration::from_secs(86_400)))
    }

    /// An exchange whose stored responses are a store shared by the tests that never read it.
    fn new_exchange(keys: Arc<KeySources>, pools: Arc<Pools>, max_event_bytes: usize) -> Exchange {
        static SHARED: std::sync::LazyLock<Arc<Responses>> = std::sync::LazyLock::new(responses);
        Exchange::new(keys, pools, Arc::clone(&SHARED), max_event_bytes)
    }

    fn headers_of(pairs: &[(&str, &str)]) -> HttpHeaders {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue { key: k.to_string(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        HttpHeaders { headers: Some(HeaderMap { headers }), ..Default::default() }
    }

    fn request_headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
        ProcessingRequest { request: Some(Request::RequestHeaders(headers_of(pairs))), ..Default::default() }
    }

    fn response_headers(pairs: &[(&str, &str)]) -> ProcessingRequest {
        ProcessingRequest { request: Some(Request::ResponseHeaders(headers_of(pairs))), ..Default::default() }
    }

    fn body(bytes: &[u8], end_of_stream: bool, response: bool) -> ProcessingRequest {
        let body = HttpBody { body: bytes.to_vec(), end_of_stream, ..Default::default() };
        let request = if response { Request::ResponseBody(body) } else { Request::RequestBody(body) };
        ProcessingRequest { request: Some(request), ..Default::default() }
    }

    fn common(answer: ProcessingResponse) -> CommonResponse {
        match answer.response {
            Some(Response::RequestBody(b) | Response::ResponseBody(b)) => b.response.unwrap(),
            Some(Response::RequestHeaders(h) | Response::ResponseHeaders(h)) => h.response.unwrap_or_default(),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    fn new_body(common: &CommonResponse) -> Vec<u8> {
        let Some(Mutation::Body(body)) = common.body_mutation.clone().unwrap().mutation else { panic!("no body") };
        body
    }

    fn set_headers(common: &CommonResponse) -> Vec<(String, String)> {
        let mutation = common.header_mutation.clone().unwrap_or_default();
        mutation
            .set_headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), String::from_utf8_lossy(&h.raw_value).into_owned())
            })
            .collect()
    }

    #[test]
    fn renames_the_model_and_fixes_content_length() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let first = ex.on_message_now(request_headers(&[
            (":path", "/v1/chat/completions"),
            (headers::BACKEND, r#"{"model":"llama-3"}"#),
        ]));
        let first = first.unwrap();
        assert!(first.mode_override.is_none(), "an OpenAI backend's answers are not watched");
        let answer = common(ex.on_message_now(body(br#"{"model":"gpt-4o-mini","n":1}"#, true, false)).unwrap());
        assert_eq!(new_body(&answer), br#"{"model":"llama-3","n":1}"#);
        assert_eq!(set_headers(&answer), vec![("content-length".to_string(), "25".to_string())]);
    }

    #[test]
    fn a_backend_that_only_needs_its_key_gets_the_body_as_it_is() {
        let mut ex = new_exchange(
            Arc::new(KeySources::new(vec!["HOME".into()], &[]).unwrap()),
            Arc::default(),
            DEFAULT_MAX_EVENT_BYTES,
        );
        let key = std::env::var("HOME").unwrap();
        ex.on_message_now(request_headers(&[
            (":path", "/v1/chat/completions"),
            (headers::BACKEND, r#"{"api_key":{"env":"HOME"}}"#),
        ]));
        let answer = common(ex.on_message_now(body(br#"{"model":"m"}"#, true, false)).unwrap());
        assert!(answer.body_mutation.is_none());
        assert_eq!(set_headers(&answer), vec![("authorization".to_string(), format!("Bearer {}", key.trim()))]);
    }

    #[test]
    fn a_key_source_the_process_was_not_given_is_refused_before_anything_is_sent() {
        let mut ex = new_exchange(
            Arc::new(KeySources::new(vec!["HOME".into()], &[]).unwrap()),
            Arc::default(),
            DEFAULT_MAX_EVENT_BYTES,
        );
        let answer = ex.on_message_now(request_headers(&[
            (":path", "/v1/chat/completions"),
            (headers::BACKEND, r#"{"api_key":{"env":"PATH"}}"#),
        ]));
        let Some(Response::ImmediateResponse(reply)) = answer.unwrap().response else { panic!("expected a refusal") };
        assert_eq!(reply.status.unwrap().code, 500);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["code"], "backend_key_unavailable");
        assert!(!String::from_utf8_lossy(&reply.body).contains(&std::env::var("PATH").unwrap()));
        let set: Vec<_> = reply.headers.unwrap().set_headers.into_iter().filter_map(|h| h.header).collect();
        let said = |name: &str| set.iter().find(|h| h.key == name).map(|h| h.raw_value.clone());
        assert_eq!(said("x-should-retry").as_deref(), Some(&b"false"[..]), "only the operator can fix it");
    }

    #[test]
    fn without_a_profile_everything_passes_untouched() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        ex.on_message_now(request_headers(&[(":path", "/v1/embeddings")]));
        let answer = ex.on_message_now(body(br#"{"model":"x"}"#, true, false)).unwrap();
        let Some(Response::RequestBody(body)) = answer.response else { panic!("expected a body answer") };
        assert!(body.response.is_none());
    }

    #[test]
    fn a_body_that_is_not_json_gets_an_openai_400() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        ex.on_message_now(request_headers(&[(":path", "/v1/completions"), (headers::BACKEND, r#"{"model":"m"}"#)]));
        let answer = ex.on_message_now(body(b"nope", true, false)).unwrap();
        let Some(Response::ImmediateResponse(reply)) = answer.response else { panic!("expected an immediate reply") };
        assert_eq!(reply.status.unwrap().code, 400);
        let v: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn an_anthropic_exchange_from_request_to_streamed_answer() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let profile = r#"{"dialect":"anthropic","model":"claude-x","api_key":"passthrough"}"#;
        let first = ex
            .on_message_now(request_headers(&[
                (":path", "/v1/chat/completions"),
                (headers::BACKEND, profile),
                ("authorization", "Bearer sk-client"),
            ]))
            .unwrap();
        let mode = first.mode_override.expect("the response headers are asked for");
        // Whole until the headers say otherwise: a body that comes before ext-proc answers them
        // is then buffered within Envoy's limit, not held with back-pressure (Envoy 1.40).
        assert_eq!((mode.response_header_mode, mode.response_body_mode), (1, 2), "sent, and buffered");
        let request = common(
            ex.on_message_now(body(
                br#"{"model":"c","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
                true,
                false,
            ))
            .unwrap(),
        );
        let sent: Value = serde_json::from_slice(&new_body(&request)).unwrap();
        assert_eq!(sent["model"], "claude-x");
        assert_eq!(sent["max_tokens"], 4096);
        let set = set_headers(&request);
        for expected in [("x-api-key", "sk-client"), (":path", "/v1/messages"), ("anthropic-version", "2023-06-01")] {
            assert!(set.contains(&(expected.0.to_string(), expected.1.to_string())), "{set:?}");
        }
        assert_eq!(request.header_mutation.unwrap().remove_headers, vec!["authorization", "accept-encoding"]);

        let headers_answer =
            ex.on_message_now(response_headers(&[(":status", "200"), ("content-type", "text/event-stream")])).unwrap();
        assert_eq!(headers_answer.mode_override.unwrap().response_body_mode, 1, "streamed");
        let start = br#"event: message_start
data: {"type":"message_start","message":{"id":"msg_1","model":"claude-x","usage":{"input_tokens":3,"output_tokens":1}}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}

"#;
        let out = new_body(&common(ex.on_message_now(body(start, false, true)).unwrap()));
        let text = String::from_utf8(out).unwrap();
        let chunks: Vec<Value> =
            text.split("\n\n").filter(|e| !e.is_empty()).map(|e| serde_json::from_str(&e[6..]).unwrap()).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "Hi"}));
    }

    #[test]
    fn an_anthropic_error_becomes_an_openai_error_with_a_retryable_status() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        ex.on_message_now(request_headers(&[
            (":path", "/v1/chat/completions"),
            (headers::BACKEND, r#"{"dialect":"anthropic"}"#),
        ]));
        ex.on_message_now(body(br#"{"model":"c","messages":[]}"#, true, false));
        let headers_answer = common(
            ex.on_message_now(response_headers(&[(":status", "529"), ("content-type", "application/json")])).unwrap(),
        );
        assert!(set_headers(&headers_answer).contains(&(":status".to_string(), "503".to_string())));
        let error = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let out: Value =
            serde_json::from_slice(&new_body(&common(ex.on_message_now(body(error, true, true)).unwrap()))).unwrap();
        assert_eq!(
            out,
            json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded"}})
        );
    }

    /// A response body whose status Envoy sends among the attributes, as `response_attributes` asks.
    fn body_with_status(bytes: &[u8], status: Option<u16>) -> ProcessingRequest {
        let mut message = body(bytes, true, true);
        let code = |code| envoy_types::pb::google::protobuf::Value { kind: Some(Kind::NumberValue(f64::from(code))) };
        let fields = status.map(|status| (RESPONSE_CODE.to_string(), code(status))).into_iter().collect();
        let attributes = envoy_types::pb::google::protobuf::Struct { fields };
        message.attributes = [("envoy.filters.http.ext_proc".to_string(), attributes)].into();
        message
    }

    /// An Anthropic exchange for a request that asked for one answer: its response watched by the body alone.
    fn whole_anthropic_exchange() -> Exchange {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let first = ex
            .on_message_now(request_headers(&[
                (":path", "/v1/chat/completions"),
                (headers::BACKEND, r#"{"dialect":"anthropic"}"#),
                (headers::WHOLE_ANSWER, "1"),
            ]))
            .unwrap();
        let mode = first.mode_override.expect("the response's body is asked for");
        assert_eq!((mode.response_header_mode, mode.response_body_mode), (2, 2), "headers skipped, body buffered");
        let removed = common(first).header_mutation.unwrap().remove_headers;
        assert_eq!(removed, vec![headers::WHOLE_ANSWER], "the mark does not reach the backend");
        ex.on_message_now(body(br#"{"model":"c","messages":[{"role":"user","content":"hi"}]}"#, true, false));
        ex
    }

    #[test]
    fn a_whole_answer_is_translated_from_its_body_alone() {
        let mut ex = whole_anthropic_exchange();
        let message = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x",
            "content":[{"type":"text","text":"Hello"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":3,"output_tokens":1}}"#;
        let out: Value = serde_json::from_slice(&new_body(&common(
            ex.on_message_now(body_with_status(message, Some(200))).unwrap(),
        )))
        .unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["choices"][0]["message"]["content"], "Hello");
        assert_eq!(out["usage"]["total_tokens"], 4);
        // An error is translated by the status that came with it; the filter sets the client's status.
        let mut ex = whole_anthropic_exchange();
        let error = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let out: Value =
            serde_json::from_slice(&new_body(&common(ex.on_message_now(body_with_status(error, Some(529))).unwrap())))
                .unwrap();
        assert_eq!(out["error"]["code"], "overloaded");
    }

    #[test]
    fn a_whole_answer_without_its_status_is_a_misconfiguration_not_a_guess() {
        let mut ex = whole_anthropic_exchange();
        let (status, _, error) = rejection(ex.on_message_now(body_with_status(b"{}", None)).unwrap());
        assert_eq!(status, 500);
        assert_eq!(error["error"]["code"], "gateway_misconfigured");
    }

    #[test]
    fn an_anthropic_model_refuses_endpoints_anthropic_lacks() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let answer = ex
            .on_message_now(request_headers(&[
                (":path", "/v1/embeddings"),
                (headers::BACKEND, r#"{"dialect":"anthropic"}"#),
            ]))
            .unwrap();
        let Some(Response::ImmediateResponse(reply)) = answer.response else { panic!("expected an immediate reply") };
        assert_eq!(reply.status.unwrap().code, 404);
    }

    /// One pool of two replicas, `a` (`10.0.0.1:8000`) and `b`, both freshly
    /// scraped with `waiting` requests queued; `extra` adds pool settings.
    fn pools(waiting: [u64; 2], extra: Value) -> Arc<Pools> {
        let mut pool = json!({"replicas": ["10.0.0.1:8000", "10.0.0.2:8000"], "strategy": "least_requests",
                              "fallbacks": 1});
        pool.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let pools = Pools::from_json(json!({"pools": {"p": pool}}).to_string().as_bytes()).unwrap();
        for (replica, waiting) in pools.get("p").unwrap().replicas().iter().zip(waiting) {
            replica.update(|state| {
                state.metrics = Some(ReplicaMetrics { waiting, ..Default::default() });
                state.scraped_at = Some(Instant::now());
                state.models = Some(["llama-3".to_string()].into());
            });
        }
        Arc::new(pools)
    }

    fn pool_exchange(pools: &Arc<Pools>, profile: &str) -> Exchange {
        let mut ex = new_exchange(Arc::default(), Arc::clone(pools), DEFAULT_MAX_EVENT_BYTES);
        let answer = ex
            .on_message_now(request_headers(&[(":path", "/v1/chat/completions"), (headers::BACKEND, profile)]))
            .unwrap();
        assert!(matches!(answer.response, Some(Response::RequestHeaders(_))), "{answer:?}");
        ex
    }

    fn chat() -> ProcessingRequest {
        body(br#"{"model":"llama-3","messages":[{"role":"user","content":"hi"}]}"#, true, false)
    }

    fn rejection(answer: ProcessingResponse) -> (i32, Vec<(String, String)>, Value) {
        let Some(Response::ImmediateResponse(reply)) = answer.response else {
            panic!("expected a refusal: {answer:?}")
        };
        let headers = reply
            .headers
            .unwrap()
            .set_headers
            .into_iter()
            .map(|h| {
                let h = h.header.unwrap();
                (h.key, String::from_utf8_lossy(&h.raw_value).into_owned())
            })
            .collect();
        (reply.status.unwrap().code, headers, serde_json::from_slice(&reply.body).unwrap())
    }

    #[test]
    fn a_pool_request_names_its_replicas_in_the_header_and_the_lb_metadata() {
        let pools = pools([0, 0], json!({}));
        let mut ex = pool_exchange(&pools, r#"{"pool":"p"}"#);
        let answer = ex.on_message_now(chat()).unwrap();
        let metadata = answer.dynamic_metadata.clone().expect("envoy.lb metadata");
        let common = common(answer);
        assert!(common.body_mutation.is_none(), "the body goes on as it is");
        let (_, destination) =
            set_headers(&common).into_iter().find(|(k, _)| k == headers::DESTINATION_ENDPOINT).unwrap();
        let mut replicas: Vec<&str> = destination.split(',').collect();
        replicas.sort_unstable();
        assert_eq!(replicas, ["10.0.0.1:8000", "10.0.0.2:8000"], "the pick, then its fallback");
        let Some(Kind::StructValue(lb)) = metadata.fields["envoy.lb"].kind.clone() else { panic!("{metadata:?}") };
        let Some(Kind::StringValue(value)) = lb.fields[headers::DESTINATION_ENDPOINT].kind.clone() else {
            panic!("{lb:?}")
        };
        assert_eq!(value, destination);
    }

    #[test]
    fn the_pick_counts_in_flight_until_the_exchange_ends() {
        let pools = pools([0, 0], json!({}));
        let in_flight = || pools.get("p").unwrap().replicas().iter().map(|r| r.in_flight()).sum::<u64>();
        let mut ex = pool_exchange(&pools, r#"{"pool":"p"}"#);
        ex.on_message_now(chat());
        assert_eq!(in_flight(), 1);
        drop(ex);
        assert_eq!(in_flight(), 0);
    }

    #[test]
    fn a_rename_is_picked_for_and_sent_beside_the_destination() {
        let pools = pools([0, 0], json!({"discover_models": true}));
        let mut ex = pool_exchange(&pools, r#"{"pool":"p","model":"llama-3"}"#);
        let answer = common(ex.on_message_now(body(br#"{"model":"my-llama","messages":[]}"#, true, false)).unwrap());
        assert_eq!(new_body(&answer), br#"{"model":"llama-3","messages":[]}"#);
        let mut names: Vec<String> = set_headers(&answer).into_iter().map(|(k, _)| k).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", headers::DESTINATION_ENDPOINT]);
        // Without the rename, no replica serves the client's name.
        let mut ex = pool_exchange(&pools, r#"{"pool":"p"}"#);
        let (status, _, error) = rejection(ex.on_message_now(body(br#"{"model":"my-llama"}"#, true, false)).unwrap());
        assert_eq!((status, error["error"]["code"].as_str()), (404, Some("model_not_found")));
    }

    #[test]
    fn a_saturated_pool_sheds_with_retry_after() {
        let pools = pools([3, 5], json!({"max_waiting": 3, "retry_after_secs": 2}));
        let mut ex = pool_exchange(&pools, r#"{"pool":"p"}"#);
        let (status, headers, error) = rejection(ex.on_message_now(chat()).unwrap());
        assert_eq!((status, error["error"]["code"].as_str()), (429, Some("pool_saturated")));
        assert!(headers.contains(&("retry-after".to_string(), "2".to_string())), "{headers:?}");
    }

    #[test]
    fn a_pool_without_a_ready_replica_answers_503() {
        let pools = Arc::new(Pools::from_json(br#"{"pools":{"p":{"replicas":["10.0.0.1:8000"]}}}"#).unwrap());
        let mut ex = pool_exchange(&pools, r#"{"pool":"p"}"#);
        let (status, headers, error) = rejection(ex.on_message_now(chat()).unwrap());
        assert_eq!((status, error["error"]["code"].as_str()), (503, Some("no_ready_replica")));
        assert!(!headers.iter().any(|(k, _)| k == "retry-after"));
    }

    #[test]
    fn a_pool_missing_from_the_pools_file_is_a_misconfiguration() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let answer = ex
            .on_message_now(request_headers(&[
                (":path", "/v1/chat/completions"),
                (headers::BACKEND, r#"{"pool":"p"}"#),
            ]))
            .unwrap();
        assert_eq!(rejection(answer).0, 500);
    }

    #[test]
    fn the_session_header_keeps_a_session_on_one_replica() {
        let pools = pools(
            [0, 0],
            json!({"strategy": "random", "weights": {"random": 0.01, "session": 1.0},
                                          "session_header": "x-session-id"}),
        );
        let destination = |session: &str| {
            let mut ex = new_exchange(Arc::default(), Arc::clone(&pools), DEFAULT_MAX_EVENT_BYTES);
            ex.on_message_now(request_headers(&[
                (":path", "/v1/chat/completions"),
                (headers::BACKEND, r#"{"pool":"p"}"#),
                ("x-session-id", session),
            ]));
            let answer = common(ex.on_message_now(chat()).unwrap());
            let (_, value) =
                set_headers(&answer).into_iter().find(|(k, _)| k == headers::DESTINATION_ENDPOINT).unwrap();
            value.split(',').next().unwrap().to_string()
        };
        let first = destination("conversation-1");
        assert!((0..20).all(|_| destination("conversation-1") == first));
    }

    #[test]
    fn an_empty_message_gets_no_answer() {
        assert!(new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES)
            .on_message_now(ProcessingRequest::default())
            .is_none());
    }

    #[test]
    fn a_refusal_on_anthropics_api_is_anthropics_envelope() {
        let mut ex = new_exchange(
            Arc::new(KeySources::new(vec!["HOME".into()], &[]).unwrap()),
            Arc::default(),
            DEFAULT_MAX_EVENT_BYTES,
        );
        let answer = ex.on_message_now(request_headers(&[
            (":path", "/v1/messages"),
            (headers::BACKEND, r#"{"api_key":{"env":"PATH"}}"#),
        ]));
        let (status, headers, error) = rejection(answer.unwrap());
        assert_eq!(status, 500);
        assert_eq!(
            error,
            json!({"type": "error", "error": {"type": "api_error", "message": error["error"]["message"]}})
        );
        assert!(headers.contains(&("content-type".to_string(), "application/json".to_string())), "{headers:?}");
        assert!(headers.contains(&("x-should-retry".to_string(), "false".to_string())), "{headers:?}");
    }

    #[test]
    fn the_owner_the_filter_named_does_not_reach_the_backend() {
        let mut ex = new_exchange(Arc::default(), Arc::default(), DEFAULT_MAX_EVENT_BYTES);
        let answer = ex
            .on_message_now(request_headers(&[
                (":path", "/v1/chat/completions"),
                (headers::BACKEND, "{}"),
                (headers::OWNER, "alice"),
            ]))
            .unwrap();
        let removed = common(answer).header_mutation.unwrap().remove_headers;
        assert_eq!(removed, vec![headers::OWNER]);
    }

    /// An answer translation that completes a response asked to be stored.
    struct Completes;

    impl ResponseTranslator for Completes {
        fn plan(&mut self, status: u16, _content_type: &[u8]) -> modelgate_dialects::dialect::ResponsePlan {
            modelgate_dialects::dialect::ResponsePlan { status, streamed: false, content_type: None }
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

        fn finished(&mut self) -> Option<StoredResponse> {
            Some(StoredResponse {
                response: json!({"id": "resp_1", "object": "response", "output": [
                    {"type": "message", "id": "msg_out", "role": "assistant", "content": []}]}),
                input: vec![json!({"role": "user", "content": "hi"})],
            })
        }
    }

    #[tokio::test]
    async fn a_completed_response_is_kept_for_its_owner_before_the_answer_goes() {
        let responses = responses();
        let mut ex = Exchange::new(Arc::default(), Arc::default(), Arc::clone(&responses), DEFAULT_MAX_EVENT_BYTES);
        let call = BackendCall::start(b"{}", b"/v1/chat/completions", |_| None, &KeySources::default()).unwrap();
        ex.active = Some(Active {
            call,
            pool: None,
            translation: Some(Box::new(Completes)),
            response: None,
            owner: "alice".into(),
        });
        ex.on_message(response_headers(&[(":status", "200"), ("content-type", "application/json")])).await;
        let answer = ex.on_message(body(b"{}", true, true)).await.unwrap();
        assert_eq!(new_body(&common(answer)), b"{}");

        let items = conversation(&responses, "alice", "resp_1").await.unwrap();
        assert_eq!(items.len(), 2, "the input, then the output: {items:?}");
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"), "an input item gets an id");
        assert_eq!(items[1]["id"], "msg_out");
        let refused = conversation(&responses, "bob", "resp_1").await.unwrap_err();
        assert_eq!((refused.status, refused.param.as_deref()), (400, Some("previous_response_id")));
        assert_eq!(refused.message, "Previous response with id 'resp_1' not found.");
        let unknown = conversation(&responses, "alice", "resp_2").await.unwrap_err();
        assert_eq!(unknown.code, Some(modelgate_proto::error::ErrorCode::PreviousResponseNotFound));
    }
}
