"""The simulator's Responses API (the OpenAI face served natively, as a recent vLLM serves
`/v1/responses`), its chat face's tools and structured output, and the gate a test holds a
stream at, checked with the official `openai` client."""

import json

import httpx2
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture
def direct(simulators) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{simulators.backend_url('vllm-llama')}/v1", api_key="unused", max_retries=0)


def test_a_response_with_instructions_usage_and_a_limit(direct):
    response = direct.responses.create(model="m", instructions="Be brief.", input="hello there")
    assert (response.object, response.status, response.model) == ("response", "completed", "m")
    assert response.id.startswith("resp_")
    assert response.output_text == "This is a simulated reply from the backend This is a simulated reply from the backend"
    # "Be brief." and "hello there": four tokens.
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (4, 16, 20)
    short = direct.responses.create(model="m", input="hello", max_output_tokens=3)
    assert (short.status, short.incomplete_details.reason, short.output_text) == ("incomplete", "max_output_tokens",
                                                                                  "This is a")


def test_a_streamed_response_has_the_event_sequence(direct):
    events = list(direct.responses.create(model="m", input="hello", max_output_tokens=2, stream=True))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "This is"


def test_a_function_call_round_trip(direct):
    first = direct.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
    [call] = first.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "simulated"})
    second = direct.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER], max_output_tokens=2,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}])
    assert second.output_text == "This is"
    # The remembered conversation counts: the question (3), the call's arguments (one word of 20
    # bytes: 2) and the output (1).
    assert second.usage.input_tokens == 3 + 2 + 1
    with pytest.raises(openai.BadRequestError) as err:
        direct.responses.create(model="m", input="hi", previous_response_id="resp_unknown")
    assert (err.value.body["param"], err.value.body["code"]) == ("previous_response_id", "previous_response_not_found")


def test_structured_output_and_chat_tools_fit_their_schemas(direct):
    response = direct.responses.create(model="m", input="who?", text={
        "format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}})
    assert json.loads(response.output_text) == {"name": "simulated", "age": 1}
    chat = direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "who?"}], response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert json.loads(chat.choices[0].message.content) == {"name": "simulated", "age": 1}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}
    called = direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}], tools=[tool])
    [call] = called.choices[0].message.tool_calls
    assert (called.choices[0].finish_reason, json.loads(call.function.arguments)) == ("tool_calls", {"city": "simulated"})
    streamed = list(direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "Paris?"}],
                                                   tools=[tool], stream=True))
    pieces = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id == pieces[0].id and pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments for p in pieces)) == {"city": "simulated"}


def test_a_gate_holds_a_stream_after_its_first_token_until_opened(simulators, direct):
    gate = f"{simulators.backend_url('vllm-llama')}/sim/gates/held-response"
    with direct.responses.create(model="m", input="hello", max_output_tokens=3, stream=True,
                                 extra_headers={"x-sim-gate": "held-response"}) as stream:
        events = iter(stream)
        first = next(e for e in events if e.type == "response.output_text.delta")
        assert first.delta == "This"
        assert httpx2.get(gate).json() == {"waiting": 1}
        httpx2.post(gate)
        assert [e.delta for e in events if e.type == "response.output_text.delta"] == [" is", " a"]
    assert httpx2.get(gate).json() == {"waiting": 0}
