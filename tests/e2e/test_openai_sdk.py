"""An OpenAI application, unchanged, against the gateway: every answer parses
with the official SDK and matches OpenAI's published schemas."""

import base64
import struct

import openai
import pytest

from harness import received_by

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the gateway"}]


def test_chat_completion(client, spec):
    raw = client.chat.completions.with_raw_response.create(model="llama-3.1-8b-instruct", messages=CHAT, max_tokens=5)
    completion = raw.parse()
    spec.validate("CreateChatCompletionResponse", raw.http_response.json())
    assert completion.object == "chat.completion"
    assert completion.model == "llama-3.1-8b-instruct"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "This is a simulated reply"
    assert completion.choices[0].finish_reason == "length"
    # 3 + 5 words of prompt, 5 tokens generated
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (8, 5, 13)
    assert raw.headers["x-request-id"]


def test_chat_stream_with_usage_chunk(client, spec):
    stream = client.chat.completions.create(model="qwen-2.5-7b-instruct", messages=CHAT, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    for chunk in chunks:
        spec.validate("CreateChatCompletionStreamResponse", chunk.to_dict())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a simulated"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (8, 4)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="mistral-7b-instruct", messages=CHAT, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("This is a simulated reply from")


def test_stream_arrives_chunk_by_chunk(client):
    """The gateway forwards each chunk as the backend sends it rather than buffering the stream."""
    import time

    with client.chat.completions.with_streaming_response.create(
        model="llama-3.1-8b-instruct", messages=CHAT, max_tokens=10, stream=True,
        extra_headers={"x-sim-itl-ms": "100"},
    ) as response:
        start = time.monotonic()
        arrivals = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    # 11 events (role + 10 tokens) spread over ~0.9 s of generation: the first
    # ones must arrive long before the last.
    assert len(arrivals) >= 11
    assert arrivals[-1] - arrivals[1] > 0.5, arrivals


def test_completions_whole_and_streamed(client, spec):
    raw = client.completions.with_raw_response.create(model="llama-3-70b", prompt="one two three", max_tokens=3)
    spec.validate("CreateCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "This is a"
    assert completion.usage.prompt_tokens == 3

    chunks = list(client.completions.create(model="llama-3-70b", prompt="one two", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "This is a"
    assert chunks[-1].usage.completion_tokens == 3


def test_embeddings_float_and_base64(client, spec):
    raw = client.embeddings.with_raw_response.create(model="qwen-embed", input=["alpha", "beta gamma"],
                                                     encoding_format="float")
    spec.validate("CreateEmbeddingResponse", raw.http_response.json())
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 16
    assert result.usage.prompt_tokens == 3

    # The SDK asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(model="qwen-embed", input=["alpha", "beta gamma"], dimensions=16)
    assert decoded.data[0].embedding == pytest.approx(result.data[0].embedding)
    assert decoded.data[1].embedding == pytest.approx(result.data[1].embedding)


def test_models_list_and_retrieve(client, spec, http):
    listed = http.get("/v1/models")
    spec.validate("ListModelsResponse", listed.json())
    ids = [m.id for m in client.models.list()]
    # the demo's exact names in configuration order, then the failing ones the tests add
    assert ids == ["llama-3.1-8b-instruct", "qwen-2.5-7b-instruct", "mistral-7b-instruct", "gpt-4o-mini",
                   "text-embedding-3-small", "resilient-llama", "claude-sonnet-4-6", "llama3.2", "nomic-embed-text",
                   "qwen3-8b", "dead-model", "empty-model", "ghost-model", "slow-model", "filekey-model", "shared-model"]

    model = client.models.retrieve("gpt-4o-mini")
    spec.validate("Model", model.to_dict())
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "vllm")
    # A model served through a prefix pattern can be retrieved, though not listed.
    assert client.models.retrieve("mistral-nemo").owned_by == "llama.cpp"

    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_request_id_is_kept_or_made(client, stack):
    raw = client.chat.completions.with_raw_response.create(model="llama-3.1-8b-instruct", messages=CHAT,
                                                           extra_headers={"x-request-id": "req-e2e-kept"})
    assert raw.headers["x-request-id"] == "req-e2e-kept"
    assert received_by(stack, "vllm-llama", "req-e2e-kept") is not None
    made = client.chat.completions.with_raw_response.create(model="llama-3.1-8b-instruct", messages=CHAT)
    assert len(made.headers["x-request-id"]) >= 16


def test_a_client_leaving_mid_stream_frees_the_backend(client, stack):
    """Closing a stream stops generation at the backend: no GPU keeps working for nobody."""
    import time

    import httpx2

    model = "mistral-cancel-probe"
    running = f'vllm:num_requests_running{{model_name="{model}"}}'
    metrics = f"{stack.backend_url('llamacpp-mistral')}/metrics"
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=100, stream=True,
                                            extra_headers={"x-sim-itl-ms": "100"})
    next(iter(stream))
    assert f"{running} 1" in httpx2.get(metrics).text
    stream.close()
    deadline = time.monotonic() + 5
    while f"{running} 0" not in httpx2.get(metrics).text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{running} 0" in httpx2.get(metrics).text
