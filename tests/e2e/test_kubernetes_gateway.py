"""The gateway of envoy/kubernetes/ in real Envoy: the manifests translated as Envoy Gateway
translates them (gateway_api.py: its xDS names and shapes, the EnvoyPatchPolicy's JSON patches
applied literally), ext-proc and the stream guard started with the Deployments' arguments and
the pools file of the ConfigMap, the simulators standing where the Services and the Backend
point. Both ways of applying them run: the modelgate-owned Gateway (`kubectl apply -k
envoy/kubernetes`) and the bring-your-own overlay on a user's Gateway. The core SDK tests run
against it unchanged: they are imported here, where `stack` is this gateway."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import openai
import pytest
import yaml

from gateway_api import (CLUSTER, MANIFESTS, ROUTING_HEADER, Manifests, Translation, bootstrap, namespace_of,
                         pod_port, service_key)
from harness import Stack, chat_line, results, start_batch, wait_for_batch
from devstack import (ADMIN_PORT, DEMO_CONFIG, DEMO_INTERNAL_TOKEN, INNER_LISTENER_PORT, LISTENER_PORT, WASM)

# The tests of the demo gateway that run here too, against the manifests' gateway.
from test_openai_sdk import (test_chat_completion, test_chat_stream_with_usage_chunk,  # noqa: F401
                             test_embeddings_float_and_base64, test_request_id_is_kept_or_made)
from test_routing import (test_client_cannot_pick_the_cluster_or_rename,  # noqa: F401
                          test_each_prefix_reaches_its_own_backend, test_renamed_model_is_what_the_backend_sees,
                          test_renamed_stream_and_embeddings, test_unknown_model_is_not_found)
from test_anthropic import test_a_chat_with_a_system_prompt, test_a_stream_with_and_without_usage  # noqa: F401
from test_ollama import test_a_chat_with_a_system_prompt_and_options, test_a_chat_stream  # noqa: F401
from test_pools import (REPLICAS, pools_view, ready, wait_for_picker,  # noqa: F401
                        test_a_clients_destination_header_steers_nothing, test_a_session_stays_on_its_replica,
                        test_a_replica_breaking_off_a_stream_ends_it_with_an_openai_error_event,
                        test_a_shared_system_prompt_keeps_its_replica_and_different_ones_spread,
                        test_streams_are_picked_too)
from test_failover import (  # noqa: F401
    test_a_primary_failing_a_third_of_requests_is_hidden_and_retries_stay_in_budget,
    test_a_stream_broken_halfway_ends_with_an_error_event_and_is_not_retried)
from test_large_bodies import (  # noqa: F401
    test_a_large_anthropic_answer_comes_back_translated, test_a_request_at_the_body_limit_reaches_its_backend_rewritten,
    test_a_request_one_byte_over_the_limit_is_a_413_and_goes_nowhere, test_an_answer_too_large_to_translate_is_an_openai_error,
    test_large_whole_answers_come_back_translated)
from test_trust_boundary import (  # noqa: F401
    test_a_clients_hedging_headers_send_no_second_request, test_a_clients_retry_headers_cause_no_second_request,
    test_the_guard_drops_a_clients_envoy_headers_before_the_inner_listener,
    test_the_inner_listener_routes_only_to_backend_clusters, test_the_inner_listener_still_routes_to_backends,
    test_the_stream_guard_serves_only_callers_with_the_internal_token)
from test_errors import (test_a_broken_stream_ends_cleanly_on_the_wire,  # noqa: F401
                         test_a_request_with_headers_near_the_size_limit_gets_the_same_answer_whole_and_streamed,
                         test_a_request_with_many_headers_gets_the_same_answer_whole_and_streamed,
                         test_a_stream_broken_after_its_200_ends_with_an_error_event, test_non_json_content_type_is_415)

# The manifests' names (docs/deployment.md, the contract between them and these tests).
NAMESPACE = "modelgate"
GATEWAY = "modelgate"
# The Envoy pod's port of the stream guard's inner listener.
INNER_LISTENER_POD_PORT = 10001
# Flags whose values are addresses and paths inside a pod: the stack gives its own.
POD_FLAGS = {"--listen", "--admin-listen", "--data-dir", "--key-dir", "--internal-token-file", "--pools",
             "--gateway-url", "--upstream", "--epp-listen", "--epp-pool", "--worker-threads"}


def demo_endpoints() -> dict[str, list[tuple[str, int]]]:
    """The demo's clusters' endpoints, by cluster name (demo ports; the stack remaps them)."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    return {c["name"]: [(e["endpoint"]["address"]["socket_address"]["address"],
                         e["endpoint"]["address"]["socket_address"]["port_value"])
                        for group in c["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
            for c in demo["static_resources"]["clusters"]}


