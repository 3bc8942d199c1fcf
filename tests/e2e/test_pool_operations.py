"""vLLM's operational API through the gateway, on real Envoy and four simulated
vLLM replicas (pool `vllm-pool`, model `qwen3-8b`, adapters routed by `qwen3-8b*`):
an admin key loads and unloads LoRA adapters on the pool's replicas, the adapters
show in `/v1/models` and are served only where they are loaded, and `/tokenize`
and `/detokenize` are routed by model like any other request."""

import hashlib

import httpx2
import openai
import pytest

from harness import Stack, edit_filter_config

ADMIN, PLAIN = "sk-ops-admin-0001", "sk-plain-0002"
REPLICAS = {8011: "vllm-0", 8012: "vllm-1", 8013: "vllm-2", 8014: "vllm-3"}
HELLO = [{"role": "user", "content": "hello"}]


def with_keys(config: dict) -> None:
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    edit_filter_config(config, lambda routing: routing.update(client_keys=[
        {"name": "ops", "sha256": digest(ADMIN), "admin": True},
        {"name": "plain", "sha256": digest(PLAIN)},
    ]))


@pytest.fixture(scope="module")
def stack():
    # vllm-3's first adapter load fails (a 503), as a replica busy loading might.
    with Stack(adjust_config=with_keys, simulator_args={"vllm-3": ["--lora-load-failures", "1"]}) as s:
        yield s


def replica_names(stack) -> dict[str, str]:
    """Each replica's address, as the report names it, to its simulator's name."""
    return {f"127.0.0.1:{stack.ports[port]}": name for port, name in REPLICAS.items()}


def post(stack, path: str, key: str, body: dict, headers: dict | None = None) -> httpx2.Response:
    """POSTs to a path at the gateway's root (vLLM serves /tokenize there, and its LoRA operations under /v1)."""
    root = stack.base_url.removesuffix("/v1")
    headers = {"authorization": f"Bearer {key}", **(headers or {})}
    return httpx2.post(f"{root}{path}", json=body, headers=headers, timeout=60)


def model_ids(stack, key: str = PLAIN) -> list[str]:
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    return [m.id for m in client.models.list().data]


def served_by(stack, model: str, times: int = 12) -> set[str]:
    client = openai.OpenAI(base_url=stack.base_url, api_key=PLAIN, max_retries=0)
    names = set()
    for i in range(times):
        answer = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4)
        names.add(answer.headers["x-sim-backend"])
    return names


def test_a_key_not_marked_admin_is_refused_with_an_openai_403(stack, spec):
    refused = post(stack, "/v1/load_lora_adapter", PLAIN, {"lora_name": "qwen3-8b-x", "lora_path": "/a/x"})
    assert refused.status_code == 403
    spec.validate("ErrorResponse", refused.json())
    assert refused.json()["error"]["code"] == "admin_key_required"
    assert refused.json()["error"]["type"] == "permission_error"
    assert refused.headers["x-request-id"]
    assert "qwen3-8b-x" not in model_ids(stack)


def test_a_replica_that_fails_its_first_load_succeeds_on_retry(stack):
    loaded = post(stack, "/v1/load_lora_adapter", ADMIN, {"lora_name": "qwen3-8b-everywhere", "lora_path": "/a/e"})
    assert loaded.status_code == 200, loaded.text
    report = loaded.json()
    assert (report["action"], report["pool"], report["lora_name"]) == ("load", "vllm-pool", "qwen3-8b-everywhere")
    names = replica_names(stack)
    tries = {names[line["replica"]]: line["tries"] for line in report["replicas"]}
    assert {line["outcome"] for line in report["replicas"]} == {"loaded"}
    assert tries == {"vllm-0": 1, "vllm-1": 1, "vllm-2": 1, "vllm-3": 2}
    assert served_by(stack, "qwen3-8b-everywhere") <= set(REPLICAS.values())


def test_an_adapter_loaded_on_two_replicas_is_listed_served_only_there_then_unloaded(stack, spec):
    loaded = post(stack, "/v1/load_lora_adapter", ADMIN,
                  {"lora_name": "qwen3-8b-sql", "lora_path": "/adapters/sql", "replicas": 2})
    assert loaded.status_code == 200, loaded.text
    lines = loaded.json()["replicas"]
    assert [line["outcome"] for line in lines] == ["loaded", "loaded"]
    holders = {replica_names(stack)[line["replica"]] for line in lines}

    assert "qwen3-8b-sql" in model_ids(stack)
    one = httpx2.get(f"{stack.base_url}/models/qwen3-8b-sql", headers={"authorization": f"Bearer {PLAIN}"})
    assert (one.status_code, one.json()["owned_by"]) == (200, "vllm")
    spec.validate("Model", one.json())
    assert served_by(stack, "qwen3-8b-sql") <= holders

    unloaded = post(stack, "/v1/unload_lora_adapter", ADMIN, {"lora_name": "qwen3-8b-sql"})
    assert unloaded.status_code == 200, unloaded.text
    outcomes = {replica_names(stack)[line["replica"]]: line["outcome"] for line in unloaded.json()["replicas"]}
    assert outcomes == {name: "unloaded" if name in holders else "not_loaded" for name in REPLICAS.values()}
    assert "qwen3-8b-sql" not in model_ids(stack)
    client = openai.OpenAI(base_url=stack.base_url, api_key=PLAIN, max_retries=0)
    with pytest.raises(openai.NotFoundError) as gone:
        client.chat.completions.create(model="qwen3-8b-sql", messages=HELLO)
    assert gone.value.body["code"] == "model_not_found"
    spec.validate("ErrorResponse", gone.value.response.json())


def test_a_bad_operation_is_refused_by_name(stack, spec):
    refused = post(stack, "/v1/load_lora_adapter", ADMIN, {"lora_name": "qwen3-8b-y"})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "lora_path")
    spec.validate("ErrorResponse", refused.json())
    refused = post(stack, "/v1/load_lora_adapter", ADMIN, {"lora_name": "qwen3-8b-y", "lora_path": "/a", "replicas": 9})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "replicas")


@pytest.mark.parametrize("model", ["qwen3-8b", "llama-3.1-8b-instruct"])
def test_tokenize_and_detokenize_round_trip_through_the_gateway(stack, model):
    text = "the quick brown fox"
    # A simulated replica learns its vocabulary as it tokenizes: the session keeps both on one replica.
    session = {"x-session-id": f"tokenize-{model}"}
    tokens = post(stack, "/tokenize", PLAIN, {"model": model, "prompt": text}, session)
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] == len(tokens.json()["tokens"]) > 0
    back = post(stack, "/detokenize", PLAIN, {"model": model, "tokens": tokens.json()["tokens"]}, session)
    assert back.status_code == 200, back.text
    assert back.json()["prompt"] == text


def test_tokenize_for_an_anthropic_model_is_an_openai_404_naming_the_dialect(stack, spec):
    refused = post(stack, "/tokenize", PLAIN, {"model": "claude-haiku-4-5", "prompt": "hi"})
    assert refused.status_code == 404
    spec.validate("ErrorResponse", refused.json())
    error = refused.json()["error"]
    assert error["code"] == "unsupported_endpoint"
    assert "Anthropic" in error["message"] and "/tokenize" in error["message"]
