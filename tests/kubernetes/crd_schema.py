"""Custom resources checked against their CRD as the API server checks them on create.

The order is the server's: null fields that are not `nullable` are dropped, fields the schema
does not know are refused (`kubectl apply --validate=strict`; the server would prune them
otherwise), schema defaults are applied, then the OpenAPI value validations with the
`x-kubernetes-*` extensions run, then the CEL rules (`x-kubernetes-validations`) on the
defaulted object. Messages follow the server's wording: `path: Required value`, `Unsupported
value`, `Invalid value`, `Duplicate value`.
"""

import base64
import copy
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import re2
import yaml

import cel_rules

# The CRDs are megabytes of YAML: libyaml's parser when PyYAML has it.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Fields every object has beside its schema's own.
_ROOT_FIELDS = {"apiVersion", "kind", "metadata"}


@dataclass(frozen=True)
class Served:
    """The schema of one served version of a CRD."""

    kind: str
    api_version: str
    namespaced: bool
    schema: dict


class CrdCatalog:
    """The CRDs of a folder, by apiVersion and kind."""

    def __init__(self, folder: Path):
        self._crds = {}
        for path in sorted(folder.glob("*.yaml")):
            for document in yaml.load_all(path.read_text(), Loader=_LOADER):
                if document and document.get("kind") == "CustomResourceDefinition":
                    spec = document["spec"]
                    self._crds[(spec["group"], spec["names"]["kind"])] = spec

    def crds(self):
        return self._crds.values()

    def knows(self, api_version: str) -> bool:
        group = api_version.rpartition("/")[0]
        return any(known_group == group for known_group, _ in self._crds)

    def lookup(self, api_version: str, kind: str) -> Served | str:
        """The served schema, or why the server would refuse the apiVersion/kind."""
        group, _, version = api_version.rpartition("/")
        spec = self._crds.get((group, kind))
        if spec is None:
            return f'no CRD defines kind "{kind}" in group "{group}"'
        for entry in spec["versions"]:
            if entry["name"] == version:
                if not entry.get("served", False):
                    return f"{api_version} {kind} is not served by its CRD"
                return Served(
                    kind,
                    api_version,
                    spec["scope"] == "Namespaced",
                    entry["schema"]["openAPIV3Schema"],
                )
        served = [entry["name"] for entry in spec["versions"] if entry.get("served")]
        return f"{kind} has no version {version} (served: {', '.join(served)})"


