"""The response cache, as an operator who turned it on for a few routes sees it through the
official openai SDK: a repeated deterministic request is answered from the cache (the
`modelgate-cache` header says so, and the backend is not called again), whole or as a stream
the SDK parses whatever the first answer was; each client key has its own answers unless the
route shares them; answers expire; `Cache-Control` bypasses or skips the cache; errors and
answers cut short are never kept; hits are reported as served from the cache, at no cost; and
two gateways sharing Redis share hits, and answer as misses while Redis is gone."""

import time

import httpx2
import openai
import pytest

from harness import Stack, backend_calls, client_key, edit_filter_config, envoy_stat, metrics, new_prompt, sdk

ALICE, BOB, CAROL = "sk-alice-cache-0001", "sk-bob-cache-0002", "sk-carol-cache-0003"
LLAMA = "llama-3.1-8b-instruct"
# The demo's price of the llama model, per million tokens (envoy/demo.yaml).
PRICE = {"input_per_million": 0.05, "output_per_million": 0.08}
# The simulated backends' names, as /sim/requests is asked.
LLAMA_BACKEND, QWEN_BACKEND, ANTHROPIC_BACKEND = "vllm-llama", "sglang-qwen", "anthropic"


def cached(match: str, cache: dict, backend: str = "llama-pool", rename: str = LLAMA) -> dict:
    return {"match": match, "backend": backend, "rename": rename, "price": PRICE, "cache": cache}


def with_cache(config: dict) -> None:
    """Keys alice, bob and carol, and routes that cache: `cached-llama` for five minutes,
    `shared-llama` for every key at once, `brief-llama` for a second, `always-llama`
    whatever the request's parameters, `cached-claude` (a translated backend), and
    `backend-cached` through a backend whose every answer is cached."""
    def edit(routing: dict) -> None:
        routing["client_keys"] = [client_key("alice", ALICE), client_key("bob", BOB), client_key("carol", CAROL)]
        routing["accounting"]["flush_interval_ms"] = 100
        # A loaded test machine may need more than the default 200 ms to answer.
        routing["cache"] = {"cluster": "modelgate_admin", "timeout_ms": 2000}
        routing["backends"]["caching-qwen"] = {"cluster": "qwen_pool", "owned_by": "sglang",
                                               "cache": {"ttl_secs": 300}}
        routing["models"][:0] = [
            cached("cached-llama", {"ttl_secs": 300}),
            cached("shared-llama", {"ttl_secs": 300, "shared": True}),
            cached("brief-llama", {"ttl_secs": 1}),
            cached("always-llama", {"ttl_secs": 300, "mode": "always"}),
            cached("cached-claude", {"ttl_secs": 300}, backend="anthropic", rename="claude-haiku-4-5"),
            {"match": "backend-cached", "backend": "caching-qwen", "rename": "qwen-2.5-7b-instruct"},
        ]
    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def gateway():
    with Stack(adjust_config=with_cache) as s:
        yield s


def ask(client: openai.OpenAI, model: str, prompt: str, headers: dict | None = None, **params):
    """A deterministic chat completion (temperature 0 unless `params` say otherwise), raw: its
    headers and its parsed answer (`.parse()`)."""
    params.setdefault("temperature", 0)
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], extra_headers=headers or {}, **params)


def streamed(raw) -> tuple[str, list[str], list]:
    """A streamed answer as the SDK parsed it: its text, its finish reasons and its usages."""
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, [c.usage for c in chunks if c.usage]


