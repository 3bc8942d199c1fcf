"""The CEL rules of CRDs (`x-kubernetes-validations`), evaluated with cel-python.

Kubernetes evaluates these rules with CEL's standard library plus its own libraries (strings,
lists, IP addresses, formats...). cel-python has the standard library; the Kubernetes functions
the CRDs in use call are added here. A rule that does not compile, or calls a function neither
provides, cannot be evaluated here: `unevaluable_reason` says why, and the test suite keeps the
list of such rules fixed (unevaluable_cel_rules.txt).
"""

import ipaddress
from functools import lru_cache

import celpy
from celpy import celtypes

# Macros and standard functions cel-python provides (its function table has the rest).
_MACROS = {"has", "all", "exists", "exists_one", "map", "filter"}


def _substring(text, start, end=None):
    return celtypes.StringType(text[int(start) :] if end is None else text[int(start) : int(end)])


def _split(text, separator, limit=None):
    parts = text.split(separator) if limit is None else text.split(separator, int(limit) - 1)
    return celtypes.ListType([celtypes.StringType(part) for part in parts])


def _is_ip(text):
    try:
        ipaddress.ip_address(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


# Kubernetes' CEL string library (k8s.io/apiserver/pkg/cel/library, cel-go ext.Strings) and
# IP library: the functions the CRDs call.
KUBERNETES_FUNCTIONS = {
    "lowerAscii": lambda text: celtypes.StringType(text.lower()),
    "upperAscii": lambda text: celtypes.StringType(text.upper()),
    "trim": lambda text: celtypes.StringType(text.strip()),
    "substring": _substring,
    "split": _split,
    "replace": lambda text, old, new: celtypes.StringType(text.replace(old, new)),
    "indexOf": lambda text, part: celtypes.IntType(text.find(part)),
    "lastIndexOf": lambda text, part: celtypes.IntType(text.rfind(part)),
    "join": lambda items, separator="": celtypes.StringType(separator.join(items)),
    "isIP": _is_ip,
}

_ENVIRONMENT = celpy.Environment()
_AVAILABLE = (
    _MACROS | set(KUBERNETES_FUNCTIONS) | set(celpy.evaluation.base_functions)
)


def is_transition_rule(rule: str) -> bool:
    """Rules that compare with the old object: the API server runs them only on updates."""
    return "oldSelf" in rule


@lru_cache(maxsize=None)
def _compile(rule: str):
    try:
        ast = _ENVIRONMENT.compile(rule)
    except celpy.CELParseError as error:
        return None, f"does not parse: {str(error).splitlines()[0]}"
    called = {
        str(node.children[1] if node.data == "member_dot_arg" else node.children[0])
        for node in ast.iter_subtrees()
        if node.data in ("member_dot_arg", "ident_arg")
    }
    missing = sorted(called - _AVAILABLE)
    if missing:
        return None, f"calls {', '.join(missing)}, which cel-python lacks"
    return _ENVIRONMENT.program(ast, functions=KUBERNETES_FUNCTIONS), None


def unevaluable_reason(rule: str) -> str | None:
    """Why this rule cannot be evaluated here, or None if it can."""
    return _compile(rule)[1]


class RuleError(Exception):
    """The rule raised an error while evaluated (the API server refuses the object then too)."""


def evaluate(rule: str, value) -> bool:
    """The rule's verdict on `value` (the JSON value at the rule's place, as `self`)."""
    program, reason = _compile(rule)
    if program is None:
        raise ValueError(reason)
    try:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError as error:
        raise RuleError(_short(error)) from None
    if not isinstance(result, celtypes.BoolType):
        raise RuleError(f"evaluated to {result!r}, not a boolean")
    return bool(result)


def _short(error: celpy.CELEvalError) -> str:
    """cel-python's messages carry the whole activation: the first clause says what went wrong."""
    message = str(error.args[0]) if error.args else str(error)
    return message.split(" (in activation")[0]


def rules_of(schema: dict, path: str = ""):
    """(field path, rule) for every rule in a CRD version's schema."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path or "<root>", rule["rule"]
    for key, sub in schema.get("properties", {}).items():
        yield from rules_of(sub, f"{path}.{key}" if path else key)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from rules_of(schema[key], f"{path}[*]")
    for key in ("allOf", "anyOf", "oneOf"):
        for branch in schema.get(key, []):
            yield from rules_of(branch, path)
