"""Claude behind the OpenAI API: the official openai SDK against the gateway,
whose Anthropic backend is the simulator's Anthropic face (itself checked with
the official anthropic client in tests/simulator/tests/test_anthropic_face.py)."""

import base64
import json

import openai
import pytest

from harness import assert_streams_as_generated, attempts_at, envoy_stat, new_request_id as rid, sdk, WEATHER

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "hello there"}]


def sent(stack, request_id: str) -> list[dict]:
    return attempts_at(stack, "anthropic", request_id)


def test_a_chat_with_a_system_prompt(stack, spec):
    request_id = rid()
    raw = sdk(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HELLO], temperature=0.5, stop=["zzz"],
        user="user-7", extra_headers={"x-request-id": request_id, "x-sim-cached-tokens": "1"})
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith("This is a simulated reply")
    assert completion.choices[0].finish_reason == "stop"
    # Four words of prompt, one of them from the cache; sixteen generated.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (4, 16, 20)
    assert completion.usage.prompt_tokens_details.cached_tokens == 1
    spec.validate("CreateChatCompletionResponse", raw.http_response.json())
    assert raw.headers["x-request-id"] == request_id

    [upstream] = sent(stack, request_id)
    assert upstream["path"] == "/v1/messages"
    assert upstream["body"] == {"model": MODEL, "system": "Be brief.",
                                "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
                                "temperature": 0.5, "stop_sequences": ["zzz"], "metadata": {"user_id": "user-7"},
                                "max_tokens": 1024}
    headers = upstream["headers"]
    assert headers["x-api-key"] == "sk-ant-demo-key"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers, "the client's own key never reaches a third party"


def ext_proc_messages(stack) -> int:
    return envoy_stat(stack, r"^http\.modelgate\.ext_proc\.stream_msgs_sent$")


def test_a_whole_answer_costs_ext_proc_three_messages_and_its_mark_stays_inside(stack):
    # The request's headers and body, then the answer's body with its status: not the answer's headers.
    for status in (None, 529):
        before, request_id = ext_proc_messages(stack), rid()
        failure = {"x-sim-fail-status": str(status), "x-sim-retry-after": "0"} if status else {}
        try:
            sdk(stack, 0).chat.completions.create(
                model=MODEL, messages=HELLO, extra_headers={"x-request-id": request_id, **failure})
        except openai.InternalServerError as err:
            assert (status, err.status_code) == (529, 503)
        assert ext_proc_messages(stack) - before == 3
        [upstream] = sent(stack, request_id)
        assert not [name for name in upstream["headers"] if name.startswith("x-modelgate")]


def test_max_tokens_is_the_clients_when_given(stack):
    request_id = rid()
    completion = sdk(stack).chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3,
                                                    extra_headers={"x-request-id": request_id})
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == ("This is a", "length")
    assert sent(stack, request_id)[0]["body"]["max_tokens"] == 3


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_with_and_without_usage(stack, spec, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(sdk(stack).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a simulated"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunks = [c for c in chunks if c.usage]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1].choices == []
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 4)
    else:
        assert usage_chunks == []
    for chunk in chunks:
        spec.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))


def test_a_stream_arrives_as_it_is_generated(stack):
    assert_streams_as_generated(sdk(stack), MODEL)


def test_tool_calling_round_trip(stack):
    client = sdk(stack)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER], tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather",
                                                                                   {"city": "simulated"})
    request_id = rid()
    second = client.chat.completions.create(
        model=MODEL, tools=[WEATHER], max_tokens=2, extra_headers={"x-request-id": request_id},
        messages=[*question, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert second.choices[0].message.content == "This is"
    body = sent(stack, request_id)[0]["body"]
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "simulated"}}]}
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}
    assert body["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                              "input_schema": WEATHER["function"]["parameters"]}]


def test_a_streamed_tool_call_accumulates_its_arguments(stack):
    chunks = list(sdk(stack).chat.completions.create(
        model=MODEL, messages=HELLO, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert len(calls) > 2, "the arguments arrive in pieces"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "simulated"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_image_part_becomes_an_image_block(stack):
    request_id = rid()
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n fake").decode()
    sdk(stack).chat.completions.create(model=MODEL, max_tokens=1, extra_headers={"x-request-id": request_id}, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}])
    content = sent(stack, request_id)[0]["body"]["messages"][0]["content"]
    assert content[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}}


@pytest.mark.parametrize("status, exception, kind, code, retries, attempts", [
    (400, openai.BadRequestError, "invalid_request_error", None, 2, 1),
    (401, openai.AuthenticationError, "authentication_error", None, 2, 1),
    (429, openai.RateLimitError, "rate_limit_error", "rate_limit_exceeded", 1, 2),
    (529, openai.InternalServerError, "server_error", "overloaded", 2, 3),
])
def test_anthropic_errors_become_openai_errors(stack, spec, status, exception, kind, code, retries, attempts):
    request_id = rid()
    with pytest.raises(exception) as err:
        sdk(stack, retries).chat.completions.create(
            model=MODEL, messages=HELLO,
            extra_headers={"x-request-id": request_id, "x-sim-fail-status": str(status), "x-sim-retry-after": "0"})
    # Anthropic's 529 (overloaded) reaches OpenAI clients as a 503 they retry.
    assert err.value.status_code == (503 if status == 529 else status)
    assert err.value.body == {"message": "simulated failure", "type": kind, "param": None, "code": code}
    assert err.value.response.headers["retry-after"] == "0"
    assert err.value.request_id == request_id
    spec.validate("ErrorResponse", err.value.response.json())
    assert len(sent(stack, request_id)) == attempts


def test_a_parameter_claude_cannot_honour_is_refused_by_name(stack):
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as err:
        sdk(stack).chat.completions.create(model=MODEL, messages=HELLO, n=2, extra_headers={"x-request-id": request_id})
    assert (err.value.body["param"], err.value.body["code"]) == ("n", "unsupported_parameter")
    assert err.value.response.headers["x-should-retry"] == "false"
    assert sent(stack, request_id) == []


def test_an_endpoint_claude_lacks_is_a_404(stack):
    with pytest.raises(openai.NotFoundError) as err:
        sdk(stack).embeddings.create(model=MODEL, input="hello")
    assert err.value.body["code"] == "unsupported_endpoint"


@pytest.mark.parametrize("error_format, code", [(None, "overloaded"), ("reset", "stream_interrupted")])
def test_a_stream_that_fails_midway_ends_with_an_error_event(stack, error_format, code):
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk(stack).chat.completions.create(
                model=MODEL, messages=HELLO, stream=True,
                extra_headers={"x-sim-abort-after": "2", **({"x-sim-error-format": error_format} if error_format else {})}):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "This", " is"]
    assert type(err.value) is openai.APIError
    assert err.value.body["code"] == code


def test_the_client_key_is_not_forwarded_to_openai_backends_either(stack):
    request_id = rid()
    sdk(stack, key="sk-secret-client").chat.completions.create(model="llama-3.1-8b-instruct", messages=HELLO,
                                                                extra_headers={"x-request-id": request_id})
    [upstream] = attempts_at(stack, "vllm-llama", request_id)
    assert "authorization" not in upstream["headers"]
