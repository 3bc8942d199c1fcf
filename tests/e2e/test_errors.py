"""Every error that leaves the gateway is an OpenAI error envelope with the
right status, whoever produced it: a backend in its own shape, Envoy itself,
or modelgate. Checked the way applications see it, through the openai SDK,
with retries off and then on."""


import json
import socket
import threading

import httpx2
import openai
import pytest

from harness import (Stack, attempts_at, edit_filter_config, envoy_stat, free_port, h2c_post, new_request_id as rid,
                     sdk)

HELLO = [{"role": "user", "content": "hello"}]


def attempts_seen(stack, request_id: str) -> int:
    return len(attempts_at(stack, "vllm-llama", request_id))


def downstream_5xx(stack) -> int:
    return envoy_stat(stack, r"^http\.modelgate\.downstream_rq_5xx$")


@pytest.mark.parametrize("error_format, status, exception, kind, message", [
    ("vllm", 400, openai.BadRequestError, "invalid_request_error", "simulated failure"),
    ("vllm-flat", 404, openai.NotFoundError, "not_found_error", "simulated failure"),
    ("vllm", 401, openai.AuthenticationError, "authentication_error", "simulated failure"),
    ("vllm", 422, openai.UnprocessableEntityError, "invalid_request_error", "simulated failure"),
    ("html", 502, openai.InternalServerError, "server_error", "The backend answered HTTP 502 with an HTML page: 502 Bad Gateway"),
    ("text", 503, openai.InternalServerError, "server_error", "The backend answered HTTP 503: simulated failure"),
    ("empty", 500, openai.InternalServerError, "server_error", "The backend answered HTTP 500 with an empty body."),
])
def test_backend_errors_in_foreign_shapes_become_openai_errors(stack, spec, error_format, status, exception, kind, message):
    request_id = rid()
    with pytest.raises(exception) as err:
        sdk(stack, retries=0).chat.completions.create(
            model="llama-3.1-8b-instruct", messages=HELLO,
            extra_headers={"x-request-id": request_id, "x-sim-fail-status": str(status),
                           "x-sim-error-format": error_format})
    assert err.value.status_code == status
    assert err.value.body == {"message": message, "type": kind, "param": None, "code": None}
    assert err.value.request_id == request_id
    assert err.value.response.headers["content-type"] == "application/json"
    assert int(err.value.response.headers["openai-processing-ms"]) >= 0
    spec.validate("ErrorResponse", err.value.response.json())


def backend_failure(stack, status: int, error_format: str, exception) -> openai.APIStatusError:
    """The error the SDK raises when the llama backend fails with `status` in `error_format`."""
    with pytest.raises(exception) as err:
        sdk(stack, retries=0).chat.completions.create(
            model="llama-3.1-8b-instruct", messages=HELLO,
            extra_headers={"x-sim-fail-status": str(status), "x-sim-error-format": error_format})
    return err.value


def test_an_exact_openai_error_from_a_backend_passes_unchanged(stack):
    error = backend_failure(stack, 500, "openai", openai.InternalServerError)
    assert error.body == {"message": "simulated failure", "type": "server_error", "param": None, "code": "simulated"}


def attempts_at_failing_backend(stack, retries: int, status: int, retry_after: int, exception) -> int:
    """How many attempts the SDK made at a backend that always fails with `status`."""
    request_id = rid()
    with pytest.raises(exception):
        sdk(stack, retries=retries).chat.completions.create(
            model="llama-3.1-8b-instruct", messages=HELLO,
            extra_headers={"x-request-id": request_id, "x-sim-fail-status": str(status),
                           "x-sim-retry-after": str(retry_after)})
    return attempts_seen(stack, request_id)


def test_retryable_backend_errors_are_retried_by_the_sdk(stack):
    assert attempts_at_failing_backend(stack, retries=2, status=503, retry_after=0,
                                       exception=openai.InternalServerError) == 3


