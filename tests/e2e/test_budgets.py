"""Spend and token budgets per client key, as an operator and the official SDKs see them: a
request is admitted only if what it may cost at most still fits the key's budgets, so
concurrent requests cannot overrun them; a spent budget answers 429 `insufficient_quota`,
naming the budget and when it resets; `GET /v1/usage/budgets` shows what is spent and
reserved; a model with fallbacks may move on to a backend whose budget is not spent; budgets
reset at midnight UTC (on a clock the test sets) and survive ext-proc being killed."""

import datetime
import os
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from harness import (EXT_PROC_ADMIN_PORT, FakeClock, Stack, budgets, client_key, edit_filter_config, held_at_gate,
                     new_prompt, open_gate, sdk)

SPENDER, TOKENER, CROWD, FRUGAL, DURABLE, NIGHTLY, FREE = (
    "sk-spender-budget-01", "sk-tokener-budget-02", "sk-crowd-budget-03", "sk-frugal-budget-04",
    "sk-durable-budget-05", "sk-nightly-budget-06", "sk-free-budget-07")
LLAMA, LLAMA_BACKEND = "llama-3.1-8b-instruct", "vllm-llama"
# A thousandth of a dollar a token, in and out: budgets of a few cents hold a few requests.
PRICE = {"input_per_million": 1000, "output_per_million": 1000}


def with_budgets(config: dict) -> None:
    """Keys with budgets; `pricey-llama` at PRICE; `frugal-llama` and `strict-llama`, two
    models whose backend (the llama pool) has a qwen fallback at the same price: the first moves
    on when a budget refuses the llama pool, the second refuses."""
    def edit(routing: dict) -> None:
        routing["client_keys"] = [
            client_key("spender", SPENDER, budgets={"usd_per_day": 0.05, "usd_per_month": 10}),
            client_key("tokener", TOKENER, budgets={"tokens_per_day": 1000,
                                                    "models": {"pricey-*": {"tokens_per_day": 40}}}),
            client_key("crowd", CROWD, budgets={"usd_per_day": 0.1}),
            client_key("frugal", FRUGAL, budgets={"backends": {"llama-pool": {"usd_per_day": 0.03}}}),
            client_key("durable", DURABLE, budgets={"tokens_per_day": 30}),
            client_key("nightly", NIGHTLY, budgets={"tokens_per_day": 30}),
            client_key("free", FREE),
        ]
        routing["accounting"]["flush_interval_ms"] = 100
        # A loaded test machine may need more than the default 200 ms to answer.
        routing["budgets"] = {"cluster": "modelgate_admin", "timeout_ms": 2000}
        fallback = [{"backend": "qwen-pool", "rename": "qwen-2.5-7b-instruct", "price": PRICE}]
        routing["models"][:0] = [
            {"match": "pricey-llama", "backend": "llama-pool", "rename": LLAMA, "price": PRICE},
            {"match": "frugal-llama", "backend": "llama-pool", "rename": LLAMA, "price": PRICE,
             "on_budget_exhausted": "fallback", "fallbacks": fallback},
            {"match": "strict-llama", "backend": "llama-pool", "rename": LLAMA, "price": PRICE, "fallbacks": fallback},
        ]
    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def gateway():
    with Stack(adjust_config=with_budgets) as s:
        yield s


def ask(client: openai.OpenAI, model: str = "pricey-llama", headers: dict | None = None, **params):
    """A chat completion of at most five tokens, raw: its headers and its parsed answer (`.parse()`)."""
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": new_prompt("budget")}], max_tokens=5,
        extra_headers=headers or {}, **params)


def cost(usage) -> float:
    """What an answer costs at PRICE, in dollars."""
    return (usage.prompt_tokens * PRICE["input_per_million"] + usage.completion_tokens * PRICE["output_per_million"]) / 1e6


