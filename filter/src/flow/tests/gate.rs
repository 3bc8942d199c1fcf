//! The gate on a mock host: what the filter asks ext-proc's gate, and how
//! the client sees each verdict (a replay, a refusal, a request sent on and
//! its answer kept), or none.

use super::*;
use modelgate_proto::chain::Chain;
use modelgate_proto::replay;

const PRICE: &str = r#""price": {"input_per_million": 1, "output_per_million": 2}"#;

/// A gateway whose backend `a` caches answers, whose model `m` falls back
/// from `a` to `b` on a spent budget, whose model `plain` is served by `b`
/// alone, without a cache, and whose team key has a daily budget.
fn gateway(on_failure: &str) -> (MockHost, Worker, Flow) {
    configured_as(&format!(
        r#"{{"backends": {{"a": {{"cluster": "cluster_a", "cache": {{"ttl_secs": 60}}}}, "b": {{"cluster": "cluster_b"}}}},
            "stream_guard_cluster": "guard",
            "models": [{{"match": "llama-*", "backend": "a", {PRICE}}},
                       {{"match": "m", "backend": "a", {PRICE}, "on_budget_exhausted": "fallback",
                         "fallbacks": [{{"backend": "b", "price": {{"input_per_million": 4, "output_per_million": 8}}}}]}},
                       {{"match": "plain", "backend": "b"}}],
            "accounting": {{"cluster": "admin"}},
            "cache": {{"cluster": "modelgate_admin", "max_entry_bytes": 64}},
            "idempotency": {{}},
            "budgets": {{"cluster": "modelgate_admin", "on_failure": "{on_failure}"}},
            "client_keys": [{{"name": "team", "sha256": "{TEAM_KEY}", "budgets": {{"usd_per_day": 1}}}},
                            {{"name": "free", "sha256": "{FREE_KEY}"}}]}}"#
    ))
}

/// SHA-256 of "sk-free", a key without budgets.
const FREE_KEY: &str = "a97ffab5cd3331858e03076328705ababa22813218d8511eb09bbbce51d39ff8";

const BOUNDED: &[u8] = br#"{"model":"llama-3","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

fn team(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut headers = chat_headers(&[("authorization", "Bearer sk-team")]);
    headers.extend_from_slice(extra);
    headers
}

/// Calls to ext-proc's admin port at `path`: each call's JSON line and the bytes after it.
fn calls_to(host: &MockHost, path: &str) -> Vec<(Value, Vec<u8>)> {
    let dispatched = host.state.borrow().dispatched.clone();
    dispatched
        .into_iter()
        .filter(|call| call.headers.contains(&(":path".into(), path.into())))
        .map(|call| {
            assert_eq!(call.cluster, "modelgate_admin");
            let end = call.body.iter().position(|&b| b == b'\n').unwrap_or(call.body.len());
            (serde_json::from_slice(&call.body[..end]).unwrap(), call.body.get(end + 1..).unwrap_or_default().to_vec())
        })
        .collect()
}

/// What the filter asked the gate.
fn asked(host: &MockHost) -> Value {
    let asks = calls_to(host, "/v1/gate");
    assert_eq!(asks.len(), 1, "one call per request");
    asks[0].0.clone()
}

/// The gate answers `verdict`, then `bytes`.
fn gate_says(host: &MockHost, flow: &mut Flow, verdict: Value, bytes: &[u8]) {
    let mut answer = verdict.to_string().into_bytes();
    answer.push(b'\n');
    answer.extend_from_slice(bytes);
    host.set_call_response(&[(":status", "200")], &answer);
    flow.on_call_answer(host, 1, answer.len());
}

/// The store answers the call an answer's end waits for with `status`
/// (`None`: no answer in time), and that end leaves: the bytes it held.
fn store_answers(host: &MockHost, flow: &mut Flow, status: Option<&str>) -> Vec<u8> {
    let headers: Vec<(&str, &str)> = status.map(|status| (":status", status)).into_iter().collect();
    host.set_call_response(&headers, b"");
    flow.on_call_answer(host, headers.len(), 0);
    assert_eq!(host.take_calls().last().map(String::as_str), Some("resume response"));
    std::mem::take(&mut host.state.borrow_mut().response_body)
}

