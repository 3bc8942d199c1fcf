"""Cross-references between the manifests: what no schema sees, and a cluster would only show
as a request that goes nowhere.

Every check returns Problems, each naming the resource and field that hold the broken reference.
Pods that the folder does not create are described here: Envoy Gateway's Envoy pods (the labels
Envoy Gateway v1.9 gives them, internal/infrastructure/kubernetes/proxy/resource.go, and its
ports) and the user's model servers (the pods the model-server Services select: their ports are
whatever those Services target).
"""

import re
from dataclasses import dataclass, field

from manifests import Document, Problem

# Envoy Gateway's namespace (its default ControllerNamespace mode), where it runs Envoy's pods.
ENVOY_GATEWAY_NAMESPACE = "envoy-gateway-system"
# The Envoy pods' own ports beside the listeners: metrics and readiness.
ENVOY_POD_PORTS = {19001, 19003}
# Envoy Gateway binds a Gateway port below 1024 this much higher (no CAP_NET_BIND_SERVICE).
PRIVILEGED_PORT_SHIFT = 10000
# Services for the user's model servers: their selectors name pods the folder does not create.
MODEL_SERVER_SERVICES = {"llama-pool", "qwen-pool", "mistral-pool", "ollama", "vllm-pool"}
# The user's own Gateway, which inference-pool.yaml's example route attaches to.
USER_GATEWAYS = {"inference-gateway"}


@dataclass
class Pods:
    """Pods some resource creates (or the user runs): their labels and the ports they serve."""

    origin: str
    namespace: str
    labels: dict
    ports: dict = field(default_factory=dict)  # name -> number (numbers without a name too)

    def serve(self, port) -> bool:
        return port in self.ports or port in self.ports.values()


def namespace_of(document: Document) -> str:
    return document.namespace or "default"


class Index:
    """The manifests by kind, namespace and name, and the pods they imply."""

    def __init__(self, documents: list[Document]):
        self.documents = documents
        self._by_key = {(d.kind, namespace_of(d), d.name): d for d in documents}
        self.pods = self._pods()
        self.envoy_services = self._envoy_services()

    def get(self, kind: str, namespace: str, name: str) -> Document | None:
        return self._by_key.get((kind, namespace, name))

    def of_kind(self, *kinds: str) -> list[Document]:
        return [d for d in self.documents if d.kind in kinds]

    def _pods(self) -> list[Pods]:
        pods = []
        for deployment in self.of_kind("Deployment"):
            template = deployment.body["spec"]["template"]
            ports = {}
            for container in template["spec"].get("containers", []):
                for port in container.get("ports", []):
                    ports[port.get("name", port["containerPort"])] = port["containerPort"]
            pods.append(
                Pods(deployment.label, namespace_of(deployment), template["metadata"].get("labels", {}), ports)
            )
        for gateway in self.of_kind("Gateway"):
            labels = {
                "app.kubernetes.io/name": "envoy",
                "app.kubernetes.io/component": "proxy",
                "app.kubernetes.io/managed-by": "envoy-gateway",
                "gateway.envoyproxy.io/owning-gateway-name": gateway.name,
                "gateway.envoyproxy.io/owning-gateway-namespace": namespace_of(gateway),
            }
            numbers = ENVOY_POD_PORTS | {
                listener["port"] + (PRIVILEGED_PORT_SHIFT if listener["port"] < 1024 else 0)
                for listener in gateway.body["spec"]["listeners"]
            } | self._patched_listener_ports(gateway)
            ports = {number: number for number in numbers}
            pods.append(Pods(f"Envoy pods of {gateway.label}", ENVOY_GATEWAY_NAMESPACE, labels, ports))
        for service in self.of_kind("Service"):
            if service.name in MODEL_SERVER_SERVICES:
                ports = {p["targetPort"]: p["targetPort"] for p in service.body["spec"].get("ports", [])}
                pods.append(
                    Pods(f"model servers of {service.label}", namespace_of(service),
                         service.body["spec"].get("selector", {}), ports)
                )
        return pods

    def _patched_listener_ports(self, gateway: Document) -> set:
        """Ports of the listeners EnvoyPatchPolicies add to a Gateway's Envoy."""
        ports = set()
        for policy in self.of_kind("EnvoyPatchPolicy"):
            if policy.body["spec"]["targetRef"]["name"] != gateway.name or namespace_of(policy) != namespace_of(gateway):
                continue
            for patch in policy.body["spec"].get("jsonPatches", []):
                value = patch["operation"].get("value")
                if patch["type"].endswith("listener.v3.Listener") and isinstance(value, dict) and "address" in value:
                    ports.add(value["address"]["socket_address"]["port_value"])
        return ports

    def _envoy_services(self) -> dict:
        """The Services Envoy Gateway makes for Gateways whose EnvoyProxy names them: (namespace,
        name) -> the Gateway's listener ports (a generated name cannot be referenced)."""
        services = {}
        for gateway in self.of_kind("Gateway"):
            gateway_class = self.get("GatewayClass", "default", gateway.body["spec"]["gatewayClassName"])
            ref = (gateway_class.body["spec"].get("parametersRef") or {}) if gateway_class else {}
            proxy = self.get("EnvoyProxy", ref.get("namespace", ""), ref.get("name", ""))
            if proxy is None:
                continue
            kubernetes = proxy.body["spec"].get("provider", {}).get("kubernetes", {})
            name = kubernetes.get("envoyService", {}).get("name")
            if name:
                ports = [listener["port"] for listener in gateway.body["spec"]["listeners"]]
                services[(ENVOY_GATEWAY_NAMESPACE, name)] = ports
        return services

    def service_ports(self, namespace: str, name: str) -> list | None:
        """The ports of a Service the manifests create or Envoy Gateway makes, None if neither."""
        service = self.get("Service", namespace, name)
        if service is not None:
            return [p["port"] for p in service.body["spec"].get("ports", [])]
        return self.envoy_services.get((namespace, name))

    def pods_selected(self, namespace: str | None, selector: dict) -> list[Pods]:
        """Pods whose labels include every label of `selector` (in `namespace`, if given)."""
        return [
            pods
            for pods in self.pods
            if (namespace is None or pods.namespace == namespace)
            and selector
            and all(pods.labels.get(k) == v for k, v in selector.items())
        ]