def settled(gateway, key: str) -> dict[tuple[str, str], dict]:
    """The key's budgets once every reservation is settled: each request's record reaches
    ext-proc with its Envoy worker's next batch (every 100 ms here)."""
    deadline = time.monotonic() + 10
    while True:
        rows = budgets(gateway, key)
        if not any(row["reserved"] for row in rows.values()):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def spend_until_refused(gateway, client: openai.OpenAI, key: str, model: str = "pricey-llama"):
    """Requests one at a time, each settled before the next, until one is refused: the usages
    of those served, and the refusal."""
    usages = []
    for _ in range(20):
        try:
            usages.append(ask(client, model).parse().usage)
        except openai.RateLimitError as refusal:
            return usages, refusal
        settled(gateway, key)
    pytest.fail(f"{key} was never refused: {budgets(gateway, key)}")


def assert_refused(refusal: openai.RateLimitError, budget: str, resets: datetime.date) -> None:
    assert refusal.status_code == 429
    assert (refusal.type, refusal.code) == ("insufficient_quota", "insufficient_quota")
    assert refusal.body["message"] == f"You exceeded your budget: {budget} is spent until {resets.isoformat()}T00:00:00Z."
    assert refusal.response.headers["x-should-retry"] == "false"
    assert refusal.response.headers["x-request-id"]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def midnight_after(day: datetime.date) -> int:
    return int(datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(),
                                         datetime.timezone.utc).timestamp())


def test_a_spent_usd_budget_refuses_with_insufficient_quota(gateway):
    client = sdk(gateway, key=SPENDER)
    today = utc_now().date()
    usages, refusal = spend_until_refused(gateway, client, "spender")
    assert len(usages) >= 2
    assert_refused(refusal, "usd_per_day of key `spender`", today + datetime.timedelta(days=1))

    rows = settled(gateway, "spender")
    day, month = rows[("key", "usd_per_day")], rows[("key", "usd_per_month")]
    assert (day["key"], day["period"], day["limit"], day["reserved"]) == ("spender", today.isoformat(), 0.05, 0)
    assert day["spent"] == pytest.approx(sum(map(cost, usages))) and day["spent"] <= day["limit"]
    assert day["resets_at"] == midnight_after(today)
    assert (month["period"], month["limit"], month["spent"]) == (today.strftime("%Y-%m"), 10, day["spent"])
    # Whatever the API: a Messages request is refused in Anthropic's envelope.
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key=SPENDER, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as refused:
        claude.messages.create(model="pricey-llama", max_tokens=50, messages=[{"role": "user", "content": "hello"}])
    assert refused.value.body["type"] == "error"
    assert "spender" in refused.value.body["error"]["message"]


def test_a_token_budget_on_a_model_pattern(gateway):
    client = sdk(gateway, key=TOKENER)
    usages, refusal = spend_until_refused(gateway, client, "tokener")
    assert_refused(refusal, "tokens_per_day of key `tokener` on models `pricey-*`",
                   utc_now().date() + datetime.timedelta(days=1))
    rows = settled(gateway, "tokener")
    spent = sum(u.total_tokens for u in usages)
    assert rows[("model:pricey-*", "tokens_per_day")]["spent"] == spent <= 40
    # The key's own budget counts the same tokens, and other models are not under the pattern's.
    assert rows[("key", "tokens_per_day")]["spent"] == spent
    assert ask(client, LLAMA).parse().choices[0].message.content


def test_concurrent_requests_are_admitted_only_as_far_as_the_budget_holds(gateway):
    client, gate = sdk(gateway, key=CROWD), f"crowd-{time.time_ns()}"

    def stream(_):
        try:
            raw = ask(client, stream=True, stream_options={"include_usage": True}, headers={"x-sim-gate": gate})
            return [chunk.usage for chunk in raw.parse() if chunk.usage][0]
        except openai.RateLimitError as refusal:
            return refusal

    with ThreadPoolExecutor(10) as pool:
        outcomes = [pool.submit(stream, i) for i in range(10)]
        # Each admitted stream is held by the backend after its first token, its reservation held.
        while held_at_gate(gateway, LLAMA_BACKEND, gate) + sum(o.done() for o in outcomes) < 10:
            time.sleep(0.05)
        admitted = held_at_gate(gateway, LLAMA_BACKEND, gate)
        during = budgets(gateway, "crowd")[("key", "usd_per_day")]
        open_gate(gateway, LLAMA_BACKEND, gate)
        outcomes = [o.result() for o in outcomes]

    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    usages = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    assert 0 < admitted < 10 and len(usages) == admitted and len(refused) == 10 - admitted
    assert all(r.code == "insufficient_quota" for r in refused)
    # Each reserved the most it could cost; the next would not have fitted.
    each = during["reserved"] / admitted
    assert during["spent"] == 0 and during["reserved"] <= during["limit"] < during["reserved"] + each
    assert all(cost(u) <= each for u in usages)
    # Settled with what they cost: never more than the budget.
    after = settled(gateway, "crowd")[("key", "usd_per_day")]
    assert after["spent"] == pytest.approx(sum(map(cost, usages))) and after["spent"] <= after["limit"]


