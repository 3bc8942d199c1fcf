"""Envoy Gateway's translation of envoy/kubernetes/ into one Envoy configuration, so that the
end-to-end tests run the manifests' gateway in real Envoy.

It emulates Envoy Gateway v1.9 (default settings: the xDS name scheme v1, no hostnames) for the
subset of resources the manifests use, with the names and shapes its translator gives them
(github.com/envoyproxy/gateway, internal/xds/translator and its golden files under
testdata/out/xds-ir): the Gateway's listener and its HTTP connection manager, HTTPRoute rules as
routes and clusters, the traffic policies, the EnvoyExtensionPolicy's wasm filters, and then the
EnvoyPatchPolicy's JSON patches applied literally, as Envoy Gateway applies them to its xDS
(RFC 6902 with `jsonPath` expanded into pointers, paths created on `add`, a whole resource added
by an `add` without a path). A field it does not emulate is an error, never silently dropped.

What it substitutes, and nothing else:
- addresses: each Service, Backend and pod address is the local process that plays its part
  (the demo's address for the same backend cluster or the same named cluster); listeners bind
  127.0.0.1;
- the xDS sources: routes and endpoints are inlined (a static bootstrap instead of ADS), and the
  wasm module is read from target/ instead of Envoy Gateway's cache (it serves the OCI image's
  module over HTTP, checked against its sha256);
- TLS towards the Backend of an external provider: the simulated provider speaks plain HTTP;
- the internal token: the placeholder the manifests carry, as a user replaces it.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonpatch
import yaml
from jsonpath_ng import Fields, Index
from jsonpath_ng.ext import parse as parse_jsonpath

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "envoy" / "kubernetes"

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
HCM = "envoy.filters.network.http_connection_manager"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# The header the modelgate filter names a request's backend cluster in.
ROUTING_HEADER = "x-modelgate-cluster"


def pod_port(port: int) -> int:
    """The Envoy pod's port of a Gateway listener's: Envoy Gateway binds privileged ports 10000 higher."""
    return port + 10000 if port < 1024 else port


class Unsupported(Exception):
    """The manifests use something this emulation does not translate."""


class Manifests:
    """The resources a user applies with `kubectl apply -k <folder>`, by kind."""

    def __init__(self, folder: Path = MANIFESTS):
        # The kubectl pinned in tests/requirements.txt, beside this Python: not whichever the host has.
        kubectl = Path(sys.executable).with_name("kubectl")
        rendered = subprocess.run([kubectl, "kustomize", str(folder)], check=True, capture_output=True, text=True)
        self.resources = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.resources if r["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        found = [r for r in self.of_kind(kind) if r["metadata"]["name"] == name
                 and (namespace is None or r["metadata"].get("namespace") == namespace)]
        if len(found) != 1:
            raise LookupError(f"{len(found)} {kind} named {namespace}/{name}")
        return found[0]

    def secret_value(self, name: str, key: str) -> str:
        secret = self.get("Secret", name)
        if key in secret.get("stringData", {}):
            return secret["stringData"][key]
        return base64.b64decode(secret["data"][key]).decode()


def namespace_of(resource: dict) -> str:
    return resource["metadata"].get("namespace", "default")


def targets(policy: dict, resource: dict) -> bool:
    """Whether a policy targets this resource: a policy reaches only its own namespace."""
    refs = policy["spec"].get("targetRefs") or [policy["spec"]["targetRef"]]
    return namespace_of(policy) == namespace_of(resource) and any(
        ref["kind"] == resource["kind"] and ref["name"] == resource["metadata"]["name"] for ref in refs)


def reject_unknown(where: str, spec: dict, known: set[str]) -> None:
    unknown = set(spec) - known
    if unknown:
        raise Unsupported(f"{where}: {sorted(unknown)} not emulated")


def duration(value: str) -> str:
    """A Gateway API duration (`1h2m3s`, `500ms`) as a protobuf one (`3723s`, `0.5s`)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    seconds = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value))
    return f"{seconds:g}s"


def quantity(value) -> int:
    """A Kubernetes quantity (`16Mi`, `32768`) in bytes."""
    suffixes = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value))
    return int(match[1]) * suffixes.get(match[2], 1)


# ------------------------------------------------------------------------------------------------
# The translation (Envoy Gateway's gatewayapi and xds/translator packages, for the subset used)


