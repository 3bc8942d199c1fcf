"""Says whether answers in this run were checked against OpenAI's published schemas."""

import pytest


def test_openai_spec_is_available_for_validation(spec):
    if not spec.available:
        pytest.skip(f"OpenAI OpenAPI spec not found at {spec.path}: responses are not schema-validated in this run")
    # The validator must reject what the spec forbids, or passing checks mean nothing.
    with pytest.raises(AssertionError):
        spec.validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": 400}})
    spec.validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})
