use super::*;
use proptest::prelude::*;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

fn sse(events: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        write_data(&mut out, event.to_string().as_bytes());
    }
    write_data(&mut out, b"[DONE]");
    out
}

/// The data of each event of `stream`, JSON but for `[DONE]`.
fn events(stream: &[u8]) -> Vec<Value> {
    event_data(stream)
        .into_iter()
        .map(|data| if data == b"[DONE]" { "[DONE]".into() } else { serde_json::from_slice(&data).unwrap() })
        .collect()
}

#[test]
fn the_cache_keeps_chat_completions_and_embeddings_only() {
    for path in [CHAT, COMPLETIONS, EMBEDDINGS, "/v1/chat/completions?x=1"] {
        assert!(cacheable_path(path), "{path}");
    }
    for path in ["/v1/responses", "/v1/messages", "/v1/models", "/tokenize", "/v1/chat/completions/", ""] {
        assert!(!cacheable_path(path), "{path}");
    }
}

#[test]
fn deterministic_requests_are_those_at_temperature_zero_or_seeded_and_embeddings() {
    for body in [json!({"temperature": 0}), json!({"temperature": 0.0}), json!({"seed": 7}), json!({"seed": -1.5})] {
        assert!(is_deterministic(CHAT, &body), "{body}");
    }
    for body in [
        json!({}),
        json!({"temperature": 0.2}),
        json!({"temperature": "0"}),
        json!({"seed": null}),
        json!({"seed": "7"}),
        json!([]),
    ] {
        assert!(!is_deterministic(CHAT, &body), "{body}");
        assert!(!is_deterministic(COMPLETIONS, &body), "{body}");
        assert!(is_deterministic(EMBEDDINGS, &body), "nothing is sampled: {body}");
    }
}

#[test]
fn stream_and_usage_are_what_the_client_asked_for() {
    assert_eq!(stream_asked(&json!({"stream": true})), (true, false));
    assert_eq!(stream_asked(&json!({"stream": true, "stream_options": {"include_usage": true}})), (true, true));
    assert_eq!(stream_asked(&json!({"stream": false, "stream_options": {"include_usage": true}})), (false, false));
    assert_eq!(stream_asked(&json!({"stream": "true"})), (false, false));
    assert_eq!(stream_asked(&json!(null)), (false, false));
}

#[test]
fn the_cache_key_is_the_meaning_partitioned_by_owner() {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0});
    let key = cache_key("alice", CHAT, "m", &body);
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    let reordered: Value = serde_json::from_str(
        r#"{ "temperature" : 0, "stream": true, "stream_options": {"include_usage": true},
             "messages": [ { "content": "hi", "role": "user" } ], "user": "u-1", "metadata": {"a": "b"}, "model": "m" }"#,
    )
    .unwrap();
    assert_eq!(cache_key("alice", CHAT, "m", &reordered), key);
    for (partition, path, model, other) in [
        ("bob", CHAT, "m", body.clone()),
        ("*", CHAT, "m", body.clone()),
        ("alice", COMPLETIONS, "m", body.clone()),
        ("alice", CHAT, "m2", body.clone()),
        ("alice", CHAT, "m", json!({"model": "m", "messages": [{"role": "user", "content": "hi!"}], "temperature": 0})),
        (
            "alice",
            CHAT,
            "m",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0}),
        ),
        // A nested `user` is meaning, not a top-level annotation.
        (
            "alice",
            CHAT,
            "m",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi", "user": "x"}], "temperature": 0}),
        ),
    ] {
        assert_ne!(cache_key(partition, path, model, &other), key, "{partition} {path} {model} {other}");
    }
    // Parts are told apart by their lengths, not by where one ends.
    assert_ne!(cache_key("ab", "c", "m", &body), cache_key("a", "bc", "m", &body));
}

