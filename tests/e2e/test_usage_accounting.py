"""Usage accounting: every answered request is reported to ext-proc's admin port, which
shows the exact token counts the backends returned in Prometheus `/metrics` and in the
usage report (tokens and cost per key, model and backend over a time window)."""

import hashlib
import json
import re
import time

import httpx2
import pytest

from harness import (EXT_PROC_ADMIN_PORT, Stack, edit_filter_config, envoy_stat, h2c_post, labels, metrics,
                     new_request_id as rid, raw_http, requests_counted, sdk, wait_for_requests)

ALICE, BOB = "sk-alice-0001", "sk-bob-0002"
HELLO = [{"role": "user", "content": "hello there"}]
# The demo's prices, per million tokens (envoy/demo.yaml).
LLAMA_PRICE, CLAUDE_PRICE = (0.05, 0.08), (3.0, 15.0)


def with_keys(config: dict) -> None:
    def edit(routing: dict) -> None:
        routing["client_keys"] = [{"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest()}
                                  for name, key in [("alice", ALICE), ("bob", BOB)]]
        routing["accounting"]["flush_interval_ms"] = 100
    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def gateway():
    with Stack(adjust_config=with_keys) as s:
        yield s


def report(gateway, **window) -> list[dict]:
    answer = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/usage/report", params=window)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_metrics_and_the_usage_report_show_the_exact_tokens_and_cost(gateway):
    # The report sums whole minutes: a window from this minute's start holds every request below.
    start = int(time.time()) // 60 * 60
    alice, bob = sdk(gateway, key=ALICE), sdk(gateway, key=BOB)
    whole = alice.chat.completions.create(model="llama-3.1-8b-instruct", messages=HELLO, max_tokens=7)
    # Bob asks for usage to learn what the same stream costs; Alice does not, and is counted all the same.
    counted = bob.chat.completions.create(model="claude-sonnet-4-6", messages=HELLO, max_tokens=9, stream=True,
                                          stream_options={"include_usage": True})
    stream_usage = [chunk.usage for chunk in counted if chunk.usage][0]
    request_id = rid()
    # Its tokens come 20 ms apart, so the gaps between its chunks are measured.
    unasked = list(alice.chat.completions.create(model="claude-sonnet-4-6", messages=HELLO, max_tokens=9, stream=True,
                                                 extra_headers={"x-request-id": request_id, "x-sim-itl-ms": "20"}))
    assert all(chunk.usage is None for chunk in unasked)
    with pytest.raises(Exception):
        alice.chat.completions.create(model="no-such-model", messages=HELLO)
    # Records reach ext-proc with each worker's next batch (every 100 ms here).
    wait_for_requests(gateway, 4, within=5)

    m = metrics(gateway)
    llama = labels(model="llama-3.1-8b-instruct", backend="llama-pool", key="alice", traffic="interactive")
    claude = labels(model="claude-sonnet-4-6", backend="anthropic", key="alice", traffic="interactive")
    assert m[f"modelgate_prompt_tokens_total{llama}"] == whole.usage.prompt_tokens
    assert m[f"modelgate_completion_tokens_total{llama}"] == whole.usage.completion_tokens == 7
    assert m[f"modelgate_prompt_tokens_total{claude}"] == stream_usage.prompt_tokens
    assert m[f"modelgate_completion_tokens_total{claude}"] == stream_usage.completion_tokens == 9
    assert m[f"modelgate_requests_total{claude}"] == 1
    # A model no route serves is counted without its name: clients cannot grow the label set.
    not_found = labels(model="", backend="", key="alice", status="404", traffic="interactive")
    assert m[f"modelgate_errors_total{not_found}"] == 1
    # Timings: both streams had a first token; Alice's nine tokens came 20 ms apart.
    timing = labels(model="claude-sonnet-4-6", backend="anthropic")
    assert m[f"modelgate_time_to_first_token_seconds_count{timing}"] == 2
    gaps = m[f"modelgate_inter_token_latency_seconds_count{timing}"]
    assert gaps >= 8 and m[f"modelgate_inter_token_latency_seconds_sum{timing}"] >= 8 * 0.02 * 0.9
    assert m[f"modelgate_request_duration_seconds_count{labels(model='llama-3.1-8b-instruct', backend='llama-pool')}"] == 1

    rows = {(r["key"], r["model"], r["backend"]): r for r in report(gateway, start=start)}
    row = rows[("alice", "claude-sonnet-4-6", "anthropic")]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == \
        (1, stream_usage.prompt_tokens, stream_usage.completion_tokens)
    expected = (stream_usage.prompt_tokens * CLAUDE_PRICE[0] + stream_usage.completion_tokens * CLAUDE_PRICE[1]) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)
    # The same prompt through another route costs what that route's price says.
    row = rows[("alice", "llama-3.1-8b-instruct", "llama-pool")]
    assert row["cost_usd"] == pytest.approx((whole.usage.prompt_tokens * LLAMA_PRICE[0] + 7 * LLAMA_PRICE[1]) / 1e6)
    assert rows[("alice", "", "")]["errors"] == 1
    # A window that ended before these requests holds none of them.
    assert report(gateway, start=0, end=start) == []

    # ext-proc logs each request in one line carrying its id, model, backend, status and tokens.
    line = next(line for line in gateway.log_tail("ext-proc", 200).splitlines() if request_id in line)
    assert "claude-sonnet-4-6" in line and "anthropic" in line and f"completion_tokens={stream_usage.completion_tokens}" in line


