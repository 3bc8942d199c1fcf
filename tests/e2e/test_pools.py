"""Self-hosted pools end to end: the demo's four simulated vLLM replicas (`vllm-0`..`vllm-3`,
model `qwen3-8b`) behind real Envoy, ext-proc's endpoint picker choosing the replica of each
request. Which replica served is the simulator's `x-sim-backend` answer header. Loops are
bounded in requests; waits for the picker to see a replica's state poll its `/v1/pools` view."""

from __future__ import annotations

import concurrent.futures
import time

import httpx2
import openai
import pytest

from harness import Stack
from devstack import DEMO_BACKENDS

MODEL = "qwen3-8b"
REPLICAS = ["vllm-0", "vllm-1", "vllm-2", "vllm-3"]
# Long enough to fill several prefix blocks (256 bytes each), as a real system prompt does.
SYSTEM_PROMPTS = [f"You are assistant number {n}. " + f"Rule {n}: answer briefly and politely. " * 40
                  for n in range(8)]


def sdk(stack: Stack, **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=30,
                         default_headers=headers or None)


def served_by(client: openai.OpenAI, system: str, question: str = "hello", **extra) -> str:
    """Asks the pool; returns the replica that answered."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=2, messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": question}], **extra)
    raw.parse()
    return raw.headers["x-sim-backend"]


def pools_view(stack: Stack) -> dict:
    """The pool as ext-proc's picker sees it (its admin port's `GET /v1/pools`)."""
    answer = httpx2.get(f"{stack.ext_proc_admin_url}/v1/pools",
                        headers={"x-modelgate-internal-token": stack.internal_token}, timeout=5)
    answer.raise_for_status()
    (pool,) = answer.json()["data"]
    return {replica["address"]: replica for replica in pool["replicas"]}


def wait_for_picker(stack: Stack, what, within: float = 15) -> dict:
    """Polls the picker's view until `what(view)` holds; fails past `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = pools_view(stack)
        if what(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"the picker never saw it: {pools_view(stack)}")


def ready(stack: Stack, names: list[str]):
    return lambda view: all(view[stack.backend_address(name)]["ready"] for name in names)


def waiting(stack: Stack, name: str, at_least: int):
    def check(view: dict) -> bool:
        metrics = view[stack.backend_address(name)]["metrics"]
        return metrics is not None and metrics["waiting"] >= at_least
    return check


