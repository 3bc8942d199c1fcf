"""The backend simulator behaves like the engines it stands in for, as the
official SDK sees it: latency, failures and aborts are what tests of the
gateway rely on, so they are checked here on the simulator directly."""

import openai
import pytest

import httpx2

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def direct(simulators) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{simulators.backend_url('llamacpp-mistral')}/v1", api_key="unused", max_retries=0)


def test_health_models_and_backend_header(simulators, direct):
    base = simulators.backend_url("llamacpp-mistral")
    health = httpx2.get(f"{base}/health")
    assert health.status_code == 200
    assert health.headers["x-sim-backend"] == "llamacpp-mistral"
    assert direct.models.list().object == "list"


def test_injected_status_reaches_the_sdk(direct):
    with pytest.raises(openai.InternalServerError) as err:
        direct.chat.completions.create(model="m", messages=HELLO, extra_headers={"x-sim-fail-status": "503"})
    assert err.value.status_code == 503
    with pytest.raises(openai.RateLimitError):
        direct.chat.completions.create(model="m", messages=HELLO, extra_headers={"x-sim-fail-status": "429"})


def test_failure_rate_fails_a_fraction(direct):
    failures = 0
    for _ in range(200):
        try:
            direct.chat.completions.create(model="m", messages=HELLO, max_tokens=1,
                                           extra_headers={"x-sim-fail-status": "500", "x-sim-fail-rate": "0.5"})
        except openai.InternalServerError:
            failures += 1
    # Binomial(200, 0.5): 60..140 is over five standard deviations each side.
    assert 60 <= failures <= 140


def test_abort_mid_stream_ends_after_the_chunks_sent(direct):
    received = []
    with pytest.raises(openai.APIError):
        for chunk in direct.chat.completions.create(model="m", messages=HELLO, stream=True,
                                                    extra_headers={"x-sim-abort-after": "3"}):
            received.append(chunk.choices[0].delta.content)
    # the role chunk, then three tokens, then the connection drops
    assert received == ["", "This", " is", " a"]


def test_metrics_show_running_requests_and_token_counts(simulators, direct):
    base = simulators.backend_url("llamacpp-mistral")
    stream = direct.chat.completions.create(model="metrics-probe", messages=[{"role": "user", "content": "a b c"}],
                                            max_tokens=7, stream=True, extra_headers={"x-sim-itl-ms": "100"})
    next(iter(stream))
    during = httpx2.get(f"{base}/metrics").text
    assert 'vllm:num_requests_running{model_name="metrics-probe"} 1' in during
    assert 'vllm:num_requests_waiting{model_name="metrics-probe"} 0' in during
    assert 'vllm:gpu_cache_usage_perc{model_name="metrics-probe"}' in during
    list(stream)
    after = httpx2.get(f"{base}/metrics").text
    assert 'vllm:num_requests_running{model_name="metrics-probe"} 0' in after
    assert 'vllm:prompt_tokens_total{model_name="metrics-probe"} 3' in after
    assert 'vllm:generation_tokens_total{model_name="metrics-probe"} 7' in after
