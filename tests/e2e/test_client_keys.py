"""Client API keys: with `client_keys` configured, the gateway admits only callers
with a known key (stored as a SHA-256 digest), each to the models it may use."""

import hashlib
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from harness import Stack, edit_filter_config, labels, metrics, new_request_id as rid, received_by, sdk

FULL, LLAMA_ONLY = "sk-team-full-0001", "sk-team-llama-0002"
# Keys with rate limits: four requests a minute in all; sixty a minute for llama models;
# sixty tokens a minute (one a second) and a hundred requests.
LIMITED, BURSTY, METERED = "sk-limited-0003", "sk-bursty-0004", "sk-metered-0005"
# Sixty tokens a minute for the concurrency test; 120 for the aborted stream's.
CROWDED, ABORTING = "sk-crowded-0006", "sk-aborting-0007"
# Two requests a minute, llama models only: the key a batch's lines are sent as.
PACED = "sk-paced-0008"
HELLO = [{"role": "user", "content": "hello"}]


def with_client_keys(config: dict) -> None:
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    edit_filter_config(config, lambda routing: routing.update(client_keys=[
        {"name": "full", "sha256": digest(FULL)},
        {"name": "llama", "sha256": digest(LLAMA_ONLY), "models": ["llama-*"]},
        {"name": "limited", "sha256": digest(LIMITED), "limits": {"requests_per_minute": 4}},
        {"name": "bursty", "sha256": digest(BURSTY),
         "limits": {"requests_per_minute": 1000, "models": {"llama-*": {"requests_per_minute": 60}}}},
        {"name": "metered", "sha256": digest(METERED),
         "limits": {"requests_per_minute": 100, "tokens_per_minute": 60}},
        {"name": "crowded", "sha256": digest(CROWDED), "limits": {"tokens_per_minute": 60}},
        {"name": "aborting", "sha256": digest(ABORTING), "limits": {"tokens_per_minute": 120}},
        {"name": "paced", "sha256": digest(PACED), "models": ["llama-*"], "limits": {"requests_per_minute": 2}},
    ]))


@pytest.fixture(scope="module")
def keyed():
    with Stack(adjust_config=with_client_keys) as s:
        yield s


def test_a_wrong_key_is_a_401_that_quotes_no_key(keyed, spec):
    client = openai.OpenAI(base_url=keyed.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="llama-3.1-8b-instruct", messages=HELLO)
    assert (err.value.status_code, err.value.body["code"]) == (401, "invalid_api_key")
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.response.headers["x-request-id"]
    assert "sk-" not in err.value.body["message"]
    spec.validate("ErrorResponse", err.value.response.json())
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_missing_key_is_a_401(keyed, spec):
    # The SDK will not send a request without a key, so this one is sent by hand.
    for answer in [httpx2.post(f"{keyed.base_url}/chat/completions",
                               json={"model": "llama-3.1-8b-instruct", "messages": HELLO}),
                   httpx2.get(f"{keyed.base_url}/models", headers={"authorization": "Basic dXNlcjpwYXNz"})]:
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.json()["error"]["message"].startswith("You didn't provide an API key")
        assert answer.headers["x-should-retry"] == "false" and answer.headers["x-request-id"]
        spec.validate("ErrorResponse", answer.json())