def straight_to(stack: Stack, name: str, count: int) -> list[concurrent.futures.Future]:
    """Sends `count` requests at once straight to a replica's own port, past the gateway:
    load the picker did not send."""
    def send():
        with httpx2.Client(timeout=120) as c:
            c.post(f"{stack.backend_url(name)}/v1/chat/completions",
                   json={"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "busy"}]})
    pool = concurrent.futures.ThreadPoolExecutor(count)
    sent = [pool.submit(send) for _ in range(count)]
    pool.shutdown(wait=False)
    return sent


def patient(pools: dict, **settings) -> None:
    """The demo's pool, slower to call a replica stale: on a busy test machine a scrape can
    be late without the replica being gone."""
    pools["pools"]["vllm-pool"].update(scrape_interval_ms=100, stale_after_ms=2000, **settings)


@pytest.fixture(scope="module")
def gateway():
    # Tokens come 20 ms apart: a long answer is still streaming while the test looks.
    with Stack(simulator_args={name: ["--itl-ms", "20"] for name in REPLICAS}, adjust_pools=patient) as s:
        wait_for_picker(s, ready(s, REPLICAS))
        yield s


def test_a_shared_system_prompt_keeps_its_replica_and_different_ones_spread(gateway):
    client = sdk(gateway)
    for system in SYSTEM_PROMPTS:
        first = served_by(client, system, "first question")
        again = {served_by(client, system, f"question {n}") for n in range(4)}
        assert again == {first}, f"a prompt whose prefix {first} holds moved to {again - {first}}"
    served = {served_by(client, system, "one more") for system in SYSTEM_PROMPTS}
    assert len(served) >= 2, f"eight different system prompts all went to {served}"


def test_a_session_stays_on_its_replica(gateway):
    served = set()
    for session in range(8):
        client = sdk(gateway, **{"x-session-id": f"conversation-{session}"})
        replicas = {served_by(client, "short", f"turn {turn}") for turn in range(4)}
        assert len(replicas) == 1, f"session {session} moved between {replicas}"
        served |= replicas
    assert len(served) >= 2, f"eight sessions all went to {served}"


def test_a_clients_destination_header_steers_nothing(gateway):
    client = sdk(gateway)
    system = SYSTEM_PROMPTS[1] + " Steering."
    home = served_by(client, system)
    elsewhere = next(name for name in REPLICAS if name != home)
    steering = sdk(gateway, **{"x-gateway-destination-endpoint": gateway.backend_address(elsewhere)})
    assert {served_by(steering, system, f"steer {n}") for n in range(4)} == {home}


def test_the_pickers_view_is_for_callers_with_the_internal_token(gateway):
    refused = httpx2.get(f"{gateway.ext_proc_admin_url}/v1/pools", timeout=5)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_internal_token"
    view = pools_view(gateway)
    assert sorted(view) == sorted(gateway.backend_address(name) for name in REPLICAS)


def test_streams_are_picked_too(gateway):
    client = sdk(gateway)
    system = SYSTEM_PROMPTS[0] + " Streams."
    replicas = set()
    for n in range(4):
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, max_tokens=4, stream=True,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{n}"}]) as raw:
            chunks = list(raw.parse())
            replicas.add(raw.headers["x-sim-backend"])
        assert chunks and chunks[-1].choices[-1].finish_reason is not None
    assert len(replicas) == 1, f"one system prompt's streams went to {replicas}"


def test_a_replica_breaking_off_a_stream_ends_it_with_an_openai_error_event(gateway):
    """Picked on the listener, a pool's stream is still relayed by the stream guard."""
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk(gateway).chat.completions.create(
                model=MODEL, stream=True, messages=[{"role": "user", "content": "hello"}],
                extra_headers={"x-sim-abort-after": "2"}):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "This", " is"]
    assert type(err.value) is openai.APIError
    assert err.value.body["code"] == "stream_interrupted"


def test_the_count_in_flight_lasts_until_the_answer_ends(gateway):
    """The picker counts a request in flight on its replica from the pick until its answer
    has ended, though ext-proc sees nothing of a pool's answers."""
    before = {address: replica["in_flight"] for address, replica in pools_view(gateway).items()}
    assert sum(before.values()) == 0
    client = sdk(gateway)
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, max_tokens=64, stream=True, messages=[{"role": "user", "content": "count"}]) as raw:
        replica = gateway.backend_address(raw.headers["x-sim-backend"])
        stream = raw.parse()
        next(iter(stream))
        assert pools_view(gateway)[replica]["in_flight"] == 1, "counted while its answer streams"
        list(stream)
    wait_for_picker(gateway, lambda view: view[replica]["in_flight"] == 0)


def test_a_replica_killed_mid_run_costs_no_client_error(gateway):
    client = sdk(gateway)
    victim = "vllm-3"
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            asks = [pool.submit(served_by, client, SYSTEM_PROMPTS[n % 8], f"kill run {n}") for n in range(40)]
            # Killed once the run is under way, with requests in flight.
            asks[8].result()
            gateway.kill(victim)
            served = [ask.result() for ask in asks]
        assert len(served) == 40, "every request answered, none with an error"
        # The picker saw it die; the rest of the pool serves everything.
        wait_for_picker(gateway, lambda view: not view[gateway.backend_address(victim)]["ready"])
        assert victim not in {served_by(client, system, "after") for system in SYSTEM_PROMPTS}
    finally:
        gateway.restart(victim, port=next(port for port, name in DEMO_BACKENDS.items() if name == victim))
        wait_for_picker(gateway, ready(gateway, REPLICAS))


# One replica that takes a single sequence at a time, each for a long while: a queue forms there.
SLOW = ["--max-num-seqs", "1", "--ttft-ms", "1500"]


