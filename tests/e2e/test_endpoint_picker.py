"""The endpoint-picker protocol end to end: an Envoy configured as a Gateway API implementation
configures it for an InferencePool (envoy/inference-pool.yaml: ext_proc in FULL_DUPLEX_STREAMED
mode, no modelgate filter) sends every request to ext-proc's endpoint picker, which names the
replica of the demo pool's four simulated vLLM replicas to serve it. Clients use the openai SDK."""

import json
import time
import uuid

import httpx2
import openai
import pytest

from harness import POOL_REPLICAS, Stack, backend_requests

MODEL = "qwen3-8b"
SUBSET = ["vllm-2", "vllm-3"]


def replica_address(stack, name: str) -> str:
    return stack.backend_url(name).removeprefix("http://")


def with_subset_route(stack):
    """A route that sets the subset hint (Envoy's set_metadata filter, per route) to SUBSET:
    requests that send `x-test-subset` take it."""

    def adjust(config: dict) -> None:
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"].insert(0, {
            "name": "envoy.filters.http.set_metadata", "disabled": True,
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"}})
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        subset = {"x-gateway-destination-endpoint-subset": [replica_address(stack, name) for name in SUBSET]}
        routes.insert(0, {
            **routes[0],
            "match": {"prefix": "/", "headers": [{"name": "x-test-subset", "present_match": True}]},
            "typed_per_filter_config": {"envoy.filters.http.set_metadata": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                           "metadata": [{"metadata_namespace": "envoy.lb.subset_hint", "value": subset}]}}}})

    return adjust


@pytest.fixture(scope="module")
def gateway():
    stack = Stack(inference_pool=True)
    stack.adjust_inference_pool = with_subset_route(stack)
    with stack:
        # The picker answers 503 until it has read the replicas' metrics once.
        deadline = time.monotonic() + 30
        with httpx2.Client(timeout=30) as http:
            while http.get(f"{stack.inference_base_url}/models").status_code != 200:
                assert time.monotonic() < deadline, "the endpoint picker never became ready"
                time.sleep(0.05)
        yield stack


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.inference_base_url, api_key="unused", max_retries=0, timeout=30)


def ask(client, content: str, **headers):
    """A chat completion; the answer and the replica that served it."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4, extra_headers=headers)
    return raw.parse(), raw.headers["x-sim-backend"]


def received(gateway, replica: str, marker: str) -> dict:
    """The request a replica received whose body holds `marker`."""
    found = [r for r in backend_requests(gateway, replica) if marker in json.dumps(r["body"])]
    assert len(found) == 1, f"{replica} received {len(found)} requests with {marker}"
    return found[0]


def test_each_request_is_served_by_the_replica_the_picker_named_first(gateway, client):
    for _ in range(8):
        marker = uuid.uuid4().hex
        answer, replica = ask(client, f"hello {marker}")
        assert replica in POOL_REPLICAS
        assert answer.choices[0].message.content
        request = received(gateway, replica, marker)
        named = request["headers"]["x-gateway-destination-endpoint"].split(",")
        assert named[0] == replica_address(gateway, replica)
        assert len(named) == len(set(named)) > 1, "fallbacks for Envoy's retries follow the first choice"
        assert request["body"]["messages"] == [{"role": "user", "content": f"hello {marker}"}]


def test_a_clients_own_destination_header_is_replaced(gateway, client):
    marker = uuid.uuid4().hex
    forced = "127.0.0.1:1"
    _, replica = ask(client, f"hello {marker}", **{"x-gateway-destination-endpoint": forced})
    assert forced not in received(gateway, replica, marker)["headers"]["x-gateway-destination-endpoint"]


def test_prompts_sharing_a_long_prefix_go_to_the_same_replica(client):
    system = f"{uuid.uuid4().hex} You are a careful assistant. " + "Answer briefly and cite sources. " * 64
    first = ask(client, f"{system} question 0")[1]
    assert {ask(client, f"{system} question {n}")[1] for n in range(1, 8)} == {first}


def test_the_subset_hint_on_the_route_is_honoured(client):
    served = {ask(client, f"hello {uuid.uuid4().hex}", **{"x-test-subset": "1"})[1] for _ in range(12)}
    assert served <= set(SUBSET)


def test_a_request_without_a_body_and_a_streamed_answer_pass_through(gateway, client):
    models = client.models.with_raw_response.list()
    assert models.headers["x-sim-backend"] in POOL_REPLICAS
    assert MODEL in [m.id for m in models.parse().data]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_a_large_body_arrives_unchanged(gateway, client):
    marker = uuid.uuid4().hex
    content = marker + "x" * (5 << 20)  # past what the picker holds for its pick (4 MiB)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4)
    replica = raw.headers["x-sim-backend"]
    assert received(gateway, replica, marker)["body"]["messages"][0]["content"] == content
