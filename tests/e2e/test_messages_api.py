"""Anthropic's Messages API through the gateway, with the official anthropic SDK: passed through
to the Anthropic backend (Native), translated into a chat completion and back for an
OpenAI-dialect pool and for Ollama. Every answer, errors included, is in Anthropic's shapes."""

import base64
import json
import uuid

import anthropic
import httpx2
import pytest

from harness import ALICE, LIMITED, held_at_gate, new_request_id as rid, open_gate, raw_http, received_by

# model -> the simulated backend that serves it, and the path it is asked on.
MODELS = {
    "claude-sonnet-4-6": ("anthropic", "/v1/messages"),
    "qwen-2.5-7b-instruct": ("sglang-qwen", "/v1/chat/completions"),
    "llama3.2": ("ollama", "/api/chat"),
}
NATIVE, TRANSLATED = "claude-sonnet-4-6", "qwen-2.5-7b-instruct"
HELLO = [{"role": "user", "content": "hello there"}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TEXT = "This is a simulated reply from the backend This is a simulated reply from the backend"


@pytest.fixture(scope="module")
def gateway(client_api_gateway):
    return client_api_gateway


def claude(gateway, key: str = ALICE) -> anthropic.Anthropic:
    """The official client against the gateway; it sends its key as `x-api-key`."""
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{gateway.port}", api_key=key, max_retries=0, timeout=15)


def upstream(gateway, model: str, request_id: str) -> dict:
    backend, path = MODELS[model]
    received = received_by(gateway, backend, request_id)
    assert received and received["path"] == path, received
    return received


@pytest.mark.parametrize("model", MODELS)
def test_a_message_with_a_system_prompt(gateway, model):
    request_id = rid()
    raw = claude(gateway).messages.with_raw_response.create(
        model=model, max_tokens=100, system="Be brief.", messages=HELLO, stop_sequences=["zzz"],
        metadata={"user_id": "user-7"}, extra_headers={"x-request-id": request_id})
    message = raw.parse()
    assert (message.type, message.role, message.model) == ("message", "assistant", model)
    assert message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", TEXT)]
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 16)
    assert message.usage.input_tokens > 0
    assert raw.headers["x-request-id"] == request_id
    body = upstream(gateway, model, request_id)["body"]
    if model == TRANSLATED:
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert (body["stop"], body["user"]) == (["zzz"], "user-7")
        assert 100 in (body.get("max_tokens"), body.get("max_completion_tokens"))


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_is_anthropics_event_sequence(gateway, model):
    events = list(claude(gateway).messages.create(model=model, max_tokens=4, messages=HELLO, stream=True))
    types = [e.type for e in events if e.type != "ping"]
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * 4, "content_block_stop",
                     "message_delta", "message_stop"], types
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "This is a simulated"
    [delta] = [e for e in events if e.type == "message_delta"]
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == ("max_tokens", 4)

    with claude(gateway).messages.stream(model=model, max_tokens=4, system="Be brief.", messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == "This is a simulated"
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 4)
    assert final.usage.input_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_a_base64_image_reaches_the_backend(gateway, model):
    request_id = rid()
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n fake").decode()
    message = claude(gateway).messages.create(model=model, max_tokens=2, extra_headers={"x-request-id": request_id},
                                              messages=[{"role": "user", "content": [
                                                  {"type": "text", "text": "What is this?"},
                                                  {"type": "image", "source": {"type": "base64",
                                                                               "media_type": "image/png",
                                                                               "data": image}}]}])
    assert message.content[0].text == "This is"
    sent = upstream(gateway, model, request_id)["body"]["messages"][0]
    if model == NATIVE:
        assert sent["content"][1]["source"]["data"] == image
    elif model == TRANSLATED:
        assert sent["content"][1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
    else:
        assert sent["images"] == [image]


def test_a_pools_replica_is_picked_for_a_messages_request(gateway):
    """The picker reads the chat completion the request became, not the Messages body."""
    whole = claude(gateway).messages.create(model="qwen3-8b", max_tokens=4, messages=HELLO)
    with claude(gateway).messages.stream(model="qwen3-8b", max_tokens=4, messages=HELLO) as events:
        streamed = events.get_final_message()
    for message in (whole, streamed):
        assert (message.content[0].text, message.stop_reason) == ("This is a simulated", "max_tokens")
        assert message.usage.output_tokens == 4


@pytest.mark.parametrize("model", MODELS)
def test_a_tool_round_trip(gateway, model):
    client = claude(gateway)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model=model, max_tokens=100, messages=question, tools=[WEATHER])
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"city": "simulated"})
    assert call.id
    request_id = rid()
    second = client.messages.create(model=model, max_tokens=2, tools=[WEATHER], extra_headers={"x-request-id": request_id},
                                    messages=[*question, {"role": "assistant", "content": first.content},
                                              {"role": "user", "content": [{"type": "tool_result",
                                                                            "tool_use_id": call.id,
                                                                            "content": "sunny"}]}])
    assert (second.content[0].text, second.stop_reason) == ("This is", "max_tokens")
    if model == TRANSLATED:
        messages = upstream(gateway, model, request_id)["body"]["messages"]
        assert messages[1]["tool_calls"][0]["id"] == call.id
        assert messages[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}

    forced = {"type": "tool", "name": "get_weather"}
    if model == "llama3.2":
        # Ollama cannot be made to call one tool: refused, never silently dropped.
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model=model, max_tokens=100, messages=question, tools=[WEATHER], tool_choice=forced)
        assert refused.value.body["error"]["type"] == "invalid_request_error"
        assert "tool_choice" in refused.value.body["error"]["message"]
        return
    with client.messages.stream(model=model, max_tokens=100, messages=question, tools=[WEATHER],
                                tool_choice=forced) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "simulated"}


