//! A request's flow on a mock host: what the filter asks of Envoy, and what
//! the client and the backend would see.

use super::*;
use crate::mock_host::MockHost;
use crate::worker::Worker;
use serde_json::{json, Value};

const NOW: u64 = 1_700_000_000_000_000;

/// SHA-256 of "sk-team".
const TEAM_KEY: &str = "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13";

const BACKENDS: &str =
    r#""backends": {"a": {"cluster": "cluster_a"}}, "models": [{"match": "llama-*", "backend": "a"}]"#;

/// A worker configured with `{BACKENDS, extra}`, on a mock host, and the flow of its first request.
fn configured(extra: &str) -> (MockHost, Worker, Flow) {
    configured_as(&format!("{{{BACKENDS}{extra}}}"))
}

fn configured_as(config: &str) -> (MockHost, Worker, Flow) {
    let host = MockHost::new(NOW);
    host.state.borrow_mut().config = config.as_bytes().to_vec();
    let mut worker = Worker::default();
    assert!(worker.configure(&host), "{:?}", host.state.borrow().errors);
    host.take_calls();
    let flow = worker.new_flow();
    (host, worker, flow)
}

/// A key with these limits, and what else the configuration says.
fn keyed(limits: &str, extra: &str) -> String {
    format!(r#", "client_keys": [{{"name": "team", "sha256": "{TEAM_KEY}", "limits": {limits}}}]{extra}"#)
}

const CHAT: &[u8] = br#"{"model":"llama-3","messages":[{"role":"user","content":"hi"}]}"#;

fn chat_headers(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("x-request-id", "req-1"),
    ];
    headers.extend_from_slice(extra);
    headers
}

/// Sends a request's headers, then its body in one piece, as Envoy does: the last callback's action.
fn send(host: &MockHost, flow: &mut Flow, headers: &[(&str, &str)], body: &[u8]) -> Action {
    host.set_request(headers, body);
    let action = flow.on_request_headers(host, body.is_empty());
    if body.is_empty() || host.state.borrow().sent.is_some() {
        return action;
    }
    flow.on_request_body(host, body.len(), true)
}

/// What the client got.
#[derive(Debug)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The OpenAI error's type and code.
    fn error(&self) -> (String, String) {
        let error = &self.json()["error"];
        assert!(error["message"].is_string(), "{error}");
        (error["type"].as_str().unwrap_or_default().into(), error["code"].as_str().unwrap_or_default().into())
    }
}