def test_a_repeated_deterministic_request_is_answered_from_the_cache(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    first = ask(alice, "cached-llama", prompt, max_tokens=8)
    second = ask(alice, "cached-llama", prompt, max_tokens=8)
    assert (first.headers["modelgate-cache"], second.headers["modelgate-cache"]) == ("miss", "hit")
    assert second.headers["x-request-id"] and second.headers["content-type"].startswith("application/json")
    miss, hit = first.parse(), second.parse()
    assert hit.model == miss.model
    assert [c.model_dump() for c in hit.choices] == [c.model_dump() for c in miss.choices]
    assert hit.usage == miss.usage and miss.usage.completion_tokens == 8
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1
    # Key order, whitespace and the members that do not change the answer are not the request's meaning.
    reordered = httpx2.post(f"{gateway.base_url}/chat/completions",
                            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"},
                            content=f'{{ "user": "someone", "max_tokens": 8, "temperature": 0, "messages": '
                                    f'[{{"content": "{prompt}", "role": "user"}}], "model": "cached-llama" }}')
    assert reordered.status_code == 200 and reordered.headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_a_repeat_sent_the_moment_the_answer_arrives_is_a_hit(gateway):
    # The answer's end leaves once the store has it, so no repeat races the store.
    alice = sdk(gateway, key=ALICE)
    for stream in [False, True] * 10:
        prompt = new_prompt("at once")
        first = ask(alice, "cached-llama", prompt, max_tokens=4, stream=stream)
        if stream:
            streamed(first)  # the whole stream is read, to its end
        else:
            first.parse()
        again = ask(alice, "cached-llama", prompt, max_tokens=4, stream=stream)
        assert (first.headers["modelgate-cache"], again.headers["modelgate-cache"]) == ("miss", "hit"), stream


def test_exact_repeats_of_a_hit_are_answered_by_envoy_alone(gateway):
    """After one hit from ext-proc's store, each Envoy worker answers byte-identical repeats from
    its own copy: the same answer, marked a hit, with no lookup in ext-proc."""
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    first = ask(alice, "cached-llama", prompt, max_tokens=8)
    store_hits = lambda: metrics(gateway)['modelgate_cache_lookups_total{result="hit"}']  # noqa: E731
    local_hits = lambda: envoy_stat(gateway, "modelgate.cache.local_hits")  # noqa: E731
    before = (store_hits(), local_hits())
    repeats = [ask(alice, "cached-llama", prompt, max_tokens=8) for _ in range(6)]
    assert {r.headers["modelgate-cache"] for r in repeats} == {"hit"}
    answers = {r.parse().model_dump_json() for r in repeats}
    assert len(answers) == 1 and first.parse().model_dump_json() in answers
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1
    from_store, from_copies = store_hits() - before[0], local_hits() - before[1]
    # Each worker asks the store once, then answers from its copy.
    assert from_store + from_copies == 6 and 1 <= from_store <= gateway.envoy_concurrency
    # A stream is another request's bytes: its first repeat asks the store again.
    stream = ask(alice, "cached-llama", prompt, max_tokens=8, stream=True)
    assert stream.headers["modelgate-cache"] == "hit" and streamed(stream)[1] == ["length"]


def test_a_whole_answer_is_replayed_as_the_stream_the_client_asks_for(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    whole = ask(alice, "cached-llama", prompt).parse()
    with_usage = ask(alice, "cached-llama", prompt, stream=True, stream_options={"include_usage": True})
    assert with_usage.headers["modelgate-cache"] == "hit"
    assert with_usage.headers["content-type"].startswith("text/event-stream")
    text, finishes, usages = streamed(with_usage)
    assert (text, finishes, usages) == (whole.choices[0].message.content, [whole.choices[0].finish_reason],
                                        [whole.usage])
    # Without include_usage, no usage chunk.
    without = ask(alice, "cached-llama", prompt, stream=True)
    assert without.headers["modelgate-cache"] == "hit"
    assert streamed(without) == (whole.choices[0].message.content, [whole.choices[0].finish_reason], [])
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_a_streamed_answer_is_replayed_whole_or_streamed_again(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    first = ask(alice, "cached-llama", prompt, stream=True, stream_options={"include_usage": True})
    assert first.headers["modelgate-cache"] == "miss"
    text, finishes, usages = streamed(first)
    whole = ask(alice, "cached-llama", prompt)
    assert whole.headers["modelgate-cache"] == "hit"
    answer = whole.parse()
    assert (answer.choices[0].message.content, [answer.choices[0].finish_reason], [answer.usage]) == \
        (text, finishes, usages)
    again = ask(alice, "cached-llama", prompt, stream=True, stream_options={"include_usage": True})
    assert again.headers["modelgate-cache"] == "hit" and streamed(again) == (text, finishes, usages)
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_a_hit_skips_the_translation_too(gateway):
    # What is kept is the answer as the client got it, in OpenAI's shape.
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    text, finishes, _ = streamed(ask(alice, "cached-claude", prompt, stream=True, max_tokens=6))
    hit = ask(alice, "cached-claude", prompt, max_tokens=6)
    assert hit.headers["modelgate-cache"] == "hit"
    choice = hit.parse().choices[0]
    assert (choice.message.content, [choice.finish_reason]) == (text, finishes)
    assert backend_calls(gateway, ANTHROPIC_BACKEND, prompt) == 1


def test_a_backend_can_cache_every_route_to_it(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    assert ask(alice, "backend-cached", prompt).headers["modelgate-cache"] == "miss"
    assert ask(alice, "backend-cached", prompt).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, QWEN_BACKEND, prompt) == 1


def test_each_key_sees_only_its_own_answers_unless_the_route_shares_them(gateway):
    alice, bob = sdk(gateway, key=ALICE), sdk(gateway, key=BOB)
    prompt = new_prompt("cache")
    assert ask(alice, "cached-llama", prompt).headers["modelgate-cache"] == "miss"
    assert ask(bob, "cached-llama", prompt).headers["modelgate-cache"] == "miss"
    assert ask(bob, "cached-llama", prompt).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2

    shared = new_prompt("cache")
    assert ask(alice, "shared-llama", shared).headers["modelgate-cache"] == "miss"
    assert ask(bob, "shared-llama", shared).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, shared) == 1


def test_an_answer_expires_after_its_ttl(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    assert ask(alice, "brief-llama", prompt).headers["modelgate-cache"] == "miss"
    assert ask(alice, "brief-llama", prompt).headers["modelgate-cache"] == "hit"
    # brief-llama keeps answers for a second.
    time.sleep(2.1)
    assert ask(alice, "brief-llama", prompt).headers["modelgate-cache"] == "miss"
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2


def test_cache_control_no_cache_asks_the_backend_and_no_store_keeps_nothing(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    ask(alice, "cached-llama", prompt)
    fresh = ask(alice, "cached-llama", prompt, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["modelgate-cache"] == "miss"
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2
    assert ask(alice, "cached-llama", prompt).headers["modelgate-cache"] == "hit"

    unkept = new_prompt("cache")
    # Directives are a comma-separated list, in any case.
    assert ask(alice, "cached-llama", unkept, headers={"Cache-Control": "max-age=0, No-Store"}) \
        .headers["modelgate-cache"] == "miss"
    assert ask(alice, "cached-llama", unkept).headers["modelgate-cache"] == "miss"
    assert ask(alice, "cached-llama", unkept).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, unkept) == 2


def test_only_deterministic_requests_are_cached_unless_the_route_says_always(gateway):
    alice = sdk(gateway, key=ALICE)
    sampled = new_prompt("cache")
    for _ in range(2):
        # The cache does not consider it: neither hit nor miss.
        assert "modelgate-cache" not in ask(alice, "cached-llama", sampled, temperature=0.7).headers
    assert backend_calls(gateway, LLAMA_BACKEND, sampled) == 2
    # A seed makes a sampled request repeatable.
    seeded = new_prompt("cache")
    ask(alice, "cached-llama", seeded, temperature=0.7, seed=7)
    assert ask(alice, "cached-llama", seeded, temperature=0.7, seed=7).headers["modelgate-cache"] == "hit"
    always = new_prompt("cache")
    assert ask(alice, "always-llama", always, temperature=0.7).headers["modelgate-cache"] == "miss"
    assert ask(alice, "always-llama", always, temperature=0.7).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, always) == 1


def test_errors_and_answers_cut_short_are_never_cached(gateway):
    alice, prompt = sdk(gateway, key=ALICE), new_prompt("cache")
    with pytest.raises(openai.InternalServerError):
        ask(alice, "cached-llama", prompt, headers={"x-sim-fail-status": "500"})
    assert ask(alice, "cached-llama", prompt).headers["modelgate-cache"] == "miss"
    assert ask(alice, "cached-llama", prompt).headers["modelgate-cache"] == "hit"
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2

    cut = new_prompt("cache")
    broken = ask(alice, "cached-llama", cut, stream=True, headers={"x-sim-abort-after": "2"})
    with pytest.raises(openai.APIError):
        streamed(broken)
    again = ask(alice, "cached-llama", cut, stream=True)
    assert again.headers["modelgate-cache"] == "miss"
    text, finishes, _ = streamed(again)
    assert text and len(finishes) == 1


def test_hits_are_reported_as_served_from_the_cache_at_no_cost(gateway):
    carol, prompt = sdk(gateway, key=CAROL), new_prompt("cache")
    miss = ask(carol, "cached-llama", prompt, max_tokens=5).parse()
    ask(carol, "cached-llama", prompt, max_tokens=5)
    cost = (miss.usage.prompt_tokens * PRICE["input_per_million"]
            + miss.usage.completion_tokens * PRICE["output_per_million"]) / 1e6

    # Records reach ext-proc with each worker's next batch (every 100 ms here).
    deadline = time.monotonic() + 10
    while not (row := carols_row(gateway)) or row["requests"] < 2:
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    assert (row["requests"], row["cache_hits"], row["cached_tokens"]) == (2, 1, miss.usage.total_tokens)
    # The backend's tokens are the miss's alone, and so is the cost.
    assert (row["prompt_tokens"], row["completion_tokens"]) == (miss.usage.prompt_tokens, 5)
    assert row["cost_usd"] == pytest.approx(cost)

    m = metrics(gateway)
    cached_tokens = {k: v for k, v in m.items() if k.startswith("modelgate_cached_tokens_total") and 'key="carol"' in k}
    assert list(cached_tokens.values()) == [miss.usage.total_tokens], cached_tokens
    assert m['modelgate_cache_lookups_total{result="hit"}'] >= 1
    assert m['modelgate_cache_lookups_total{result="miss"}'] >= 1


def carols_row(gateway) -> dict | None:
    rows = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/usage/report").json()["data"]
    return next((r for r in rows if (r["key"], r["backend"]) == ("carol", "llama-pool")), None)


# Two gateways whose ext-procs keep the cache in one Redis.

@pytest.fixture(scope="module")
def redis_gateways(redis):
    args = ["--redis-url", redis.url, "--redis-timeout-ms", "500"]
    with Stack(adjust_config=with_cache, ext_proc_args=args) as first, \
            Stack(adjust_config=with_cache, ext_proc_args=args) as second:
        yield first, second


def test_gateways_sharing_redis_share_hits(redis_gateways):
    first, second = redis_gateways
    prompt = new_prompt("cache")
    assert ask(sdk(first, key=ALICE), "cached-llama", prompt).headers["modelgate-cache"] == "miss"
    hit = ask(sdk(second, key=ALICE), "cached-llama", prompt)
    assert hit.headers["modelgate-cache"] == "hit"
    assert (backend_calls(first, LLAMA_BACKEND, prompt), backend_calls(second, LLAMA_BACKEND, prompt)) == (1, 0)


def test_without_redis_requests_are_answered_as_misses(redis, redis_gateways):
    first, _ = redis_gateways
    alice = sdk(first, key=ALICE)
    redis.stop()
    try:
        prompt = new_prompt("cache")
        for _ in range(2):
            answer = ask(alice, "cached-llama", prompt)
            assert answer.headers["modelgate-cache"] == "miss" and answer.parse().choices[0].message.content
        assert backend_calls(first, LLAMA_BACKEND, prompt) == 2
        assert metrics(first)["modelgate_cache_store_errors_total"] >= 1
    finally:
        redis.start()
    # A new Redis is empty; ext-proc uses it again by itself.
    prompt = new_prompt("cache")
    deadline = time.monotonic() + 10
    while ask(alice, "cached-llama", prompt).headers["modelgate-cache"] != "hit":
        assert time.monotonic() < deadline, "the cache did not come back with Redis"
        time.sleep(0.2)
