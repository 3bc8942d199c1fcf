"""What the gateway's end-to-end tests share: starting a stack (tools/devstack.py, re-exported
here), the configurations they add to the demo's, SDK clients, what a simulated backend
received, ext-proc's metrics and Envoy's stats, waiting for records, and OpenAI's schemas to
check answers against. Tests import from here; conftest.py holds only the fixtures."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx2  # the HTTP client the openai SDK itself is built on
import openai
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from devstack import (DEMO_ANTHROPIC_KEY, EXT_PROC_ADMIN_PORT, EXT_PROC_PORT, INNER_LISTENER_PORT, FakeClock,  # noqa: E402,F401
                      POOL_REPLICAS, S3, STREAM_GUARD_PORT, Redis, Stack, allow_backend_clusters, edit_filter_config, free_port,
                      http_connection_manager)

SPEC_PATH = Path(os.environ.get("OPENAI_OPENAPI_SPEC", ROOT.parent / "shared" / "openai-openapi" / "openapi.yaml"))


def add_failing_backends(config: dict) -> None:
    """Models whose backends fail inside Envoy: `dead-model`'s port refuses connections,
    `empty-model`'s cluster has no endpoints, `ghost-model` names a cluster Envoy does not
    have, and `slow-model` reaches the llama backend through a route with a 0.5 s timeout."""
    def failing(routing: dict) -> None:
        routing["backends"].update({"dead": {"cluster": "dead_pool"}, "empty": {"cluster": "empty_pool"},
                                    "ghost": {"cluster": "no_such_cluster"}, "slow": {"cluster": "slow_pool"}})
        routing["models"] += [{"match": f"{name}-model", "backend": name}
                              for name in ["dead", "empty", "ghost", "slow"]]

    edit_filter_config(config, failing)

    def cluster(name: str, port: int) -> dict:
        return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}

    # 8001 is the llama backend's port in demo.yaml; the harness remaps it with the others.
    empty = {"name": "empty_pool", "type": "STATIC", "load_assignment": {"cluster_name": "empty_pool"}}
    config["static_resources"]["clusters"] += [cluster("dead_pool", free_port()), cluster("slow_pool", 8001), empty]
    slow = {"route": {"cluster": "slow_pool", "timeout": "0.5s"}, "request_headers_to_remove": ["x-modelgate-cluster"]}
    routes = http_connection_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {
        "match": {"prefix": "/", "headers": [{"name": "x-modelgate-cluster", "string_match": {"exact": "slow_pool"}}]},
        **slow,
    })
    # Streams reach their backends through the inner listener.
    allow_backend_clusters(config, ["dead_pool", "empty_pool", "no_such_cluster"])
    allow_backend_clusters(config, ["slow_pool"], slow)


# Where the `filekey` backend's API key is read from; tests rewrite it to rotate the key.
KEY_FILE = Path(tempfile.mkdtemp(prefix="modelgate-keys-")) / "backend-key"
# How long ext-proc and the stream guard use a key file's contents before reading it again
# (credentials.rs, KEY_FILE_FRESH).
KEY_FILE_FRESH_S = 1.0


def rewrite_key_file(text: str | None) -> None:
    """Writes KEY_FILE (removes it, with None), then waits until the gateway reads it again."""
    if text is None:
        KEY_FILE.unlink()
    else:
        KEY_FILE.write_text(text)
    time.sleep(KEY_FILE_FRESH_S + 0.2)


def add_keyed_backends(config: dict) -> None:
    """Two more routes to the llama backend: `filekey-model` is called with the key in
    KEY_FILE, `shared-model` with the client's own key (passthrough)."""
    def keyed(routing: dict) -> None:
        routing["backends"].update({"filekey": {"cluster": "llama_pool", "api_key": {"file": str(KEY_FILE)}},
                                    "shared": {"cluster": "llama_pool", "api_key": "passthrough"}})
        routing["models"] += [{"match": "filekey-model", "backend": "filekey"},
                              {"match": "shared-model", "backend": "shared"}]

    edit_filter_config(config, keyed)


# Client keys of the gateway the Responses and Messages tests share (`client_api_gateway`): two
# owners of stored responses, and one allowed a single request a minute.
ALICE, BOB, LIMITED = "sk-alice-client-api", "sk-bob-client-api", "sk-limited-client-api"


def with_client_api_keys(config: dict) -> None:
    """Client keys ALICE, BOB and LIMITED (named alice, bob, limited), usage flushed every 100 ms."""
    def edit(routing: dict) -> None:
        digest = lambda key: hashlib.sha256(key.encode()).hexdigest()  # noqa: E731
        routing["client_keys"] = [{"name": "alice", "sha256": digest(ALICE)}, {"name": "bob", "sha256": digest(BOB)},
                                  {"name": "limited", "sha256": digest(LIMITED),
                                   "limits": {"requests_per_minute": 1}}]
        routing["accounting"]["flush_interval_ms"] = 100
    edit_filter_config(config, edit)