/// Plays the answer through the filter as Envoy does, then ends the request:
/// the filter's own reply if it sent one, else the backend's (`status`,
/// `headers`, and the body in `pieces`), which may lead to a reply of the
/// filter's. A reply of the filter's passes its response callbacks too.
fn answer(host: &MockHost, flow: &mut Flow, status: u16, headers: &[(&str, &str)], pieces: &[&[u8]]) -> Seen {
    if host.state.borrow().sent.is_none() {
        let status = status.to_string();
        let mut all = vec![(":status", status.as_str())];
        all.extend_from_slice(headers);
        host.set_response(&all, b"");
        flow.on_response_headers(host, pieces.is_empty());
        if host.state.borrow().sent.is_none() {
            let body = stream_body(host, flow, pieces);
            return seen(host, flow, body);
        }
    }
    let sent = host.state.borrow_mut().sent.take().unwrap();
    let status = sent.status.to_string();
    let mut all = vec![(":status", status.as_str())];
    all.extend(sent.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    host.set_response(&all, b"");
    flow.on_response_headers(host, false);
    let body = stream_body(host, flow, &[&sent.body]);
    seen(host, flow, body)
}

/// The body the client gets from `pieces`: a piece the filter pauses on is buffered with the next.
fn stream_body(host: &MockHost, flow: &mut Flow, pieces: &[&[u8]]) -> Vec<u8> {
    let mut client = Vec::new();
    let mut buffered = Vec::new();
    let trailed = !host.state.borrow().response_trailers.is_empty();
    for (i, piece) in pieces.iter().enumerate() {
        buffered.extend_from_slice(piece);
        host.state.borrow_mut().response_body = buffered.clone();
        if flow.on_response_body(host, buffered.len(), !trailed && i + 1 == pieces.len()) == Action::Continue {
            client.append(&mut host.state.borrow_mut().response_body);
            buffered.clear();
        }
    }
    if trailed {
        let calls = host.state.borrow().dispatched.len();
        let action = flow.on_response_trailers(host);
        // Trailers are held only while the store takes the kept answer; a test has it answer.
        assert_eq!(action == Action::Pause, host.state.borrow().dispatched.len() > calls);
        if action == Action::Continue && !buffered.is_empty() {
            // What Envoy held for the filter goes on before the trailers.
            client.append(&mut host.state.borrow_mut().response_body);
        }
    }
    client
}

fn seen(host: &MockHost, flow: &mut Flow, body: Vec<u8>) -> Seen {
    flow.on_log(host);
    let status = host.response_header(":status").unwrap().parse().unwrap();
    let headers = host.state.borrow().response_headers.iter().filter(|(n, _)| n != ":status").cloned().collect();
    Seen { status, headers, body }
}

/// The request as it leaves for its backend, if it does: its cluster, and its body as JSON.
fn upstream(host: &MockHost) -> Option<(String, Value)> {
    let cluster = host.request_header(headers::CLUSTER)?;
    Some((cluster, serde_json::from_slice(&host.state.borrow().request_body).unwrap()))
}

/// The host calls a request's headers take, for a request with an id and without internal headers.
fn request_headers_calls() -> Vec<String> {
    vec!["now".to_string(), "get request headers".to_string()]
}

#[test]
fn a_request_the_filter_does_not_route_passes_with_its_timing_alone() {
    let (host, _worker, mut flow) = configured("");
    let action = send(&host, &mut flow, &[(":method", "GET"), (":path", "/health"), ("x-request-id", "r")], b"");
    assert_eq!(action, Action::Continue);
    assert_eq!(host.take_calls(), request_headers_calls());
    host.advance_us(3_000);
    let seen = answer(&host, &mut flow, 200, &[("content-type", "text/plain")], &[b"ok"]);
    assert_eq!(
        host.take_calls(),
        ["now", "set response openai-processing-ms: 3", "get response :status"],
        "the body is not read, nor the request logged"
    );
    assert_eq!((seen.status, seen.body.as_slice(), seen.header("openai-processing-ms")), (200, &b"ok"[..], Some("3")));
}

#[test]
fn a_model_routed_request_to_an_openai_backend_costs_these_host_calls() {
    let (host, _worker, mut flow) = configured("");
    host.set_request(&chat_headers(&[]), b"");
    assert_eq!(flow.on_request_headers(&host, false), Action::Pause, "its body is read first");
    assert_eq!(host.take_calls(), request_headers_calls());
    assert_eq!(flow.on_request_body(&host, 10, false), Action::Pause);
    host.state.borrow_mut().request_body = CHAT.to_vec();
    assert_eq!(flow.on_request_body(&host, CHAT.len(), true), Action::Continue);
    let routed = vec!["get request body".to_string(), format!("set request {}: cluster_a", headers::CLUSTER)];
    assert_eq!(host.take_calls(), routed, "no client key came: none is dropped");
    assert_eq!(upstream(&host), Some(("cluster_a".into(), serde_json::from_slice(CHAT).unwrap())));

    let seen = answer(&host, &mut flow, 200, &[], &[b"{\"id\":", b"\"x\"}"]);
    assert_eq!(
        host.take_calls(),
        ["now", "set response openai-processing-ms: 0", "get response :status"],
        "without accounting or token limits the answer is neither read nor timed piece by piece"
    );
    assert_eq!((seen.status, seen.body.as_slice()), (200, &b"{\"id\":\"x\"}"[..]));
}

#[test]
fn a_key_over_its_local_request_limit_gets_openais_429() {
    let (host, worker, mut flow) = configured(&keyed(r#"{"requests_per_minute": 1}"#, ""));
    let with_key = chat_headers(&[("authorization", "Bearer sk-team")]);
    assert_eq!(send(&host, &mut flow, &with_key, CHAT), Action::Continue);
    assert!(upstream(&host).is_some());
    assert!(host.take_calls().iter().any(|call| call.starts_with("set shared ")), "counted in Envoy's shared data");
    let admitted = answer(&host, &mut flow, 200, &[], &[b"{}"]);
    assert_eq!(admitted.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(admitted.header("x-ratelimit-remaining-requests"), Some("0"));

    let mut second = worker.new_flow();
    assert_eq!(send(&host, &mut second, &with_key, CHAT), Action::Pause);
    assert_eq!(upstream(&host), None, "the backend never sees it");
    let refused = answer(&host, &mut second, 0, &[], &[]);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error(), ("requests".into(), "rate_limit_exceeded".into()));
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert!(refused.header("openai-processing-ms").is_some());
}

/// A configuration whose key's limits live in the shared store behind ext-proc's admin port.
fn shared(on_failure: &str) -> String {
    keyed(
        r#"{"requests_per_minute": 5}"#,
        &format!(r#", "shared_limits": {{"cluster": "admin", "on_failure": "{on_failure}"}}"#),
    )
}

fn verdict(allowed: bool) -> Vec<u8> {
    let retry_after_us = if allowed { 0 } else { 20_000_000 };
    let remaining = if allowed { 4 } else { 0 };
    json!({"verdicts": [{"allowed": allowed, "limit": 5, "remaining": remaining, "reset_us": 60_000_000, "retry_after_us": retry_after_us}]})
        .to_string()
        .into_bytes()
}

/// Sends a keyed chat request under shared limits: it is held while the store is asked.
fn held(on_failure: &str) -> (MockHost, Worker, Flow) {
    let (host, worker, mut flow) = configured(&shared(on_failure));
    assert_eq!(send(&host, &mut flow, &chat_headers(&[("authorization", "Bearer sk-team")]), CHAT), Action::Pause);
    let asked = host.state.borrow().dispatched.clone();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].cluster, "admin");
    assert!(asked[0].headers.contains(&(":path".into(), "/v1/limits/spend".into())));
    assert_eq!(upstream(&host), None, "held, not yet routed");
    host.take_calls();
    (host, worker, flow)
}

#[test]
fn shared_limits_admit_a_request_and_it_resumes_routed() {
    let (host, _worker, mut flow) = held("allow");
    let verdict = verdict(true);
    host.set_call_response(&[(":status", "200")], &verdict);
    flow.on_shared_verdict(&host, 1, verdict.len());
    assert!(host.state.borrow().resumed);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("cluster_a".into()));
    let seen = answer(&host, &mut flow, 200, &[], &[b"{}"]);
    assert_eq!(seen.header("x-ratelimit-remaining-requests"), Some("4"));
}

#[test]
fn shared_limits_refuse_a_request_over_its_limit() {
    let (host, _worker, mut flow) = held("allow");
    let verdict = verdict(false);
    host.set_call_response(&[(":status", "200")], &verdict);
    flow.on_shared_verdict(&host, 1, verdict.len());
    assert!(!host.state.borrow().resumed);
    assert_eq!(upstream(&host), None);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.header("retry-after")), (429, Some("20")));
    assert_eq!(seen.error(), ("requests".into(), "rate_limit_exceeded".into()));
}

#[test]
fn a_store_that_gives_no_verdict_lets_requests_through_where_limits_fail_open() {
    // Its call timed out: the answer came without headers.
    let (host, _worker, mut flow) = held("allow");
    flow.on_shared_verdict(&host, 0, 0);
    assert!(host.state.borrow().resumed);
    assert!(upstream(&host).is_some());
    assert_eq!(host.state.borrow().counters, [("modelgate.shared_limits.store_failures".to_string(), 1)]);
    assert_eq!(host.state.borrow().errors.len(), 1);
    let seen = answer(&host, &mut flow, 200, &[], &[b"{}"]);
    assert_eq!(seen.header("x-ratelimit-remaining-requests"), None, "nothing was counted");

    // Envoy would not even send the call: decided at once.
    let (host, worker, _) = configured(&shared("allow"));
    host.state.borrow_mut().dispatch_refused = true;
    let mut flow = worker.new_flow();
    assert_eq!(send(&host, &mut flow, &chat_headers(&[("authorization", "Bearer sk-team")]), CHAT), Action::Continue);
    assert!(upstream(&host).is_some());
    assert!(!host.state.borrow().resumed, "it was never held");
}

#[test]
fn a_store_that_gives_no_verdict_refuses_requests_where_limits_fail_closed() {
    let (host, _worker, mut flow) = held("deny");
    let broken = b"<html>bad gateway</html>";
    host.set_call_response(&[(":status", "502")], broken);
    flow.on_shared_verdict(&host, 1, broken.len());
    assert!(!host.state.borrow().resumed);
    assert_eq!(upstream(&host), None);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.header("x-should-retry")), (503, Some("true")));
    assert_eq!(seen.error(), ("server_error".into(), "rate_limits_unavailable".into()));
}

