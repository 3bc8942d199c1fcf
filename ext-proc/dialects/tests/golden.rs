//! Golden tests: every translation as data, read from the files under
//! `tests/golden/` (see its README). `UPDATE_GOLDEN=1 cargo test --test golden`
//! rewrites the expected files from what the code does now; review the diff.

use modelgate_dialects::call::BackendCall;
use modelgate_dialects::credentials::KeySources;
use modelgate_proto::backend::{ApiKey, BackendProfile, Dialect};
use modelgate_proto::framing::DEFAULT_MAX_EVENT_BYTES;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Dialects by the name their files carry.
type Dialects = &'static [(&'static str, Dialect)];

/// The dialects that translate OpenAI's chat completions, completions and
/// embeddings, by the name their files carry.
const TRANSLATING: Dialects = &[("anthropic", Dialect::Anthropic), ("ollama", Dialect::Ollama)];

/// Every dialect: a client API the backend does not serve is translated for OpenAI backends too.
const EVERY: Dialects = &[("openai", Dialect::Openai), ("anthropic", Dialect::Anthropic), ("ollama", Dialect::Ollama)];

/// The endpoint of each folder, and the dialects with golden files for it.
const ENDPOINTS: [(&str, &str, Dialects); 6] = [
    ("chat", "/v1/chat/completions", TRANSLATING),
    ("completions", "/v1/completions", TRANSLATING),
    ("embeddings", "/v1/embeddings", TRANSLATING),
    ("responses", "/v1/responses", EVERY),
    ("messages", "/v1/messages", EVERY),
    ("count_tokens", "/v1/messages/count_tokens", EVERY),
];

/// The client's key, passed through so the files show how each dialect sends a key.
const CLIENT_KEY: &[u8] = b"Bearer sk-client";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn call(dialect: Dialect, path: &str) -> Result<BackendCall, modelgate_proto::error::GatewayError> {
    let profile = BackendProfile { dialect, api_key: Some(ApiKey::Passthrough), ..Default::default() };
    BackendCall::for_profile(profile, path.as_bytes(), Some(CLIENT_KEY), &KeySources::default())
}

fn error_json(e: &modelgate_proto::error::GatewayError) -> Value {
    json!({"status": e.status, "error": serde_json::from_slice::<Value>(&e.to_json()).unwrap()["error"]})
}

/// The backend's request for an OpenAI request, or the client's error, as JSON.
fn backend_request(dialect: Dialect, path: &str, body: &[u8]) -> Value {
    let upstream = call(dialect, path).and_then(|mut call| call.request(body));
    match upstream {
        Ok(upstream) if upstream.answer.is_some() => {
            json!({"answered": serde_json::from_slice::<Value>(&upstream.answer.unwrap()).unwrap()})
        }
        Ok(upstream) => {
            let set: serde_json::Map<String, Value> =
                upstream.headers.set.iter().map(|(name, value)| (name.to_string(), json!(value))).collect();
            let body = upstream.body.map(|b| serde_json::from_slice::<Value>(&b).unwrap());
            json!({"headers": {"set": set, "remove": upstream.headers.remove}, "body": body})
        }
        Err(e) => error_json(&e),
    }
}

/// The client's answer for a backend's answer with `status`: its status and
/// content-type on the first line, a blank line, then the body (JSON pretty-printed).
fn client_answer(dialect: Dialect, path: &str, request: &[u8], status: u16, content_type: &str, body: &[u8]) -> String {
    let mut call = call(dialect, path).unwrap();
    call.request(request).unwrap();
    let mut translation = call.response_translator(DEFAULT_MAX_EVENT_BYTES).expect("a translated dialect");
    let plan = translation.plan(status, content_type.as_bytes());
    let out = if plan.streamed {
        translation.stream(body, true)
    } else {
        let whole = translation.whole(status, body);
        match serde_json::from_slice::<Value>(&whole) {
            Ok(json) => pretty(&json).into_bytes(),
            Err(_) => whole,
        }
    };
    let head = format!("{} {}", plan.status, plan.content_type.unwrap_or("(as the backend's)"));
    normalise(&format!("{head}\n\n{}", String::from_utf8_lossy(&out)))
}

/// Seconds that change from run to run.
const TIMES: [&str; 2] = ["\"created\":", "\"created_at\":"];