def open_gate(stack, backend: str, gate: str) -> None:
    """Lets the streams a simulated backend holds at `gate` (`x-sim-gate`) go on."""
    httpx2.post(f"{stack.backend_url(backend)}/sim/gates/{gate}").raise_for_status()


def held_at_gate(stack, backend: str, gate: str) -> int:
    """How many streams a simulated backend holds at `gate`, their first token sent."""
    return httpx2.get(f"{stack.backend_url(backend)}/sim/gates/{gate}").json()["waiting"]


def backend_requests(stack, backend: str) -> list[dict]:
    """What a simulated backend received, oldest first."""
    return httpx2.get(f"{stack.backend_url(backend)}/sim/requests").json()["requests"]


def attempts_at(stack, backend: str, request_id: str) -> list[dict]:
    """What a backend received with this x-request-id: one entry per attempt."""
    return [r for r in backend_requests(stack, backend) if r["headers"].get("x-request-id") == request_id]


def received_by(stack, backend: str, request_id: str) -> dict | None:
    """The request a backend received with this x-request-id, if any."""
    return next(iter(attempts_at(stack, backend, request_id)), None)


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def client_key(name: str, key: str, **settings) -> dict:
    """A `client_keys` entry: the key's name, its SHA-256, and any settings (limits, budgets)."""
    return {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), **settings}


def new_prompt(topic: str) -> str:
    """A prompt no other request sends, so what a backend received for it can be counted."""
    return f"{topic} {uuid.uuid4().hex}"


def backend_calls(stack, backend: str, prompt: str) -> int:
    """How many requests carrying `prompt` a simulated backend received."""
    return sum(prompt in json.dumps(r["body"]) for r in backend_requests(stack, backend))


def budgets(stack, key: str) -> dict[tuple[str, str], dict]:
    """ext-proc's `GET /v1/usage/budgets` for one key, by each budget's scope and amount."""
    answer = httpx2.get(f"{stack.ext_proc_admin_url}/v1/usage/budgets", params={"key": key})
    assert answer.status_code == 200, answer.text
    listed = answer.json()
    assert listed["object"] == "list"
    return {(row["scope"], row["amount"]): row for row in listed["data"]}


def sdk(stack, retries: int = 0, key: str = "sk-client-key") -> openai.OpenAI:
    """The official client against the gateway, with the given retries."""
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=retries, timeout=30)


def metrics_text(stack) -> str:
    """ext-proc's `/metrics`, as Prometheus scrapes it."""
    return httpx2.get(f"{stack.ext_proc_admin_url}/metrics").text


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a `/metrics` text, by its name and labels as written."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def metrics(stack) -> dict[str, float]:
    """Every sample of ext-proc's `/metrics`, by its name and labels as written."""
    return parse_metrics(metrics_text(stack))


def labels(**values: str) -> str:
    """A sample's labels as `/metrics` writes them: `{model="m",key="k"}`."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in values.items()) + "}"


def requests_counted(stack) -> float:
    """Requests ext-proc has counted, all labels together."""
    return sum(v for k, v in metrics(stack).items() if k.startswith("modelgate_requests_total"))


def wait_for_requests(stack, count: float, within: float) -> None:
    """Waits until ext-proc has counted `count` requests: every Envoy worker's records and
    counts arrive with its next batch."""
    deadline = time.monotonic() + within
    while requests_counted(stack) < count:
        assert time.monotonic() < deadline, f"{requests_counted(stack)} of {count} requests counted"
        time.sleep(0.1)


def envoy_stat(stack, pattern: str) -> int:
    """The sum of Envoy's stats whose names match `pattern` (a regular expression); 0 if none."""
    stats = httpx2.get(f"{stack.admin_url}/stats", params={"filter": pattern}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if line.strip())


# A function tool the dialect tests offer; the simulators call it with {"city": "simulated"}.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def assert_streams_as_generated(client: openai.OpenAI, model: str) -> None:
    """A stream of 20 tokens, 50 ms apart, reaches the client chunk by chunk: the first
    content about a second before the last token is generated, none held back."""
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": "count"}], stream=True,
            extra_headers={"x-sim-itl-ms": "50", "x-sim-output-tokens": "20"}) as response:
        start = time.monotonic()
        arrivals = [time.monotonic() - start for line in response.iter_lines()
                    if line.startswith("data: {") and json.loads(line[len("data: "):]).get("choices")]
    # the role chunk, 20 tokens, the finish
    assert len(arrivals) == 22
    assert arrivals[-1] - arrivals[1] > 0.8, arrivals
    gaps = [b - a for a, b in zip(arrivals[2:-1], arrivals[3:-1])]
    assert min(gaps) > 0.02, f"chunks were held back and released together: {arrivals}"