#[test]
fn a_backends_error_is_rewritten_as_an_openai_error() {
    let (host, _worker, mut flow) = configured("");
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    send(&host, &mut flow, &chat_headers(&[]), CHAT);
    let html: &[u8] = b"<html><body>Internal Server Error</body></html>";
    let headers = [("content-type", "text/html"), ("content-length", "48")];
    let seen = answer(&host, &mut flow, 500, &headers, &[&html[..20], &html[20..]]);
    assert_eq!((seen.status, seen.header("content-type")), (500, Some("application/json")));
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));
    assert_eq!(seen.error().0, "server_error");
    let message = seen.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("500"), "{message}");
}

#[test]
fn a_backends_error_ending_in_trailers_is_rewritten_too() {
    let (host, _worker, mut flow) = configured("");
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    send(&host, &mut flow, &chat_headers(&[]), CHAT);
    host.state.borrow_mut().response_trailers = vec![("grpc-status".into(), "13".into())];
    let html: &[u8] = b"<html><body>Internal Server Error</body></html>";
    let seen = answer(&host, &mut flow, 500, &[("content-type", "text/html")], &[&html[..20], &html[20..]]);
    assert_eq!((seen.status, seen.header("content-type")), (500, Some("application/json")));
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));
    assert_eq!(seen.error().0, "server_error");
    assert_eq!(host.state.borrow().response_trailers, vec![("grpc-status".into(), "13".into())], "trailers go on");
}

#[test]
fn an_overload_answers_an_openai_client_503_whatever_status_the_backend_gave() {
    let (host, _worker, mut flow) = configured("");
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    send(&host, &mut flow, &chat_headers(&[]), CHAT);
    // As ext_proc leaves a whole answer from Anthropic: the envelope translated, the status not.
    let overloaded: &[u8] =
        br#"{"error":{"message":"Overloaded","type":"server_error","param":null,"code":"overloaded"}}"#;
    let seen = answer(&host, &mut flow, 529, &[("content-type", "application/json")], &[overloaded]);
    assert_eq!((seen.status, seen.error()), (503, ("server_error".into(), "overloaded".into())));
}

#[test]
fn envoys_own_error_without_a_body_is_answered_anew_as_an_openai_error() {
    let (host, _worker, mut flow) = configured("");
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"no_healthy_upstream".to_vec());
    send(&host, &mut flow, &chat_headers(&[]), CHAT);
    let seen = answer(&host, &mut flow, 503, &[], &[]);
    assert_eq!((seen.status, seen.header("content-type")), (503, Some("application/json")));
    assert_eq!(seen.error().0, "server_error");
}

#[test]
fn a_success_with_an_empty_body_is_a_broken_backend() {
    let (host, _worker, mut flow) = configured("");
    send(&host, &mut flow, &chat_headers(&[]), CHAT);
    let seen = answer(&host, &mut flow, 200, &[], &[]);
    assert_eq!(seen.status, 502);
    assert_eq!(seen.error(), ("server_error".into(), "bad_backend_answer".into()));
}