def test_count_tokens_from_anthropic_and_estimated_elsewhere(gateway):
    request_id = rid()
    counted = claude(gateway).messages.count_tokens(model=NATIVE, system="Be brief.", messages=HELLO,
                                                    extra_headers={"x-request-id": request_id})
    # The backend's own count: four words.
    assert counted.input_tokens == 4
    assert received_by(gateway, "anthropic", request_id)["path"] == "/v1/messages/count_tokens"
    for model in ["qwen-2.5-7b-instruct", "llama3.2"]:
        request_id = rid()
        estimated = claude(gateway).messages.count_tokens(model=model, system="Be brief.", messages=HELLO,
                                                          extra_headers={"x-request-id": request_id})
        # The gateway's estimate: 20 characters in four a token, and 3 for the one message.
        assert estimated.input_tokens == 5 + 3
        assert received_by(gateway, MODELS[model][0], request_id) is None


def unknown_block(gateway):
    claude(gateway).messages.create(model=TRANSLATED, max_tokens=5,
                                    messages=[{"role": "user", "content": [{"type": "bogus_block", "text": "x"}]}])


def wrong_key(gateway):
    claude(gateway, key="sk-not-a-key").messages.create(model=NATIVE, max_tokens=5, messages=HELLO)


def unknown_model(gateway):
    claude(gateway).messages.create(model="no-such-model", max_tokens=5, messages=HELLO)


def over_the_limit(gateway):
    # The key may send one request a minute: the first is served, the second refused.
    claude(gateway, key=LIMITED).messages.create(model=NATIVE, max_tokens=1, messages=HELLO)
    claude(gateway, key=LIMITED).messages.create(model=NATIVE, max_tokens=1, messages=HELLO)


def overloaded(gateway):
    claude(gateway).messages.create(model=NATIVE, max_tokens=5, messages=HELLO,
                                    extra_headers={"x-sim-fail-status": "529"})


def failed(gateway):
    claude(gateway).messages.create(model=TRANSLATED, max_tokens=5, messages=HELLO,
                                    extra_headers={"x-sim-fail-status": "500"})