@pytest.fixture(scope="module")
def one_slow_replica():
    with Stack(simulator_args={"vllm-3": SLOW}, adjust_pools=patient) as s:
        wait_for_picker(s, ready(s, REPLICAS))
        yield s


def test_an_overloaded_replica_is_avoided(one_slow_replica):
    stack = one_slow_replica
    load = straight_to(stack, "vllm-3", 4)
    wait_for_picker(stack, waiting(stack, "vllm-3", 2))
    client = sdk(stack)
    served = {served_by(client, system, "while vllm-3 is queued") for system in SYSTEM_PROMPTS}
    assert "vllm-3" not in served
    for sent in load:
        sent.result()


@pytest.fixture(scope="module")
def slow_pool():
    """Every replica slow and one at a time; the pool sheds once each has one waiting."""
    def small_limit(pools: dict) -> None:
        patient(pools, max_waiting=1, retry_after_secs=3)
    with Stack(simulator_args={name: SLOW for name in REPLICAS}, adjust_pools=small_limit) as s:
        wait_for_picker(s, ready(s, REPLICAS))
        yield s


def test_a_pool_queued_past_max_waiting_sheds_with_429_and_retry_after(slow_pool):
    stack = slow_pool
    loads = [straight_to(stack, name, 3) for name in REPLICAS]
    wait_for_picker(stack, lambda view: all(waiting(stack, name, 1)(view) for name in REPLICAS))
    with pytest.raises(openai.RateLimitError) as shed:
        served_by(sdk(stack), "shed me")
    assert shed.value.response.headers["retry-after"] == "3"
    assert shed.value.code == "pool_saturated"
    assert shed.value.body["type"] == "rate_limit_error"
    for sent in (sent for load in loads for sent in load):
        sent.result()


def test_a_pool_without_a_ready_replica_answers_503(slow_pool):
    stack = slow_pool
    for name in REPLICAS:
        stack.kill(name)
    wait_for_picker(stack, lambda view: not any(replica["ready"] for replica in view.values()))
    with pytest.raises(openai.InternalServerError) as refused:
        served_by(sdk(stack), "anyone there?")
    assert refused.value.status_code == 503
    assert refused.value.code == "no_ready_replica"
    assert refused.value.response.headers["x-should-retry"] == "true"


def named_by_dns(pools: dict) -> None:
    """The demo's pool with its replicas a name's addresses, as a headless Service gives its pods':
    `localhost` at vllm-0's port (127.0.0.1 here, maybe ::1 too, where nothing listens)."""
    pool = pools["pools"]["vllm-pool"]
    del pool["replicas"]
    pool["dns"] = f"localhost:{next(port for port, name in DEMO_BACKENDS.items() if name == 'vllm-0')}"
    patient(pools, dns_refresh_ms=200)


@pytest.fixture(scope="module")
def dns_gateway():
    with Stack(adjust_pools=named_by_dns) as s:
        yield s


def test_a_pool_named_by_dns_picks_among_the_names_addresses(dns_gateway):
    replica = dns_gateway.backend_address("vllm-0")
    port = replica.rsplit(":", 1)[1]
    view = wait_for_picker(dns_gateway, lambda view: replica in view and view[replica]["ready"])
    assert all(address.endswith(f":{port}") for address in view), f"not the name's addresses: {sorted(view)}"
    client = sdk(dns_gateway)
    # Without the pick, Envoy's own balancing would spread these over the cluster's four replicas.
    served = {served_by(client, system) for system in SYSTEM_PROMPTS}
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, max_tokens=4, stream=True, messages=[{"role": "user", "content": "stream"}]) as raw:
        assert list(raw.parse())
        served.add(raw.headers["x-sim-backend"])
    assert served == {"vllm-0"}
    answer = httpx2.get(f"{dns_gateway.ext_proc_admin_url}/v1/pools",
                        headers={"x-modelgate-internal-token": dns_gateway.internal_token}, timeout=5)
    (pool,) = answer.json()["data"]
    assert pool["dns"] == {"name": f"localhost:{port}", "refresh_ms": 200, "lookup_failures": 0}
    assert pools_view(dns_gateway)[replica]["picks"] == len(SYSTEM_PROMPTS) + 1