def http1_stream(port: int, body: dict, headers: dict[str, str]) -> bytes:
    """A POST over HTTP/1.1, read raw to the connection's end: what the client gets, byte for byte."""
    payload = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
               f"{head}content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload
    return raw_http(port, request)


def test_a_guarded_streams_usage_comes_to_the_filter_in_a_trailer_no_client_sees(gateway):
    """The stream guard, reached over HTTP/2, reads a counted stream's usage and hands it to the
    filter in a trailer at the stream's end; the filter takes it out, so clients over HTTP/1.1 and
    HTTP/2 get exactly the stream they asked for, and the tokens are counted all the same."""
    claude = labels(model="claude-sonnet-4-6", backend="anthropic", key="alice", traffic="interactive")
    llama = labels(model="llama-3.1-8b-instruct", backend="llama-pool", key="alice", traffic="interactive")
    before = metrics(gateway)
    counted_before = requests_counted(gateway)

    raw = http1_stream(gateway.port, {"model": "llama-3.1-8b-instruct", "messages": HELLO, "max_tokens": 5,
                                      "stream": True}, {"authorization": f"Bearer {ALICE}"})
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    assert b"\r\ntrailer:" not in head.lower() and b"modelgate-usage" not in raw, raw
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), body[-80:]
    assert b'"usage"' not in body, "the client did not ask for usage"

    h2 = h2c_post(gateway.port, {"model": "claude-sonnet-4-6", "messages": HELLO, "max_tokens": 6, "stream": True,
                                 "stream_options": {"include_usage": True}}, {"authorization": f"Bearer {ALICE}"})
    assert h2.status == 200 and "trailer" not in h2.headers and h2.trailers == {}, (h2.headers, h2.trailers)
    assert b"modelgate-usage" not in h2.data
    usage = [json.loads(line[6:])["usage"] for line in h2.data.decode().splitlines()
             if line.startswith("data: {") and '"usage":{' in line]
    assert usage and usage[-1]["completion_tokens"] == 6, "the client asked for usage: it keeps it"

    wait_for_requests(gateway, counted_before + 2, within=5)
    after = metrics(gateway)
    grown = lambda name, at: after[f"{name}{at}"] - before.get(f"{name}{at}", 0)  # noqa: E731
    assert grown("modelgate_completion_tokens_total", llama) == 5
    assert grown("modelgate_completion_tokens_total", claude) == 6
    assert grown("modelgate_prompt_tokens_total", claude) == usage[-1]["prompt_tokens"]
    # Envoy reached the guard over HTTP/2, where no setting of its own can drop a trailer.
    assert envoy_stat(gateway, r"^cluster\.modelgate_stream_guard\.upstream_cx_http2_total$") >= 1


def test_the_usage_report_survives_an_ext_proc_crash_and_counts_each_request_once(gateway):
    bob = sdk(gateway, key=BOB)

    def bobs_llama_requests() -> int:
        rows = [r for r in report(gateway) if (r["key"], r["model"]) == ("bob", "llama-3.1-8b-instruct")]
        return rows[0]["requests"] if rows else 0

    def wait_for_bobs_llama_requests(count: int) -> None:
        deadline = time.monotonic() + 15
        while bobs_llama_requests() < count:
            assert time.monotonic() < deadline, report(gateway)
            time.sleep(0.1)

    for _ in range(3):
        bob.chat.completions.create(model="llama-3.1-8b-instruct", messages=HELLO, max_tokens=3)
    wait_for_bobs_llama_requests(3)
    before = report(gateway)

    gateway.kill("ext-proc")
    try:
        # The OpenAI route does not need ext-proc; its records wait in the filter meanwhile.
        for _ in range(2):
            bob.chat.completions.create(model="llama-3.1-8b-instruct", messages=HELLO, max_tokens=3)
    finally:
        gateway.restart("ext-proc")
    gateway.wait_for_port(gateway.ports[EXT_PROC_ADMIN_PORT])

    wait_for_bobs_llama_requests(5)
    # A few more batch ticks: nothing sent again is counted again.
    time.sleep(0.5)
    after = report(gateway)
    assert [r for r in after if r["key"] != "bob" or r["model"] != "llama-3.1-8b-instruct"] == \
        [r for r in before if r["key"] != "bob" or r["model"] != "llama-3.1-8b-instruct"]
    llama = next(r for r in after if (r["key"], r["model"]) == ("bob", "llama-3.1-8b-instruct"))
    assert (llama["requests"], llama["completion_tokens"]) == (5, 15)
    # Each batch came named by its Envoy worker's VM and number, and the name is kept with the sums.
    log = (gateway.data_dir / "usage" / "log.ndjson").read_text().splitlines()
    assert log and all(re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+-[0-9]+", json.loads(line)["batch"]) for line in log)
