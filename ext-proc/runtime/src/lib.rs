//! What modelgate's processes beside Envoy (ext-proc and the stream guard)
//! share: how they start and drain ([`process`]), the token their
//! loopback ports ask of callers ([`internal_token`]), and the wall clock ([`clock`]).

pub mod clock;
pub mod internal_token;
pub mod process;