def _match_labels(selector: dict | None, document: Document, path: str) -> tuple[dict | None, list]:
    """A label selector's matchLabels (the manifests use no matchExpressions: refused to keep the
    checks exact)."""
    selector = selector or {}
    if selector.get("matchExpressions"):
        return None, [document.problem(f"{path}.matchExpressions", "not checked here: use matchLabels")]
    return selector.get("matchLabels", {}), []


def check_backend_refs(index: Index) -> list[Problem]:
    problems = []
    for route in index.of_kind("HTTPRoute", "GRPCRoute"):
        for r, rule in enumerate(route.body["spec"].get("rules", [])):
            for b, ref in enumerate(rule.get("backendRefs", [])):
                path = f"spec.rules[{r}].backendRefs[{b}]"
                problems += _check_backend_ref(index, route, ref, path)
            for f, entry in enumerate(rule.get("filters", [])):
                ext = entry.get("extensionRef")
                if ext and not index.get(ext["kind"], namespace_of(route), ext["name"]):
                    problems.append(route.problem(
                        f"spec.rules[{r}].filters[{f}].extensionRef",
                        f'{ext["kind"]} "{ext["name"]}" does not exist in namespace {namespace_of(route)}',
                    ))
    for policy in index.of_kind("EnvoyExtensionPolicy"):
        for e, ext_proc in enumerate(policy.body["spec"].get("extProc", [])):
            for b, ref in enumerate(ext_proc.get("backendRefs", [])):
                problems += _check_backend_ref(index, policy, ref, f"spec.extProc[{e}].backendRefs[{b}]")
    return problems


def _check_backend_ref(index: Index, referrer: Document, ref: dict, path: str) -> list[Problem]:
    kind = ref.get("kind", "Service")
    namespace = ref.get("namespace", namespace_of(referrer))
    target = index.get(kind, namespace, ref["name"])
    ports = index.service_ports(namespace, ref["name"]) if kind == "Service" else None
    if target is None and ports is None:
        return [referrer.problem(path, f'{kind} "{ref["name"]}" does not exist in namespace {namespace}')]
    port = ref.get("port")
    if kind == "Backend":
        ports = [
            endpoint[kind_]["port"]
            for endpoint in target.body["spec"].get("endpoints", [])
            for kind_ in ("fqdn", "ip")
            if kind_ in endpoint
        ]
    elif kind != "Service":
        return []
    if port not in ports:
        return [referrer.problem(f"{path}.port", f'{kind} "{ref["name"]}" has no port {port} (it has {ports})')]
    return []