def test_retry_after_reaches_the_client_and_the_sdk_honours_it(stack, http):
    response = http.post("/v1/chat/completions", json={"model": "llama-3.1-8b-instruct", "messages": HELLO},
                         headers={"x-sim-fail-status": "429", "x-sim-retry-after": "7"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["type"] == "rate_limit_error"

    assert attempts_at_failing_backend(stack, retries=1, status=429, retry_after=1,
                                       exception=openai.RateLimitError) == 2


def test_unreachable_backend_is_a_retryable_503(stack, spec):
    before = downstream_5xx(stack)
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=0).chat.completions.create(model="dead-model", messages=HELLO)
    assert err.value.status_code == 503
    assert (err.value.body["type"], err.value.body["code"]) == ("server_error", "backend_connect_failed")
    assert err.value.response.headers["x-should-retry"] == "true"
    assert err.value.request_id
    spec.validate("ErrorResponse", err.value.response.json())

    with pytest.raises(openai.InternalServerError):
        sdk(stack, retries=2).chat.completions.create(model="dead-model", messages=HELLO)
    assert downstream_5xx(stack) - before == 1 + 3


def test_backend_without_healthy_endpoints_is_a_retryable_503(stack, spec):
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=0).chat.completions.create(model="empty-model", messages=HELLO)
    assert err.value.status_code == 503
    assert err.value.body == {"message": "No healthy backend is available for this model right now.",
                              "type": "server_error", "param": None, "code": "backend_unavailable"}
    assert err.value.response.headers["x-should-retry"] == "true"
    spec.validate("ErrorResponse", err.value.response.json())


def test_backend_dropping_the_connection_is_a_retryable_503(stack):
    error = backend_failure(stack, 500, "reset", openai.InternalServerError)
    assert error.status_code == 503
    assert error.body == {"message": "The backend closed the connection before answering.",
                          "type": "server_error", "param": None, "code": "backend_reset"}
    assert error.response.headers["x-should-retry"] == "true"


def test_misconfigured_backend_is_a_503_the_sdk_does_not_retry(stack):
    before = downstream_5xx(stack)
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=3).chat.completions.create(model="ghost-model", messages=HELLO)
    assert err.value.status_code == 503
    assert err.value.body["code"] == "backend_not_configured"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert downstream_5xx(stack) - before == 1


def test_gateway_refusals_are_not_retried(stack):
    with pytest.raises(openai.NotFoundError) as err:
        sdk(stack, retries=3).chat.completions.create(model="no-such-model", messages=HELLO)
    assert err.value.response.headers["x-should-retry"] == "false"


def test_backend_timeout_is_a_retryable_504(stack, spec):
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=0).chat.completions.create(model="slow-model", messages=HELLO,
                                                      extra_headers={"x-sim-ttft-ms": "2000"})
    assert err.value.status_code == 504
    assert (err.value.body["type"], err.value.body["code"]) == ("server_error", "backend_timeout")
    assert err.value.response.headers["x-should-retry"] == "true"
    spec.validate("ErrorResponse", err.value.response.json())