#[test]
fn a_streams_usage_the_client_did_not_ask_for_is_read_and_removed() {
    let (host, mut worker, mut flow) = configured(r#", "accounting": {"cluster": "admin"}"#);
    let stream = br#"{"model":"llama-3","stream":true,"messages":[]}"#;
    let headers = chat_headers(&[("accept-encoding", "gzip")]);
    assert_eq!(send(&host, &mut flow, &headers, stream), Action::Continue);
    let (_, sent) = upstream(&host).unwrap();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}), "the gateway asks for it");
    let length = host.request_header("content-length").unwrap();
    assert_eq!(length, host.state.borrow().request_body.len().to_string());
    assert_eq!(host.request_header("accept-encoding"), None, "usage is not read from a compressed answer");

    let chunk: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
    let usage: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
    let done: &[u8] = b"data: [DONE]\n\n";
    let seen = answer(&host, &mut flow, 200, &[("content-type", "text/event-stream")], &[chunk, usage, done]);
    assert_eq!(seen.body, [chunk, done].concat(), "the client did not ask for the usage chunk");

    host.state.borrow_mut().dispatched.clear();
    worker.on_tick(&host);
    let records = host.state.borrow().dispatched.clone();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].cluster, "admin");
    let record: Value = serde_json::from_slice(&records[0].body).unwrap();
    assert_eq!((record["request_id"].as_str(), record["model"].as_str()), (Some("req-1"), Some("llama-3")));
    assert_eq!(record["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2}));
}

#[test]
fn a_guarded_streams_usage_comes_in_the_guards_trailer_where_the_guard_announces_it() {
    let (host, mut worker, mut flow) = client_api_gateway();
    let stream = br#"{"model":"gemma","stream":true,"messages":[]}"#;
    send(&host, &mut flow, &api_request("/v1/chat/completions", BEARER), stream);
    assert_eq!(host.request_header(headers::USAGE).as_deref(), Some("unasked"), "the guard is asked");
    let chunk: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
    let done: &[u8] = b"data: [DONE]\n\n";
    host.state.borrow_mut().response_trailers = vec![(headers::USAGE_TRAILER.into(), "7,9 250 300".into())];
    host.take_calls();
    let announced = [("content-type", "text/event-stream"), ("trailer", headers::USAGE_TRAILER)];
    let seen = answer(&host, &mut flow, 200, &announced, &[chunk, chunk, done]);
    assert_eq!(seen.body, [chunk, chunk, done].concat(), "passed as it came");
    assert_eq!(seen.header("trailer"), None, "the client is not told of the trailer");
    assert!(host.state.borrow().response_trailers.is_empty(), "nor given it");
    let calls = [
        "now",
        "set response openai-processing-ms: 0",
        "get response x-modelgate-code-details",
        "remove response x-modelgate-code-details",
        "get response trailer",
        "remove response trailer",
        "get response :status",
        "get response modelgate-backend",
        // The first piece is timed; no piece is read, however long the stream.
        "now",
        "get trailers modelgate-usage",
        "remove trailers modelgate-usage",
        "now",
    ];
    assert_eq!(host.take_calls(), calls);
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["usage"], json!({"prompt_tokens": 7, "completion_tokens": 9}));
    assert_eq!(records[0]["itl_us"], json!([250, 300]));

    // A guard that does not announce it (an older one, or one reached over HTTP/1.1): read here.
    let mut older = worker.new_flow();
    send(&host, &mut older, &api_request("/v1/chat/completions", BEARER), stream);
    let usage: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
    let seen = answer(&host, &mut older, 200, &[("content-type", "text/event-stream")], &[chunk, usage, done]);
    assert_eq!(seen.body, [chunk, done].concat(), "the client did not ask for the usage chunk");
    assert_eq!(sent_lines(&host, &mut worker)[0]["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2}));
}

#[test]
fn an_accounted_answer_is_timed_by_its_bytes_and_recorded_without_another_clock_read() {
    let (host, mut worker, mut flow) = configured(r#", "accounting": {"cluster": "admin"}"#);
    assert_eq!(send(&host, &mut flow, &chat_headers(&[]), CHAT), Action::Continue);
    host.take_calls();
    host.advance_us(2_000);
    answer(&host, &mut flow, 200, &[], &[br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#]);
    let clock_reads = host.take_calls().iter().filter(|call| *call == "now").count();
    assert_eq!(clock_reads, 2, "openai-processing-ms, then the answer's bytes; the record takes their time");
    worker.on_tick(&host);
    let records = host.state.borrow().dispatched.clone();
    let record: Value = serde_json::from_slice(&records[0].body).unwrap();
    assert_eq!(record["latency_us"], 2_000, "from the request's start to its answer's last bytes");
}

#[test]
fn models_are_listed_by_the_filter_itself() {
    let (host, _worker, mut flow) =
        configured_as(r#"{"backends": {"a": {"cluster": "c"}}, "models": [{"match": "llama-3", "backend": "a"}]}"#);
    let action = send(&host, &mut flow, &[(":method", "GET"), (":path", "/v1/models"), ("x-request-id", "r")], b"");
    assert_eq!(action, Action::Pause);
    assert_eq!(upstream(&host), None, "no backend is asked");
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.header("content-type")), (200, Some("application/json")));
    assert_eq!(seen.json()["object"], "list");
    assert_eq!(seen.json()["data"][0]["id"], "llama-3");
}

#[test]
fn refusals_before_any_backend_are_counted_and_answers_recorded() {
    let (host, mut worker, mut flow) = configured(r#", "accounting": {"cluster": "admin"}"#);
    send(&host, &mut flow, &chat_headers(&[]), br#"{"model":"gpt-9"}"#);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (404, "model_not_found"));
    worker.on_tick(&host);
    let sent = host.state.borrow().dispatched.clone();
    let tally: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(tally["refused"][0]["status"], 404);
    assert_eq!(tally["refused"][0]["model"], "", "its model was never routed");
}

#[test]
fn a_body_ended_by_trailers_is_routed_with_them() {
    let (host, _worker, mut flow) = configured("");
    host.set_request(&chat_headers(&[]), CHAT);
    assert_eq!(flow.on_request_headers(&host, false), Action::Pause);
    assert_eq!(flow.on_request_body(&host, CHAT.len(), false), Action::Pause);
    assert_eq!(upstream(&host), None);
    assert_eq!(flow.on_request_trailers(&host), Action::Continue);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("cluster_a".into()));
    assert_eq!(flow.on_request_trailers(&host), Action::Continue, "routed once");
}

#[test]
fn a_token_limit_holds_a_reservation_until_the_answers_usage_settles_it() {
    let (host, worker, mut flow) = configured(&keyed(r#"{"tokens_per_minute": 1000}"#, ""));
    let with_key = chat_headers(&[("authorization", "Bearer sk-team")]);
    let bounded = br#"{"model":"llama-3","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let remaining = |seen: &Seen| seen.header("x-ratelimit-remaining-tokens").unwrap().parse::<u64>().unwrap();
    send(&host, &mut flow, &with_key, bounded);
    let usage = br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
    let first = answer(&host, &mut flow, 200, &[], &[usage]);
    let mut second = worker.new_flow();
    send(&host, &mut second, &with_key, bounded);
    let after = answer(&host, &mut second, 200, &[], &[usage]);
    assert_eq!(remaining(&first) - remaining(&after), 5, "the first request's 5 tokens, not its reservation");

    // An error answer used nothing: its whole reservation comes back.
    let mut third = worker.new_flow();
    send(&host, &mut third, &with_key, bounded);
    answer(&host, &mut third, 500, &[], &[b"{}"]);
    let mut fourth = worker.new_flow();
    send(&host, &mut fourth, &with_key, bounded);
    assert_eq!(remaining(&answer(&host, &mut fourth, 200, &[], &[usage])), remaining(&after) - 5);
}

/// A gateway with keys (the team's limited to one request a minute), accounting, an internal token and the batch service.
fn batch_gateway() -> (MockHost, Worker, Flow) {
    configured(&keyed(
        r#"{"requests_per_minute": 1}"#,
        r#", "accounting": {"cluster": "admin"}, "internal_token": "tok-1", "batches": {"cluster": "modelgate_admin"}"#,
    ))
}

fn files_upload(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/v1/files"),
        ("content-type", "multipart/form-data; boundary=b"),
        ("content-length", "209715200"),
        ("x-request-id", "req-1"),
    ];
    headers.extend_from_slice(extra);
    headers
}

/// The usage lines the worker sends on its next tick.
fn sent_lines(host: &MockHost, worker: &mut Worker) -> Vec<Value> {
    host.state.borrow_mut().dispatched.clear();
    worker.on_tick(host);
    let sent = host.state.borrow().dispatched.clone();
    sent.iter()
        .flat_map(|call| {
            call.body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap())
        })
        .collect()
}

#[test]
fn without_a_batch_service_files_and_batches_pass_on_as_before() {
    let (host, _worker, mut flow) = configured("");
    let action = send(&host, &mut flow, &[(":method", "GET"), (":path", "/v1/batches"), ("x-request-id", "r")], b"");
    assert_eq!(action, Action::Continue);
    assert_eq!(host.take_calls(), request_headers_calls());
    assert_eq!(host.request_header(headers::CLUSTER), None, "Envoy's routes decide, as for any other path");
}

#[test]
fn an_upload_streams_to_the_batch_service_unbuffered_with_its_owner_and_the_token() {
    let (host, _worker, mut flow) = batch_gateway();
    let spoofed = [(headers::OWNER, "someone-else"), (headers::CLUSTER, "elsewhere")];
    host.set_request(&files_upload(&[("authorization", "Bearer sk-team"), spoofed[0], spoofed[1]]), b"");
    assert_eq!(flow.on_request_headers(&host, false), Action::Continue, "headers go on at once");
    let mut calls = vec![
        "now".to_string(),
        "get request headers".to_string(),
        format!("remove request {}", headers::CLUSTER),
        format!("remove request {}", headers::OWNER),
    ];
    calls.extend([
        format!("set request {}: modelgate_admin", headers::CLUSTER),
        format!("set request {}: team", headers::OWNER),
        format!("set request {}: tok-1", headers::INTERNAL_TOKEN),
    ]);
    calls.extend(headers::CLIENT_KEYS.iter().map(|name| format!("remove request {name}")));
    assert_eq!(host.take_calls(), calls, "over max_request_body_bytes, and not JSON: not the filter's to refuse");
    assert_eq!(host.request_header("authorization"), None, "the key itself goes no further");

    // 200 MB in 1 MB pieces: each goes on as it comes, without a host call.
    for _ in 0..199 {
        assert_eq!(flow.on_request_body(&host, 1 << 20, false), Action::Continue);
    }
    assert_eq!(flow.on_request_body(&host, 1 << 20, true), Action::Continue);
    assert_eq!(flow.on_request_trailers(&host), Action::Continue);
    assert_eq!(host.take_calls(), Vec::<String>::new(), "the body is never read nor held");

    let content: &[u8] = b"{\"custom_id\":\"a\"}\n\xff\x00binary";
    let seen = answer(&host, &mut flow, 200, &[("content-type", "application/octet-stream")], &[content]);
    assert_eq!((seen.status, seen.body.as_slice()), (200, content));
}

#[test]
fn the_batch_services_errors_reach_the_client_as_they_were_written() {
    let errors: [(u16, Value); 3] = [
        (
            404,
            json!({"error": {"message": "No such File object: file-x", "type": "invalid_request_error", "param": "id", "code": null}}),
        ),
        (
            413,
            json!({"error": {"message": "File is larger than 209715200 bytes.", "type": "invalid_request_error", "param": "file", "code": "file_too_large"}}),
        ),
        (
            409,
            json!({"error": {"message": "Batch batch_1 is completed; it cannot be cancelled.", "type": "invalid_request_error", "param": null, "code": "batch_not_cancellable"}}),
        ),
    ];
    for (status, envelope) in errors {
        let (host, _worker, mut flow) = batch_gateway();
        host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
        let path = [(":method", "GET"), (":path", "/v1/files/file-x"), ("authorization", "Bearer sk-team")];
        assert_eq!(send(&host, &mut flow, &path, b""), Action::Continue);
        let body = envelope.to_string();
        let (head, tail) = body.as_bytes().split_at(10);
        let seen = answer(&host, &mut flow, status, &[("content-type", "application/json")], &[head, tail]);
        assert_eq!(seen.status, status);
        assert_eq!(seen.json(), envelope, "status, type, code and message kept");
    }
}

#[test]
fn the_batch_service_needs_a_key_as_any_endpoint_does() {
    let (host, _worker, mut flow) = batch_gateway();
    send(&host, &mut flow, &files_upload(&[("authorization", "Bearer sk-wrong")]), b"");
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (401, "invalid_api_key"));
    assert_eq!(host.request_header(headers::CLUSTER), None);

    // An open gateway: the owner is nobody in particular.
    let (host, _worker, mut flow) = configured(r#", "batches": {"cluster": "modelgate_admin"}"#);
    assert_eq!(send(&host, &mut flow, &[(":method", "GET"), (":path", "/v1/batches?limit=2")], b""), Action::Continue);
    assert_eq!(host.request_header(headers::CLUSTER).as_deref(), Some("modelgate_admin"));
    assert_eq!(host.request_header(headers::OWNER).as_deref(), Some(""));
    assert_eq!(host.request_header(headers::INTERNAL_TOKEN), None, "none is configured");
}

#[test]
fn without_the_right_token_the_internal_headers_are_dropped_and_the_key_authenticates_as_usual() {
    let (host, mut worker, mut flow) = batch_gateway();
    let forged = [(headers::INTERNAL_TOKEN, "tok-2"), (headers::ON_BEHALF_OF, "team")];
    send(&host, &mut flow, &chat_headers(&forged), CHAT);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (401, "invalid_api_key"), "no key was presented");

    let mut flow = worker.new_flow();
    send(&host, &mut flow, &chat_headers(&[forged[0], forged[1], ("authorization", "Bearer sk-team")]), CHAT);
    assert_eq!(
        (host.request_header(headers::INTERNAL_TOKEN), host.request_header(headers::ON_BEHALF_OF)),
        (None, None)
    );
    assert!(upstream(&host).is_some());
    answer(&host, &mut flow, 200, &[], &[b"{}"]);
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["key"], "team");
    assert_eq!(records[0].get("traffic"), None, "interactive, as every record before batches");
}

#[test]
fn on_behalf_of_a_key_its_limits_apply_and_its_records_say_batch() {
    let (host, mut worker, mut flow) = batch_gateway();
    let runner = [(headers::INTERNAL_TOKEN, "tok-1"), (headers::ON_BEHALF_OF, "team")];
    assert_eq!(send(&host, &mut flow, &chat_headers(&runner), CHAT), Action::Continue);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("cluster_a".into()));
    assert_eq!(
        (host.request_header(headers::ON_BEHALF_OF), host.request_header(headers::INTERNAL_TOKEN)),
        (None, None),
        "internal: the backend never sees them"
    );
    let admitted = answer(&host, &mut flow, 200, &[], &[br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#]);
    assert_eq!(admitted.header("x-ratelimit-remaining-requests"), Some("0"), "the key's limit counted it");

    let mut second = worker.new_flow();
    send(&host, &mut second, &chat_headers(&runner), CHAT);
    let refused = answer(&host, &mut second, 0, &[], &[]);
    assert_eq!((refused.status, refused.header("retry-after")), (429, Some("60")), "paced by the key's limit");

    let lines = sent_lines(&host, &mut worker);
    assert_eq!((lines[0]["key"].as_str(), lines[0]["traffic"].as_str()), (Some("team"), Some("batch")));
    assert_eq!(lines[0]["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2}));
    assert_eq!(lines[1]["refused"][0]["traffic"], "batch");
    assert_eq!(lines[1]["refused"][0]["status"], 429);

    let mut unknown = worker.new_flow();
    send(&host, &mut unknown, &chat_headers(&[runner[0], (headers::ON_BEHALF_OF, "ghost")]), CHAT);
    let seen = answer(&host, &mut unknown, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (401, "invalid_api_key"));
}

#[test]
fn on_behalf_of_a_key_its_model_allow_list_applies_to_models_and_to_lines() {
    let (host, worker, _) = configured_as(&format!(
        r#"{{"backends": {{"a": {{"cluster": "cluster_a"}}}}, "models": [{{"match": "*", "backend": "a"}}],
            "internal_token": "tok-1",
            "client_keys": [{{"name": "team", "sha256": "{TEAM_KEY}", "models": ["llama-*"]}}]}}"#
    ));
    let runner = |path: &'static str, method: &'static str| {
        vec![(":method", method), (":path", path), (headers::INTERNAL_TOKEN, "tok-1"), (headers::ON_BEHALF_OF, "team")]
    };
    let mut flow = worker.new_flow();
    send(&host, &mut flow, &runner("/v1/models/llama-3", "GET"), b"");
    assert_eq!(answer(&host, &mut flow, 0, &[], &[]).json()["id"], "llama-3");
    let mut flow = worker.new_flow();
    send(&host, &mut flow, &runner("/v1/models/qwen-2", "GET"), b"");
    assert_eq!(answer(&host, &mut flow, 0, &[], &[]).status, 404);
    let mut flow = worker.new_flow();
    send(&host, &mut flow, &runner("/v1/embeddings", "POST"), br#"{"model":"qwen-2","input":"a"}"#);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (404, "model_not_found"));
}

#[test]
fn a_clients_destination_endpoint_never_reaches_the_backend() {
    let pool = r#""backends": {"p": {"cluster": "vllm_pool", "pool": "vllm-pool"}},
                  "models": [{"match": "qwen3-8b", "backend": "p"}]"#;
    let (host, _worker, mut flow) = configured_as(&format!("{{{pool}}}"));
    let steered = [(headers::DESTINATION_ENDPOINT, "10.0.0.9:8000")];
    let body = br#"{"model":"qwen3-8b","messages":[]}"#;
    assert_eq!(send(&host, &mut flow, &chat_headers(&steered), body), Action::Continue);
    assert_eq!(host.request_header(headers::DESTINATION_ENDPOINT), None, "only ext-proc's picker sets it");
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("vllm_pool".into()));
    assert!(host.request_header(headers::BACKEND).is_some_and(|profile| profile.contains("vllm-pool")));
}

/// A gateway with a pool (`vp`, whose pattern `qwen3-8b*` routes adapters), an admin key and a plain one.
fn pool_gateway() -> (MockHost, Worker, Flow) {
    configured_as(&format!(
        r#"{{"backends": {{"pool": {{"cluster": "vllm_pool", "owned_by": "vllm", "pool": "vp"}}}},
            "models": [{{"match": "qwen3-8b", "backend": "pool"}}, {{"match": "qwen3-8b*", "backend": "pool"}}],
            "internal_token": "tok-1", "accounting": {{"cluster": "modelgate_admin"}},
            "pools": {{"cluster": "modelgate_admin"}},
            "client_keys": [{{"name": "ops", "admin": true, "sha256": "{TEAM_KEY}"}},
                            {{"name": "free", "sha256": "a97ffab5cd3331858e03076328705ababa22813218d8511eb09bbbce51d39ff8"}}]}}"#
    ))
}

fn lora_headers(authorization: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        (":method", "POST"),
        (":path", "/v1/load_lora_adapter"),
        ("content-type", "application/json"),
        ("authorization", authorization),
        (headers::CLUSTER, "elsewhere"),
    ]
}

#[test]
fn an_admins_lora_operation_goes_to_the_pools_service_with_the_token_and_anyone_elses_is_refused() {
    let (host, worker, mut flow) = pool_gateway();
    host.set_request(&lora_headers("Bearer sk-team"), b"");
    assert_eq!(flow.on_request_headers(&host, false), Action::Continue);
    assert_eq!(host.request_header(headers::CLUSTER).as_deref(), Some("modelgate_admin"));
    assert_eq!(host.request_header(headers::INTERNAL_TOKEN).as_deref(), Some("tok-1"));
    assert_eq!(host.request_header(headers::OWNER).as_deref(), Some("ops"));
    assert_eq!(host.request_header("authorization"), None, "the key itself goes no further");
    host.take_calls();
    let body = br#"{"lora_name":"sql","lora_path":"/adapters/sql"}"#;
    assert_eq!(flow.on_request_body(&host, body.len(), true), Action::Continue);
    assert_eq!(host.take_calls(), Vec::<String>::new(), "the body is the service's to read");
    let report = br#"{"object":"pool.lora_operation"}"#;
    assert_eq!(answer(&host, &mut flow, 200, &[], &[report]).status, 200);

    let mut plain = worker.new_flow();
    let seen = {
        send(&host, &mut plain, &lora_headers("Bearer sk-free"), br#"{"lora_name":"sql"}"#);
        answer(&host, &mut plain, 0, &[], &[])
    };
    assert_eq!((seen.status, seen.error()), (403, ("permission_error".into(), "admin_key_required".into())));
    assert_eq!(host.request_header(headers::CLUSTER), None, "nothing reaches the service");
}

/// Sends `GET path` with the admin key: held while ext-proc is asked which models pools serve.
fn ask_models(host: &MockHost, flow: &mut Flow, path: &'static str) {
    host.state.borrow_mut().dispatched.clear();
    let headers = [(":method", "GET"), (":path", path), ("authorization", "Bearer sk-team")];
    assert_eq!(send(host, flow, &headers, b""), Action::Pause);
    let asked = host.state.borrow().dispatched.clone();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].cluster, "modelgate_admin");
    for header in [(":method", "GET"), (":path", "/v1/pools/models"), (headers::INTERNAL_TOKEN, "tok-1")] {
        assert!(asked[0].headers.contains(&(header.0.into(), header.1.into())), "{header:?}");
    }
}