def _check_target(index: Index, policy: Document, ref: dict, path: str) -> list[Problem]:
    kind = ref["kind"]
    namespace = ref.get("namespace", namespace_of(policy))
    target = index.get(kind, namespace, ref["name"])
    if kind == "Gateway" and ref["name"] in USER_GATEWAYS:
        return []
    if target is None:
        return [policy.problem(path, f'{kind} "{ref["name"]}" does not exist in namespace {namespace}')]
    section = ref.get("sectionName")
    if section and kind == "Gateway":
        listeners = [listener["name"] for listener in target.body["spec"]["listeners"]]
        if section not in listeners:
            return [policy.problem(f"{path}.sectionName", f'Gateway "{ref["name"]}" has no listener "{section}"')]
    return []


def _check_admitted(index: Index, route: Document, ref: dict, path: str) -> list[Problem]:
    """A Gateway's listeners take routes from their own namespace only, unless they say otherwise."""
    namespace = ref.get("namespace", namespace_of(route))
    gateway = index.get("Gateway", namespace, ref["name"])
    if gateway is None or namespace == namespace_of(route):
        return []
    listeners = [l for l in gateway.body["spec"]["listeners"] if ref.get("sectionName") in (None, l["name"])]
    if all(l.get("allowedRoutes", {}).get("namespaces", {}).get("from", "Same") == "Same" for l in listeners):
        return [route.problem(path, f"{gateway.label} admits routes from namespace {namespace} only (allowedRoutes)")]
    return []


def check_targets(index: Index) -> list[Problem]:
    """Routes' parentRefs, policies' targetRefs, a Gateway's class and a class's parameters."""
    problems = []
    for route in index.of_kind("HTTPRoute", "GRPCRoute"):
        for i, ref in enumerate(route.body["spec"].get("parentRefs", [])):
            errors = _check_target(index, route, {"kind": "Gateway", **ref}, f"spec.parentRefs[{i}]")
            problems += errors or _check_admitted(index, route, ref, f"spec.parentRefs[{i}]")
    for policy in index.documents:
        spec = policy.body.get("spec") or {}
        refs = spec.get("targetRefs", []) + ([spec["targetRef"]] if "targetRef" in spec else [])
        field_name = "targetRefs" if "targetRefs" in spec else "targetRef"
        for i, ref in enumerate(refs):
            path = f"spec.{field_name}[{i}]" if field_name == "targetRefs" else "spec.targetRef"
            problems += _check_target(index, policy, ref, path)
    for gateway in index.of_kind("Gateway"):
        name = gateway.body["spec"]["gatewayClassName"]
        if not index.get("GatewayClass", "default", name):
            problems.append(gateway.problem("spec.gatewayClassName", f'GatewayClass "{name}" does not exist'))
    for gateway_class in index.of_kind("GatewayClass"):
        ref = gateway_class.body["spec"].get("parametersRef")
        if ref and not index.get(ref["kind"], ref.get("namespace", "default"), ref["name"]):
            problems.append(gateway_class.problem(
                "spec.parametersRef", f'{ref["kind"]} "{ref["name"]}" does not exist in namespace {ref.get("namespace")}'
            ))
    return problems


def check_services(index: Index) -> list[Problem]:
    """A Service selects some pods, and each of its targetPorts is a port those pods serve."""
    problems = []
    for service in index.of_kind("Service"):
        if service.name in MODEL_SERVER_SERVICES:
            continue  # they define the model servers' pods (Index._pods)
        selector = service.body["spec"].get("selector", {})
        selected = index.pods_selected(namespace_of(service), selector)
        if not selected:
            problems.append(service.problem("spec.selector", f"selects no pods: {selector}"))
            continue
        for i, port in enumerate(service.body["spec"].get("ports", [])):
            target = port.get("targetPort", port["port"])
            if not any(pods.serve(target) for pods in selected):
                problems.append(service.problem(
                    f"spec.ports[{i}].targetPort",
                    f"{target!r} is not a port of the selected pods ({selected[0].origin})",
                ))
    return problems


