//! A host for the filter's tests: it answers from scripted state, and records
//! every call in order, so a test asserts what the filter asked of Envoy as
//! well as what the client would see.

use crate::host::Host;
use proxy_wasm::types::{BufferType, MapType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

/// A local reply the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A call the filter made to a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// What the host holds and answers with; tests set it and read it.
#[derive(Debug, Default)]
pub struct State {
    pub now_us: u64,
    pub config: Vec<u8>,
    pub tick_period: Option<Duration>,
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    /// The answer's trailers; an answer with some ends with them, not with its last piece.
    pub response_trailers: Vec<(String, String)>,
    pub call_response_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    pub call_response_body: Vec<u8>,
    /// Envoy's attributes, by their path joined with dots.
    pub properties: HashMap<String, Vec<u8>>,
    pub shared: HashMap<String, (Vec<u8>, u32)>,
    /// Counters by id (their index): name and value.
    pub counters: Vec<(String, u64)>,
    /// Envoy will not send calls to clusters (none is configured, or it is overloaded).
    pub dispatch_refused: bool,
    pub dispatched: Vec<Dispatched>,
    pub sent: Option<Sent>,
    pub resumed: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct MockHost {
    pub state: RefCell<State>,
    calls: RefCell<Vec<String>>,
}

fn map_name(map: MapType) -> &'static str {
    match map {
        MapType::HttpRequestHeaders => "request",
        MapType::HttpResponseHeaders => "response",
        MapType::HttpResponseTrailers => "trailers",
        MapType::HttpCallResponseHeaders => "call",
        _ => "other",
    }
}

fn buffer_name(buffer: BufferType) -> &'static str {
    match buffer {
        BufferType::HttpRequestBody => "request",
        BufferType::HttpResponseBody => "response",
        BufferType::HttpCallResponseBody => "call",
        _ => "other",
    }
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
}

impl MockHost {
    pub fn new(now_us: u64) -> Self {
        let host = MockHost::default();
        host.state.borrow_mut().now_us = now_us;
        host
    }

    fn record(&self, call: String) {
        self.calls.borrow_mut().push(call);
    }

    /// The calls made since the last look, one line each.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    pub fn set_request(&self, headers: &[(&str, &str)], body: &[u8]) {
        let mut state = self.state.borrow_mut();
        state.request_headers = owned(headers);
        state.request_body = body.to_vec();
    }

    pub fn set_response(&self, headers: &[(&str, &str)], body: &[u8]) {
        let mut state = self.state.borrow_mut();
        state.response_headers = owned(headers);
        state.response_body = body.to_vec();
    }

    pub fn set_call_response(&self, headers: &[(&str, &str)], body: &[u8]) {
        let mut state = self.state.borrow_mut();
        state.call_response_headers = owned(headers);
        state.call_response_body = body.to_vec();
    }

    pub fn advance_us(&self, us: u64) {
        self.state.borrow_mut().now_us += us;
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        self.value(MapType::HttpRequestHeaders, name)
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        self.value(MapType::HttpResponseHeaders, name)
    }

    fn value(&self, map: MapType, name: &str) -> Option<String> {
        let state = self.state.borrow();
        let headers = match map {
            MapType::HttpRequestHeaders => &state.request_headers,
            MapType::HttpResponseHeaders => &state.response_headers,
            MapType::HttpResponseTrailers => &state.response_trailers,
            _ => &state.call_response_headers,
        };
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }

    fn with_headers<T>(&self, map: MapType, edit: impl FnOnce(&mut Vec<(String, String)>) -> T) -> T {
        let mut state = self.state.borrow_mut();
        let headers = match map {
            MapType::HttpRequestHeaders => &mut state.request_headers,
            MapType::HttpResponseHeaders => &mut state.response_headers,
            MapType::HttpResponseTrailers => &mut state.response_trailers,
            _ => &mut state.call_response_headers,
        };
        edit(headers)
    }

    fn with_body<T>(&self, buffer: BufferType, edit: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let mut state = self.state.borrow_mut();
        let body = match buffer {
            BufferType::HttpRequestBody => &mut state.request_body,
            BufferType::HttpResponseBody => &mut state.response_body,
            _ => &mut state.call_response_body,
        };
        edit(body)
    }
}

