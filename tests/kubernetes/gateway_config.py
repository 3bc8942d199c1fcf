"""modelgate's own configuration inside the manifests, against envoy/demo.yaml and each other.

The filter's JSON (EnvoyExtensionPolicy), the ext_proc filter and clusters the EnvoyPatchPolicy
adds, the routes that carry the filter's cluster names, the internal token in every place that
holds it, and the pools file: the same gateway as the demo's, with names that resolve.
"""

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from manifests import Document, Problem
from references import Index, mounted_files, namespace_of, service_address

ROUTING_HEADER = "x-modelgate-cluster"
TOKEN_HEADER = "x-modelgate-internal-token"
TOKEN_SECRET = ("modelgate-internal-token", "token")
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
# The filter's options whose clusters it calls by name (proxy-wasm http calls): Envoy clusters.
CALLED_CLUSTERS = ("accounting", "shared_limits", "pools")
# The options it names in the routing header: clusters an HTTPRoute rule matches.
ROUTED_CLUSTERS = ("batches",)


@dataclass
class Demo:
    """What `make run` runs: envoy/demo.yaml and the pools file envoy/pools.json."""

    envoy: dict
    pools: dict


def load_demo(repo: Path) -> Demo:
    envoy = repo / "envoy"
    return Demo(yaml.safe_load((envoy / "demo.yaml").read_text()), json.loads((envoy / "pools.json").read_text()))


def demo_filters(demo: Demo) -> dict:
    """The OpenAI listener's HTTP filters of the demo, by name."""
    [listener] = [l for l in demo.envoy["static_resources"]["listeners"] if l["name"] == "openai"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in manager["http_filters"]}


def demo_filter_config(demo: Demo) -> dict:
    wasm = demo_filters(demo)["modelgate"]["config"]
    return json.loads(wasm["configuration"]["value"])


def find_typed(value, type_url: str) -> list:
    """Every object with this "@type" inside a JSON value."""
    found = []
    if isinstance(value, dict):
        if value.get("@type") == type_url:
            found.append(value)
        for item in value.values():
            found += find_typed(item, type_url)
    elif isinstance(value, list):
        for item in value:
            found += find_typed(item, type_url)
    return found