def local_addresses(translation: Translation) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """What plays each address the manifests name: for a backend cluster (an HTTPRoute rule the
    filter's routing header selects), the demo's backend of that cluster; for a cluster the
    patches add under a demo cluster's name (ext-proc, its admin port, the guard), that one."""
    demo = demo_endpoints()
    addresses: dict[tuple[str, int], list[tuple[str, int]]] = {}
    routes = translation.resources["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"]
    for config in routes.values():
        for vhost in config["virtual_hosts"]:
            for route in vhost["routes"]:
                selected = [h["string_match"]["exact"] for h in route["match"].get("headers", [])
                            if h["name"] == ROUTING_HEADER and "exact" in h["string_match"]]
                if not selected or "cluster" not in route.get("route", {}):
                    continue
                for kind, ns, name, port in translation.cluster_backends[route["route"]["cluster"]]:
                    if kind == "Service":
                        addresses[(f"{name}.{ns}", port)] = demo[selected[0]]
                    else:
                        (endpoint,) = translation.manifests.get("Backend", name, ns)["spec"]["endpoints"]
                        addresses[(endpoint["fqdn"]["hostname"], endpoint["fqdn"]["port"])] = demo[selected[0]]
    for name, cluster in translation.resources[CLUSTER].items():
        if name in demo:
            for group in cluster.get("load_assignment", {}).get("endpoints", []):
                for e in group["lb_endpoints"]:
                    socket = e["endpoint"]["address"]["socket_address"]
                    addresses[(service_key(socket["address"]), socket["port_value"])] = demo[name]
    return addresses


