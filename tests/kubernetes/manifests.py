"""Loading manifests, and checking each one alone as the API server would on create."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import yaml

import crd_schema

# The Kubernetes version whose core schemas kubernetes-validate checks against.
KUBERNETES_VERSION = "1.34"

# ObjectMeta's fields (k8s.io/apimachinery meta/v1): anything else in metadata is unknown.
_OBJECT_META = {
    "annotations", "creationTimestamp", "deletionGracePeriodSeconds", "deletionTimestamp",
    "finalizers", "generateName", "generation", "labels", "managedFields", "name", "namespace",
    "ownerReferences", "resourceVersion", "selfLink", "uid",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Problem:
    """One thing the API server (or a consumer of the resource) would refuse."""

    resource: str
    path: str
    message: str

    def __str__(self):
        return f"{self.resource}: {self.path}: {self.message}"


@dataclass
class Document:
    file: str
    body: dict

    @property
    def kind(self) -> str:
        return self.body.get("kind", "?")

    @property
    def name(self) -> str:
        return self.body.get("metadata", {}).get("name", "?")

    @property
    def namespace(self) -> str | None:
        return self.body.get("metadata", {}).get("namespace")

    @property
    def label(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where} ({self.file})"

    def problem(self, path: str, message: str) -> Problem:
        return Problem(self.label, path, message)


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping, as strict field validation does."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f'duplicate field "{key}"', key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_text(text: str, file: str) -> list[Document]:
    return [Document(file, body) for body in yaml.load_all(text, Loader=_StrictLoader) if body]


def load_folder(folder: Path) -> list[Document]:
    """Every resource of the folder's manifests (kustomization files are not resources)."""
    documents = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += load_text(path.read_text(), path.name)
    return documents


def _check_metadata(document: Document) -> list[Problem]:
    metadata = document.body.get("metadata")
    if not isinstance(metadata, dict):
        return [document.problem("metadata", "Required value")]
    problems = []
    name = metadata.get("name")
    # Services and Namespaces are DNS names themselves; other kinds take DNS subdomains.
    rule = {"Service": _DNS_1035_LABEL, "Namespace": _DNS_LABEL}.get(document.kind, _DNS_SUBDOMAIN)
    if not name:
        problems.append(document.problem("metadata.name", "Required value"))
    elif not isinstance(name, str) or len(name) > 253 or not rule.fullmatch(name):
        problems.append(document.problem("metadata.name", f'Invalid value: "{name}": not a valid name'))
    namespace = metadata.get("namespace")
    if namespace is not None and not _DNS_LABEL.fullmatch(str(namespace)):
        problems.append(
            document.problem("metadata.namespace", f'Invalid value: "{namespace}": not a DNS label')
        )
    for key, value in (metadata.get("labels") or {}).items():
        if not _QUALIFIED_NAME.fullmatch(key.rpartition("/")[2]):
            problems.append(document.problem("metadata.labels", f'Invalid value: "{key}": not a label key'))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            problems.append(
                document.problem(f"metadata.labels.{key}", f'Invalid value: "{value}": not a label value')
            )
    return problems


_checked = {}


def check_document(document: Document, crds: crd_schema.CrdCatalog) -> list[Problem]:
    """What the API server would refuse in this one resource, alone."""
    # cel-python takes milliseconds a rule: a resource checked once is not checked again.
    key = (id(crds), document.file, json.dumps(document.body, sort_keys=True))
    if key not in _checked:
        _checked[key] = _check_document(document, crds)
    return _checked[key]


def _check_document(document: Document, crds: crd_schema.CrdCatalog) -> list[Problem]:
    body = document.body
    for key in ("apiVersion", "kind"):
        if not isinstance(body.get(key), str) or not body[key]:
            return [document.problem(key, "Required value")]
    problems = _check_metadata(document)
    if "metadata" not in body:
        return problems
    if crds.knows(body["apiVersion"]):
        served = crds.lookup(body["apiVersion"], body["kind"])
        if isinstance(served, str):
            return problems + [document.problem("kind", served)]
        problems += [
            document.problem(f"metadata.{key}", f'unknown field "metadata.{key}"')
            for key in body["metadata"]
            if key not in _OBJECT_META
        ]
        return problems + [document.problem(p, m) for p, m in crd_schema.validate(body, served)]
    try:
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.path)
        path = path.lstrip(".") or "<root>"
        problems.append(document.problem(path, error.message))
    except kubernetes_validate.SchemaNotFoundError as error:
        problems.append(document.problem("kind", error.message))
    return problems