def test_non_json_content_type_is_415(http, spec):
    response = http.post("/v1/chat/completions", content=b'{"model": "llama-3"}', headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    spec.validate("ErrorResponse", response.json())


def test_successful_answers_carry_processing_time(stack):
    raw = sdk(stack, retries=0).chat.completions.with_raw_response.create(model="llama-3.1-8b-instruct", messages=HELLO)
    assert int(raw.headers["openai-processing-ms"]) >= 0


# Streams. They go through the stream guard, so a backend that breaks off after
# its 200 still leaves the client a last event to read.

def stream_until_error(stack, retries: int, request_id: str, **headers) -> tuple[list, openai.APIError, dict]:
    """The chunk contents a stream delivered, the error that ended it, and its response headers."""
    received = []
    stream = sdk(stack, retries).chat.completions.create(
        model="llama-3.1-8b-instruct", messages=HELLO, stream=True,
        extra_headers={"x-request-id": request_id, **headers})
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    return received, err.value, stream.response.headers


@pytest.mark.parametrize("retries", [0, 2])
def test_a_stream_broken_after_its_200_ends_with_an_error_event(stack, spec, retries):
    request_id = rid()
    received, error, headers = stream_until_error(stack, retries, request_id, **{"x-sim-abort-after": "3"})
    # Every chunk sent before the break, then the SDK's APIError from the error event: not a dropped connection.
    assert received == ["", "This", " is", " a"]
    assert type(error) is openai.APIError
    assert error.body["type"] == "server_error"
    assert error.body["code"] == "stream_interrupted"
    assert error.message.startswith("The backend stopped in the middle of this stream")
    spec.validate("ErrorResponse", {"error": error.body})
    assert headers["x-request-id"] == request_id
    # Nothing is retried once the stream has started, by the gateway or by the SDK.
    assert attempts_seen(stack, request_id) == 1


def test_a_broken_stream_ends_cleanly_on_the_wire(http):
    body = {"model": "llama-3.1-8b-instruct", "messages": HELLO, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-sim-abort-after": "2"}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]  # raises if the connection were dropped
    assert len(events) == 3 + 1
    assert all(e.startswith('data: {"choices"') or e.startswith('data: {"id"') for e in events[:-1]), events
    assert events[-1].startswith('data: {"error":{"message":"The backend stopped')
    assert "x-modelgate-code-details" not in response.headers


def test_a_stream_that_outlives_its_route_timeout_ends_with_an_error_event(stack):
    stream = sdk(stack, retries=0).chat.completions.create(model="slow-model", messages=HELLO, stream=True,
                                                           extra_headers={"x-sim-itl-ms": "2000"})
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert err.value.body["code"] == "stream_interrupted"


@pytest.mark.parametrize("model, code, should_retry", [
    ("dead-model", "backend_connect_failed", "true"),
    ("empty-model", "backend_unavailable", "true"),
    ("ghost-model", "backend_not_configured", "false"),
])
def test_a_stream_that_cannot_start_gets_the_same_error_as_a_request(stack, spec, model, code, should_retry):
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=0).chat.completions.create(model=model, messages=HELLO, stream=True)
    assert err.value.status_code == 503
    assert (err.value.body["type"], err.value.body["code"]) == ("server_error", code)
    assert err.value.response.headers["x-should-retry"] == should_retry
    assert "x-modelgate-code-details" not in err.value.response.headers
    spec.validate("ErrorResponse", err.value.response.json())


def test_a_stream_refused_by_its_backend_is_retried_by_the_sdk(stack):
    request_id = rid()
    with pytest.raises(openai.RateLimitError) as err:
        sdk(stack, retries=1).chat.completions.create(
            model="llama-3.1-8b-instruct", messages=HELLO, stream=True,
            extra_headers={"x-request-id": request_id, "x-sim-fail-status": "429", "x-sim-retry-after": "1"})
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["type"] == "rate_limit_error"
    assert attempts_seen(stack, request_id) == 2


# Answers that are not what they claim to be.

@pytest.fixture(scope="module")
def unaccounted():
    """A gateway without usage accounting: requests keep the client's accept-encoding."""
    with Stack(adjust_config=lambda config: edit_filter_config(config, lambda routing: routing.pop("accounting"))) as s:
        yield s


def test_a_compressed_error_answer_is_rewritten_uncompressed(unaccounted, spec):
    body = {"model": "llama-3.1-8b-instruct", "messages": HELLO}
    headers = {"accept-encoding": "gzip", "x-sim-fail-status": "500", "x-sim-gzip-errors": "1"}
    response = httpx2.post(f"http://127.0.0.1:{unaccounted.port}/v1/chat/completions", json=body, headers=headers,
                           timeout=30)
    # The backend did compress it (the client may decode either way): no content-encoding is left on the envelope.
    assert "content-encoding" not in response.headers
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "The backend answered HTTP 500: (a body compressed with gzip, which the gateway does not read)",
        "type": "server_error", "param": None, "code": None}
    assert int(response.headers["content-length"]) == len(response.content)
    spec.validate("ErrorResponse", response.json())
    # The simulator's own gzip is real gzip, so the bug this guards against is not the simulator's.
    direct = httpx2.post(f"{unaccounted.backend_url('vllm-llama')}/v1/chat/completions", json=body, headers=headers)
    assert direct.headers["content-encoding"] == "gzip" and direct.json()["error"]["message"] == "simulated failure"


PAGE = b"<html><title>Internal Server Error</title></html>"


def serve_an_error_ending_in_trailers(listener: socket.socket) -> None:
    """A backend whose every answer is a 500 HTML page, chunked, ending in a trailer."""
    while True:
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, body = request.split(b"\r\n\r\n", 1)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\n"
                         b"transfer-encoding: chunked\r\ntrailer: x-failure\r\nconnection: close\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(PAGE), PAGE) + b"0\r\nx-failure: page\r\n\r\n")