impl Host for MockHost {
    fn log_error(&self, message: &str) {
        self.record("log".into());
        self.state.borrow_mut().errors.push(message.to_string());
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        self.record("configuration".into());
        self.state.borrow().config.clone()
    }

    fn set_tick_period(&self, period: Duration) {
        self.record(format!("tick every {}ms", period.as_millis()));
        self.state.borrow_mut().tick_period = Some(period);
    }

    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        self.record(format!("get {} {name}", map_name(map)));
        self.value(map, name).map(String::into_bytes)
    }

    fn headers(&self, map: MapType) -> Vec<(String, Vec<u8>)> {
        self.record(format!("get {} headers", map_name(map)));
        self.with_headers(map, |headers| headers.iter().map(|(n, v)| (n.clone(), v.clone().into_bytes())).collect())
    }

    fn set_header(&self, map: MapType, name: &str, value: &str) {
        self.record(format!("set {} {name}: {value}", map_name(map)));
        self.with_headers(map, |headers| {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            headers.push((name.to_string(), value.to_string()));
        });
    }

    fn remove_header(&self, map: MapType, name: &str) {
        self.record(format!("remove {} {name}", map_name(map)));
        self.with_headers(map, |headers| headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name)));
    }

    fn body(&self, buffer: BufferType, size: usize) -> Vec<u8> {
        self.record(format!("get {} body", buffer_name(buffer)));
        self.with_body(buffer, |body| body.iter().take(size).copied().collect())
    }

    fn replace_body(&self, buffer: BufferType, size: usize, with: &[u8]) {
        self.record(format!("replace {} body", buffer_name(buffer)));
        self.with_body(buffer, |body| {
            body.splice(..size.min(body.len()), with.iter().copied());
        });
    }

    fn send_response(&self, status: u16, headers: Vec<(&str, &str)>, body: &[u8]) {
        self.record(format!("send {status}"));
        self.state.borrow_mut().sent = Some(Sent { status, headers: owned(&headers), body: body.to_vec() });
    }

    fn dispatch(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> Option<u32> {
        self.record(format!("dispatch {cluster}"));
        let mut state = self.state.borrow_mut();
        if state.dispatch_refused {
            return None;
        }
        state.dispatched.push(Dispatched {
            cluster: cluster.to_string(),
            headers: owned(&headers),
            body: body.to_vec(),
            timeout,
        });
        u32::try_from(state.dispatched.len()).ok()
    }

    fn dispatch_detached(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> bool {
        self.record(format!("dispatch detached {cluster}"));
        let mut state = self.state.borrow_mut();
        if state.dispatch_refused {
            return false;
        }
        state.dispatched.push(Dispatched {
            cluster: cluster.to_string(),
            headers: owned(&headers),
            body: body.to_vec(),
            timeout,
        });
        true
    }

    fn resume_request(&self) {
        self.record("resume".into());
        self.state.borrow_mut().resumed = true;
    }

    fn resume_response(&self) {
        self.record("resume response".into());
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let path = path.join(".");
        self.record(format!("property {path}"));
        self.state.borrow().properties.get(&path).cloned()
    }

    fn now_us(&self) -> u64 {
        self.record("now".into());
        self.state.borrow().now_us
    }

    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.record(format!("get shared {key}"));
        match self.state.borrow().shared.get(key) {
            Some((value, version)) => (Some(value.clone()), Some(*version)),
            None => (None, None),
        }
    }

    fn set_shared_data(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        self.record(format!("set shared {key}"));
        let mut state = self.state.borrow_mut();
        let current = state.shared.get(key).map(|(_, version)| *version);
        if version.is_some() && version != current {
            return false;
        }
        state.shared.insert(key.to_string(), (value.to_vec(), current.unwrap_or(0) + 1));
        true
    }

    fn counter(&self, name: &str) -> Option<u32> {
        self.record(format!("counter {name}"));
        let mut state = self.state.borrow_mut();
        state.counters.push((name.to_string(), 0));
        u32::try_from(state.counters.len() - 1).ok()
    }

    fn count_by(&self, metric: u32, n: u64) {
        self.record(format!("count {metric} by {n}"));
        if let Some((_, value)) = self.state.borrow_mut().counters.get_mut(metric as usize) {
            *value += n;
        }
    }
}