#[test]
fn a_keyed_request_under_budgets_asks_the_gate_once_with_its_body_spliced_in() {
    let (host, _worker, mut flow) = gateway("deny");
    assert_eq!(send(&host, &mut flow, &team(&[]), BOUNDED), Action::Pause, "held for the verdict");
    assert_eq!(upstream(&host), None);
    let ask = asked(&host);
    assert_eq!(
        (ask["owner"].as_str(), ask["path"].as_str(), ask["model"].as_str()),
        (Some("team"), Some("/v1/chat/completions"), Some("llama-3"))
    );
    assert_eq!(ask["request_id"], "req-1");
    assert_eq!(ask["body"], serde_json::from_slice::<Value>(BOUNDED).unwrap(), "the client's body as it came");
    // 8 prompt tokens by the estimate and the 10 it may generate, at $1 and $2 a million.
    assert_eq!(
        ask["budgets"],
        json!([{"backend": "a", "budgets": [{"scope": "key", "unit": "usd", "period": "day", "limit": 1_000_000}],
                "usd_micros": 28, "tokens": 18}])
    );
    assert!(ask["reservation"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(ask.get("budget_fallback").is_none(), "one candidate: nothing to fall back on");
    // The cache is asked about where the endpoint's answers are cached.
    assert_eq!(ask.get("cache").is_some(), replay::cacheable_path("/v1/chat/completions"));
    let dispatched = host.state.borrow().dispatched[0].clone();
    assert_eq!(dispatched.timeout, Duration::from_millis(200));
    assert_eq!(ask["timeout_ms"], 200, "a verdict later than this comes to nobody: ext-proc lets go of what it took");
}

#[test]
fn a_request_without_cache_budgets_or_idempotency_key_never_asks_the_gate() {
    let (host, _worker, mut flow) = gateway("deny");
    let free = chat_headers(&[("authorization", "Bearer sk-free")]);
    assert_eq!(send(&host, &mut flow, &free, br#"{"model":"plain","messages":[]}"#), Action::Continue);
    assert!(calls_to(&host, "/v1/gate").is_empty());
    assert!(upstream(&host).is_some());
}

#[test]
fn a_cache_hit_is_answered_by_the_filter_and_recorded_as_served_from_the_cache() {
    let (host, mut worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[]), BOUNDED);
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 2});
    let verdict = json!({"outcome": "replay", "source": "cache", "status": 200, "content_type": "application/json", "usage": usage});
    gate_says(&host, &mut flow, verdict, br#"{"id":"chatcmpl-1"}"#);
    assert!(!host.state.borrow().resumed, "the backend is never asked");
    assert_eq!(upstream(&host), None);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.body.as_slice()), (200, &br#"{"id":"chatcmpl-1"}"#[..]));
    assert_eq!((seen.header("modelgate-cache"), seen.header("content-type")), (Some("hit"), Some("application/json")));
    assert!(calls_to(&host, "/v1/gate/store").is_empty(), "nothing to keep");
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["served_from"], "cache");
    assert_eq!(records[0]["usage"], usage);
    assert_eq!((records[0]["backend"].as_str(), records[0]["status"].as_u64()), (Some("a"), Some(200)));
    assert!(records[0].get("cost_usd").is_none_or(Value::is_null), "a hit costs nothing");
    assert!(records[0].get("budget_reservation").is_none());
}

#[test]
fn a_worker_answers_an_exact_repeat_of_a_hit_from_its_own_copy_until_the_entry_expires() {
    let (host, mut worker, mut flow) = gateway("deny");
    let free = || chat_headers(&[("authorization", "Bearer sk-free")]);
    let question: &[u8] = br#"{"model":"llama-3","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
    send(&host, &mut flow, &free(), question);
    let usage = json!({"prompt_tokens": 3, "completion_tokens": 2});
    let verdict = json!({"outcome": "replay", "source": "cache", "status": 200,
                         "content_type": "application/json", "usage": usage, "ttl_ms": 60_000});
    gate_says(&host, &mut flow, verdict, br#"{"id":"chatcmpl-1"}"#);
    answer(&host, &mut flow, 0, &[], &[]);
    flow.on_log(&host);

    // The same bytes again: answered at once, without a call, as the gate answered them.
    fn repeat(host: &MockHost, worker: &Worker, headers: &[(&str, &str)], body: &[u8]) -> (Action, Flow, usize) {
        host.state.borrow_mut().dispatched.clear();
        host.state.borrow_mut().sent = None;
        let mut flow = worker.new_flow();
        let action = send(host, &mut flow, headers, body);
        (action, flow, calls_to(host, "/v1/gate").len())
    }
    let (action, mut again, calls) = repeat(&host, &worker, &free(), question);
    assert_eq!((action, calls), (Action::Pause, 0));
    let seen = answer(&host, &mut again, 0, &[], &[]);
    assert_eq!((seen.status, seen.body.as_slice()), (200, &br#"{"id":"chatcmpl-1"}"#[..]));
    assert_eq!((seen.header("modelgate-cache"), seen.header("content-type")), (Some("hit"), Some("application/json")));
    again.on_log(&host);
    assert_eq!(host.state.borrow().counters.iter().find(|(n, _)| n == "modelgate.cache.local_hits").unwrap().1, 1);
    let records = sent_lines(&host, &mut worker);
    assert_eq!((&records[1]["served_from"], &records[1]["usage"]), (&json!("cache"), &usage));

    // Other bytes, another key, an Idempotency-Key or no-cache: the gate is asked.
    let respaced: &[u8] = br#"{"model":"llama-3", "messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
    assert_eq!(repeat(&host, &worker, &free(), respaced).2, 1);
    assert_eq!(repeat(&host, &worker, &team(&[]), question).2, 1);
    let idempotent = chat_headers(&[("authorization", "Bearer sk-free"), ("idempotency-key", "k")]);
    assert_eq!(repeat(&host, &worker, &idempotent, question).2, 1);
    let no_cache = chat_headers(&[("authorization", "Bearer sk-free"), ("cache-control", "no-cache")]);
    assert_eq!(repeat(&host, &worker, &no_cache, question).2, 1);
    assert!(!host.take_calls().iter().any(|call| call.contains("cache-control")), "read with the header map");
    // no-cache asked for a fresh answer: the copy is gone for the next request too.
    assert_eq!(repeat(&host, &worker, &free(), question).2, 1);

    // A copy lives no longer than the entry it copies.
    let mut flow = worker.new_flow();
    host.state.borrow_mut().dispatched.clear();
    send(&host, &mut flow, &free(), question);
    let verdict = json!({"outcome": "replay", "source": "cache", "status": 200,
                         "content_type": "application/json", "ttl_ms": 1_000});
    gate_says(&host, &mut flow, verdict, b"{}");
    assert_eq!(repeat(&host, &worker, &free(), question).2, 0);
    host.advance_us(1_000_000);
    assert_eq!(repeat(&host, &worker, &free(), question).2, 1);
}

#[test]
fn a_miss_is_sent_on_marked_and_its_answer_handed_to_the_store() {
    let (host, mut worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[("accept-encoding", "gzip")]), BOUNDED);
    let reservation = asked(&host)["reservation"].clone();
    let ticket = json!({"cache_key": "k1", "ttl_secs": 60, "window_secs": 0});
    gate_says(&host, &mut flow, json!({"outcome": "proceed", "ticket": ticket, "cache_miss": true}), b"");
    assert!(host.state.borrow().resumed);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("cluster_a".into()));
    assert_eq!(host.request_header("accept-encoding"), None, "a compressed answer could not be kept");
    let body: &[&[u8]] = &[b"{\"id\":\"x\",", b"\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}"];
    let seen = answer(&host, &mut flow, 200, &[("content-type", "application/json")], body);
    assert_eq!(seen.header("modelgate-cache"), Some("miss"));
    assert_eq!(seen.body, body[0], "the answer's end waits for the store");
    let stored = calls_to(&host, "/v1/gate/store");
    assert_eq!(stored.len(), 1);
    let (head, bytes) = &stored[0];
    assert_eq!(bytes, &body.concat(), "the answer as the client gets it");
    assert_eq!(
        (&head["ticket"], &head["complete"], &head["status"], &head["content_type"], &head["stream"]),
        (&ticket, &json!(true), &json!(200), &json!("application/json"), &json!(false))
    );
    assert_eq!(head["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2}));
    assert!(host.take_calls().contains(&"dispatch detached modelgate_admin".to_string()), "it outlives the request");
    assert_eq!(store_answers(&host, &mut flow, Some("204")), body[1], "kept: the end leaves");
    flow.on_log(&host);
    assert_eq!(calls_to(&host, "/v1/gate/store").len(), 1, "handed over once");
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["budget_reservation"], reservation, "settled with the record");
    assert!(records[0].get("served_from").is_none());
}

#[test]
fn an_answers_end_goes_on_without_a_store_that_does_not_answer_in_time() {
    let (host, _worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[("idempotency-key", "k")]), BOUNDED);
    let ticket = json!({"claim": "c1", "window_secs": 60});
    gate_says(&host, &mut flow, json!({"outcome": "proceed", "ticket": ticket}), b"");
    let stream: &[&[u8]] = &[b"data: {\"choices\":[]}\n\n", b"data: [DONE]\n\n"];
    host.state.borrow_mut().response_trailers = vec![("x-trailer".into(), "1".into())];
    let seen = answer(&host, &mut flow, 200, &[("content-type", "text/event-stream")], stream);
    assert_eq!(seen.body, stream.concat(), "a stream's pieces leave; its trailers wait for the store");
    assert_eq!(store_answers(&host, &mut flow, None), b"");
    let failures = host.state.borrow().counters.iter().find(|(n, _)| n == "modelgate.gate.store_failures").unwrap().1;
    assert_eq!(failures, 1);
    assert_eq!(host.state.borrow().errors.len(), 1);
}

#[test]
fn an_idempotent_repeat_gets_the_first_answer_marked_as_replayed() {
    let (host, mut worker, mut flow) = gateway("deny");
    let stream = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
    send(&host, &mut flow, &team(&[("idempotency-key", "order-42")]), BOUNDED);
    assert_eq!(asked(&host)["idempotency"], json!({"key": "order-42", "window_secs": 86400}));
    let verdict =
        json!({"outcome": "replay", "source": "idempotency", "status": 200, "content_type": "text/event-stream"});
    gate_says(&host, &mut flow, verdict, stream);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.body.as_slice()), (200, &stream[..]));
    assert_eq!(seen.header("modelgate-idempotent-replayed"), Some("true"));
    assert_eq!(seen.header("content-type"), Some("text/event-stream"));
    assert_eq!(seen.header("modelgate-cache"), None);
    assert_eq!(sent_lines(&host, &mut worker)[0]["served_from"], "idempotency");
}

