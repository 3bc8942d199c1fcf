//! Names of the headers modelgate uses between its own parts.
//!
//! The filter removes every header in [`INTERNAL`] from the client's request
//! before routing, so only configuration decides where a request goes.

/// Set by the filter: the Envoy cluster chosen for the request's model.
/// Routes use it as their `cluster_header`.
pub const CLUSTER: &str = "x-modelgate-cluster";

/// Set by the filter when the backend expects another model name than the
/// client sent. Its presence is what engages ext_proc (a matcher on it creates
/// the ext_proc filter), which rewrites the body's `model` to this value.
pub const UPSTREAM_MODEL: &str = "x-modelgate-upstream-model";

/// Set by the filter on a streaming request it sends through the stream guard:
/// the backend's cluster, which the guard passes on as [`CLUSTER`].
pub const STREAM_CLUSTER: &str = "x-modelgate-stream-cluster";

/// Every internal request header; a client's copy of any of them is dropped.
pub const INTERNAL: &[&str] = &[CLUSTER, UPSTREAM_MODEL, STREAM_CLUSTER];

/// A response header Envoy's inner listener (behind the stream guard) adds with
/// its `%RESPONSE_CODE_DETAILS%`, so the filter can tell its local replies
/// (no healthy upstream, timeout) from a backend's answer.
pub const CODE_DETAILS: &str = "x-modelgate-code-details";
