"""What clients must not be able to steer, and the loopback ports' trust boundary.

Clients' `x-envoy-*` headers change nothing (no retry, timeout or hedge), whether the
request streams through the stream guard or not. The processes beside Envoy serve only
callers with the internal token, read backends' keys only from the sources they were
started with, and the inner listener routes only to backend clusters."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx2
import pytest

from harness import (DEMO_ANTHROPIC_KEY, EXT_PROC_PORT, INNER_LISTENER_PORT, KEY_FILE, STREAM_GUARD_PORT,
                     attempts_at, new_request_id)

HELLO = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "llama-3.1-8b-instruct", "messages": HELLO}
TOKEN_HEADER = "x-modelgate-internal-token"


def url(stack, demo_port: int) -> str:
    return f"http://127.0.0.1:{stack.ports[demo_port]}"


# What Envoy's router obeys from a caller it trusts as internal.
RETRIES = {"x-envoy-retry-on": "5xx,reset,connect-failure,retriable-status-codes", "x-envoy-max-retries": "3",
           "x-envoy-retriable-status-codes": "503"}
TIMEOUTS = {"x-envoy-upstream-rq-timeout-ms": "1", "x-envoy-upstream-rq-per-try-timeout-ms": "1",
            "x-envoy-expected-rq-timeout-ms": "1"}
HEDGING = {"x-envoy-hedge-on-per-try-timeout": "true", "x-envoy-upstream-rq-per-try-timeout-ms": "1",
           "x-envoy-max-retries": "3"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_clients_timeout_headers_cause_no_504(stack, http, stream):
    rid = new_request_id()
    response = http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={**TIMEOUTS, "x-sim-ttft-ms": "300", "x-request-id": rid})
    assert response.status_code == 200, response.text
    assert "simulated reply" in response.text or "data: [DONE]" in response.text
    (seen,) = attempts_at(stack, "vllm-llama", rid)
    # Envoy tells the backend the route's own timeout, not the client's.
    assert [seen["headers"].get(h) for h in TIMEOUTS] == [None, None, "600000"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_clients_retry_headers_cause_no_second_request(stack, http, stream):
    rid = new_request_id()
    response = http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={**RETRIES, "x-sim-fail-status": "503", "x-request-id": rid})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
    seen = attempts_at(stack, "vllm-llama", rid)
    assert len(seen) == 1, f"the backend was called {len(seen)} times"
    assert not [h for h in seen[0]["headers"] if h in RETRIES]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_clients_hedging_headers_send_no_second_request(stack, http, stream):
    rid = new_request_id()
    response = http.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                         headers={**HEDGING, "x-sim-ttft-ms": "300", "x-request-id": rid})
    assert response.status_code == 200, response.text
    assert len(attempts_at(stack, "vllm-llama", rid)) == 1


def guard_post(stack, headers: dict, body: dict | None = None) -> httpx2.Response:
    """A request straight to the stream guard's port, as anything on the host could send."""
    return httpx2.post(f"{url(stack, STREAM_GUARD_PORT)}/v1/chat/completions", json=body or {**CHAT, "stream": True},
                       headers=headers, timeout=30)