#[test]
fn an_idempotency_key_in_use_is_409_and_reused_with_another_body_is_422() {
    for (reason, status, code) in [
        ("idempotency_in_progress", 409, "idempotency_key_in_use"),
        ("idempotency_mismatch", 422, "idempotency_key_reused"),
    ] {
        let (host, _worker, mut flow) = gateway("deny");
        send(&host, &mut flow, &team(&[("idempotency-key", "k")]), BOUNDED);
        gate_says(&host, &mut flow, json!({"outcome": "refuse", "refusal": {"reason": reason}}), b"");
        assert_eq!(upstream(&host), None);
        let seen = answer(&host, &mut flow, 0, &[], &[]);
        assert_eq!((seen.status, seen.error()), (status, ("invalid_request_error".into(), code.into())));
        assert_eq!(seen.header("retry-after").is_some(), status == 409, "a 409 may pass once the first request ends");
    }
}

#[test]
fn a_bad_idempotency_key_is_refused_before_anything_is_asked() {
    let (host, _worker, mut flow) = gateway("deny");
    let long = "k".repeat(256);
    let mut headers = team(&[]);
    headers.push(("idempotency-key", &long));
    send(&host, &mut flow, &headers, BOUNDED);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.json()["error"]["param"].as_str()), (400, Some("Idempotency-Key")));
    assert!(host.state.borrow().dispatched.is_empty());
}