class Translation:
    """The xDS resources Envoy Gateway makes for one Gateway, by type and name."""

    def __init__(self, manifests: Manifests, gateway_name: str, gateway_namespace: str):
        self.manifests = manifests
        self.gateway = manifests.get("Gateway", gateway_name, gateway_namespace)
        self.resources: dict[str, dict[str, dict]] = {t: {} for t in
                                                       [LISTENER, ROUTE_CONFIGURATION, CLUSTER, LOAD_ASSIGNMENT]}
        # Which backend each cluster of an HTTPRoute rule reaches: (kind, namespace, name, port).
        self.cluster_backends: dict[str, list[tuple[str, str, str, int]]] = {}
        # A ClientTrafficPolicy's `headers.enableEnvoyHeaders` lets the router add x-envoy-* headers.
        self.envoy_headers = False
        self.check_envoy_proxy()
        for listener in self.gateway["spec"]["listeners"]:
            self.translate_listener(listener)

    def check_envoy_proxy(self) -> None:
        """The EnvoyProxy of the Gateway's class, where the manifests carry it, may shape the
        Envoy pods but nothing of the xDS (a filter order, bootstrap patches, merged Gateways)."""
        classes = [c for c in self.manifests.of_kind("GatewayClass")
                   if c["metadata"]["name"] == self.gateway["spec"]["gatewayClassName"]]
        for gateway_class in classes:
            ref = gateway_class["spec"].get("parametersRef")
            if ref and ref["kind"] == "EnvoyProxy":
                proxy = self.manifests.get("EnvoyProxy", ref["name"], ref["namespace"])
                reject_unknown(f"EnvoyProxy {ref['name']}", proxy["spec"], {"provider", "shutdown"})

    # -- the Gateway's listener

    def translate_listener(self, listener: dict) -> None:
        reject_unknown(f"Gateway listener {listener['name']}", listener, {"name", "port", "protocol", "allowedRoutes"})
        if listener["protocol"] != "HTTP":
            raise Unsupported(f"Gateway listener protocol {listener['protocol']}")
        ns, gw = namespace_of(self.gateway), self.gateway["metadata"]["name"]
        name = f"{ns}/{gw}/{listener['name']}"
        port = pod_port(listener["port"])
        hcm = {
            "stat_prefix": f"http-{port}",
            "rds": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
                    "route_config_name": name},
            "http_filters": [],
            "server_header_transformation": "PASS_THROUGH",
            "http2_protocol_options": {"max_concurrent_streams": 100, "initial_stream_window_size": 65536,
                                       "initial_connection_window_size": 1048576},
            "use_remote_address": True,
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        }
        xds_listener = {
            "name": name,
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "default_filter_chain": {"name": name, "filters": [
                {"name": HCM, "typed_config": {"@type": HCM_TYPE, **hcm}}]},
            "per_connection_buffer_limit_bytes": 32768,
            "max_connections_to_accept_per_socket_event": 1,
        }
        for policy in self.manifests.of_kind("ClientTrafficPolicy"):
            if targets(policy, self.gateway):
                self.apply_client_traffic_policy(policy, xds_listener, xds_listener["default_filter_chain"]
                                                 ["filters"][0]["typed_config"])
        routes = self.translate_routes(listener)
        self.resources[LISTENER][name] = xds_listener
        self.resources[ROUTE_CONFIGURATION][name] = {
            "name": name, "ignore_port_in_host_matching": True,
            "virtual_hosts": [{"name": f"{name}/*", "domains": ["*"], "routes": routes}]}
        filters = xds_listener["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]
        for policy in self.manifests.of_kind("EnvoyExtensionPolicy"):
            reached = [r for r in routes if targets(policy, self.gateway) or any(
                targets(policy, route) for route in self.attached_routes(listener)
                if r["name"].startswith(f"httproute/{namespace_of(route)}/{route['metadata']['name']}/rule/"))]
            if reached:
                self.apply_extension_policy(policy, filters, reached)
        filters.append({"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            **({} if self.envoy_headers else {"suppress_envoy_headers": True})}})

    def apply_client_traffic_policy(self, policy: dict, listener: dict, hcm: dict) -> None:
        spec = policy["spec"]
        where = f"ClientTrafficPolicy {policy['metadata']['name']}"
        reject_unknown(where, spec, {"targetRef", "targetRefs", "headers", "connection", "timeout"})
        headers = spec.get("headers", {})
        reject_unknown(f"{where} headers", headers, {"requestID", "withUnderscoresAction", "maxRequestHeaderLimit",
                                                     "enableEnvoyHeaders", "earlyRequestHeaders"})
        request_id = {"PreserveOrGenerate": (True, True), "Preserve": (False, True), "Disable": (False, False),
                      "Generate": (True, False)}
        if "requestID" in headers:
            hcm["generate_request_id"], preserve = request_id[headers["requestID"]]
            if preserve:
                hcm["preserve_external_request_id"] = True
        if "withUnderscoresAction" in headers:
            actions = {"Allow": "ALLOW", "RejectRequest": "REJECT_REQUEST", "DropHeader": "DROP_HEADER"}
            hcm["common_http_protocol_options"]["headers_with_underscores_action"] = \
                actions[headers["withUnderscoresAction"]]
        if "maxRequestHeaderLimit" in headers:
            hcm["max_request_headers_kb"] = quantity(headers["maxRequestHeaderLimit"]) // 1024
        if "earlyRequestHeaders" in headers:
            early = headers["earlyRequestHeaders"]
            reject_unknown(f"{where} earlyRequestHeaders", early, {"remove", "set", "add"})
            mutations = [{"append": value} for value in header_values(early)] + \
                        [{"remove": name} for name in early.get("remove", [])]
            hcm["early_header_mutation_extensions"] = [{
                "name": "envoy.http.early_header_mutation.header_mutation", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
                             "HeaderMutation", "mutations": mutations}}]
        if headers.get("enableEnvoyHeaders"):
            self.envoy_headers = True
        connection = spec.get("connection", {})
        reject_unknown(f"{where} connection", connection, {"bufferLimit"})
        if "bufferLimit" in connection:
            listener["per_connection_buffer_limit_bytes"] = quantity(connection["bufferLimit"])
        http_timeouts = spec.get("timeout", {}).get("http", {})
        reject_unknown(f"{where} timeout", spec.get("timeout", {}), {"http"})
        reject_unknown(f"{where} timeout.http", http_timeouts, {"requestReceivedTimeout", "idleTimeout"})
        if "requestReceivedTimeout" in http_timeouts:
            hcm["request_timeout"] = duration(http_timeouts["requestReceivedTimeout"])
        if "idleTimeout" in http_timeouts:
            hcm["common_http_protocol_options"]["idle_timeout"] = duration(http_timeouts["idleTimeout"])

    # -- HTTPRoutes

    def attached_routes(self, listener: dict) -> list[dict]:
        """The HTTPRoutes attached to this listener, in Gateway API order (oldest first, then by
        namespace and name: all are new here, so by name)."""
        gw_ns, gw = namespace_of(self.gateway), self.gateway["metadata"]["name"]
        allowed = listener.get("allowedRoutes", {}).get("namespaces", {}).get("from", "Same")
        if allowed not in ("Same", "All"):
            raise Unsupported(f"allowedRoutes from {allowed}")
        attached = []
        for route in self.manifests.of_kind("HTTPRoute"):
            if allowed == "Same" and namespace_of(route) != gw_ns:
                continue
            for parent in route["spec"].get("parentRefs", []):
                if parent.get("kind", "Gateway") == "Gateway" and parent["name"] == gw \
                        and parent.get("namespace", namespace_of(route)) == gw_ns \
                        and parent.get("sectionName", listener["name"]) == listener["name"]:
                    attached.append(route)
                    break
        return sorted(attached, key=lambda r: (namespace_of(r), r["metadata"]["name"]))

    def translate_routes(self, listener: dict) -> list[dict]:
        ir_routes = []  # (precedence, route)
        for route in self.attached_routes(listener):
            spec, ns, name = route["spec"], namespace_of(route), route["metadata"]["name"]
            reject_unknown(f"HTTPRoute {name}", spec, {"parentRefs", "rules"})
            for i, rule in enumerate(spec["rules"]):
                reject_unknown(f"HTTPRoute {name} rule {i}", rule, {"name", "matches", "filters", "backendRefs",
                                                                       "timeouts"})
                cluster = f"httproute/{ns}/{name}/rule/{i}"
                action = self.rule_action(route, i, rule, cluster)
                for j, match in enumerate(rule.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]):
                    xds = {"name": f"{cluster}/match/{j}/*", "match": self.route_match(name, match),
                           **copy.deepcopy(action)}
                    ir_routes.append((self.precedence(match), xds))
                self.apply_backend_traffic_policies(route, i, [r for _, r in ir_routes if
                                                               r["name"].startswith(f"{cluster}/")], cluster)
        # Gateway API precedence (internal/gatewayapi/sort.go): most specific first, ties in order.
        ir_routes.sort(key=lambda entry: entry[0], reverse=True)
        return [route for _, route in ir_routes]

    @staticmethod
    def precedence(match: dict) -> tuple:
        path = match.get("path", {"type": "PathPrefix", "value": "/"})
        kind = {"Exact": 3, "RegularExpression": 2, "PathPrefix": 1}[path["type"]]
        headers = match.get("headers", [])
        exact = sum(1 for h in headers if h.get("type", "Exact") == "Exact")
        return kind, len(path["value"]), len(headers), exact, len(match.get("queryParams", []))

    @staticmethod
    def route_match(name: str, match: dict) -> dict:
        reject_unknown(f"HTTPRoute {name} match", match, {"path", "headers", "method"})
        path = match.get("path", {"type": "PathPrefix", "value": "/"})
        if path["type"] == "Exact":
            xds = {"path": path["value"]}
        elif path["type"] == "PathPrefix":
            value = path["value"].rstrip("/")
            xds = {"prefix": "/"} if not value else {"path_separated_prefix": value}
        else:
            xds = {"safe_regex": {"regex": path["value"]}}
        headers = []
        for header in match.get("headers", []):
            kind = header.get("type", "Exact")
            string_match = {"exact": header["value"]} if kind == "Exact" else {"safe_regex": {"regex": header["value"]}}
            headers.append({"name": header["name"], "string_match": string_match})
        if "method" in match:
            headers.append({"name": ":method", "string_match": {"exact": match["method"]}})
        if headers:
            xds["headers"] = headers
        return xds

    def rule_action(self, route: dict, index: int, rule: dict, cluster: str) -> dict:
        name, ns = route["metadata"]["name"], namespace_of(route)
        action: dict = {}
        host_rewrite = None
        for f in rule.get("filters", []):
            if f["type"] == "RequestHeaderModifier":
                modifier = f["requestHeaderModifier"]
                reject_unknown(f"HTTPRoute {name} requestHeaderModifier", modifier, {"remove", "set", "add"})
                action.setdefault("request_headers_to_add", []).extend(header_values(modifier))
                action.setdefault("request_headers_to_remove", []).extend(modifier.get("remove", []))
            elif f["type"] == "ResponseHeaderModifier":
                modifier = f["responseHeaderModifier"]
                reject_unknown(f"HTTPRoute {name} responseHeaderModifier", modifier, {"remove", "set", "add"})
                action.setdefault("response_headers_to_add", []).extend(header_values(modifier))
                action.setdefault("response_headers_to_remove", []).extend(modifier.get("remove", []))
            elif f["type"] == "URLRewrite":
                rewrite = f["urlRewrite"]
                reject_unknown(f"HTTPRoute {name} urlRewrite", rewrite, {"hostname"})
                host_rewrite = rewrite["hostname"]
            elif f["type"] == "ExtensionRef" and f["extensionRef"]["kind"] == "HTTPRouteFilter":
                route_filter = self.manifests.get("HTTPRouteFilter", f["extensionRef"]["name"], ns)
                reject_unknown(f"HTTPRouteFilter {f['extensionRef']['name']}", route_filter["spec"], {"directResponse"})
                response = route_filter["spec"]["directResponse"]
                reject_unknown("directResponse", response, {"contentType", "body", "statusCode"})
                if response.get("body", {}).get("type", "Inline") != "Inline":
                    raise Unsupported("directResponse body from a ConfigMap")
                action["direct_response"] = {"status": response.get("statusCode", 200)}
                if "body" in response:
                    action["direct_response"]["body_format"] = {"text_format_source": {
                        "inline_bytes": base64.b64encode(response["body"]["inline"].encode()).decode()}}
                if "contentType" in response:
                    action.setdefault("response_headers_to_add", []).append(
                        {"header": {"key": "Content-Type", "value": response["contentType"]},
                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})
            else:
                raise Unsupported(f"HTTPRoute {name} filter {f['type']}")
        if "direct_response" in action:
            if rule.get("backendRefs"):
                raise Unsupported(f"HTTPRoute {name} rule {index}: a direct response with backendRefs")
            return action
        if not rule.get("backendRefs"):
            return {**action, "direct_response": {"status": 500}}
        action["route"] = {"cluster": cluster, "upgrade_configs": [{"upgrade_type": "websocket"}]}
        if host_rewrite:
            action["route"]["host_rewrite_literal"] = host_rewrite
        timeouts = rule.get("timeouts", {})
        reject_unknown(f"HTTPRoute {name} timeouts", timeouts, {"request", "backendRequest"})
        if "request" in timeouts:
            set_request_timeout(action["route"], duration(timeouts["request"]))
        self.translate_rule_cluster(route, index, rule, cluster)
        return action

    def app_protocol(self, kind: str, namespace: str, name: str, port: int) -> str | None:
        """The appProtocol of a Service's port, which Envoy Gateway reads for the upstream protocol."""
        ports = self.manifests.get(kind, name, namespace)["spec"]["ports"]
        return next((p.get("appProtocol") for p in ports if p["port"] == port), None)

    def translate_rule_cluster(self, route: dict, index: int, rule: dict, cluster: str) -> None:
        ns = namespace_of(route)
        backends = []
        for ref in rule["backendRefs"]:
            reject_unknown(f"HTTPRoute {route['metadata']['name']} backendRef", ref,
                           {"group", "kind", "name", "namespace", "port", "weight"})
            kind = ref.get("kind", "Service")
            if kind not in ("Service", "Backend"):
                raise Unsupported(f"backendRef kind {kind}")
            backends.append((kind, ref.get("namespace", ns), ref["name"], ref.get("port")))
        self.cluster_backends[cluster] = backends
        xds = {
            "name": cluster,
            "connect_timeout": "10s",
            "per_connection_buffer_limit_bytes": 32768,
            "dns_lookup_family": "V4_PREFERRED",
            "common_lb_config": {},
            "ignore_health_on_host_removal": True,
            "circuit_breakers": {"thresholds": [{"max_retries": 1024}]},
            "load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.least_request",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                    "locality_lb_config": {"locality_weighted_lb_config": {}}}}}]},
        }
        if all(kind == "Service" for kind, *_ in backends):
            if any(self.app_protocol(*backend) == "kubernetes.io/h2c" for backend in backends):
                # HTTP/2 with Envoy Gateway's window sizes (internal/xds/translator/cluster.go).
                xds["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {
                        "initial_stream_window_size": 65536, "initial_connection_window_size": 1048576}}}}
            xds.update(type="EDS", eds_cluster_config={
                "eds_config": {"ads": {}, "resource_api_version": "V3"}, "service_name": cluster})
            self.resources[LOAD_ASSIGNMENT][cluster] = {"cluster_name": cluster, "endpoints": [
                {"locality": {"region": f"{cluster}/backend/{b}"}, "load_balancing_weight": 1,
                 "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": f"{name}.{bns}",
                                                                                 "port_value": port}}},
                                   "load_balancing_weight": 1}]}
                for b, (_, bns, name, port) in enumerate(backends)]}
        elif len(backends) == 1:
            _, bns, name, port = backends[0]
            backend = self.manifests.get("Backend", name, bns)["spec"]
            reject_unknown(f"Backend {name}", backend, {"endpoints", "tls"})
            (endpoint,) = backend["endpoints"]
            fqdn = endpoint["fqdn"]
            xds.update(cluster_type={"name": "envoy.cluster.dns", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dns.v3.DnsCluster",
                "dns_refresh_rate": "30s", "respect_dns_ttl": True, "dns_lookup_family": "V4_PREFERRED"}},
                load_assignment={
                "cluster_name": cluster, "endpoints": [{"locality": {"region": f"{cluster}/backend/0"},
                                                        "load_balancing_weight": 1, "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": fqdn["hostname"],
                                                                 "port_value": fqdn["port"]}}},
                     "load_balancing_weight": 1}]}]})
            if "tls" in backend:
                # Substituted: the simulated provider speaks plain HTTP (see the module's notes).
                reject_unknown(f"Backend {name} tls", backend["tls"], {"sni", "wellKnownCACertificates",
                                                                       "caCertificateRefs", "insecureSkipVerify"})
        else:
            raise Unsupported("a rule mixing Backends and Services")
        self.resources[CLUSTER][cluster] = xds

    def apply_backend_traffic_policies(self, route: dict, index: int, routes: list[dict], cluster: str) -> None:
        for policy in self.manifests.of_kind("BackendTrafficPolicy"):
            spec = policy["spec"]
            where = f"BackendTrafficPolicy {policy['metadata']['name']}"
            # One on the Gateway would be merged under those on routes: not emulated.
            if targets(policy, self.gateway):
                raise Unsupported(f"{where}: targets the Gateway")
            if not targets(policy, route):
                continue
            reject_unknown(where, spec, {"targetRef", "targetRefs", "retry", "timeout", "circuitBreaker", "loadBalancer",
                                         "healthCheck"})
            xds_cluster = self.resources[CLUSTER].get(cluster)
            for xds in routes:
                if "route" not in xds:
                    continue
                if "retry" in spec:
                    retry = spec["retry"]
                    reject_unknown(f"{where} retry", retry, {"numRetries", "retryOn", "perRetry"})
                    reject_unknown(f"{where} retryOn", retry.get("retryOn", {}), {"triggers"})
                    policy_xds = {"num_retries": retry.get("numRetries", 2),
                                  "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                            "typed_config": {"@type": PREVIOUS_HOSTS}}],
                                  "host_selection_retry_max_attempts": "5",
                                  "retry_on": ",".join(retry.get("retryOn", {}).get(
                                      "triggers", ["connect-failure", "refused-stream", "unavailable",
                                                   "cancelled", "retriable-status-codes"]))}
                    per_retry = retry.get("perRetry", {})
                    reject_unknown(f"{where} perRetry", per_retry, {"timeout"})
                    if "timeout" in per_retry:
                        policy_xds["per_try_timeout"] = duration(per_retry["timeout"])
                    xds["route"]["retry_policy"] = policy_xds
                if "timeout" in spec:
                    http_timeout = spec["timeout"].get("http", {})
                    reject_unknown(f"{where} timeout", spec["timeout"], {"http", "tcp"})
                    reject_unknown(f"{where} timeout.http", http_timeout, {"requestTimeout", "streamIdleTimeout"})
                    if "requestTimeout" in http_timeout:
                        set_request_timeout(xds["route"], duration(http_timeout["requestTimeout"]))
                    # The route's stream idle timeout wins over the one its request timeout implies.
                    if "streamIdleTimeout" in http_timeout:
                        xds["route"]["idle_timeout"] = duration(http_timeout["streamIdleTimeout"])
            if "timeout" in spec and "connectTimeout" in spec["timeout"].get("tcp", {}):
                xds_cluster["connect_timeout"] = duration(spec["timeout"]["tcp"]["connectTimeout"])
            if "healthCheck" in spec:
                apply_health_check(where, spec["healthCheck"], xds_cluster)
            if "loadBalancer" in spec:
                xds_cluster["load_balancing_policy"] = load_balancing_policy(where, spec["loadBalancer"])
            if "circuitBreaker" in spec:
                breaker = spec["circuitBreaker"]
                names = {"maxConnections": "max_connections", "maxPendingRequests": "max_pending_requests",
                         "maxParallelRequests": "max_requests", "maxParallelRetries": "max_retries"}
                reject_unknown(f"{where} circuitBreaker", breaker, set(names))
                threshold = xds_cluster["circuit_breakers"]["thresholds"][0]
                threshold.update({names[k]: v for k, v in breaker.items()})

    # -- EnvoyExtensionPolicy

    def apply_extension_policy(self, policy: dict, filters: list[dict], routes: list[dict]) -> None:
        spec, ns, name = policy["spec"], namespace_of(policy), policy["metadata"]["name"]
        reject_unknown(f"EnvoyExtensionPolicy {name}", spec, {"targetRef", "targetRefs", "wasm"})
        for i, wasm in enumerate(spec.get("wasm", [])):
            reject_unknown(f"EnvoyExtensionPolicy {name} wasm", wasm, {"name", "rootID", "code", "config", "failOpen"})
            ir_name = f"envoyextensionpolicy/{ns}/{name}/wasm/{i}"
            filter_name = f"envoy.filters.http.wasm/{ir_name}"
            config = {
                "name": wasm.get("name", ir_name),
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  # The policy's `config` (JSON) as the API server stores it.
                                  "value": json.dumps(wasm["config"], separators=(",", ":")) if "config" in wasm
                                  else ""},
                # Envoy Gateway's cache serves the module it fetched (bootstrap() substitutes the file).
                "vm_config": {"vm_id": ir_name, "runtime": "envoy.wasm.runtime.v8", "code": {"remote": {
                    "http_uri": {"uri": f"https://envoy-gateway:18002/{ir_name}.wasm", "cluster": "wasm_cluster",
                                 "timeout": "10s"},
                    "sha256": "0" * 64}}},
            }
            if "rootID" in wasm:
                config["root_id"] = wasm["rootID"]
            if wasm.get("failOpen"):
                config["fail_open"] = True
            # Every policy's filters sit on the connection manager disabled, enabled per route.
            filters.append({"name": filter_name, "disabled": True, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config}})
            for route in routes:
                route.setdefault("typed_per_filter_config", {})[filter_name] = {
                    "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}

    # -- EnvoyPatchPolicy

    def apply_patch_policies(self) -> None:
        """Every EnvoyPatchPolicy targeting this Gateway, by priority, each patch in turn. A patch
        that fails would leave the policy not Programmed in the cluster: here it raises."""
        policies = [p for p in self.manifests.of_kind("EnvoyPatchPolicy")
                    if targets(p, self.gateway)]
        for policy in sorted(policies, key=lambda p: p["spec"].get("priority", 0)):
            if policy["spec"]["type"] != "JSONPatch":
                raise Unsupported(f"EnvoyPatchPolicy type {policy['spec']['type']}")
            for n, patch in enumerate(policy["spec"]["jsonPatches"]):
                where = f"EnvoyPatchPolicy {policy['metadata']['name']} patch {n} ({patch['type']} {patch.get('name')})"
                operation = patch["operation"]
                if patch["type"] not in self.resources:
                    raise Unsupported(f"{where}: type")
                if operation["op"] == "add" and not operation.get("path") and not operation.get("jsonPath"):
                    value = operation["value"]
                    resource_name = value.get("cluster_name") if patch["type"] == LOAD_ASSIGNMENT else value["name"]
                    self.resources[patch["type"]][resource_name] = copy.deepcopy(value)
                    continue
                if patch["name"] not in self.resources[patch["type"]]:
                    raise LookupError(f"{where}: no such resource (Envoy Gateway reports ResourceNotFound)")
                document = self.resources[patch["type"]][patch["name"]]
                self.resources[patch["type"]][patch["name"]] = apply_json_patch(document, operation, where)


def apply_health_check(where: str, check: dict, cluster: dict) -> None:
    """A BackendTrafficPolicy's `healthCheck` (cluster.go, buildXdsHealthCheck and
    buildXdsOutlierDetection)."""
    reject_unknown(f"{where} healthCheck", check, {"active", "passive"})
    if "active" in check:
        active = check["active"]
        reject_unknown(f"{where} healthCheck.active", active, {"type", "http", "timeout", "interval",
                                                               "unhealthyThreshold", "healthyThreshold"})
        if active["type"] != "HTTP":
            raise Unsupported(f"{where} active health check {active['type']}")
        reject_unknown(f"{where} healthCheck.active.http", active["http"], {"path"})
        xds = {"timeout": duration(active.get("timeout", "1s")), "interval": duration(active.get("interval", "3s")),
               "unhealthy_threshold": active.get("unhealthyThreshold", 3),
               "healthy_threshold": active.get("healthyThreshold", 1),
               "http_health_check": {"path": active["http"]["path"]}}
        cluster["health_checks"] = [xds]
    if "passive" in check:
        passive = check["passive"]
        names = {"consecutive5XxErrors": "consecutive_5xx", "consecutiveLocalOriginFailures":
                 "consecutive_local_origin_failure", "maxEjectionPercent": "max_ejection_percent"}
        reject_unknown(f"{where} healthCheck.passive", passive, {*names, "consecutiveGatewayErrors", "interval",
                                                                 "baseEjectionTime", "splitExternalLocalOriginErrors"})
        xds = {"interval": duration(passive.get("interval", "3s")),
               "base_ejection_time": duration(passive.get("baseEjectionTime", "30s")),
               **{names[k]: v for k, v in passive.items() if k in names}}
        if "consecutiveGatewayErrors" in passive:
            xds.update(consecutive_gateway_failure=passive["consecutiveGatewayErrors"],
                       enforcing_consecutive_gateway_failure=100)
        if passive.get("splitExternalLocalOriginErrors"):
            xds["split_external_local_origin_errors"] = True
        cluster["outlier_detection"] = xds


def load_balancing_policy(where: str, balancer: dict) -> dict:
    """A BackendTrafficPolicy's `loadBalancer` (cluster.go, buildEndpointOverrideLoadBalancingPolicy)."""
    reject_unknown(f"{where} loadBalancer", balancer, {"type", "endpointOverride"})
    names = {"LeastRequest": "least_request", "RoundRobin": "round_robin", "Random": "random"}
    if balancer["type"] not in names:
        raise Unsupported(f"{where} loadBalancer type {balancer['type']}")
    kind = names[balancer["type"]]
    typed = "".join(part.title() for part in kind.split("_"))
    policy = {"typed_extension_config": {"name": f"envoy.load_balancing_policies.{kind}", "typed_config": {
        "@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{kind}.v3.{typed}",
        **({"locality_lb_config": {"locality_weighted_lb_config": {}}} if kind != "random" else {})}}}
    if "endpointOverride" not in balancer:
        return {"policies": [policy]}
    override = balancer["endpointOverride"]
    reject_unknown(f"{where} endpointOverride", override, {"extractFrom"})
    sources = []
    for source in override["extractFrom"]:
        reject_unknown(f"{where} extractFrom", source, {"header"})
        sources.append({"header": source["header"]})
    return {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": sources, "fallback_policy": {"policies": [policy]}}}}]}


def set_request_timeout(route: dict, timeout: str) -> None:
    """A route's timeout, and the stream idle timeout Envoy Gateway derives from it (route.go
    `idleTimeout`): at least an hour, none when the request has none."""
    route["timeout"] = timeout
    seconds = float(timeout.rstrip("s"))
    route["idle_timeout"] = "0s" if seconds == 0 else f"{max(seconds, 3600):g}s"


def header_values(modifier: dict) -> list[dict]:
    return ([{"header": {"key": h["name"], "value": h["value"]}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
             for h in modifier.get("set", [])]
            + [{"header": {"key": h["name"], "value": h["value"]}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
               for h in modifier.get("add", [])])


def json_pointers(document: dict, expression: str, path: str) -> list[str]:
    """What a `jsonPath` selects, as JSON pointers (Envoy Gateway's ConvertPathToPointers), each
    followed by `path`."""
    pointers = []
    for match in parse_jsonpath(expression).find(document):
        parts = []
        node = match
        while node.context is not None:
            if isinstance(node.path, Fields):
                (field,) = node.path.fields
                parts.append(field.replace("~", "~0").replace("/", "~1"))
            elif isinstance(node.path, Index):
                (index,) = node.path.indices
                parts.append(str(index))
            else:
                raise Unsupported(f"jsonPath step {node.path!r} in {expression}")
            node = node.context
        pointer = "/" + "/".join(reversed(parts)) if parts else ""
        pointers.append(pointer.rstrip("/") + "/" + path.lstrip("/") if path else pointer)
    return pointers


def apply_json_patch(document: dict, operation: dict, where: str) -> dict:
    """One EnvoyPatchPolicy operation on one resource (internal/utils/jsonpatch/patch.go)."""
    if operation.get("jsonPath"):
        pointers = json_pointers(document, operation["jsonPath"], operation.get("path", ""))
        if not pointers:
            raise LookupError(f"{where}: jsonPath {operation['jsonPath']} selects nothing")
    else:
        pointers = [operation["path"]]
    for pointer in pointers:
        step = {"op": operation["op"], "path": pointer,
                **{k: operation[k] for k in ("from", "value") if k in operation}}
        if step["op"] == "add":
            ensure_parents(document, pointer)
        try:
            document = jsonpatch.apply_patch(document, [step])
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise ValueError(f"{where}: {step['op']} {pointer}: {e}") from None
    return document


def ensure_parents(document: dict, pointer: str) -> None:
    """Creates the missing objects above an `add`'s target, as Envoy Gateway's patcher does
    (EnsurePathExistsOnAdd)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:-1]]
    node = document
    for part in parts:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})


# ------------------------------------------------------------------------------------------------
# The bootstrap a test runs: the xDS inlined, and the addresses substituted


def walk(node, visit) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            walk(value, visit)
    elif isinstance(node, list):
        for item in node:
            walk(item, visit)


def service_key(host: str) -> str:
    """`name.namespace` of a Service's DNS name in any of its forms."""
    return re.sub(r"\.svc(\.cluster\.local)?\.?$", "", host)


def bootstrap(translation: Translation, addresses: dict[tuple[str, int], list[tuple[str, int]]],
              listener_ports: dict[int, int], admin_port: int, wasm: Path) -> dict:
    """A static Envoy bootstrap of the translation's xDS. `addresses` gives, for each address the
    manifests name (a Service as `name.namespace`, a Backend's FQDN) and port, the local
    addresses that play its part; `listener_ports` the local port of each Envoy pod port."""
    resources = copy.deepcopy(translation.resources)
    routes, endpoints = resources[ROUTE_CONFIGURATION], resources[LOAD_ASSIGNMENT]

    def inline(node: dict) -> None:
        config = node.get("typed_config", {})
        if config.get("@type") == HCM_TYPE and "rds" in config:
            config["route_config"] = routes[config.pop("rds")["route_config_name"]]
        code = node.get("vm_config", {}).get("code", {})
        if "remote" in code:
            code.pop("remote")
            code["local"] = {"filename": str(wasm)}

    walk(resources[LISTENER], inline)
    for listener in resources[LISTENER].values():
        address = listener["address"]["socket_address"]
        if address["port_value"] not in listener_ports:
            raise LookupError(f"listener {listener['name']} on port {address['port_value']}: no local port for it")
        address.update(address="127.0.0.1", port_value=listener_ports[address["port_value"]])

    clusters = []
    for cluster in resources[CLUSTER].values():
        if cluster.get("type") == "EDS":
            del cluster["eds_cluster_config"]
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = endpoints[cluster["name"]]
        if cluster["name"] in translation.cluster_backends and any(
                kind == "Backend" for kind, *_ in translation.cluster_backends[cluster["name"]]):
            cluster.pop("transport_socket", None)
            cluster.pop("transport_socket_matches", None)
        clusters.append(cluster)

    def substitute(node: dict) -> None:
        for endpoints_list in node.get("endpoints", []) if "cluster_name" in node else []:
            substituted = []
            for lb_endpoint in endpoints_list.get("lb_endpoints", []):
                socket = lb_endpoint["endpoint"]["address"]["socket_address"]
                key = (service_key(socket["address"]), socket["port_value"])
                if key not in addresses:
                    raise LookupError(f"nothing local plays {socket['address']}:{socket['port_value']}")
                for host, port in addresses[key]:
                    local = copy.deepcopy(lb_endpoint)
                    local["endpoint"]["address"]["socket_address"] = {"address": host, "port_value": port}
                    substituted.append(local)
            endpoints_list["lb_endpoints"] = substituted

    walk(clusters, substitute)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": list(resources[LISTENER].values()), "clusters": clusters},
    }