def test_the_stream_guard_serves_only_callers_with_the_internal_token(stack):
    for token in [None, "wrong", stack.internal_token + "x"]:
        rid = new_request_id()
        headers = {"x-modelgate-stream-cluster": "llama_pool", "x-request-id": rid}
        if token:
            headers[TOKEN_HEADER] = token
        response = guard_post(stack, headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_internal_token"
        assert attempts_at(stack, "vllm-llama", rid) == []
    # With it (as the filter sends it), the stream is relayed, and the token goes no further.
    rid = new_request_id()
    response = guard_post(stack, {"x-modelgate-stream-cluster": "llama_pool", "x-request-id": rid,
                                  TOKEN_HEADER: stack.internal_token})
    assert response.status_code == 200
    (seen,) = attempts_at(stack, "vllm-llama", rid)
    assert TOKEN_HEADER not in seen["headers"]


def test_a_request_straight_to_the_guard_cannot_name_a_key_source(stack, tmp_path):
    """Even with the token, a profile naming another variable or file of the guard's gets no key sent."""
    outside = tmp_path / "secret"
    outside.write_text("sk-not-a-backend-key")
    escape = KEY_FILE.parent / os.path.relpath(outside, KEY_FILE.parent)
    link = KEY_FILE.parent / "link-to-secret"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    try:
        for source in [{"env": "HOME"}, {"env": "PATH"}, {"file": str(outside)}, {"file": str(escape)},
                       {"file": str(link)}, {"file": "/etc/hostname"}]:
            rid = new_request_id()
            response = guard_post(stack, {
                "x-modelgate-stream-cluster": "llama_pool", "x-request-id": rid, TOKEN_HEADER: stack.internal_token,
                "x-modelgate-stream-backend": json.dumps({"api_key": source})})
            assert response.status_code == 500, source
            assert response.json()["error"]["code"] == "backend_key_unavailable"
            assert attempts_at(stack, "vllm-llama", rid) == [], f"{source} reached the backend"
    finally:
        link.unlink()
    # The configured key file is read, as the filter's profile names it.
    rid = new_request_id()
    response = guard_post(stack, {
        "x-modelgate-stream-cluster": "llama_pool", "x-request-id": rid, TOKEN_HEADER: stack.internal_token,
        "x-modelgate-stream-backend": json.dumps({"api_key": {"file": str(KEY_FILE)}})})
    assert response.status_code == 200
    (seen,) = attempts_at(stack, "vllm-llama", rid)
    assert seen["headers"]["authorization"] == f"Bearer {KEY_FILE.read_text().strip()}"


def test_the_guard_drops_a_clients_envoy_headers_before_the_inner_listener(stack):
    rid = new_request_id()
    response = guard_post(stack, {"x-modelgate-stream-cluster": "llama_pool", "x-request-id": rid,
                                  TOKEN_HEADER: stack.internal_token, "x-sim-fail-status": "503", **RETRIES})
    assert response.status_code == 503
    (seen,) = attempts_at(stack, "vllm-llama", rid)
    assert not [h for h in seen["headers"] if h in RETRIES]


@pytest.mark.parametrize("cluster", ["modelgate_admin", "modelgate_ext_proc", "modelgate_stream_guard", "nope"])
def test_the_inner_listener_routes_only_to_backend_clusters(stack, cluster):
    response = httpx2.post(f"{url(stack, INNER_LISTENER_PORT)}/v1/usage/records", content=b"",
                           headers={"x-modelgate-cluster": cluster}, timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_the_inner_listener_still_routes_to_backends(stack):
    rid = new_request_id()
    response = httpx2.post(f"{url(stack, INNER_LISTENER_PORT)}/v1/chat/completions", json=CHAT,
                           headers={"x-modelgate-cluster": "qwen_pool", "x-request-id": rid}, timeout=30)
    assert response.status_code == 200
    assert len(attempts_at(stack, "sglang-qwen", rid)) == 1


def record(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "at_ms": 1, "key": "forged", "model": "m", "backend": "b",
                       "status": 200, "stream": False, "usage": {"prompt_tokens": 1000000}, "cost_usd": None,
                       "latency_us": 1, "ttft_us": None}).encode()


def test_the_admin_port_takes_records_only_from_callers_with_the_token(stack):
    records = f"{stack.ext_proc_admin_url}/v1/usage/records"
    for headers in [{}, {TOKEN_HEADER: "wrong"}]:
        response = httpx2.post(records, content=record(new_request_id()), headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_internal_token"
    report = httpx2.get(f"{stack.ext_proc_admin_url}/v1/usage/report", timeout=30).json()
    assert not [row for row in report["data"] if row["key"] == "forged"], "a forged record was counted"
    response = httpx2.post(records, content=record(new_request_id()), headers={TOKEN_HEADER: stack.internal_token})
    assert response.json() == {"accepted": 1, "rejected": 0}
    # Metrics and the report stay readable for scrapers and people.
    assert httpx2.get(f"{stack.ext_proc_admin_url}/metrics", timeout=30).status_code == 200


# ext_proc's gRPC port, spoken to as a stranger would: one ProcessingRequest with the
# headers of a request whose profile names a backend key, then its body.

def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def processing_requests(headers: dict[str, str], body: bytes) -> bytes:
    header_map = b"".join(_field(1, _field(1, k.encode()) + _field(3, v.encode())) for k, v in headers.items())
    request_headers = _field(2, _field(1, header_map))  # ProcessingRequest.request_headers
    request_body = _field(4, _field(1, body) + b"\x10\x01")  # .request_body {body, end_of_stream}
    return _grpc_frame(request_headers) + _grpc_frame(request_body)


def grpc_call(port: int, path: str, data: bytes, metadata: dict[str, str]) -> tuple[dict[str, str], bytes]:
    """One gRPC call over HTTP/2 without TLS: its headers and trailers together, and its data."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                         (":authority", "ext-proc"), ("content-type", "application/grpc"),
                                         ("te", "trailers"), *metadata.items()])
        connection.send_data(stream, data, end_stream=True)
        sock.sendall(connection.data_to_send())
        headers, received = {}, b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return headers, received
            for event in connection.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return headers, received
            sock.sendall(connection.data_to_send())


def test_ext_proc_gives_backend_keys_only_to_callers_with_the_token(stack):
    key = os.environ.get("ANTHROPIC_API_KEY", DEMO_ANTHROPIC_KEY)
    ask = processing_requests({":path": "/v1/chat/completions",
                               "x-modelgate-backend": json.dumps({"api_key": {"env": "ANTHROPIC_API_KEY"}})},
                              json.dumps(CHAT).encode())
    process = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
    port = stack.ports[EXT_PROC_PORT]
    for metadata in [{}, {TOKEN_HEADER: "wrong"}]:
        headers, data = grpc_call(port, process, ask, metadata)
        assert headers.get("grpc-status") == "16", headers  # UNAUTHENTICATED
        assert key.encode() not in data
    # Envoy's own stream, with the token, gets the key it needs.
    headers, data = grpc_call(port, process, ask, {TOKEN_HEADER: stack.internal_token})
    assert headers.get("grpc-status", "0") == "0", headers
    assert f"Bearer {key}".encode() in data