def test_a_known_key_is_served_and_not_passed_on(keyed):
    request_id = rid()
    completion = sdk(keyed, key=FULL).chat.completions.create(
        model="llama-3.1-8b-instruct", messages=HELLO, extra_headers={"x-request-id": request_id})
    assert completion.choices[0].message.content
    assert "authorization" not in received_by(keyed, "vllm-llama", request_id)["headers"]
    streamed = sdk(keyed, key=FULL).chat.completions.create(model="claude-sonnet-4-6", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


def test_the_azure_style_api_key_header_is_accepted(keyed):
    answer = httpx2.post(f"{keyed.base_url}/chat/completions", headers={"api-key": LLAMA_ONLY},
                         json={"model": "llama-3.1-8b-instruct", "messages": HELLO})
    assert answer.status_code == 200, answer.text


def test_a_key_sees_and_uses_only_its_models(keyed):
    client = sdk(keyed, key=LLAMA_ONLY)
    listed = [m.id for m in client.models.list()]
    assert listed and all(m.startswith("llama-") for m in listed), listed
    assert "claude-sonnet-4-6" in [m.id for m in sdk(keyed, key=FULL).models.list()]
    for call in [lambda: client.chat.completions.create(model="claude-sonnet-4-6", messages=HELLO),
                 lambda: client.models.retrieve("claude-sonnet-4-6")]:
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "model_not_found"
    assert client.models.retrieve("llama-3.1-70b").id == "llama-3.1-70b"


def chat(keyed, key: str, model: str = "llama-3.1-8b-instruct", headers: dict | None = None,
         **params) -> httpx2.Response:
    """One chat request on a connection of its own, so Envoy's worker threads share the load."""
    with httpx2.Client(timeout=10) as fresh:
        return fresh.post(f"{keyed.base_url}/chat/completions",
                          headers={"authorization": f"Bearer {key}", **(headers or {})},
                          json={"model": model, "messages": HELLO, **params})


def test_a_keys_requests_per_minute_hold_across_envoys_workers(keyed, spec):
    answers = [chat(keyed, LIMITED) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 4 + [429] * 4
    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["4"] * 8
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["3", "2", "1", "0"] + ["0"] * 4
    # A unit comes back every 15 s, so the bucket is full again 15 s after each request counted.
    resets = [float(a.headers["x-ratelimit-reset-requests"].rstrip("s")) for a in answers[:4]]
    assert all(abs(reset - 15 * (i + 1)) < 1 for i, reset in enumerate(resets)), resets
    refused = answers[4]
    assert refused.headers["x-ratelimit-reset-requests"].startswith("59.") or \
        refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert 14 <= int(refused.headers["retry-after"]) <= 15
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert "Limit 4, Used 4, Requested 1" in error["message"] and LIMITED not in error["message"]
    assert refused.headers["x-request-id"]
    spec.validate("ErrorResponse", refused.json())


def test_a_models_limit_refuses_then_recovers_and_the_sdk_waits_it_out(keyed):
    start, answers = time.monotonic(), []
    while len(answers) < 200 and (not answers or answers[-1].status_code == 200):
        answers.append(chat(keyed, BURSTY))
    elapsed = time.monotonic() - start
    # Sixty at once, and one more for every second the loop took (the bucket refills as it goes).
    assert answers[-1].status_code == 429
    assert 60 <= len(answers) - 1 <= 60 + math.ceil(elapsed), (len(answers), elapsed)
    assert answers[-1].headers["x-ratelimit-limit-requests"] == "60"
    # The key's own limit is far off: another model is still served.
    other = chat(keyed, BURSTY, model="qwen-2.5-7b-instruct")
    assert other.status_code == 200
    assert other.headers["x-ratelimit-limit-requests"] == "1000"
    # The official SDK honours retry-after (one unit is back within a second) and gets its answer.
    client = openai.OpenAI(base_url=keyed.base_url, api_key=BURSTY, max_retries=2)
    raw = client.chat.completions.with_raw_response.create(model="llama-3.1-8b-instruct", messages=HELLO)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-ratelimit-limit-requests"] == "60"


def token_headers(answer) -> tuple[str, str, str]:
    return tuple(answer.headers.get(f"x-ratelimit-{what}-tokens") for what in ["limit", "remaining", "reset"])


def seconds(duration: str) -> float:
    """An OpenAI reset duration (`20ms`, `1.5s`, `1m2s`) in seconds."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    minutes, _, rest = duration.rpartition("m")
    return int(minutes or 0) * 60 + float(rest.rstrip("s"))


def test_a_keys_tokens_per_minute_reserve_then_settle_every_answer_then_refuse_then_recover(keyed, spec):
    # Six tokens an answer: one of prompt and five of completion. Each request reserves fourteen on
    # admission (its prompt, estimated at nine, and its max_tokens) and gives back the eight it did
    # not use when its answer ends; the headers show what is left once its reservation is taken.
    start = time.monotonic()
    first = chat(keyed, METERED, max_tokens=5)
    assert first.json()["usage"]["total_tokens"] == 6
    assert token_headers(first) == ("60", "46", "14s")
    assert first.headers["x-ratelimit-remaining-requests"] == "99"

    # A stream whose client did not ask for usage is settled all the same, and gets no usage.
    request_id = rid()
    with httpx2.stream("POST", f"{keyed.base_url}/chat/completions", timeout=10,
                       headers={"authorization": f"Bearer {METERED}", "x-request-id": request_id},
                       json={"model": "llama-3.1-8b-instruct", "messages": HELLO, "max_tokens": 5, "stream": True}) as s:
        streamed_left = int(token_headers(s)[1])
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in c and c["choices"] for c in chunks), chunks
    assert received_by(keyed, "vllm-llama", request_id)["body"]["stream_options"] == {"include_usage": True}

    # A client that asks for usage gets it, and it is counted once.
    asked = sdk(keyed, key=METERED).chat.completions.create(
        model="llama-3.1-8b-instruct", messages=HELLO, max_tokens=5, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in asked if c.usage]
    assert [u.total_tokens for u in usage] == [6]

    answers = []
    while len(answers) < 10 and (not answers or answers[-1].status_code == 200):
        answers.append(chat(keyed, METERED, max_tokens=5))
    # A token comes back every second: what is left is off by as many as the test took.
    slack = math.ceil(time.monotonic() - start)
    # 60 - 3 x 6 = 42 left, six a request: the sixth finds twelve left, too few for its fourteen
    # (unless the test was slow enough for some to come back).
    served, refused = answers[:-1], answers[-1]
    left = [streamed_left] + [int(token_headers(a)[1]) for a in served]
    want = [40] + [28 - 6 * i for i in range(len(served))]
    assert all(0 <= got - wanted <= slack for got, wanted in zip(left, want)), (left, slack)
    assert 5 <= len(served) <= 5 + slack and refused.status_code == 429, [a.status_code for a in answers]
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("tokens", "rate_limit_exceeded", None)
    used = int(re.search(r"Limit 60, Used (\d+), Requested 14\.", error["message"])[1])
    assert "tokens per min (TPM)" in error["message"] and 60 - used < 14, error["message"]
    assert METERED not in error["message"]
    spec.validate("ErrorResponse", refused.json())
    # It waits until the fourteen fit: a second for each one missing.
    assert 1 <= int(refused.headers["retry-after"]) <= 14 - (60 - used), refused.headers["retry-after"]
    assert token_headers(refused)[:2] == ("60", str(60 - used))
    assert used - 1 < seconds(token_headers(refused)[2]) <= used
    assert int(refused.headers["x-ratelimit-remaining-requests"]) >= \
        int(served[-1].headers["x-ratelimit-remaining-requests"]), "a refusal spends no request"

    time.sleep(int(refused.headers["retry-after"]))
    recovered = chat(keyed, METERED, max_tokens=5)
    assert recovered.status_code == 200
    assert int(token_headers(recovered)[1]) < 14, "let in once its fourteen fit, not later"


def test_concurrent_requests_are_admitted_only_as_far_as_their_reservations_fit(keyed, spec):
    # Sixteen requests at once, each answered after a second with six tokens (one of prompt,
    # five of completion): each reserves its prompt's estimate and its max_tokens on admission,
    # so only those that fit in the key's sixty are let in, and the rest get a 429 at once.
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: chat(keyed, CROWDED, max_tokens=5, headers={"x-sim-ttft-ms": "1500"}),
                                range(16)))
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert served and refused, [a.status_code for a in answers]
    # The first let in found the bucket full: what it left shows what each reserves. No more were let
    # in than fit (give or take the token that may have come back during the burst).
    reserved = 60 - max(int(a.headers["x-ratelimit-remaining-tokens"]) for a in served)
    assert len(served) * reserved <= 60 + 1, (len(served), reserved)
    assert sum(a.json()["usage"]["total_tokens"] for a in served) <= 60
    for answer in refused:
        error = answer.json()["error"]
        assert (answer.status_code, error["type"], error["code"]) == (429, "tokens", "rate_limit_exceeded")
        assert "Limit 60" in error["message"] and "Requested" in error["message"], error["message"]
        spec.validate("ErrorResponse", answer.json())


def test_a_request_that_can_never_fit_is_refused_as_too_large(keyed, spec):
    answer = chat(keyed, CROWDED, max_tokens=100)
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert error["message"].startswith("Request too large for llama-3.1-8b-instruct"), error["message"]
    assert "Limit 60, Requested 1" in error["message"], error["message"]
    # Waiting would not help: the SDKs are told not to retry.
    assert answer.headers["x-should-retry"] == "false" and "retry-after" not in answer.headers
    spec.validate("ErrorResponse", answer.json())


def test_a_stream_the_client_abandons_keeps_its_reservation(keyed):
    # A stream of sixty tokens, one every 100 ms, abandoned after its first event: its answer's
    # usage never comes, so the sixty-odd tokens it reserved stay spent.
    with httpx2.stream("POST", f"{keyed.base_url}/chat/completions", timeout=10,
                       headers={"authorization": f"Bearer {ABORTING}", "x-sim-itl-ms": "100",
                                "x-sim-output-tokens": "60"},
                       json={"model": "llama-3.1-8b-instruct", "messages": HELLO, "max_tokens": 60,
                             "stream": True}) as s:
        assert s.status_code == 200
        next(s.iter_lines())
    time.sleep(1)
    after = chat(keyed, ABORTING, max_tokens=1)
    assert after.status_code == 200
    # Two tokens a second come back: what is left shows the abandoned stream's reservation still spent.
    assert int(token_headers(after)[1]) < 120 - 60, token_headers(after)


def test_the_batch_runner_sends_a_line_as_its_key_under_the_keys_models_and_limits(keyed):
    def line(name: str, model: str, token: str | None = None) -> httpx2.Response:
        headers = {"x-modelgate-internal-token": token or keyed.internal_token, "x-modelgate-on-behalf-of": name}
        return httpx2.post(f"{keyed.base_url}/chat/completions", json={"model": model, "messages": HELLO},
                           headers=headers, timeout=30)

    assert line("paced", "llama-3.1-8b-instruct").status_code == 200
    hidden = line("paced", "claude-sonnet-4-6")
    assert (hidden.status_code, hidden.json()["error"]["code"]) == (404, "model_not_found")
    assert line("paced", "llama-3.1-8b-instruct").status_code == 200
    paced = line("paced", "llama-3.1-8b-instruct")
    assert (paced.status_code, paced.json()["error"]["code"]) == (429, "rate_limit_exceeded")
    assert int(paced.headers["retry-after"]) > 0
    unknown = line("nobody", "llama-3.1-8b-instruct")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (401, "invalid_api_key")
    # Without the token the two headers are a client's, and count for nothing.
    forged = line("full", "llama-3.1-8b-instruct", token="a-guess")
    assert (forged.status_code, forged.json()["error"]["code"]) == (401, "invalid_api_key")

    answered = labels(model="llama-3.1-8b-instruct", backend="llama-pool", key="paced", traffic="batch")
    deadline = time.monotonic() + 10
    while metrics(keyed).get(f"modelgate_requests_total{answered}") != 2:
        assert time.monotonic() < deadline, [k for k in metrics(keyed) if 'key="paced"' in k]
        time.sleep(0.2)


@pytest.mark.parametrize("method,path", [("POST", "/files"), ("GET", "/files/file-1/content"), ("GET", "/batches"),
                                         ("POST", "/batches/batch_1/cancel")])
def test_the_files_and_batch_apis_need_a_key_as_every_endpoint_does(keyed, spec, method, path):
    upload = {"file": ("input.jsonl", b'{"custom_id":"a"}\n'), "purpose": (None, "batch")}
    for headers in [{}, {"authorization": "Bearer sk-not-a-key"}]:
        answer = httpx2.request(method, f"{keyed.base_url}{path}", headers=headers, timeout=30,
                                files=upload if method == "POST" else None)
        assert (answer.status_code, answer.json()["error"]["code"]) == (401, "invalid_api_key")
        spec.validate("ErrorResponse", answer.json())
