"""The simulator's Ollama face, checked with the official `ollama` client: the
gateway's Ollama translation is tested against this face, so the face must be
what Ollama's own client accepts and parses."""

import base64
import json

import ollama
import pytest

HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


@pytest.fixture
def local(simulators) -> ollama.Client:
    return ollama.Client(host=simulators.backend_url("sglang-qwen"))


def test_chat_whole_with_options_and_counts(local):
    answer = local.chat(model="llama3.2", messages=[{"role": "system", "content": "Be brief."}, *HELLO],
                        options={"num_predict": 3, "temperature": 0.2})
    assert answer.message.role == "assistant"
    assert answer.message.content == "This is a"
    assert (answer.done, answer.done_reason) == (True, "length")
    assert (answer.prompt_eval_count, answer.eval_count) == (4, 3)


def test_chat_streamed_with_a_stop_sequence(local):
    parts = list(local.chat(model="m", messages=HELLO, stream=True, options={"stop": ["reply"]}))
    assert "".join(p.message.content for p in parts) == "This is a simulated"
    assert [p.done for p in parts] == [False] * 4 + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 4


def test_images_count_in_the_prompt(local):
    image = base64.b64encode(b"\x89PNG fake").decode()
    answer = local.chat(model="m", messages=[{"role": "user", "content": "what is this", "images": [image]}],
                        options={"num_predict": 1})
    assert answer.prompt_eval_count == 3 + 1


def test_tool_call_round_trip(local):
    first = local.chat(model="m", messages=[{"role": "user", "content": "Paris?"}], tools=[WEATHER])
    call = first.message.tool_calls[0]
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "simulated", "days": 1})
    second = local.chat(model="m", tools=[WEATHER], options={"num_predict": 2}, messages=[
        {"role": "user", "content": "Paris?"}, first.message,
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert second.message.content == "This is" and not second.message.tool_calls


def test_a_format_gets_json_that_fits_it(local):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    whole = local.chat(model="m", messages=HELLO, format=schema)
    assert json.loads(whole.message.content) == {"name": "simulated", "age": 1}
    streamed = "".join(part.message.content for part in local.chat(model="m", messages=HELLO, format="json",
                                                                    stream=True))
    assert json.loads(streamed) == {}


def test_generate_whole_and_streamed(local):
    whole = local.generate(model="m", prompt="one two", system="be brief", options={"num_predict": 2})
    assert (whole.response, whole.done_reason, whole.prompt_eval_count, whole.eval_count) == ("This is", "length", 4, 2)
    parts = list(local.generate(model="m", prompt="x", stream=True, options={"num_predict": 3}))
    assert "".join(p.response for p in parts) == "This is a"


def test_embed(local):
    answer = local.embed(model="m", input=["a", "b c"])
    assert len(answer.embeddings) == 2 and len(answer.embeddings[0]) == 16
    assert answer.prompt_eval_count == 3


def test_errors_and_mid_stream_errors(simulators):
    failing = ollama.Client(host=simulators.backend_url("sglang-qwen"), headers={"x-sim-fail-status": "404"})
    with pytest.raises(ollama.ResponseError) as err:
        failing.chat(model="m", messages=HELLO)
    assert (err.value.status_code, err.value.error) == (404, "simulated failure")
    aborting = ollama.Client(host=simulators.backend_url("sglang-qwen"), headers={"x-sim-abort-after": "2"})
    with pytest.raises(ollama.ResponseError) as err:
        for _ in aborting.chat(model="m", messages=HELLO, stream=True):
            pass
    assert err.value.error == "simulated failure mid-stream"
