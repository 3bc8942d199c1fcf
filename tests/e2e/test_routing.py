"""Requests reach the backend their model is configured for, under the name
that backend expects, and clients cannot steer routing themselves."""

import openai
import pytest

from harness import envoy_stat, new_request_id as request_id, received_by

HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("model, backend", [
    ("llama-3.1-8b-instruct", "vllm-llama"),   # exact name
    ("llama-guard-3", "vllm-llama"),           # llama-* prefix
    ("qwen-2.5-72b", "sglang-qwen"),           # qwen-* prefix
    ("mistral-large", "llamacpp-mistral"),     # mistral-* prefix
])
def test_each_prefix_reaches_its_own_backend(client, stack, model, backend):
    rid = request_id()
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO,
                                                           extra_headers={"x-request-id": rid})
    assert raw.headers["x-sim-backend"] == backend
    assert raw.parse().model == model
    seen = received_by(stack, backend, rid)
    assert seen["model"] == model
    # Internal routing headers never reach a backend.
    assert not [h for h in seen["headers"] if h.startswith("x-modelgate-")]


def test_renamed_model_is_what_the_backend_sees(client, stack):
    rid = request_id()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2,
                                                           extra_headers={"x-request-id": rid})
    assert raw.headers["x-sim-backend"] == "vllm-llama"
    seen = received_by(stack, "vllm-llama", rid)
    assert seen["model"] == "llama-3.1-8b-instruct"
    assert not [h for h in seen["headers"] if h.startswith("x-modelgate-")]
    # The rewritten body arrived whole: the backend parsed it and answered for the new name.
    assert raw.parse().model == "llama-3.1-8b-instruct"
    assert raw.parse().choices[0].message.content == "This is"


def ext_proc_streams(stack) -> int:
    """gRPC streams Envoy has opened to ext_proc."""
    return envoy_stat(stack, r"^cluster\.modelgate_ext_proc\.upstream_rq_total$")


def test_a_rename_alone_needs_no_ext_proc_and_a_repeated_model_still_gets_one_name(client, http, stack):
    before = ext_proc_streams(stack)
    for stream in [False, True]:
        rid = request_id()
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=2, stream=stream, extra_headers={"x-request-id": rid})
        assert raw.status_code == 200
        assert received_by(stack, "vllm-llama", rid)["model"] == "llama-3.1-8b-instruct"
    assert ext_proc_streams(stack) == before, "the filter renamed both without an ext_proc stream"
    # A body naming its model twice is routed by the last, as backends read it, and reaches the
    # backend under its new name (ext_proc rewrites it, keeping one).
    rid = request_id()
    response = http.post("/v1/chat/completions", headers={"x-request-id": rid, "content-type": "application/json"},
                         content=b'{"model":"qwen-2.5-7b-instruct","messages":[{"role":"user","content":"hi"}],'
                                 b'"model":"gpt-4o-mini"}')
    assert response.status_code == 200, response.text
    assert received_by(stack, "vllm-llama", rid)["model"] == "llama-3.1-8b-instruct"
    assert ext_proc_streams(stack) == before + 1


def test_renamed_stream_and_embeddings(client, stack):
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True, max_tokens=3))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "This is a"
    rid = request_id()
    result = client.embeddings.create(model="text-embedding-3-small", input="hi", extra_headers={"x-request-id": rid})
    assert len(result.data) == 1
    assert received_by(stack, "sglang-qwen", rid)["model"] == "qwen3-embedding-0.6b"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gemini-1.5-pro", messages=HELLO)
    assert err.value.status_code == 404
    assert err.value.body == {
        "message": "The model `gemini-1.5-pro` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }
    assert err.value.request_id


def test_client_cannot_pick_the_cluster_or_rename(client, stack):
    rid = request_id()
    raw = client.chat.completions.with_raw_response.create(
        model="qwen-2.5-7b-instruct", messages=HELLO,
        extra_headers={"x-request-id": rid, "x-modelgate-cluster": "mistral_pool",
                       "X-Modelgate-Backend": '{"model":"something-else","api_key":{"env":"HOME"}}',
                       "x-modelgate-stream-cluster": "mistral_pool"})
    assert raw.headers["x-sim-backend"] == "sglang-qwen"
    seen = received_by(stack, "sglang-qwen", rid)
    assert seen["model"] == "qwen-2.5-7b-instruct"
    assert not [h for h in seen["headers"] if h.startswith("x-modelgate-")]


def test_client_headers_cannot_route_an_unknown_model(http):
    response = http.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO},
                         headers={"x-modelgate-cluster": "llama_pool"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# Streams are rewritten by the stream guard, other requests by ext_proc: the same rules either way.
@pytest.mark.parametrize("stream", [False, True])
def test_backend_keys_come_from_configuration_not_from_clients(stack, stream):
    from harness import attempts_at, rewrite_key_file, sdk

    def key_seen(model: str, client_key: str) -> str | None:
        rid = request_id()
        answer = sdk(stack, key=client_key).chat.completions.create(model=model, messages=HELLO, stream=stream,
                                                                    extra_headers={"x-request-id": rid})
        if stream:
            assert [c for c in answer if c.choices and c.choices[0].delta.content]
        [attempt] = attempts_at(stack, "vllm-llama", rid)
        assert attempt["body"].get("stream", False) == stream
        assert not [h for h in attempt["headers"] if h.startswith("x-modelgate-")]
        return attempt["headers"].get("authorization")

    assert key_seen("llama-3.1-8b-instruct", "sk-client") is None
    assert key_seen("shared-model", "sk-client") == "Bearer sk-client"
    assert key_seen("filekey-model", "sk-client") == "Bearer sk-from-file-1"
    # A rotated secret is used within a second, without a restart.
    rewrite_key_file("sk-from-file-2")
    assert key_seen("filekey-model", "sk-client") == "Bearer sk-from-file-2"
    rewrite_key_file("sk-from-file-1\n")


@pytest.mark.parametrize("stream", [False, True])
def test_an_unreadable_key_is_a_500_that_names_no_secret(stack, stream):
    from harness import KEY_FILE, rewrite_key_file, sdk

    saved = KEY_FILE.read_text()
    rewrite_key_file(None)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            sdk(stack, retries=2).chat.completions.create(model="filekey-model", messages=HELLO, stream=stream)
    finally:
        rewrite_key_file(saved)
    assert err.value.status_code == 500
    assert err.value.body["code"] == "backend_key_unavailable"
    assert str(KEY_FILE) not in err.value.message
    assert err.value.response.headers["x-should-retry"] == "false"