def container_args(manifests: Manifests, workload: str) -> list[str]:
    """A Deployment's container arguments, less those naming pod addresses and paths."""
    (container,) = manifests.get("Deployment", workload, NAMESPACE)["spec"]["template"]["spec"]["containers"]
    args, kept, skip = container.get("args", []), [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in POD_FLAGS:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


# The Gateway a bring-your-own-Gateway user already runs, as envoy/kubernetes-byo-gateway names it,
# admitting routes from other namespaces (docs/deployment.md).
YOUR_GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
    "metadata": {"name": "your-gateway", "namespace": "your-gateway-namespace"},
    "spec": {"gatewayClassName": "eg", "listeners": [
        {"name": "http", "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "All"}}}]}}


# On a Gateway of the user's own, what differs from the modelgate-owned case is where things
# attach: the routes to another Gateway, the filter to modelgate's routes only, the policies and
# patches to another namespace and listener. These tests cover each; every other test runs on the
# modelgate-owned Gateway only (conftest.py deselects the rest).
ON_YOUR_GATEWAY_TOO = {
    "test_chat_completion", "test_chat_stream_with_usage_chunk", "test_request_id_is_kept_or_made",
    "test_a_chat_with_a_system_prompt", "test_unknown_model_is_not_found", "test_client_cannot_pick_the_cluster_or_rename",
    "test_streams_are_picked_too", "test_the_inner_listener_routes_only_to_backend_clusters",
    "test_an_unknown_path_is_a_json_404", "test_the_models_are_the_configured_ones",
    "test_the_answer_names_the_backend_that_served_it", "test_a_batch_runs_through_the_admin_route",
    "test_the_patches_name_what_envoy_gateway_generates", "test_the_filter_configuration_is_the_demos",
    "test_the_processes_run_with_their_deployments_arguments",
}


@pytest.fixture(scope="module", params=["modelgate-owned", "bring-your-own"])
def deployment(request) -> tuple[Manifests, dict]:
    """What the user applies (`kubectl apply -k`), in the cluster beside the Gateway it uses."""
    if request.param == "modelgate-owned":
        manifests = Manifests(MANIFESTS)
        return manifests, manifests.get("Gateway", GATEWAY, NAMESPACE)
    manifests = Manifests(MANIFESTS.parent / "kubernetes-byo-gateway")
    assert not manifests.of_kind("Gateway"), "the overlay leaves the Gateway to the user"
    manifests.resources.append(YOUR_GATEWAY)
    return manifests, YOUR_GATEWAY


@pytest.fixture(scope="module")
def manifests(deployment) -> Manifests:
    return deployment[0]


@pytest.fixture(scope="module")
def translation(deployment) -> Translation:
    manifests, gateway = deployment
    return Translation(manifests, gateway["metadata"]["name"], namespace_of(gateway))


@pytest.fixture(scope="module")
def patched(translation) -> Translation:
    """The translation with the EnvoyPatchPolicy applied, as Envoy Gateway serves it to Envoy."""
    patched = copy.deepcopy(translation)
    patched.apply_patch_policies()
    return patched


@pytest.fixture(scope="module")
def envoy_template(manifests, patched, tmp_path_factory) -> Path:
    """The Envoy configuration of the manifests on the demo's ports, token and key directory."""
    gateway_port = next(listener["port"] for listener in patched.gateway["spec"]["listeners"])
    config = bootstrap(patched, local_addresses(patched),
                       {pod_port(gateway_port): LISTENER_PORT, INNER_LISTENER_POD_PORT: INNER_LISTENER_PORT}, ADMIN_PORT, WASM)
    # The token placeholder, as a user replaces it (the stack replaces the demo's with its own).
    text = yaml.safe_dump(config, sort_keys=False).replace(
        manifests.secret_value("modelgate-internal-token", "token"), DEMO_INTERNAL_TOKEN)
    template = tmp_path_factory.mktemp("kubernetes") / "envoy.yaml"
    template.write_text(text)
    return template


def manifests_stack(manifests: Manifests, envoy_template: Path, pool_replicas) -> Stack:
    """The manifests' gateway, its processes started with their Deployments' arguments and the
    ConfigMap's pools file; `pool_replicas(pool, demo_replicas)` says where a pool found by DNS
    in the cluster finds its replicas here."""
    configured = json.loads(manifests.get("ConfigMap", "modelgate-pools", NAMESPACE)["data"]["pools.json"])

    def pools_of_the_manifests(pools: dict) -> None:
        for name, pool in configured["pools"].items():
            if "dns" in pool:
                pool_replicas(pool, pools["pools"][name]["replicas"])
        pools.clear()
        pools.update(configured)

    return Stack(envoy_template=envoy_template, adjust_pools=pools_of_the_manifests,
                 ext_proc_args=container_args(manifests, "modelgate-ext-proc"),
                 stream_guard_args=container_args(manifests, "modelgate-stream-guard"))


@pytest.fixture(scope="module")
def stack(manifests, envoy_template):
    def the_demos_replicas(pool: dict, demo_replicas: list[str]) -> None:
        # A name resolves to one address here, not to a headless Service's pods: the four
        # replicas are listed instead, for the pick among them.
        del pool["dns"]
        pool.pop("dns_refresh_ms", None)
        pool["replicas"] = demo_replicas

    with manifests_stack(manifests, envoy_template, the_demos_replicas) as s:
        yield s


@pytest.fixture(scope="module")
def stack_resolving_the_pool(manifests, patched, envoy_template):
    """The pools file exactly as the ConfigMap has it, but for the name: `localhost` and the
    port of what plays the first of the Service's pods."""
    addresses = local_addresses(patched)

    def localhost(pool: dict, demo_replicas: list[str]) -> None:
        host, port = pool["dns"].rsplit(":", 1)
        _, first = addresses[(service_key(host), int(port))][0]
        pool["dns"] = f"localhost:{first}"

    with manifests_stack(manifests, envoy_template, localhost) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(stack):
    """The stack, once ext-proc's picker sees every replica of the pool ready (test_pools' name)."""
    wait_for_picker(stack, ready(stack, REPLICAS))
    return stack


def test_an_unknown_path_is_a_json_404(http):
    response = http.get("/v2/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "unknown_url"
    assert response.headers["x-request-id"]


def test_the_models_are_the_configured_ones(client, manifests):
    configured = {m["match"] for p in manifests.of_kind("EnvoyExtensionPolicy") for w in p["spec"].get("wasm", [])
                  for m in w["config"]["models"] if "*" not in m["match"]}
    assert {m.id for m in client.models.list()} == configured


@pytest.mark.parametrize("model, backend", [("llama-3.1-8b-instruct", "llama-pool"), ("claude-sonnet-4-6", "anthropic"),
                                            ("llama3.2", "ollama"), ("qwen3-8b", "vllm-pool")])
@pytest.mark.parametrize("stream", [False, True])
def test_the_answer_names_the_backend_that_served_it(http, model, backend, stream):
    answer = http.post("/v1/chat/completions", json={"model": model, "stream": stream, "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hello"}]})
    assert answer.status_code == 200, answer.text
    assert (answer.headers["modelgate-backend"], answer.headers["modelgate-attempts"]) == (backend, "1")


def test_the_pool_is_found_by_the_dns_name_of_its_service(stack_resolving_the_pool):
    s = stack_resolving_the_pool
    replica = s.backend_address("vllm-0")
    wait_for_picker(s, lambda view: replica in view and view[replica]["ready"])
    client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="qwen3-8b", max_tokens=2, messages=[{"role": "user", "content": "hello"}])
    assert (raw.headers["x-sim-backend"], raw.headers["modelgate-backend"]) == ("vllm-0", "vllm-pool")
    assert pools_view(s)[replica]["ready"]


def test_a_batch_runs_through_the_admin_route(stack):
    client = openai.OpenAI(base_url=stack.base_url, api_key="sk-batch", max_retries=0, timeout=30)
    lines = [chat_line("llama"), chat_line("claude", model="claude-sonnet-4-6"), chat_line("ollama", model="llama3.2")]
    batch = wait_for_batch(client, start_batch(client, lines).id)
    assert batch.status == "completed", batch
    output, errors = results(client, batch, [line["custom_id"] for line in lines])
    assert errors == {}
    assert all(line["response"]["status_code"] == 200 for line in output.values())


def test_the_files_api_answers_with_a_request_id(http):
    listed = http.get("/v1/files", headers={"authorization": "Bearer sk-batch"})
    assert listed.status_code == 200, listed.text
    assert listed.json()["object"] == "list"
    assert listed.headers["x-request-id"]


def test_the_patches_name_what_envoy_gateway_generates(manifests, translation):
    """A patch to a resource Envoy Gateway does not generate would be reported ResourceNotFound
    and change nothing."""
    (policy,) = manifests.of_kind("EnvoyPatchPolicy")
    assert namespace_of(policy) == namespace_of(translation.gateway)
    for patch in policy["spec"]["jsonPatches"]:
        if patch["operation"].get("path") or patch["operation"].get("jsonPath"):
            assert patch["name"] in translation.resources[patch["type"]]


def test_the_filter_configuration_is_the_demos(manifests):
    """The wasm filter gets the demo's JSON configuration, but for the internal token."""
    (policy,) = [p for p in manifests.of_kind("EnvoyExtensionPolicy") if p["spec"].get("wasm")]
    (wasm,) = policy["spec"]["wasm"]
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    plugin = next(f for f in demo["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                  ["typed_config"]["http_filters"] if f["name"] == "modelgate")
    expected = json.loads(plugin["typed_config"]["config"]["configuration"]["value"])
    configured = dict(wasm["config"])
    assert configured.pop("internal_token") == manifests.secret_value("modelgate-internal-token", "token")
    expected.pop("internal_token")
    assert configured == expected


def test_every_answer_carries_a_request_id(http):
    for method, path, body in [("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": []}),
                               ("GET", "/v1/models", None), ("POST", "/v1/embeddings", {"model": "x"}),
                               ("GET", "/nothing", None)]:
        response = http.request(method, path, json=body)
        assert response.headers.get("x-request-id"), (method, path, response.status_code)
        assert isinstance(response.json()["error"] if response.status_code >= 400 else response.json(), dict)


@pytest.mark.parametrize("process, workload", [("ext-proc", "modelgate-ext-proc"),
                                                ("stream-guard", "modelgate-stream-guard")])
def test_the_processes_run_with_their_deployments_arguments(manifests, stack, process, workload):
    """All but the pod's addresses and paths, which the stack gives its own."""
    argv, _ = stack.commands[process]
    kept = container_args(manifests, workload)
    assert kept and all(arg in argv for arg in kept)