def check_network_policies(index: Index) -> list[Problem]:
    """A NetworkPolicy selects some pods, admits their ports, and names peers that exist."""
    problems = []
    for policy in index.of_kind("NetworkPolicy"):
        spec = policy.body["spec"]
        labels, errors = _match_labels(spec.get("podSelector"), policy, "spec.podSelector")
        problems += errors
        selected = index.pods_selected(namespace_of(policy), labels) if labels is not None else []
        if labels is not None and not selected:
            problems.append(policy.problem("spec.podSelector", f"selects no pods: {labels}"))
            continue
        for i, rule in enumerate(spec.get("ingress", [])):
            for j, port in enumerate(rule.get("ports", [])):
                if "endPort" in port or port.get("protocol", "TCP") != "TCP":
                    continue  # a range (or UDP) admits ports by design, not one named port
                if not any(pods.serve(port["port"]) for pods in selected):
                    problems.append(policy.problem(
                        f"spec.ingress[{i}].ports[{j}].port",
                        f"{port['port']!r} is not a port of the selected pods ({selected[0].origin})",
                    ))
            for j, peer in enumerate(rule.get("from", [])):
                problems += _check_peer(index, policy, peer, f"spec.ingress[{i}].from[{j}]")
    return problems


def _check_peer(index: Index, policy: Document, peer: dict, path: str) -> list[Problem]:
    if "podSelector" not in peer:
        return []
    namespace = namespace_of(policy)
    if "namespaceSelector" in peer:
        names, errors = _match_labels(peer["namespaceSelector"], policy, f"{path}.namespaceSelector")
        if errors:
            return errors
        namespace = names.get("kubernetes.io/metadata.name")
    labels, errors = _match_labels(peer["podSelector"], policy, f"{path}.podSelector")
    if errors:
        return errors
    if not index.pods_selected(namespace, labels):
        return [policy.problem(f"{path}.podSelector", f"selects no pods in namespace {namespace}: {labels}")]
    return []


def check_disruption_budgets(index: Index) -> list[Problem]:
    problems = []
    for budget in index.of_kind("PodDisruptionBudget"):
        labels, errors = _match_labels(budget.body["spec"].get("selector"), budget, "spec.selector")
        problems += errors
        if labels is not None and not index.pods_selected(namespace_of(budget), labels):
            problems.append(budget.problem("spec.selector", f"selects no pods: {labels}"))
    return problems


def _keys_of(document: Document) -> set:
    body = document.body
    return set(body.get("data") or {}) | set(body.get("stringData") or {}) | set(body.get("binaryData") or {})


def _flag_paths(args: list[str]) -> list[tuple[int, str]]:
    """(index, path) of every absolute path an argument names (`--flag=/a/b` or `/a/b`)."""
    found = []
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value.startswith("/"):
            found.append((i, value))
    return found


def check_workloads(index: Index) -> list[Problem]:
    """Volumes, mounts, env, probes and ServiceAccounts of each Deployment resolve, and every file
    an argument names inside a Secret or ConfigMap mount is one of its keys."""
    problems = []
    for deployment in index.of_kind("Deployment"):
        namespace = namespace_of(deployment)
        pod = deployment.body["spec"]["template"]["spec"]
        base = "spec.template.spec"
        account = pod.get("serviceAccountName")
        if account and not index.get("ServiceAccount", namespace, account):
            problems.append(deployment.problem(f"{base}.serviceAccountName", f'ServiceAccount "{account}" does not exist'))
        volumes = {}
        for i, volume in enumerate(pod.get("volumes", [])):
            volumes[volume["name"]] = volume
            problems += _check_volume(index, deployment, volume, f"{base}.volumes[{i}]")
        for c, container in enumerate(pod.get("containers", [])):
            where = f"{base}.containers[{c}]"
            problems += _check_container(index, deployment, container, volumes, where)
    return problems


def _volume_source(index: Index, namespace: str, volume: dict) -> tuple[Document | None, str | None]:
    if "secret" in volume:
        return index.get("Secret", namespace, volume["secret"]["secretName"]), "Secret"
    if "configMap" in volume:
        return index.get("ConfigMap", namespace, volume["configMap"]["name"]), "ConfigMap"
    return None, None