/// The prefixes of ids the gateway makes up: `chatcmpl-<hex>`, `cmpl-<hex>`,
/// and the Responses and Messages APIs' `resp_`, `msg_`, `fc_` and `rs_` ids.
const MADE_UP_IDS: [&str; 5] = ["cmpl-", "resp_", "msg_", "fc_", "rs_"];

/// The fewest hex digits of a made-up id.
const MADE_UP_ID_DIGITS: usize = 12;

/// The output with what changes from run to run fixed: seconds, and made-up ids.
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = TIMES.iter().chain(&MADE_UP_IDS).filter_map(|m| rest.find(m).map(|i| (i, *m))).min() {
        let (i, marker) = at;
        out.push_str(&rest[..i + marker.len()]);
        rest = &rest[i + marker.len()..];
        let (digits, placeholder): (fn(char) -> bool, &str) = if MADE_UP_IDS.contains(&marker) {
            (|c: char| c.is_ascii_hexdigit(), "ID")
        } else {
            (|c: char| c.is_ascii_digit(), "0")
        };
        let spaces = rest.len() - rest.trim_start_matches(' ').len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let end = rest.find(|c: char| !digits(c)).unwrap_or(rest.len());
        // Made-up ids are long; a short one (`msg_05`) is a backend's, kept as it is.
        let least = if MADE_UP_IDS.contains(&marker) { MADE_UP_ID_DIGITS } else { 1 };
        if end >= least {
            out.push_str(placeholder);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// Compares `actual` with the file at `expected`, or writes it there when updating.
fn check(expected: &Path, actual: &str, failures: &mut Vec<String>) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(expected, actual).unwrap();
        return;
    }
    match std::fs::read_to_string(expected) {
        Ok(want) if want == actual => {}
        Ok(want) => failures.push(format!("{}:\n--- expected\n{want}\n--- actual\n{actual}", expected.display())),
        Err(_) => failures.push(format!("{} is missing (UPDATE_GOLDEN=1 writes it):\n{actual}", expected.display())),
    }
}

/// The files in `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap() + "\n"
}

/// `requests/<endpoint>/<case>.json` is a client's request; beside it,
/// `<case>.<dialect>.json` is what each dialect's backend gets (or the error the client gets).
#[test]
fn requests() {
    let mut failures = Vec::new();
    let mut cases = 0;
    for (folder, path, dialects) in ENDPOINTS {
        for file in files(&root().join("requests").join(folder)) {
            let name = file.file_name().unwrap().to_str().unwrap();
            let Some(case) = name.strip_suffix(".json").filter(|c| !c.contains('.')) else { continue };
            let body = std::fs::read(&file).unwrap();
            cases += 1;
            for &(dialect_name, dialect) in dialects {
                let expected = file.with_file_name(format!("{case}.{dialect_name}.json"));
                check(&expected, &pretty(&backend_request(dialect, path, &body)), &mut failures);
            }
        }
    }
    assert!(cases > 0, "no request cases found");
    assert!(failures.is_empty(), "{} golden mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// `answers/<endpoint>/<case>/` holds the client's `request.json` and, per
/// dialect, a backend answer `<dialect>.<status>.<json|sse|ndjson>`; beside
/// each, `<that name>.expected` is what the client gets.
#[test]
fn answers() {
    let mut failures = Vec::new();
    let mut cases = 0;
    for (folder, path, dialects) in ENDPOINTS {
        for case in files(&root().join("answers").join(folder)) {
            let request = std::fs::read(case.join("request.json")).unwrap();
            for file in files(&case) {
                let name = file.file_name().unwrap().to_str().unwrap().to_string();
                let parts: Vec<&str> = name.split('.').collect();
                let [dialect_name, status, extension] = parts[..] else { continue };
                let Some((_, dialect)) = dialects.iter().find(|(n, _)| *n == dialect_name) else { continue };
                let status: u16 = status.parse().unwrap();
                let content_type = match extension {
                    "sse" => "text/event-stream",
                    "ndjson" => "application/x-ndjson",
                    "json" => "application/json",
                    _ => "text/html",
                };
                cases += 1;
                let body = std::fs::read(&file).unwrap();
                let actual = client_answer(*dialect, path, &request, status, content_type, &body);
                check(&file.with_file_name(format!("{name}.expected")), &actual, &mut failures);
            }
        }
    }
    assert!(cases > 0, "no answer cases found");
    assert!(failures.is_empty(), "{} golden mismatches:\n{}", failures.len(), failures.join("\n"));
}
