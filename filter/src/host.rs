//! Every call the filter makes to its host, behind one trait.
//!
//! [`Host`] is what the filter's policy ([`crate::flow`], [`crate::worker`])
//! is written against: [`Envoy`] makes the proxy-wasm host calls, and the
//! tests' mock host answers from scripted state and records each call, so the
//! policy is tested without Envoy. The policy is generic over it, so Envoy's
//! calls cost what direct calls do.
//!
//! The SDK's trait methods `unwrap` the host's status and decode header values
//! as UTF-8 with `unwrap`; either would trap the VM on a bad header or an
//! unexpected host answer. [`Envoy`]'s calls take bytes and log failures
//! instead. The SDK's own host calls still panic on a status they do not
//! expect, so each is only made where Envoy answers with one they do: a map
//! or buffer Envoy holds at that point, a whole-body replacement.

use modelgate_proto::limits::BucketStore;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};
use std::cell::Cell;
use std::time::{Duration, UNIX_EPOCH};

thread_local! {
    /// The VM's root context, which owns the calls that outlive a request.
    static ROOT_CONTEXT: Cell<u32> = const { Cell::new(0) };
}

/// Notes the VM's root context id, as Envoy creates it.
pub fn set_root_context(context_id: u32) {
    ROOT_CONTEXT.with(|root| root.set(context_id));
}

/// What the filter asks of its host.
pub trait Host {
    fn log_error(&self, message: &str);

    /// The plugin's configuration, as Envoy's YAML gives it.
    fn plugin_configuration(&self) -> Vec<u8>;

    /// How often the worker's timer fires.
    fn set_tick_period(&self, period: Duration);

    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>>;

    /// Every header of a map, in one host call: cheaper in Envoy than a call per header wanted.
    fn headers(&self, map: MapType) -> Vec<(String, Vec<u8>)>;

    fn set_header(&self, map: MapType, name: &str, value: &str);

    fn remove_header(&self, map: MapType, name: &str);

    /// The first `size` bytes of a buffered body.
    fn body(&self, buffer: BufferType, size: usize) -> Vec<u8>;

    /// Replaces the whole buffered body (`size` bytes long) with `body`.
    fn replace_body(&self, buffer: BufferType, size: usize, body: &[u8]);

    /// Answers the request from the filter.
    fn send_response(&self, status: u16, headers: Vec<(&str, &str)>, body: &[u8]);

    /// Sends an HTTP request to an Envoy cluster: the call's token, or `None` if Envoy would not send it.
    fn dispatch(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> Option<u32>;

    /// Sends an HTTP request that outlives the request that sends it (Envoy
    /// cancels a request's own calls when it ends). Its answer still comes to
    /// the request, while the request lasts.
    fn dispatch_detached(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> bool;

    /// Lets a request held by the filter go on.
    fn resume_request(&self);

    /// Lets an answer held by the filter go on.
    fn resume_response(&self);

    /// An Envoy attribute, such as `response.code_details`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;

    /// Microseconds since the Unix epoch (0 if unknown), as rate limits count time.
    fn now_us(&self) -> u64;

    /// A value of Envoy's shared data (one copy for every worker's VM), and its version.
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);

    /// Stores a shared value if its version is still `version`: false if another worker got there first.
    fn set_shared_data(&self, key: &str, value: &[u8], version: Option<u32>) -> bool;

    /// An Envoy counter (shown in its stats with the `wasmcustom.` prefix).
    fn counter(&self, name: &str) -> Option<u32>;

    fn count_by(&self, metric: u32, n: u64);

    fn count(&self, metric: u32) {
        self.count_by(metric, 1);
    }

    /// A header of the answer to an HTTP call that came back with `num_headers`
    /// headers. A failed call (reset, timeout) comes back with none, and then
    /// Envoy refuses to read its headers, which the SDK would panic on.
    fn http_call_header(&self, num_headers: usize, name: &str) -> Option<Vec<u8>> {
        if num_headers == 0 {
            return None;
        }
        self.header(MapType::HttpCallResponseHeaders, name)
    }
}

/// The host the filter runs in: Envoy's proxy-wasm host calls, made for
/// `context` (a request's context id; 0 for the root context).
#[derive(Debug, Clone, Copy, Default)]
pub struct Envoy {
    pub context: u32,
}

fn log_failure(what: &str, status: Status) {
    Envoy::default().log_error(&format!("modelgate: {what} failed: {status:?}"));
}

impl Host for Envoy {
    fn log_error(&self, message: &str) {
        let _ = hostcalls::log(LogLevel::Error, message);
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .unwrap_or_else(|s| {
                log_failure("reading the configuration", s);
                None
            })
            .unwrap_or_default()
    }

