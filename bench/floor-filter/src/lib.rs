//! The floor of a body-routing proxy-wasm filter, built only for `make bench`.
//!
//! Each request's headers are held until its body is complete, then let go:
//! the least any filter that routes on the body does. With a plugin
//! configuration of one `name: value` line, it then also sets that request
//! header, as modelgate's filter sets its routing header; Envoy clears the
//! route cache itself when a wasm filter changes request headers, so the
//! route is picked again from it. An empty configuration sets nothing.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Floor::default()) });
}}

/// The header each request gets once its body is complete, if configured.
type RoutingHeader = Option<Rc<(String, String)>>;

#[derive(Default)]
struct Floor(RoutingHeader);

impl Context for Floor {}

impl RootContext for Floor {
    fn on_configure(&mut self, _size: usize) -> bool {
        let configuration = self.get_plugin_configuration().unwrap_or_default();
        let configuration = String::from_utf8_lossy(&configuration);
        self.0 = configuration
            .split_once(':')
            .map(|(name, value)| Rc::new((name.trim().to_owned(), value.trim().to_owned())));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request(self.0.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request(RoutingHeader);

impl Request {
    fn body_complete(&self) -> Action {
        if let Some(header) = &self.0 {
            self.set_http_request_header(&header.0, Some(&header.1));
        }
        Action::Continue
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return self.body_complete();
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return self.body_complete();
        }
        Action::Pause
    }
}
