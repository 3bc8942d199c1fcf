//! What modelgate's processes beside Envoy (ext-proc and the stream guard)
//! share: how they start and drain ([`process`]), the probes they answer
//! ([`health`]), and the token their loopback ports ask of callers ([`internal_token`]).

pub mod health;
pub mod internal_token;
pub mod process;