def differences(left, right, path="") -> list[str]:
    """Paths where two JSON values differ."""
    if isinstance(left, dict) and isinstance(right, dict):
        found = []
        for key in sorted(set(left) | set(right), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in left:
                found.append(f"{where} (missing)")
            elif key not in right:
                found.append(f"{where} (not in the demo)")
            else:
                found += differences(left[key], right[key], where)
        return found
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [d for i, (a, b) in enumerate(zip(left, right)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if left == right else [path or "<root>"]


class Modelgate:
    """The modelgate resources of the manifests: the wasm policy, the patch policy, the routes."""

    def __init__(self, index: Index):
        self.index = index
        self.extension = next(
            (p for p in index.of_kind("EnvoyExtensionPolicy") if any(w.get("name") == "modelgate" for w in p.body["spec"].get("wasm", []))),
            None,
        )
        self.patch = next(iter(index.of_kind("EnvoyPatchPolicy")), None)

    @property
    def wasm_index(self) -> int:
        return [w.get("name") for w in self.extension.body["spec"]["wasm"]].index("modelgate")

    @property
    def filter_config(self) -> dict:
        return self.extension.body["spec"]["wasm"][self.wasm_index]["config"]

    def filter_path(self, rest: str) -> str:
        return f"spec.wasm[{self.wasm_index}].config.{rest}"

    def patches(self, type_url: str):
        for i, patch in enumerate(self.patch.body["spec"].get("jsonPatches", [])):
            if patch["type"] == type_url:
                yield i, patch

    def added(self, type_url: str) -> dict:
        """Whole resources the patch policy adds: name -> (patch index, resource)."""
        return {
            patch["name"]: (i, patch["operation"]["value"])
            for i, patch in self.patches(type_url)
            if patch["operation"]["op"] == "add" and not patch["operation"].get("path") and not patch["operation"].get("jsonPath")
        }

    def ext_proc(self) -> tuple[int, dict] | None:
        for i, patch in enumerate(self.patch.body["spec"].get("jsonPatches", [])):
            found = find_typed(patch["operation"].get("value"), EXT_PROC_TYPE)
            if found:
                return i, found[0]
        return None

    def routed(self) -> dict:
        """Routing-header value -> (route, rule index) of the HTTPRoute rules that match it."""
        routed = {}
        for route in self.index.of_kind("HTTPRoute"):
            for r, rule in enumerate(route.body["spec"].get("rules", [])):
                for match in rule.get("matches", []):
                    for header in match.get("headers", []):
                        if header["name"].lower() == ROUTING_HEADER and header.get("type", "Exact") == "Exact":
                            routed.setdefault(header["value"], (route, r))
        return routed


def check_filter_config(index: Index, demo: Demo) -> list[Problem]:
    """The filter's JSON is the demo's, except the internal token."""
    gateway = Modelgate(index)
    if gateway.extension is None:
        return []
    ours = {k: v for k, v in gateway.filter_config.items() if k != "internal_token"}
    theirs = {k: v for k, v in demo_filter_config(demo).items() if k != "internal_token"}
    return [
        gateway.extension.problem(gateway.filter_path(path), "differs from envoy/demo.yaml's filter configuration")
        for path in differences(ours, theirs)
    ]


def check_ext_proc(index: Index, demo: Demo) -> list[Problem]:
    """The patched-in ext_proc filter is the demo's (modes, failure policy, timeouts, cluster);
    only the token's value may differ."""
    gateway = Modelgate(index)
    if gateway.patch is None:
        return []
    found = gateway.ext_proc()
    if found is None:
        return [gateway.patch.problem("spec.jsonPatches", "no patch adds the ext_proc filter")]
    i, ours = found
    [theirs] = find_typed(demo_filters(demo)["modelgate.ext_proc"], EXT_PROC_TYPE)

    def without_token(config):
        config = json.loads(json.dumps(config))
        for entry in config.get("grpc_service", {}).get("initial_metadata", []):
            if entry.get("key") == TOKEN_HEADER:
                entry["value"] = "<token>"
        return config

    return [
        gateway.patch.problem(f"spec.jsonPatches[{i}].operation.value (ext_proc) {path}", "differs from envoy/demo.yaml's ext_proc filter")
        for path in differences(without_token(ours), without_token(theirs))
    ]


def _secret_value(secret: Document, key: str) -> str | None:
    if key in (secret.body.get("stringData") or {}):
        return secret.body["stringData"][key]
    if key in (secret.body.get("data") or {}):
        return base64.b64decode(secret.body["data"][key]).decode()
    return None


def check_token(index: Index) -> list[Problem]:
    """One internal token: the filter's, ext_proc's initial_metadata, the Secret's."""
    gateway = Modelgate(index)
    places = []
    if gateway.extension is not None:
        places.append((gateway.extension, gateway.filter_path("internal_token"), gateway.filter_config.get("internal_token")))
    if gateway.patch is not None and (found := gateway.ext_proc()):
        i, ext_proc = found
        for entry in ext_proc.get("grpc_service", {}).get("initial_metadata", []):
            if entry.get("key") == TOKEN_HEADER:
                places.append((gateway.patch, f"spec.jsonPatches[{i}] ext_proc initial_metadata {TOKEN_HEADER}", entry.get("value")))
    for secret in index.of_kind("Secret"):
        value = _secret_value(secret, TOKEN_SECRET[1])
        if secret.name == TOKEN_SECRET[0] and value is not None:  # a missing key: check_workloads
            places.append((secret, f"stringData.{TOKEN_SECRET[1]}", value))
    if not places:
        return []
    expected = places[0][2]
    return [
        document.problem(path, f"internal token {value!r} is not the one in {places[0][0].label} {places[0][1]} ({expected!r})")
        for document, path, value in places[1:]
        if value != expected
    ]


def check_clusters(index: Index) -> list[Problem]:
    """Every cluster the filter names exists: routed names are matched by an HTTPRoute rule,
    called names are clusters the patch policy adds; ext_proc's cluster too."""
    gateway = Modelgate(index)
    if gateway.extension is None:
        return []
    config = gateway.filter_config
    routed = gateway.routed()
    added = gateway.added(CLUSTER_TYPE) if gateway.patch else {}
    problems = []
    names = [(f"backends.{name}.cluster", backend.get("cluster"), routed) for name, backend in config.get("backends", {}).items()]
    if "stream_guard_cluster" in config:
        names.append(("stream_guard_cluster", config["stream_guard_cluster"], routed))
    names += [(f"{option}.cluster", config[option]["cluster"], routed) for option in ROUTED_CLUSTERS if option in config]
    names += [(f"{option}.cluster", config[option]["cluster"], added) for option in CALLED_CLUSTERS if option in config]
    for path, name, known in names:
        if name not in known:
            how = f"no HTTPRoute rule matches {ROUTING_HEADER}: {name}" if known is routed else "the EnvoyPatchPolicy adds no such cluster"
            problems.append(gateway.extension.problem(gateway.filter_path(path), f'cluster "{name}": {how}'))
    if gateway.patch is not None and (found := gateway.ext_proc()):
        i, ext_proc = found
        name = ext_proc.get("grpc_service", {}).get("envoy_grpc", {}).get("cluster_name")
        if name not in added:
            problems.append(gateway.patch.problem(f"spec.jsonPatches[{i}] ext_proc grpc_service", f'cluster "{name}": the EnvoyPatchPolicy adds no such cluster'))
    for name, (i, cluster) in added.items():
        problems += _check_cluster_endpoints(index, gateway.patch, i, cluster)
    return problems


def _check_cluster_endpoints(index: Index, patch: Document, i: int, cluster: dict) -> list[Problem]:
    problems = []
    for group in cluster.get("load_assignment", {}).get("endpoints", []):
        for endpoint in group.get("lb_endpoints", []):
            socket = endpoint["endpoint"]["address"]["socket_address"]
            error = service_address(index, socket["address"], socket["port_value"])
            if error:
                problems.append(patch.problem(f"spec.jsonPatches[{i}] cluster {cluster['name']} endpoint", error))
    return problems


def _inner_map(listener: dict):
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [host] = manager["route_config"]["virtual_hosts"]
    return host.get("matcher", {}).get("matcher_tree", {}).get("exact_match_map", {}).get("map")


def check_inner_listener(index: Index) -> list[Problem]:
    """The patched inner listener routes exactly the backends' cluster names, each to the
    cluster Envoy Gateway makes for the HTTPRoute rule that matches the same name. (Its port is
    one of the Envoy pods': the Service the stream guard reaches it through is checked with
    the other Services.)"""
    gateway = Modelgate(index)
    if gateway.patch is None or gateway.extension is None:
        return []
    routed = gateway.routed()
    backends = {b["cluster"] for b in gateway.filter_config.get("backends", {}).values()}
    problems = []
    for name, (i, listener) in gateway.added(LISTENER_TYPE).items():
        where = f"spec.jsonPatches[{i}] listener {name}"
        routes = _inner_map(listener)
        if not isinstance(routes, dict):
            problems.append(gateway.patch.problem(where, "route_config has no exact_match_map of x-modelgate-cluster values"))
            continue
        for cluster in sorted(backends - set(routes)):
            problems.append(gateway.patch.problem(where, f'backend cluster "{cluster}" is not routed (streams to it get a 404)'))
        for key, entry in routes.items():
            if key not in backends:
                problems.append(gateway.patch.problem(f"{where} map.{key}", "not a backend cluster of the filter's configuration"))
                continue
            route, r = routed.get(key, (None, None))
            if route is None:
                continue  # check_clusters reports the missing route
            expected = f"httproute/{namespace_of(route)}/{route.name}/rule/{r}"
            actual = entry.get("action", {}).get("typed_config", {}).get("route", {}).get("cluster")
            if actual != expected:
                problems.append(gateway.patch.problem(f"{where} map.{key}", f'routes to "{actual}", but Envoy Gateway names the cluster of {route.label} rule {r} "{expected}"'))
    return problems


def check_patch_targets(index: Index) -> list[Problem]:
    """The patches name the xDS resources Envoy Gateway makes: the Gateway listener's name, and the
    wasm filter of the EnvoyExtensionPolicy."""
    gateway = Modelgate(index)
    if gateway.patch is None:
        return []
    target = gateway.patch.body["spec"]["targetRef"]
    gw = index.get("Gateway", namespace_of(gateway.patch), target["name"])
    listeners = {f"{namespace_of(gw)}/{gw.name}/{l['name']}" for l in gw.body["spec"]["listeners"]} if gw else set()
    added = set(gateway.added(LISTENER_TYPE))
    wasm_filters = {
        f"envoy.filters.http.wasm/envoyextensionpolicy/{namespace_of(p)}/{p.name}/wasm/{i}"
        for p in index.of_kind("EnvoyExtensionPolicy")
        for i, _ in enumerate(p.body["spec"].get("wasm", []))
    }
    problems = []
    for i, patch in gateway.patches(LISTENER_TYPE):
        if gw is not None and patch["name"] not in listeners | added:
            problems.append(gateway.patch.problem(f"spec.jsonPatches[{i}].name", f'no listener "{patch["name"]}": Envoy Gateway names the Gateway\'s {sorted(listeners)}'))
        for name in re.findall(r"@\.name=='(envoy\.filters\.http\.wasm/[^']+)'", patch["operation"].get("jsonPath", "")):
            if name not in wasm_filters:
                problems.append(gateway.patch.problem(f"spec.jsonPatches[{i}].operation.jsonPath", f'no wasm filter "{name}": the EnvoyExtensionPolicies make {sorted(wasm_filters)}'))
    return problems


def check_key_files(index: Index) -> list[Problem]:
    """Every key file the filter's backends name is mounted in ext-proc's and the guard's pods."""
    gateway = Modelgate(index)
    if gateway.extension is None:
        return []
    problems = []
    for name, backend in gateway.filter_config.get("backends", {}).items():
        file = (backend.get("api_key") or {}).get("file")
        if not file:
            continue
        for deployment in index.of_kind("Deployment"):
            for container in deployment.body["spec"]["template"]["spec"]["containers"]:
                key_dirs = [a.split("=", 1)[1] for a in container.get("args", []) if a.startswith("--key-dir=")]
                if not key_dirs:
                    continue
                mounts = mounted_files(index, deployment, container)
                directory, _, base = file.rpartition("/")
                if directory not in key_dirs or base not in mounts.get(directory, (None, None, set()))[2]:
                    problems.append(gateway.extension.problem(
                        gateway.filter_path(f"backends.{name}.api_key.file"),
                        f"{file} is not a key file of {deployment.label} (its --key-dir {key_dirs}, mounts {sorted(mounts)})",
                    ))
    return problems


# How a pool finds its replicas: the demo lists them, a cluster resolves a Service's name.
_DISCOVERY = ("replicas", "dns", "dns_refresh_ms")


def check_pools(index: Index, demo: Demo) -> list[Problem]:
    """The pools file parses and is envoy/pools.json's but for how replicas are found; its pools
    are the ones the filter's backends and the endpoint picker name; each pool's DNS name is a
    Service with that port."""
    config_map = next((c for c in index.of_kind("ConfigMap") if "pools.json" in (c.body.get("data") or {})), None)
    if config_map is None:
        return []
    try:
        pools = json.loads(config_map.body["data"]["pools.json"])
    except json.JSONDecodeError as error:
        return [config_map.problem("data.pools.json", f"not JSON: {error}")]
    problems = []

    def settings(pools_file):
        return {name: {k: v for k, v in pool.items() if k not in _DISCOVERY} for name, pool in pools_file.get("pools", {}).items()}

    problems += [
        config_map.problem(f"data.pools.json {path}", "differs from envoy/pools.json")
        for path in differences(settings(pools), settings(demo.pools), "pools")
    ]
    names = set(pools.get("pools", {}))
    gateway = Modelgate(index)
    if gateway.extension is not None:
        wanted = {b["pool"] for b in gateway.filter_config.get("backends", {}).values() if "pool" in b}
        for name in sorted(wanted - names):
            problems.append(config_map.problem("data.pools.json", f'no pool "{name}", which the filter\'s backends name'))
        for name in sorted(names - wanted):
            problems.append(config_map.problem(f"data.pools.json pools.{name}", "no backend of the filter's configuration names this pool"))
    for name, pool in pools.get("pools", {}).items():
        if "dns" in pool:
            host, _, port = pool["dns"].rpartition(":")
            error = service_address(index, host, int(port))
            if error:
                problems.append(config_map.problem(f"data.pools.json pools.{name}.dns", error))
    for deployment in index.of_kind("Deployment"):
        for c, container in enumerate(deployment.body["spec"]["template"]["spec"]["containers"]):
            for i, arg in enumerate(container.get("args", [])):
                if arg.startswith("--epp-pool=") and arg.split("=", 1)[1] not in names:
                    problems.append(deployment.problem(f"spec.template.spec.containers[{c}].args[{i}]", f"{arg}: no such pool in {config_map.label}"))
    return problems


def check_inference_pools(index: Index) -> list[Problem]:
    """An InferencePool selects model servers on the ports it names, and its endpoint picker is a
    Service port."""
    problems = []
    for pool in index.of_kind("InferencePool"):
        spec = pool.body["spec"]
        selected = index.pods_selected(namespace_of(pool), spec["selector"].get("matchLabels", {}))
        if not selected:
            problems.append(pool.problem("spec.selector", f"selects no pods: {spec['selector']}"))
        else:
            for i, port in enumerate(spec.get("targetPorts", [])):
                if not any(pods.serve(port["number"]) for pods in selected):
                    problems.append(pool.problem(f"spec.targetPorts[{i}].number", f"{port['number']} is not a port of the selected pods ({selected[0].origin})"))
        ref = spec.get("endpointPickerRef", {})
        if ref.get("kind", "Service") == "Service":
            ports = index.service_ports(namespace_of(pool), ref["name"])
            if ports is None:
                problems.append(pool.problem("spec.endpointPickerRef.name", f'Service "{ref["name"]}" does not exist in namespace {namespace_of(pool)}'))
            elif ref.get("port", {}).get("number") not in ports:
                problems.append(pool.problem("spec.endpointPickerRef.port.number", f'Service "{ref["name"]}" has no port {ref.get("port", {}).get("number")} (it has {ports})'))
    return problems


def check_gateway_config(index: Index, demo: Demo) -> list[Problem]:
    return (
        check_filter_config(index, demo)
        + check_ext_proc(index, demo)
        + check_token(index)
        + check_clusters(index)
        + check_inner_listener(index)
        + check_patch_targets(index)
        + check_key_files(index)
        + check_pools(index, demo)
        + check_inference_pools(index)
    )