    fn set_tick_period(&self, period: Duration) {
        if let Err(s) = hostcalls::set_tick_period(period) {
            log_failure("setting the timer", s);
        }
    }

    fn header(&self, map: MapType, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(map, name).unwrap_or_else(|s| {
            log_failure("reading a header", s);
            None
        })
    }

    fn headers(&self, map: MapType) -> Vec<(String, Vec<u8>)> {
        // The SDK panics on a status other than Ok; Envoy answers Ok for a map it holds.
        hostcalls::get_map_bytes(map).unwrap_or_else(|s| {
            log_failure("reading headers", s);
            Vec::new()
        })
    }

    fn set_header(&self, map: MapType, name: &str, value: &str) {
        if let Err(s) = hostcalls::set_map_value_bytes(map, name, Some(value.as_bytes())) {
            log_failure("setting a header", s);
        }
    }

    fn remove_header(&self, map: MapType, name: &str) {
        if let Err(s) = hostcalls::remove_map_value(map, name) {
            log_failure("removing a header", s);
        }
    }

    fn body(&self, buffer: BufferType, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(buffer, 0, size)
            .unwrap_or_else(|s| {
                log_failure("reading a body", s);
                None
            })
            .unwrap_or_default()
    }

    /// Envoy takes no other change but a prepend or an append; the SDK panics
    /// on its refusal, so nothing else is ever asked.
    fn replace_body(&self, buffer: BufferType, size: usize, body: &[u8]) {
        if let Err(s) = hostcalls::set_buffer(buffer, 0, size, body) {
            log_failure("replacing a body", s);
        }
    }

    fn send_response(&self, status: u16, headers: Vec<(&str, &str)>, body: &[u8]) {
        if let Err(s) = hostcalls::send_http_response(u32::from(status), headers, Some(body)) {
            log_failure("sending a local reply", s);
        }
    }

    fn dispatch(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> Option<u32> {
        hostcalls::dispatch_http_call(cluster, headers, Some(body), Vec::new(), timeout)
            .map_err(|s| log_failure("calling a cluster", s))
            .ok()
    }

    /// Made as the root context, so the call is the root's: a request's calls
    /// are cancelled when it ends. The SDK still hands its answer to the
    /// request it was made in.
    fn dispatch_detached(&self, cluster: &str, headers: Vec<(&str, &str)>, body: &[u8], timeout: Duration) -> bool {
        let root = ROOT_CONTEXT.with(Cell::get);
        if root == 0 || hostcalls::set_effective_context(root).is_err() {
            return self.dispatch(cluster, headers, body, timeout).is_some();
        }
        let sent = self.dispatch(cluster, headers, body, timeout).is_some();
        if let Err(s) = hostcalls::set_effective_context(self.context) {
            log_failure("returning to the request's context", s);
        }
        sent
    }

    fn resume_request(&self) {
        if let Err(s) = hostcalls::resume_http_request() {
            log_failure("resuming a request", s);
        }
    }

    fn resume_response(&self) {
        if let Err(s) = hostcalls::resume_http_response() {
            log_failure("resuming an answer", s);
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).unwrap_or_else(|s| {
            log_failure("reading a property", s);
            None
        })
    }

    fn now_us(&self) -> u64 {
        let now = hostcalls::get_current_time().ok();
        now.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_micros() as u64)
    }

    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or_else(|s| {
            log_failure("reading a rate limit", s);
            (None, None)
        })
    }

    fn set_shared_data(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        match hostcalls::set_shared_data(key, Some(value), version) {
            Ok(()) => true,
            Err(Status::CasMismatch) => false,
            Err(s) => {
                log_failure("storing a rate limit", s);
                // Retrying would fail the same way; the request has been counted as far as it can be.
                true
            }
        }
    }

    fn counter(&self, name: &str) -> Option<u32> {
        hostcalls::define_metric(MetricType::Counter, name).map_err(|s| log_failure("defining a counter", s)).ok()
    }

    fn count_by(&self, metric: u32, n: u64) {
        if let Err(s) = hostcalls::increment_metric(metric, i64::try_from(n).unwrap_or(i64::MAX)) {
            log_failure("counting", s);
        }
    }
}

/// Rate-limit buckets in the host's shared data: one copy for every worker
/// thread's VM, so a limit holds across the whole Envoy.
pub struct SharedBuckets<'a, H>(pub &'a H);

impl<H: Host> BucketStore for SharedBuckets<'_, H> {
    fn load(&self, bucket: &str) -> (u64, Option<u32>) {
        let (value, version) = self.0.shared_data(bucket);
        let state = value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes);
        (state, version)
    }

    fn swap(&self, bucket: &str, state: u64, version: Option<u32>) -> bool {
        self.0.set_shared_data(bucket, &state.to_le_bytes(), version)
    }
}
