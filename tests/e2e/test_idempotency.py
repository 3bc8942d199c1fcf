"""Idempotent requests, as a client retrying with the official SDKs sees them: a request sent
again with the same `Idempotency-Key` (by the same client key, within the window) gets the
first answer, marked `modelgate-idempotent-replayed: true`, and the backend is called once; a
repeat while the first still runs is a 409 the SDK retries; the key with another body is a 422;
a first request that failed lets the repeat run."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2
import openai
import pytest

from harness import (Stack, backend_calls, client_key, edit_filter_config, held_at_gate, metrics, new_prompt,
                     open_gate, sdk)

ALICE, BOB = "sk-alice-idempotent-0001", "sk-bob-idempotent-0002"
LLAMA, LLAMA_BACKEND = "llama-3.1-8b-instruct", "vllm-llama"
REPLAYED = "modelgate-idempotent-replayed"


def with_idempotency(config: dict) -> None:
    def edit(routing: dict) -> None:
        routing["client_keys"] = [client_key("alice", ALICE), client_key("bob", BOB)]
        routing["accounting"]["flush_interval_ms"] = 100
        # A loaded test machine may need more than the default 200 ms to answer.
        routing["cache"] = {"cluster": "modelgate_admin", "timeout_ms": 2000}
        routing["idempotency"] = {"window_secs": 3600}
    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def gateway():
    with Stack(adjust_config=with_idempotency) as s:
        yield s


def ask(client: openai.OpenAI, idempotency_key: str, prompt: str, headers: dict | None = None, **params):
    """A chat completion under `idempotency_key`, raw: its headers and its parsed answer (`.parse()`)."""
    return client.chat.completions.with_raw_response.create(
        model=LLAMA, messages=[{"role": "user", "content": prompt}], max_tokens=6,
        extra_headers={"Idempotency-Key": idempotency_key, **(headers or {})}, **params)


def new_key() -> str:
    return f"retry-{uuid.uuid4()}"


# The first answer is kept once it ended, a moment after the client got it: a repeat arriving in
# that moment is a 409 with `retry-after: 1`, which the SDK retries.
def retrying(gateway, key: str = ALICE) -> openai.OpenAI:
    return sdk(gateway, retries=3, key=key)


def test_a_repeat_gets_the_first_answer_and_the_backend_is_called_once(gateway):
    alice, key, prompt = retrying(gateway), new_key(), new_prompt("idempotent")
    first = ask(alice, key, prompt)
    repeat = ask(alice, key, prompt)
    assert REPLAYED not in first.headers
    assert repeat.headers[REPLAYED] == "true"
    assert repeat.headers["x-request-id"] and repeat.headers["x-request-id"] != first.headers["x-request-id"]
    # The same answer, byte for byte: its id too.
    assert repeat.http_response.content == first.http_response.content
    assert repeat.parse().id == first.parse().id
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1
    assert metrics(gateway)["modelgate_idempotent_replays_total"] >= 1


def test_a_streamed_request_is_replayed_as_it_streamed(gateway):
    alice, key, prompt = retrying(gateway), new_key(), new_prompt("idempotent")

    def chunks():
        raw = ask(alice, key, prompt, stream=True, stream_options={"include_usage": True})
        return raw.headers.get(REPLAYED), [c.model_dump() for c in raw.parse()]

    (first_mark, first), (repeat_mark, repeat) = chunks(), chunks()
    assert (first_mark, repeat_mark) == (None, "true")
    assert repeat == first and first[-1]["usage"]["completion_tokens"] == 6
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_a_repeat_while_the_first_runs_is_refused_then_replayed(gateway):
    alice, key, prompt = sdk(gateway, key=ALICE), new_key(), new_prompt("idempotent")
    gate = f"idempotent-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as pool:
        # The first is a stream the backend holds after its first token.
        first = pool.submit(lambda: [c.model_dump() for c in ask(alice, key, prompt, stream=True,
                                                                 headers={"x-sim-gate": gate}).parse()])
        while held_at_gate(gateway, LLAMA_BACKEND, gate) == 0:
            assert not first.done(), first.result()
        for _ in range(2):
            with pytest.raises(openai.ConflictError) as refused:
                ask(alice, key, prompt, stream=True)
            error = refused.value.body
            assert (error["type"], error["code"]) == ("invalid_request_error", "idempotency_key_in_use")
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.response.headers["x-request-id"]
        open_gate(gateway, LLAMA_BACKEND, gate)
        answer = first.result()
    repeat = ask(retrying(gateway), key, prompt, stream=True)
    assert repeat.headers[REPLAYED] == "true"
    assert [c.model_dump() for c in repeat.parse()] == answer
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_concurrent_repeats_reach_the_backend_once(gateway):
    alice, key, prompt = sdk(gateway, key=ALICE), new_key(), new_prompt("idempotent")

    def attempt(_):
        try:
            raw = ask(alice, key, prompt)
            return 200, raw.headers.get(REPLAYED), raw.http_response.content
        except openai.ConflictError as e:
            return 409, e.code, None

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    ran = [o for o in outcomes if o[:2] == (200, None)]
    replayed = [o for o in outcomes if o[:2] == (200, "true")]
    refused = [o for o in outcomes if o == (409, "idempotency_key_in_use", None)]
    assert len(ran) == 1 and len(ran) + len(replayed) + len(refused) == 8, outcomes
    assert {o[2] for o in replayed} <= {ran[0][2]}
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 1


def test_the_key_with_another_body_is_refused(gateway):
    alice, key, prompt = retrying(gateway), new_key(), new_prompt("idempotent")
    ask(alice, key, prompt)
    other = new_prompt("idempotent")
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        ask(alice, key, other)
    error = refused.value.body
    assert (error["type"], error["code"]) == ("invalid_request_error", "idempotency_key_reused")
    assert error["message"] == ("Keys for idempotent requests can only be used with the same parameters "
                                "they were first used with.")
    assert backend_calls(gateway, LLAMA_BACKEND, other) == 0
    # The same meaning in another key order and spacing is the same request.
    same = httpx2.post(f"{gateway.base_url}/chat/completions",
                       headers={"authorization": f"Bearer {ALICE}", "idempotency-key": key,
                                "content-type": "application/json"},
                       content=f'{{"max_tokens": 6,  "messages": [{{"content": "{prompt}", "role": "user"}}], '
                               f'"model": "{LLAMA}"}}')
    assert same.status_code == 200 and same.headers[REPLAYED] == "true"


def test_each_client_key_has_its_own_idempotency_keys(gateway):
    key, prompt = new_key(), new_prompt("idempotent")
    ask(retrying(gateway, ALICE), key, prompt)
    bobs = ask(retrying(gateway, BOB), key, prompt)
    assert REPLAYED not in bobs.headers
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2


def test_a_failed_first_request_lets_the_repeat_run(gateway):
    alice, key, prompt = retrying(gateway), new_key(), new_prompt("idempotent")
    with pytest.raises(openai.BadRequestError):
        ask(alice, key, prompt, headers={"x-sim-fail-status": "400"})
    repeat = ask(alice, key, prompt)
    assert REPLAYED not in repeat.headers and repeat.parse().choices[0].message.content
    assert backend_calls(gateway, LLAMA_BACKEND, prompt) == 2
    assert ask(alice, key, prompt).headers[REPLAYED] == "true"


def test_a_messages_request_is_replayed_in_anthropics_api(gateway):
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key=ALICE, max_retries=3,
                                 timeout=15)
    key, prompt = new_key(), new_prompt("idempotent")

    def create():
        return claude.messages.with_raw_response.create(
            model="claude-sonnet-4-6", max_tokens=20, messages=[{"role": "user", "content": prompt}],
            extra_headers={"Idempotency-Key": key})

    first, repeat = create(), create()
    assert repeat.headers[REPLAYED] == "true" and repeat.parse().id == first.parse().id
    assert backend_calls(gateway, "anthropic", prompt) == 1
    with pytest.raises(anthropic.UnprocessableEntityError) as refused:
        claude.messages.create(model="claude-sonnet-4-6", max_tokens=21, messages=[{"role": "user", "content": prompt}],
                               extra_headers={"Idempotency-Key": key})
    assert refused.value.body["type"] == "error"


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_an_unusable_idempotency_key_is_refused_by_name(gateway, key):
    answer = httpx2.post(f"{gateway.base_url}/chat/completions",
                         headers={"authorization": f"Bearer {ALICE}", "idempotency-key": key.encode()},
                         json={"model": LLAMA, "messages": [{"role": "user", "content": "hello"}]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value",
                                                              "Idempotency-Key")
    assert answer.headers["x-request-id"]
