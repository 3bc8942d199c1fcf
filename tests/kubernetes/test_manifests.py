"""envoy/kubernetes as an operator applies it: every resource accepted, every reference resolved,
modelgate's configuration the demo's."""

import shutil
import subprocess

import pytest

import gateway_config
import manifests
import references
from paths import MANIFESTS, REPO
from validate import validate

DOCUMENTS = manifests.load_folder(MANIFESTS) if MANIFESTS.is_dir() else []


@pytest.fixture(scope="session")
def demo():
    return gateway_config.demo_envoy(REPO)


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
    lambda index, demo: gateway_config.check_pools(index),
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
    gateway = gateway_config.Gateway(references.Index(documents))
    assert gateway.extension is not None, "no EnvoyExtensionPolicy loads the modelgate filter"
    assert gateway.patch is not None, "no EnvoyPatchPolicy"
    assert gateway.ext_proc() is not None, "the patch policy adds no ext_proc filter"
    assert gateway.added(gateway_config.LISTENER_TYPE), "the patch policy adds no inner listener"


KUSTOMIZATIONS = sorted(MANIFESTS.rglob("kustomization.yaml")) if MANIFESTS.is_dir() else []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda k: str(k.parent.relative_to(MANIFESTS)))
def test_kustomize_output_validates(kustomization, crds, demo):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: kustomize output not checked")
    built = subprocess.run(
        [kubectl, "kustomize", str(kustomization.parent)], capture_output=True, text=True, check=True
    ).stdout
    documents = manifests.load_text(built, f"kubectl kustomize {kustomization.parent.relative_to(REPO)}")
    assert [str(p) for p in validate(documents, crds, demo)] == []
