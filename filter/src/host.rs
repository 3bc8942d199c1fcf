//! Host calls made so they do not panic.
//!
//! The SDK's trait methods `unwrap` the host's status and decode header values
//! as UTF-8 with `unwrap`; either would trap the VM on a bad header or an
//! unexpected host answer. These wrappers take bytes and log failures instead.
//! The SDK's own host calls still panic on a status they do not expect, so
//! each wrapper is only called where Envoy answers with one they do: a map
//! or buffer Envoy holds at that point, a whole-body replacement.

use modelgate_proto::limits::BucketStore;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};
use std::time::{Duration, SystemTime};

pub fn log_error(message: &str) {
    let _ = hostcalls::log(LogLevel::Error, message);
}

fn log_failure(what: &str, status: Status) {
    log_error(&format!("modelgate: {what} failed: {status:?}"));
}

pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).unwrap_or_else(|s| {
        log_failure("reading a header", s);
        None
    })
}

pub fn set_header(map: MapType, name: &str, value: &str) {
    if let Err(s) = hostcalls::set_map_value_bytes(map, name, Some(value.as_bytes())) {
        log_failure("setting a header", s);
    }
}

pub fn remove_header(map: MapType, name: &str) {
    if let Err(s) = hostcalls::remove_map_value(map, name) {
        log_failure("removing a header", s);
    }
}

/// The first `size` bytes of a buffered body.
pub fn body(buffer: BufferType, size: usize) -> Vec<u8> {
    hostcalls::get_buffer(buffer, 0, size)
        .unwrap_or_else(|s| {
            log_failure("reading a body", s);
            None
        })
        .unwrap_or_default()
}

/// Replaces the whole buffered body (`size` bytes long) with `body`. Envoy
/// takes no other change but a prepend or an append; the SDK panics on its
/// refusal, so nothing else is ever asked.
pub fn replace_body(buffer: BufferType, size: usize, body: &[u8]) {
    if let Err(s) = hostcalls::set_buffer(buffer, 0, size, body) {
        log_failure("replacing a body", s);
    }
}

/// A header of the answer to an HTTP call that came back with `num_headers`
/// headers. A failed call (reset, timeout) comes back with none, and then
/// Envoy refuses to read its headers, which the SDK would panic on.
pub fn http_call_header(num_headers: usize, name: &str) -> Option<Vec<u8>> {
    if num_headers == 0 {
        return None;
    }
    header(MapType::HttpCallResponseHeaders, name)
}

/// Sends an HTTP request to an Envoy cluster: the call's token, or `None` if Envoy would not send it.
pub fn dispatch(cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> Option<u32> {
    hostcalls::dispatch_http_call(cluster, headers, Some(body), Vec::new(), timeout)
        .map_err(|s| log_failure("calling a cluster", s))
        .ok()
}

/// Lets a request held by the filter go on.
pub fn resume_request() {
    if let Err(s) = hostcalls::resume_http_request() {
        log_failure("resuming a request", s);
    }
}

/// An Envoy counter (shown in its stats with the `wasmcustom.` prefix).
pub fn counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, name)
        .map_err(|s| log_failure("defining a counter", s))
        .ok()
}

pub fn count(metric: u32) {
    count_by(metric, 1);
}

pub fn count_by(metric: u32, n: u64) {
    if let Err(s) = hostcalls::increment_metric(metric, i64::try_from(n).unwrap_or(i64::MAX)) {
        log_failure("counting", s);
    }
}

/// An Envoy attribute, such as `response.code_details`.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).unwrap_or_else(|s| {
        log_failure("reading a property", s);
        None
    })
}

fn now() -> Option<SystemTime> {
    hostcalls::get_current_time().ok()
}

/// Microseconds since the Unix epoch, as rate limits count time.
pub fn now_us() -> u64 {
    now().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_micros() as u64)
}

/// This VM's part of its batches' ids: 64 random bits from the host
/// (WASI's `random_get`, which keys std's hasher) and the time, so no two
/// workers or Envoy restarts share one.
pub fn batch_sender() -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(0u8);
    format!("{random:016x}-{:x}", now_us())
}

/// Rate-limit buckets in Envoy's shared data: one copy for every worker
/// thread's VM, so a limit holds across the whole Envoy.
pub struct SharedBuckets;

impl BucketStore for SharedBuckets {
    fn load(&self, bucket: &str) -> (u64, Option<u32>) {
        match hostcalls::get_shared_data(bucket) {
            Ok((value, version)) => {
                let state = value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes);
                (state, version)
            }
            Err(s) => {
                log_failure("reading a rate limit", s);
                (0, None)
            }
        }
    }

    fn swap(&self, bucket: &str, state: u64, version: Option<u32>) -> bool {
        match hostcalls::set_shared_data(bucket, Some(&state.to_le_bytes()), version) {
            Ok(()) => true,
            Err(Status::CasMismatch) => false,
            Err(s) => {
                log_failure("storing a rate limit", s);
                // Retrying would fail the same way; the request has been counted as far as it can be.
                true
            }
        }
    }
}

pub fn send_response(status: u16, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(s) = hostcalls::send_http_response(u32::from(status), headers, Some(body)) {
        log_failure("sending a local reply", s);
    }
}