@pytest.mark.parametrize("cause, exception, status, kind", [
    (unknown_block, anthropic.BadRequestError, 400, "invalid_request_error"),
    (wrong_key, anthropic.AuthenticationError, 401, "authentication_error"),
    (unknown_model, anthropic.NotFoundError, 404, "not_found_error"),
    (over_the_limit, anthropic.RateLimitError, 429, "rate_limit_error"),
    (overloaded, anthropic.OverloadedError, 529, "overloaded_error"),
    (failed, anthropic.InternalServerError, 500, "api_error"),
], ids=lambda v: v.__name__ if callable(v) and not isinstance(v, type) else None)
def test_each_error_class_in_anthropics_envelope(gateway, cause, exception, status, kind):
    with pytest.raises(exception) as err:
        cause(gateway)
    assert err.value.status_code == status
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == kind
    assert set(err.value.body) == {"type", "error"} and err.value.body["error"]["message"]
    assert err.value.response.headers["x-request-id"]


@pytest.mark.parametrize("body", [
    {"max_tokens": "ten", "messages": HELLO},
    {"messages": HELLO},
    {"max_tokens": 5, "messages": "hello"},
    {"max_tokens": 5, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 1024}},
], ids=["wrong_type", "no_max_tokens", "messages_not_a_list", "thinking"])
def test_bad_input_is_a_400_in_anthropics_envelope(gateway, body):
    answer = httpx2.post(f"http://127.0.0.1:{gateway.port}/v1/messages", json={"model": TRANSLATED, **body},
                         headers={"x-api-key": ALICE, "anthropic-version": "2023-06-01"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.headers["x-request-id"]


@pytest.mark.parametrize("model", MODELS)
def test_the_first_event_arrives_while_the_backend_still_holds_the_rest(gateway, model):
    """The backend stops after its first token until the test has read the first text delta:
    had the gateway held events back, the delta would never come (the read times out)."""
    gate = f"gate-{uuid.uuid4().hex}"
    backend, _ = MODELS[model]
    with claude(gateway).messages.create(model=model, max_tokens=6, messages=HELLO, stream=True,
                                         extra_headers={"x-sim-gate": gate}) as stream:
        events = iter(stream)
        first = next(e for e in events if e.type == "content_block_delta")
        assert first.delta.text == "This"
        assert held_at_gate(gateway, backend, gate) == 1, "the backend had not gone on"
        open_gate(gateway, backend, gate)
        rest = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert rest == [" is", " a", " simulated", " reply", " from"]


def broken_chunked_post(gateway, path: str) -> tuple[str, dict]:
    """A POST whose chunked body HTTP cannot read (its first chunk size is not a number): the
    status line and the JSON body of the answer."""
    answer = raw_http(gateway.port, f"POST {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {ALICE}\r\n"
                                    "content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                                    "zz\r\n{}\r\n0\r\n\r\n".encode(), timeout=15)
    head, _, body = answer.decode().partition("\r\n\r\n")
    return head.splitlines()[0], json.loads(body)


def test_a_body_http_cannot_read_is_refused_in_each_apis_envelope(gateway):
    """Envoy's own reply (its codec's) is Anthropic's error on the Messages API, OpenAI's elsewhere."""
    status, body = broken_chunked_post(gateway, "/v1/messages")
    assert status == "HTTP/1.1 400 Bad Request"
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "http1.codec_error" in body["error"]["message"]
    status, body = broken_chunked_post(gateway, "/v1/chat/completions")
    assert status == "HTTP/1.1 400 Bad Request" and body["error"]["code"] == "bad_http_request"


def test_a_stream_the_backend_breaks_ends_with_anthropics_error_event(gateway):
    body = {"model": TRANSLATED, "max_tokens": 10, "messages": HELLO, "stream": True}
    headers = {"x-api-key": ALICE, "anthropic-version": "2023-06-01", "x-sim-abort-after": "2"}
    with httpx2.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as http:
        with http.stream("POST", "/v1/messages", json=body, headers=headers) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events[0].startswith("event: message_start")
    name, data = events[-1].split("\ndata: ", 1)
    assert name == "event: error"
    error = json.loads(data)
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "stopped in the middle" in error["error"]["message"]
