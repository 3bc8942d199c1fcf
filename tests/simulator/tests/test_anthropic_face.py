"""The simulator's Anthropic face, checked with the official `anthropic` client:
the gateway's Anthropic translation is tested against this face, so the face
must be what Anthropic's own client accepts and parses."""

import anthropic
import pytest

HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}


@pytest.fixture
def claude(simulators) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=simulators.backend_url("llamacpp-mistral"), api_key="sk-ant-test",
                               max_retries=0)


def test_a_message_with_system_prompt_and_usage(claude):
    message = claude.messages.create(model="claude-sim", max_tokens=100, system="Be brief.", messages=HELLO,
                                     extra_headers={"x-sim-cached-tokens": "1"})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "This is a simulated reply from the backend This is a simulated reply from the backend"
    assert message.stop_reason == "end_turn"
    # "Be brief." and "hello there": four words, one of them read from the cache.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (3, 1)
    assert message.usage.output_tokens == 16


def test_max_tokens_and_stop_sequences_end_generation(claude):
    short = claude.messages.create(model="m", max_tokens=3, messages=HELLO)
    assert (short.content[0].text, short.stop_reason, short.usage.output_tokens) == ("This is a", "max_tokens", 3)
    stopped = claude.messages.create(model="m", max_tokens=100, messages=HELLO, stop_sequences=["simulated"])
    assert (stopped.content[0].text, stopped.stop_reason, stopped.stop_sequence) == ("This is a", "stop_sequence",
                                                                                     "simulated")


def test_tool_use_round_trip(claude):
    first = claude.messages.create(model="m", max_tokens=100, messages=[{"role": "user", "content": "Paris?"}],
                                   tools=[WEATHER])
    assert first.stop_reason == "tool_use"
    call = first.content[0]
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "simulated", "days": 1})
    second = claude.messages.create(model="m", max_tokens=5, tools=[WEATHER], messages=[
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ])
    assert second.stop_reason == "max_tokens" and second.content[0].type == "text"


def test_streamed_text_and_tool_input(claude):
    with claude.messages.stream(model="m", max_tokens=4, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "This is a simulated"
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 4)

    with claude.messages.stream(model="m", max_tokens=100, messages=HELLO, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "simulated", "days": 1}


@pytest.mark.parametrize("status, exception, kind", [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (529, anthropic.InternalServerError, "overloaded_error"),
])
def test_errors_in_anthropics_shape(claude, status, exception, kind):
    with pytest.raises(exception) as err:
        claude.messages.create(model="m", max_tokens=5, messages=HELLO,
                               extra_headers={"x-sim-fail-status": str(status), "x-sim-retry-after": "2"})
    assert err.value.status_code == status
    assert err.value.body == {"type": "error", "error": {"type": kind, "message": "simulated failure"}}
    assert err.value.response.headers["retry-after"] == "2"


def test_count_tokens_counts_the_prompt_as_a_message_does(claude):
    counted = claude.messages.count_tokens(model="m", system="Be brief.", messages=HELLO, tools=[WEATHER])
    assert counted.input_tokens == 4
    message = claude.messages.create(model="m", max_tokens=1, system="Be brief.", messages=HELLO)
    assert message.usage.input_tokens == counted.input_tokens


def test_missing_api_key_and_version_are_refused(simulators, claude):
    import httpx2

    url = f"{simulators.backend_url('llamacpp-mistral')}/v1/messages"
    body = {"model": "m", "max_tokens": 5, "messages": HELLO}
    assert httpx2.post(url, json=body, headers={"anthropic-version": "2023-06-01"}).status_code == 401
    assert httpx2.post(url, json=body, headers={"x-api-key": "k"}).status_code == 400


def test_an_aborted_stream_ends_with_an_overloaded_error_event(claude):
    with pytest.raises(anthropic.APIStatusError) as err:
        with claude.messages.stream(model="m", max_tokens=10, messages=HELLO,
                                    extra_headers={"x-sim-abort-after": "2"}) as stream:
            for _ in stream.text_stream:
                pass
    assert err.value.body["error"]["type"] == "overloaded_error"
