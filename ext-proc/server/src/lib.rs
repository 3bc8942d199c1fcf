//! modelgate's ext_proc service: runs beside Envoy, only on the routes whose
//! requests need rewriting. The tonic plumbing ([`service`]) is thin; what to
//! answer is decided in [`exchange`], from the [`envoy_messages`] Envoy sends,
//! with the dialects' translations (the `modelgate-dialects` crate).
//!
//! The same process serves the admin port (the `modelgate-admin` crate), and,
//! for Gateway API data planes, the [`endpoint_picker`] protocol on a port of its own.

pub mod endpoint_picker;
pub mod envoy_messages;
pub mod exchange;
pub mod pool_metrics;
pub mod service;
