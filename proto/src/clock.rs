//! The wall clock of modelgate's processes beside Envoy. Not built for the
//! wasm filter, which must read the proxy-wasm host's clock instead.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before it.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whole seconds since the Unix epoch, as OpenAI's `created` fields count them.
pub fn unix_seconds() -> u64 {
    unix_millis() / 1000
}
