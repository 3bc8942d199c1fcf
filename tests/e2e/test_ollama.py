"""Ollama's native API behind the OpenAI API: the official openai SDK against
the gateway, whose Ollama backend is the simulator's Ollama face (itself
checked with the official ollama client in tests/simulator/tests/test_ollama_face.py)."""

import base64
import json

import openai
import pytest

from harness import assert_streams_as_generated, attempts_at, new_request_id as rid, sdk, WEATHER

CHAT_MODEL = "llama3.2"
EMBED_MODEL = "nomic-embed-text"
HELLO = [{"role": "user", "content": "hello there"}]


def sent(stack, request_id: str) -> list[dict]:
    return attempts_at(stack, "ollama", request_id)


def test_a_chat_with_a_system_prompt_and_options(stack, spec):
    request_id = rid()
    raw = sdk(stack).chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_tokens=3,
        temperature=0.2, seed=7, stop=["zzz"], extra_headers={"x-request-id": request_id})
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == CHAT_MODEL
    assert completion.choices[0].message.content == "This is a"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    spec.validate("CreateChatCompletionResponse", raw.http_response.json())
    [upstream] = sent(stack, request_id)
    assert upstream["path"] == "/api/chat"
    assert upstream["body"] == {
        "model": CHAT_MODEL, "stream": False,
        "options": {"num_predict": 3, "temperature": 0.2, "seed": 7, "stop": ["zzz"]},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]}
    assert "authorization" not in upstream["headers"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_chat_stream(stack, spec, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(sdk(stack).chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, stream=True,
                                                     **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "This is a simulated"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    if include_usage:
        assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 4)
    else:
        assert not [c for c in chunks if c.usage]
    for chunk in chunks:
        spec.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))


def test_a_stream_arrives_as_it_is_generated(stack):
    assert_streams_as_generated(sdk(stack), CHAT_MODEL)


def test_tool_calling_round_trip(stack):
    client = sdk(stack)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=CHAT_MODEL, messages=question, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "simulated"})
    request_id = rid()
    second = client.chat.completions.create(
        model=CHAT_MODEL, tools=[WEATHER], max_tokens=2, extra_headers={"x-request-id": request_id},
        messages=[*question, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert second.choices[0].message.content == "This is"
    messages = sent(stack, request_id)[0]["body"]["messages"]
    assert messages[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "simulated"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}


def test_a_streamed_tool_call(stack):
    chunks = list(sdk(stack).chat.completions.create(model=CHAT_MODEL, messages=HELLO, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "simulated"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_image_part_travels_as_base64(stack):
    request_id = rid()
    image = base64.b64encode(b"\x89PNG fake").decode()
    completion = sdk(stack).chat.completions.create(
        model=CHAT_MODEL, max_tokens=1, extra_headers={"x-request-id": request_id}, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}])
    assert completion.usage.prompt_tokens == 3 + 1
    assert sent(stack, request_id)[0]["body"]["messages"][0]["images"] == [image]


def test_completions_whole_and_streamed(stack, spec):
    raw = sdk(stack).completions.with_raw_response.create(model=CHAT_MODEL, prompt="one two", max_tokens=2)
    completion = raw.parse()
    assert (completion.object, completion.choices[0].text, completion.choices[0].finish_reason) == (
        "text_completion", "This is", "length")
    spec.validate("CreateCompletionResponse", raw.http_response.json())
    chunks = list(sdk(stack).completions.create(model=CHAT_MODEL, prompt="x", max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "This is a"
    assert chunks[-1].usage.completion_tokens == 3


def test_embeddings_as_floats_and_as_the_sdks_default_base64(stack, spec):
    client = sdk(stack)
    floats = client.embeddings.create(model=EMBED_MODEL, input=["a", "b c"], encoding_format="float")
    default = client.embeddings.create(model=EMBED_MODEL, input=["a", "b c"])
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 16
    for decoded, plain in zip(default.data, floats.data):
        assert decoded.embedding == pytest.approx(plain.embedding, abs=1e-6)
    assert (floats.usage.prompt_tokens, floats.model) == (3, EMBED_MODEL)
    spec.validate("CreateEmbeddingResponse", floats.model_dump())


@pytest.mark.parametrize("status, exception", [(400, openai.BadRequestError), (404, openai.NotFoundError),
                                               (500, openai.InternalServerError)])
def test_ollama_errors_become_openai_errors(stack, spec, status, exception):
    with pytest.raises(exception) as err:
        sdk(stack).chat.completions.create(model=CHAT_MODEL, messages=HELLO,
                                           extra_headers={"x-sim-fail-status": str(status)})
    assert err.value.status_code == status
    assert err.value.body["message"] == "simulated failure"
    spec.validate("ErrorResponse", err.value.response.json())


def test_a_parameter_ollama_cannot_honour_is_refused_by_name(stack):
    with pytest.raises(openai.BadRequestError) as err:
        sdk(stack).chat.completions.create(model=CHAT_MODEL, messages=HELLO, tools=[WEATHER], tool_choice="required")
    assert (err.value.body["param"], err.value.body["code"]) == ("tool_choice", "unsupported_parameter")


@pytest.mark.parametrize("error_format, message", [
    (None, "simulated failure mid-stream"),
    ("reset", "The backend stopped in the middle of this stream"),
])
def test_a_stream_that_fails_midway_ends_with_an_error_event(stack, error_format, message):
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk(stack).chat.completions.create(
                model=CHAT_MODEL, messages=HELLO, stream=True,
                extra_headers={"x-sim-abort-after": "2", **({"x-sim-error-format": error_format} if error_format else {})}):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "This", " is"]
    assert type(err.value) is openai.APIError
    assert err.value.message.startswith(message)


# Ollama sends a tool call whole, in one NDJSON line: a long one is not cut into pieces
# the translation would skip, and one over the gateway's --max-event-bytes (8 MiB by
# default) ends the stream with an error event instead of a silent "stop".

def test_a_tool_call_longer_than_a_mebibyte_arrives_whole(stack):
    chunks = list(sdk(stack).chat.completions.create(
        model=CHAT_MODEL, messages=HELLO, tools=[WEATHER], stream=True,
        extra_headers={"x-sim-tool-argument-bytes": str(2 << 20)}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "s" * (2 << 20)}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_call_over_the_event_limit_ends_the_stream_with_an_error_event(stack):
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk(stack).chat.completions.create(
                model=CHAT_MODEL, messages=HELLO, tools=[WEATHER], stream=True,
                extra_headers={"x-sim-tool-argument-bytes": str(9 << 20)}):
            received.append(chunk)
    assert type(err.value) is openai.APIError
    assert err.value.body["code"] == "stream_event_too_large"
    assert not any(c.choices and c.choices[0].finish_reason for c in received), "the stream ended as if complete"
