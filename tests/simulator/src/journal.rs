//! What the simulator received, for tests to check what the gateway sent
//! upstream: the body, the headers, and how many attempts arrived.

use axum::http::HeaderMap;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Mutex;

const KEEP: usize = 2048;

#[derive(Debug, Default)]
pub struct Journal {
    entries: Mutex<VecDeque<Value>>,
}

impl Journal {
    pub fn record(&self, path: &str, headers: &HeaderMap, body: &Value) {
        let headers: Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
            .collect();
        let entry = json!({"path": path, "model": body.get("model"), "stream": body.get("stream"), "headers": headers,
                           "body": body});
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == KEEP {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Oldest first.
    pub fn snapshot(&self) -> Vec<Value> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}
