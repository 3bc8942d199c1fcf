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

/// Every internal request header; a client's copy of any of them is dropped.
pub const INTERNAL: &[&str] = &[CLUSTER, UPSTREAM_MODEL];