#[test]
fn a_local_copy_is_keyed_by_the_exact_bytes_and_the_partition() {
    let body = br#"{"model":"m","messages":[],"temperature":0}"#;
    let key = local_key(&partition(false, "alice"), CHAT, "m", body);
    assert_eq!(key.len(), 64);
    assert_eq!(local_key(&partition(false, "alice"), CHAT, "m", body), key);
    for other in [
        local_key(&partition(false, "bob"), CHAT, "m", body),
        local_key(&partition(true, "alice"), CHAT, "m", body),
        local_key(&partition(false, "alice"), COMPLETIONS, "m", body),
        local_key(&partition(false, "alice"), CHAT, "m2", body),
        // The same meaning in other bytes is another copy (ext-proc's key finds it).
        local_key(&partition(false, "alice"), CHAT, "m", br#"{"temperature":0,"model":"m","messages":[]}"#),
    ] {
        assert_ne!(other, key);
    }
    // No key's name is the shared partition.
    assert_ne!(partition(false, "shared"), partition(true, ""));
    assert_ne!(local_key("ab", "c", "m", body), local_key("a", "bc", "m", body));
}

#[test]
fn the_request_digest_compares_the_whole_body() {
    let body = json!({"model": "m", "input": "x"});
    let digest = request_digest(EMBEDDINGS, "m", &body);
    assert_eq!(
        digest,
        request_digest(EMBEDDINGS, "m", &serde_json::from_str(r#"{"input":"x", "model":"m"}"#).unwrap())
    );
    assert_ne!(digest, request_digest(EMBEDDINGS, "m", &json!({"model": "m", "input": "x", "user": "u"})));
    assert_ne!(digest, request_digest(CHAT, "m", &body));
    assert_ne!(digest, cache_key("", EMBEDDINGS, "m", &body), "a digest is no cache key");
}

fn chunk(choices: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
           "system_fingerprint": "fp_1", "choices": choices, "usage": null, "obfuscation": "xYz"})
}

/// A stream as OpenAI sends it: the role, content in pieces, two tool calls
/// cut into pieces, the finish, the usage chunk.
fn openai_stream() -> Vec<u8> {
    sse(&[
        chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"content": "Hel"}, "logprobs": {"content": [{"token": "Hel", "logprob": -0.1}], "refusal": null}, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"content": "lo"}, "logprobs": {"content": [{"token": "lo", "logprob": -0.2}], "refusal": null}, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "look", "arguments": ""}}]}, "logprobs": null, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "find", "arguments": "{\"q\""}}]}, "logprobs": null, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"zoom\":"}}]}, "logprobs": null, "finish_reason": null}]),
        ),
        chunk(
            json!([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}, {"index": 1, "function": {"arguments": ":1}"}}]}, "logprobs": null, "finish_reason": null}]),
        ),
        chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}])),
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
               "system_fingerprint": "fp_1", "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 0}}}),
    ])
}

fn openai_whole() -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o",
           "system_fingerprint": "fp_1",
           "choices": [{"index": 0, "finish_reason": "tool_calls",
               "message": {"role": "assistant", "content": "Hello", "refusal": null, "tool_calls": [
                   {"id": "call_a", "type": "function", "function": {"name": "look", "arguments": "{\"zoom\":2}"}},
                   {"id": "call_b", "type": "function", "function": {"name": "find", "arguments": "{\"q\":1}"}}]},
               "logprobs": {"content": [{"token": "Hel", "logprob": -0.1}, {"token": "lo", "logprob": -0.2}], "refusal": null}}],
           "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 0}}})
}

#[test]
fn a_chat_stream_is_assembled_into_its_completion() {
    assert_eq!(whole_answer(CHAT, true, &openai_stream(), None), Some(openai_whole()));
    // Whatever the line ends.
    let crlf = String::from_utf8(openai_stream()).unwrap().replace('\n', "\r\n");
    assert_eq!(whole_answer(CHAT, true, crlf.as_bytes(), None), Some(openai_whole()));
}

