"""What clients send cannot grow the gateway's metrics or crowd out its usage records: model
names and request ids are bounded before they become labels, log fields or records, a model
name becomes a label only once a backend has answered it (or an exact route names it), and
requests refused before any backend are counted in aggregate rather than recorded one by one."""

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest

from harness import (Stack, edit_filter_config, labels, metrics, metrics_text, new_request_id as rid,
                     parse_metrics, received_by, report, requests_counted, wait_for_requests)

# The qwen backend serves these two models only, as a real engine does; `qwen-*` routes any name to it.
QWEN_MODELS = ["qwen-2.5-7b-instruct", "qwen-3-32b"]
FLUSH_MS = 3000
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HELLO = [{"role": "user", "content": "hi"}]


def slow_flush(config: dict) -> None:
    # Batches a few seconds apart: a flood has time to fill a worker's outbox between two of them.
    edit_filter_config(config, lambda routing: routing["accounting"].update(flush_interval_ms=FLUSH_MS))


@pytest.fixture(scope="module")
def gateway():
    models = [arg for model in QWEN_MODELS for arg in ["--model", model]]
    with Stack(adjust_config=slow_flush, simulator_args={"sglang-qwen": models}) as s:
        yield s


@pytest.fixture
def http(gateway):
    with httpx2.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=60) as c:
        yield c


def chat(http, model: str, request_id: str | None = None) -> httpx2.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    return http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2},
                     headers=headers)


def test_a_flood_of_odd_model_names_leaves_metrics_small_and_real_models_named(gateway, http):
    before = requests_counted(gateway)
    odd = ["qwen-" + "x" * (256 << 10) for _ in range(2)]
    odd += ['qwen-"} evil 1\n', "qwen-\u0000\u202e\U0001f600", "qwen- spaced name", "qwen-" + "é" * 64]
    # More distinct names than ext-proc names at all, none of which the backend serves.
    odd += [f"qwen-junk-{i}-{uuid.uuid4().hex}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda model: chat(http, model).status_code, odd))
    assert set(statuses) == {404}, set(statuses)
    # Then models the backends do serve: by a pattern route, and by an exact one.
    assert chat(http, "qwen-3-32b").status_code == 200
    assert chat(http, "llama-3.1-8b-instruct").status_code == 200
    wait_for_requests(gateway, before + len(odd) + 2, within=3 * FLUSH_MS / 1000 + 10)

    text = metrics_text(gateway)
    report(f"record bounds: /metrics is {len(text)} bytes after {len(odd)} requests for odd model names")
    assert len(text) < 64 << 10, f"/metrics is {len(text)} bytes"
    m = parse_metrics(text)
    assert m[f"modelgate_requests_total{labels(model='qwen-3-32b', backend='qwen-pool', key='', traffic='interactive')}"] == 1
    assert m[f"modelgate_requests_total{labels(model='llama-3.1-8b-instruct', backend='llama-pool', key='', traffic='interactive')}"] >= 1
    # Names no backend answered are counted together, under a placeholder: none is lost.
    unnamed = sum(v for k, v in m.items() if k.startswith("modelgate_errors_total")
                  and ('model="(other)"' in k or 'model="(invalid)"' in k))
    assert unnamed == len(odd)
    named = {k.split('model="', 1)[1].split('"', 1)[0] for k in m if k.startswith("modelgate_requests_total")}
    assert not any("junk" in name for name in named), named
    assert max(len(name) for name in named) <= 128
    rows = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/usage/report").json()["data"]
    assert max(len(row["model"]) for row in rows) <= 128
    assert len(rows) < 20, rows


def test_an_odd_request_id_is_replaced_by_a_generated_one_everywhere(gateway, http):
    kept = rid()
    answer = chat(http, "mistral-7b-instruct", kept)
    assert answer.headers["x-request-id"] == kept
    for sent in ["x" * 4096, "id with spaces", "id\"quoted\"", "ïd"]:
        answer = http.post("/v1/chat/completions", json={"model": "mistral-7b-instruct", "messages": HELLO},
                           headers={"x-request-id": sent.encode()})
        assert answer.status_code == 200, answer.text
        generated = answer.headers["x-request-id"]
        assert UUID.match(generated), generated
        # The backend saw the same id the client got back, and so does the usage record.
        assert received_by(gateway, "llamacpp-mistral", generated) is not None
        assert received_by(gateway, "llamacpp-mistral", sent) is None
    # A refusal answered by the gateway itself carries a generated id too.
    refused = chat(http, "no-such-model", "y" * 4096)
    assert refused.status_code == 404 and UUID.match(refused.headers["x-request-id"]), refused.headers
    # ext-proc logs the record of the last good request with the id its client got.
    deadline = time.monotonic() + 2 * FLUSH_MS / 1000 + 10
    while generated not in gateway.log_tail("ext-proc", 400):
        assert time.monotonic() < deadline, gateway.log_tail("ext-proc", 40)
        time.sleep(0.2)


def test_a_flood_of_refusals_with_huge_request_ids_loses_no_good_record(gateway):
    def key(model: str, status: int | None = None) -> str:
        family = "modelgate_errors_total" if status else "modelgate_requests_total"
        extra = {"status": str(status)} if status else {}
        return f"{family}{labels(model=model, backend='' if status else 'mistral-pool', key='', **extra, traffic='interactive')}"

    start = metrics(gateway)
    good_key, refused_key = key("mistral-7b-instruct"), key("", 404)
    # Recorded with their ids, about 160 refusals like these filled a worker's 8 MiB outbox between two batches.
    huge = "r" * (50 << 10)
    flood, good = 1200, 60

    def send(lane: int) -> list[int]:
        """Every sixteenth request, on one connection: a good request among every twenty refusals."""
        with httpx2.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=60) as c:
            return [chat(c, "mistral-7b-instruct", rid()).status_code if i % (flood // good + 1) == 0
                    else chat(c, "no-such-model", f"{huge}{i}").status_code
                    for i in range(lane, flood + good, 16)]

    with ThreadPoolExecutor(16) as pool:
        statuses = [status for lane in pool.map(send, range(16)) for status in lane]
    assert statuses.count(200) == good and statuses.count(404) == flood, set(statuses)
    deadline = time.monotonic() + 3 * FLUSH_MS / 1000 + 10
    while True:
        m = metrics(gateway)
        counted = (m.get(good_key, 0) - start.get(good_key, 0), m.get(refused_key, 0) - start.get(refused_key, 0))
        if counted == (good, flood) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Every good request's record arrived, and every refusal was counted once.
    assert counted == (good, flood), gateway.log_tail("envoy", 5)[-2000:]  # the filter logs what it drops
    assert m.get("modelgate_usage_records_dropped_total") == 0
    envoy_stats = httpx2.get(f"{gateway.admin_url}/stats?filter=usage_records_dropped").text
    assert "wasmcustom.modelgate.usage_records_dropped: 0" in envoy_stats, envoy_stats
