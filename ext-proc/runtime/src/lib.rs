//! What modelgate's processes beside Envoy (ext-proc and the stream guard)
//! share: how they start and drain ([`process`]), the probes they answer
//! ([`health`]), the token their loopback ports ask of callers ([`internal_token`]),
//! and, with the `redis` feature, how the stores kept in Redis reach it ([`redis_connection`]).

pub mod health;
pub mod internal_token;
pub mod process;
#[cfg(feature = "redis")]
pub mod redis_connection;
