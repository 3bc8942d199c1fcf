//! What the endpoint picker reads: a replica's metrics page (any bytes from
//! a backend) and a request body (any bytes from a client).
//!
//! Invariants: metrics read are in range (KV-cache use from 0 to 1); a body
//! read gives a non-empty model and, for the prompt, a slice of the body
//! that is itself JSON; a body refused is refused with an OpenAI 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_pools::{metrics, request};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    if mode & 1 == 0 {
        if let Ok(m) = metrics::parse(&String::from_utf8_lossy(data)) {
            assert!((0.0..=1.0).contains(&m.kv_cache_usage), "KV-cache use {}", m.kv_cache_usage);
            assert!(m.active_loras.iter().all(|a| !a.is_empty() && !a.contains(',')));
        }
        return;
    }
    match request::pick_fields(data) {
        Ok(fields) => {
            assert!(!fields.model.is_empty());
            if !fields.prompt.is_empty() {
                assert!(data.windows(fields.prompt.len()).any(|w| w == fields.prompt), "the prompt is not the body's bytes");
                serde_json::from_slice::<serde_json::Value>(fields.prompt).expect("the prompt is JSON");
            }
        }
        Err(e) => assert!((400..500).contains(&e.status), "refused with {}", e.status),
    }
});