#[test]
fn choices_are_assembled_by_index_with_what_the_backend_adds() {
    let stream = sse(&[
        chunk(json!([{"index": 1, "delta": {"role": "assistant", "reasoning_content": "Think"}},
                     {"index": 0, "delta": {"role": "assistant", "content": "A"}}])),
        chunk(json!([{"index": 1, "delta": {"reasoning_content": "ing", "content": "B"}}])),
        chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": null}])),
        chunk(json!([{"index": 1, "delta": {"refusal": "No"}, "finish_reason": "length", "stop_reason": 7}])),
    ]);
    let whole = whole_answer(CHAT, true, &stream, Some(&Usage { prompt_tokens: 3, completion_tokens: 4 })).unwrap();
    assert_eq!(
        whole["choices"],
        json!([
            {"index": 0, "finish_reason": "stop", "logprobs": null,
             "message": {"role": "assistant", "content": "A", "refusal": null}},
            {"index": 1, "finish_reason": "length", "logprobs": null, "stop_reason": 7,
             "message": {"role": "assistant", "content": "B", "refusal": "No", "reasoning_content": "Thinking"}},
        ])
    );
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        "the usage the filter read"
    );
    assert!(whole.get("obfuscation").is_none(), "the stream's padding is no part of the answer");
}

#[test]
fn a_completions_stream_is_assembled_into_a_text_completion() {
    let piece = |text: &str, finish: Value| {
        json!({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
    };
    let stream = sse(&[piece("Once", Value::Null), piece(" upon", Value::Null), piece("", "length".into())]);
    assert_eq!(
        whole_answer(COMPLETIONS, true, &stream, None),
        Some(json!({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
                    "choices": [{"index": 0, "text": "Once upon", "logprobs": null, "finish_reason": "length"}]}))
    );
    assert_eq!(whole_answer(CHAT, true, &stream, None), None, "a completion's chunks are no chat stream");
}

#[test]
fn whole_answers_are_kept_as_they_came_with_the_usage_read_where_they_lack_it() {
    let whole = openai_whole();
    let bytes = serde_json::to_vec(&whole).unwrap();
    assert_eq!(
        whole_answer(CHAT, false, &bytes, Some(&Usage { prompt_tokens: 1, completion_tokens: 1 })),
        Some(whole.clone())
    );
    let mut without = whole.clone();
    without.as_object_mut().unwrap().remove("usage");
    let read = whole_answer(
        CHAT,
        false,
        &serde_json::to_vec(&without).unwrap(),
        Some(&Usage { prompt_tokens: 1, completion_tokens: 2 }),
    );
    assert_eq!(read.unwrap()["usage"], json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}));
    let embeddings = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}],
                            "model": "e", "usage": {"prompt_tokens": 2, "total_tokens": 2}});
    let bytes = serde_json::to_vec(&embeddings).unwrap();
    assert_eq!(whole_answer(EMBEDDINGS, false, &bytes, None), Some(embeddings.clone()));
    assert_eq!(whole_answer(EMBEDDINGS, true, &bytes, None), None);
    assert_eq!(whole_answer(CHAT, false, &bytes, None), None, "not a chat completion");
    assert_eq!(whole_answer("/v1/responses", false, &bytes, None), None);
}

#[test]
fn errors_and_answers_cut_short_are_never_kept() {
    let full = String::from_utf8(openai_stream()).unwrap();
    let without_done = full.trim_end_matches("data: [DONE]\n\n");
    let unfinished = full.replace("\"finish_reason\":\"tool_calls\"", "\"finish_reason\":null");
    let failed = format!("{without_done}data: {{\"error\":{{\"message\":\"x\",\"type\":\"server_error\",\"param\":null,\"code\":null}}}}\n\ndata: [DONE]\n\n");
    let after_done = format!("{full}data: {{}}\n\n");
    let broken = full.replacen("{\"choices\"", "{\"choices", 1);
    for stream in [without_done, &unfinished, &failed, &after_done, &broken, "", "data: [DONE]\n\n"] {
        assert_eq!(whole_answer(CHAT, true, stream.as_bytes(), None), None, "{stream}");
    }
    for whole in [
        r#"{"error":{"message":"x","type":"server_error","param":null,"code":null}}"#,
        r#"{"object":"chat.completion","choices":[]}"#,
        r#"{"object":"chat.completion","choices":[{"index":0,"message":{"content":"x"},"finish_reason":null}]}"#,
        r#"{"object":"chat.completion","choices":[{"index":0,"finish_reason":"stop"}]}"#,
        r#"{"object":"text_completion","choices":[{"index":0,"finish_reason":"stop"}]}"#,
        r#"{"object":"chat.completion","choices":[{"index":0,"message":{},"finish_reason":"stop"}],"error":{"message":"x"}}"#,
        "not json",
    ] {
        assert_eq!(whole_answer(CHAT, false, whole.as_bytes(), None), None, "{whole}");
        assert_eq!(whole_answer(COMPLETIONS, false, whole.as_bytes(), None), None, "{whole}");
    }
}

