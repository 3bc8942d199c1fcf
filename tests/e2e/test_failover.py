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

from harness import ROOT, Stack, attempts_at, backend_requests, edit_filter_config, new_request_id as rid, report

MODEL = "resilient-llama"
PRIMARY, SECOND, THIRD = "vllm-llama", "sglang-qwen", "anthropic"
HELLO = [{"role": "user", "content": "hello"}]
LOADGEN = ROOT / "target" / "release" / "modelgate-loadgen"


# An attempt that has not answered within a second moves on (the demo waits a minute).
PER_TRY_TIMEOUT_MS = 1000


def with_short_per_try_timeout(config: dict) -> None:
    edit_filter_config(config, lambda routing: routing.update(failover={"per_try_timeout_ms": PER_TRY_TIMEOUT_MS}))


@pytest.fixture(scope="module")
def gateway():
    with Stack(adjust_config=with_short_per_try_timeout) as s:
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


def received(gateway, backend: str) -> int:
    """How many requests a simulated backend has received since it started."""
    return len(backend_requests(gateway, backend))


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
    for request_id, _ in answers:
        assert len(attempts_at(gateway, PRIMARY, request_id)) == 1
        second = attempts_at(gateway, SECOND, request_id)
        if request_id in retried:
            assert [a["body"]["model"] for a in second] == ["qwen-2.5-7b-instruct"]
        else:
            assert second == [], "an answered request was sent on all the same"
    report(f"failover, primary failing a third with {status}: {requests} requests, {requests} answered, "
           f"{len(retried)} retried on the second backend, 0 client errors")


def test_a_primary_that_does_not_answer_in_time_is_left_for_the_next_backend(gateway):
    request_id = rid()
    start = time.monotonic()
    answer = ask(gateway, **{"x-request-id": request_id, "x-sim-only": PRIMARY, "x-sim-ttft-ms": "3000"})
    elapsed = time.monotonic() - start
    assert answer.status_code == 200 and served_by(answer) == ("qwen-pool", 2)
    assert PER_TRY_TIMEOUT_MS / 1000 <= elapsed < 2.5, elapsed


def test_the_last_backend_is_reached_in_its_own_dialect(gateway):
    gateway.kill(PRIMARY)
    gateway.kill(SECOND)
    try:
        request_id = rid()
        answer = ask(gateway, **{"x-request-id": request_id})
        assert answer.status_code == 200 and served_by(answer) == ("anthropic", 3)
        assert answer.json()["object"] == "chat.completion" and answer.json()["choices"][0]["message"]["content"]
        [attempt] = attempts_at(gateway, THIRD, request_id)
        assert attempt["path"] == "/v1/messages" and attempt["body"]["model"] == "claude-haiku-4-5"
        assert attempt["headers"]["x-api-key"]
    finally:
        gateway.restart(PRIMARY)
        gateway.restart(SECOND)
    wait_until_served_by(gateway, "llama-pool")


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
        # A rename alone is the filter's.
        assert ask(gateway, model="gpt-4o-mini").status_code == 200
        # Streams are rewritten by the stream guard, its own process.
        streamed = ask(gateway, model="claude-sonnet-4-6", stream=True)
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        for model in ["claude-sonnet-4-6", "llama3.2"]:
            refused = ask(gateway, model=model)
            assert refused.status_code == 503, (model, refused.text)
            assert refused.json()["error"]["type"] == "server_error" and refused.headers["x-request-id"]
            spec.validate("ErrorResponse", refused.json())
    finally:
        gateway.restart("ext-proc")
    start = time.monotonic()
    while ask(gateway, model="claude-sonnet-4-6").status_code != 200:
        assert time.monotonic() - start < 15, "the translated route does not recover"
        time.sleep(0.2)
    report(f"ext-proc restart: translated route served again {time.monotonic() - start:.1f}s after ext-proc restarted")


def test_killing_the_primary_under_load_costs_no_client_an_error(gateway):
    rate, duration = 200, 20
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 4})
    second_before = received(gateway, SECOND)
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
    # The second backend served while the primary was away, and traffic is back on the
    # primary once its health check passes again: it served most of the last 8 s of load.
    served_by_second = received(gateway, SECOND) - second_before
    served_by_primary_since_restart = received(gateway, PRIMARY)
    assert 0.2 * rate * 7 <= served_by_second <= rate * duration, served_by_second
    assert served_by_primary_since_restart >= 0.5 * rate * 8, served_by_primary_since_restart
    back_after = wait_until_served_by(gateway, "llama-pool")
    report(f"failover under load: {result['ok']} requests at {rate}/s for {duration}s, primary killed at 5s and "
           f"restarted at 12s, {result['errors']} client errors; {served_by_second} served by the second backend, "
           f"{served_by_primary_since_restart} by the restarted primary (first-attempt service "
           f"{back_after:.1f}s after the load)")


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
        assert answer.headers["modelgate-attempts"] == "3"
        assert "last of 3 attempts" in error["message"], error
        spec.validate("ErrorResponse", answer.json())
        # Within the route's bounds (three attempts; a refused connection fails at once).
        assert elapsed < 5, elapsed
        report(f"every backend down: 503 {error['code']} after {answer.headers.get('modelgate-attempts')} attempts "
               f"in {elapsed * 1000:.0f} ms")
    finally:
        for backend in [PRIMARY, SECOND, THIRD]:
            gateway.restart(backend)
