"""Rate limits shared by several gateways: two Envoys (each with its own ext-proc) keep
their keys' buckets in one Redis, so a key's budget holds across both; when Redis is
gone, each follows its configured policy, and both recover by themselves."""

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from harness import Stack, edit_filter_config, envoy_stat, metrics, new_request_id as rid

SHARED, METERED, CROWDED = "sk-shared-0001", "sk-metered-0002", "sk-crowded-0003"
HELLO = [{"role": "user", "content": "hello"}]


def shared_keys(on_failure: str):
    def adjust(config: dict) -> None:
        def digest(key: str) -> str:
            return hashlib.sha256(key.encode()).hexdigest()

        def edit(routing: dict) -> None:
            routing["client_keys"] = [
                {"name": "shared", "sha256": digest(SHARED), "limits": {"requests_per_minute": 6}},
                {"name": "metered", "sha256": digest(METERED), "limits": {"tokens_per_minute": 30}},
                {"name": "crowded", "sha256": digest(CROWDED), "limits": {"tokens_per_minute": 60}},
            ]
            # A verdict later than timeout_ms lets a request through unlimited (or refuses it): on a loaded
            # test machine, the default 200 ms is not always enough.
            routing["shared_limits"] = {"cluster": "modelgate_admin", "on_failure": on_failure, "timeout_ms": 2000}
            # Token debits go to Redis with each batch: often, so the test need not wait.
            routing["accounting"]["flush_interval_ms"] = 100
        edit_filter_config(config, edit)
    return adjust


@pytest.fixture(scope="module")
def gateways(redis):
    """Gateway `open` lets requests through when Redis is gone; gateway `closed` refuses them."""
    # Redis's answer, like the store's verdict, is given time a loaded test machine may need.
    args = ["--redis-url", redis.url, "--redis-timeout-ms", "500"]
    with Stack(adjust_config=shared_keys("allow"), ext_proc_args=args) as open_, \
            Stack(adjust_config=shared_keys("deny"), ext_proc_args=args) as closed:
        yield open_, closed


def chat(gateway, key: str, headers: dict | None = None, **params) -> httpx2.Response:
    with httpx2.Client(timeout=10) as fresh:
        return fresh.post(f"{gateway.base_url}/chat/completions",
                          headers={"authorization": f"Bearer {key}", "x-request-id": rid(), **(headers or {})},
                          json={"model": "llama-3.1-8b-instruct", "messages": HELLO, **params})


def test_two_gateways_share_one_keys_request_budget(gateways):
    first, second = gateways
    answers = [chat(gateways[i % 2], SHARED) for i in range(8)]
    assert [a.status_code for a in answers] == [200] * 6 + [429] * 2
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["5", "4", "3", "2", "1", "0", "0", "0"]
    assert {a.headers["x-ratelimit-limit-requests"] for a in answers} == {"6"}
    refused = answers[6].json()["error"]
    assert (refused["type"], refused["code"]) == ("requests", "rate_limit_exceeded")
    assert 9 <= int(answers[6].headers["retry-after"]) <= 10


def test_tokens_spent_through_one_gateway_count_at_the_other(gateways):
    first, second = gateways
    # Each request reserves fourteen tokens in Redis on admission (its prompt, estimated at nine,
    # and its max_tokens), and uses six.
    spent = chat(first, METERED, max_tokens=5)
    assert spent.json()["usage"]["total_tokens"] == 6
    assert spent.headers["x-ratelimit-remaining-tokens"] == "16"
    # The first gateway gives back the eight unused with its next batch: every 100 ms here. A
    # token comes back every 2 s, so none has by the time the other gateway looks.
    time.sleep(0.5)
    seen = chat(second, METERED, max_tokens=5)
    assert seen.headers["x-ratelimit-remaining-tokens"] == "10"
    time.sleep(0.5)
    assert chat(first, METERED, max_tokens=5).headers["x-ratelimit-remaining-tokens"] == "4"


def test_concurrent_requests_through_both_gateways_are_admitted_only_as_far_as_they_fit(gateways):
    # Sixteen requests at once, half through each gateway, each answered after a second and a
    # half with six tokens: each reserves in Redis on admission, so only what fits in sixty is let in.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda i: chat(gateways[i % 2], CROWDED, max_tokens=5, headers={"x-sim-ttft-ms": "1500"}), range(16)))
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert served and refused, [a.status_code for a in answers]
    assert all("x-ratelimit-limit-tokens" in a.headers for a in served), \
        f"let through without the store's verdict; store errors: {[store_errors(g) for g in gateways]}"
    # The first let in found the bucket full: what it left shows what each reserves. No more were let
    # in than fit (give or take the token that may have come back during the burst).
    reserved = 60 - max(int(a.headers["x-ratelimit-remaining-tokens"]) for a in served)
    assert len(served) * reserved <= 60 + 1, (len(served), reserved)
    assert sum(a.json()["usage"]["total_tokens"] for a in served) <= 60
    assert {(a.status_code, a.json()["error"]["type"]) for a in refused} == {(429, "tokens")}


def store_errors(gateway) -> float:
    return metrics(gateway)["modelgate_limit_store_errors_total"]


def test_without_redis_each_gateway_follows_its_policy_then_recovers(redis, gateways):
    open_, closed = gateways
    redis.stop()
    try:
        let_through = chat(open_, SHARED)
        assert let_through.status_code == 200, let_through.text
        assert "x-ratelimit-limit-requests" not in let_through.headers, "unlimited while the store is gone"
        refused = chat(closed, SHARED)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "rate_limits_unavailable")
        assert refused.headers["x-request-id"] and refused.headers["x-should-retry"] == "true"
        # Requests of keys without limits never ask the store.
        for gateway in gateways:
            assert envoy_stat(gateway, "modelgate.shared_limits.store_failures") >= 1
            assert store_errors(gateway) >= 1
    finally:
        redis.start()
    # A new Redis is empty: the key's budget starts again, and both gateways use it by themselves
    # (each ext-proc reconnects on its next call).
    for gateway in gateways:
        deadline = time.monotonic() + 10
        while "x-ratelimit-limit-requests" not in (answer := chat(gateway, SHARED)).headers:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.status_code == 200 and answer.headers["x-ratelimit-limit-requests"] == "6"