#[test]
fn models_merge_what_pools_discovered_and_fall_back_to_configuration() {
    let (host, worker, mut flow) = pool_gateway();
    ask_models(&host, &mut flow, "/v1/models");
    let discovered = br#"{"pools": {"vp": ["qwen3-8b", "qwen3-8b-sql"]}}"#;
    host.set_call_response(&[(":status", "200")], discovered);
    flow.on_call_answer(&host, 1, discovered.len());
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!(seen.status, 200);
    let ids: Vec<_> = seen.json()["data"].as_array().unwrap().iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, [json!("qwen3-8b"), json!("qwen3-8b-sql")]);
    assert_eq!(seen.json()["data"][1]["owned_by"], "vllm");

    let mut gone = worker.new_flow();
    ask_models(&host, &mut gone, "/v1/models/qwen3-8b-old");
    gone.on_call_answer(&host, 1, discovered.len());
    let seen = answer(&host, &mut gone, 0, &[], &[]);
    assert_eq!((seen.status, seen.error().1.as_str()), (404, "model_not_found"));

    // ext-proc did not answer (the call timed out): the configured list alone.
    let mut unanswered = worker.new_flow();
    ask_models(&host, &mut unanswered, "/v1/models");
    host.state.borrow_mut().errors.clear();
    unanswered.on_call_answer(&host, 0, 0);
    let seen = answer(&host, &mut unanswered, 0, &[], &[]);
    assert_eq!(seen.json()["data"].as_array().unwrap().len(), 1);
    assert_eq!(host.state.borrow().errors.len(), 1, "logged");

    // Envoy would not even send the call.
    host.state.borrow_mut().dispatch_refused = true;
    let mut refused = worker.new_flow();
    let headers = [(":method", "GET"), (":path", "/v1/models"), ("authorization", "Bearer sk-team")];
    send(&host, &mut refused, &headers, b"");
    assert_eq!(answer(&host, &mut refused, 0, &[], &[]).json()["data"][0]["id"], "qwen3-8b");
}

