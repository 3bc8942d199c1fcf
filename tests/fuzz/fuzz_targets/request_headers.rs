//! The filter's decision on a request's headers alone: method, path (with
//! the model id of `GET /v1/models/{id}` percent-decoded), content-type,
//! content-length, the client's key and a key named on its behalf, on an open
//! gateway and on a keyed one that serves the Files and Batch APIs.
//!
//! Invariants: only model-routed POSTs read a body; only the keyed gateway
//! sends `/v1/files…` and `/v1/batches…` to its batch service, and only with
//! a known caller; every answer the filter gives is JSON, an error exactly
//! OpenAI's envelope with a 4xx; a keyed gateway answers nothing but a 401 to
//! a caller without its key, and lists only the models the key may use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_filter::request::{on_request_headers, HeadersVerdict, RequestHead};
use modelgate_fuzz::assert_envelope;
use modelgate_proto::keys::Presented;
use modelgate_proto::routing::Router;

thread_local! {
    static OPEN: Router = Router::from_json(
        br#"{"max_request_body_bytes": 1000,
            "backends": {"a": {"cluster": "ca"}, "b": {"cluster": "cb"}},
            "models": [{"match": "llama-*", "backend": "a"}, {"match": "gpt-4o", "backend": "b", "rename": "qwen"}],
            "pools": {"cluster": "admin"}}"#,
    ).expect("a valid configuration");
    // The key `sk-team` may use llama-* only.
    static KEYED: Router = Router::from_json(
        br#"{"backends": {"a": {"cluster": "ca"}, "b": {"cluster": "cb"}},
            "models": [{"match": "llama-*", "backend": "a"}, {"match": "gpt-4o", "backend": "b"}],
            "batches": {"cluster": "admin"},
            "client_keys": [{"name": "team", "models": ["llama-*"],
                             "sha256": "3fc923743166bae134970eb2789df5145d8b8041e050acf18067986818f41d13"}]}"#,
    ).expect("a valid configuration");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let mut fields = data.split(|&b| b == 0);
    let mut next = || fields.next();
    let (Ok(method), Ok(path)) =
        (std::str::from_utf8(next().unwrap_or(b"POST")), std::str::from_utf8(next().unwrap_or_default()))
    else {
        return;
    };
    let head = RequestHead {
        method,
        path,
        content_type: next().filter(|_| mode & 1 != 0),
        content_length: next().filter(|_| mode & 2 != 0),
        end_of_stream: mode & 4 != 0,
        presented: Presented {
            authorization: next().filter(|_| mode & 8 != 0),
            api_key: next().filter(|_| mode & 16 != 0),
        },
        on_behalf_of: next().filter(|_| mode & 64 != 0),
    };
    let keyed = mode & 32 != 0;
    let verdict =
        if keyed { KEYED.with(|r| on_request_headers(r, head)) } else { OPEN.with(|r| on_request_headers(r, head)) };
    let path_only = path.split('?').next().unwrap_or_default();
    let model_routed =
        ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"].contains(&path_only);
    // Only the open gateway serves pools: every caller may, as no keys are configured.
    let pool_operation = !keyed && ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"].contains(&path_only);
    let under = |base: &str| path_only == base || path_only.starts_with(&format!("{base}/"));
    let served_batches = keyed && (under("/v1/files") || under("/v1/batches"));
    let api_path = model_routed || under("/v1/models") || served_batches || pool_operation;
    match verdict {
        HeadersVerdict::PassThrough => assert!(!api_path, "{method} {path} is the filter's"),
        HeadersVerdict::ReadBody(..) => assert!(model_routed && method == "POST", "read the body of {method} {path}"),
        HeadersVerdict::BatchService(caller) => {
            assert!(served_batches && caller.is_some(), "{method} {path} sent to the batch service as {caller:?}")
        }
        HeadersVerdict::PoolOperation(caller) => {
            assert!(pool_operation && method == "POST" && caller.is_none(), "{method} {path} sent to the pools service")
        }
        HeadersVerdict::AskPoolModels(_) => {
            assert!(!keyed && under("/v1/models") && method == "GET", "{method} {path} waits for discovered models")
        }
        HeadersVerdict::Respond(reply) => {
            assert!(api_path, "answered {method} {path}, which is not the filter's");
            assert!(!served_batches || reply.status == 401, "the batch service answers {method} {path} itself");
            if reply.status == 200 {
                let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("an answer is JSON");
                if keyed {
                    let listed = body["data"].as_array().map_or_else(|| vec![&body], |d| d.iter().collect());
                    for model in listed {
                        let id = model["id"].as_str().expect("a model id");
                        assert!(id.starts_with("llama-"), "the key may not see {id}");
                    }
                }
            } else {
                assert!((400..500).contains(&reply.status), "{}", reply.status);
                assert_envelope(&reply.body);
            }
        }
    }
});
