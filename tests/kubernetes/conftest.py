"""Where the manifests and the CRDs they are checked against are."""

import pytest

import crd_schema
import gateway_config
import manifests
from paths import MANIFESTS, REPO, crd_folder


@pytest.fixture(scope="session")
def crds() -> crd_schema.CrdCatalog:
    folder = crd_folder()
    if folder is None:
        pytest.skip("no shared/k8s-crds beside the repository: the CRD schemas are not available")
    return crd_schema.CrdCatalog(folder)


@pytest.fixture(scope="session")
def documents() -> list[manifests.Document]:
    if not MANIFESTS.is_dir():
        pytest.skip(f"no {MANIFESTS.relative_to(REPO)} folder")
    return manifests.load_folder(MANIFESTS)


@pytest.fixture(scope="session")
def demo():
    """What envoy/demo.yaml and envoy/pools.json configure, for the manifests to match."""
    return gateway_config.load_demo(REPO)
