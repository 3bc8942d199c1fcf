"""The simulator's vLLM side as an endpoint picker and an operator see it:
vLLM's metrics by their real names, LoRA adapters loaded at run time, and
`/tokenize` and `/detokenize`, checked on one simulated replica directly."""

import re

import openai
import pytest
from devstack import Stack

import httpx2

REPLICA = "vllm-0"
MODEL = "qwen3-8b"
KV_CACHE_TOKENS = 4096
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def replica():
    """The base URL of a pool replica whose first adapter load fails (as a flaky load would)."""
    stack = Stack(simulator_args={REPLICA: ["--kv-cache-tokens", str(KV_CACHE_TOKENS), "--block-size",
                                            str(BLOCK_SIZE), "--lora-load-failures", "1", "--max-loras", "2"]})
    stack.start_simulators()
    try:
        yield stack.backend_url(REPLICA)
    finally:
        stack.stop()


@pytest.fixture
def client(replica) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{replica}/v1", api_key="unused", max_retries=0)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def scrape(replica: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """`/metrics` in the Prometheus text format: each family's type, and every sample
    with its labels; a line that is neither a comment nor a sample fails the test."""
    types, samples = {}, []
    for line in httpx2.get(f"{replica}/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            types[family] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample: {line!r}"
            name, labels, value = match.groups()
            assert LABEL.sub("", labels or "") == "", f"bad labels: {line!r}"
            samples.append((name, dict(LABEL.findall(labels or "")), float(value)))
    return types, samples


def value(samples, name: str, **labels: str) -> float:
    [found] = [v for n, l, v in samples if n == name and all(l.get(k) == w for k, w in labels.items())]
    return found


def test_vllm_metric_names_types_and_labels(replica):
    types, samples = scrape(replica)
    for family, kind in {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                         "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
                         "vllm:lora_requests_info": "gauge", "vllm:cache_config_info": "gauge",
                         "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
                         "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter"}.items():
        assert types.get(family) == kind, family
    # an idle replica already shows its model, as vLLM does
    assert value(samples, "vllm:num_requests_running", model_name=MODEL) == 0
    assert value(samples, "vllm:num_requests_waiting", model_name=MODEL) == 0
    assert 0 <= value(samples, "vllm:kv_cache_usage_perc", model_name=MODEL) <= 1
    assert value(samples, "vllm:cache_config_info", block_size=str(BLOCK_SIZE),
                 num_gpu_blocks=str(KV_CACHE_TOKENS // BLOCK_SIZE)) == 1
    [(_, lora, _)] = [s for s in samples if s[0] == "vllm:lora_requests_info"]
    assert lora == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def test_a_repeated_prompt_hits_the_prefix_cache(replica, client):
    prompt = " ".join(f"word{i}" for i in range(40))  # 40 tokens: two full blocks of 16
    _, before = scrape(replica)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    _, after = scrape(replica)
    delta = {name: value(after, name, model_name=MODEL) - value(before, name, model_name=MODEL)
             for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")}
    assert delta == {"vllm:prefix_cache_queries_total": 80, "vllm:prefix_cache_hits_total": 32}
    assert value(after, "vllm:kv_cache_usage_perc", model_name=MODEL) > 0, "finished requests' blocks stay cached"


def test_lora_adapters_load_list_serve_and_unload(replica, client):
    adapter = {"lora_name": "qwen3-8b-sql", "lora_path": "/adapters/sql"}
    first = httpx2.post(f"{replica}/v1/load_lora_adapter", json=adapter)
    assert first.status_code == 503 and "failed" in first.json()["error"]["message"], "the first load fails"
    loaded = httpx2.post(f"{replica}/v1/load_lora_adapter", json=adapter)
    assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'qwen3-8b-sql' added successfully.")
    again = httpx2.post(f"{replica}/v1/load_lora_adapter", json=adapter)
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "The lora adapter 'qwen3-8b-sql' has already been loaded."

    models = {m.id: m for m in client.models.list()}
    assert (models["qwen3-8b-sql"].root, models["qwen3-8b-sql"].parent) == ("/adapters/sql", MODEL)
    assert models[MODEL].parent is None

    stream = client.chat.completions.create(model="qwen3-8b-sql", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True, extra_headers={"x-sim-itl-ms": "200"})
    first_chunk = next(iter(stream))
    assert first_chunk.model == "qwen3-8b-sql"
    _, during = scrape(replica)
    [(_, lora, _)] = [s for s in during if s[0] == "vllm:lora_requests_info"]
    assert lora["running_lora_adapters"] == "qwen3-8b-sql"
    assert value(during, "vllm:num_requests_running", model_name=MODEL) == 1, "labelled with the base model"
    list(stream)

    unloaded = httpx2.post(f"{replica}/v1/unload_lora_adapter", json={"lora_name": "qwen3-8b-sql"})
    assert (unloaded.status_code, unloaded.text) == (200, "Success: LoRA adapter 'qwen3-8b-sql' removed successfully.")
    missing = httpx2.post(f"{replica}/v1/unload_lora_adapter", json={"lora_name": "qwen3-8b-sql"})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The lora adapter 'qwen3-8b-sql' cannot be found."
    assert "qwen3-8b-sql" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="qwen3-8b-sql", messages=[{"role": "user", "content": "hi"}])


def test_tokenize_agrees_with_usage_and_detokenize_reverses_it(replica, client):
    prompt = "Tokenizers split extraordinarily long words,\n  and keep  every space."
    answer = httpx2.post(f"{replica}/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert "".join(body["token_strs"]) == prompt
    assert body["count"] == client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).usage.prompt_tokens
    plain = httpx2.post(f"{replica}/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    assert (plain["tokens"], plain["token_strs"]) == (body["tokens"], None)

    back = httpx2.post(f"{replica}/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.json() == {"prompt": prompt}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token?"}]
    counted = httpx2.post(f"{replica}/tokenize", json={"model": MODEL, "messages": messages}).json()["count"]
    assert counted == client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens


def test_tokenize_errors_are_vllms(replica):
    unknown = httpx2.post(f"{replica}/tokenize", json={"model": "nope", "prompt": "hi"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "The model `nope` does not exist."
    never_issued = httpx2.post(f"{replica}/detokenize", json={"model": MODEL, "tokens": [4294967295]})
    assert never_issued.status_code == 400 and "out of vocabulary" in never_issued.json()["error"]["message"]
