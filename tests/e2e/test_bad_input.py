"""Bad requests get a clear OpenAI error and never take the gateway down."""

import pytest

HELLO = [{"role": "user", "content": "hello"}]


def error_of(response, spec):
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    spec.validate("ErrorResponse", response.json())
    return response.json()["error"]


@pytest.mark.parametrize("body, param, code", [
    (b"this is not json", None, None),
    (b'{"model": "llama-3", "messages": [', None, None),
    (b'["model", "llama-3"]', None, None),
    (b'{"model": "llama-3"} extra', None, None),
    (b'{"model": "llama-\xff"}', None, None),
    (b'{"messages": []}', "model", "missing_required_parameter"),
    (b'{"model": 42, "messages": []}', "model", "invalid_type"),
    (b'{"model": ["llama-3"]}', "model", "invalid_type"),
    (b'{"model": ""}', "model", "empty_string"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_malformed_bodies_are_400(http, spec, path, body, param, code):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = error_of(response, spec)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_empty_body_is_400(http, spec):
    response = http.post("/v1/chat/completions", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "empty" in error_of(response, spec)["message"]


def test_body_over_the_limit_is_413(http, spec):
    big = b'{"model": "llama-3", "messages": [], "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    response = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "4194304 bytes" in error_of(response, spec)["message"]


def test_chunked_body_over_the_limit_is_413(http, spec):
    def chunks():
        yield b'{"model": "llama-3", "pad": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    error_of(response, spec)


def test_wrong_method_is_405_and_unknown_path_404(http, spec):
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    error_of(response, spec)

    response = http.post("/v1/no-such-endpoint", json={"model": "llama-3"})
    assert response.status_code == 404
    assert error_of(response, spec)["code"] == "unknown_url"


def test_gateway_still_serves_after_bad_input(http):
    for body in [b"\x00\xff" * 1000, b"{" * 10000, b'{"model":' + b"[" * 5000, b'"' * 3]:
        assert http.post("/v1/chat/completions", content=body).status_code == 400
    response = http.post("/v1/chat/completions", json={"model": "llama-3", "messages": HELLO})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