#[test]
fn tokenize_is_routed_by_model_and_its_answer_is_not_read_for_usage() {
    let (host, mut worker, mut flow) = pool_gateway();
    let headers = [
        (":method", "POST"),
        (":path", "/tokenize"),
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-free"),
        ("accept-encoding", "gzip"),
    ];
    assert_eq!(send(&host, &mut flow, &headers, br#"{"model":"qwen3-8b","prompt":"hi"}"#), Action::Continue);
    assert_eq!(upstream(&host).map(|(cluster, _)| cluster), Some("vllm_pool".into()));
    assert_eq!(host.request_header("accept-encoding").as_deref(), Some("gzip"), "no usage to read from it");
    let tokens: &[u8] = br#"{"count":1,"max_model_len":32768,"tokens":[6023]}"#;
    let seen = answer(&host, &mut flow, 200, &[("content-type", "application/json")], &[tokens]);
    assert_eq!(seen.body, tokens);
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records.len(), 1, "the request is recorded");
    assert_eq!(records[0]["usage"], Value::Null, "with no usage");
}

/// A gateway with keys, accounting and a stream guard, whose models reach an
/// OpenAI pool, one serving the Responses API itself, Ollama, Anthropic, and a chain.
fn client_api_gateway() -> (MockHost, Worker, Flow) {
    configured_as(&format!(
        r#"{{"stream_guard_cluster": "guard", "accounting": {{"cluster": "admin"}},
            "backends": {{"pool": {{"cluster": "pool"}}, "vllm": {{"cluster": "vllm", "serves_responses": true}},
                         "ollama": {{"cluster": "ollama", "dialect": "ollama"}},
                         "claude": {{"cluster": "claude", "dialect": "anthropic", "api_key": {{"env": "K"}}}}}},
            "models": [{{"match": "qwen", "backend": "pool"}}, {{"match": "llama", "backend": "vllm"}},
                       {{"match": "gemma", "backend": "ollama"}}, {{"match": "claude", "backend": "claude"}},
                       {{"match": "chained", "backend": "pool", "fallbacks": [{{"backend": "claude"}}]}}]
            {}}}"#,
        keyed("{}", "")
    ))
}

