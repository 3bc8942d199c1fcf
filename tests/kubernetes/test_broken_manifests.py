"""Deliberately broken copies of envoy/kubernetes: each mistake an operator (or an edit) could
make, made once in memory, is reported alone, in words that name the resource and the field."""

import copy
import json

import pytest

import gateway_config
from validate import validate


@pytest.fixture
def broken(documents):
    return copy.deepcopy(documents)


def find(documents, kind, name):
    [body] = [d.body for d in documents if d.kind == kind and d.name == name]
    return body


def container(documents, deployment):
    return find(documents, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def filter_config(documents):
    return find(documents, "EnvoyExtensionPolicy", "modelgate")["spec"]["wasm"][0]["config"]


def ext_proc(documents):
    patch = find(documents, "EnvoyPatchPolicy", "modelgate")
    [found] = [f for p in patch["spec"]["jsonPatches"]
               for f in gateway_config.find_typed(p["operation"].get("value"), gateway_config.EXT_PROC_TYPE)]
    return found


def added(documents, type_url, name):
    patch = find(documents, "EnvoyPatchPolicy", "modelgate")
    [value] = [p["operation"]["value"] for p in patch["spec"]["jsonPatches"]
               if p["type"] == type_url and p["name"] == name and not p["operation"].get("path")]
    return value


def route_rule(documents, name):
    return find(documents, "HTTPRoute", name)["spec"]["rules"][0]


def problems(documents, crds, demo):
    return [str(p) for p in validate(documents, crds, demo)]


# Schemas: one violation per family of resource.

def test_gateway_api_schema(broken, crds, demo):
    route_rule(broken, "llama-pool")["matches"][0]["path"]["type"] = "Prefix"
    assert problems(broken, crds, demo) == [
        'HTTPRoute modelgate/llama-pool (routes.yaml): spec.rules[0].matches[0].path.type: '
        'Unsupported value: "Prefix": supported values: "Exact", "PathPrefix", "RegularExpression"'
    ]


def test_envoy_gateway_schema(broken, crds, demo):
    find(broken, "BackendTrafficPolicy", "vllm-pool")["spec"]["retry"]["numRetries"] = "two"
    assert problems(broken, crds, demo) == [
        'BackendTrafficPolicy modelgate/vllm-pool (routes.yaml): spec.retry.numRetries: '
        'Invalid value: "string": must be of type integer'
    ]


def test_inference_pool_schema(broken, crds, demo):
    find(broken, "InferencePool", "vllm-pool")["spec"]["targetPorts"][0]["number"] = 0
    assert problems(broken, crds, demo) == [
        "InferencePool modelgate/vllm-pool (inference-pool.yaml): spec.targetPorts[0].number: "
        "Invalid value: 0: should be greater than or equal to 1"
    ]


def test_core_schema(broken, crds, demo):
    container(broken, "modelgate-ext-proc")["ports"][0]["containerPort"] = "50051"
    [problem] = problems(broken, crds, demo)
    assert problem.startswith(
        "Deployment modelgate/modelgate-ext-proc (modelgate.yaml): "
        "spec.template.spec.containers[0].ports[0].containerPort: '50051' is not of type 'integer'"
    )


def test_a_name_the_server_refuses(broken, crds, demo):
    find(broken, "Service", "modelgate-stream-guard")["metadata"]["name"] = "modelgate_stream_guard"
    [problem, *_] = problems(broken, crds, demo)
    assert problem == ('Service modelgate/modelgate_stream_guard (modelgate.yaml): metadata.name: '
                       'Invalid value: "modelgate_stream_guard": not a valid name')


# CEL rules, one per family.

def test_gateway_api_cel_rule(broken, crds, demo):
    route_rule(broken, "llama-pool")["timeouts"]["backendRequest"] = "900s"
    assert problems(broken, crds, demo) == [
        'HTTPRoute modelgate/llama-pool (routes.yaml): spec.rules[0].timeouts: Invalid value: "object": '
        "backendRequest timeout cannot be longer than request timeout"
    ]


def test_envoy_gateway_cel_rule(broken, crds, demo):
    find(broken, "ClientTrafficPolicy", "modelgate")["spec"]["headers"]["preserveXRequestID"] = True
    [problem] = problems(broken, crds, demo)
    assert problem.startswith(
        'ClientTrafficPolicy modelgate/modelgate (routes.yaml): spec.headers: Invalid value: "object": '
    )
    assert "preserveXRequestID" in problem and "requestID" in problem


def test_inference_pool_cel_rule(broken, crds, demo):
    del find(broken, "InferencePool", "vllm-pool")["spec"]["endpointPickerRef"]["port"]
    [problem] = problems(broken, crds, demo)
    assert problem.startswith(
        'InferencePool modelgate/vllm-pool (inference-pool.yaml): spec.endpointPickerRef: Invalid value: "object": '
    )


# Unknown fields: refused as `kubectl apply --validate=strict` does.

def test_unknown_field_in_a_custom_resource(broken, crds, demo):
    spec = find(broken, "EnvoyPatchPolicy", "modelgate")["spec"]
    spec["jsonPatch"] = spec["jsonPatches"][:1]
    assert problems(broken, crds, demo) == [
        'EnvoyPatchPolicy modelgate/modelgate (policies.yaml): spec.jsonPatch: unknown field "spec.jsonPatch"'
    ]


def test_unknown_field_in_a_core_resource(broken, crds, demo):
    find(broken, "Service", "modelgate-ext-proc")["spec"]["ports"][0]["protocoll"] = "TCP"
    [problem] = problems(broken, crds, demo)
    assert problem.startswith(
        "Service modelgate/modelgate-ext-proc (modelgate.yaml): spec.ports[0]: "
        "Additional properties are not allowed ('protocoll' was unexpected)"
    )


# References between resources.

def test_dangling_service_name(broken, crds, demo):
    route_rule(broken, "modelgate-stream-guard")["backendRefs"][0]["name"] = "modelgate-guard"
    assert problems(broken, crds, demo) == [
        "HTTPRoute modelgate/modelgate-stream-guard (routes.yaml): spec.rules[0].backendRefs[0]: "
        'Service "modelgate-guard" does not exist in namespace modelgate'
    ]


def test_wrong_backend_port(broken, crds, demo):
    route_rule(broken, "modelgate-files")["backendRefs"][0]["port"] = 9091
    assert problems(broken, crds, demo) == [
        "HTTPRoute modelgate/modelgate-files (routes.yaml): spec.rules[0].backendRefs[0].port: "
        'Service "modelgate-ext-proc" has no port 9091 (it has [50051, 9090])'
    ]


def test_wrong_target_port(broken, crds, demo):
    find(broken, "Service", "modelgate-stream-guard")["spec"]["ports"][0]["targetPort"] = "guard"
    assert problems(broken, crds, demo) == [
        "Service modelgate/modelgate-stream-guard (modelgate.yaml): spec.ports[0].targetPort: 'guard' is not "
        "a port of the selected pods (Deployment modelgate/modelgate-stream-guard (modelgate.yaml))"
    ]


def test_selector_matching_no_pod(broken, crds, demo):
    find(broken, "Service", "modelgate-ext-proc")["spec"]["selector"] = {"app.kubernetes.io/name": "ext-proc"}
    assert problems(broken, crds, demo) == [
        "Service modelgate/modelgate-ext-proc (modelgate.yaml): spec.selector: "
        "selects no pods: {'app.kubernetes.io/name': 'ext-proc'}"
    ]


def test_network_policy_admitting_no_one(broken, crds, demo):
    peer = find(broken, "NetworkPolicy", "modelgate-envoy")["spec"]["ingress"][1]["from"][0]
    peer["podSelector"]["matchLabels"] = {"app.kubernetes.io/name": "stream-guard"}
    assert problems(broken, crds, demo) == [
        "NetworkPolicy envoy-gateway-system/modelgate-envoy (modelgate.yaml): spec.ingress[1].from[0].podSelector: "
        "selects no pods in namespace modelgate: {'app.kubernetes.io/name': 'stream-guard'}"
    ]


def test_network_policy_on_a_port_nobody_serves(broken, crds, demo):
    find(broken, "NetworkPolicy", "modelgate-stream-guard")["spec"]["ingress"][0]["ports"][0]["port"] = 50053
    assert problems(broken, crds, demo) == [
        "NetworkPolicy modelgate/modelgate-stream-guard (modelgate.yaml): spec.ingress[0].ports[0].port: "
        "50053 is not a port of the selected pods (Deployment modelgate/modelgate-stream-guard (modelgate.yaml))"
    ]


def test_missing_secret_key(broken, crds, demo):
    secret = find(broken, "Secret", "modelgate-internal-token")
    secret["stringData"] = {"internal-token": secret["stringData"]["token"]}
    found = problems(broken, crds, demo)
    assert found == [
        f"Deployment modelgate/{name} ({file}): spec.template.spec.containers[0].args[{i}]: "
        "/run/secrets/modelgate-internal/token: Secret \"modelgate-internal-token\" mounted at "
        '/run/secrets/modelgate-internal has no key "token"'
        for name, file, i in [("modelgate-ext-proc", "modelgate.yaml", 4), ("modelgate-stream-guard", "modelgate.yaml", 3)]
    ]


def test_backend_key_not_mounted(broken, crds, demo):
    keys = find(broken, "Secret", "modelgate-backend-keys")["stringData"]
    keys["anthropic"] = keys.pop("anthropic-api-key")
    found = problems(broken, crds, demo)
    assert len(found) == 2
    assert all(
        p.startswith("EnvoyExtensionPolicy modelgate/modelgate (policies.yaml): "
                     "spec.wasm[0].config.backends.anthropic.api_key.file: "
                     "/run/secrets/modelgate/anthropic-api-key is not a key file of Deployment ")
        for p in found
    )


def test_missing_config_map(broken, crds, demo):
    volumes = find(broken, "Deployment", "modelgate-ext-proc")["spec"]["template"]["spec"]["volumes"]
    [pools] = [v for v in volumes if v["name"] == "pools"]
    pools["configMap"]["name"] = "modelgate-pool"
    [problem] = problems(broken, crds, demo)
    assert problem.endswith('configMap.name: ConfigMap "modelgate-pool" does not exist in namespace modelgate')


def test_probe_on_a_port_the_container_lacks(broken, crds, demo):
    container(broken, "modelgate-ext-proc")["readinessProbe"]["httpGet"]["port"] = "admn"
    assert problems(broken, crds, demo) == [
        "Deployment modelgate/modelgate-ext-proc (modelgate.yaml): spec.template.spec.containers[0].readinessProbe.port: "
        "'admn' is not a port of container ext-proc"
    ]


def test_policy_target_that_does_not_exist(broken, crds, demo):
    find(broken, "BackendTrafficPolicy", "llama-pool")["spec"]["targetRefs"][0]["name"] = "llama"
    assert problems(broken, crds, demo) == [
        "BackendTrafficPolicy modelgate/llama-pool (routes.yaml): spec.targetRefs[0]: "
        'HTTPRoute "llama" does not exist in namespace modelgate'
    ]


def test_parent_listener_that_does_not_exist(broken, crds, demo):
    find(broken, "HTTPRoute", "ollama")["spec"]["parentRefs"][0]["sectionName"] = "https"
    assert problems(broken, crds, demo) == [
        'HTTPRoute modelgate/ollama (routes.yaml): spec.parentRefs[0].sectionName: Gateway "modelgate" has no listener "https"'
    ]


# modelgate's configuration.

def test_wrong_filter_cluster_name(broken, crds, demo):
    # The demo and the manifests agree on the name, but no route carries it.
    demo = copy.deepcopy(demo)
    for config in (filter_config(broken), gateway_config.demo_filter_config(demo)):
        config["stream_guard_cluster"] = "modelgate_guard"
    wasm = gateway_config.demo_filters(demo)["modelgate"]["config"]["configuration"]
    wasm["value"] = json.dumps(gateway_config.demo_filter_config(demo) | {"stream_guard_cluster": "modelgate_guard"})
    assert problems(broken, crds, demo) == [
        "EnvoyExtensionPolicy modelgate/modelgate (policies.yaml): spec.wasm[0].config.stream_guard_cluster: "
        'cluster "modelgate_guard": no HTTPRoute rule matches x-modelgate-cluster: modelgate_guard'
    ]


def test_route_for_a_cluster_name_the_filter_does_not_use(broken, crds, demo):
    route_rule(broken, "anthropic")["matches"][0]["headers"][0]["value"] = "anthropic"
    assert problems(broken, crds, demo) == [
        "EnvoyExtensionPolicy modelgate/modelgate (policies.yaml): spec.wasm[0].config.backends.anthropic.cluster: "
        'cluster "anthropic_api": no HTTPRoute rule matches x-modelgate-cluster: anthropic_api'
    ]


def test_called_cluster_the_patch_does_not_add(broken, crds, demo):
    added(broken, gateway_config.CLUSTER_TYPE, "modelgate_admin")["name"] = "modelgate-admin"
    patch = find(broken, "EnvoyPatchPolicy", "modelgate")
    for p in patch["spec"]["jsonPatches"]:
        if p["name"] == "modelgate_admin":
            p["name"] = "modelgate-admin"
    found = problems(broken, crds, demo)
    assert found == [
        "EnvoyExtensionPolicy modelgate/modelgate (policies.yaml): spec.wasm[0].config."
        f'{option}.cluster: cluster "modelgate_admin": the EnvoyPatchPolicy adds no such cluster'
        for option in ("accounting", "pools")
    ]


def test_drifted_filter_configuration(broken, crds, demo):
    filter_config(broken)["models"][0]["price"]["input_per_million"] = 0.5
    assert problems(broken, crds, demo) == [
        "EnvoyExtensionPolicy modelgate/modelgate (policies.yaml): spec.wasm[0].config.models[0].price.input_per_million: "
        "differs from envoy/demo.yaml's filter configuration"
    ]


def test_drifted_ext_proc(broken, crds, demo):
    ext_proc(broken)["failure_mode_allow"] = True
    [problem] = problems(broken, crds, demo)
    assert problem.startswith("EnvoyPatchPolicy modelgate/modelgate (policies.yaml): spec.jsonPatches[")
    assert problem.endswith("(ext_proc) failure_mode_allow: differs from envoy/demo.yaml's ext_proc filter")


def test_token_mismatch(broken, crds, demo):
    find(broken, "Secret", "modelgate-internal-token")["stringData"]["token"] = "another-token"
    assert problems(broken, crds, demo) == [
        "Secret modelgate/modelgate-internal-token (modelgate.yaml): stringData.token: internal token 'another-token' "
        "is not the one in EnvoyExtensionPolicy modelgate/modelgate (policies.yaml) spec.wasm[0].config.internal_token "
        "('change-me-modelgate-internal-token')"
    ]


def test_patch_on_a_listener_envoy_gateway_does_not_make(broken, crds, demo):
    patch = find(broken, "EnvoyPatchPolicy", "modelgate")["spec"]["jsonPatches"][0]
    patch["name"] = "modelgate/modelgate/openai"
    assert problems(broken, crds, demo) == [
        "EnvoyPatchPolicy modelgate/modelgate (policies.yaml): spec.jsonPatches[0].name: no listener "
        "\"modelgate/modelgate/openai\": Envoy Gateway names the Gateway's ['modelgate/modelgate/http']"
    ]


def test_inner_listener_to_a_cluster_envoy_gateway_does_not_make(broken, crds, demo):
    listener = added(broken, gateway_config.LISTENER_TYPE, "modelgate_inner")
    entry = gateway_config._inner_map(listener)["llama_pool"]
    entry["action"]["typed_config"]["route"]["cluster"] = "httproute/modelgate/llama-pool/rule/1"
    [problem] = problems(broken, crds, demo)
    assert problem.endswith(
        'map.llama_pool: routes to "httproute/modelgate/llama-pool/rule/1", but Envoy Gateway names the cluster '
        'of HTTPRoute modelgate/llama-pool (routes.yaml) rule 0 "httproute/modelgate/llama-pool/rule/0"'
    )


def test_inner_listener_missing_a_backend(broken, crds, demo):
    listener = added(broken, gateway_config.LISTENER_TYPE, "modelgate_inner")
    del gateway_config._inner_map(listener)["ollama_local"]
    [problem] = problems(broken, crds, demo)
    assert problem.endswith('backend cluster "ollama_local" is not routed (streams to it get a 404)')


def test_guard_upstream_not_the_inner_listener(broken, crds, demo):
    listener = added(broken, gateway_config.LISTENER_TYPE, "modelgate_inner")
    listener["address"]["socket_address"]["port_value"] = 10002
    envoy_pods = "(Envoy pods of Gateway modelgate/modelgate (gateway.yaml))"
    assert problems(broken, crds, demo) == [
        "Service envoy-gateway-system/modelgate-envoy-inner (modelgate.yaml): spec.ports[0].targetPort: "
        f"10001 is not a port of the selected pods {envoy_pods}",
        "NetworkPolicy envoy-gateway-system/modelgate-envoy (modelgate.yaml): spec.ingress[1].ports[0].port: "
        f"10001 is not a port of the selected pods {envoy_pods}",
    ]


def test_pools_file_naming_a_missing_service_port(broken, crds, demo):
    config_map = find(broken, "ConfigMap", "modelgate-pools")
    pools = json.loads(config_map["data"]["pools.json"])
    pools["pools"]["vllm-pool"]["dns"] = "vllm-pool.modelgate.svc.cluster.local:8001"
    config_map["data"]["pools.json"] = json.dumps(pools)
    assert problems(broken, crds, demo) == [
        "ConfigMap modelgate/modelgate-pools (pool.yaml): data.pools.json pools.vllm-pool.dns: "
        'Service "vllm-pool" has no port 8001 (it has [8000])'
    ]


def test_pools_file_that_is_not_json(broken, crds, demo):
    find(broken, "ConfigMap", "modelgate-pools")["data"]["pools.json"] = '{"pools": {'
    [problem] = problems(broken, crds, demo)
    assert problem.startswith("ConfigMap modelgate/modelgate-pools (pool.yaml): data.pools.json: not JSON: ")


def test_endpoint_picker_of_a_pool_the_file_lacks(broken, crds, demo):
    args = container(broken, "modelgate-epp")["args"]
    i = args.index("--epp-pool=vllm-pool")
    args[i] = "--epp-pool=vllm"
    assert problems(broken, crds, demo) == [
        f"Deployment modelgate/modelgate-epp (inference-pool.yaml): spec.template.spec.containers[0].args[{i}]: "
        "--epp-pool=vllm: no such pool in ConfigMap modelgate/modelgate-pools (pool.yaml)"
    ]


def test_service_address_in_arguments(broken, crds, demo):
    args = container(broken, "modelgate-stream-guard")["args"]
    i = next(i for i, a in enumerate(args) if a.startswith("--upstream="))
    args[i] = "--upstream=modelgate-envoy-inner.envoy-gateway-system.svc.cluster.local:10002"
    assert problems(broken, crds, demo) == [
        f"Deployment modelgate/modelgate-stream-guard (modelgate.yaml): spec.template.spec.containers[0].args[{i}]: "
        'Service "modelgate-envoy-inner" has no port 10002 (it has [10001])'
    ]


def test_pod_the_namespaces_pod_security_refuses(broken, crds, demo):
    del container(broken, "modelgate-stream-guard")["securityContext"]["allowPrivilegeEscalation"]
    assert problems(broken, crds, demo) == [
        "Deployment modelgate/modelgate-stream-guard (modelgate.yaml): "
        "spec.template.spec.containers[0].securityContext.allowPrivilegeEscalation: must be false (Pod Security restricted)"
    ]


def test_termination_grace_shorter_than_the_drain(broken, crds, demo):
    args = container(broken, "modelgate-ext-proc")["args"]
    i = next(i for i, a in enumerate(args) if a.startswith("--shutdown-deadline-secs="))
    args[i] = "--shutdown-deadline-secs=60"
    assert problems(broken, crds, demo) == [
        "Deployment modelgate/modelgate-ext-proc (modelgate.yaml): spec.template.spec.terminationGracePeriodSeconds: "
        "40, but ext-proc drains for 65 s (--drain-delay-secs and --shutdown-deadline-secs): make it 70"
    ]


def test_pools_file_drifted_from_the_demos(broken, crds, demo):
    config_map = find(broken, "ConfigMap", "modelgate-pools")
    pools = json.loads(config_map["data"]["pools.json"])
    pools["pools"]["vllm-pool"]["strategy"] = "least_queue"
    config_map["data"]["pools.json"] = json.dumps(pools)
    assert problems(broken, crds, demo) == [
        "ConfigMap modelgate/modelgate-pools (pool.yaml): data.pools.json pools.vllm-pool.strategy: "
        "differs from envoy/pools.json"
    ]