def validate(document: dict, served: Served) -> list[tuple[str, str]]:
    """(path, message) for every way the server would refuse `document`."""
    obj = copy.deepcopy(document)
    # metadata is ObjectMeta whatever the CRD says of it: checked with every kind's (metadata.py).
    schema = copy.deepcopy(served.schema)
    schema.get("properties", {}).pop("metadata", None)
    problems = []
    _prune_and_default(obj, schema, "", problems, root=True)
    if problems:
        return problems
    _check_value(obj, schema, "", problems, root=True)
    if problems:
        # The rules assume a well-typed object; the server reports the schema errors first.
        return problems
    _check_rules(obj, schema, "", problems)
    return problems


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _known_fields(schema: dict, root: bool) -> set | None:
    """The fields an object may have, or None if it may have any."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
        return None
    known = set(schema.get("properties", {}))
    if root or schema.get("x-kubernetes-embedded-resource"):
        known |= _ROOT_FIELDS
    return known


def _prune_and_default(value, schema: dict, path: str, problems: list, root=False):
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        properties = schema.get("properties", {})
        for key in list(value):
            if value[key] is None and not properties.get(key, {}).get("nullable"):
                del value[key]  # the server drops nulls the schema does not allow
        known = _known_fields(schema, root)
        if known is not None:
            for key in value:
                if key not in known:
                    problems.append((_join(path, key), f'unknown field "{_join(path, key)}"'))
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if root and key in _ROOT_FIELDS:
                continue
            if key in properties:
                _prune_and_default(item, properties[key], _join(path, key), problems)
            elif isinstance(schema.get("additionalProperties"), dict):
                _prune_and_default(item, schema["additionalProperties"], _join(path, key), problems)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _prune_and_default(item, schema["items"], _join(path, index), problems)


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def _json_type(value) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return "null"


def _quote(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _format_error(fmt: str, value: str) -> str | None:
    try:
        if fmt == "byte":
            base64.b64decode(value, validate=True)
        elif fmt == "date-time":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
    except ValueError:
        return f"must be of format {fmt}"
    return None


def _check_value(value, schema: dict, path: str, problems: list, root=False):
    where = path or "<root>"
    before = len(problems)

    def invalid(message):
        problems.append((where, f"Invalid value: {_quote(value)}: {message}"))

    if value is None:
        if not schema.get("nullable"):
            problems.append((where, "Invalid value: null: must not be null"))
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (_TYPES["integer"](value) or isinstance(value, str)):
            invalid("must be an integer or a string")
            return
    elif "type" in schema and not _TYPES[schema["type"]](value):
        problems.append(
            (where, f"Invalid value: \"{_json_type(value)}\": must be of type {schema['type']}")
        )
        return

    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_quote(v) for v in schema["enum"])
        problems.append((where, f"Unsupported value: {_quote(value)}: supported values: {supported}"))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append((where, f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            invalid(f"should be at least {schema['minLength']} chars long")
        if "pattern" in schema and not re2.search(schema["pattern"], value):
            invalid(f"should match '{schema['pattern']}'")
        if "format" in schema and (error := _format_error(schema["format"], value)):
            invalid(error)
    if _TYPES["number"](value):
        _check_bounds(value, schema, invalid)
    if isinstance(value, list):
        _check_list(value, schema, where, path, problems)
    if isinstance(value, dict):
        _check_object(value, schema, path, problems, root)
    if len(problems) == before:
        _check_combinators(value, schema, where, path, problems)


def _check_bounds(value, schema: dict, invalid):
    if "minimum" in schema:
        low = schema["minimum"]
        if value < low or (schema.get("exclusiveMinimum") and value == low):
            invalid(f"should be greater than or equal to {low}")
    if "maximum" in schema:
        high = schema["maximum"]
        if value > high or (schema.get("exclusiveMaximum") and value == high):
            invalid(f"should be less than or equal to {high}")
    if "multipleOf" in schema and value % schema["multipleOf"]:
        invalid(f"should be a multiple of {schema['multipleOf']}")


def _check_list(value: list, schema: dict, where: str, path: str, problems: list):
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        problems.append((where, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
    if "minItems" in schema and len(value) < schema["minItems"]:
        problems.append(
            (where, f"Invalid value: {len(value)}: should have at least {schema['minItems']} items")
        )
    list_type = schema.get("x-kubernetes-list-type")
    if list_type in ("set", "map"):
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = []
        for index, item in enumerate(value):
            identity = (
                tuple(item.get(k) for k in keys) if list_type == "map" and isinstance(item, dict) else item
            )
            if identity in seen:
                shown = dict(zip(keys, identity)) if list_type == "map" else identity
                problems.append((_join(path, index), f"Duplicate value: {shown!r}"))
            seen.append(identity)
    for index, item in enumerate(value):
        if "items" in schema:
            _check_value(item, schema["items"], _join(path, index), problems)


def _check_object(value: dict, schema: dict, path: str, problems: list, root: bool):
    properties = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            problems.append((_join(path, key), "Required value"))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        problems.append((path or "<root>", f"Too many: {len(value)}: must have at most {schema['maxProperties']} items"))
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        problems.append(
            (path or "<root>", f"Invalid value: {len(value)}: should have at least {schema['minProperties']} properties")
        )
    if schema.get("x-kubernetes-embedded-resource"):
        for key in ("apiVersion", "kind"):
            if not value.get(key):
                problems.append((_join(path, key), "Required value"))
    for key, item in value.items():
        if root and key in _ROOT_FIELDS and key not in properties:
            continue
        if key in properties:
            _check_value(item, properties[key], _join(path, key), problems)
        elif isinstance(schema.get("additionalProperties"), dict):
            _check_value(item, schema["additionalProperties"], _join(path, key), problems)


def _matches(value, schema: dict) -> bool:
    """Whether a value passes a combinator's branch (value validations only, in structural schemas)."""
    scratch = []
    _check_value(value, schema, "", scratch)
    return not scratch


def _check_combinators(value, schema: dict, where: str, path: str, problems: list):
    for branch in schema.get("allOf", []):
        _check_value(value, branch, path, problems)
    if "anyOf" in schema and not any(_matches(value, b) for b in schema["anyOf"]):
        problems.append((where, "must validate at least one schema (anyOf)"))
    if "oneOf" in schema and sum(_matches(value, b) for b in schema["oneOf"]) != 1:
        problems.append((where, "must validate one and only one schema (oneOf)"))
    if "not" in schema and _matches(value, schema["not"]):
        problems.append((where, 'must not validate the schema (not)'))


def _check_rules(value, schema: dict, path: str, problems: list):
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        if cel_rules.is_transition_rule(text) or cel_rules.unevaluable_reason(text):
            continue
        where = path or "<root>"
        try:
            if not cel_rules.evaluate(text, value):
                message = rule.get("message") or f"failed rule: {text}"
                problems.append((where, f"Invalid value: \"{_json_type(value)}\": {message}"))
        except cel_rules.RuleError as error:
            problems.append((where, f"rule {text!r} failed to evaluate: {error}"))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key) or (additional if isinstance(additional, dict) else None)
            if sub is not None:
                _check_rules(item, sub, _join(path, key), problems)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check_rules(item, schema["items"], _join(path, index), problems)
