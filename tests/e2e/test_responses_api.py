"""OpenAI's Responses API through the gateway, with the official openai SDK, against every
backend dialect: the llama pool serves `/v1/responses` itself (a recent vLLM: passed through),
the other OpenAI-dialect pools, Anthropic, Ollama and the picked vLLM pool get it translated
into a chat completion and back. Stored responses belong to the client key that made them."""

import json
import time
import uuid

import httpx2
import openai
import pytest

from harness import ALICE, BOB, POOL_REPLICAS, held_at_gate, new_request_id as rid, open_gate, received_by, sdk

# model -> the simulated backends that may serve it, and the path they are asked on.
NATIVE = "llama-3.1-8b-instruct"
MODELS = {
    NATIVE: (["vllm-llama"], "/v1/responses"),
    "qwen-2.5-7b-instruct": (["sglang-qwen"], "/v1/chat/completions"),
    "mistral-7b-instruct": (["llamacpp-mistral"], "/v1/chat/completions"),
    "claude-sonnet-4-6": (["anthropic"], "/v1/messages"),
    "llama3.2": (["ollama"], "/api/chat"),
    "qwen3-8b": (POOL_REPLICAS, "/v1/chat/completions"),
}
TRANSLATED = "qwen-2.5-7b-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
TEXT = "This is a simulated reply from the backend This is a simulated reply from the backend"


@pytest.fixture(scope="module")
def gateway(client_api_gateway):
    return client_api_gateway


def upstream(gateway, model: str, request_id: str) -> dict:
    """What the model's backend received for this request."""
    backends, _ = MODELS[model]
    found = [r for r in (received_by(gateway, b, request_id) for b in backends) if r]
    assert len(found) == 1, f"{model}: {len(found)} backends got {request_id}"
    return found[0]


@pytest.mark.parametrize("model", MODELS)
def test_a_text_response(gateway, spec, model):
    request_id = rid()
    raw = sdk(gateway, key=ALICE).responses.with_raw_response.create(
        model=model, instructions="Be brief.", input="hello there", extra_headers={"x-request-id": request_id})
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model, response.output_text) == ("completed", model, TEXT)
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage.output_tokens == 16
    assert response.usage.total_tokens == response.usage.input_tokens + 16 and response.usage.input_tokens > 0
    assert raw.headers["x-request-id"] == request_id
    spec.validate("Response", raw.http_response.json())
    assert upstream(gateway, model, request_id)["path"] == MODELS[model][1]


@pytest.mark.parametrize("model", MODELS)
def test_a_streamed_response_has_the_typed_event_sequence(gateway, model):
    with sdk(gateway, key=ALICE).responses.create(model=model, input="hello", stream=True,
                                                   extra_headers={"x-sim-output-tokens": "4"}) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 4, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"], types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == "This is a simulated"
    assert (final.status, final.usage.output_tokens) == ("completed", 4)
    assert events[0].response.id == final.id


@pytest.mark.parametrize("model", MODELS)
def test_a_function_call_round_trip(gateway, model):
    client = sdk(gateway, key=ALICE)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(model=model, input=question, tools=[WEATHER], store=False)
    [call] = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "simulated"})
    request_id = rid()
    second = client.responses.create(
        model=model, tools=[WEATHER], max_output_tokens=2, store=False, extra_headers={"x-request-id": request_id},
        input=[*question, *first.output,
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert (second.output_text, second.status) == ("This is", "incomplete")
    assert second.incomplete_details.reason == "max_output_tokens"
    if MODELS[model][1] == "/v1/chat/completions":
        messages = upstream(gateway, model, request_id)["body"]["messages"]
        assert messages[1]["tool_calls"][0]["id"] == call.call_id
        assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_a_streamed_function_call(gateway):
    with sdk(gateway, key=ALICE).responses.create(model=TRANSLATED, input="Paris?", tools=[WEATHER],
                                                   tool_choice="required", stream=True) as stream:
        events = list(stream)
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "simulated"}
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].name == "get_weather"


