//! modelgate's ext_proc service: runs beside Envoy, only on the routes whose
//! requests need rewriting. The tonic plumbing ([`service`]) is thin; what to
//! answer is decided in [`exchange`] and the rewrites it calls.
//!
//! Beside the gRPC service, ext-proc serves an [`admin`] port: usage
//! records in, [`metrics`] and the [`usage_report`] out (kept in the
//! [`usage_store`]), and rate limits
//! shared through Redis ([`shared_limits`]).
//!
//! The crate's second server, the [`stream_guard`], is its own process, so
//! streams keep flowing while ext-proc restarts.

pub mod admin;
pub mod anthropic;
pub mod call;
pub mod credentials;
pub mod exchange;
pub mod failover;
pub mod internal_token;
pub mod messages;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod process;
pub mod service;
pub mod shared_limits;
pub mod stream_guard;
pub mod translate;
pub mod usage_report;
pub mod usage_store;
