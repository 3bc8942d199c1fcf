//! modelgate's ext_proc service: runs beside Envoy, only on the routes whose
//! requests need rewriting. The tonic plumbing ([`service`]) is thin; what to
//! answer is decided in [`exchange`] and the rewrites it calls.

pub mod exchange;
pub mod messages;
pub mod rename;
pub mod service;
pub mod sse;
pub mod stream_guard;
