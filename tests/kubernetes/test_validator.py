"""The validator itself: each rule of the API server it emulates refuses what the server would.

Small resources against the real CRDs, and a few schema extensions the CRDs use rarely against
hand-made schemas, so the manifests' checks are only as trusted as these.
"""

from pathlib import Path

import pytest
import yaml

import cel_rules
import crd_schema
import manifests

HERE = Path(__file__).parent


def problems_of(text: str, crds) -> list[str]:
    found = []
    for document in manifests.load_text(text, "test.yaml"):
        found += [f"{p.path}: {p.message}" for p in manifests.check_document(document, crds)]
    return found


ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm, namespace: modelgate}
spec:
  parentRefs: [{name: modelgate}]
  rules:
  - matches: [{headers: [{name: x-modelgate-cluster, value: llama_pool}]}]
    backendRefs: [{name: llama-pool, port: 8000}]
"""


def test_a_valid_route_passes(crds):
    assert problems_of(ROUTE, crds) == []


def test_an_unknown_field_is_refused(crds):
    text = ROUTE.replace("port: 8000}", "port: 8000, weigth: 2}")
    assert problems_of(text, crds) == [
        'spec.rules[0].backendRefs[0].weigth: unknown field "spec.rules[0].backendRefs[0].weigth"'
    ]


def test_a_field_given_twice_is_refused():
    with pytest.raises(yaml.YAMLError, match='duplicate field "name"'):
        manifests.load_text("metadata: {name: a, name: b}", "test.yaml")


def test_an_enum_and_a_type_are_checked(crds):
    text = ROUTE.replace("[{headers:", "[{path: {type: Prefix}, headers:").replace("8000", '"8000"')
    assert problems_of(text, crds) == [
        'spec.rules[0].matches[0].path.type: Unsupported value: "Prefix": supported values: '
        '"Exact", "PathPrefix", "RegularExpression"',
        'spec.rules[0].backendRefs[0].port: Invalid value: "string": must be of type integer',
    ]


def test_a_required_field_is_checked(crds):
    text = ROUTE.replace("parentRefs: [{name: modelgate}]", "parentRefs: [{namespace: modelgate}]")
    assert problems_of(text, crds) == ["spec.parentRefs[0].name: Required value"]


def test_a_pattern_is_checked(crds):
    text = ROUTE.replace("name: x-modelgate-cluster", "name: x modelgate")
    [problem] = problems_of(text, crds)
    assert problem.startswith('spec.rules[0].matches[0].headers[0].name: Invalid value: "x modelgate": should match')


def test_a_cel_rule_sees_the_defaults(crds):
    # The rule refusing a backendRequest timeout longer than the request's runs on the defaulted
    # object: its message is the CRD's own.
    text = ROUTE.replace("port: 8000}]", "port: 8000}]\n    timeouts: {request: 10s, backendRequest: 20s}")
    assert problems_of(text, crds) == [
        'spec.rules[0].timeouts: Invalid value: "object": backendRequest timeout cannot be longer '
        "than request timeout"
    ]


def test_a_list_map_key_given_twice_is_refused(crds):
    text = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: modelgate, namespace: modelgate}
spec:
  gatewayClassName: modelgate
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: http, port: 81, protocol: HTTP}
"""
    assert problems_of(text, crds) == ["spec.listeners[1]: Duplicate value: {'name': 'http'}"]


def test_a_version_not_served_and_an_unknown_kind_are_refused(crds):
    assert problems_of(ROUTE.replace("/v1\n", "/v2\n", 1), crds) == [
        "kind: HTTPRoute has no version v2 (served: v1, v1beta1)"
    ]
    assert problems_of(ROUTE.replace("kind: HTTPRoute", "kind: HttpRoute"), crds) == [
        'kind: no CRD defines kind "HttpRoute" in group "gateway.networking.k8s.io"'
    ]


def test_a_name_the_server_refuses(crds):
    assert problems_of(ROUTE.replace("name: llm,", "name: LLM_Route,"), crds) == [
        'metadata.name: Invalid value: "LLM_Route": not a valid name'
    ]


def test_core_kinds_go_through_kubernetes_validate_strictly(crds):
    text = """
apiVersion: v1
kind: Service
metadata: {name: modelgate-ext-proc, namespace: modelgate}
spec:
  ports: [{name: grpc, port: 50051, targetPort: grpc, protocoll: TCP}]
"""
    [problem] = problems_of(text, crds)
    assert problem.startswith("spec.ports[0]: Additional properties are not allowed ('protocoll'")


SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
                "template": {"type": "object", "x-kubernetes-embedded-resource": True},
                "mode": {"type": "string", "default": "a", "enum": ["a", "b"]},
                "note": {"type": "string"},
            },
            "x-kubernetes-validations": [
                {"rule": "self.mode == 'a' || has(self.note)", "message": "mode b needs a note"}
            ],
        }
    },
}
SERVED = crd_schema.Served("Thing", "example.com/v1", True, SCHEMA)


def check(spec) -> list[str]:
    body = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": spec}
    return [f"{path}: {message}" for path, message in crd_schema.validate(body, SERVED)]


def test_schema_extensions_behave_as_on_a_server():
    good = {"port": "http", "free": {"any": {"thing": 1}}, "tags": ["a", "b"], "note": None,
            "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}}
    assert check(good) == []
    assert check({"port": 80}) == []
    assert check({"port": 1.5}) == ['spec.port: Invalid value: 1.5: must be an integer or a string']
    assert check({"tags": ["a", "a"]}) == ["spec.tags[1]: Duplicate value: 'a'"]
    assert check({"template": {"metadata": {}}}) == [
        "spec.template.apiVersion: Required value",
        "spec.template.kind: Required value",
    ]
    assert check({"mode": "b"}) == ['spec: Invalid value: "object": mode b needs a note']


def test_the_unevaluable_cel_rules_are_the_listed_ones(crds):
    found = set()
    for spec in crds.crds():
        for version in spec["versions"]:
            where = f"{spec['names']['kind']}/{version['name']}"
            for path, rule in cel_rules.rules_of(version["schema"]["openAPIV3Schema"]):
                if cel_rules.unevaluable_reason(rule):
                    found.add(f"{where} {path}: {rule}")
    listed = {
        line
        for line in (HERE / "unevaluable_cel_rules.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert sorted(found - listed) == [], "rules newly unevaluable: decide, then list them"
    assert sorted(listed - found) == [], "listed rules now evaluable: remove them from the list"


COMBINED = crd_schema.Served("Thing", "example.com/v1", True, {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "address": {"type": "string", "format": "ipv4"},
                "a": {"type": "string"},
                "b": {"type": "string"},
                "c": {"type": "string", "nullable": True},
            },
            "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
        }
    },
})


def check_combined(spec) -> list[str]:
    body = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": spec}
    return [f"{path}: {message}" for path, message in crd_schema.validate(body, COMBINED)]


def test_combinators_formats_and_nulls():
    assert check_combined({"a": "x", "address": "10.0.0.1", "c": None}) == []
    assert check_combined({"a": "x", "b": None}) == []  # a null the schema does not allow is dropped
    assert check_combined({"a": "x", "b": "y"}) == ["spec: must validate one and only one schema (oneOf)"]
    assert check_combined({"a": "x", "address": "10.0.0"}) == [
        'spec.address: Invalid value: "10.0.0": must be of format ipv4'
    ]
