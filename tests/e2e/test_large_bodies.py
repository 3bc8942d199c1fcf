"""Large requests and answers on the routes the gateway rewrites: a request at the filter's
`max_request_body_bytes` reaches its backend rewritten, one byte more is a 413, and whole
answers of 5 and 10 MiB come back translated. Whatever fails — a message over ext-proc's
limit, an answer too large to buffer for its translation (even one wholly in before ext-proc
has read its headers) — fails as an OpenAI error: the backend never gets an unrewritten
request, nor the client an untranslated answer. A rename alone is the filter's, so ext-proc's
limit does not apply to it."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import httpx2
import pytest

from harness import Stack, backend_requests, new_request_id, received_by

MAX_REQUEST_BODY_BYTES = 4 * 1024 * 1024  # the demo's max_request_body_bytes
DIMENSIONS = 8192  # the simulator's largest embedding

# model -> (backend, path the backend must get, what the request must carry there)
TRANSLATED = {
    "gpt-4o-mini": ("vllm-llama", "/v1/chat/completions", lambda r: r["model"] == "llama-3.1-8b-instruct"),
    "claude-sonnet-4-6": ("anthropic", "/v1/messages",
                          lambda r: r["model"] == "claude-sonnet-4-6" and r["headers"].get("x-api-key")),
    "llama3.2": ("ollama", "/api/chat", lambda r: r["model"] == "llama3.2"),
}
RENAMED_BY_THE_FILTER = "gpt-4o-mini"
THROUGH_EXT_PROC = [model for model in TRANSLATED if model != RENAMED_BY_THE_FILTER]


def chat_body(model: str, size: int) -> bytes:
    """A chat request of exactly `size` bytes."""
    body = {"model": model, "messages": [{"role": "user", "content": ""}]}
    body["messages"][0]["content"] = "a" * (size - len(json.dumps(body, separators=(",", ":"))))
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


def post(port: int, path: str, body: bytes, request_id: str) -> httpx2.Response:
    return httpx2.post(f"http://127.0.0.1:{port}{path}", content=body, timeout=60,
                       headers={"content-type": "application/json", "x-request-id": request_id})


def assert_openai_error(response: httpx2.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("model", TRANSLATED)
def test_a_request_at_the_body_limit_reaches_its_backend_rewritten(stack, model):
    backend, path, rewritten = TRANSLATED[model]
    request_id = new_request_id()
    response = post(stack.port, "/v1/chat/completions", chat_body(model, MAX_REQUEST_BODY_BYTES), request_id)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["object"] == "chat.completion"
    got = received_by(stack, backend, request_id)
    assert got and got["path"] == path and rewritten(got), got and (got["path"], got["model"])
    assert int(got["headers"]["content-length"]) > 0


@pytest.mark.parametrize("model", TRANSLATED)
def test_a_request_one_byte_over_the_limit_is_a_413_and_goes_nowhere(stack, model):
    backend = TRANSLATED[model][0]
    request_id = new_request_id()
    response = post(stack.port, "/v1/chat/completions", chat_body(model, MAX_REQUEST_BODY_BYTES + 1), request_id)
    assert_openai_error(response, 413, "request_too_large")
    assert received_by(stack, backend, request_id) is None


def embeddings(port: int, model: str, inputs: int, request_id: str) -> httpx2.Response:
    body = {"model": model, "input": [f"text {i}" for i in range(inputs)], "dimensions": DIMENSIONS}
    return post(port, "/v1/embeddings", json.dumps(body).encode(), request_id)


# inputs of 8,192 dimensions -> about 5 and 10 MiB of JSON
@pytest.mark.parametrize("inputs", [30, 60])
@pytest.mark.parametrize("model, backend, path, backend_model", [
    ("nomic-embed-text", "ollama", "/api/embed", "nomic-embed-text"),
    ("text-embedding-3-small", "sglang-qwen", "/v1/embeddings", "qwen3-embedding-0.6b"),
])
def test_large_whole_answers_come_back_translated(stack, inputs, model, backend, path, backend_model):
    request_id = new_request_id()
    response = embeddings(stack.port, model, inputs, request_id)
    assert response.status_code == 200, response.text[:300]
    assert len(response.content) > inputs * 170_000
    answer = response.json()
    assert answer["object"] == "list" and len(answer["data"]) == inputs
    assert all(item["object"] == "embedding" and len(item["embedding"]) == DIMENSIONS for item in answer["data"])
    got = received_by(stack, backend, request_id)
    assert got and (got["path"], got["model"]) == (path, backend_model)


# tokens of the simulator's text -> about 5 and 10 MiB
@pytest.mark.parametrize("tokens", [950_000, 1_900_000])
def test_a_large_anthropic_answer_comes_back_translated(stack, tokens):
    request_id = new_request_id()
    body = {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "write"}], "max_tokens": tokens}
    response = httpx2.post(f"http://127.0.0.1:{stack.port}/v1/chat/completions", json=body, timeout=60,
                           headers={"x-request-id": request_id, "x-sim-output-tokens": str(tokens)})
    assert response.status_code == 200, response.text[:300]
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == tokens
    assert len(answer["choices"][0]["message"]["content"]) > tokens * 5
    assert received_by(stack, "anthropic", request_id)["path"] == "/v1/messages"


def test_an_answer_too_large_to_translate_is_an_openai_error(stack):
    """About 21 MiB, past the 16 MiB Envoy buffers for a translation."""
    response = embeddings(stack.port, "nomic-embed-text", 120, new_request_id())
    assert_openai_error(response, 502, "answer_too_large")
    assert response.headers["x-should-retry"] == "false"


def test_an_answer_too_large_to_translate_is_an_openai_error_while_ext_proc_reads_its_headers(stack):
    """The whole answer reaches Envoy while its headers wait on ext-proc (a busy ext-proc, paused
    here): still the 502, not a backend paused for good and a client left waiting."""
    request_id = new_request_id()
    body = {"model": "nomic-embed-text", "input": [f"text {i}" for i in range(120)], "dimensions": DIMENSIONS}
    with ThreadPoolExecutor(1) as pool:
        # The backend answers half a second after it has the request: ext-proc is paused by then.
        answer = pool.submit(httpx2.post, f"http://127.0.0.1:{stack.port}/v1/embeddings", json=body, timeout=10,
                             headers={"x-request-id": request_id, "x-sim-ttft-ms": "500"})
        deadline = time.monotonic() + 10
        while received_by(stack, "ollama", request_id) is None:
            assert time.monotonic() < deadline and not answer.done(), "the backend never got the request"
            time.sleep(0.01)
        ext_proc = stack.pid("ext-proc")
        os.kill(ext_proc, signal.SIGSTOP)
        try:
            # Less than ext_proc's message_timeout (2 s), which would end the wait otherwise.
            wait([answer], timeout=1.5)
        finally:
            os.kill(ext_proc, signal.SIGCONT)
        response = answer.result()
    assert_openai_error(response, 502, "answer_too_large")


@pytest.fixture(scope="module")
def small_messages():
    """A gateway whose ext-proc takes and sends messages of at most 1 MiB."""
    with Stack(ext_proc_args=["--max-message-bytes", str(1 << 20)]) as gateway:
        yield gateway


@pytest.mark.parametrize("model", THROUGH_EXT_PROC)
def test_a_request_over_ext_procs_message_limit_fails_and_never_reaches_the_backend(small_messages, model):
    backend = TRANSLATED[model][0]
    request_id = new_request_id()
    response = post(small_messages.port, "/v1/chat/completions", chat_body(model, 2 << 20), request_id)
    assert_openai_error(response, 503, "processing_failed")
    assert received_by(small_messages, backend, request_id) is None
    # The gateway serves the next request as before.
    assert post(small_messages.port, "/v1/chat/completions", chat_body(model, 1000), new_request_id()).status_code == 200


def test_a_rename_is_not_bound_by_ext_procs_message_limit(small_messages):
    backend, _, rewritten = TRANSLATED[RENAMED_BY_THE_FILTER]
    request_id = new_request_id()
    response = post(small_messages.port, "/v1/chat/completions", chat_body(RENAMED_BY_THE_FILTER, 2 << 20), request_id)
    assert response.status_code == 200, response.text[:300]
    got = received_by(small_messages, backend, request_id)
    assert rewritten(got) and int(got["headers"]["content-length"]) == (2 << 20) + len("llama-3.1-8b-instruct") - len(
        RENAMED_BY_THE_FILTER)


def test_an_answer_over_ext_procs_message_limit_is_an_openai_error(small_messages):
    request_id = new_request_id()
    response = embeddings(small_messages.port, "nomic-embed-text", 8, request_id)
    assert_openai_error(response, 503, "processing_failed")
    assert [r["path"] for r in backend_requests(small_messages, "ollama")
            if r["headers"].get("x-request-id") == request_id] == ["/api/embed"]
