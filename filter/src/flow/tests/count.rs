//! Requests run through the filter natively, for `make bench-count` (bench/count.py) to count under
//! callgrind, which names the filter's own functions where V8's JIT inside Envoy cannot. Ignored
//! by `cargo test`: it asserts nothing and is configured from the environment.
//!
//! - `MODELGATE_COUNT_CONFIG`: a file holding the filter's configuration (JSON);
//! - `MODELGATE_COUNT_MODEL`: the model every request names;
//! - `MODELGATE_COUNT_REQUESTS`: how many requests to run.
//!
//! Each request is one call of [`one_request`], which callgrind's `--toggle-collect` counts alone.
//! The host is [`Quiet`], not the tests' mock: the mock formats a line for every call it records,
//! and that work, inlined into the filter's own functions, would be counted as theirs.

use super::*;
use proxy_wasm::types::{BufferType, MapType};
use std::cell::{Cell, RefCell};
use std::time::Duration;

/// A chat completion as the simulated backend answers it, usage included.
const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"llama-3.1-8b-instruct","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! I am fine, thank you. How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":16,"total_tokens":30}}"#;

/// A host that holds one request and its answer and does the least a host can: headers looked up
/// in a list, bodies copied out. It counts the calls made to it.
#[derive(Default)]
struct Quiet {
    config: Vec<u8>,
    request_headers: RefCell<Vec<(String, String)>>,
    response_headers: RefCell<Vec<(String, String)>>,
    request_body: RefCell<Vec<u8>>,
    response_body: RefCell<Vec<u8>>,
    calls: Cell<usize>,
}

impl Quiet {
    fn call(&self) {
        self.calls.set(self.calls.get() + 1);
    }

    fn headers(&self, map: MapType) -> &RefCell<Vec<(String, String)>> {
        match map {
            MapType::HttpRequestHeaders => &self.request_headers,
            _ => &self.response_headers,
        }
    }

    fn body_of(&self, buffer: BufferType) -> &RefCell<Vec<u8>> {
        match buffer {
            BufferType::HttpRequestBody => &self.request_body,
            _ => &self.response_body,
        }
    }
}

impl Host for Quiet {
    fn log_error(&self, _message: &str) {
        self.call();
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        self.call();
        self.config.clone()
    }

    fn set_tick_period(&self, _period: Duration) {
        self.call();
    }

    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        self.call();
        let headers = self.headers(map).borrow();
        headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_bytes().to_vec())
    }

    fn headers(&self, map: MapType) -> Vec<(String, Vec<u8>)> {
        self.call();
        self.headers(map).borrow().iter().map(|(n, v)| (n.clone(), v.as_bytes().to_vec())).collect()
    }

    fn set_header(&self, map: MapType, name: &str, value: &str) {
        self.call();
        let mut headers = self.headers(map).borrow_mut();
        headers.retain(|(n, _)| n != name);
        headers.push((name.to_string(), value.to_string()));
    }

    fn remove_header(&self, map: MapType, name: &str) {
        self.call();
        self.headers(map).borrow_mut().retain(|(n, _)| n != name);
    }

    fn body(&self, buffer: BufferType, size: usize) -> Vec<u8> {
        self.call();
        let body = self.body_of(buffer).borrow();
        body.get(..size.min(body.len())).unwrap_or_default().to_vec()
    }

    fn replace_body(&self, buffer: BufferType, _size: usize, with: &[u8]) {
        self.call();
        *self.body_of(buffer).borrow_mut() = with.to_vec();
    }

    fn send_response(&self, _status: u16, _headers: Vec<(&str, &str)>, _body: &[u8]) {
        self.call();
    }

    fn dispatch(&self, _cluster: &str, _headers: Vec<(&str, &str)>, _body: &[u8], _timeout: Duration) -> Option<u32> {
        self.call();
        Some(1)
    }

    fn dispatch_detached(&self, _cluster: &str, _headers: Vec<(&str, &str)>, _body: &[u8], _timeout: Duration) -> bool {
        self.call();
        true
    }

    fn resume_request(&self) {
        self.call();
    }

    fn resume_response(&self) {
        self.call();
    }

    fn property(&self, _path: &[&str]) -> Option<Vec<u8>> {
        self.call();
        None
    }

    fn now_us(&self) -> u64 {
        self.call();
        NOW
    }

    fn shared_data(&self, _key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.call();
        (None, None)
    }

    fn set_shared_data(&self, _key: &str, _value: &[u8], _version: Option<u32>) -> bool {
        self.call();
        true
    }

    fn counter(&self, _name: &str) -> Option<u32> {
        self.call();
        Some(0)
    }

    fn count_by(&self, _metric: u32, _n: u64) {
        self.call();
    }
}

fn setting(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

#[test]
#[ignore = "run by bench/count.py under callgrind"]
fn counted_requests() {
    let config = std::fs::read(setting("MODELGATE_COUNT_CONFIG")).unwrap();
    let model = setting("MODELGATE_COUNT_MODEL");
    let requests: usize = setting("MODELGATE_COUNT_REQUESTS").parse().unwrap();
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hello, how are you today?"}],
                      "max_tokens": 16})
    .to_string();
    let host = Quiet { config, ..Quiet::default() };
    let mut worker = Worker::default();
    assert!(worker.configure(&host));
    host.calls.set(0);
    for _ in 0..requests {
        hand_over(&host, body.as_bytes());
        one_request(&host, &mut worker, body.len());
    }
    // Read by bench/count.py.
    println!("host calls per request: {}", host.calls.get() as f64 / requests as f64);
}

/// Gives the host a request as Envoy's HTTP/1.1 codec hands it over, and the backend's answer.
fn hand_over(host: &Quiet, body: &[u8]) {
    let owned = |pairs: &[(&str, &str)]| pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let request_headers = [
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", &body.len().to_string()),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6f1c9f0e-2b7a-4d59-9a51-0c1f3f7c2d11"),
    ];
    *host.request_headers.borrow_mut() = owned(&request_headers);
    *host.request_body.borrow_mut() = body.to_vec();
    let response_headers =
        [(":status", "200"), ("content-type", "application/json"), ("content-length", &ANSWER.len().to_string())];
    *host.response_headers.borrow_mut() = owned(&response_headers);
    *host.response_body.borrow_mut() = ANSWER.to_vec();
}

/// The filter's work for one request the host holds, then the worker's tick, which sends the usage
/// record the request left (Envoy's timer sends many at once: an upper bound).
#[inline(never)]
fn one_request(host: &Quiet, worker: &mut Worker, body_size: usize) {
    let mut flow = worker.new_flow();
    if flow.on_request_headers(host, false) == Action::Pause {
        flow.on_request_body(host, body_size, true);
    }
    flow.on_response_headers(host, false);
    flow.on_response_body(host, ANSWER.len(), true);
    flow.on_log(host);
    worker.on_tick(host);
}
