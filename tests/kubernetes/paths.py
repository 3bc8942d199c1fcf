"""Where the manifests, the demo and the CRDs they are checked against are."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "envoy" / "kubernetes"


def crd_folder() -> Path | None:
    """The shared CRDs beside the repository (a CI checkout has them there too), never copied."""
    for folder in (REPO.parent / "shared" / "k8s-crds", Path("/work/shared/k8s-crds")):
        if folder.is_dir():
            return folder
    return None
