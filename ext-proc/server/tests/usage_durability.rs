//! The usage report survives ext-proc's crashes and counts each batch once:
//! batches posted, one posted again, ext-proc killed (SIGKILL) and started
//! again, and every row is there exactly once, kept on local disk or in Redis.
//!
//! The Redis test skips only when `redis-server` is not installed (and fails then in CI).

mod common;

use common::{redis_server, ExtProc, Redis, TempDir};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn record(at_ms: u64, key: &str, tokens: u64, cost: Option<f64>) -> String {
    json!({
        "request_id": format!("req-{key}-{tokens}"), "at_ms": at_ms, "key": key, "model": "gpt-4o",
        "backend": "vllm", "status": 200, "stream": false,
        "usage": {"prompt_tokens": tokens, "completion_tokens": 1}, "cost_usd": cost,
        "latency_us": 1000, "ttft_us": null
    })
    .to_string()
}

/// An answer served from the gateway's store: a request whose tokens are counted apart, at no cost.
fn replayed(at_ms: u64, key: &str, tokens: u64, source: &str) -> String {
    let mut replayed: Value = serde_json::from_str(&record(at_ms, key, tokens, None)).expect("a record");
    replayed["served_from"] = json!(source);
    replayed.to_string()
}

fn post(ext_proc: &ExtProc, id: &str, records: &[String]) -> Value {
    let answer = ext_proc.post_batch(id, records.join("\n").as_bytes());
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()
}

/// Each row as (key, requests, prompt tokens, cost, cache hits, cached tokens).
type Row = (String, u64, u64, Option<f64>, u64, u64);

fn report(ext_proc: &ExtProc) -> Vec<Row> {
    let answer = ext_proc.get("/v1/usage/report");
    assert_eq!(answer.status, 200, "{answer:?}");
    let report = answer.json();
    let rows = report["data"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|row| {
            let number = |name: &str| row[name].as_u64().unwrap_or_else(|| panic!("{name}: {row}"));
            let key = row["key"].as_str().unwrap_or_default().to_string();
            let (hits, cached) = (number("cache_hits"), number("cached_tokens"));
            (key, number("requests"), number("prompt_tokens"), row["cost_usd"].as_f64(), hits, cached)
        })
        .collect()
}

/// Posts three batches and one of them again, kills ext-proc, starts it with
/// `start`, posts another again, and checks the report each time.
fn batches_count_once_across_a_kill(mut start: impl FnMut() -> ExtProc) {
    let now = now_ms();
    let first = [record(now, "alice", 10, Some(0.5)), record(now, "bob", 1, None)];
    let second = [record(now, "alice", 20, Some(0.25)), replayed(now, "alice", 20, "cache")];
    let third = [record(now - 120_000, "carol", 5, None), replayed(now - 120_000, "carol", 5, "idempotency")];
    let expected = vec![
        ("alice".to_string(), 3, 30, Some(0.75), 1, 21),
        ("bob".to_string(), 1, 1, None, 0, 0),
        ("carol".to_string(), 2, 5, None, 1, 6),
    ];

    let mut ext_proc = start();
    assert_eq!(post(&ext_proc, "vm1-1", &first), json!({"accepted": 2, "rejected": 0}));
    assert_eq!(post(&ext_proc, "vm1-2", &second), json!({"accepted": 2, "rejected": 0}));
    assert_eq!(post(&ext_proc, "vm2-1", &third), json!({"accepted": 2, "rejected": 0}));
    // The first batch again, as after an answer lost to a timeout: acknowledged, not counted.
    assert_eq!(post(&ext_proc, "vm1-1", &first), json!({"accepted": 2, "rejected": 0, "repeat": true}));
    assert_eq!(report(&ext_proc), expected);

    ext_proc.kill();
    let ext_proc = start();
    assert_eq!(report(&ext_proc), expected, "the report after a restart");
    assert_eq!(post(&ext_proc, "vm1-2", &second)["repeat"], true, "ids are remembered across a restart");
    assert_eq!(report(&ext_proc), expected);
    // Prometheus counters start again from zero, and a repeat does not count there either.
    assert!(!ext_proc.get("/metrics").body.contains("modelgate_requests_total{"));
}

#[test]
fn usage_on_local_disk_counts_each_batch_once_across_a_kill() {
    let data = TempDir::new();
    batches_count_once_across_a_kill(|| ExtProc::start_on(&data.0, &[]));
}

#[test]
fn usage_in_redis_counts_each_batch_once_across_a_kill_and_is_shared() {
    let Some(binary) = redis_server() else { return };
    let redis = Redis::start(binary);
    let url = redis.url();
    let flags = ["--redis-url", url.as_str(), "--redis-timeout-ms", "1000"];
    batches_count_once_across_a_kill(|| ExtProc::start(&flags));

    // Another gateway's ext-proc sees the same report and the same batch ids, and adds to them.
    let other = ExtProc::start(&flags);
    assert_eq!(post(&other, "vm2-1", &[record(now_ms() - 120_000, "carol", 5, None)])["repeat"], true);
    assert_eq!(post(&other, "vm3-1", &[record(now_ms(), "dave", 7, None)]), json!({"accepted": 1, "rejected": 0}));
    let keys: Vec<(String, u64)> = report(&other).into_iter().map(|(key, requests, ..)| (key, requests)).collect();
    assert_eq!(keys, [("alice".into(), 3), ("bob".into(), 1), ("carol".into(), 2), ("dave".into(), 1)]);
}

#[test]
fn a_batch_is_refused_when_redis_is_away_and_taken_once_it_is_back() {
    let Some(binary) = redis_server() else { return };
    let mut redis = Redis::start(binary);
    let url = redis.url();
    let ext_proc = ExtProc::start(&["--redis-url", url.as_str(), "--redis-timeout-ms", "200"]);
    redis.kill();
    let body = record(now_ms(), "alice", 3, None);
    let answer = ext_proc.post_batch("vm1-1", body.as_bytes());
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.json()["error"]["code"], "usage_store_unavailable");
    redis.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let answer = loop {
        let answer = ext_proc.post_batch("vm1-1", body.as_bytes());
        if answer.status == 200 || std::time::Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!((answer.status, answer.json()), (200, json!({"accepted": 1, "rejected": 0})));
    assert_eq!(report(&ext_proc), [("alice".to_string(), 1, 3, None, 0, 0)]);
}