#[test]
fn a_whole_answer_is_replayed_as_openai_streams_it() {
    let whole = json!({"id": "c1", "object": "chat.completion", "created": 9, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                     "message": {"role": "assistant", "content": "Hi", "refusal": null, "annotations": []}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}});
    let (content_type, bytes) = replay(CHAT, &whole, true, true);
    assert_eq!(content_type, "text/event-stream");
    let head = |choices: Value, usage: Value| json!({"id": "c1", "object": "chat.completion.chunk", "created": 9, "model": "m", "choices": choices, "usage": usage});
    let delta =
        |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    assert_eq!(
        events(&bytes),
        [
            head(delta(json!({"role": "assistant", "content": ""}), Value::Null), Value::Null),
            head(delta(json!({"annotations": []}), Value::Null), Value::Null),
            head(delta(json!({"content": "Hi"}), Value::Null), Value::Null),
            head(delta(json!({}), "stop".into()), Value::Null),
            head(json!([]), whole["usage"].clone()),
            "[DONE]".into(),
        ]
    );
    assert!(String::from_utf8(bytes).unwrap().ends_with("\n\ndata: [DONE]\n\n"));
    // Without include_usage: no usage chunk, and no `usage` member on the others.
    let (_, bytes) = replay(CHAT, &whole, true, false);
    let without = events(&bytes);
    assert_eq!(without.len(), 5);
    assert!(without.iter().all(|event| event.get("usage").is_none()), "{without:?}");
    // Whole, the object as kept.
    let (content_type, bytes) = replay(CHAT, &whole, false, true);
    assert_eq!((content_type, serde_json::from_slice::<Value>(&bytes).unwrap()), ("application/json", whole.clone()));
    // Embeddings are never streamed.
    assert_eq!(replay(EMBEDDINGS, &whole, true, true).0, "application/json");
}

#[test]
fn tool_calls_are_replayed_named_then_with_their_arguments() {
    let (_, bytes) = replay(CHAT, &openai_whole(), true, false);
    let calls: Vec<Value> =
        events(&bytes).iter().filter_map(|e| e.pointer("/choices/0/delta/tool_calls/0").cloned()).collect();
    assert_eq!(
        calls,
        [
            json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "look", "arguments": ""}}),
            json!({"index": 0, "function": {"arguments": "{\"zoom\":2}"}}),
            json!({"index": 1, "id": "call_b", "type": "function", "function": {"name": "find", "arguments": ""}}),
            json!({"index": 1, "function": {"arguments": "{\"q\":1}"}}),
        ]
    );
    let (_, bytes) = replay(CHAT, &openai_whole(), true, true);
    assert_eq!(whole_answer(CHAT, true, &bytes, None), Some(openai_whole()));
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z \"\\\\\n{}:]{1,12}", "\\PC{1,6}"]
}

fn usage() -> impl Strategy<Value = Value> {
    (0u64..1000, 0u64..1000)
        .prop_map(|(p, c)| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}))
}

fn finish_reason() -> impl Strategy<Value = Value> {
    prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter"]).prop_map(Value::from)
}