@pytest.mark.parametrize("model", [m for m in MODELS if m != "claude-sonnet-4-6"])
def test_structured_output_parses(gateway, model):
    response = sdk(gateway, key=ALICE).responses.create(model=model, input="Who?", text={
        "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert json.loads(response.output_text) == {"name": "simulated", "age": 1}


def test_structured_output_claude_cannot_give_is_refused_by_name(gateway):
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gateway, key=ALICE).responses.create(model="claude-sonnet-4-6", input="Who?", text={
            "format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    assert err.value.body["param"] == "text.format"


@pytest.mark.parametrize("model", [TRANSLATED, NATIVE, "claude-sonnet-4-6", "llama3.2"])
def test_previous_response_id_continues_the_conversation(gateway, model):
    alice = sdk(gateway, key=ALICE)
    first = alice.responses.create(model=model, input="My name is Ada.", max_output_tokens=3)
    request_id = rid()
    second = alice.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                    extra_headers={"x-request-id": request_id})
    assert second.previous_response_id == first.id
    # The first turn (its input and the answer) is part of the second's prompt.
    alone = alice.responses.create(model=model, input="What is my name?", store=False)
    assert second.usage.input_tokens > alone.usage.input_tokens
    if model == TRANSLATED:
        messages = upstream(gateway, model, request_id)["body"]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert "My name is Ada." in json.dumps(messages[0]) and "This is a" in json.dumps(messages[1])


def test_another_keys_previous_response_is_not_found(gateway, spec):
    first = sdk(gateway, key=ALICE).responses.create(model=TRANSLATED, input="secret", max_output_tokens=1)
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gateway, key=BOB).responses.create(model=TRANSLATED, input="and?", previous_response_id=first.id,
                                               extra_headers={"x-request-id": request_id})
    assert err.value.body == {"message": f"Previous response with id '{first.id}' not found.",
                              "type": "invalid_request_error", "param": "previous_response_id",
                              "code": "previous_response_not_found"}
    assert err.value.response.headers["x-request-id"] == request_id
    spec.validate("ErrorResponse", err.value.response.json())
    assert received_by(gateway, "sglang-qwen", request_id) is None


def test_a_stored_response_is_retrieved_listed_and_deleted_by_its_owner_only(gateway):
    alice, bob = sdk(gateway, key=ALICE), sdk(gateway, key=BOB)
    created = alice.responses.create(model=TRANSLATED, input="remember this", max_output_tokens=2)
    retrieved = alice.responses.retrieve(created.id)
    assert (retrieved.id, retrieved.output_text, retrieved.status) == (created.id, "This is", "incomplete")
    items = alice.responses.input_items.list(created.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "remember this")]
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(created.id)
    alice.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(created.id)
    unstored = alice.responses.create(model=TRANSLATED, input="forget this", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


@pytest.mark.parametrize("params, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"background": True}, "background"),
])
def test_what_cannot_be_honoured_is_refused_by_name(gateway, spec, params, param):
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gateway, key=ALICE).responses.create(model=TRANSLATED, input="hi", extra_headers={"x-request-id": request_id},
                                                 **params)
    assert err.value.body["param"] == param
    spec.validate("ErrorResponse", err.value.response.json())
    assert received_by(gateway, "sglang-qwen", request_id) is None


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "bogus_item"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
])
def test_bad_input_is_a_400_in_openais_envelope(gateway, spec, body, param):
    answer = httpx2.post(f"{gateway.base_url}/responses", headers={"authorization": f"Bearer {ALICE}"},
                         json={"model": TRANSLATED, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert answer.headers["x-request-id"]
    spec.validate("ErrorResponse", answer.json())


def test_usage_is_counted_in_the_usage_report(gateway):
    # Only this test sends Bob's requests to mistral; the report sums whole minutes from `start`.
    start = int(time.time()) // 60 * 60
    bob = sdk(gateway, key=BOB)
    whole = bob.responses.create(model="mistral-7b-instruct", input="count me", max_output_tokens=5)
    with bob.responses.create(model="mistral-7b-instruct", input="count me", stream=True,
                              max_output_tokens=5) as stream:
        streamed = [e for e in stream if e.type == "response.incomplete"][0].response
    deadline = time.monotonic() + 10
    while sum(r["requests"] for r in usage_rows(gateway, start, "mistral-7b-instruct")) < 2:
        assert time.monotonic() < deadline, usage_rows(gateway, start, "mistral-7b-instruct")
        time.sleep(0.1)
    [row] = usage_rows(gateway, start, "mistral-7b-instruct")
    assert (row["backend"], row["requests"]) == ("mistral-pool", 2)
    assert row["prompt_tokens"] == whole.usage.input_tokens + streamed.usage.input_tokens
    assert row["completion_tokens"] == whole.usage.output_tokens + streamed.usage.output_tokens == 10


def usage_rows(gateway, start: int, model: str) -> list[dict]:
    answer = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/usage/report", params={"start": start})
    return [r for r in answer.json()["data"] if (r["key"], r["model"]) == ("bob", model)]


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED, "claude-sonnet-4-6", "llama3.2"])
def test_the_first_event_arrives_while_the_backend_still_holds_the_rest(gateway, model):
    """The backend stops after its first token until the test has read the first text delta:
    had the gateway held events back, the delta would never come (the read times out)."""
    gate = f"gate-{uuid.uuid4().hex}"
    [backend], _ = MODELS[model]
    client = openai.OpenAI(base_url=gateway.base_url, api_key=ALICE, max_retries=0, timeout=15)
    with client.responses.create(model=model, input="hello", stream=True,
                                 extra_headers={"x-sim-gate": gate, "x-sim-output-tokens": "6"}) as stream:
        events = iter(stream)
        first = next(e for e in events if e.type == "response.output_text.delta")
        assert first.delta == "This"
        assert held_at_gate(gateway, backend, gate) == 1, "the backend had not gone on"
        open_gate(gateway, backend, gate)
        rest = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert rest == [" is", " a", " simulated", " reply", " from"]


def sse_events(response) -> list[tuple[str, dict]]:
    """Each event's name and data, as a stream arrived."""
    text = "".join(response.iter_text())
    return [(block.split("\n", 1)[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
            for block in text.split("\n\n") if block.strip()]


def test_a_stream_the_backend_breaks_ends_with_an_error_event_then_a_failed_response(gateway):
    body = {"model": TRANSLATED, "input": "hello", "stream": True}
    headers = {"authorization": f"Bearer {ALICE}", "x-sim-abort-after": "2"}
    with httpx2.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body, headers=headers) as response:
            assert response.status_code == 200
            events = sse_events(response)
    names = [name for name, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-2:] == ["error", "response.failed"], names
    error, failed = events[-2][1], events[-1][1]
    assert error["code"] == "stream_interrupted" and error["message"]
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "stream_interrupted"