def test_a_spent_backend_budget_moves_a_fallback_model_on(gateway):
    client = sdk(gateway, key=FRUGAL)
    served_by = []
    for _ in range(20):
        served_by.append(ask(client, "frugal-llama").headers["modelgate-backend"])
        if served_by[-1] != "llama-pool":
            break
        settled(gateway, "frugal")
    assert served_by[-1] == "qwen-pool" and set(served_by[:-1]) == {"llama-pool"}, served_by
    # A model that refuses instead says which budget is spent.
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, "strict-llama")
    assert_refused(refused.value, "usd_per_day of key `frugal` on backend `llama-pool`",
                   utc_now().date() + datetime.timedelta(days=1))
    row = settled(gateway, "frugal")[("backend:llama-pool", "usd_per_day")]
    assert row["spent"] <= row["limit"] == 0.03


def test_budgets_survive_ext_proc_being_killed(gateway):
    client = sdk(gateway, key=DURABLE)
    usages, refusal = spend_until_refused(gateway, client, "durable")
    before = settled(gateway, "durable")
    assert before[("key", "tokens_per_day")]["spent"] == sum(u.total_tokens for u in usages)

    gateway.kill("ext-proc")
    try:
        # No store, no admission (budgets.on_failure: deny, the default); keys without budgets go on.
        with pytest.raises(openai.InternalServerError) as unavailable:
            ask(client)
        assert (unavailable.value.status_code, unavailable.value.code) == (503, "budgets_unavailable")
        assert ask(sdk(gateway, key=FREE), LLAMA).parse().choices[0].message.content
    finally:
        gateway.restart("ext-proc")
    gateway.wait_for_port(gateway.ports[EXT_PROC_ADMIN_PORT])
    assert settled(gateway, "durable") == before
    with pytest.raises(openai.RateLimitError):
        ask(client)


def test_a_spent_budget_resets_at_midnight_utc():
    if not FakeClock.available() and not os.environ.get("CI"):
        pytest.skip("libfaketime is not installed (Debian: apt-get install libfaketime; .ci/run installs it)")
    # The last day of this month, ten seconds before its end: the day and the month end together.
    today = utc_now().date()
    last = (today.replace(day=28) + datetime.timedelta(days=4)).replace(day=1) - datetime.timedelta(days=1)
    eve = datetime.datetime.combine(last, datetime.time(23, 59, 50), datetime.timezone.utc)
    clock = FakeClock(eve)
    with Stack(adjust_config=with_budgets, ext_proc_env=clock.env) as gateway:
        client = sdk(gateway, key=NIGHTLY)
        usages, refusal = spend_until_refused(gateway, client, "nightly")
        next_day = last + datetime.timedelta(days=1)
        assert_refused(refusal, "tokens_per_day of key `nightly`", next_day)
        row = settled(gateway, "nightly")[("key", "tokens_per_day")]
        assert (row["period"], row["resets_at"]) == (last.isoformat(), midnight_after(last))

        clock.set(eve + datetime.timedelta(seconds=20))
        usage = ask(client).parse().usage
        row = settled(gateway, "nightly")[("key", "tokens_per_day")]
        assert (row["period"], row["spent"], row["resets_at"]) == (next_day.isoformat(), usage.total_tokens,
                                                                   midnight_after(next_day))