#[test]
fn a_whole_answer_ext_proc_translates_is_held_until_its_body_comes_and_a_stream_is_not() {
    let (host, _worker, mut flow) = client_api_gateway();
    let chat = api_request("/v1/chat/completions", BEARER);
    send(&host, &mut flow, &chat, br#"{"model":"claude","messages":[]}"#);
    assert_eq!(host.request_header(headers::WHOLE_ANSWER).as_deref(), Some("1"), "ext_proc is told");
    host.set_response(&[(":status", "200"), ("content-type", "application/json")], b"");
    assert_eq!(flow.on_response_headers(&host, false), Action::Pause, "ext_proc does not hold them");
    let translated: &[u8] =
        br#"{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
    host.state.borrow_mut().response_body = translated.to_vec();
    assert_eq!(flow.on_response_body(&host, translated.len(), true), Action::Continue);

    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &chat, br#"{"model":"claude","messages":[],"stream":true}"#);
    assert_eq!(host.request_header(headers::WHOLE_ANSWER), None, "the stream guard translates streams");
    host.set_response(&[(":status", "200"), ("content-type", "text/event-stream")], b"");
    assert_eq!(flow.on_response_headers(&host, false), Action::Continue);

    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &chat, br#"{"model":"qwen","messages":[]}"#);
    assert_eq!(host.request_header(headers::WHOLE_ANSWER), None, "nothing to translate");
    host.set_response(&[(":status", "200"), ("content-type", "application/json")], b"");
    assert_eq!(flow.on_response_headers(&host, false), Action::Continue);
}

fn api_request(path: &'static str, key: (&'static str, &'static str)) -> Vec<(&'static str, &'static str)> {
    vec![(":method", "POST"), (":path", path), ("content-type", "application/json"), ("x-request-id", "req-1"), key]
}

const ANTHROPIC_KEY: (&str, &str) = ("x-api-key", "sk-team");
const BEARER: (&str, &str) = ("authorization", "Bearer sk-team");

/// What ext_proc, the stream guard and the backend are told of a request.
fn routed(host: &MockHost) -> [Option<String>; 5] {
    [headers::CLUSTER, headers::BACKEND, headers::STREAM_BACKEND, headers::OWNER, headers::CHAIN]
        .map(|name| host.request_header(name))
}

#[test]
fn messages_reach_every_backend_and_only_anthropic_serves_them_itself() {
    let anthropic_profile = r#"{"dialect":"anthropic","api_key":{"env":"K"}}"#.to_string();
    for (body, expected) in [
        // Translated by ext_proc, with no profile to speak: the pool speaks chat completions.
        (r#"{"model":"qwen","max_tokens":5,"messages":[]}"#, ["pool", "{}", "", "", ""]),
        // Translated, then the stream guard speaks Ollama's dialect.
        (
            r#"{"model":"gemma","max_tokens":5,"stream":true,"messages":[]}"#,
            ["guard", "{}", r#"{"dialect":"ollama"}"#, "", ""],
        ),
        // Anthropic's own: its dialect's translation only (key), as before.
        (r#"{"model":"claude","max_tokens":5,"messages":[]}"#, ["claude", &anthropic_profile, "", "", ""]),
        // A chain's members differ: translated into chat completions for each.
        (r#"{"model":"chained","max_tokens":5,"messages":[]}"#, ["guard", "{}", "", "", "chain"]),
    ] {
        let (host, _worker, mut flow) = client_api_gateway();
        assert_eq!(
            send(&host, &mut flow, &api_request("/v1/messages", ANTHROPIC_KEY), body.as_bytes()),
            Action::Continue
        );
        let [cluster, backend, stream_backend, owner, chain] = routed(&host);
        let seen = [cluster, backend, stream_backend, owner, chain.map(|_| "chain".to_string())]
            .map(Option::unwrap_or_default);
        assert_eq!(seen, expected, "{body}");
        assert_eq!(host.state.borrow().request_body, body.as_bytes(), "no stream_options asked for: {body}");
        assert_eq!(host.request_header("x-api-key"), None, "the client's key goes no further");
    }
}

#[test]
fn responses_are_translated_and_owned_by_the_key_unless_the_backend_serves_them() {
    let (host, _worker, mut flow) = client_api_gateway();
    let body = br#"{"model":"qwen","input":"hi","stream":true}"#;
    assert_eq!(send(&host, &mut flow, &api_request("/v1/responses", BEARER), body), Action::Continue);
    let owned = [Some("guard".to_string()), Some("{}".into()), None, Some("team".into()), None];
    assert_eq!(routed(&host), owned);
    assert_eq!(host.state.borrow().request_body, body, "the chat completion ext_proc makes asks for usage");

    let (host, _worker, mut flow) = client_api_gateway();
    let body = br#"{"model":"llama","input":"hi","stream":true}"#;
    assert_eq!(send(&host, &mut flow, &api_request("/v1/responses", BEARER), body), Action::Continue);
    assert_eq!(routed(&host), [Some("guard".to_string()), None, None, None, None], "passed through as it is");
    assert_eq!(host.state.borrow().request_body, body);
}

#[test]
fn on_anthropics_api_the_filters_refusals_are_anthropics_envelope() {
    let error_of = |seen: &Seen| {
        let body = seen.json();
        assert_eq!(body["type"], "error", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        (seen.status, body["error"]["type"].as_str().unwrap().to_string())
    };
    let body = br#"{"model":"qwen","max_tokens":5,"messages":[]}"#;
    for (headers, body, expected) in [
        (api_request("/v1/messages", ("x-api-key", "sk-wrong")), &body[..], (401, "authentication_error")),
        (api_request("/v1/messages", ("x-other", "")), body, (401, "authentication_error")),
        (api_request("/v1/messages", ANTHROPIC_KEY), br#"{"model":"gpt-9","max_tokens":5}"#, (404, "not_found_error")),
        (api_request("/v1/messages/count_tokens", ANTHROPIC_KEY), b"{", (400, "invalid_request_error")),
        (vec![(":method", "GET"), (":path", "/v1/messages"), ANTHROPIC_KEY], b"", (405, "invalid_request_error")),
    ] {
        let (host, _worker, mut flow) = client_api_gateway();
        send(&host, &mut flow, &headers, body);
        let seen = answer(&host, &mut flow, 0, &[], &[]);
        assert_eq!(error_of(&seen), (expected.0, expected.1.to_string()), "{headers:?}");
        assert_eq!(seen.header("content-type"), Some("application/json"));
    }
    // The same refusal on OpenAI's API is as it was.
    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &api_request("/v1/responses", BEARER), br#"{"model":"gpt-9"}"#);
    let seen = answer(&host, &mut flow, 0, &[], &[]);
    assert_eq!((seen.status, seen.error()), (404, ("invalid_request_error".into(), "model_not_found".into())));
}

#[test]
fn on_anthropics_api_error_answers_become_anthropics_envelope_and_its_own_stay() {
    let body = br#"{"model":"qwen","max_tokens":5,"messages":[]}"#;
    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &api_request("/v1/messages", ANTHROPIC_KEY), body);
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    let backend = [("content-type", "text/html")];
    let seen = answer(&host, &mut flow, 502, &backend, &[b"<html><title>Bad Gateway</title></html>"]);
    assert_eq!(seen.status, 502);
    assert_eq!(
        seen.json(),
        json!({"type": "error", "error": {"type": "api_error",
               "message": "The backend answered HTTP 502 with an HTML page: Bad Gateway"}})
    );

    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &api_request("/v1/messages", ANTHROPIC_KEY), body);
    host.state.borrow_mut().properties.insert("response.code_details".into(), b"no_healthy_upstream".to_vec());
    let seen = answer(&host, &mut flow, 503, &[], &[]);
    assert_eq!((seen.status, seen.json()["error"]["type"].as_str()), (503, Some("api_error")));
    assert_eq!(seen.header("x-should-retry"), Some("true"));

    let (host, _worker, mut flow) = client_api_gateway();
    send(&host, &mut flow, &api_request("/v1/messages", ANTHROPIC_KEY), br#"{"model":"claude","max_tokens":5}"#);
    let overloaded: &[u8] = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let seen = answer(&host, &mut flow, 529, &[("content-type", "application/json")], &[overloaded]);
    assert_eq!((seen.status, seen.body.as_slice()), (529, overloaded), "Anthropic's own answer stays");
}

#[test]
fn messages_and_responses_count_as_completions_and_count_tokens_as_a_request_without_tokens() {
    let (host, mut worker, mut flow) = client_api_gateway();
    let body = br#"{"model":"claude","max_tokens":5,"stream":true,"messages":[]}"#;
    send(&host, &mut flow, &api_request("/v1/messages", ANTHROPIC_KEY), body);
    let stream: [&[u8]; 3] = [
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
        b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2}}\n\n",
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];
    let seen = answer(&host, &mut flow, 200, &[("content-type", "text/event-stream")], &stream);
    assert_eq!(seen.body, stream.concat(), "passed as it came");
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2}));

    let mut responses = worker.new_flow();
    send(&host, &mut responses, &api_request("/v1/responses", BEARER), br#"{"model":"qwen","input":"hi"}"#);
    let completed =
        br#"{"id":"resp_1","object":"response","usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}"#;
    answer(&host, &mut responses, 200, &[("content-type", "application/json")], &[completed]);
    let mut counted = worker.new_flow();
    send(
        &host,
        &mut counted,
        &api_request("/v1/messages/count_tokens", ANTHROPIC_KEY),
        br#"{"model":"qwen","messages":[]}"#,
    );
    answer(&host, &mut counted, 200, &[("content-type", "application/json")], &[br#"{"input_tokens":4}"#]);
    let records = sent_lines(&host, &mut worker);
    assert_eq!(records[0]["usage"], json!({"prompt_tokens": 4, "completion_tokens": 6}));
    assert_eq!((records[1]["status"].as_u64(), &records[1]["usage"]), (Some(200), &Value::Null));
}

mod count;
mod gate;