fn logprobs() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        prop::collection::vec((text(), -10.0f64..0.0), 0..3).prop_map(|tokens| {
            let content: Vec<Value> =
                tokens.into_iter().map(|(token, logprob)| json!({"token": token, "logprob": logprob})).collect();
            json!({"content": content, "refusal": null})
        }),
    ]
}

fn tool_call() -> impl Strategy<Value = Value> {
    ("[a-z0-9_]{1,8}", "[a-z_]{1,8}", text())
        .prop_map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
}

/// A chat completion in the form a stream assembles into.
fn chat_whole() -> impl Strategy<Value = Value> {
    let message = (
        prop::option::of(text()),
        prop::option::of(text()),
        prop::collection::vec(tool_call(), 0..3),
        prop::option::of(text()),
    )
        .prop_map(|(content, refusal, calls, reasoning)| {
            let mut message = json!({"role": "assistant", "content": content, "refusal": refusal});
            if !calls.is_empty() {
                message["tool_calls"] = calls.into();
            }
            if let Some(reasoning) = reasoning {
                message["reasoning_content"] = reasoning.into();
            }
            message
        });
    let choice = (message, finish_reason(), logprobs()).prop_map(
        |(message, finish, logprobs)| json!({"message": message, "finish_reason": finish, "logprobs": logprobs}),
    );
    (prop::collection::vec(choice, 1..3), prop::option::of(usage()), "[a-z0-9-]{1,12}", any::<u32>()).prop_map(
        |(choices, usage, id, created)| {
            let choices: Vec<Value> = choices
                .into_iter()
                .enumerate()
                .map(|(i, mut choice)| {
                    choice["index"] = i.into();
                    choice
                })
                .collect();
            let mut whole =
                json!({"id": id, "object": "chat.completion", "created": created, "model": "m", "choices": choices});
            if let Some(usage) = usage {
                whole["usage"] = usage;
            }
            whole
        },
    )
}

/// A text completion in the form a stream assembles into.
fn completion_whole() -> impl Strategy<Value = Value> {
    let logprobs = prop_oneof![
        Just(Value::Null),
        prop::collection::vec(text(), 0..3).prop_map(|tokens| json!({"tokens": tokens, "text_offset": [0]})),
    ];
    let choice = (text(), finish_reason(), logprobs)
        .prop_map(|(text, finish, logprobs)| json!({"text": text, "finish_reason": finish, "logprobs": logprobs}));
    (prop::collection::vec(choice, 1..3), prop::option::of(usage())).prop_map(|(choices, usage)| {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, mut choice)| {
                choice["index"] = i.into();
                choice
            })
            .collect();
        let mut whole =
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": choices});
        if let Some(usage) = usage {
            whole["usage"] = usage;
        }
        whole
    })
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A chunk of either stream, whose choices carry any members.
fn any_chunk() -> impl Strategy<Value = Value> {
    let choice = (0u64..3, prop::collection::btree_map("[a-z_]{1,6}|content|role|tool_calls|text", any_json(), 0..4), prop::option::weighted(0.9, finish_reason()), any_json())
        .prop_map(|(index, delta, finish, text)| {
            json!({"index": index, "delta": Value::Object(delta.into_iter().collect()), "text": text, "finish_reason": finish})
        });
    (
        prop::sample::select(vec!["chat.completion.chunk", "text_completion"]),
        prop::collection::vec(choice, 0..3),
        prop::option::of(usage()),
    )
        .prop_map(|(object, choices, usage)| json!({"id": "x", "object": object, "choices": choices, "usage": usage}))
}

/// `value` written with its members in reverse order and spaces and newlines between tokens.
fn respaced(value: &Value) -> String {
    match value {
        Value::Object(members) => {
            let members: Vec<String> = members
                .iter()
                .rev()
                .map(|(name, value)| format!("\n {} :\t{} ", Value::from(name.as_str()), respaced(value)))
                .collect();
            format!("{{ {} }}", members.join(" ,"))
        }
        Value::Array(items) => format!("[ {} ]", items.iter().map(respaced).collect::<Vec<_>>().join(" ,\n")),
        leaf => leaf.to_string(),
    }
}

