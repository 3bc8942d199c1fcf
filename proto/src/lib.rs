//! Types shared by the wasm filter and the ext-proc service.
//!
//! Everything here is plain Rust with no I/O, so it builds for `wasm32-wasip1`
//! and natively, and is unit-tested without Envoy.

pub mod backend;
pub mod batch;
pub mod budgets;
pub mod chain;
pub mod client_api;
#[cfg(not(target_arch = "wasm32"))]
pub mod clock;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod error_normalize;
pub mod framing;
pub mod gate;
pub mod headers;
pub mod keys;
pub mod limits;
pub mod lru;
pub mod models;
pub mod params;
pub mod replay;
pub mod routing;
pub mod stored_response;
pub mod usage;
pub mod usage_trailer;