def _nullable_as_json_schema(node):
    """The spec still marks some schemas with OpenAPI 3.0's `nullable: true`, which
    JSON Schema ignores; spell it as JSON Schema so null is accepted there."""
    if isinstance(node, list):
        return [_nullable_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


class Spec:
    """Validates JSON against a component schema of OpenAI's OpenAPI description."""

    def __init__(self, path: Path):
        self.path = path
        self.available = path.exists()
        if self.available:
            import jsonschema
            import referencing

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            document = _nullable_as_json_schema(yaml.load(path.read_text(), Loader=loader))
            resource = referencing.Resource.from_contents(document, default_specification=referencing.jsonschema.DRAFT202012)
            self._registry = referencing.Registry().with_resource("openapi", resource)
            self._validator_class = jsonschema.Draft202012Validator

    def validate(self, schema: str, instance) -> None:
        if not self.available:
            return
        validator = self._validator_class({"$ref": f"openapi#/components/schemas/{schema}"}, registry=self._registry)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{schema}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


# Batches (the Files and Batch APIs): a batch's input lines, and reading back what it wrote.

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat_line(custom_id: str, model: str = "llama-3.1-8b-instruct", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}], **body}}


def jsonl(lines: list) -> bytes:
    """An input file: dicts as JSON lines, strings as they are (a broken line, say)."""
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


def upload(client: openai.OpenAI, lines: list, purpose: str = "batch"):
    return client.files.create(file=("input.jsonl", jsonl(lines), "application/jsonl"), purpose=purpose)


def start_batch(client: openai.OpenAI, lines: list, endpoint: str = "/v1/chat/completions", **params):
    """Uploads `lines` and creates a batch of them."""
    return client.batches.create(input_file_id=upload(client, lines).id, endpoint=endpoint,
                                 completion_window="24h", **params)


def wait_for_batch(client: openai.OpenAI, batch_id: str, until=lambda b: b.status in TERMINAL,
                   within: float = 30, outage: bool = False):
    """Polls the batch, as a user watching it would, until `until(batch)`; with `outage`, the
    gateway answering 5xx or not at all (ext-proc restarting) is waited out too."""
    deadline = time.monotonic() + within
    batch = None
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if until(batch):
                return batch
        except (openai.InternalServerError, openai.APIConnectionError):
            if not outage:
                raise
        assert time.monotonic() < deadline, f"batch {batch_id} after {within}s: {batch}"
        time.sleep(0.05)


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    """A batch's output or error file, line by line (none for no file)."""
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    assert text == "" or text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def results(client: openai.OpenAI, batch, custom_ids: list[str]) -> tuple[dict, dict]:
    """A finished batch's output and error lines by custom_id, checked to hold every input
    line exactly once between them, as its request_counts say."""
    output, errors = file_lines(client, batch.output_file_id), file_lines(client, batch.error_file_id)
    written = [line["custom_id"] for line in output + errors]
    assert sorted(written) == sorted(custom_ids), \
        f"lost: {set(custom_ids) - set(written)}; twice: {sorted(i for i in set(written) if written.count(i) > 1)}"
    assert len({line["id"] for line in output + errors}) == len(written)
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == \
        (len(custom_ids), len(output), len(errors))
    return {line["custom_id"]: line for line in output}, {line["custom_id"]: line for line in errors}


def raw_json(call, *args, **kwargs):
    """The JSON of an SDK call's answer as it came, to validate against OpenAI's schemas
    (the SDK's objects hold unset fields as None)."""
    return call(*args, **kwargs).http_response.json()


# Figures tests measured (the fault tests' counts), shown at the end of the run.
REPORTED: list[str] = []


def report(line: str) -> None:
    REPORTED.append(line)




def raw_http(port: int, request: bytes, timeout: float = 30) -> bytes:
    """Sends `request` as it is and reads the answer, byte for byte, until the gateway closes the
    connection (after `connection: close`, or a request it cannot read)."""
    import socket

    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            received += chunk
    return received


@dataclass
class H2Answer:
    status: int
    headers: dict[str, str]
    data: bytes
    trailers: dict[str, str]


def h2c_post(port: int, body: dict, headers: dict[str, str], trailers: bool = False) -> H2Answer:
    """A chat completions POST over HTTP/2 without TLS (h2c), its body ending in trailers if
    asked: the answer as the client gets it, its trailers included."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
                          (":authority", "gateway"), ("content-type", "application/json"), *headers.items()])
    conn.send_data(1, json.dumps(body).encode(), end_stream=not trailers)
    if trailers:
        conn.send_headers(1, [("x-checksum", "none")], end_stream=True)
    answer = H2Answer(0, {}, b"", {})
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(conn.data_to_send())
        ended = False
        while not ended:
            received = sock.recv(65536)
            assert received, "the gateway closed the connection"
            for event in conn.receive_data(received):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = {k.decode(): v.decode() for k, v in event.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
    return answer