#[test]
fn a_spent_budget_is_openais_insufficient_quota_and_anthropics_rate_limit_error() {
    let refusal = json!({"outcome": "refuse", "refusal": {"reason": "budget_exhausted",
        "budget": "usd_per_day of key `team`", "resets_at": 1_700_006_400}});
    let (host, _worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[]), BOUNDED);
    gate_says(&host, &mut flow, refusal.clone(), b"");
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error()), (429, ("insufficient_quota".into(), "insufficient_quota".into())));
    assert_eq!(seen.header("x-should-retry"), Some("false"));
    assert_eq!(
        seen.json()["error"]["message"],
        "You exceeded your budget: usd_per_day of key `team` is spent until 2023-11-15T00:00:00Z."
    );

    let (host, _worker, mut flow) = gateway("deny");
    let mut messages = team(&[]);
    messages[1] = (":path", "/v1/messages");
    send(
        &host,
        &mut flow,
        &messages,
        br#"{"model":"llama-3","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(asked(&host)["path"], "/v1/messages");
    gate_says(&host, &mut flow, refusal, b"");
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!(seen.status, 429);
    assert_eq!(seen.json()["type"], "error");
    assert_eq!(seen.json()["error"]["type"], "rate_limit_error");
}

#[test]
fn a_spent_first_backend_moves_a_fallback_model_on_to_the_next_with_its_own_price() {
    let (host, _worker, mut flow) = gateway("deny");
    let body = br#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    send(&host, &mut flow, &team(&[]), body);
    let ask = asked(&host);
    assert_eq!(ask["budget_fallback"], true);
    let costs: Vec<(&str, u64)> = ask["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["backend"].as_str().unwrap(), c["usd_micros"].as_u64().unwrap()))
        .collect();
    assert_eq!(costs, [("a", 28), ("b", 112)]);
    gate_says(&host, &mut flow, json!({"outcome": "proceed", "member": 1}), b"");
    assert!(host.state.borrow().resumed);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("guard".into()));
    let chain = Chain::from_header(host.request_header(headers::CHAIN).unwrap().as_bytes()).unwrap();
    assert_eq!(chain.members.iter().map(|m| m.backend.as_str()).collect::<Vec<_>>(), ["b"], "the chain starts at b");
}

