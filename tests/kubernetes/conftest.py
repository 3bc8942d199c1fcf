"""Where the manifests and the CRDs they are checked against are."""

from pathlib import Path

import pytest

import crd_schema
import manifests

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "envoy" / "kubernetes"


def crd_folder() -> Path | None:
    """The shared CRDs beside the repository (a CI checkout has them there too), never copied."""
    for folder in (REPO.parent / "shared" / "k8s-crds", Path("/work/shared/k8s-crds")):
        if folder.is_dir():
            return folder
    return None


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
