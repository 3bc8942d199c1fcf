"""Validate a folder of modelgate's Kubernetes manifests: `python validate.py [FOLDER]`.

Each resource as the API server would take it (CRDs' schemas and CEL rules, core kinds through
kubernetes-validate), then the references between them and modelgate's configuration against
envoy/demo.yaml. Prints one line per problem; exits 1 if there is any.
"""

import sys
from pathlib import Path

import crd_schema
import gateway_config
import manifests
import references
from paths import MANIFESTS, REPO, crd_folder


def validate(documents: list[manifests.Document], crds: crd_schema.CrdCatalog, demo: dict) -> list[manifests.Problem]:
    problems = [problem for document in documents for problem in manifests.check_document(document, crds)]
    if problems:
        return problems  # references between resources the server refuses would only add noise
    return references.check_references(documents) + gateway_config.check_gateway_config(
        references.Index(documents), demo
    )


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else MANIFESTS
    crds = crd_folder()
    if crds is None:
        print("no shared/k8s-crds beside the repository", file=sys.stderr)
        return 2
    problems = validate(manifests.load_folder(folder), crd_schema.CrdCatalog(crds), gateway_config.load_demo(REPO))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