#[test]
fn a_gate_that_does_not_answer_makes_a_miss_for_the_cache_and_idempotency() {
    let (host, mut worker, mut flow) = gateway("deny");
    let free = chat_headers(&[("authorization", "Bearer sk-free"), ("idempotency-key", "k")]);
    assert_eq!(send(&host, &mut flow, &free, BOUNDED), Action::Pause);
    // Its call timed out: the answer came without headers.
    flow.on_call_answer(&host, 0, 0);
    assert!(host.state.borrow().resumed);
    assert!(upstream(&host).is_some());
    assert!(host.state.borrow().counters.contains(&("modelgate.gate.store_failures".to_string(), 1)));
    answer(&host, &mut flow, 200, &[], &[b"{}"]);
    assert!(calls_to(&host, "/v1/gate/store").is_empty(), "no ticket, nothing kept");
    assert!(sent_lines(&host, &mut worker)[0].get("budget_reservation").is_none());
}

#[test]
fn a_gate_that_does_not_answer_refuses_budgeted_requests_or_lets_them_through() {
    let (host, mut worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[]), BOUNDED);
    let reservation = asked(&host)["reservation"].clone();
    host.set_call_response(&[(":status", "503")], b"{}");
    flow.on_call_answer(&host, 1, 2);
    assert!(!host.state.borrow().resumed);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (503, "budgets_unavailable"));
    assert_eq!(seen.header("x-should-retry"), Some("true"));
    flow.on_log(&host);
    // Had the store made the reservation after all, it is released: no record will settle it.
    let tally = sent_lines(&host, &mut worker).pop().unwrap();
    assert_eq!(tally["released_reservations"], json!([reservation]));

    let (host, mut worker, mut flow) = gateway("allow");
    host.state.borrow_mut().dispatch_refused = true;
    assert_eq!(send(&host, &mut flow, &team(&[]), BOUNDED), Action::Continue, "decided at once: the call was not sent");
    assert!(upstream(&host).is_some());
    host.state.borrow_mut().dispatch_refused = false;
    answer(&host, &mut flow, 200, &[], &[b"{}"]);
    // Its record names the reservation: one the store made after all is settled, not held.
    assert!(sent_lines(&host, &mut worker)[0].get("budget_reservation").is_some());
}