@pytest.fixture(scope="module")
def trailing():
    """A gateway whose `trailing-model` is served by a backend whose answers end in trailers,
    which Envoy passes on (`enable_trailers` on the backend's cluster)."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    threading.Thread(target=serve_an_error_ending_in_trailers, args=(listener,), daemon=True).start()

    def adjust(config: dict) -> None:
        def route(routing: dict) -> None:
            routing["backends"]["trailing"] = {"cluster": "trailing_pool"}
            routing["models"].append({"match": "trailing-model", "backend": "trailing"})

        edit_filter_config(config, route)
        options = {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                   "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}
        endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        config["static_resources"]["clusters"].append({
            "name": "trailing_pool", "type": "STATIC",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
            "load_assignment": {"cluster_name": "trailing_pool", "endpoints": [{"lb_endpoints": [endpoint]}]}})

    with Stack(adjust_config=adjust) as s:
        yield s
    listener.close()


def test_a_backends_error_ending_in_trailers_is_rewritten_as_any_other(trailing, spec):
    with pytest.raises(openai.InternalServerError) as err:
        sdk(trailing, retries=0).chat.completions.create(model="trailing-model", messages=HELLO)
    assert err.value.status_code == 500
    assert err.value.body == {"message": "The backend answered HTTP 500 with an HTML page: Internal Server Error",
                              "type": "server_error", "param": None, "code": None}
    assert err.value.response.headers["content-type"] == "application/json"
    spec.validate("ErrorResponse", err.value.response.json())


@pytest.mark.parametrize("model", ["llama-3.1-8b-instruct", "gpt-4o-mini"])
def test_a_success_with_an_empty_body_is_a_502(stack, spec, model):
    with pytest.raises(openai.InternalServerError) as err:
        sdk(stack, retries=0).chat.completions.create(
            model=model, messages=HELLO, extra_headers={"x-sim-fail-status": "200", "x-sim-error-format": "empty"})
    assert err.value.status_code == 502
    assert err.value.body == {"message": "The backend answered with a success and an empty body.",
                              "type": "server_error", "param": None, "code": "bad_backend_answer"}
    spec.validate("ErrorResponse", err.value.response.json())


@pytest.mark.parametrize("model", ["llama-3.1-8b-instruct", "claude-sonnet-4-6", "llama3.2", "resilient-llama"])
@pytest.mark.parametrize("error_format, what", [
    ("empty", "a success without content"), ("openai", "a success of type `application/json`")])
def test_a_stream_answered_without_a_stream_ends_with_an_error_event(stack, spec, model, error_format, what):
    if model in ("claude-sonnet-4-6", "llama3.2") and error_format == "empty":
        pytest.skip("the Anthropic and Ollama faces answer injected failures in their own JSON shape")
    stream = sdk(stack, retries=0).chat.completions.create(
        model=model, messages=HELLO, stream=True,
        extra_headers={"x-sim-fail-status": "200", "x-sim-error-format": error_format})
    with pytest.raises(openai.APIError) as err:
        list(stream)
    assert err.value.body["code"] == "bad_backend_answer"
    assert err.value.body["message"].startswith(f"The backend answered with {what}")
    spec.validate("ErrorResponse", {"error": err.value.body})


def many_headers(http, count: int, stream: bool) -> httpx2.Response:
    body = {"model": "llama-3.1-8b-instruct", "messages": HELLO, "stream": stream}
    return http.post("/v1/chat/completions", json=body, headers={f"x-extra-{i}": "1" for i in range(count)})


def large_header(http, size: int, model: str, stream: bool) -> int:
    body = {"model": model, "messages": HELLO, "stream": stream}
    return http.post("/v1/chat/completions", json=body, headers={"x-large": "a" * size}).status_code


@pytest.mark.parametrize("model", ["llama-3.1-8b-instruct", "resilient-llama"])
def test_a_request_with_headers_near_the_size_limit_gets_the_same_answer_whole_and_streamed(http, model):
    # The largest header a plain whole request takes (60 KiB in all), found by bisection.
    taken, refused = 50_000, 70_000
    while refused - taken > 1:
        middle = (taken + refused) // 2
        taken, refused = (middle, refused) if large_header(http, middle, model, False) == 200 else (taken, middle)
    assert 60_000 < taken < 61_440
    assert large_header(http, taken, model, stream=True) == 200
    assert large_header(http, refused, model, stream=True) == 431


def test_a_request_with_many_headers_gets_the_same_answer_whole_and_streamed(http):
    # The most extra headers the whole request takes end to end (the simulated backend, like
    # Envoy, takes 100 headers), then more than the gateway takes.
    most = next(count for count in range(100, 0, -1) if many_headers(http, count, stream=False).status_code == 200)
    assert most > 80
    streamed = many_headers(http, most, stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text, streamed.text[:300]
    for stream in [False, True]:
        refused = many_headers(http, 120, stream)
        assert refused.status_code == 431
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "bad_http_request"


@pytest.mark.parametrize("model, backend, path", [
    ("llama-3.1-8b-instruct", "vllm-llama", "/v1/chat/completions"),
    ("claude-sonnet-4-6", "anthropic", "/v1/messages"),
])
@pytest.mark.parametrize("trailers", [False, True])
def test_an_http2_request_ending_in_trailers_is_routed_as_any_other(stack, model, backend, path, trailers):
    request_id = rid()
    answer = h2c_post(stack.port, {"model": model, "messages": HELLO}, {"x-request-id": request_id}, trailers)
    assert answer.status == 200, answer.data
    assert json.loads(answer.data)["object"] == "chat.completion"
    assert [r["path"] for r in attempts_at(stack, backend, request_id)] == [path]
