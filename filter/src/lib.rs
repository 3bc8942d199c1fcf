//! modelgate's proxy-wasm HTTP filter.
//!
//! Per request it drops internal headers a client may have sent, answers
//! `/v1/models` from configuration, and for model-routed endpoints buffers the
//! body (up to the configured limit), reads `model` once, and writes the
//! chosen cluster into a header the route table matches on. Requests for the
//! Files and Batch APIs go to ext-proc's batch service with their owner, their
//! bodies streamed unread. A request the batch runner sends with the internal
//! token on a key's behalf is that key's, and counted as batch traffic. On the way back it
//! adds `openai-processing-ms` and rewrites every error answer — a backend's or
//! Envoy's own — as an OpenAI error envelope. Successful answers, streams
//! included, are never buffered. Where a route caches answers, a request
//! carries an `Idempotency-Key`, or its key has budgets, one call to
//! ext-proc's gate decides before it goes on: sent on, answered from the
//! gate's store, or refused ([`gate`]).
//!
//! The proxy-wasm callbacks here only hand over to the policy: [`flow`] for a
//! request, [`worker`] for the root context, both written against [`host::Host`]
//! so they are tested without Envoy. Decisions on values are in [`request`].
//! Nothing here panics, because a panic kills the VM for every later request
//! on its worker.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod answer;
pub mod flow;
pub mod gate;
pub mod host;
#[cfg(test)]
mod mock_host;
pub mod outbox;
pub mod request;
pub mod routing_fields;
pub mod worker;

use flow::Flow;
use host::{set_root_context, Envoy};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use worker::Worker;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        set_root_context(context_id);
        Box::new(Plugin(Worker::default()))
    });
}}

/// The root context of an Envoy worker's VM.
struct Plugin(Worker);

impl Context for Plugin {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, _body_size: usize, _num_trailers: usize) {
        self.0.on_batch_answer(&Envoy::default(), token_id, num_headers);
    }
}

impl RootContext for Plugin {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.0.configure(&Envoy::default())
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&Envoy::default());
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request(self.0.new_flow(), Envoy { context: context_id })))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request's context, and the host as that context.
struct Request(Flow, Envoy);

impl Context for Request {
    fn on_http_call_response(&mut self, _token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.0.on_call_answer(&self.1, num_headers, body_size);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.0.on_request_headers(&self.1, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.0.on_request_body(&self.1, body_size, end_of_stream)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.0.on_request_trailers(&self.1)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.0.on_response_headers(&self.1, end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.0.on_response_body(&self.1, body_size, end_of_stream)
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.0.on_response_trailers(&self.1)
    }

    fn on_log(&mut self) {
        self.0.on_log(&self.1);
    }
}
