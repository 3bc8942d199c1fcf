"""Failover: `resilient-llama` is served by the llama pool, then the qwen pool, then
Anthropic (envoy/demo.yaml). A failed attempt is retried on the next backend before
any byte reaches the client, each attempt rewritten for its own backend; health checks
move traffic away from a dead backend and back once it recovers. Each test is bounded
in time and requests; the counts are reported at the end of the run."""

import json
import subprocess
import time

import httpx2
import openai
import pytest

from conftest import ROOT, attempts_at, new_request_id as rid, report
from devstack import DEMO_BACKENDS, Stack

MODEL = "resilient-llama"
PRIMARY, SECOND, THIRD = "vllm-llama", "sglang-qwen", "anthropic"
HELLO = [{"role": "user", "content": "hello"}]
LOADGEN = ROOT / "target" / "release" / "modelgate-loadgen"


@pytest.fixture(scope="module")
def gateway():
    with Stack() as s:
        yield s


def ask(gateway, model: str = MODEL, stream: bool = False, **headers) -> httpx2.Response:
    with httpx2.Client(timeout=30) as fresh:
        return fresh.post(f"{gateway.base_url}/chat/completions", headers=headers,
                          json={"model": model, "messages": HELLO, "max_tokens": 4, "stream": stream})


def served_by(answer) -> tuple[str | None, int]:
    return answer.headers.get("modelgate-backend"), int(answer.headers.get("modelgate-attempts", "0"))


def wait_until_served_by(gateway, backend: str, within: float = 20) -> float:
    """Seconds until a request is answered by `backend` at the first attempt."""
    start = time.monotonic()
    while served_by(ask(gateway)) != (backend, 1):
        assert time.monotonic() - start < within, f"{backend} does not serve again"
        time.sleep(0.2)
    return time.monotonic() - start


def backend_port(gateway, name: str) -> int:
    return next(gateway.ports[demo] for demo, backend in DEMO_BACKENDS.items() if backend == name)


@pytest.mark.parametrize("status", [503, 429])
def test_a_primary_failing_a_third_of_requests_is_hidden_and_retries_stay_in_budget(gateway, status):
    failing = {"x-sim-only": PRIMARY, "x-sim-fail-status": str(status), "x-sim-fail-rate": "0.33",
               "x-sim-retry-after": "0"}
    requests, answers = 60, []
    for _ in range(requests):
        request_id = rid()
        answers.append((request_id, ask(gateway, **failing, **{"x-request-id": request_id})))
    assert [a.status_code for _, a in answers] == [200] * requests
    retried = [request_id for request_id, a in answers if served_by(a) == ("qwen-pool", 2)]
    first_time = [a for _, a in answers if served_by(a) == ("llama-pool", 1)]
    assert len(retried) + len(first_time) == requests, [served_by(a) for _, a in answers]
    assert 5 <= len(retried) <= 35, len(retried)
    # One retry for each failure, and no more: every retried request reached the second backend once,
    # with the second backend's model name.
    for request_id in retried:
        [attempt] = attempts_at(gateway, SECOND, request_id)
        assert attempt["body"]["model"] == "qwen-2.5-7b-instruct"
        assert len(attempts_at(gateway, PRIMARY, request_id)) == 1
    report(f"failover, primary failing a third with {status}: {requests} requests, {requests} answered, "
           f"{len(retried)} retried on the second backend, 0 client errors")


def test_a_stream_broken_halfway_ends_with_an_error_event_and_is_not_retried(gateway):
    request_id = rid()
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, stream=True,
        extra_headers={"x-request-id": request_id, "x-sim-only": PRIMARY, "x-sim-abort-after": "3"})
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk)
    content = [c.choices[0].delta.content for c in received if c.choices and c.choices[0].delta.content]
    assert len(content) == 3, received
    assert "backend" in str(err.value.message).lower()
    assert attempts_at(gateway, SECOND, request_id) == [] and attempts_at(gateway, THIRD, request_id) == []


def test_ext_proc_down_fails_only_the_routes_that_need_it_and_they_recover_by_themselves(gateway, spec):
    gateway.kill("ext-proc")
    try:
        assert ask(gateway, model="llama-3.1-8b-instruct").status_code == 200
        # Streams are rewritten by the stream guard, its own process.
        streamed = ask(gateway, model="claude-sonnet-4-5", stream=True)
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        for model in ["claude-sonnet-4-5", "gpt-4o-mini"]:
            refused = ask(gateway, model=model)
            assert refused.status_code == 503, (model, refused.text)
            assert refused.json()["error"]["type"] == "server_error" and refused.headers["x-request-id"]
            spec.validate("ErrorResponse", refused.json())
    finally:
        gateway.restart("ext-proc")
    start = time.monotonic()
    while ask(gateway, model="claude-sonnet-4-5").status_code != 200:
        assert time.monotonic() - start < 15, "the translated route does not recover"
        time.sleep(0.2)
    report(f"ext-proc restart: translated route served again {time.monotonic() - start:.1f}s after ext-proc restarted")


def test_killing_the_primary_under_load_costs_no_client_an_error(gateway):
    rate, duration = 200, 20
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 4})
    load = subprocess.Popen([str(LOADGEN), "--url", f"{gateway.base_url}/chat/completions", "--body", body,
                             "--rate", str(rate), "--duration", str(duration), "--warmup", "0"],
                            stdout=subprocess.PIPE, text=True)
    # From this thread: a child started from a short-lived thread would die with it (PR_SET_PDEATHSIG).
    try:
        time.sleep(5)
        gateway.kill(PRIMARY)
        time.sleep(7)
        gateway.restart(PRIMARY)
        output, _ = load.communicate(timeout=duration + 30)
    finally:
        load.kill()
    result = json.loads(output)
    assert result["errors"] == 0, result
    assert result["ok"] >= 0.9 * rate * duration, result
    # Traffic is back on the primary once its health check passes again.
    back_after = wait_until_served_by(gateway, "llama-pool")
    served_by_primary_since_restart = len(httpx2.get(f"{gateway.backend_url(PRIMARY)}/sim/requests").json()["requests"])
    assert served_by_primary_since_restart > 0
    report(f"failover under load: {result['ok']} requests at {rate}/s for {duration}s, primary killed at 5s and "
           f"restarted at 12s, {result['errors']} client errors; {served_by_primary_since_restart} requests served "
           f"by the restarted primary (first-attempt service {back_after:.1f}s after the load)")


def test_every_backend_down_is_a_503_that_says_so(gateway, spec):
    for backend in [PRIMARY, SECOND, THIRD]:
        gateway.kill(backend)
    try:
        start = time.monotonic()
        answer = ask(gateway)
        elapsed = time.monotonic() - start
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert error["type"] == "server_error" and error["code"] in {"backend_connect_failed", "backend_unavailable"}
        assert "attempts" in error["message"] or "No healthy backend" in error["message"], error
        spec.validate("ErrorResponse", answer.json())
        # Within the route's bounds (three attempts; a refused connection fails at once).
        assert elapsed < 5, elapsed
        report(f"every backend down: 503 {error['code']} after {answer.headers.get('modelgate-attempts')} attempts "
               f"in {elapsed * 1000:.0f} ms")
    finally:
        for backend in [PRIMARY, SECOND, THIRD]:
            gateway.restart(backend)