def _check_volume(index: Index, deployment: Document, volume: dict, path: str) -> list[Problem]:
    namespace = namespace_of(deployment)
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        if not index.get("PersistentVolumeClaim", namespace, claim):
            return [deployment.problem(f"{path}.persistentVolumeClaim.claimName",
                                       f'PersistentVolumeClaim "{claim}" does not exist')]
        return []
    source, kind = _volume_source(index, namespace, volume)
    if kind is None:
        return []
    name = volume["secret"]["secretName"] if kind == "Secret" else volume["configMap"]["name"]
    key = "secret.secretName" if kind == "Secret" else "configMap.name"
    if source is None:
        return [deployment.problem(f"{path}.{key}", f'{kind} "{name}" does not exist in namespace {namespace}')]
    problems = []
    items = (volume.get("secret") or volume.get("configMap")).get("items", [])
    for i, item in enumerate(items):
        if item["key"] not in _keys_of(source):
            problems.append(deployment.problem(f"{path}.items[{i}].key", f'{kind} "{name}" has no key "{item["key"]}"'))
    return problems


def mounted_files(index: Index, deployment: Document, container: dict) -> dict:
    """For each Secret/ConfigMap mount of a container: mount path -> (kind, name, file names)."""
    namespace = namespace_of(deployment)
    volumes = {v["name"]: v for v in deployment.body["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None:
            continue
        source, kind = _volume_source(index, namespace, volume)
        if source is None:
            continue
        items = (volume.get("secret") or volume.get("configMap")).get("items")
        files = {item["path"] for item in items} if items else _keys_of(source)
        mounts[mount["mountPath"].rstrip("/")] = (kind, source.name, files)
    return mounts


def _check_container(index, deployment: Document, container: dict, volumes: dict, where: str):
    problems = []
    namespace = namespace_of(deployment)
    for m, mount in enumerate(container.get("volumeMounts", [])):
        if mount["name"] not in volumes:
            problems.append(deployment.problem(f"{where}.volumeMounts[{m}].name", f'no volume "{mount["name"]}"'))
    for e, env in enumerate(container.get("env", [])):
        for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            ref = (env.get("valueFrom") or {}).get(ref_kind)
            if not ref:
                continue
            source = index.get(kind, namespace, ref["name"])
            if source is None:
                problems.append(deployment.problem(f"{where}.env[{e}].valueFrom.{ref_kind}.name", f'{kind} "{ref["name"]}" does not exist'))
            elif ref["key"] not in _keys_of(source):
                problems.append(deployment.problem(f"{where}.env[{e}].valueFrom.{ref_kind}.key", f'{kind} "{ref["name"]}" has no key "{ref["key"]}"'))
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        action = (container.get(probe) or {}).get("httpGet") or (container.get(probe) or {}).get("grpc")
        if action and action["port"] not in ports and action["port"] not in ports.values():
            problems.append(deployment.problem(
                f"{where}.{probe}.port", f"{action['port']!r} is not a port of container {container['name']}"
            ))
    mounts = mounted_files(index, deployment, container)
    for i, value in _flag_paths(container.get("args", [])):
        for mount_path, (kind, name, files) in mounts.items():
            if value.startswith(mount_path + "/"):
                file = value[len(mount_path) + 1 :]
                if file not in files:
                    problems.append(deployment.problem(
                        f"{where}.args[{i}]", f'{value}: {kind} "{name}" mounted at {mount_path} has no key "{file}"'
                    ))
    return problems


def service_address(index: Index, address: str, port: int) -> str | None:
    """Why `<service>.<namespace>.svc.cluster.local:port` reaches no Service port, or None."""
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?\.?", address)
    if not match:
        return f"{address} is not a Service's cluster DNS name"
    ports = index.service_ports(match.group(2), match.group(1))
    if ports is None:
        return f'Service "{match.group(1)}" does not exist in namespace {match.group(2)}'
    if port not in ports:
        return f'Service "{match.group(1)}" has no port {port} (it has {ports})'
    return None


def check_service_addresses(index: Index) -> list[Problem]:
    """Addresses of Services that arguments name (`--upstream=host:port`, `--gateway-url=...`)."""
    problems = []
    for deployment in index.of_kind("Deployment"):
        for c, container in enumerate(deployment.body["spec"]["template"]["spec"].get("containers", [])):
            for i, arg in enumerate(container.get("args", [])):
                match = re.search(r"(?:^|=|//)([a-z0-9.-]+\.svc(?:\.cluster\.local)?)(?::(\d+))?", arg)
                if not match:
                    continue
                port = int(match.group(2)) if match.group(2) else (443 if arg.split("=", 1)[-1].startswith("https") else 80)
                error = service_address(index, match.group(1), port)
                if error:
                    problems.append(deployment.problem(f"spec.template.spec.containers[{c}].args[{i}]", error))
    return problems


# Pod Security's `restricted` profile (kubernetes.io/docs/concepts/security/pod-security-standards).
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def check_pod_security(index: Index) -> list[Problem]:
    """Pods in a namespace that enforces Pod Security `restricted` meet it: the Deployment would be
    accepted, and its pods refused."""
    problems = []
    for deployment in index.of_kind("Deployment"):
        namespace = index.get("Namespace", "default", namespace_of(deployment))
        labels = (namespace.body["metadata"].get("labels") or {}) if namespace else {}
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            continue
        pod = deployment.body["spec"]["template"]["spec"]
        base = "spec.template.spec"
        pod_context = pod.get("securityContext") or {}
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                problems.append(deployment.problem(f"{base}.{key}", "not allowed by Pod Security restricted"))
        for i, volume in enumerate(pod.get("volumes", [])):
            kinds = set(volume) - {"name"}
            if not kinds <= _RESTRICTED_VOLUMES:
                problems.append(deployment.problem(f"{base}.volumes[{i}]", f"{sorted(kinds)} volumes are not allowed by Pod Security restricted"))
        for c, container in enumerate(pod.get("containers", []) + pod.get("initContainers", [])):
            where = f"{base}.containers[{c}].securityContext"
            context = container.get("securityContext") or {}

            def setting(key):
                return context.get(key, pod_context.get(key))

            if setting("runAsNonRoot") is not True:
                problems.append(deployment.problem(f"{where}.runAsNonRoot", "must be true (Pod Security restricted)"))
            if setting("runAsUser") == 0:
                problems.append(deployment.problem(f"{where}.runAsUser", "must not be 0 (Pod Security restricted)"))
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(deployment.problem(f"{where}.allowPrivilegeEscalation", "must be false (Pod Security restricted)"))
            if context.get("privileged"):
                problems.append(deployment.problem(f"{where}.privileged", "not allowed by Pod Security restricted"))
            capabilities = context.get("capabilities") or {}
            if "ALL" not in capabilities.get("drop", []):
                problems.append(deployment.problem(f"{where}.capabilities.drop", "must include ALL (Pod Security restricted)"))
            if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(deployment.problem(f"{where}.capabilities.add", "only NET_BIND_SERVICE (Pod Security restricted)"))
            seccomp = (setting("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(deployment.problem(f"{where}.seccompProfile.type", "must be RuntimeDefault or Localhost (Pod Security restricted)"))
    return problems


def check_termination_grace(index: Index) -> list[Problem]:
    """Kubernetes waits for a process's own drain (--drain-delay-secs, then
    --shutdown-deadline-secs) and a few seconds more before it kills it:
    terminationGracePeriodSeconds is the delay + the deadline + 5."""
    problems = []
    for deployment in index.of_kind("Deployment"):
        pod = deployment.body["spec"]["template"]["spec"]
        for container in pod.get("containers", []):
            def seconds(flag: str) -> list[int]:
                return [int(a.split("=", 1)[1]) for a in container.get("args", []) if a.startswith(f"{flag}=")]
            deadlines = seconds("--shutdown-deadline-secs")
            if not deadlines:
                continue
            drain = sum(seconds("--drain-delay-secs")) + deadlines[0]
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace != drain + 5:
                problems.append(deployment.problem(
                    "spec.template.spec.terminationGracePeriodSeconds",
                    f"{grace}, but {container['name']} drains for {drain} s (--drain-delay-secs and "
                    f"--shutdown-deadline-secs): make it {drain + 5}",
                ))
    return problems


CHECKS = [
    check_backend_refs,
    check_targets,
    check_services,
    check_network_policies,
    check_disruption_budgets,
    check_workloads,
    check_service_addresses,
    check_pod_security,
    check_termination_grace,
]


def check_references(documents: list[Document]) -> list[Problem]:
    index = Index(documents)
    return [problem for check in CHECKS for problem in check(index)]
