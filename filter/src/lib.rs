//! modelgate's proxy-wasm HTTP filter.
//!
//! Per request it drops internal headers a client may have sent, answers
//! `/v1/models` from configuration, and for model-routed endpoints buffers the
//! body (up to the configured limit), reads `model` once, and writes the
//! chosen cluster into a header the route table matches on.
//!
//! The callbacks stay thin: decisions are in [`request`]. Host calls go through
//! [`host`], which never panics, because a panic kills the VM for every later
//! request on its worker.

pub mod endpoint;
mod host;
pub mod model_field;
pub mod request;

use modelgate_proto::headers;
use modelgate_proto::routing::Router;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use request::{HeadersVerdict, Reply};
use std::rc::Rc;

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
        Some(Box::new(Request { router: Rc::clone(&self.router) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    router: Rc<Router>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        for name in headers::INTERNAL {
            host::remove_request_header(name);
        }
        let method = host::request_header(":method").unwrap_or_default();
        let path = host::request_header(":path").unwrap_or_default();
        let content_length = host::request_header("content-length");
        let verdict = request::on_request_headers(
            &self.router,
            &String::from_utf8_lossy(&method),
            &String::from_utf8_lossy(&path),
            content_length.as_deref(),
            end_of_stream,
        );
        match verdict {
            HeadersVerdict::PassThrough => Action::Continue,
            HeadersVerdict::ReadBody => Action::Pause,
            HeadersVerdict::Respond(reply) => respond(&reply),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(reply) = request::body_too_large(&self.router, body_size) {
            return respond(&reply);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::request_body(body_size);
        match request::on_request_body(&self.router, &body) {
            Ok(routing) => {
                host::set_request_header(headers::CLUSTER, &routing.cluster);
                if let Some(model) = &routing.upstream_model {
                    host::set_request_header(headers::UPSTREAM_MODEL, model);
                }
                host::clear_route_cache();
                Action::Continue
            }
            Err(reply) => respond(&reply),
        }
    }
}

fn respond(reply: &Reply) -> Action {
    let mut response_headers = vec![("content-type", "application/json")];
    response_headers.extend(reply.headers.iter().copied());
    host::send_response(reply.status, response_headers, &reply.body);
    Action::Pause
}
