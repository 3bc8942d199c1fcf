"""Translated streams without the stream guard: with `stream_guard_cluster` unset,
ext_proc translates Anthropic's and Ollama's streams itself, piece by piece as
Envoy passes them. The guarded path is what the other dialect tests exercise."""

import json

import httpx2
import openai
import pytest

from harness import Stack, WEATHER, assert_streams_as_generated, edit_filter_config, sdk

MODELS = ["claude-sonnet-4-6", "llama3.2"]
HELLO = [{"role": "user", "content": "hello there"}]


def without_stream_guard(config: dict) -> None:
    def edit(routing: dict) -> None:
        routing.pop("stream_guard_cluster")
        # Fallbacks are tried by the guard: without it, a model may have none.
        for route in routing["models"]:
            route.pop("fallbacks", None)

    edit_filter_config(config, edit)


@pytest.fixture(scope="module")
def unguarded():
    with Stack(adjust_config=without_stream_guard) as s:
        yield s


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_with_usage_is_translated_by_ext_proc(unguarded, spec, model):
    chunks = list(sdk(unguarded).chat.completions.create(
        model=model, messages=HELLO, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "This is a simulated"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    for chunk in chunks:
        spec.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    # Nothing went through the guard: its cluster never saw a request.
    stats = httpx2.get(f"{unguarded.admin_url}/stats?filter=^cluster.modelgate_stream_guard.upstream_rq_total$").text
    assert stats.strip() == "cluster.modelgate_stream_guard.upstream_rq_total: 0"


# The simulated Claude calls a tool when it must; the simulated Ollama whenever it is offered one.
@pytest.mark.parametrize("model, choice", [("claude-sonnet-4-6", {"tool_choice": "required"}), ("llama3.2", {})])
def test_a_streamed_tool_call_is_translated_by_ext_proc(unguarded, model, choice):
    chunks = list(sdk(unguarded).chat.completions.create(
        model=model, messages=HELLO, tools=[WEATHER], stream=True, **choice))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "simulated"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_arrives_as_it_is_generated_without_the_guard(unguarded, model):
    assert_streams_as_generated(sdk(unguarded), model)


@pytest.mark.parametrize("model", MODELS)
def test_an_error_in_the_dialects_stream_ends_with_an_openai_error_event(unguarded, model):
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk(unguarded).chat.completions.create(model=model, messages=HELLO, stream=True,
                                                            extra_headers={"x-sim-abort-after": "2"}):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "This", " is"]
    assert type(err.value) is openai.APIError
    assert err.value.body["type"] == "server_error"