proptest! {
    /// A whole answer streamed and the stream assembled again is the same answer.
    #[test]
    fn a_replayed_stream_assembles_into_the_answer_it_was_made_of(whole in chat_whole(), completion in completion_whole()) {
        for (path, whole) in [(CHAT, whole), (COMPLETIONS, completion)] {
            let (_, stream) = replay(path, &whole, true, true);
            prop_assert_eq!(whole_answer(path, true, &stream, None), Some(whole.clone()));
            let (_, bytes) = replay(path, &whole, false, false);
            prop_assert_eq!(whole_answer(path, false, &bytes, None), Some(whole.clone()));
            // Without the usage chunk, the usage the filter read stands in.
            let (_, stream) = replay(path, &whole, true, false);
            let usage = Usage { prompt_tokens: 1, completion_tokens: 2 };
            let mut expected = whole.clone();
            expected["usage"] = usage_object(&usage);
            prop_assert_eq!(whole_answer(path, true, &stream, Some(&usage)), Some(expected));
        }
    }

    /// Key order, whitespace and the members that do not change the answer leave the key as it was.
    #[test]
    fn the_cache_key_ignores_form_and_annotations(
        body in prop::collection::btree_map("[a-z_]{1,8}", any_json(), 0..5),
        annotations in prop::collection::vec((prop::sample::select(NON_SEMANTIC.to_vec()), any_json()), 0..4),
    ) {
        let body = Value::Object(body.into_iter().filter(|(name, _)| !NON_SEMANTIC.contains(&name.as_str())).collect());
        let key = cache_key("k", CHAT, "m", &body);
        let mut annotated = body.clone();
        for (name, value) in annotations {
            annotated[name] = value;
        }
        let written = respaced(&annotated);
        let read: Value = serde_json::from_str(&written).unwrap();
        prop_assert_eq!(cache_key("k", CHAT, "m", &read), key.clone(), "{}", written);
        prop_assert_eq!(request_digest(CHAT, "m", &read), request_digest(CHAT, "m", &annotated));
        let mut changed = body.clone();
        changed["prompt"] = json!("another");
        if changed != body {
            prop_assert_ne!(cache_key("k", CHAT, "m", &changed), key);
        }
    }

    /// Whatever the bytes, nothing panics; what is kept replays, and a
    /// replayed stream assembles into the same answer again.
    #[test]
    fn arbitrary_answers_never_panic_and_what_is_kept_replays(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            prop::collection::vec(any_json(), 0..4).prop_map(|events| sse(&events)),
            prop::collection::vec(any_chunk(), 1..5).prop_map(|events| sse(&events)),
            any_json().prop_map(|json| json.to_string().into_bytes()),
        ],
        path in prop::sample::select(vec![CHAT, COMPLETIONS, EMBEDDINGS, "/v1/responses"]),
        stream in any::<bool>(),
    ) {
        let Some(whole) = whole_answer(path, stream, &bytes, None) else { return Ok(()) };
        let (_, replayed) = replay(path, &whole, true, true);
        if path != EMBEDDINGS {
            let again = whole_answer(path, true, &replayed, None);
            prop_assert!(again.is_some());
            let (_, twice) = replay(path, again.as_ref().unwrap(), true, true);
            prop_assert_eq!(whole_answer(path, true, &twice, None), again);
        }
    }
}

#[test]
fn a_stream_ending_in_any_apis_error_event_is_broken() {
    let openai = b"data: {\"choices\":[]}\n\ndata: {\"error\":{\"code\":\"stream_interrupted\"}}\n\n";
    let anthropic = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\"}}\n\n";
    let responses = b"data: {\"type\":\"response.failed\",\"response\":{}}\n\n";
    for broken in [&openai[..], anthropic, responses] {
        assert!(stream_broken(broken), "{}", String::from_utf8_lossy(broken));
    }
    let whole = b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n";
    assert!(!stream_broken(whole));
}
