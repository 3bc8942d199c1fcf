//! The admin port of the real binary: usage records in, the report and the
//! metrics out, OpenAI errors, and one signal stopping both servers.

mod common;

use common::ExtProc;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn record(at_ms: u64, key: &str, status: u16, tokens: (u64, u64), cost: Option<f64>) -> String {
    json!({
        "request_id": format!("req-{key}-{status}"), "at_ms": at_ms, "key": key, "model": "gpt-4o", "model_served": true,
        "backend": "vllm", "status": status, "stream": true,
        "usage": {"prompt_tokens": tokens.0, "completion_tokens": tokens.1}, "cost_usd": cost,
        "latency_us": 2_000_000, "ttft_us": 300_000, "itl_us": [20_000, 30_000]
    })
    .to_string()
}

/// An answer the gateway served from its cache: its tokens were served, not used.
fn cache_hit(at_ms: u64, key: &str, tokens: (u64, u64)) -> String {
    let mut hit: Value = serde_json::from_str(&record(at_ms, key, 200, tokens, None)).expect("a record");
    hit["served_from"] = json!("cache");
    hit.to_string()
}

#[test]
fn records_become_the_report_and_the_metrics() {
    let ext_proc = ExtProc::start(&[]);
    let now = now_ms();
    let body = [
        record(now, "alice", 200, (10, 20), Some(0.5)),
        "{not a record".to_string(),
        record(now, "alice", 500, (0, 0), None),
        String::new(),
        record(now - 120_000, "bob", 200, (1, 2), None),
        cache_hit(now, "alice", (10, 20)),
    ]
    .join("\n");
    let answer = ext_proc.post("/v1/usage/records", body.as_bytes());
    assert_eq!((answer.status, answer.json()), (200, json!({"accepted": 4, "rejected": 1})));

    let report = ext_proc.get("/v1/usage/report").json();
    assert_eq!(report["object"], "usage.report");
    assert_eq!(report["start"], 0);
    let end = report["end"].as_u64().expect("end");
    assert!(end * 1000 >= now && end * 1000 < now + 60_000, "end defaults to now: {end}");
    assert_eq!(
        report["data"],
        json!([
            {"key": "alice", "model": "gpt-4o", "backend": "vllm", "requests": 3, "errors": 1, "prompt_tokens": 10,
             "completion_tokens": 20, "total_tokens": 30, "cost_usd": 0.5, "traffic": "interactive",
             "cache_hits": 1, "cached_tokens": 30},
            {"key": "bob", "model": "gpt-4o", "backend": "vllm", "requests": 1, "errors": 0, "prompt_tokens": 1,
             "completion_tokens": 2, "total_tokens": 3, "cost_usd": null, "traffic": "interactive",
             "cache_hits": 0, "cached_tokens": 0},
        ])
    );
    // A window starting with this minute leaves bob's record of two minutes ago out.
    let minute_start = now / 60_000 * 60;
    let recent = ext_proc.get(&format!("/v1/usage/report?start={minute_start}&end={}", minute_start + 60)).json();
    assert_eq!(recent["data"].as_array().map(|rows| rows.len()), Some(1), "{recent}");
    assert_eq!(recent["data"][0]["key"], "alice");

    let metrics = ext_proc.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    let alice = r#"{model="gpt-4o",backend="vllm",key="alice",traffic="interactive"}"#;
    for line in [
        format!("modelgate_requests_total{alice} 3"),
        format!("modelgate_prompt_tokens_total{alice} 10"),
        format!("modelgate_completion_tokens_total{alice} 20"),
        format!("modelgate_cached_tokens_total{alice} 30"),
        format!("modelgate_cost_usd_total{alice} 0.5"),
        r#"modelgate_errors_total{model="gpt-4o",backend="vllm",key="alice",status="500",traffic="interactive"} 1"#
            .to_string(),
        r#"modelgate_request_duration_seconds_count{model="gpt-4o",backend="vllm"} 4"#.to_string(),
        r#"modelgate_time_to_first_token_seconds_count{model="gpt-4o",backend="vllm"} 4"#.to_string(),
        r#"modelgate_inter_token_latency_seconds_count{model="gpt-4o",backend="vllm"} 8"#.to_string(),
        "modelgate_usage_records_rejected_total 1".to_string(),
        "modelgate_limit_store_errors_total 0".to_string(),
    ] {
        assert!(metrics.body.lines().any(|l| l == line), "no `{line}` in:\n{}", metrics.body);
    }
}

