//! modelgate's proxy-wasm HTTP filter.
//!
//! Per request it drops internal headers a client may have sent, answers
//! `/v1/models` from configuration, and for model-routed endpoints buffers the
//! body (up to the configured limit), reads `model` once, and writes the
//! chosen cluster into a header the route table matches on. On the way back it
//! adds `openai-processing-ms` and rewrites every error answer — a backend's or
//! Envoy's own — as an OpenAI error envelope. Successful answers, streams
//! included, are never buffered.
//!
//! The callbacks stay thin: decisions are in [`request`]. Host calls go through
//! [`host`], which never panics, because a panic kills the VM for every later
//! request on its worker.

pub mod endpoint;
mod host;
pub mod request;
pub mod routing_fields;

use modelgate_proto::error_normalize::{normalize, Origin};
use modelgate_proto::headers;
use modelgate_proto::keys::{Caller, Presented};
use modelgate_proto::limits::{self, Verdict};
use modelgate_proto::routing::Router;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use request::{HeadersVerdict, Reply, RequestHead};
use std::rc::Rc;
use std::time::SystemTime;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Plugin { router: Rc::new(Router::default()) }) });
}}

struct Plugin {
    router: Rc<Router>,
}

impl Context for Plugin {}

impl RootContext for Plugin {
    /// A configuration that does not parse is refused, so Envoy rejects it at load time.
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match Router::from_json(&config) {
            Ok(router) => {
                self.router = Rc::new(router);
                true
            }
            Err(e) => {
                host::log_error(&e);
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            router: Rc::clone(&self.router),
            started: None,
            answered_here: false,
            error: None,
            guarded: false,
            caller: None,
            rate_limit: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    router: Rc<Router>,
    started: Option<SystemTime>,
    /// The filter answered itself: the answer is already an OpenAI error.
    answered_here: bool,
    /// Status and Envoy's code details of an error answer buffered for rewriting.
    error: Option<(u16, String)>,
    /// Sent through the stream guard: Envoy's code details come from the inner listener.
    guarded: bool,
    /// The client key the request came with, where keys are configured.
    caller: Caller,
    /// The key's rate limit as this request left it, for the answer's `x-ratelimit-*` headers.
    rate_limit: Option<Verdict>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.started = host::now();
        for name in headers::INTERNAL {
            host::remove_header(MapType::HttpRequestHeaders, name);
        }
        let method = host::header(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
        let path = host::header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let content_type = host::header(MapType::HttpRequestHeaders, "content-type");
        let content_length = host::header(MapType::HttpRequestHeaders, "content-length");
        // Two more host calls, only where keys are configured.
        let (authorization, api_key) = if self.router.client_keys().required() {
            (
                host::header(MapType::HttpRequestHeaders, "authorization"),
                host::header(MapType::HttpRequestHeaders, "api-key"),
            )
        } else {
            (None, None)
        };
        let head = RequestHead {
            method: &String::from_utf8_lossy(&method),
            path: &String::from_utf8_lossy(&path),
            content_type: content_type.as_deref(),
            content_length: content_length.as_deref(),
            end_of_stream,
            presented: Presented { authorization: authorization.as_deref(), api_key: api_key.as_deref() },
        };
        let verdict = request::on_request_headers(&self.router, head);
        match verdict {
            HeadersVerdict::PassThrough => Action::Continue,
            HeadersVerdict::ReadBody(caller) => {
                self.caller = caller;
                Action::Pause
            }
            HeadersVerdict::Respond(reply) => self.respond(&reply),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(reply) = request::body_too_large(&self.router, body_size) {
            return self.respond(&reply);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, body_size);
        match request::on_request_body(&self.router, &body, self.caller.as_deref()) {
            Ok(routing) => {
                if let Some(caller) = self.caller.as_deref() {
                    match request::rate_limit(caller, &routing.model, &host::SharedBuckets, host::now_us()) {
                        Ok(verdict) => self.rate_limit = verdict,
                        Err(reply) => return self.respond(&reply),
                    }
                }
                // Envoy clears the route cache itself when a wasm filter changes request
                // headers, so the route table sees the cluster header (the tests prove it).
                host::set_header(MapType::HttpRequestHeaders, headers::CLUSTER, &routing.cluster);
                if let Some(profile) = &routing.profile {
                    host::set_header(MapType::HttpRequestHeaders, routing.profile_header(), profile);
                }
                if !routing.forwards_client_key {
                    for name in headers::CLIENT_KEYS {
                        host::remove_header(MapType::HttpRequestHeaders, name);
                    }
                }
                if let Some(cluster) = &routing.stream_cluster {
                    host::set_header(MapType::HttpRequestHeaders, headers::STREAM_CLUSTER, cluster);
                    self.guarded = true;
                }
                Action::Continue
            }
            Err(reply) => self.respond(&reply),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(ms) = self.processing_ms() {
            host::set_header(MapType::HttpResponseHeaders, PROCESSING_MS, &ms);
        }
        for (name, value) in self.rate_limit.iter().flat_map(limits::request_headers) {
            host::set_header(MapType::HttpResponseHeaders, name, &value);
        }
        // The inner listener's reason, for this filter only: never sent on to the client.
        let relayed_details = if self.guarded {
            let details = host::header(MapType::HttpResponseHeaders, headers::CODE_DETAILS);
            host::remove_header(MapType::HttpResponseHeaders, headers::CODE_DETAILS);
            details
        } else {
            None
        };
        if self.answered_here {
            return Action::Continue;
        }
        let status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(200);
        if status < 400 {
            return Action::Continue;
        }
        let details = code_details(relayed_details);
        if end_of_stream {
            // No body will follow to rewrite: answer anew with the envelope.
            return match normalize(status, Origin::from_code_details(&details), b"") {
                Some(rewritten) => self.respond(&Reply::rewritten(status, rewritten)),
                None => Action::Continue,
            };
        }
        self.error = Some((status, details));
        host::remove_header(MapType::HttpResponseHeaders, "content-length");
        Action::Pause
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some((status, details)) = &self.error else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpResponseBody, body_size);
        let length = match normalize(*status, Origin::from_code_details(details), &body) {
            Some(rewritten) => {
                host::replace_body(BufferType::HttpResponseBody, body_size, &rewritten.body);
                host::set_header(MapType::HttpResponseHeaders, "content-type", "application/json");
                for (name, value) in request::retry_advice(rewritten.should_retry) {
                    host::set_header(MapType::HttpResponseHeaders, name, value);
                }
                rewritten.body.len()
            }
            None => body.len(),
        };
        host::set_header(MapType::HttpResponseHeaders, "content-length", &length.to_string());
        Action::Continue
    }
}

/// Why Envoy answered as it did: `via_upstream` for a backend's answer, or
/// the reason of a local reply. Behind the stream guard, the inner
/// listener's reason is the one that counts.
fn code_details(relayed: Option<Vec<u8>>) -> String {
    let details = relayed.or_else(|| host::property(&["response", "code_details"]));
    details.map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default()
}

/// Milliseconds the gateway and the backend took, as OpenAI reports them.
const PROCESSING_MS: &str = "openai-processing-ms";

impl Request {
    fn processing_ms(&self) -> Option<String> {
        let elapsed = host::now()?.duration_since(self.started?).ok()?;
        Some(elapsed.as_millis().to_string())
    }

    /// Answers the request from the filter; the answer is an OpenAI error or a models listing.
    fn respond(&mut self, reply: &Reply) -> Action {
        self.answered_here = true;
        let processing_ms = self.processing_ms().unwrap_or_default();
        let mut response_headers = vec![("content-type", "application/json"), (PROCESSING_MS, processing_ms.as_str())];
        response_headers.extend(reply.headers.iter().map(|(name, value)| (*name, value.as_str())));
        host::send_response(reply.status, response_headers, &reply.body);
        Action::Pause
    }
}
