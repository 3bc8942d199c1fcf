"""envoy/kubernetes as an operator applies it: every resource accepted, every reference resolved,
modelgate's configuration the demo's."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest

import gateway_config
import manifests
import references
from paths import MANIFESTS, REPO
from validate import validate

DOCUMENTS = manifests.load_folder(MANIFESTS) if MANIFESTS.is_dir() else []


def test_the_folder_has_the_contracts_files(documents):
    names = {path.name for path in MANIFESTS.glob("*.yaml")}
    assert {"namespace.yaml", "gateway.yaml", "modelgate.yaml", "routes.yaml", "policies.yaml",
            "inference-pool.yaml"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: f"{d.file}:{d.kind}/{d.name}")
def test_the_api_server_would_accept(document, crds):
    assert [str(p) for p in manifests.check_document(document, crds)] == []


@pytest.mark.parametrize("check", references.CHECKS, ids=lambda c: c.__name__)
def test_references_resolve(check, documents):
    assert [str(p) for p in check(references.Index(documents))] == []


GATEWAY_CHECKS = [
    gateway_config.check_filter_config,
    gateway_config.check_ext_proc,
    lambda index, demo: gateway_config.check_token(index),
    lambda index, demo: gateway_config.check_clusters(index),
    lambda index, demo: gateway_config.check_inner_listener(index),
    lambda index, demo: gateway_config.check_patch_targets(index),
    lambda index, demo: gateway_config.check_key_files(index),
    gateway_config.check_pools,
    lambda index, demo: gateway_config.check_inference_pools(index),
]
GATEWAY_CHECK_NAMES = [
    "filter-config-is-the-demos", "ext-proc-is-the-demos", "one-internal-token", "filter-clusters-exist",
    "inner-listener-routes", "patch-targets-exist", "key-files-mounted", "pools-file", "inference-pools",
]


@pytest.mark.parametrize("check", GATEWAY_CHECKS, ids=GATEWAY_CHECK_NAMES)
def test_modelgate_configuration(check, documents, demo):
    assert [str(p) for p in check(references.Index(documents), demo)] == []


def test_the_modelgate_resources_are_all_there(documents):
    # The checks above pass vacuously on a folder that lost its policies: name what must exist.
    gateway = gateway_config.Modelgate(references.Index(documents))
    assert gateway.extension is not None, "no EnvoyExtensionPolicy loads the modelgate filter"
    assert gateway.patch is not None, "no EnvoyPatchPolicy"
    assert gateway.ext_proc() is not None, "the patch policy adds no ext_proc filter"
    assert gateway.added(gateway_config.LISTENER_TYPE), "the patch policy adds no inner listener"


# What `kubectl apply -k` applies, for each kustomization of envoy/: with, for an overlay onto a
# Gateway the user already runs, a stand-in for that Gateway under the overlay's placeholder names
# (its Envoy Service named as the overlay's --gateway-url says).
YOUR_GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: your-gateway-class}
spec:
  controllerName: gateway.envoyproxy.io/gatewayclass-controller
  parametersRef: {group: gateway.envoyproxy.io, kind: EnvoyProxy, name: your-proxy, namespace: your-gateway-namespace}
---
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyProxy
metadata: {name: your-proxy, namespace: your-gateway-namespace}
spec:
  provider:
    type: Kubernetes
    kubernetes: {envoyService: {name: your-gateway-envoy-service}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: your-gateway, namespace: your-gateway-namespace}
spec:
  gatewayClassName: your-gateway-class
  listeners:
  - {name: http, protocol: HTTP, port: 80, allowedRoutes: {namespaces: {from: All}}}
"""
# The kubectl pinned in tests/requirements.txt, beside this Python: not whichever the host has.
KUBECTL = Path(sys.executable).with_name("kubectl")
STAND_INS = {"envoy/kubernetes": "", "envoy/kubernetes-byo-gateway": YOUR_GATEWAY}
@functools.cache
def kustomize(folder: str) -> str:
    """What `kubectl apply -k` applies for `folder`, rendered once per run."""
    return subprocess.run([KUBECTL, "kustomize", str(REPO / folder)], capture_output=True, text=True, check=True).stdout


KUSTOMIZATIONS = sorted(str(k.parent.relative_to(REPO)) for k in (REPO / "envoy").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_kustomize_output_validates(folder, crds, demo):
    assert folder in STAND_INS, f"a new kustomization: say what it expects to exist already (STAND_INS)"
    documents = manifests.load_text(kustomize(folder), f"kubectl kustomize {folder}")
    documents += manifests.load_text(STAND_INS[folder], "stand-in")
    assert [str(p) for p in validate(documents, crds, demo)] == []


def test_your_gateway_must_admit_modelgates_routes(crds, demo):
    # The mistake the overlay's instructions warn of: a Gateway whose listener takes routes from
    # its own namespace only (the Gateway API default) never serves modelgate's.
    folder = "envoy/kubernetes-byo-gateway"
    documents = manifests.load_text(kustomize(folder), folder)
    documents += manifests.load_text(STAND_INS[folder].replace(", allowedRoutes: {namespaces: {from: All}}", ""), "stand-in")
    found = [str(p) for p in validate(documents, crds, demo)]
    routes = sorted(d.name for d in documents if d.kind == "HTTPRoute")
    assert found == [
        f"HTTPRoute modelgate/{name} ({folder}): spec.parentRefs[0]: Gateway your-gateway-namespace/your-gateway "
        "(stand-in) admits routes from namespace your-gateway-namespace only (allowedRoutes)"
        for name in routes
    ]