#[test]
fn errors_are_openai_envelopes() {
    let ext_proc = ExtProc::start(&[]);
    let error = |answer: common::Answer| (answer.status, answer.json()["error"].clone());

    let (status, e) = error(ext_proc.get("/v1/usage/report?start=soon"));
    assert_eq!(status, 400);
    assert_eq!(
        (e["type"].clone(), e["param"].clone(), e["code"].clone()),
        (json!("invalid_request_error"), json!("start"), Value::Null)
    );

    let (status, e) = error(ext_proc.post("/v1/usage/records", b"nothing\nparses\n"));
    assert_eq!((status, e["code"].clone()), (400, json!("invalid_usage_record")));
    assert!(ext_proc.get("/metrics").body.contains("modelgate_usage_records_rejected_total 2\n"));

    let (status, e) = error(ext_proc.get("/v1/nothing-here"));
    assert_eq!(
        (status, e["type"].clone(), e["code"].clone()),
        (404, json!("invalid_request_error"), json!("unknown_url"))
    );

    // Shared limits need Redis; without it the path does not exist.
    let (status, e) = error(ext_proc.post("/v1/limits/spend", br#"{"buckets":[]}"#));
    assert_eq!((status, e["code"].clone()), (404, json!("unknown_url")));

    let answer = ext_proc.get("/v1/usage/records");
    assert_eq!((answer.status, answer.header("allow")), (405, Some("POST")));
    assert_eq!(answer.json()["error"]["code"], "method_not_allowed");
}

#[test]
fn with_an_internal_token_only_callers_presenting_it_may_write() {
    let file = std::env::temp_dir().join(format!("modelgate-admin-token-{}", std::process::id()));
    std::fs::write(&file, "tok-admin\n").unwrap();
    let ext_proc = ExtProc::start(&["--internal-token-file", file.to_str().unwrap()]);
    let line = record(now_ms(), "forged", 200, (1000, 0), None);
    for headers in ["", "x-modelgate-internal-token: tok-admi\r\n", "x-modelgate-internal-token: tok-admin2\r\n"] {
        let answer = common::http_with(ext_proc.admin, "POST", "/v1/usage/records", headers, line.as_bytes());
        assert_eq!((answer.status, answer.json()["error"]["code"].clone()), (401, json!("invalid_internal_token")));
    }
    assert_eq!(ext_proc.get("/v1/usage/report").json()["data"], json!([]), "nothing was counted");
    let token = "x-modelgate-internal-token: tok-admin\r\n";
    let answer = common::http_with(ext_proc.admin, "POST", "/v1/usage/records", token, line.as_bytes());
    assert_eq!((answer.status, answer.json()), (200, json!({"accepted": 1, "rejected": 0})));
    // Reading stays open to scrapers and operators.
    assert_eq!(ext_proc.get("/metrics").status, 200);
    assert_eq!(ext_proc.get("/v1/usage/report").json()["data"][0]["key"], "forged");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn one_signal_stops_both_servers() {
    let mut ext_proc = ExtProc::start(&[]);
    let killed = Command::new("kill").args(["-TERM", &ext_proc.process.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match ext_proc.process.try_wait() {
            Ok(Some(status)) => break status,
            _ if Instant::now() > deadline => panic!("still running 10 s after SIGTERM"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(ext_proc.admin).is_err());
    assert!(TcpStream::connect(ext_proc.grpc).is_err());
}

#[test]
fn probes_are_open_and_readiness_fails_from_sigterm_while_both_servers_still_serve() {
    let file = std::env::temp_dir().join(format!("modelgate-probe-token-{}", std::process::id()));
    std::fs::write(&file, "tok-probe\n").unwrap();
    let ext_proc = ExtProc::start(&["--internal-token-file", file.to_str().unwrap(), "--drain-delay-secs", "3600"]);
    std::fs::remove_file(&file).unwrap();
    // No token: a kubelet presents none.
    let live = ext_proc.get("/healthz");
    assert_eq!((live.status, live.json()), (200, json!({"status": "alive"})));
    assert_eq!(live.header("content-type"), Some("application/json"));
    let ready = ext_proc.get("/readyz");
    assert_eq!((ready.status, ready.json()), (200, json!({"status": "ready"})));
    let posted = ext_proc.post("/readyz", b"");
    assert_eq!((posted.status, posted.json()["error"]["code"].clone()), (405, json!("method_not_allowed")));

    let killed = Command::new("kill").args(["-TERM", &ext_proc.process.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let draining = loop {
        let ready = ext_proc.get("/readyz");
        if ready.status != 200 || Instant::now() > deadline {
            break ready;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((draining.status, draining.json()), (503, json!({"status": "draining"})));
    // Within the drain delay everything is still served, so nothing is refused before Kubernetes looks away.
    assert_eq!(ext_proc.get("/healthz").status, 200);
    assert_eq!(ext_proc.get("/metrics").status, 200);
    assert!(TcpStream::connect(ext_proc.grpc).is_ok());
}