#[test]
fn an_answer_over_the_entry_bound_is_not_kept_and_its_claim_let_go() {
    for (claim, store_calls) in [(None, 0), (Some("c1"), 1)] {
        let (host, _worker, mut flow) = gateway("deny");
        send(&host, &mut flow, &team(&[]), BOUNDED);
        let ticket = json!({"cache_key": "k1", "ttl_secs": 60, "claim": claim, "window_secs": 60});
        gate_says(&host, &mut flow, json!({"outcome": "proceed", "ticket": ticket, "cache_miss": true}), b"");
        let large = format!(r#"{{"id":"{}"}}"#, "x".repeat(64));
        let mut seen = answer(&host, &mut flow, 200, &[], &[large.as_bytes()]).body;
        if claim.is_some() {
            // The claim is let go before the end leaves, so a repeat may run.
            seen.extend(store_answers(&host, &mut flow, Some("204")));
        }
        assert_eq!(seen, large.as_bytes(), "the client gets it whole all the same");
        let stored = calls_to(&host, "/v1/gate/store");
        assert_eq!(stored.len(), store_calls);
        if let Some((head, bytes)) = stored.first() {
            assert_eq!((head["complete"].as_bool(), bytes.len()), (Some(false), 0));
        }
    }
}

#[test]
fn a_client_gone_while_the_gate_decides_releases_its_reservation() {
    let (host, mut worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[]), BOUNDED);
    let reservation = asked(&host)["reservation"].clone();
    flow.on_log(&host);
    let tally = sent_lines(&host, &mut worker).pop().unwrap();
    assert_eq!(tally["released_reservations"], json!([reservation]));
    assert_eq!(tally["refused"][0]["key"], "team", "counted as a request that reached no backend");
}

#[test]
fn a_client_gone_before_the_end_lets_the_claim_go() {
    let (host, _worker, mut flow) = gateway("deny");
    send(&host, &mut flow, &team(&[("idempotency-key", "k")]), BOUNDED);
    let ticket = json!({"claim": "c1", "window_secs": 60});
    gate_says(&host, &mut flow, json!({"outcome": "proceed", "ticket": ticket}), b"");
    host.set_response(&[(":status", "200")], b"");
    flow.on_response_headers(&host, false);
    host.state.borrow_mut().response_body = b"data: {".to_vec();
    flow.on_response_body(&host, 7, false);
    assert!(calls_to(&host, "/v1/gate/store").is_empty());
    flow.on_log(&host);
    let stored = calls_to(&host, "/v1/gate/store");
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].0["complete"].as_bool(), stored[0].1.len()), (Some(false), 0));
    assert_eq!(stored[0].0["ticket"]["claim"], "c1");
}

#[test]
fn an_error_answer_is_not_kept() {
    let (host, _worker, mut flow) = gateway("deny");
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    send(&host, &mut flow, &team(&[("idempotency-key", "k")]), BOUNDED);
    let ticket = json!({"cache_key": "k1", "ttl_secs": 60, "claim": "c1", "window_secs": 60});
    gate_says(&host, &mut flow, json!({"outcome": "proceed", "ticket": ticket, "cache_miss": true}), b"");
    let seen = answer(&host, &mut flow, 500, &[], &[b"{}"]);
    assert_eq!(seen.status, 500);
    let stored = calls_to(&host, "/v1/gate/store");
    assert_eq!(
        (stored.len(), stored[0].0["complete"].as_bool(), stored[0].0["status"].as_u64()),
        (1, Some(false), Some(500))
    );
}
