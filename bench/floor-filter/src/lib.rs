//! The floor of a body-routing proxy-wasm filter, built only for `make bench`.
//!
//! Each request's headers are held until its body is complete, then let go:
//! the least any filter that routes on the body does. With a plugin
//! configuration whose first line is `name: value`, it then also sets that
//! request header, as modelgate's filter sets its routing header; Envoy clears
//! the route cache itself when a wasm filter changes request headers, so the
//! route is picked again from it. An empty configuration sets nothing.
//!
//! Each further line names one more host call to make as modelgate's filter
//! makes it, and nothing done with its answer: what that call costs Envoy,
//! counted by `make bench-count` (bench/count.py).
//!
//! One of them, `model_metadata`, changes what the filter holds: the model is
//! read from the dynamic metadata Envoy's `json_to_metadata` filter, placed
//! before this one, wrote from the body, and the header is set as the request's
//! headers come, without holding them for the body. That is the floor of a
//! design in which wasm does not hold the body.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Floor::default()) });
}}

/// A host call modelgate's filter makes on a passthrough request, by the name a configuration line gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// The clock, as the request's headers come (`now`).
    Now,
    /// Every request header, in one call (`request_headers`).
    RequestHeaders,
    /// The whole request body, once complete (`request_body`).
    RequestBody,
    /// The clock, then `openai-processing-ms` set on the answer (`processing_ms`).
    ProcessingMs,
    /// The answer's `:status` (`response_status`).
    ResponseStatus,
    /// The model `json_to_metadata` read from the body, from the dynamic metadata at
    /// MODEL_METADATA, as the request's headers come (`model_metadata`): the header is set
    /// then, only if there is a model, and the headers are not held for the body. The header's
    /// value stays the configured one: looking the model up is modelgate's logic, not the floor's.
    ModelMetadata,
}

/// Where `json_to_metadata` puts the body's `model` (bench/floor-native-model.yaml): the
/// `modelgate` namespace of the request's dynamic metadata, key `model`.
const MODEL_METADATA: [&str; 4] = ["metadata", "filter_metadata", "modelgate", "model"];

impl Call {
    fn named(name: &str) -> Option<Call> {
        Some(match name {
            "now" => Call::Now,
            "request_headers" => Call::RequestHeaders,
            "request_body" => Call::RequestBody,
            "processing_ms" => Call::ProcessingMs,
            "response_status" => Call::ResponseStatus,
            "model_metadata" => Call::ModelMetadata,
            _ => return None,
        })
    }
}

/// What each request does: the header it gets once its body is complete, if
/// configured, and the host calls it makes besides.
#[derive(Debug, Default, PartialEq)]
struct Setup {
    header: Option<(String, String)>,
    calls: Vec<Call>,
}

impl Setup {
    /// The header a first line `name: value` names (none for any other), and the calls the
    /// further lines name (an unknown name is left out).
    fn parse(configuration: &[u8]) -> Setup {
        let configuration = String::from_utf8_lossy(configuration);
        let mut lines = configuration.lines();
        let header = lines.next().and_then(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        });
        Setup { header, calls: lines.filter_map(|line| Call::named(line.trim())).collect() }
    }

    fn makes(&self, call: Call) -> bool {
        self.calls.contains(&call)
    }
}

#[derive(Default)]
struct Floor(Rc<Setup>);

impl Context for Floor {}

impl RootContext for Floor {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.0 = Rc::new(Setup::parse(&self.get_plugin_configuration().unwrap_or_default()));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request(Rc::clone(&self.0))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request(Rc<Setup>);

impl Request {
    fn body_complete(&self, body_size: usize) -> Action {
        if self.0.makes(Call::RequestBody) {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        }
        if let Some(header) = &self.0.header {
            self.set_http_request_header(&header.0, Some(&header.1));
        }
        Action::Continue
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.0.makes(Call::Now) {
            let _ = hostcalls::get_current_time();
        }
        if self.0.makes(Call::RequestHeaders) {
            let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        }
        if self.0.makes(Call::ModelMetadata) {
            // Set only where json_to_metadata found a model: without one the request meets the
            // catch-all 404, so a floor whose metadata is not there cannot be counted.
            if let (Some(header), Some(_)) = (&self.0.header, self.get_property(MODEL_METADATA.to_vec())) {
                self.set_http_request_header(&header.0, Some(&header.1));
            }
            return Action::Continue;
        }
        if end_of_stream {
            return self.body_complete(0);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.0.makes(Call::ModelMetadata) {
            return Action::Continue;
        }
        if end_of_stream {
            return self.body_complete(body_size);
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.0.makes(Call::ProcessingMs) {
            let _ = hostcalls::get_current_time();
            let _ = hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, "openai-processing-ms", Some(b"0"));
        }
        if self.0.makes(Call::ResponseStatus) {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status");
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_value_line_names_the_header_and_further_lines_the_calls() {
        let setup = Setup::parse(b"x-modelgate-cluster: llama_pool\nrequest_headers\nresponse_status\nother\n");
        assert_eq!(setup.header, Some(("x-modelgate-cluster".to_owned(), "llama_pool".to_owned())));
        assert_eq!(setup.calls, [Call::RequestHeaders, Call::ResponseStatus]);
        assert_eq!(Setup::parse(b"x-modelgate-cluster: llama_pool\n").calls, []);
        assert_eq!(Setup::parse(b""), Setup::default());
    }

    #[test]
    fn model_metadata_is_named_as_the_other_calls() {
        let setup = Setup::parse(b"x-modelgate-cluster: llama_pool\n model_metadata \n");
        assert_eq!(setup.calls, [Call::ModelMetadata]);
        assert!(setup.makes(Call::ModelMetadata));
        assert!(!Setup::parse(b"x-modelgate-cluster: llama_pool\nrequest_body\n").makes(Call::ModelMetadata));
    }
}
